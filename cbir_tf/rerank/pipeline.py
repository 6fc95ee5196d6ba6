"""The one re-ranking pipeline: method names, settings, and `rerank`, used by every caller.

Evaluation (`evaluate.rankings.rank_method`: full rankings `[Q, N]`), the `Retriever` (top k with
scores; hence `search.py` and the search service) all rank through `rerank`. A method is a
'+'-joined list of steps, applied in this order:

- 'dba': database-side augmentation (each database vector replaced by the α-weighted average
  of itself and its n nearest database vectors); later steps see the augmented database;
- 'aqe': α-query expansion of the queries (against the database the method searches);
- 'diffusion': diffusion scores on the database's mutual kNN graph (else: inner products).

'none' is no re-ranking; 'plain', the evaluation table's word for it, is accepted as an alias.
Settings come from a config's `rerank` block (`configs/default.py` is the only source of their
defaults: fields a block lacks take its values). The database side (search index, augmented
vectors, diffusion graph) lives in a `Database`, built once and reused by every query.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbir_tf import config
from cbir_tf.rerank import auto, diffusion, query_expansion
from cbir_tf.rerank.auto import AUTO
from cbir_tf.rerank.cg import CGInfo
from cbir_tf.rerank.graph import approximate_knn, knn_affinity, mutual_knn_affinity
from cbir_tf.search import exact as search
from cbir_tf.search.index import SearchIndex

__all__ = [
    "AUTO",
    "AUTO_FIELDS",
    "METHODS",
    "NONE",
    "Database",
    "Ranking",
    "STEP_BLOCKS",
    "RerankSettings",
    "check_method",
    "method_settings",
    "parse_count",
    "rerank",
]

_log = logging.getLogger(__name__)

NONE = "none"
METHODS = (NONE, "aqe", "diffusion", "aqe+diffusion", "dba", "aqe+dba")
ALIASES = {"plain": NONE}


def check_method(method: str, what: str = "rerank", none_word: str = NONE) -> str:
    """The canonical name of `method` (one of `METHODS`, or an alias of one).

    Raises:
      ValueError: unknown method; the message lists the valid ones, 'none' written `none_word`.
    """
    name = ALIASES.get(method, method)
    if name not in METHODS:
        valid = ", ".join(none_word if m == NONE else m for m in METHODS)
        raise ValueError(f"unknown {what} {method!r}; valid: {valid}")
    return name


# -- settings --------------------------------------------------------------------------------

# Fields that may be 'auto' (`cbir_tf.rerank.auto`: chosen from the collection).
AUTO_FIELDS = {"qe": ("n",), "dba": ("n",), "diffusion": ("k", "kq", "truncate")}
Count = int | str  # a whole number, or AUTO


def parse_count(value: Any, field: str) -> Count:
    """An 'auto'-able field's value: AUTO, or a whole number >= 0 (int, or its string, as
    `--config.rerank.diffusion.k=50` gives a field whose default is the string 'auto').

    Raises:
      ValueError: anything else (the field named).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"rerank.{field} must be 'auto' or a whole number, got {value!r}"
            ) from None
    if isinstance(value, bool) or not float(value).is_integer() or value < 0:
        raise ValueError(f"rerank.{field} must be 'auto' or a whole number >= 0, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Expansion:
    """α-weighted expansion: neighbours `n` (or AUTO), similarity exponent `alpha` (α-QE, DBA)."""

    n: Count
    alpha: float


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """Diffusion settings (see `diffusion.diffusion_scores`); truncate 0 = the full graph.
    k, kq and truncate may be AUTO until resolved."""

    k: Count
    kq: Count
    gamma: float
    alpha: float
    max_iter: int
    tol: float
    truncate: Count

    def kwargs(self) -> dict[str, Any]:
        """`diffusion.diffusion_scores` keyword arguments."""
        out = dataclasses.asdict(self)
        out["truncate"] = self.truncate or None
        return out


@dataclasses.dataclass(frozen=True)
class RerankSettings:
    """Settings of every re-ranking step: a config's `rerank` block, typed.

    Fields of `AUTO_FIELDS` may hold AUTO; `resolved` replaces them by numbers (`rerank` does so
    with the database's own `cbir_tf.rerank.auto` values when they are left).
    """

    qe: Expansion
    dba: Expansion
    diffusion: Diffusion

    @classmethod
    def from_config(cls, block: Any = None) -> RerankSettings:
        """Settings from a `rerank` block (ConfigDict, nested mapping, settings or None).

        Fields the block lacks (a partial override, an index written before a step existed)
        take the values of `configs/default.py`; `methods` (the evaluation's list) and `papers`
        (what 'auto' means on the Revisited benchmarks) are ignored. 'auto'-able fields take
        'auto' or a whole number, as a number or a string (`parse_count`).

        Raises:
          ValueError: an unknown block or field (named), a bad 'auto'-able value.
        """
        if isinstance(block, RerankSettings):
            return block
        given = config.as_dict(block)
        values = {name: dict(fields) for name, fields in _defaults().items()}
        for name, fields in given.items():
            if name in IGNORED_BLOCKS:
                continue
            if name not in values or not isinstance(fields, Mapping):
                raise ValueError(f"unknown rerank setting {name!r}; valid: {', '.join(values)}")
            unknown = sorted(set(fields) - set(values[name]))
            if unknown:
                raise ValueError(
                    f"unknown rerank.{name} field(s) {unknown}; valid: {', '.join(values[name])}"
                )
            values[name].update(fields)
        for name, fields in AUTO_FIELDS.items():
            for f in fields:
                values[name][f] = parse_count(values[name][f], f"{name}.{f}")
        d = values["diffusion"]
        return cls(
            qe=Expansion(values["qe"]["n"], float(values["qe"]["alpha"])),
            dba=Expansion(values["dba"]["n"], float(values["dba"]["alpha"])),
            diffusion=Diffusion(
                k=d["k"],
                kq=d["kq"],
                gamma=float(d["gamma"]),
                alpha=float(d["alpha"]),
                max_iter=int(d["max_iter"]),
                tol=float(d["tol"]),
                truncate=d["truncate"],
            ),  # fmt: skip
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{'qe': {...}, 'dba': {...}, 'diffusion': {...}} (what index manifests save)."""
        return dataclasses.asdict(self)

    def auto_fields(self) -> list[str]:
        """The dotted names of the fields still AUTO, e.g. ['qe.n', 'diffusion.k']."""
        d = self.to_dict()
        return [f"{b}.{f}" for b, fields in AUTO_FIELDS.items() for f in fields if d[b][f] == AUTO]

    def resolved(self, values: Mapping[str, Mapping[str, Any]]) -> RerankSettings:
        """These settings with every AUTO field taken from `values` ({'qe': {'n': 1}, ...}, e.g.
        `auto.auto_values(...)` or the config's `rerank.papers`); numbers stay as they are."""
        d = self.to_dict()
        for name in self.auto_fields():
            block, field = name.split(".")
            d[block][field] = parse_count(values[block][field], name)
        return RerankSettings.from_config(d)


# The settings block each step of a method reads.
STEP_BLOCKS = {"aqe": "qe", "dba": "dba", "diffusion": "diffusion"}


def method_settings(method: str, settings: RerankSettings) -> dict[str, dict[str, Any]]:
    """The blocks of `settings` that `method` uses, e.g. {'qe': {...}, 'diffusion': {...}}."""
    d = settings.to_dict()
    steps = check_method(method, "method", none_word="plain").split("+")
    return {STEP_BLOCKS[s]: d[STEP_BLOCKS[s]] for s in steps if s in STEP_BLOCKS}


# Blocks of a config's `rerank` that are not step settings.
IGNORED_BLOCKS = ("methods", "papers")


@functools.cache
def _defaults() -> dict[str, dict[str, Any]]:
    """The step blocks of configs/default.py's `rerank` (read once; callers copy)."""
    values = config.defaults("rerank")
    for name in IGNORED_BLOCKS:
        values.pop(name, None)
    return values


# -- the database side -----------------------------------------------------------------------


class Database:
    """A database prepared for re-ranking: validated once; its search index, DBA-augmented
    vectors and diffusion graphs built on first use and kept for later queries.

    Args:
      vectors: float `[N, D]` L2-normalised, N >= 1 (memory maps are read in blocks).
      backend: 'exact', 'auto', 'ann' or 'faiss' search (see `SearchIndex`); with any
        but 'exact', graphs of `ann_settings.graph_min_rows` rows or more are approximate
        (`graph.approximate_knn`).
      block_size: database rows per search block.
      validate: check the vectors first.
      ann: a saved approximate index over `vectors` (`cbir_tf.search.ann.AnnIndex`), or None.
      ann_settings: the config's `search.ann` block (None: the defaults).
      auto_stats: `auto.collection_stats` of `vectors` computed before (an index's manifest
        keeps them), so that AUTO settings resolve without recounting; None: counted on first
        use.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        backend: str = "exact",
        block_size: int = 65536,
        validate: bool = True,
        ann: Any = None,
        ann_settings: Any = None,
        auto_stats: Mapping[str, Any] | None = None,
    ):
        from cbir_tf.search.ann import AnnSettings

        self.ann_settings = AnnSettings.from_config(ann_settings)
        self.approximate_graphs = backend != "exact"
        self.index = SearchIndex(
            vectors, backend=backend, block_size=block_size, validate=validate, ann=ann,
            ann_settings=self.ann_settings,
        )  # fmt: skip
        self._augmented: dict[Expansion, Database] = {}
        self._graphs: dict[tuple[int, float], Any] = {}
        self._auto_stats = dict(auto_stats) if auto_stats else None

    def auto_stats(self) -> dict[str, Any]:
        """`auto.collection_stats` of the vectors: given, or counted once on first use."""
        if self._auto_stats is None:
            self._auto_stats = auto.collection_stats(self.vectors, index=self.index)
            _log.info("re-ranking 'auto': %s", self._auto_stats)
        return self._auto_stats

    def resolve(self, settings: RerankSettings) -> RerankSettings:
        """`settings` with its AUTO fields replaced by this collection's `auto.auto_values`."""
        if not settings.auto_fields():
            return settings
        values = auto.auto_values(
            self.auto_stats(), graph_min_rows=self.ann_settings.graph_min_rows
        )
        return settings.resolved(values)

    @property
    def vectors(self) -> np.ndarray:
        return self.index.database

    def index_for(self, method: str, settings: RerankSettings) -> SearchIndex:
        """The index that finds `method`'s candidates: the augmented database's for 'dba'."""
        steps = check_method(method).split("+")
        return self.augmented(settings.dba).index if "dba" in steps else self.index

    def augmented(self, dba: Expansion) -> Database:
        """The database after database-side augmentation with `dba`."""
        if dba not in self._augmented:
            x = query_expansion.database_side_augmentation(
                self.vectors, dba.n, dba.alpha, index=self.index
            )
            idx = self.index
            self._augmented[dba] = Database(
                x, backend=idx.backend, block_size=idx.block_size, validate=False,
                ann_settings=self.ann_settings,
            )  # fmt: skip
        return self._augmented[dba]

    def graph(self, k: int, gamma: float):
        """The diffusion graph A (`graph.knn_affinity`): O(N^2 D) once, then reused."""
        key = (int(k), float(gamma))
        if key not in self._graphs:
            n = self.index.ntotal
            if k >= n:
                _log.warning(
                    "diffusion over %d images with k=%d neighbours: the graph connects "
                    "everything and diffusion cannot help; use a smaller rerank.diffusion.k "
                    "(e.g. %d)", n, k, max(2, n // 3),
                )  # fmt: skip
            idx = self.index
            a = self.ann_settings
            if self.approximate_graphs and n >= a.graph_min_rows:
                _log.info("approximate kNN graph over %d rows (search.ann.graph_min_rows)", n)
                sims, ids = approximate_knn(
                    self.vectors, k, probes=a.graph_probes, seed=a.seed, block_size=idx.block_size
                )
                self._graphs[key] = mutual_knn_affinity(sims, ids, gamma, num_nodes=n)
            else:
                # Below the threshold the exact graph, bit for bit as before.
                self._graphs[key] = knn_affinity(
                    self.vectors, k, gamma, block_size=idx.block_size,
                    backend="faiss" if idx.backend == "faiss" else "exact", validate=False,
                )  # fmt: skip
        return self._graphs[key]


# -- ranking ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Ranking:
    """What `rerank` returns.

    Attributes:
      scores: `[Q, k]` best first (float32 inner products, or float64 diffusion scores).
      ids: int64 `[Q, k]` database rows; ties in row order.
      cg: the diffusion solver's `CGInfo` (None without diffusion).
    """

    scores: np.ndarray
    ids: np.ndarray
    cg: CGInfo | None = None


def rerank(
    method: str,
    queries: np.ndarray,
    database: np.ndarray | Database,
    settings: RerankSettings,
    *,
    k: int | None = None,
) -> Ranking:
    """Ranks the database for each query by one method.

    Args:
      method: one of `METHODS` (or an alias).
      queries: float `[Q, D]` L2-normalised.
      database: float `[N, D]` L2-normalised, or a `Database` reused across calls.
      settings: the steps' settings; AUTO fields take the database's `Database.resolve`.
      k: results per query (clipped to N); None: the full ranking, k = N.

    Returns:
      A `Ranking`: scores and ids `[Q, min(k, N)]`, best first, ties by lower row. Diffusion
      ranks the items it reaches (score > 0) by their scores, then the others, which it cannot
      tell apart (score 0), in their plain order (scored below -1, as truncated diffusion's
      rest).

    Raises:
      ValueError: unknown method, invalid descriptors, dimension mismatch, k < 1.
    """
    steps = check_method(method).split("+")
    db = database if isinstance(database, Database) else Database(database)
    settings = db.resolve(settings)
    queries = search.validate_descriptors(queries, "queries", dim=db.index.dim)
    n = db.index.ntotal
    k = n if k is None else search.check_k(k, n)
    if "dba" in steps:
        db = db.augmented(settings.dba)
    if "aqe" in steps:
        queries = query_expansion.alpha_query_expansion(
            queries, db.vectors, settings.qe.n, settings.qe.alpha, index=db.index
        )
    if "diffusion" not in steps:
        if db.index.backend == "ann" and k == n:
            # A full ranking from an approximate index: the candidates it finds (its scores),
            # then every row it missed, as not retrieved (score -inf, in row order).
            return Ranking(*_fill_missing(*db.index.search(queries, k, validate=False)))
        if k < n or db.index.backend != "exact":
            return Ranking(*db.index.search(queries, k, validate=False))
        ranks, scores = search.rank_all(queries, db.vectors, block_size=db.index.block_size)
        return Ranking(np.take_along_axis(scores, ranks, axis=1), ranks)
    d = settings.diffusion
    graph = None if d.truncate else db.graph(d.k, d.gamma)
    scores, info = diffusion.diffusion_scores(
        queries, db.vectors, **d.kwargs(), return_info=True, affinity=graph,
        block_size=db.index.block_size, backend=db.index.backend, index=db.index, validate=False,
    )  # fmt: skip
    if not d.truncate:
        scores = _unreached_in_plain_order(scores, queries, db, k)
    return Ranking(*_best(scores, k), cg=info)


def _unreached_in_plain_order(
    scores: np.ndarray, queries: np.ndarray, db: Database, k: int
) -> np.ndarray:
    """Full diffusion's `[Q, N]` scores with the items it never reached (score <= 0: outside
    the query's part of the graph, or beyond the iterations) below all others, in plain order:
    a tie at 0 says nothing, and database order would be arbitrary."""
    reached = scores > 0
    need = np.flatnonzero(reached.sum(axis=1) < k)  # queries whose top k reaches the tie
    if need.size == 0:
        return scores
    plain = search.inner_products(queries[need], db.vectors, block_size=db.index.block_size)
    out = scores.copy()
    out[need] = diffusion.rest_in_plain_order(scores[need], reached[need], plain)
    return out


def _best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best `[Q, k]` scores and ids of `[Q, N]` scores: descending, ties by lower id."""
    if k >= scores.shape[1]:
        ids = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, ids, axis=1), ids.astype(np.int64, copy=False)
    ids = search.top_k_indices(scores, k).astype(np.int64)
    return search.sort_by_score(np.take_along_axis(scores, ids, axis=1), ids, k)


def _fill_missing(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rankings `[Q, N]` whose missing entries (id -1, at the end) become the absent rows."""
    n = ids.shape[1]
    ids = ids.copy()
    for row in ids:
        missing = row < 0
        if missing.any():
            present = np.zeros(n, bool)
            present[row[~missing]] = True
            row[missing] = np.flatnonzero(~present)
    return scores, ids
