"""An approximate index for large collections, saved with them; an approximate diffusion graph.

Exact search (`cbir_tf.search.exact`) scans every row: 45-128 ms per query at 1M x 512 on two cores.
Past `search.ann.min_rows` rows an index folder also holds a faiss index:

- kind 'flat' (small collections, or asked for): no faiss structure, search is the exact scan;
- kind 'ivfpq': an inverted file whose coarse quantiser is an HNSW graph over the list
  centroids, and PQ codes of `m` bytes, m + 8 (the id) <= `bytes_per_vector` (faiss's
  guidelines and autofaiss's choice for 1M-10M vectors under a memory budget). Lists:
  a power of two near 4 sqrt(N); trained on a seeded sample; filled by streaming the
  memory-mapped descriptors in blocks.

Every approximate search re-scores its `refine * k` candidates exactly against the stored
descriptors, so the scores returned are exact float32 inner products and only the candidate set
is approximate. `nprobe` is tuned at build time: the smallest value whose recall@k, measured on
held-out rows of the collection used as queries (their own row excluded), reaches
`target_recall`. The recall reached is kept in the metadata (`ann.json`) beside the index
(`ann.faiss`, written atomically, opened memory-mapped, checked against a SHA-256).

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
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.config import default
from cbir_tf.fileio import atomic_open, atomic_write_json
from cbir_tf.search.exact import exact_knn, sort_by_score
from cbir_tf.store.meta import COMPATIBILITY_FIELDS, normalize

log = logging.getLogger(__name__)

INDEX_FILE = "ann.faiss"
META_FILE = "ann.json"
FORMAT = "cbir_tf.ann"  # the on-disk format name (ann.json), not a module
FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivfpq")
_PQ_BYTES = (8, 16, 32, 48, 64, 96, 128)
_ID_BYTES = 8  # faiss inverted lists store one int64 id per vector


class AnnIndexError(ValueError):
    """A saved approximate index cannot be used (corrupt, stale, or another collection's)."""


@dataclasses.dataclass(frozen=True)
class AnnSettings:
    """The `search.ann` block of a config (defaults: configs/default.py only)."""

    min_rows: int
    kind: str
    bytes_per_vector: int
    target_recall: float
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
        if values["kind"] not in KINDS:
            raise ValueError(f"search.ann.kind {values['kind']!r} unknown; valid: {KINDS}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        cast = {"int": int, "float": float, "str": str}
        return cls(**{name: cast[t](values[name]) for name, t in fields.items()})


def plan(n: int, d: int, settings: AnnSettings) -> dict[str, Any]:
    """The index kind for N rows of dimension D: {'kind', 'factory', 'nlist', 'm'}."""
    kind = settings.kind
    if kind == "auto":
        kind = "flat" if n < settings.min_rows else "ivfpq"
    if kind == "flat":
        return {"kind": "flat", "factory": "", "nlist": 0, "m": 0}
    # ~4 sqrt(N) lists (faiss wiki), a power of two, each with >= 39 training points.
    nlist = 1 << max(4, int(round(np.log2(4 * np.sqrt(n)))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    # Per row: the PQ code, its id, and a share of the centroids and their HNSW links; the
    # largest code (D divisible by it) that fits the budget, with nlist or nlist / 2 lists.
    options = [
        (m, lists)
        for m in sorted(_PQ_BYTES, reverse=True)
        for lists in (nlist, max(16, nlist // 2))
        if m <= d
        and d % m == 0
        and m + _ID_BYTES + lists * (4 * d + 320) / n <= settings.bytes_per_vector
    ]
    if not options:
        raise ValueError(
            f"search.ann.bytes_per_vector={settings.bytes_per_vector} leaves no room for PQ "
            f"codes at {n} x {d} (at least {_PQ_BYTES[0] + _ID_BYTES} bytes per vector and the "
            "coarse centroids' share are needed)"
        )
    m, nlist = options[0]
    # No OPQ rotation: its training (64 sub-quantisers re-clustered for every iteration) took
    # minutes even at 20k rows on two cores, and the exact refine step recovers what it would
    # add to the codes' precision.
    factory = f"IVF{nlist}_HNSW32,PQ{m}"
    return {"kind": "ivfpq", "factory": factory, "nlist": nlist, "m": m}


def require_faiss():
    """Imports faiss, or raises an ImportError saying how to install it."""
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
    """An approximate index over a descriptor matrix, with exact re-scoring of its candidates.

    Attributes:
      database: the descriptors `[N, D]` (memory-mapped store rows; never copied).
      index: the faiss index (None for kind 'flat').
      meta: what `ann.json` holds (kind, factory, nprobe, recall, counts, ...).
    """

    def __init__(self, database: np.ndarray, index: Any, meta: Mapping[str, Any]):
        self.database = database
        self.index = index
        self.meta = dict(meta)
        if index is not None:
            self.set_nprobe(int(self.meta.get("nprobe", 1)))

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def ntotal(self) -> int:
        return int(self.database.shape[0])

    @property
    def recall(self) -> float | None:
        """recall@`recall_k` measured at build time (1.0 for 'flat')."""
        r = self.meta.get("recall")
        return None if r is None else float(r)

    def describe(self) -> str:
        """One line for logs and search.py: kind, size and measured recall."""
        if self.kind == "flat":
            return f"approximate index: flat (exact scan) over {self.ntotal} rows"
        return (
            f"approximate index: {self.meta['factory']}, nprobe {self.meta['nprobe']}, "
            f"{self.ntotal} rows; recall@{self.meta['recall_k']} {self.meta['recall']:.3f} "
            f"measured on {self.meta['tune_queries']} held-out rows "
            f"(target {self.meta['target_recall']:.2f})"
        )

    def summary(self) -> dict[str, Any]:
        """What the index is and how good it measured, JSON-ready (what the service reports).

        Returns:
          {'kind', 'rows'} and, for 'ivfpq': 'factory', 'nprobe', 'recall' (recall@'recall_k'
          measured at build time on 'tune_queries' held-out rows), 'target_recall',
          'target_met', 'trained_rows', 'added_rows' (rows added since, not measured).
        """
        out: dict[str, Any] = {"kind": self.kind, "rows": self.ntotal}
        if self.kind == "flat":
            return {**out, "recall": 1.0}
        m = self.meta
        recall, target = self.recall, m.get("target_recall")
        return {
            **out,
            "factory": m.get("factory"),
            "nprobe": int(m["nprobe"]),
            "recall": recall,
            "recall_k": m.get("recall_k"),
            "tune_queries": m.get("tune_queries"),
            "target_recall": target,
            "target_met": None if recall is None or target is None else recall >= target,
            "trained_rows": m.get("trained_rows"),
            "added_rows": int(m.get("added_rows", 0)),
        }

    def set_nprobe(self, nprobe: int) -> None:
        """Inverted lists visited per query (the HNSW quantiser searches at least as wide)."""
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = int(nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):
            quantizer.hnsw.efSearch = max(16, 2 * int(nprobe))
        self.meta["nprobe"] = int(nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by exact inner product among the approximate candidates.

        Args:
          queries: float `[Q, D]` (validated by the caller).
          k: results per query, 1 <= k <= N.

        Returns:
          scores float32 `[Q, k]` (exact inner products, descending; ties by lower id) and ids
          int64 `[Q, k]`; missing results (fewer candidates than k) are id -1, score -inf.
        """
        if self.index is None:
            return exact_knn(queries, self.database, k, default("search.block_size"))
        n_cand = min(self.ntotal, max(k * int(self.meta.get("refine", 4)), k))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        _, cand = self.index.search(q, n_cand)
        scores, ids = rescore(q, self.database, cand)
        return scores[:, :k], ids[:, :k]


def rescore(
    queries: np.ndarray, database: np.ndarray, ids: np.ndarray, chunk_rows: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 inner products of candidate rows, sorted (the refine step).

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
    """
    t0 = time.perf_counter()
    n, d = database.shape
    if kind is not None:
        settings = dataclasses.replace(settings, kind=kind)
    p = plan(n, d, settings)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **p, "dim": d, "rows": n,
            "trained_rows": n, "added_rows": 0, "refine": settings.refine,
            "recall_k": settings.recall_k, "target_recall": settings.target_recall}  # fmt: skip
    if p["kind"] == "flat":
        meta.update({"recall": 1.0, "nprobe": 0, "tune_queries": 0})
        return AnnIndex(database, None, meta)
    faiss = _faiss()
    rng = np.random.default_rng(settings.seed)
    train_rows = min(n, max(settings.train_size, 32 * p["nlist"]))
    sample = np.sort(rng.choice(n, size=train_rows, replace=False))
    index = faiss.index_factory(d, p["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    # 10 k-means iterations (coarse lists and PQ codebooks): recall is on its plateau (the exact
    # refine step follows), and faiss's PQ training costs ~13 ms per sub-quantiser iteration.
    ivf.cp.niter = 10
    ivfpq = faiss.downcast_index(ivf)
    ivfpq.pq.cp.niter = 10
    # The factory's default polysemous training (code reordering for Hamming filtering, unused
    # here) multiplies the training time by six.
    ivfpq.do_polysemous_training = False
    index.train(np.ascontiguousarray(database[sample], dtype=np.float32))
    t_train = time.perf_counter() - t0
    for start in range(0, n, block_size):
        index.add(np.ascontiguousarray(database[start : start + block_size], dtype=np.float32))
    ann = AnnIndex(database, index, meta)
    held_out = np.setdiff1d(np.arange(n), sample)
    if held_out.size < settings.tune_queries:
        held_out = np.arange(n)
    queries = np.sort(rng.choice(held_out, size=min(settings.tune_queries, held_out.size),
                                 replace=False))  # fmt: skip
    tune(ann, queries, settings)
    ann.meta.update(
        {
            "train_rows": int(train_rows),
            "train_seconds": round(t_train, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
    )
    log.info("%s (built in %.0f s)", ann.describe(), time.perf_counter() - t0)
    return ann


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, self_ids: np.ndarray, k: int):
    """Mean share of each query's exact top-k found in its approximate top-k (self excluded).

    Args:
      approx_ids, exact_ids: int `[Q, >= k+1]` best first.
      self_ids: int `[Q]` the query's own row, dropped from both lists.
      k: list length compared.
    """
    hits = 0
    for a, e, s in zip(approx_ids, exact_ids, self_ids, strict=True):
        hits += len(set(a[a != s][:k].tolist()) & set(e[e != s][:k].tolist()))
    return hits / (k * max(1, len(self_ids)))


def tune(ann: AnnIndex, query_rows: np.ndarray, settings: AnnSettings) -> float:
    """Sets the smallest nprobe whose recall@k reaches the target; records the recall reached.

    Args:
      ann: an 'ivfpq' index over its database.
      query_rows: int `[Q]` rows of the database used as queries (held out of training).
      settings: target_recall and recall_k.

    Returns:
      The recall measured at the chosen nprobe.
    """
    k = min(settings.recall_k, ann.ntotal - 1)
    queries = np.asarray(ann.database[query_rows], dtype=np.float32)
    _, exact = exact_knn(queries, ann.database, k + 1, default("search.block_size"))
    nlist = int(ann.meta["nlist"])
    best = (0.0, 1)
    nprobe = 1
    while True:
        ann.set_nprobe(nprobe)
        _, ids = ann.search(queries, k + 1)
        r = recall_at_k(ids, exact, query_rows, k)
        log.debug("nprobe %d: recall@%d %.4f", nprobe, k, r)
        best = max(best, (r, -nprobe))
        if r >= settings.target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    if r < settings.target_recall:
        r, nprobe = best[0], -best[1]
        log.warning(
            "the approximate index reaches recall@%d %.3f at most (target %.2f): raise "
            "search.ann.bytes_per_vector or search.ann.refine", k, r, settings.target_recall,
        )  # fmt: skip
    ann.set_nprobe(nprobe)
    ann.meta.update({"recall": round(float(r), 4), "tune_queries": len(query_rows)})
    return float(r)


# -- the index folder ---------------------------------------------------------------------------


def exists(directory: str) -> bool:
    """Whether an index folder holds an approximate index (its metadata)."""
    return os.path.isfile(os.path.join(directory, META_FILE))


def _sha256(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


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
    meta["descriptors"] = _model_fields(store_meta, ann.database.shape[1])
    path = os.path.join(directory, INDEX_FILE)
    if ann.index is not None:
        data = _faiss().serialize_index(ann.index)
        with atomic_open(path, "wb") as f:
            f.write(memoryview(data))
        meta.update({"sha256": _sha256(data), "bytes": int(data.size)})
    elif os.path.exists(path):
        os.unlink(path)
    atomic_write_json(os.path.join(directory, META_FILE), meta)
    ann.meta = meta


def _model_fields(store_meta: Mapping[str, Any], dim: int) -> dict[str, Any]:
    fields = {k: store_meta.get(k) for k in COMPATIBILITY_FIELDS if k in store_meta}
    fields["dim"] = int(dim)
    return normalize(fields)


def read_meta(directory: str) -> dict[str, Any]:
    """`ann.json` of an index folder."""
    with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise AnnIndexError(f"{directory}/{META_FILE}: not a {FORMAT} version <= {FORMAT_VERSION}")
    return meta


def load(
    directory: str, database: np.ndarray, store_meta: Mapping[str, Any], *, mmap: bool = True
) -> AnnIndex:
    """Opens an index folder's approximate index (memory-mapped), checking it first.

    Args:
      directory: the index folder.
      database: its descriptors `[N, D]` (the refine step reads them).
      store_meta: the store's meta.json.
      mmap: map the inverted lists instead of reading them (read-only; `mmap=False` to add).

    Raises:
      AnnIndexError: checksum mismatch (truncated or corrupted file), another model or
        dimension, or rows that differ from the store's (stale); the message says how to
        rebuild.
    """
    meta = read_meta(directory)
    where = os.path.join(directory, INDEX_FILE)
    rebuild = "rebuild it (`python extract.py --images=... --out=...`, Retriever.rebuild_ann())"
    mine = _model_fields(store_meta, database.shape[1])
    if meta.get("descriptors") != mine:
        raise AnnIndexError(
            f"{where} was built for other descriptors ({meta.get('descriptors')}) than this "
            f"index folder holds ({mine}): another model or dimension; {rebuild}"
        )
    if int(meta["rows"]) != database.shape[0]:
        raise AnnIndexError(
            f"{where} covers {meta['rows']} rows but the store holds {database.shape[0]} (it was "
            f"changed without the approximate index); {rebuild}"
        )
    if meta["kind"] == "flat":
        return AnnIndex(database, None, meta)
    faiss = _faiss()
    with open(where, "rb") as f:
        data = f.read()
    if len(data) != int(meta["bytes"]) or _sha256(data) != meta["sha256"]:
        raise AnnIndexError(
            f"{where} is truncated or corrupted (checksum mismatch with {META_FILE}); {rebuild}"
        )
    if mmap:
        index = faiss.read_index(where, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    else:
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    del data
    return AnnIndex(database, index, meta)


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
      AnnIndexError: the saved index is unusable or did not cover the previous rows.
    """
    old = int(previous_rows)
    ann = load(directory, database[:old], store_meta, mmap=False)
    ann.database = database
    if ann.index is not None:
        for start in range(old, database.shape[0], block_size):
            block = database[start : min(start + block_size, database.shape[0])]
            ann.index.add(np.ascontiguousarray(block, dtype=np.float32))
    added = int(ann.meta.get("added_rows", 0)) + database.shape[0] - old
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


def copy_files(source: str, dest: str) -> None:
    """Copies an index folder's approximate index to another folder holding the same rows."""
    path = os.path.join(source, INDEX_FILE)
    if os.path.exists(path):
        with open(path, "rb") as src, atomic_open(os.path.join(dest, INDEX_FILE), "wb") as out:
            out.write(src.read())
    atomic_write_json(os.path.join(dest, META_FILE), read_meta(source))


def remove(directory: str) -> None:
    """Deletes an index folder's approximate index (both files)."""
    for name in (META_FILE, INDEX_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.unlink(path)
