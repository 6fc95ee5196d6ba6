"""An approximate index for large collections, saved with them, within a memory budget.

Exact search (`cbir_tf.search.exact`) scans every row: 45-128 ms per query at 1M x 512 on two
cores. Past `search.ann.min_rows` rows an index folder also holds a faiss index:

- kind 'flat' (small collections, or asked for): no faiss structure, search is the exact scan;
- kind 'ivfpq': an inverted file whose coarse quantiser is an HNSW graph over the list
  centroids, fast-scan PQ codes scanned in the lists probed, and the candidates (`refine * k`)
  re-scored from 8-bit scalar-quantised codes held beside them (`cbir_tf.search.ann_plan`
  picks the codes that fit `search.ann.bytes_per_vector`, everything a query touches counted).
  Approximate queries never read the float32 store: their scores are the re-scoring codes'
  (within ~2e-3 of the exact inner products with SQ8); exact search (`search.py --exact`,
  backend 'exact') reads the store.

`nprobe` is tuned at build time (`cbir_tf.search.ann_tune`) on held-out rows of the collection
used as queries (their own row excluded): the fewest lists per query whose recall@k reaches
`target_recall`, with queries far from every list centroid probing more lists when that is
cheaper; when no setting reaches the target, the cheapest within `recall_margin` of the best,
and the index says that the target is missed. The recall reached is kept in the metadata
(`ann.json`) beside the index (`ann.faiss`, written atomically, opened memory-mapped, checked
against a SHA-256). Indexes saved by the first version (format 1: PQ codes re-scored from the
float store) still load and search as they did; the next update rebuilds them.

The diffusion graph of large collections is approximate too: `cbir_tf.rerank.graph.
approximate_knn`.

numpy + faiss only (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.config import default
from cbir_tf.fileio import atomic_open, atomic_write_json
from cbir_tf.search import ann_plan, ann_tune
from cbir_tf.search.exact import exact_knn, sort_by_score
from cbir_tf.store.meta import COMPATIBILITY_FIELDS, normalize

log = logging.getLogger(__name__)

INDEX_FILE = "ann.faiss"
META_FILE = "ann.json"
FORMAT = "cbir_tf.ann"  # the on-disk format name (ann.json), not a module
FORMAT_VERSION = 2  # 2: re-scoring codes inside ann.faiss; 1: re-scored from the float store
STORE_RESCORING = "store"  # format 1's re-scoring: exact, from the float32 store
REBUILD = "rebuild it (`python extract.py --images=... --out=...`, Retriever.rebuild_ann())"


class AnnIndexError(ValueError):
    """A saved approximate index cannot be used (damaged, stale, or another collection's)."""


@dataclasses.dataclass(frozen=True)
class AnnSettings:
    """The `search.ann` block of a config (defaults: configs/default.py only)."""

    min_rows: int
    kind: str
    bytes_per_vector: float
    target_recall: float
    recall_margin: float
    recall_k: int
    tune_queries: int
    train_size: int
    refine: int
    stale_share: float
    graph_min_rows: int
    graph_probes: int
    seed: int

    @classmethod
    def from_config(cls, block: Any = None) -> AnnSettings:
        """Settings from a `search.ann` block (mapping, ConfigDict, settings or None)."""
        if isinstance(block, AnnSettings):
            return block
        values = config_lib.defaults("search")["ann"]
        given = config_lib.as_dict(block)
        unknown = sorted(set(given) - set(values))
        if unknown:
            raise ValueError(f"unknown search.ann field(s) {unknown}; valid: {', '.join(values)}")
        values.update(given)
        if values["kind"] not in ann_plan.KINDS:
            raise ValueError(f"search.ann.kind {values['kind']!r} unknown; valid: {ann_plan.KINDS}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        cast = {"int": int, "float": float, "str": str}
        return cls(**{name: cast[t](values[name]) for name, t in fields.items()})

    def plan(self, n: int, d: int, kind: str | None = None) -> dict[str, Any]:
        """`ann_plan.plan` for N x D rows with these settings (`kind` overrides `self.kind`)."""
        return ann_plan.plan(
            n, d, kind=kind or self.kind, min_rows=self.min_rows, budget=self.bytes_per_vector
        )


def require_faiss():
    """Imports faiss, or raises an ImportError saying how to install it."""
    # faiss's OpenMP threads sleep when idle instead of spinning (unless the user chose): on a
    # busy or shared machine, spinning threads made training's many small parallel loops 40
    # times slower (PQ codebooks of 8000 rows: 23 s instead of 0.6 s at load 10 on 2 cores).
    # Read once, when faiss's OpenMP runtime loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss  # noqa: PLC0415 (imported only when asked for: it loads a large library)
    except ImportError as err:
        raise ImportError(
            "faiss is missing (the 'faiss' and 'ann' backends and the approximate index need "
            "it): pip install faiss-cpu (a dependency of cbir-tf; `pip install "
            "'cbir-tf[faiss]'` reinstalls it), or faiss-gpu. backend='exact' needs nothing more."
        ) from err
    return faiss


def _faiss():
    return require_faiss()


class AnnIndex:
    """An approximate index: faiss candidates, re-scored from compact codes (or exact for 'flat').

    Attributes:
      index: the faiss index (None for kind 'flat').
      meta: what `ann.json` holds (kind, factory, nprobe, recall, target_met, memory, ...).
      database: the descriptors `[N, D]` for kind 'flat' and format-1 indexes, which read them;
        None otherwise (approximate queries do not read the store).
    """

    def __init__(self, index: Any, meta: Mapping[str, Any], database: np.ndarray | None = None):
        self.index = index
        self.meta = dict(meta)
        self.database = database

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal if self.index is not None else self.database.shape[0])

    @property
    def dim(self) -> int:
        return int(self.index.d if self.index is not None else self.database.shape[1])

    @property
    def recall(self) -> float | None:
        """recall@`recall_k` measured at build time on held-out rows (1.0 for 'flat')."""
        r = self.meta.get("recall")
        return None if r is None else float(r)

    @property
    def target_met(self) -> bool:
        """Whether the measured recall reaches `target_recall` (False: the index says so)."""
        if self.kind == "flat":
            return True
        return bool(self.meta.get("target_met", (self.recall or 0.0) >= self.meta["target_recall"]))

    @property
    def outdated(self) -> bool:
        """Saved by an earlier format that the next update rebuilds (reads the float store)."""
        return self.meta.get("rescoring") == STORE_RESCORING

    def describe(self) -> str:
        """One line for logs and search.py: kind, memory, nprobe and the measured recall."""
        m = self.meta
        if self.kind == "flat":
            why = f" ({m['fallback']})" if m.get("fallback") else ""
            return f"approximate index: flat (exact scan) over {self.ntotal} rows{why}"
        k, target = m["recall_k"], m["target_recall"]
        far = ""
        if m.get("far_below") is not None:
            far = (
                f" (queries far from every list centroid: nprobe {m['nprobe_far']}, "
                f"{m['refine_far']} candidates per result)"
            )
        if self.outdated:
            memory = (
                "candidates re-scored from the float store (an index of format 1, which the "
                "next extract.py update rebuilds within search.ann.bytes_per_vector)"
            )
        else:
            mem = m["memory"]
            memory = (
                f"{mem['total']:.0f} bytes a vector (index {mem['index']:.0f} + re-scoring "
                f"codes {mem['rescoring']:.0f}; budget {mem['budget']:g})"
            )
        line = (
            f"approximate index: {m['factory']}, {memory}, nprobe {m['nprobe']}, "
            f"{m.get('refine', 1)} candidates per result{far}, "
            f"{self.ntotal} rows; recall@{k} {m['recall']:.3f} measured on "
            f"{m['tune_queries']} held-out rows"
        )
        if m.get("recall_far") is not None:
            line += f" ({m['recall_far']:.3f} on the tenth farthest from every list centroid)"
        if self.target_met:
            return f"{line}; target {target:g} met"
        return (
            f"{line}; TARGET {target:g} MISSED (the best reachable is "
            f"{m.get('best_recall', m['recall']):.3f}): raise search.ann.bytes_per_vector, or "
            "search exactly (search.py --exact)"
        )

    def summary(self) -> dict[str, Any]:
        """What the index is and how good it measured, JSON-ready (what the service reports).

        Returns:
          {'kind', 'rows'} and, for 'ivfpq': 'factory', 'nprobe', 'refine' (candidates re-scored
          per result), 'recall' (recall@'recall_k' measured at build time on 'tune_queries'
          held-out rows), 'target_recall', 'target_met', 'memory' (bytes a vector: 'index',
          'rescoring', 'total', 'budget'; None for an index of format 1, which re-scores from
          the float store), 'trained_rows', 'added_rows' (rows added since, not measured).
        """
        out: dict[str, Any] = {"kind": self.kind, "rows": self.ntotal}
        if self.kind == "flat":
            return {**out, "recall": 1.0}
        m = self.meta
        return {
            **out,
            "factory": m.get("factory"),
            "nprobe": int(m["nprobe"]),
            "refine": int(m.get("refine", 1)),
            "recall": self.recall,
            "recall_k": m.get("recall_k"),
            "tune_queries": m.get("tune_queries"),
            "target_recall": m.get("target_recall"),
            "target_met": self.target_met,
            "memory": None if self.outdated else m.get("memory"),
            "trained_rows": m.get("trained_rows"),
            "added_rows": int(m.get("added_rows", 0)),
        }

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows among the approximate candidates, re-scored from the re-scoring codes.

        Args:
          queries: float `[Q, D]` (validated by the caller).
          k: results per query, 1 <= k <= N.

        Returns:
          scores float32 `[Q, k]` (descending; ties by lower id; exact inner products for
          'flat' and format 1, else the re-scoring codes') and ids int64 `[Q, k]`; missing
          results (fewer candidates than k) are id -1, score -inf.
        """
        if self.index is None:
            return exact_knn(queries, self.database, k, default("search.block_size"))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        m = self.meta
        near = (int(m["nprobe"]), int(m.get("refine", 1)))
        if m.get("far_below") is None or not len(q):
            return self.search_with(q, k, *near)
        far = (int(m["nprobe_far"]), int(m["refine_far"]))
        is_far = self.nearest_centroid(q) < float(m["far_below"])
        scores = np.empty((len(q), k), np.float32)
        ids = np.empty((len(q), k), np.int64)
        for rows, setting in ((~is_far, near), (is_far, far)):
            if rows.any():
                scores[rows], ids[rows] = self.search_with(q[rows], k, *setting)
        return scores, ids

    def search_with(self, queries: np.ndarray, k: int, nprobe: int, refine: int):
        """`search` with every query probing `nprobe` lists and re-scoring `refine * k`
        candidates (float32 contiguous queries)."""
        faiss = _faiss()
        refine = max(1, int(refine))
        hnsw = faiss.SearchParametersHNSW(efSearch=max(16, 2 * int(nprobe)))
        ivf = faiss.SearchParametersIVF(nprobe=int(nprobe), quantizer_params=hnsw)
        if self.outdated:  # format 1: PQ candidates re-scored exactly from the float store
            _, cand = self.index.search(queries, min(self.ntotal, k * refine), params=ivf)
            scores, ids = rescore(queries, self.database, cand)
            return scores[:, :k], ids[:, :k]
        params = ivf
        if self.meta.get("rescoring"):
            # At most every row as candidates (an evaluation asks for full rankings).
            factor = max(1.0, min(float(refine), self.ntotal / k))
            params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=ivf)
        scores, ids = self.index.search(queries, k, params=params)
        del hnsw, ivf  # the parameter objects lived until the search returned
        big = np.iinfo(np.int64).max
        ids = ids.astype(np.int64)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        scores, ids = sort_by_score(scores, np.where(ids < 0, big, ids), k)
        return scores, np.where(ids == big, -1, ids)

    def nearest_centroid(self, queries: np.ndarray) -> np.ndarray:
        """float32 `[Q]`: each query's inner product with its nearest list centroid."""
        faiss = _faiss()
        quantizer = faiss.extract_index_ivf(self.index).quantizer
        hnsw = faiss.SearchParametersHNSW(efSearch=16)
        sims, _ = quantizer.search(np.ascontiguousarray(queries, np.float32), 1, params=hnsw)
        return sims[:, 0]


def rescore(
    queries: np.ndarray, database: np.ndarray, ids: np.ndarray, chunk_rows: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 inner products of candidate rows, sorted (format 1's refine step).

    Args:
      queries: float32 `[Q, D]`.
      database: float `[N, D]` (memory-mapped rows are gathered in sorted order).
      ids: int `[Q, m]` candidates, -1 for none.
      chunk_rows: queries per gather.

    Returns:
      scores float32 `[Q, m]` descending (missing: -inf, last) and ids int64 `[Q, m]`.
    """
    ids = np.asarray(ids, np.int64)
    n_q, m = ids.shape
    out = np.empty((n_q, m), np.float32)
    for r0 in range(0, n_q, chunk_rows):
        idc = ids[r0 : r0 + chunk_rows]
        # Distinct rows read once, in row order (memory maps read faster so), then spread.
        uniq, inverse = np.unique(np.clip(idc, 0, None), return_inverse=True)
        rows = np.asarray(database[uniq], dtype=np.float32)[inverse.reshape(idc.shape)]
        qc = queries[r0 : r0 + chunk_rows]
        s = np.matmul(rows, qc[:, :, None])[:, :, 0]
        out[r0 : r0 + chunk_rows] = np.where(idc < 0, -np.inf, s)
    big = np.iinfo(np.int64).max
    s_sorted, i_sorted = sort_by_score(out, np.where(ids < 0, big, ids), m)
    return s_sorted, np.where(i_sorted == big, -1, i_sorted)


# -- building ----------------------------------------------------------------------------------


def build(
    database: np.ndarray,
    settings: AnnSettings,
    *,
    block_size: int = default("search.block_size"),
    kind: str | None = None,
) -> AnnIndex:
    """Builds, fills and tunes an approximate index over validated descriptors.

    Args:
      database: float `[N, D]` L2-normalised (a memory map is read in blocks, never whole).
      settings: the `search.ann` settings.
      block_size: rows added at once.
      kind: overrides `settings.kind` ('flat', 'ivfpq').

    Returns:
      The tuned `AnnIndex` (not saved: see `save`).

    Raises:
      ValueError: kind 'ivfpq' and no index fits `bytes_per_vector` (one line: what would fit).
    """
    t0 = time.perf_counter()
    n, d = database.shape
    p = settings.plan(n, d, kind)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": p["kind"],
            "factory": p["factory"], "nlist": p["nlist"], "m": p["m"],
            "rescoring": p["rescoring"], "dim": d, "rows": n, "trained_rows": n,
            "added_rows": 0, "refine": settings.refine, "recall_k": settings.recall_k,
            "target_recall": settings.target_recall}  # fmt: skip
    if p["kind"] == "flat":
        if "fallback" in p:
            log.warning("search.ann: %s", p["fallback"])
            meta["fallback"] = p["fallback"]
        meta.update({"recall": 1.0, "nprobe": 0, "tune_queries": 0, "target_met": True})
        return AnnIndex(None, meta, database)
    rng = np.random.default_rng(settings.seed)
    train_rows = min(n, max(settings.train_size, 32 * p["nlist"]))
    sample = np.sort(rng.choice(n, size=train_rows, replace=False))
    index = _trained(database, sample, p["factory"])
    t_train = time.perf_counter() - t0
    for start in range(0, n, block_size):
        index.add(np.ascontiguousarray(database[start : start + block_size], dtype=np.float32))
    t_add = time.perf_counter() - t0 - t_train
    ann = AnnIndex(index, meta)
    ann.meta["memory"] = memory(index, settings.bytes_per_vector)
    held_out = np.setdiff1d(np.arange(n), sample)
    if held_out.size < settings.tune_queries:
        held_out = np.arange(n)
    queries = np.sort(rng.choice(held_out, size=min(settings.tune_queries, held_out.size),
                                 replace=False))  # fmt: skip
    t_tune = time.perf_counter()
    tune(ann, queries, database, settings)
    ann.meta.update(
        {
            "train_rows": int(train_rows),
            "train_seconds": round(t_train, 1),
            "add_seconds": round(t_add, 1),
            "tune_seconds": round(time.perf_counter() - t_tune, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
    )
    log.info("%s (built in %.0f s)", ann.describe(), time.perf_counter() - t0)
    if not ann.target_met:
        log.warning("%s", ann.describe())
    return ann


def _trained(database: np.ndarray, sample: np.ndarray, factory: str):
    """A faiss index of `factory` (inner product) trained on the rows `sample`."""
    faiss = _faiss()
    index = faiss.index_factory(database.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    # 10 k-means iterations (coarse lists and PQ codebooks): recall is on its plateau (the
    # re-scoring step follows); 32 training rows per list are enough for 10 iterations.
    ivf.cp.niter = 10
    ivf.cp.min_points_per_centroid = 32
    ivf_pq = faiss.downcast_index(ivf)
    ivf_pq.pq.cp.niter = 10
    index.train(np.ascontiguousarray(database[sample], dtype=np.float32))
    return index


def memory(index: Any, budget: float) -> dict[str, float]:
    """Bytes per row an index keeps, by part: the inverted file ('index': codes, ids, centroids,
    codebooks) and the re-scoring codes ('rescoring'), measured on the faiss structures."""
    faiss = _faiss()
    n = max(1, int(index.ntotal))
    refine = faiss.downcast_index(getattr(index, "refine_index", None)) if hasattr(
        index, "refine_index") else None  # fmt: skip
    base = index.base_index if refine is not None else index
    index_bytes = faiss.serialize_index(base).size
    rescoring = 0 if refine is None else n * int(refine.code_size) + 8 * int(index.d)
    return {
        "index": round(index_bytes / n, 1),
        "rescoring": round(rescoring / n, 1),
        "total": round((index_bytes + rescoring) / n, 1),
        "budget": float(budget),
    }


FAR_REFINE_FACTORS = (4, 16)  # queries put apart may re-score this many times more candidates


def tune(
    ann: AnnIndex, query_rows: np.ndarray, database: np.ndarray, settings: AnnSettings
) -> float:
    """Sets the cheapest search settings that reach the target recall, and records them.

    nprobe from 1, doubling, up to nlist / 4 (more lists cost about an exact scan) or until a
    doubling gains less than a fifth of `recall_margin`, is measured on the held-out rows with
    `refine` candidates per result, and on the rows farthest from every centroid also with
    `FAR_REFINE_FACTORS` times more; `ann_tune.choose` picks (see it).
    Records the settings, the recall reached, the recall of the rows farthest from every
    centroid, and whether the target is met.

    Args:
      ann: an 'ivfpq' index.
      query_rows: int `[Q]` rows of `database` used as queries (held out of training).
      database: the indexed descriptors `[N, D]` (exact neighbours).
      settings: target_recall, recall_margin, recall_k, refine.

    Returns:
      The recall measured at the chosen settings.
    """
    k = min(settings.recall_k, ann.ntotal - 1)
    queries = np.asarray(database[query_rows], dtype=np.float32)
    t0 = time.perf_counter()
    _, exact = exact_knn(queries, database, k + 1, default("search.block_size"))
    ann.meta["exact_seconds"] = round(time.perf_counter() - t0, 1)  # the tuning's ground truth
    top = max(1, int(ann.meta["nlist"]) // 4)
    nprobes = [1 << i for i in range(top.bit_length())]
    sweep = {"k": k, "nprobes": nprobes, "stop_gain": settings.recall_margin / 5}
    near, near_recall, near_cost = _sweep(ann, queries, exact, query_rows, settings.refine, **sweep)
    nearest = ann.nearest_centroid(queries)
    n_far = int(np.ceil(max(ann_tune.FAR_SHARES) * len(queries)))
    far = np.argsort(nearest, kind="stable")[:n_far]  # the farthest from every centroid
    extra, extra_recall, extra_cost = [], [near_recall[far]], [near_cost]
    for factor in FAR_REFINE_FACTORS if ann.meta.get("rescoring") else ():
        got = _sweep(ann, queries[far], exact[far], query_rows[far], settings.refine * factor,
                     **sweep)  # fmt: skip
        extra += got[0]
        extra_recall.append(got[1])
        extra_cost.append(got[2])
    choice = ann_tune.choose(
        near_recall, near_cost, np.hstack(extra_recall), np.concatenate(extra_cost), nearest,
        target=settings.target_recall, margin=settings.recall_margin,
    )  # fmt: skip
    (nprobe, refine), far_setting = near[choice["near"]], (near + extra)[choice["far"] or 0]
    if choice["far"] is None:
        far_setting = (nprobe, refine)
    ann.meta.update({
        "nprobe": nprobe, "refine": refine, "nprobe_far": far_setting[0],
        "refine_far": far_setting[1],
        **{key: choice[key] for key in ("far_below", "far_share", "recall", "recall_far",
                                        "best_recall", "target_met")},
        "cpu_ms_per_query": round(1000 * choice["cost"], 3), "tune_queries": len(query_rows),
    })  # fmt: skip
    return float(choice["recall"])


def _sweep(ann, queries, exact, rows, refine, *, k, nprobes, stop_gain):
    """Recall `[Q, S]` and CPU seconds per query `[S]` of the settings (nprobe, refine) for
    nprobe in `nprobes`, stopping once a doubling gains less than `stop_gain` mean recall.

    Returns:
      (the settings measured, recall, cost).
    """
    done, recall, cost = [], [], []
    for nprobe in nprobes:
        t0 = time.process_time()  # all threads; others' load inflates it far less than wall time
        _, ids = ann.search_with(queries, k + 1, nprobe, refine)
        cost.append((time.process_time() - t0) / max(1, len(queries)))
        recall.append(ann_tune.per_query_recall(ids, exact, rows, k))
        done.append((nprobe, refine))
        log.debug("nprobe %d, refine %d: recall@%d %.4f", nprobe, refine, k, recall[-1].mean())
        if len(recall) >= 3 and recall[-1].mean() - recall[-2].mean() < stop_gain:
            break
    return done, np.stack(recall, axis=1), np.asarray(cost)


# -- the index folder ---------------------------------------------------------------------------


def exists(directory: str) -> bool:
    """Whether an index folder holds an approximate index (its metadata, maybe damaged)."""
    return os.path.isfile(os.path.join(directory, META_FILE))


def save(ann: AnnIndex, directory: str, store_meta: Mapping[str, Any]) -> None:
    """Writes `ann.faiss` then `ann.json` (each atomically; the JSON holds the file's SHA-256).

    A crash between the two leaves a file whose checksum does not match: `load` refuses it.

    Args:
      ann: the index.
      directory: the index folder.
      store_meta: the store's meta.json (its model fields are recorded, to refuse another
        model's index).
    """
    meta = dict(ann.meta)
    meta["rows"] = ann.ntotal
    meta["descriptors"] = _model_fields(store_meta, ann.dim)
    path = os.path.join(directory, INDEX_FILE)
    if ann.index is not None:
        faiss = _faiss()
        digest, size = hashlib.sha256(), 0
        with atomic_open(path, "wb") as f:

            def write(chunk: bytes) -> None:
                nonlocal size
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)

            # Streamed: the index (codes of every row) is never copied whole in memory.
            faiss.write_index(ann.index, faiss.PyCallbackIOWriter(write))
        meta.update({"sha256": digest.hexdigest(), "bytes": size})
    elif os.path.exists(path):
        os.unlink(path)
    atomic_write_json(os.path.join(directory, META_FILE), meta)
    ann.meta = meta


def _model_fields(store_meta: Mapping[str, Any], dim: int) -> dict[str, Any]:
    fields = {k: store_meta.get(k) for k in COMPATIBILITY_FIELDS if k in store_meta}
    fields["dim"] = int(dim)
    return normalize(fields)


# Fields every ann.json has, and those of a faiss-backed kind, with their types.
_FIELDS = {"kind": str, "rows": int, "descriptors": dict}
_IVF_FIELDS = {"factory": str, "nprobe": int, "sha256": str, "bytes": int, "recall": float,
               "recall_k": int, "target_recall": float, "trained_rows": int}  # fmt: skip


def read_meta(directory: str) -> dict[str, Any]:
    """`ann.json` of an index folder, checked.

    Raises:
      AnnIndexError: missing, unreadable, truncated or not the metadata of an approximate index
        (one line naming the file and saying how to rebuild it).
    """
    path = os.path.join(directory, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: invalid JSON, bad UTF-8
        raise AnnIndexError(f"{path} cannot be read ({err}); {REBUILD}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AnnIndexError(f"{path} is not the metadata of an approximate index; {REBUILD}")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise AnnIndexError(
            f"{path}: version {meta.get('version')!r} is not one this cbir_tf reads "
            f"(<= {FORMAT_VERSION}); {REBUILD}"
        )
    fields = dict(_FIELDS, **(_IVF_FIELDS if meta.get("kind") == "ivfpq" else {}))
    for name, kind in fields.items():
        value = meta.get(name)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise AnnIndexError(f"{path} is damaged ({name!r} is {value!r}); {REBUILD}")
    if meta["kind"] not in ("flat", "ivfpq"):
        raise AnnIndexError(f"{path} is damaged (kind {meta['kind']!r}); {REBUILD}")
    if meta["version"] == 1 and meta["kind"] == "ivfpq":
        meta["rescoring"] = STORE_RESCORING
    return meta


def load(
    directory: str, database: np.ndarray, store_meta: Mapping[str, Any], *, mmap: bool = True
) -> AnnIndex:
    """Opens an index folder's approximate index (memory-mapped), checking it first.

    Args:
      directory: the index folder.
      database: its descriptors `[N, D]` (compared with the index; read only by kind 'flat'
        and by format-1 indexes).
      store_meta: the store's meta.json.
      mmap: map the index file instead of reading it (read-only; `mmap=False` to add rows).

    Raises:
      AnnIndexError: a missing, truncated or corrupted file (checksum mismatch), another model
        or dimension, or rows that differ from the store's (stale); one line saying how to
        rebuild.
    """
    meta = read_meta(directory)
    where = os.path.join(directory, INDEX_FILE)
    mine = _model_fields(store_meta, database.shape[1])
    if meta.get("descriptors") != mine:
        raise AnnIndexError(
            f"{where} was built for other descriptors ({meta.get('descriptors')}) than this "
            f"index folder holds ({mine}): another model or dimension; {REBUILD}"
        )
    if int(meta["rows"]) != database.shape[0]:
        raise AnnIndexError(
            f"{where} covers {meta['rows']} rows but the store holds {database.shape[0]} (it was "
            f"changed without the approximate index); {REBUILD}"
        )
    if meta["kind"] == "flat":
        return AnnIndex(None, meta, database)
    faiss = _faiss()
    data = _checked_bytes(where, meta, keep=not mmap)
    try:
        if mmap:
            index = faiss.read_index(where, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        else:
            index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    except RuntimeError as err:  # a file whose checksum matched but faiss cannot read
        raise AnnIndexError(f"{where} cannot be read by faiss ({err}); {REBUILD}") from None
    if int(index.ntotal) != int(meta["rows"]):
        raise AnnIndexError(f"{where} holds {index.ntotal} rows, {META_FILE} says {meta['rows']}")
    outdated = meta.get("rescoring") == STORE_RESCORING
    return AnnIndex(index, meta, database if outdated else None)


def _checked_bytes(path: str, meta: Mapping[str, Any], *, keep: bool) -> bytes | None:
    """Checks a file's size and SHA-256 against `meta` (read in chunks); its bytes if `keep`."""
    digest, size, parts = hashlib.sha256(), 0, []
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                size += len(chunk)
                if keep:
                    parts.append(chunk)
    except OSError as err:
        raise AnnIndexError(f"{path} cannot be read ({err.strerror}); {REBUILD}") from None
    if size != int(meta["bytes"]) or digest.hexdigest() != meta["sha256"]:
        raise AnnIndexError(
            f"{path} is truncated or corrupted (checksum mismatch with {META_FILE}); {REBUILD}"
        )
    return b"".join(parts) if keep else None


def add_rows(
    directory: str,
    database: np.ndarray,
    store_meta: Mapping[str, Any],
    settings: AnnSettings,
    *,
    previous_rows: int,
    block_size: int = default("search.block_size"),
) -> AnnIndex:
    """Adds the store's rows past the index's to the saved index, without retraining.

    Proposes (logs) a rebuild once the rows added since training exceed `stale_share` of the
    rows it was trained with: the quantiser and codebooks no longer describe the collection.

    Args:
      directory: the index folder, whose store already holds the new rows (appended).
      database: the store's descriptors `[N, D]`.
      store_meta: the store's meta.json.
      settings: `search.ann` settings.
      previous_rows: the store's rows before the new ones (which the index must cover).

    Returns:
      The updated (saved) index.

    Raises:
      AnnIndexError: the saved index is unusable, did not cover the previous rows, is of
        format 1, or is of another kind than the settings now plan (the caller rebuilds it).
    """
    old, (n, d) = int(previous_rows), database.shape
    ann = load(directory, database[:old], store_meta, mmap=False)
    if ann.outdated:
        raise AnnIndexError(
            f"{os.path.join(directory, INDEX_FILE)} was saved by an earlier version (format 1: "
            "candidates re-scored from the float store, which it reads); it is rebuilt within "
            f"search.ann.bytes_per_vector={settings.bytes_per_vector:g}"
        )
    planned = settings.plan(n, d)["kind"]
    if planned != ann.kind:
        raise AnnIndexError(f"{n} rows call for kind {planned!r}, the saved index is {ann.kind!r}")
    if ann.index is None:
        ann.database = database
    else:
        for start in range(old, n, block_size):
            block = database[start : min(start + block_size, n)]
            ann.index.add(np.ascontiguousarray(block, dtype=np.float32))
        ann.meta["memory"] = memory(ann.index, settings.bytes_per_vector)
    added = int(ann.meta.get("added_rows", 0)) + n - old
    ann.meta["added_rows"] = added
    save(ann, directory, store_meta)
    share = added / max(1, int(ann.meta["trained_rows"]))
    if ann.index is not None and share > settings.stale_share:
        log.warning(
            "%s: %d rows (%.0f%%) were added since its quantiser was trained on %d; recall may "
            "have dropped below the measured %.3f: rebuild it (Retriever.rebuild_ann(), or "
            "delete %s and run extract.py --images again)",
            directory, added, 100 * share, ann.meta["trained_rows"], ann.recall,
            os.path.join(directory, META_FILE),
        )  # fmt: skip
    return ann


def build_and_save(
    directory: str | None,
    database: np.ndarray,
    store_meta: Mapping[str, Any] | None,
    settings: AnnSettings,
    *,
    kind: str | None = None,
    block_size: int = default("search.block_size"),
) -> AnnIndex:
    """`build`s the index of `database` and saves it in the index folder `directory` (if any)."""
    ann = build(database, settings, block_size=block_size, kind=kind)
    if directory:
        save(ann, directory, store_meta or {})
    return ann


def follow_rows(
    directory: str,
    database: np.ndarray,
    store_meta: Mapping[str, Any],
    settings: AnnSettings,
    *,
    previous_rows: int | None,
    backend: str,
    block_size: int = default("search.block_size"),
) -> AnnIndex | None:
    """Keeps an index folder's approximate index in step with its rows, which just changed.

    Rows only appended: they are added to the saved index (no retraining; a rebuild is proposed
    once they make the quantiser stale). Rows removed or replaced: rebuilt. No index yet: built
    once the collection reaches `settings.min_rows` (not with backend 'exact').

    Args:
      directory: the index folder, its store already rewritten.
      database: the store's descriptors `[N, D]`.
      store_meta: the store's meta.json.
      settings: `search.ann` settings.
      previous_rows: the rows before the change when it only appended rows, else None.
      backend: the searches' backend ('exact' builds no new index).
      block_size: rows added at once.

    Returns:
      The folder's approximate index, or None when it has none.
    """
    have = exists(directory)
    n = database.shape[0]
    if not have and (n < settings.min_rows or backend == "exact"):
        return None
    if n == 0:
        remove(directory)
        return None
    try:
        settings.plan(*database.shape)
    except ValueError as err:
        # The rows are committed: an approximate index that cannot be built must not fail the
        # update (nor every later one); `check_plan` refuses such settings before any write.
        log.warning("search.ann: %s; exact search ('flat') is used instead", err)
        settings = dataclasses.replace(settings, kind="flat")
    if have and previous_rows is not None:
        try:
            return add_rows(
                directory, database, store_meta, settings,
                previous_rows=previous_rows, block_size=block_size,
            )  # fmt: skip
        except AnnIndexError as err:
            log.warning("rebuilding the approximate index: %s", err)
    elif have:
        log.info("rows were removed or replaced: rebuilding the approximate index")
    return build_and_save(directory, database, store_meta, settings, block_size=block_size)


def check_plan(n: int, d: int, settings: AnnSettings, *, backend: str, have: bool) -> None:
    """Refuses, before anything is written, settings under which no approximate index of the
    N x D rows an update will leave can be built (kind 'ivfpq' that does not fit).

    Args:
      n, d: the rows and dimension the update will leave.
      settings: `search.ann` settings.
      backend: the searches' backend ('exact' builds no new index).
      have: whether the folder holds an approximate index already (kept in step).

    Raises:
      ValueError: one line saying what would fit.
    """
    if n and d and (have or (n >= settings.min_rows and backend != "exact")):
        settings.plan(n, d)


def copy_files(source: str, dest: str) -> None:
    """Copies an index folder's approximate index to another folder holding the same rows.

    Raises:
      AnnIndexError: the source's metadata is damaged (nothing is copied).
    """
    meta = read_meta(source)
    path = os.path.join(source, INDEX_FILE)
    if os.path.exists(path):
        with open(path, "rb") as src, atomic_open(os.path.join(dest, INDEX_FILE), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
    atomic_write_json(os.path.join(dest, META_FILE), meta)


def remove(directory: str) -> None:
    """Deletes an index folder's approximate index (both files)."""
    for name in (META_FILE, INDEX_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
