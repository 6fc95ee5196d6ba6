"""Nearest-neighbour search by inner product over L2-normalised descriptors (numpy; faiss lazily).

The exact path is the default and the reference: the database is scanned in blocks of rows
(`block_size`), each block's similarities are computed with one float32 matrix product, the
block's top k are picked with `np.argpartition`, and the running top k are merged. Memory stays
bounded by `block_size` rows plus a `[Q_chunk, block_size]` score block whatever N is, so
memory-mapped descriptor stores of millions of rows can be searched without loading them.

Ties are broken deterministically: results are ordered by score (descending), then by database
id (ascending), and when several items tie at the k-th place the ones with the lower ids are kept.

faiss (a dependency since the saved approximate index, `cbir_tf.search.ann`; faiss-gpu may replace
faiss-cpu) is imported only when asked for. Its 'Flat' index is exact too (up to float
rounding); 'HNSW32', 'IVF1024,Flat', ... are approximate.

Conventions: descriptors float32 `[N, D]`, one row per image; search results `(scores, ids)`
float32/int64 `[Q, k]`; full rankings int64 `[Q, N]`, best first.
"""

from __future__ import annotations

import numpy as np

from cbir_tf.config import default

__all__ = [
    "check_k",
    "exact_knn",
    "inner_products",
    "rank_all",
    "refine_knn",
    "sort_by_score",
    "top_k_indices",
    "validate_descriptors",
]

# Elements of one [queries, database rows] float32 score block: 2**23 floats = 32 MiB (plus
# 64 MiB for argpartition's int64 indices). Bounds memory independently of N and Q.
_SCORE_BLOCK_ELEMENTS = 1 << 23
_MAX_ROWS_LISTED = 10


def _rows_message(rows: np.ndarray) -> str:
    listed = ", ".join(str(int(r)) for r in rows[:_MAX_ROWS_LISTED])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > _MAX_ROWS_LISTED else ""
    return f"[{listed}{more}]"


def validate_descriptors(
    x: np.ndarray,
    name: str = "descriptors",
    *,
    dim: int | None = None,
    block_size: int = default("search.block_size"),
) -> np.ndarray:
    """Checks a descriptor matrix and returns it as an array (memory maps are not copied).

    Scans the rows in blocks, so a memory-mapped store of millions of rows is checked with
    bounded memory. Descriptors are expected L2-normalised but that is not enforced: search is by
    inner product, and a zero row (what a failed extraction often leaves) has no direction.

    Args:
      x: float array `[N, D]` (N may be 0).
      name: what to call the array in error messages ('queries', 'database', ...).
      dim: expected dimension D (e.g. the database's, when checking queries).
      block_size: rows checked at once.

    Returns:
      `x` as an `np.ndarray` (the same object when it already is one, e.g. a `np.memmap`).

    Raises:
      ValueError: not 2-D, not real floating point, D == 0, D != `dim`, or rows holding NaN/Inf
        or all zeros (the message names the offending rows).
    """
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} have dimension 0")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {x.shape[1]} but {dim} was expected "
            "(queries and database must come from the same model and whitening)"
        )
    bad_finite: list[np.ndarray] = []
    bad_zero: list[np.ndarray] = []
    for start in range(0, x.shape[0], block_size):
        block = np.asarray(x[start : start + block_size])
        finite = np.isfinite(block).all(axis=1)
        zero = ~np.any(block != 0, axis=1) & finite
        if not finite.all():
            bad_finite.append(start + np.flatnonzero(~finite))
        if zero.any():
            bad_zero.append(start + np.flatnonzero(zero))
    problems = []
    if bad_finite:
        rows = np.concatenate(bad_finite)
        problems.append(f"NaN or Inf values in row(s) {_rows_message(rows)}")
    if bad_zero:
        rows = np.concatenate(bad_zero)
        problems.append(f"all-zero vectors in row(s) {_rows_message(rows)}")
    if problems:
        raise ValueError(
            f"{name} [{x.shape[0]}, {x.shape[1]}] are not valid descriptors: "
            + "; ".join(problems)
            + " (re-extract these images or drop them before searching)"
        )
    return x


def check_k(k: int, n: int) -> int:
    """k > N is clipped to N (every item is returned); k < 1 is an error."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return min(int(k), n)


def _query_chunk(block_rows: int) -> int:
    return max(1, _SCORE_BLOCK_ELEMENTS // max(1, block_rows))


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices `[q, k]` (unordered) of the k largest scores per row, lower index on ties.

    `np.argpartition` alone keeps an arbitrary subset of the items tied at the k-th value; the
    rows where that matters (more than k items >= the k-th value) are redone exactly.

    Args:
      scores: float `[q, b]` (no NaN).
      k: items per row, 1 <= k; k >= b returns every column.

    Returns:
      int `[q, min(k, b)]` column indices, in no particular order.
    """
    q, b = scores.shape
    if k >= b:
        return np.broadcast_to(np.arange(b), (q, b))
    cols = np.argpartition(scores, b - k, axis=1)[:, b - k :]
    kth = np.take_along_axis(scores, cols, axis=1).min(axis=1)
    tied_rows = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    if tied_rows.size:
        sub = scores[tied_rows]
        t = kth[tied_rows, None]
        above = sub > t
        at = sub == t
        need = k - above.sum(axis=1)
        keep = above | (at & (np.cumsum(at, axis=1) <= need[:, None]))
        cols = np.array(cols)
        cols[tied_rows] = np.nonzero(keep)[1].reshape(len(tied_rows), k)
    return cols


def sort_by_score(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorts each row by score descending, then id ascending, and keeps the first k.

    Args:
      scores: float `[q, m]`.
      ids: int `[q, m]`.
      k: columns kept.

    Returns:
      (scores `[q, k]`, ids `[q, k]`) reordered.
    """
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def exact_knn(
    queries: np.ndarray, database: np.ndarray, k: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each query by a blocked scan: (scores float32 [Q, k], ids int64 [Q, k]).

    The inputs are already validated and 1 <= k <= N (see `SearchIndex.search`).
    """
    n_q, n = queries.shape[0], database.shape[0]
    out_s = np.empty((n_q, k), np.float32)
    out_i = np.empty((n_q, k), np.int64)
    block_rows = min(block_size, n)
    q_chunk = _query_chunk(block_rows)
    for q0 in range(0, n_q, q_chunk):
        qb = np.ascontiguousarray(queries[q0 : q0 + q_chunk], dtype=np.float32)
        best_s = np.empty((qb.shape[0], 0), np.float32)
        best_i = np.empty((qb.shape[0], 0), np.int64)
        for start in range(0, n, block_rows):
            block = np.ascontiguousarray(database[start : start + block_rows], dtype=np.float32)
            sims = qb @ block.T
            cols = top_k_indices(sims, k)
            cand_s = np.take_along_axis(sims, cols, axis=1)
            cand_i = cols.astype(np.int64) + start
            best_s = np.concatenate([best_s, cand_s], axis=1)
            best_i = np.concatenate([best_i, cand_i], axis=1)
            if best_s.shape[1] > k:
                best_s, best_i = sort_by_score(best_s, best_i, k)
        best_s, best_i = sort_by_score(best_s, best_i, k)
        out_s[q0 : q0 + q_chunk] = best_s
        out_i[q0 : q0 + q_chunk] = best_i
    return out_s, out_i


def inner_products(
    queries: np.ndarray,
    database: np.ndarray,
    *,
    block_size: int = default("search.block_size"),
    dtype: type = np.float32,
) -> np.ndarray:
    """All query-database inner products `[Q, N]`, computed block by block (no validation).

    Args:
      queries: float `[Q, D]`.
      database: float `[N, D]` (memory-mapped arrays are read in blocks).
      block_size: database rows per block.
      dtype: output dtype (float32, or float64 for a float64 product).

    Returns:
      `dtype` array `[Q, N]`.
    """
    n = database.shape[0]
    out = np.empty((queries.shape[0], n), dtype)
    q = np.ascontiguousarray(queries, dtype=dtype)
    for start in range(0, n, block_size):
        block = np.ascontiguousarray(database[start : start + block_size], dtype=dtype)
        np.matmul(q, block.T, out=out[:, start : start + block.shape[0]])
    return out


def rank_all(
    queries: np.ndarray, database: np.ndarray, *, block_size: int = default("search.block_size")
) -> tuple[np.ndarray, np.ndarray]:
    """Full rankings of the database for each query, best first (what evaluation needs).

    Memory is `Q * N * 12` bytes (scores and ranks), fine for benchmark sizes; use
    `SearchIndex.search` when only the top of the list matters.

    Args:
      queries: float `[Q, D]`.
      database: float `[N, D]`, N >= 1.
      block_size: database rows scored at once.

    Returns:
      ranks int64 `[Q, N]` (database ids, best first; ties by lower id) and the scores float32
      `[Q, N]` indexed by database id (not by rank).

    Raises:
      ValueError: invalid descriptors (rows named), dimension mismatch, empty database.
    """
    database = validate_descriptors(database, "database", block_size=block_size)
    if database.shape[0] == 0:
        raise ValueError("database is empty: nothing to rank")
    queries = validate_descriptors(queries, "queries", dim=database.shape[1])
    scores = inner_products(queries, database, block_size=block_size)
    # A stable sort of the negated scores keeps tied items in id order.
    ranks = np.argsort(-scores, axis=1, kind="stable").astype(np.int64, copy=False)
    return ranks, scores


def refine_knn(
    queries: np.ndarray, database: np.ndarray, ids: np.ndarray, *, chunk_elements: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """Recomputes candidate similarities in float64 and re-sorts them.

    A float32 search followed by this step yields the float64 ranking among the candidates at
    float32 cost: ask the search for a few more candidates than needed (a margin) so that items
    whose order float32 rounding swapped across the k-th place are still present.

    Args:
      queries: float `[Q, D]`.
      database: float `[N, D]`.
      ids: int `[Q, m]` candidate ids (-1 marks a missing candidate).
      chunk_elements: bound on the gathered float64 `[rows, m, D]` block.

    Returns:
      sims float64 `[Q, m]` descending (missing: -inf, last) and ids int64 `[Q, m]`; ties by
      lower id.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_q, m = ids.shape
    d = queries.shape[1]
    sims = np.empty((n_q, m), np.float64)
    rows_per_chunk = max(1, chunk_elements // max(1, m * d))
    for r0 in range(0, n_q, rows_per_chunk):
        idc = ids[r0 : r0 + rows_per_chunk]
        flat = np.clip(idc.ravel(), 0, None)
        # Gather in sorted order: much faster on memory maps than random access.
        order = np.argsort(flat, kind="stable")
        gathered = np.empty((flat.size, d), np.float64)
        gathered[order] = database[flat[order]]
        qc = np.asarray(queries[r0 : r0 + rows_per_chunk], dtype=np.float64)
        s = np.einsum("qmd,qd->qm", gathered.reshape(idc.shape[0], m, d), qc)
        sims[r0 : r0 + rows_per_chunk] = np.where(idc < 0, -np.inf, s)
    big = np.iinfo(np.int64).max
    s_sorted, i_sorted = sort_by_score(sims, np.where(ids < 0, big, ids), m)
    return s_sorted, np.where(i_sorted == big, -1, i_sorted)
