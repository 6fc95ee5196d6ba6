"""The diffusion graph: a mutual kNN affinity matrix over the database, and its normalisation.

As the reference code of Iscen et al. (CVPR 2017; knngraph.m, transition_matrix.m): each
database vector's k nearest database vectors by inner product, the vector itself counted among
its k; edge i-j kept only when mutual; weight max(s, 0)^gamma (A[i, j] takes s from i's list);
zero diagonal; S = D^-1/2 A D^-1/2. scipy.sparse throughout, never a dense N x N matrix.

kNN lists come from a blocked float32 search re-scored in float64 (`refine` extra candidates),
which gives the float64 ranking of the reference at float32 cost; small problems compute all
float64 similarities directly. Large collections (`search.ann.graph_min_rows`) use
`approximate_knn` instead: rows assigned to k-means lists, each list compared exactly (one BLAS
product) with the rows that probe it, each row keeping the best k of the lists it probes.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import scipy.sparse as sp

from cbir_tf.search import exact as search
from cbir_tf.search.ann import require_faiss
from cbir_tf.search.index import SearchIndex

__all__ = ["approximate_knn", "knn_affinity", "mutual_knn_affinity", "neighbors64",
           "normalize_affinity", "similarity_weights"]  # fmt: skip

# Extra float32 candidates re-scored in float64 so that rounding cannot change which k
# neighbours are kept (float32 errors are ~1e-7; a margin of 8 items is far beyond that).
REFINE = 8
# Query x database pairs up to which float64 similarities are computed directly (32 MiB).
_DIRECT_FLOAT64 = 1 << 22


def similarity_weights(sims: np.ndarray, gamma: float) -> np.ndarray:
    """max(s, 0)^gamma without NaN for negative s and non-integer gamma."""
    sims = np.asarray(sims, np.float64)
    pos = sims > 0
    return np.where(pos, np.where(pos, sims, 1.0) ** gamma, 0.0)


def mutual_knn_affinity(
    sims: np.ndarray, ids: np.ndarray, gamma: float = 3.0, *, num_nodes: int | None = None
) -> sp.csr_matrix:
    """Mutual kNN affinity matrix A from kNN lists (exact or approximate).

    Edge i-j is kept only when j is in i's list and i is in j's list; A[i, j] = max(s, 0)^gamma
    with s from i's list (as the reference knngraph.m); the diagonal is zero; zero weights are
    not stored.

    Args:
      sims: float `[N, k]` similarities of each node's neighbours.
      ids: int `[N, k]` neighbour ids (-1: missing, ignored); duplicate ids in a row count once.
      gamma: similarity exponent.
      num_nodes: matrix size (default N).

    Returns:
      float64 CSR `[num_nodes, num_nodes]`.
    """
    ids = np.asarray(ids, np.int64)
    n, k = ids.shape
    num_nodes = n if num_nodes is None else int(num_nodes)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = ids.ravel()
    weights = similarity_weights(np.asarray(sims).ravel(), gamma)
    valid = (cols >= 0) & (rows != cols)
    rows, cols, weights = rows[valid], cols[valid], weights[valid]
    keys = rows * num_nodes + cols
    uniq, first = np.unique(keys, return_index=True)
    rows, cols, weights, keys = rows[first], cols[first], weights[first], uniq
    reverse = cols * num_nodes + rows
    pos = np.minimum(np.searchsorted(keys, reverse), max(keys.size - 1, 0))
    mutual = keys[pos] == reverse if keys.size else np.zeros(0, bool)
    keep = mutual & (weights > 0)
    return sp.csr_matrix(
        (weights[keep], (rows[keep], cols[keep])), shape=(num_nodes, num_nodes), dtype=np.float64
    )


def neighbors64(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    index: SearchIndex | None = None,
    block_size: int = 65536,
    backend: str = "exact",
    refine: int = REFINE,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with float64 similarities (float32 search + float64 re-scoring).

    Small problems (e.g. the sub-graphs of truncated diffusion) skip the float32 search: one
    float64 product of all pairs is cheaper than gathering candidates to re-score.
    """
    if index is None:
        index = SearchIndex(database, backend=backend, block_size=block_size, validate=False)
    k = min(k, index.ntotal)
    if index.backend == "exact" and queries.shape[0] * index.ntotal <= _DIRECT_FLOAT64:
        sims = search.inner_products(queries, index.database, dtype=np.float64)
        cols = search.top_k_indices(sims, k).astype(np.int64)
        return search.sort_by_score(np.take_along_axis(sims, cols, axis=1), cols, k)
    _, ids = index.search(queries, min(k + refine, index.ntotal), validate=False)
    sims, ids = search.refine_knn(queries, index.database, ids)
    return sims[:, :k], ids[:, :k]


def knn_affinity(
    database: np.ndarray,
    k: int = 50,
    gamma: float = 3.0,
    *,
    block_size: int = 65536,
    backend: str = "exact",
    faiss_factory: str = "Flat",
    refine: int = REFINE,
    validate: bool = True,
) -> sp.csr_matrix:
    """The diffusion graph A of a database: mutual kNN, weights max(s, 0)^gamma, zero diagonal.

    Args:
      database: float `[N, D]` L2-normalised descriptors, N >= 1.
      k: neighbours per node, the node itself included (clipped to N).
      gamma: similarity exponent.
      block_size: database rows per search block.
      backend: 'exact' (O(N^2 D), blocked) or 'faiss' (with `faiss_factory`, e.g. 'HNSW32' for an
        approximate graph on large collections).
      faiss_factory: faiss index-factory string.
      refine: extra float32 candidates re-scored in float64 (0: keep float32 similarities).
      validate: check the database first.

    Returns:
      float64 CSR `[N, N]`.
    """
    if validate:
        database = search.validate_descriptors(database, "database", block_size=block_size)
    if database.shape[0] == 0:
        raise ValueError("database is empty: no graph to build")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = SearchIndex(
        database,
        backend=backend,
        block_size=block_size,
        faiss_factory=faiss_factory,
        validate=False,
    )
    sims, ids = neighbors64(database, database, k, index=index, refine=refine)
    return mutual_knn_affinity(sims, ids, gamma, num_nodes=database.shape[0])


def normalize_affinity(affinity: sp.spmatrix, *, return_degrees: bool = False):
    """S = D^-1/2 A D^-1/2 with D the row sums of A.

    Isolated nodes (degree 0: no mutual neighbour) get D^-1/2 = 0 instead of a division by zero;
    their rows and columns of S are zero, so diffusion leaves their y value unchanged.

    Args:
      affinity: sparse (or dense) `[N, N]` non-negative A.
      return_degrees: also return the row sums.

    Returns:
      float64 CSR S `[N, N]` (and float64 degrees `[N]`).
    """
    a = sp.csr_matrix(affinity, dtype=np.float64, copy=True)
    a.sum_duplicates()
    deg = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    inv_sqrt = np.zeros_like(deg)
    pos = deg > 0
    inv_sqrt[pos] = deg[pos] ** -0.5
    row_of = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    a.data *= inv_sqrt[row_of] * inv_sqrt[a.indices]
    return (a, deg) if return_degrees else a


# -- large collections: an approximate kNN graph ------------------------------------------


def _probe_lists(database, centroids, probes, block_size):
    """int32 `[N, probes]` nearest centroids of each row, nearest first."""
    n = database.shape[0]
    top = np.empty((n, probes), np.int32)
    for start in range(0, n, block_size):
        block = np.ascontiguousarray(database[start : start + block_size], dtype=np.float32)
        sims = block @ centroids.T
        cols = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(sims, cols, axis=1), axis=1, kind="stable")
        top[start : start + block.shape[0]] = np.take_along_axis(cols, order, axis=1)
    return top


def _release_pages(array: np.ndarray) -> None:
    """Drops a memory-mapped array's resident pages from the process (they stay cached)."""
    base = array
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            base._mmap.madvise(mmap.MADV_DONTNEED)


def approximate_knn(
    database: np.ndarray,
    k: int,
    *,
    probes: int = 8,
    rows_per_list: int = 1000,
    seed: int = 0,
    block_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest rows (itself included), searched in its `probes` nearest lists.

    Rows are assigned to their nearest k-means centroid (lists of about `rows_per_list` rows).
    Then, list by list, every row probing the list is compared with the list's rows in one
    exact float32 product (faiss's blocked BLAS and heaps), and each row's running top k is
    merged with what the list gave: the work per row is `probes` lists, not N rows. Memory:
    the descriptors once more in RAM, in list order, plus the `[N, k]` results.

    Args:
      database: float `[N, D]` L2-normalised (a memory map is read once, in blocks).
      k: neighbours per row (clipped to N).
      probes: lists searched per row (more: closer to the exact graph, slower).
      rows_per_list: average list size.
      seed: k-means sampling seed.
      block_size: rows per block when reading the database.

    Returns:
      sims float64 `[N, k]` (float32 products) descending and ids int64 `[N, k]` (missing:
      -1, -inf).
    """
    faiss = require_faiss()
    n, d = database.shape
    k = min(int(k), n)
    nlist = max(1, min(n // 39, int(round(n / rows_per_list))))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    km = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(database[sample], dtype=np.float32))
    top = _probe_lists(database, km.centroids, min(probes, nlist), block_size)
    order = np.argsort(top[:, 0], kind="stable")  # row ids in list order
    starts = np.concatenate([[0], np.cumsum(np.bincount(top[:, 0], minlength=nlist))])
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    xp = np.empty((n, d), np.float32)  # the rows in list order: each list is one slice
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        xp[position[start:stop]] = database[start:stop]
    _release_pages(database)  # read once: its mapped pages need not stay in this process
    # For each list, the rows probing it.
    by_list = np.argsort(top.ravel(), kind="stable")
    probing = (by_list // top.shape[1]).astype(np.int64)
    pstarts = np.concatenate([[0], np.cumsum(np.bincount(top.ravel(), minlength=nlist))])
    del top, by_list
    best_s = np.full((n, k), -np.inf, np.float32)
    best_i = np.full((n, k), -1, np.int64)
    for lst in range(nlist):
        lo, hi = int(starts[lst]), int(starts[lst + 1])
        rows = probing[pstarts[lst] : pstarts[lst + 1]]
        if hi == lo or not rows.size:
            continue
        sims, found = faiss.knn(
            xp[position[rows]], xp[lo:hi], min(k, hi - lo), metric=faiss.METRIC_INNER_PRODUCT
        )
        ids = np.where(found < 0, -1, order[lo + np.clip(found, 0, None)])
        sims = np.where(found < 0, -np.inf, sims)
        all_s = np.concatenate([best_s[rows], sims], axis=1)
        all_i = np.concatenate([best_i[rows], ids], axis=1)
        keep = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s[rows] = np.take_along_axis(all_s, keep, axis=1)
        best_i[rows] = np.take_along_axis(all_i, keep, axis=1)
    del xp
    big = np.iinfo(np.int64).max
    out_s, out_i = np.empty((n, k)), np.empty((n, k), np.int64)
    for start in range(0, n, block_size):  # sorted by score, then id, in blocks of rows
        sl = slice(start, start + block_size)
        s_sorted, i_sorted = search.sort_by_score(
            best_s[sl].astype(np.float64), np.where(best_i[sl] < 0, big, best_i[sl]), k
        )
        out_s[sl], out_i[sl] = s_sorted, np.where(i_sorted == big, -1, i_sorted)
    return out_s, out_i
