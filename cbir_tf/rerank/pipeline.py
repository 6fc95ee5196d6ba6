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
from cbir_tf.rerank import diffusion, query_expansion
from cbir_tf.rerank.cg import CGInfo
from cbir_tf.rerank.graph import approximate_knn, knn_affinity, mutual_knn_affinity
from cbir_tf.search import exact as search
from cbir_tf.search.index import SearchIndex

__all__ = ["METHODS", "NONE", "Database", "Ranking", "RerankSettings", "check_method", "rerank"]

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


@dataclasses.dataclass(frozen=True)
class Expansion:
    """α-weighted expansion: neighbours `n`, similarity exponent `alpha` (α-QE and DBA)."""

    n: int
    alpha: float


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """Diffusion settings (see `diffusion.diffusion_scores`); truncate 0 = the full graph."""

    k: int
    kq: int
    gamma: float
    alpha: float
    max_iter: int
    tol: float
    truncate: int

    def kwargs(self) -> dict[str, Any]:
        """`diffusion.diffusion_scores` keyword arguments."""
        out = dataclasses.asdict(self)
        out["truncate"] = self.truncate or None
        return out


@dataclasses.dataclass(frozen=True)
class RerankSettings:
    """Settings of every re-ranking step: a config's `rerank` block, typed."""

    qe: Expansion
    dba: Expansion
    diffusion: Diffusion

    @classmethod
    def from_config(cls, block: Any = None) -> RerankSettings:
        """Settings from a `rerank` block (ConfigDict, nested mapping, settings or None).

        Fields the block lacks (a partial override, an index written before a step existed)
        take the values of `configs/default.py`; `methods` (the evaluation's list) is ignored.

        Raises:
          ValueError: an unknown block or field (named).
        """
        if isinstance(block, RerankSettings):
            return block
        given = config.as_dict(block)
        values = {name: dict(fields) for name, fields in _defaults().items()}
        for name, fields in given.items():
            if name == "methods":
                continue
            if name not in values or not isinstance(fields, Mapping):
                raise ValueError(f"unknown rerank setting {name!r}; valid: {', '.join(values)}")
            unknown = sorted(set(fields) - set(values[name]))
            if unknown:
                raise ValueError(
                    f"unknown rerank.{name} field(s) {unknown}; valid: {', '.join(values[name])}"
                )
            values[name].update(fields)
        d = values["diffusion"]
        return cls(
            qe=Expansion(int(values["qe"]["n"]), float(values["qe"]["alpha"])),
            dba=Expansion(int(values["dba"]["n"]), float(values["dba"]["alpha"])),
            diffusion=Diffusion(
                k=int(d["k"]),
                kq=int(d["kq"]),
                gamma=float(d["gamma"]),
                alpha=float(d["alpha"]),
                max_iter=int(d["max_iter"]),
                tol=float(d["tol"]),
                truncate=int(d["truncate"] or 0),
            ),  # fmt: skip
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{'qe': {...}, 'dba': {...}, 'diffusion': {...}} (what index manifests save)."""
        return dataclasses.asdict(self)


@functools.cache
def _defaults() -> dict[str, dict[str, Any]]:
    """The `rerank` block of configs/default.py without `methods` (read once; callers copy)."""
    values = config.defaults("rerank")
    del values["methods"]
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
      settings: the steps' settings.
      k: results per query (clipped to N); None: the full ranking, k = N.

    Returns:
      A `Ranking`: scores and ids `[Q, min(k, N)]`, best first, ties by lower row.

    Raises:
      ValueError: unknown method, invalid descriptors, dimension mismatch, k < 1.
    """
    steps = check_method(method).split("+")
    db = database if isinstance(database, Database) else Database(database)
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
            # A full ranking from an approximate index: the candidates it finds (exact scores),
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
    return Ranking(*_best(scores, k), cg=info)


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
