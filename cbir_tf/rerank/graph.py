"""The diffusion graph: a mutual kNN affinity matrix over the database, and its normalisation.

As the reference code of Iscen et al. (CVPR 2017; knngraph.m, transition_matrix.m): each
database vector's k nearest database vectors by inner product, the vector itself counted among
its k; edge i-j kept only when mutual; weight max(s, 0)^gamma (A[i, j] takes s from i's list);
zero diagonal; S = D^-1/2 A D^-1/2. scipy.sparse throughout, never a dense N x N matrix.

kNN lists come from a blocked float32 search re-scored in float64 (`refine` extra candidates),
which gives the float64 ranking of the reference at float32 cost; small problems compute all
float64 similarities directly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cbir_tf import search

__all__ = ["knn_affinity", "mutual_knn_affinity", "neighbors64", "normalize_affinity",
           "similarity_weights"]  # fmt: skip

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
    index: search.SearchIndex | None = None,
    block_size: int = 65536,
    backend: str = "exact",
    refine: int = REFINE,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with float64 similarities (float32 search + float64 re-scoring).

    Small problems (e.g. the sub-graphs of truncated diffusion) skip the float32 search: one
    float64 product of all pairs is cheaper than gathering candidates to re-score.
    """
    if index is None:
        index = search.SearchIndex(database, backend=backend, block_size=block_size, validate=False)
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
    index = search.SearchIndex(
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
