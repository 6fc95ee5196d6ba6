"""Diffusion re-ranking on a sparse mutual kNN graph (Iscen et al., CVPR 2017), numpy/scipy.

Paper: A. Iscen, G. Tolias, Y. Avrithis, T. Furon, O. Chum, "Efficient Diffusion on Region
Manifolds: Recovering Small Objects with Compact CNN Representations", CVPR 2017. This module
follows the authors' Matlab code (ahmetius/diffusion-retrieval: knngraph.m, transition_matrix.m,
ymake.m, dfs.m, trunclap.m) and reproduces its numbers (tests/test_diffusion.py checks the
golden values computed with it):

- graph A (`graph.knn_affinity`): mutual kNN over the database, weights max(s, 0)^gamma;
- S = D^-1/2 A D^-1/2 (`graph.normalize_affinity`);
- y (`query_vectors`): the query's kq most similar database vectors get max(s, 0)^gamma, all
  others 0;
- f solves (I - alpha S) f = y (`cg.conjugate_gradient`) from a zero start, stopping when the
  relative residual ||y - M f|| / ||y|| <= tol or after max_iter iterations; like Matlab's
  `pcg`, an unconverged solve returns the iterate with the smallest residual norm;
- database items are ranked by f.

Differences from the reference, for speed or scale, none changing the numbers: all queries are
solved at once (one CG recurrence per column of `[N, Q]`, each sparse product serving every
query); truncated diffusion builds each query's graph inside its top-n database items, so
beyond the initial search its cost depends on n, not on N (the reference restricts a
precomputed global graph instead: pass `affinity=` to do that).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from cbir_tf.config import default
from cbir_tf.rerank.cg import CGInfo, conjugate_gradient
from cbir_tf.rerank.graph import (
    REFINE,
    knn_affinity,
    mutual_knn_affinity,
    neighbors64,
    normalize_affinity,
    similarity_weights,
)
from cbir_tf.rerank.product import BlockedSparseProduct
from cbir_tf.search import exact as search
from cbir_tf.search.index import SearchIndex

__all__ = [
    "CGInfo",
    "DiffusionOperator",
    "diffusion_operator",
    "diffusion_scores",
    "knn_affinity",
    "normalize_affinity",
    "query_vectors",
    "rest_in_plain_order",
    "truncated_diffusion",
]

_log = logging.getLogger(__name__)


def _check_alpha(alpha: float) -> None:
    # alpha < 1 keeps I - alpha S positive definite (S's eigenvalues lie in [-1, 1]).
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


class DiffusionOperator:
    """p -> (I - alpha S) p for `conjugate_gradient` (S from `normalize_affinity`).

    Writes into the solver's buffer and returns p'Mp with the product (`writes_out`), so the
    solver's loop allocates nothing and reads p and M p once less.
    """

    writes_out = True

    def __init__(self, transition: sp.spmatrix, alpha: float):
        _check_alpha(alpha)
        self.alpha = float(alpha)
        self.product = BlockedSparseProduct(transition)

    def __call__(
        self,
        p: np.ndarray,
        cols: np.ndarray | None = None,
        out: np.ndarray | None = None,
        col_dots: bool = False,
    ):
        """(I - alpha S) p for p `[N, q]` (`cols` unused: one operator for every column).

        With col_dots, returns `(M p, p'Mp [q])` (see `BlockedSparseProduct.__call__`).
        """
        return self.product(p, out=out, scale=-self.alpha, shift=1.0, col_dots=col_dots)


def diffusion_operator(transition: sp.spmatrix, alpha: float) -> DiffusionOperator:
    """The operator p -> (I - alpha S) p for `conjugate_gradient` (S from `normalize_affinity`)."""
    return DiffusionOperator(transition, alpha)


def query_vectors(
    queries: np.ndarray,
    database: np.ndarray,
    kq: int = 10,
    gamma: float = 3.0,
    *,
    block_size: int = default("search.block_size"),
    backend: str = "exact",
    index: SearchIndex | None = None,
    refine: int = REFINE,
) -> np.ndarray:
    """Diffusion right-hand sides y: the kq most similar database items get max(s, 0)^gamma.

    Args:
      queries: float `[Q, D]` (validated by the caller).
      database: float `[N, D]`.
      kq: items per query (clipped to N).
      gamma: similarity exponent.
      block_size, backend: search settings (ignored when `index` is given).
      index: a prepared `SearchIndex` over `database`.
      refine: extra candidates re-scored in float64.

    Returns:
      float64 `[N, Q]` (column q is query q's y; N-major, the layout the solver uses).
    """
    n = database.shape[0]
    y = np.zeros((n, queries.shape[0]))
    if queries.shape[0] == 0:
        return y
    sims, ids = neighbors64(
        queries, database, kq, index=index, block_size=block_size, backend=backend, refine=refine
    )
    cols = np.broadcast_to(np.arange(queries.shape[0])[:, None], ids.shape)
    y[ids.ravel(), cols.ravel()] = similarity_weights(sims.ravel(), gamma)
    return y


def _prepare(queries, database, block_size):
    database = search.validate_descriptors(database, "database", block_size=block_size)
    if database.shape[0] == 0:
        raise ValueError("database is empty: nothing to re-rank")
    queries = search.validate_descriptors(queries, "queries", dim=database.shape[1])
    return queries, database


def diffusion_scores(
    queries: np.ndarray,
    database: np.ndarray,
    *,
    k: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    max_iter: int = 20,
    tol: float = 1e-6,
    truncate: int | None = None,
    return_info: bool = False,
    affinity: sp.spmatrix | None = None,
    block_size: int = default("search.block_size"),
    backend: str = "exact",
    index: SearchIndex | None = None,
    validate: bool = True,
):
    """Diffusion scores of every database item for every query (higher is better).

    Full mode (truncate=None): one graph over the whole database (O(N^2 D) to build exactly,
    sparse to store), one vectorised CG solve for all queries.

    Truncated mode (truncate=n): see `truncated_diffusion`; the n items diffused for a query get
    their diffusion scores, and every other item gets a score below all of them,
    `min(diffused) - 2 + s / max|s|` with s its plain inner product with the query, so the rest
    of the list keeps the plain ranking (all scores are finite). Memory of the dense output is
    Q * N * 8 bytes; call `truncated_diffusion` directly to keep only the n items.

    Args:
      queries: float `[Q, D]` L2-normalised.
      database: float `[N, D]` L2-normalised, N >= 1.
      k: graph neighbours (self included), clipped to N (or to n when truncated).
      kq: query neighbours in y, clipped likewise.
      gamma: similarity exponent for graph weights and y.
      alpha: diffusion weight in [0, 1).
      max_iter: CG iteration limit.
      tol: CG relative residual tolerance.
      truncate: None, or the number n of top database items diffused per query.
      return_info: also return the `CGInfo` (iterations, residuals, converged per query).
      affinity: a precomputed graph A `[N, N]` (e.g. `knn_affinity(database, k, gamma)`) reused
        across calls; in truncated mode it is restricted to each query's items, as the reference
        trunclap.m does.
      block_size: database rows per search block.
      backend: 'exact' or 'faiss' for the searches.
      index: a prepared `SearchIndex` over the database (reused across calls).
      validate: check the inputs first.

    Returns:
      float64 `[Q, N]` scores, and the `CGInfo` when `return_info`.

    Raises:
      ValueError: invalid descriptors (rows named), dimension mismatch, empty database, bad
        parameters.
    """
    _check_alpha(alpha)
    if validate:
        queries, database = _prepare(queries, database, block_size)
    if index is None:
        index = SearchIndex(database, backend=backend, block_size=block_size, validate=False)
    if truncate is not None:
        top_scores, top_ids, info = truncated_diffusion(
            queries, database, truncate, k=k, kq=kq, gamma=gamma, alpha=alpha,
            max_iter=max_iter, tol=tol, affinity=affinity, block_size=block_size,
            backend=backend, index=index, validate=False,
        )  # fmt: skip
        scores = _dense_with_fill(queries, database, top_scores, top_ids, block_size)
        return (scores, info) if return_info else scores

    if affinity is None:
        affinity = knn_affinity(
            database, k, gamma, block_size=block_size, backend=backend, validate=False
        )
    _check_affinity(affinity, database.shape[0])
    s = normalize_affinity(affinity)
    y = query_vectors(queries, database, kq, gamma, index=index)
    f, info = conjugate_gradient(diffusion_operator(s, alpha), y, max_iter=max_iter, tol=tol)
    if not info.all_converged:
        _log.info("diffusion: %s", info.summary())
    scores = np.ascontiguousarray(f.T)
    return (scores, info) if return_info else scores


def _check_affinity(affinity, n: int) -> None:
    if affinity.shape != (n, n):
        raise ValueError(f"affinity has shape {affinity.shape}, expected ({n}, {n})")


def _dense_with_fill(
    queries: np.ndarray,
    database: np.ndarray,
    top_scores: np.ndarray,
    top_ids: np.ndarray,
    block_size: int,
) -> np.ndarray:
    """[Q, N] scores: the given items keep theirs, the others rank below, in plain order."""
    n_q, n = queries.shape[0], database.shape[0]
    out = np.zeros((n_q, n))
    keep = np.zeros((n_q, n), bool)
    if n_q == 0:
        return out
    for q in range(n_q):
        valid = top_ids[q] >= 0
        out[q, top_ids[q][valid]] = top_scores[q][valid]
        keep[q, top_ids[q][valid]] = True
    plain = search.inner_products(queries, database, block_size=block_size)
    return rest_in_plain_order(out, keep, plain)


def rest_in_plain_order(scores: np.ndarray, keep: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Scores whose entries outside `keep` rank below every kept one, in their plain order.

    Args:
      scores: float `[Q, N]` (the kept entries' values are kept).
      keep: bool `[Q, N]`: the entries diffusion scored (its top n, or the items it reached).
      plain: `[Q, N]` the queries' inner products with the database.

    Returns:
      float64 `[Q, N]`: the others get `min(kept) - 2 + plain / max|plain|` per query (all
      finite; 0 stands for min(kept) in a row that keeps nothing).
    """
    out = np.asarray(scores, np.float64).copy()
    for q in range(out.shape[0]):
        kept = out[q, keep[q]]
        lo = kept.min() if kept.size else 0.0
        row = np.asarray(plain[q], np.float64)
        scale = np.abs(row).max()
        out[q, ~keep[q]] = (lo - 2.0 + row / (scale if scale > 0 else 1.0))[~keep[q]]
    return out


class _BlockDiagonalOperator:
    """p -> (I - alpha S_q) p where column q of p lives on query q's own sub-graph S_q."""

    def __init__(self, transitions: Sequence[sp.csr_matrix], alpha: float):
        self.transitions = list(transitions)
        self.alpha = alpha
        self._cols_key: bytes | None = None
        self._matrix: sp.csr_matrix | None = None

    def __call__(self, p: np.ndarray, cols: np.ndarray) -> np.ndarray:
        key = np.asarray(cols, np.int64).tobytes()
        if key != self._cols_key:
            # Rebuilt only when the set of active columns changes (at most once per iteration).
            self._matrix = sp.block_diag([self.transitions[c] for c in cols], format="csr")
            self._cols_key = key
        n, q = p.shape
        flat = np.ascontiguousarray(p.T).reshape(-1)
        out = flat - self.alpha * (self._matrix @ flat)
        return out.reshape(q, n).T


def truncated_diffusion(
    queries: np.ndarray,
    database: np.ndarray,
    n: int = 1000,
    *,
    k: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    max_iter: int = 20,
    tol: float = 1e-6,
    affinity: sp.spmatrix | None = None,
    block_size: int = default("search.block_size"),
    backend: str = "exact",
    index: SearchIndex | None = None,
    validate: bool = True,
) -> tuple[np.ndarray, np.ndarray, CGInfo]:
    """Diffusion restricted to each query's top-n database items: cost independent of N.

    For each query: its n most similar database items (one exact or faiss search over the
    database: the only O(N) step), the mutual kNN graph of those n items built among themselves
    (O(n^2 D), or `affinity[sub, sub]` when a global graph is given, as in the reference),
    S normalised on that sub-graph, y from the query's kq most similar items. All queries are
    then solved together: the sub-graphs form a block-diagonal operator and each query is one
    CG column. Memory: Q * n * k graph entries plus a few `[n, Q]` float64 arrays.

    Args:
      queries: float `[Q, D]` L2-normalised.
      database: float `[N, D]` L2-normalised, N >= 1 (memory-mapped arrays work).
      n: items diffused per query (clipped to N); 1000 to 10000 in the literature.
      k, kq, gamma, alpha, max_iter, tol: as in `diffusion_scores` (k, kq clipped to n).
      affinity: optional global graph A `[N, N]` restricted per query instead of building one.
      block_size: database rows per search block.
      backend: 'exact' or 'faiss' for the top-n search.
      index: a prepared `SearchIndex` over the database (reused across calls).
      validate: check the inputs first.

    Returns:
      scores float64 `[Q, n]` sorted descending (ties keep the plain order), ids int64 `[Q, n]`
      (database ids), and the `CGInfo`.
    """
    _check_alpha(alpha)
    if validate:
        queries, database = _prepare(queries, database, block_size)
    if n < 1:
        raise ValueError(f"truncate/n must be >= 1, got {n}")
    if index is None:
        index = SearchIndex(database, backend=backend, block_size=block_size, validate=False)
    n = min(int(n), index.ntotal)
    k, kq = min(k, n), min(kq, n)
    n_q = queries.shape[0]
    if affinity is not None:
        _check_affinity(affinity, index.ntotal)
        affinity = sp.csr_matrix(affinity)
    _, top_ids = index.search(queries, n, validate=False)
    transitions = []
    y = np.zeros((n, n_q))
    for q in range(n_q):
        sub = top_ids[q]
        order = np.argsort(sub, kind="stable")
        xs = np.empty((n, database.shape[1]), np.float32)
        xs[order] = database[sub[order]]  # sorted gather: fast on memory maps
        if affinity is None:
            sub_index = SearchIndex(xs, block_size=block_size, validate=False)
            sims, ids = neighbors64(xs, xs, k, index=sub_index)
            a = mutual_knn_affinity(sims, ids, gamma, num_nodes=n)
        else:
            a = affinity[sub][:, sub]
        transitions.append(normalize_affinity(a))
        # y in float64 as the full mode; candidates are in plain (float32) order, so a stable
        # sort on the float64 similarities breaks remaining ties by that order.
        s64 = xs.astype(np.float64) @ np.asarray(queries[q], np.float64)
        first = np.argsort(-s64, kind="stable")[:kq]
        y[first, q] = similarity_weights(s64[first], gamma)
    f, info = conjugate_gradient(
        _BlockDiagonalOperator(transitions, alpha), y, max_iter=max_iter, tol=tol
    )
    if not info.all_converged:
        _log.info("truncated diffusion: %s", info.summary())
    scores = np.ascontiguousarray(f.T)
    order = np.argsort(-scores, axis=1, kind="stable")
    return (
        np.take_along_axis(scores, order, axis=1),
        np.take_along_axis(top_ids, order, axis=1),
        info,
    )
