"""Query expansion and database-side augmentation (numpy).

- alpha-weighted query expansion (alphaQE; Radenovic, Tolias, Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2018, section 5.2): the query is replaced by the
  weighted average of itself and its top n database vectors, each weighted by its similarity to
  the query raised to the power alpha. The query itself IS included, with weight
  sim(q, q)^alpha = 1 for an L2-normalised query; n counts database vectors only (n = 2,
  alpha = 3 by default, as in the paper). This is the common reading of the paper and of public
  implementations that prepend the query to its neighbours before weighting (the authors'
  cnnimageretrieval-pytorch ships no alphaQE code to compare with). alpha = 0 gives average
  query expansion (AQE; Chum et al., ICCV 2007): the mean of the query and its top n.
- Database-side augmentation (DBA; Arandjelovic & Zisserman, CVPR 2012, as alphaQE applied to
  every database vector): each database vector is replaced by the weighted average of itself
  (weight 1) and its n nearest other database vectors.

Similarities are clipped at 0 before the power (max(s, 0)^alpha): a negative similarity would
otherwise subtract a vector (odd alpha) or be undefined (non-integer alpha). Outputs are
L2-normalised float32, ready to search with.
"""

from __future__ import annotations

import numpy as np

from cbir_tf.search import exact as search
from cbir_tf.search.index import SearchIndex

__all__ = ["alpha_query_expansion", "database_side_augmentation"]


def _l2(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # The sum is zero only if neighbours cancel the vector exactly: leave 0 rather than NaN.
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    sims = np.asarray(sims, np.float64)
    pos = sims > 0
    return np.where(pos, np.where(pos, sims, 1.0) ** alpha, 0.0)


def _expand(
    vectors: np.ndarray,
    database: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    self_weight: float,
    rows_per_chunk: int = 4096,
) -> np.ndarray:
    """self_weight * v + sum_j w_j database[ids_j], L2-normalised, chunk by chunk."""
    n, d = vectors.shape
    out = np.empty((n, d), np.float32)
    for r0 in range(0, n, rows_per_chunk):
        idc = ids[r0 : r0 + rows_per_chunk]
        wc = weights[r0 : r0 + rows_per_chunk]
        acc = self_weight * np.asarray(vectors[r0 : r0 + rows_per_chunk], np.float64)
        flat = idc.ravel()
        order = np.argsort(flat, kind="stable")
        gathered = np.empty((flat.size, d), np.float64)
        gathered[order] = database[flat[order]]  # sorted gather: fast on memory maps
        acc += np.einsum("rm,rmd->rd", wc, gathered.reshape(idc.shape[0], idc.shape[1], d))
        out[r0 : r0 + rows_per_chunk] = _l2(acc)
    return out


def alpha_query_expansion(
    queries: np.ndarray,
    database: np.ndarray,
    n: int = 2,
    alpha: float = 3.0,
    *,
    block_size: int = 65536,
    backend: str = "exact",
    index: SearchIndex | None = None,
) -> np.ndarray:
    """alphaQE: q' = normalise(q + sum_{j in top n} max(s_j, 0)^alpha x_j).

    Args:
      queries: float `[Q, D]` L2-normalised (the query's own weight is 1 = sim(q, q)^alpha).
      database: float `[N, D]` L2-normalised, N >= 1.
      n: database neighbours added (clipped to N; 0 returns the normalised queries).
      alpha: similarity exponent (0: average QE).
      block_size: database rows per search block.
      backend: 'exact' or 'faiss' search.
      index: a prepared `SearchIndex` over `database` (reused across calls; then
        block_size and backend are its own).

    Returns:
      float32 `[Q, D]` L2-normalised expanded queries.

    Raises:
      ValueError: invalid descriptors (rows named), dimension mismatch, empty database, n < 0.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if index is None:
        index = SearchIndex(database, backend=backend, block_size=block_size)
    queries = search.validate_descriptors(queries, "queries", dim=index.dim)
    if n == 0 or queries.shape[0] == 0:
        return _l2(np.asarray(queries, np.float64))
    sims, ids = index.search(queries, n, validate=False)
    return _expand(queries, index.database, ids, _weights(sims, alpha), 1.0)


def database_side_augmentation(
    database: np.ndarray,
    n: int = 2,
    alpha: float = 3.0,
    *,
    block_size: int = 65536,
    backend: str = "exact",
    index: SearchIndex | None = None,
) -> np.ndarray:
    """DBA: x_i' = normalise(x_i + sum_{j in top n, j != i} max(s_ij, 0)^alpha x_j).

    The item itself is excluded from its n neighbours (it enters once, with weight 1); an exact
    duplicate of it is a neighbour like any other. Search the augmented database with queries
    expanded (or not) the same way.

    Args:
      database: float `[N, D]` L2-normalised, N >= 1.
      n: neighbours added to each item (clipped to N - 1).
      alpha: similarity exponent (0: plain average).
      block_size: database rows per search block (the kNN search is O(N^2 D), blocked).
      backend: 'exact' or 'faiss' (approximate factories help for large N).
      index: a prepared `SearchIndex` over `database` (then block_size and backend are
        its own).

    Returns:
      float32 `[N, D]` L2-normalised.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if index is None:
        index = SearchIndex(database, backend=backend, block_size=block_size)
    database = index.database
    n = min(n, index.ntotal - 1)
    if n == 0:
        return _l2(np.asarray(database, np.float64))
    sims, ids = index.search(database, n + 1, validate=False)
    # Drop each item from its own list; when ties pushed it out of the top n + 1 (duplicates),
    # drop the last neighbour instead, so that every row keeps exactly n neighbours.
    is_self = ids == np.arange(ids.shape[0])[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), n)
    keep = np.ones(ids.shape, bool)
    keep[np.arange(ids.shape[0]), drop] = False
    ids = ids[keep].reshape(-1, n)
    sims = sims[keep].reshape(-1, n)
    return _expand(database, database, ids, _weights(sims, alpha), 1.0)
