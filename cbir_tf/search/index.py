"""The database of a search, prepared once: exact blocked search, the approximate index, faiss.

`SearchIndex` validates a database once and answers many searches with the backend asked for:
'exact' (`cbir_tf.search.exact`, the reference), 'ann' (a saved or in-memory approximate index,
`cbir_tf.search.ann`: candidates re-scored from compact codes), 'auto' (the approximate index
when one is given, else exact) or 'faiss' (an in-memory faiss index built by
`build_faiss_index`; 'Flat' is exact up to float rounding, 'HNSW32', 'IVF1024,Flat', ... are
approximate).

Results follow `cbir_tf.search.exact`'s rules: scores descending, ties by lower id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.search import ann as ann_lib
from cbir_tf.search.ann import require_faiss
from cbir_tf.search.exact import check_k, exact_knn, sort_by_score, validate_descriptors

BACKENDS = ("exact", "auto", "ann", "faiss")


def build_faiss_index(
    database: np.ndarray,
    factory: str = "Flat",
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    train_size: int = 100_000,
    block_size: int = default("search.block_size"),
    seed: int = 0,
):
    """Builds a faiss inner-product index over validated descriptors.

    Args:
      database: float `[N, D]` descriptors (copied into the index as float32, block by block).
      factory: faiss index-factory string: 'Flat' (exact, IndexFlatIP), 'HNSW32' (graph,
        approximate), 'IVF1024,Flat' (inverted file, approximate; trained on a sample), ...
      nprobe: IVF lists visited per query (IVF indexes only, else ignored; faiss default 1).
      ef_search: HNSW search breadth (HNSW indexes only, else ignored).
      train_size: rows sampled (without replacement, seeded) to train indexes that need it.
      block_size: rows added at once.
      seed: sampling seed for training.

    Returns:
      A `faiss.Index` with metric inner product.

    Raises:
      ImportError: faiss is not installed (names the `[faiss]` extra).
    """
    faiss = require_faiss()
    n, d = database.shape
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        index.train(np.ascontiguousarray(database[rows], dtype=np.float32))
    for start in range(0, n, block_size):
        index.add(np.ascontiguousarray(database[start : start + block_size], dtype=np.float32))
    # Search parameters apply to one family of indexes each; elsewhere they are ignored.
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:
            pass  # not an IVF index
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)
    return index


class SearchIndex:
    """A database ready to be searched many times (validated once; faiss index built once).

    Attributes:
      database: the descriptors `[N, D]` (not copied for the exact backend).
      backend: 'exact' or 'faiss'.
      faiss_index: the faiss index (None for 'exact').
    """

    def __init__(
        self,
        database: np.ndarray,
        *,
        backend: str = "exact",
        block_size: int = default("search.block_size"),
        faiss_factory: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        validate: bool = True,
        ann: Any = None,
        ann_settings: Any = None,
    ):
        """Prepares a database for search.

        Args:
          database: float `[N, D]` descriptors, N >= 1 (a `np.memmap` works: it is read in blocks).
          backend: 'exact' (blocked numpy, the reference), 'ann' (`cbir_tf.search.ann`: candidates
            re-scored from compact codes), 'auto' ('ann' when `ann` is given, else 'exact') or
            'faiss'.
          block_size: database rows per block (exact backend) or per `add` (faiss).
          faiss_factory, nprobe, ef_search: see `build_faiss_index`.
          validate: check the database with `validate_descriptors` (one pass over it).
          ann: a `cbir_tf.search.ann.AnnIndex` over `database` (a saved approximate index) for the
            'ann' and 'auto' backends; one holding its own re-scoring codes never reads
            `database` (which is then not validated either).
          ann_settings: the `search.ann` settings of an index built for backend='ann' when
            `ann` is None.

        Raises:
          ValueError: empty or invalid database, unknown backend.
          ImportError: backend='faiss' without faiss installed.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        # A saved approximate index with its own re-scoring codes never reads the store (it
        # was checked when written): checking it here would read 4 D bytes a row.
        reads_store = not (backend in ("auto", "ann") and ann is not None and ann.database is None)
        if validate and reads_store:
            database = validate_descriptors(database, "database", block_size=block_size)
        elif reads_store and not isinstance(database, np.ndarray):
            database = np.asarray(database)
        if database.ndim != 2 or database.shape[0] == 0:
            raise ValueError(
                f"database is empty (shape {database.shape}): nothing to search; "
                "index at least one image first"
            )
        self.database = database
        self.block_size = int(block_size)
        self.faiss_index = None
        self.faiss_factory = faiss_factory
        # 'auto' is exact unless a saved approximate index is given; 'ann' builds one in memory.
        self.ann = ann
        if backend == "auto":
            backend = "ann" if ann is not None else "exact"
        self.backend = backend
        if backend == "ann" and ann is None:
            self.ann = ann_lib.build(
                database, ann_lib.AnnSettings.from_config(ann_settings), block_size=block_size
            )
        if backend == "faiss":
            self.faiss_index = build_faiss_index(
                database, faiss_factory, nprobe=nprobe, ef_search=ef_search, block_size=block_size
            )

    @property
    def ntotal(self) -> int:
        return int(self.database.shape[0])

    def summary(self) -> dict[str, Any]:
        """What answers this index's searches, JSON-ready (what the search service reports).

        Returns:
          {'approximate': bool, 'kind': 'exact' | 'faiss' | an approximate index's kind, ...}:
          for the 'ann' backend, `AnnIndex.summary()` (kind 'flat' is an exact scan; 'ivfpq'
          adds nprobe and the recall measured at build time); for 'faiss', the factory string
          ('Flat' is exact up to float rounding).
        """
        if self.backend == "ann":
            return {"approximate": self.ann.kind != "flat", **self.ann.summary()}
        if self.backend == "faiss":
            factory = self.faiss_factory
            return {"approximate": factory != "Flat", "kind": "faiss", "factory": factory}
        return {"approximate": False, "kind": "exact"}

    @property
    def dim(self) -> int:
        return int(self.database.shape[1])

    def search(
        self, queries: np.ndarray, k: int, *, validate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database items by inner product for each query.

        Args:
          queries: float `[Q, D]`.
          k: neighbours per query; k > N is clipped to N (so the result is `[Q, min(k, N)]`).
          validate: check the queries first.

        Returns:
          scores float32 `[Q, k]` (descending) and ids int64 `[Q, k]`; ties ordered by lower id.
          Approximate faiss indexes may find fewer than k items: missing entries are id -1 with
          score -inf, at the end of the row.
        """
        if validate:
            queries = validate_descriptors(queries, "queries", dim=self.dim)
        k = check_k(k, self.ntotal)
        if queries.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        if self.backend == "exact":
            return exact_knn(queries, self.database, k, self.block_size)
        if self.backend == "ann":
            return self.ann.search(queries, k)
        scores, ids = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        # faiss orders ties arbitrarily and marks missing results with id -1: re-sort so both
        # backends follow the same rule, with missing entries (-inf) last.
        big = np.iinfo(np.int64).max
        ids = ids.astype(np.int64)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        scores, ids = sort_by_score(scores, np.where(ids < 0, big, ids), k)
        return scores, np.where(ids == big, -1, ids)
