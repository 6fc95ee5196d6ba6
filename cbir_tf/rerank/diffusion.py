"""Diffusion re-ranking on a sparse mutual kNN graph (Iscen et al., CVPR 2017), numpy/scipy.

Paper: A. Iscen, G. Tolias, Y. Avrithis, T. Furon, O. Chum, "Efficient Diffusion on Region
Manifolds: Recovering Small Objects with Compact CNN Representations", CVPR 2017. This module
follows the authors' Matlab code (ahmetius/diffusion-retrieval: knngraph.m, transition_matrix.m,
ymake.m, dfs.m, trunclap.m) and reproduces its numbers (tests/test_diffusion.py checks the
golden values computed with it):

- graph A: each database vector's k nearest database vectors by inner product, the vector
  itself counted among its k; edge i-j kept only when mutual; weight max(s, 0)^gamma (A[i, j]
  takes s from i's list, as the reference does); zero diagonal; scipy.sparse, never dense N x N;
- S = D^-1/2 A D^-1/2 with D the row sums of A (isolated nodes, degree 0, get a zero row);
- y: the query's kq most similar database vectors get max(s, 0)^gamma, all others 0;
- f solves (I - alpha S) f = y by conjugate gradient from a zero start, stopping when the
  relative residual ||y - M f|| / ||y|| <= tol or after max_iter iterations; like Matlab's
  `pcg`, an unconverged solve returns the iterate with the smallest residual norm.

Differences from the reference, all for speed or scale, none changing the numbers:
- all queries are solved at once: `conjugate_gradient` runs independent CG recurrences for the
  columns of an `[N, Q]` right-hand side (per-column step sizes and convergence masks; finished
  columns are frozen and dropped from the work), so each sparse product serves every query
  (`BlockedSparseProduct`: cache-blocked over S's columns, with the rest of the operator and
  p'Mp computed while each block of rows is in cache); the products and the vector updates run
  over row ranges on all cores (`num_threads`, $CBIR_NUM_THREADS) and allocate nothing per
  iteration;
- kNN lists come from a blocked float32 search re-scored in float64 (`refine` extra candidates),
  which gives the float64 ranking of the reference at float32 cost (small problems compute all
  float64 similarities directly);
- truncated diffusion builds each query's graph inside its top-n database items, so beyond the
  initial search its cost depends on n, not on N (the reference restricts a precomputed global
  graph instead: pass `affinity=` to do that);
- `OfflineDiffusion` precomputes sparse diffusion vectors once and answers a new query with a
  sparse product.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp

from cbir_tf import search

__all__ = [
    "BlockedSparseProduct",
    "CGInfo",
    "DiffusionOperator",
    "OfflineDiffusion",
    "conjugate_gradient",
    "diffusion_operator",
    "diffusion_scores",
    "knn_affinity",
    "mutual_knn_affinity",
    "normalize_affinity",
    "num_threads",
    "query_vectors",
    "truncated_diffusion",
]

_log = logging.getLogger(__name__)

try:
    # scipy's own kernel behind `csr_matrix @ dense`; unlike the operator it adds into a given
    # output. Private, but unchanged for a decade; the public product is the fallback.
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover
    _csr_matvecs = None

# Extra float32 candidates re-scored in float64 so that rounding cannot change which k
# neighbours are kept (float32 errors are ~1e-7; a margin of 8 items is far beyond that).
_REFINE = 8
# Query x database pairs up to which float64 similarities are computed directly (32 MiB).
_DIRECT_FLOAT64 = 1 << 22

Operator = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class CGInfo:
    """What the conjugate-gradient solver did, per right-hand-side column.

    Attributes:
      iterations: int64 `[Q]`, the iteration that produced the returned iterate (0: x = 0).
      residuals: float64 `[Q]`, relative residual ||b - M x|| / ||b|| of the returned iterate
        (0 for b = 0).
      converged: bool `[Q]`, whether residuals <= tol was reached.
      breakdown: bool `[Q]`, whether the recurrence stopped on a non-positive or non-finite
        curvature p'Mp (M not positive definite for that column; the best iterate is returned).
      max_iter: the iteration limit used.
      tol: the tolerance used.
    """

    iterations: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    breakdown: np.ndarray
    max_iter: int
    tol: float

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def summary(self) -> str:
        """One line, e.g. 'CG: 3/70 converged (tol 1e-06, max_iter 20), residual max 2.1e-03'."""
        res = self.residuals
        worst = f"{res.max():.2e}" if res.size else "n/a"
        return (
            f"CG: {int(self.converged.sum())}/{self.converged.size} converged "
            f"(tol {self.tol:g}, max_iter {self.max_iter}), residual max {worst}"
        )

    @staticmethod
    def concatenate(infos: Sequence[CGInfo]) -> CGInfo:
        """Joins the infos of solves over consecutive column batches."""
        return CGInfo(
            iterations=np.concatenate([i.iterations for i in infos]),
            residuals=np.concatenate([i.residuals for i in infos]),
            converged=np.concatenate([i.converged for i in infos]),
            breakdown=np.concatenate([i.breakdown for i in infos]),
            max_iter=infos[0].max_iter,
            tol=infos[0].tol,
        )


def _as_operator(operator) -> Operator:
    if isinstance(operator, np.ndarray) or sp.issparse(operator):
        return lambda p, cols: operator @ p
    if callable(operator):
        return operator
    raise TypeError(
        f"operator must be a matrix or a callable (p, columns) -> M p, got {type(operator)}"
    )


def _col_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->j", a, b)


def _apply(matvec: Operator, p: np.ndarray, cols: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """M p, written into `out` when the operator can (no fresh [N, q] array per product)."""
    if out is not None and getattr(matvec, "writes_out", False):
        return matvec(p, cols, out=out)
    return np.asarray(matvec(p, cols), dtype=np.float64)


def _copy_columns(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    if mask.all():
        np.copyto(dst, src)  # one contiguous pass instead of a fancy-indexed gather and scatter
    else:
        dst[:, mask] = src[:, mask]


def _copy_rows(src: np.ndarray, dsts: Sequence[np.ndarray], s: slice) -> None:
    for dst in dsts:
        np.copyto(dst[s], src[s])


def _beta(rho: np.ndarray, rho_prev: np.ndarray) -> np.ndarray:
    # Parked columns have rho_prev = 0 (their r is 0): beta 0 keeps their p at 0.
    return np.divide(rho, rho_prev, out=np.zeros_like(rho), where=rho_prev > 0)


def _col_dot_rows(a: np.ndarray, b: np.ndarray, s: slice) -> np.ndarray:
    return _col_dot(a[s], b[s])


def _next_direction(w: _CGWork, beta: np.ndarray, s: slice) -> None:
    """Rows s: p <- r + beta p."""
    p = w.p[s]
    p *= beta
    p += w.r[s]


# Row chunks of the CG updates: the updates of a chunk run one after the other while it is
# still in cache, and their temporaries stay one chunk big (reused by the allocator instead of
# fresh [N, Q] arrays, whose page faults are costly).
_CHUNK_BYTES = 1 << 19


def _row_chunks(s: slice, width: int) -> list[slice]:
    """Splits the row range s into chunks of about `_CHUNK_BYTES` per `[rows, width]` array."""
    size = max(1, _CHUNK_BYTES // (8 * max(1, width)))
    return [slice(a, min(a + size, s.stop)) for a in range(s.start, s.stop, size)]


def _step_residual(w: _CGWork, step: np.ndarray, s: slice) -> np.ndarray:
    """Rows s: r <- r - step q; returns their partial r'r."""
    rr = np.zeros(w.width)
    for c in _row_chunks(s, w.width):
        r = w.r[c]
        r -= w.q[c] * step
        rr += _col_dot(r, r)
    return rr


class _RowRanges:
    """Runs a function over row ranges of `[N, w]` arrays in the shared thread pool.

    numpy releases the GIL in its loops, so large CG vector updates (memory-bound: N = 100 000,
    Q = 70 is 56 MB per array) gain from several cores; a range of rows of C-ordered arrays is
    contiguous. Small problems get few ranges or one: their numpy calls are too short for
    threads to gain more than they lose waiting for the GIL between calls.
    """

    _MIN_ELEMENTS = 1 << 16  # per range (tuned on 2 and 16 cores)

    def __init__(self, n: int, width: int):
        parts = max(1, min(num_threads(), n * width // self._MIN_ELEMENTS))
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def run(self, fn: Callable[[slice], Any]) -> list:
        if len(self.slices) <= 1:
            return [fn(s) for s in self.slices]
        return list(_thread_pool().map(fn, self.slices))

    def sum(self, fn: Callable[[slice], np.ndarray]) -> np.ndarray:
        """The sum of fn's per-range column vectors (partial column dot products)."""
        parts = self.run(fn)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


class _CGWork:
    """Working state of `conjugate_gradient`: one column per right-hand side still in the work.

    Arrays are `[N, w]`; `cols` maps working columns to columns of b. A finished column is
    parked (p = r = 0, so it no longer moves) rather than dropped at once: the arrays are only
    compacted when at most half of their columns are live, so they are reallocated O(log Q)
    times instead of at every convergence (fresh arrays cost page faults, the copies a pass).
    """

    _ARRAYS = ("b", "x", "r", "p", "q", "x_min")
    _VECTORS = ("cols", "tolb", "rho", "rho_prev", "res_min", "it_min", "res_last", "live",
                "min_is_x")  # fmt: skip

    def __init__(self, b: np.ndarray, cols: np.ndarray, tolb: np.ndarray, rows: _RowRanges):
        n, w = b.shape
        self.b = b
        self.x = np.zeros((n, w))
        self.r = np.empty((n, w))
        self.p = np.empty((n, w))  # the first search direction: r
        # Copied range by range in the threads that will update those rows: fresh memory is
        # paged in by the thread that first writes it (costly on VMs, where the pages of a
        # [N, Q] array take about as long as a product), so the page faults run in parallel
        # too, like those of x, q and x_min, first written in the row-parallel updates.
        rows.run(functools.partial(_copy_rows, b, (self.r, self.p)))
        self.q = np.empty((n, w))  # M p, written by the operator
        # The best iterate so far (smallest residual norm). Kept lazily: while the best is the
        # current x itself (min_is_x, the usual case as residuals mostly decrease), nothing is
        # copied; x is saved here only just before it moves on to a worse iterate.
        self.x_min = np.empty((n, w))
        self.min_is_x = np.ones(w, bool)
        self.cols = cols
        self.tolb = tolb
        self.rho = _col_dot(self.r, self.r)
        self.rho_prev = np.ones(w)
        self.res_min = np.sqrt(self.rho)  # residual norm of the best iterate (x = 0: ||b||)
        self.it_min = np.zeros(w, np.int64)
        self.res_last = self.res_min.copy()
        self.live = np.ones(w, bool)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def best(self, sel: np.ndarray) -> np.ndarray:
        """The best iterates of working columns `sel`, `[N, len(sel)]`."""
        return np.where(self.min_is_x[sel], self.x[:, sel], self.x_min[:, sel])

    def park(self, done: np.ndarray) -> None:
        self.live &= ~done
        if not self.live.any():
            return  # the solve is over
        self.p[:, done] = 0.0
        self.r[:, done] = 0.0
        if 2 * int(self.live.sum()) <= self.width:
            keep = self.live
            for name in self._ARRAYS:
                # (Fancy indexing along axis 1 gives a Fortran-ordered copy: made C-ordered.)
                setattr(self, name, np.ascontiguousarray(getattr(self, name)[:, keep]))
            for name in self._VECTORS:
                setattr(self, name, getattr(self, name)[keep])


def conjugate_gradient(
    operator,
    b: np.ndarray,
    *,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> tuple[np.ndarray, CGInfo]:
    """Solves M x = b for every column of b at once by independent, vectorised CG recurrences.

    Each column runs its own conjugate-gradient recurrence (own step sizes alpha and beta, own
    stopping test) but all columns share each product with M, so a sparse M is read once per
    iteration for all right-hand sides. Follows Matlab's `pcg` without preconditioner, from a
    zero start:
    - a column stops when its residual norm ||b - M x|| <= tol ||b||; the recursive residual is
      confirmed against the true residual before stopping;
    - b = 0 gives x = 0 at once;
    - when max_iter is reached (or the recurrence breaks down) the column returns, among the
      iterates computed, the one with the smallest residual norm (Matlab's xmin rule: the last
      iterate is kept when its residual is not larger than xmin's true residual).
    Finished columns are frozen and leave the working arrays once they are half of them, so
    later iterations cost less. The loop allocates no `[N, Q]` array per iteration: products
    go into a reused buffer when the operator accepts one (`writes_out`, as
    `diffusion_operator`'s does). Unlike `pcg`, there is no stagnation test (it only matters
    for tolerances near eps).

    Args:
      operator: the symmetric positive-definite M `[N, N]`: a scipy sparse matrix, a dense array
        or a callable `(p [N, q], columns int [q]) -> M p [N, q]`, where `columns` holds the
        original column indices of p's columns (for per-column operators such as the block
        diagonal of truncated diffusion). A callable with a true attribute `writes_out` is
        also called as `(p, columns, out=array)`, returning `out` holding M p, and as
        `(p, columns, out=array, col_dots=True)`, returning `(out, column dots of p and M p)`.
      b: float `[N]` or `[N, Q]` right-hand sides.
      max_iter: iteration limit (>= 0).
      tol: relative residual tolerance (scipy's `rtol`).

    Returns:
      x float64 `[N]` or `[N, Q]` (as b) and a `CGInfo` with one entry per column.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    matvec = _as_operator(operator)
    b = np.asarray(b, dtype=np.float64)
    vector = b.ndim == 1
    if vector:
        b = b[:, None]
    if b.ndim != 2:
        raise ValueError(f"b must be [N] or [N, Q], got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("b holds NaN or Inf values")
    n, m = b.shape
    x_out = np.zeros((n, m))  # (calloc'd: its pages cost nothing until columns are written)
    iterations = np.zeros(m, np.int64)
    residuals = np.zeros(m)
    converged = np.zeros(m, bool)
    breakdown = np.zeros(m, bool)

    n2b = np.linalg.norm(b, axis=0)
    tolb = tol * n2b
    # x = 0 already satisfies columns with b = 0 (and every column when tol >= 1).
    done0 = n2b <= tolb
    converged[done0] = True
    residuals[done0 & (n2b > 0)] = 1.0
    act = np.flatnonzero(~done0)
    # The vector updates run over row ranges in parallel, like the sparse product.
    rows = _RowRanges(n, act.size)
    # (b itself when every column is active: no copy; fancy indexing would give one.)
    w = _CGWork(np.ascontiguousarray(b if act.size == m else b[:, act]), act, tolb[act], rows)
    p_ready = True  # p holds this iteration's search direction

    for it in range(1, max_iter + 1):
        if not w.live.any():
            break
        if not p_ready:
            rows.run(functools.partial(_next_direction, w, _beta(w.rho, w.rho_prev)))
        if getattr(matvec, "writes_out", False):
            q, pq = matvec(w.p, w.cols, out=w.q, col_dots=True)
        else:
            w.q = q = np.asarray(matvec(w.p, w.cols), dtype=np.float64)
            pq = rows.sum(functools.partial(_col_dot_rows, w.p, q))
        bad = w.live & (~(pq > 0) | ~np.isfinite(pq) | ~(w.rho > 0))
        ok = w.live & ~bad
        step = np.where(ok, w.rho / np.where(ok, pq, 1.0), 0.0)
        # r first: its new norm tells whether x must be saved as the best before it moves.
        rho = rows.sum(functools.partial(_step_residual, w, step))
        # Apparent convergence is confirmed with the true residual (recursive residuals drift),
        # which needs the new x: such columns save their best first, whatever their residual.
        cand = ok & (rho <= w.tolb * w.tolb)
        save = ok & w.min_is_x & (cand | ~(np.sqrt(rho) < w.res_min))
        # Without such columns r is final, and the next direction is made in the same pass.
        p_ready = not cand.any()
        beta = _beta(rho, w.rho) if p_ready else None
        rows.run(functools.partial(_step_solution, w, step, save, beta))
        w.min_is_x[save] = False
        if not p_ready:
            rho[cand] = _true_residuals(matvec, w, cand, rows)
        res = np.sqrt(rho)
        w.rho_prev, w.rho = w.rho, rho
        better = ok & (res < w.res_min)
        w.res_min[better] = res[better]
        w.it_min[better] = it
        w.min_is_x[better] = True
        w.res_last = np.where(ok, res, w.res_last)

        conv = ok & (res <= w.tolb)
        if conv.any():
            cols = w.cols[conv]
            if cols.size == m:
                # Every column at once, as is usual (w.x then holds them all, in order): x is
                # the output, with no copy (x_out, never written, was never paged in).
                x_out = w.x
            else:
                x_out[:, cols] = w.x[:, conv]
            iterations[cols] = it
            residuals[cols] = res[conv] / n2b[cols]
            converged[cols] = True
        if bad.any():
            # x did not move (step 0): the best of iterates 0 .. it - 1 goes out.
            _finish_unconverged(matvec, w, bad, it - 1, x_out, iterations, residuals, n2b)
            breakdown[w.cols[bad]] = True
        if conv.any() or bad.any():
            w.park(conv | bad)

    if w.live.any():
        _finish_unconverged(matvec, w, w.live, max_iter, x_out, iterations, residuals, n2b)
    info = CGInfo(iterations, residuals, converged, breakdown, int(max_iter), float(tol))
    return (x_out[:, 0] if vector else x_out), info


def _step_solution(
    w: _CGWork, step: np.ndarray, save: np.ndarray, beta: np.ndarray | None, s: slice
) -> None:
    """Rows s: saves x into x_min where `save`, x <- x + step p, then p <- r + beta p if given."""
    any_save = save.any()
    for c in _row_chunks(s, w.width):
        x, p = w.x[c], w.p[c]
        if any_save:
            _copy_columns(w.x_min[c], x, save)
        x += p * step
        if beta is not None:
            _next_direction(w, beta, c)


def _true_residuals(matvec: Operator, w: _CGWork, cand: np.ndarray, rows: _RowRanges) -> np.ndarray:
    """Replaces r by b - M x in the working columns `cand` (bool); returns their squared norms."""
    full = 2 * int(cand.sum()) >= w.width
    if full:
        # Most columns: one product of all of x into q (free after the r update) beats
        # gathering columns.
        w.q = mx = _apply(matvec, w.x, w.cols, w.q)
    else:
        mx = _apply(matvec, w.x[:, cand], w.cols[cand], None)
    every = bool(cand.all())

    def update(s: slice) -> np.ndarray:
        rr = np.zeros(int(cand.sum()))
        for c in _row_chunks(s, w.width):
            r = w.r[c]
            if every:
                np.subtract(w.b[c], mx[c], out=r)
                rr += _col_dot(r, r)
            else:
                r_true = w.b[c][:, cand] - (mx[c][:, cand] if full else mx[c])
                r[:, cand] = r_true
                rr += _col_dot(r_true, r_true)
        return rr

    return rows.sum(update)


def _finish_unconverged(
    matvec: Operator,
    w: _CGWork,
    sel: np.ndarray,
    last_it: int,
    x_out: np.ndarray,
    iterations: np.ndarray,
    residuals: np.ndarray,
    n2b: np.ndarray,
) -> None:
    """Matlab pcg's exit for unconverged working columns `sel` (bool): xmin if its true
    residual is not larger than the last iterate's residual, else the last iterate."""
    cols = w.cols[sel]
    xm = w.best(sel)
    true_min = np.linalg.norm(w.b[:, sel] - _apply(matvec, xm, cols, None), axis=0)
    use_min = true_min <= w.res_last[sel]
    x_out[:, cols] = np.where(use_min, xm, w.x[:, sel])
    iterations[cols] = np.where(use_min, w.it_min[sel], last_it)
    residuals[cols] = np.where(use_min, true_min, w.res_last[sel]) / n2b[cols]


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def num_threads() -> int:
    """Threads of the sparse products and CG updates: $CBIR_NUM_THREADS if set, else the CPUs
    this process may run on (its affinity mask, not the machine's count), at most 32."""
    value = os.environ.get("CBIR_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"CBIR_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        count = os.cpu_count() or 1
    return max(1, min(count, 32))


def _thread_pool() -> ThreadPoolExecutor:
    """One pool shared by the products and the CG updates, of `num_threads()` workers."""
    global _POOL, _POOL_SIZE
    size = num_threads()
    if _POOL is None or _POOL_SIZE != size:
        # (Re)started when CBIR_NUM_THREADS changes; the old pool still ends its tasks.
        old, _POOL, _POOL_SIZE = _POOL, ThreadPoolExecutor(size, thread_name_prefix="cbir"), size
        if old is not None:
            old.shutdown(wait=False)
    return _POOL


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: start a new one there.
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


os.register_at_fork(after_in_child=_forget_pool_after_fork)


class BlockedSparseProduct:
    """Y = S @ P for a sparse S and a dense, many-column P: cache-blocked and multi-threaded.

    scipy multiplies a CSR matrix by a dense [N, Q] array row by row, reading for every
    non-zero S[i, j] the whole row P[j] (Q values) at a random place. Once P outgrows the CPU
    cache (N = 100 000, Q = 70: 56 MB) each of those reads misses and the product becomes
    slower than Q separate matrix-vector products. Splitting S into column blocks whose slice of
    P fits in `cache_bytes` keeps those reads in cache, while S is still read once per product
    for all columns; each block costs one more pass over Y. Rows are also split into `threads`
    ranges of equal non-zero counts, run in parallel (scipy's kernels release the GIL), each
    writing its own rows of Y.

    Args:
      matrix: sparse S `[N, M]` (made CSR).
      cache_bytes: bytes of P per column block; default by P's size (see `_SMALL_P`).
      threads: row ranges run in parallel; default `num_threads()`.
    """

    _MIN_WORK = 1 << 21  # multiply-adds per row range (tuned on 2 and 16 cores)
    # Default bytes of P per column block. A P larger than `_SMALL_P` gets slices that fit a
    # share of the last-level cache: the memory reads they save outweigh the extra passes over
    # Y. A smaller P, in the last-level cache anyway, gets slices that fit a core's L2, and the
    # extra passes over Y stay in the last-level cache. (Measured on 2 cores, Q = 70, two
    # threads / one: N = 6 400 2.2 / 4.3 ms against 2.7 / 5.1 with 6 MiB blocks; N = 12 800
    # 5.2 / 9.9 against 6.0 / 11.1; but N = 25 000 11.7 / 33 against 11.7 / 24, and
    # N = 100 000 155 ms against 49 on two threads.)
    _LLC_BLOCK = 6 << 20
    _L2_BLOCK = 1 << 20
    _SMALL_P = 8 << 20

    def __init__(
        self, matrix: sp.spmatrix, cache_bytes: int | None = None, threads: int | None = None
    ):
        self.matrix = sp.csr_matrix(matrix)
        self.cache_bytes = None if cache_bytes is None else int(cache_bytes)
        self.threads = max(1, int(threads if threads is not None else num_threads()))
        self._parts: list[tuple[int, int, list[tuple[int, int, sp.csr_matrix]]]] | None = None

    def _block_bytes(self, q: int) -> int:
        if self.cache_bytes is not None:
            return self.cache_bytes
        small = 8 * self.matrix.shape[1] * q <= self._SMALL_P
        return self._L2_BLOCK if small else self._LLC_BLOCK

    def _split(self, block_cols: int, q: int) -> list:
        n_rows, n_cols = self.matrix.shape
        indptr = self.matrix.indptr
        # Row ranges with about the same number of non-zeros each, at least _MIN_WORK
        # multiply-adds per range: smaller ones cost more in scheduling and GIL hand-offs
        # than they save.
        count = max(1, min(self.threads, self.matrix.nnz * q // self._MIN_WORK))
        targets = np.linspace(0, indptr[-1], count + 1)[1:-1]
        bounds = np.unique(np.concatenate([[0], np.searchsorted(indptr, targets), [n_rows]]))
        parts = []
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
            rows = self.matrix[r0:r1]
            blocks = [
                (c0, min(n_cols, c0 + block_cols), rows[:, c0 : c0 + block_cols].tocsr())
                for c0 in range(0, n_cols, block_cols)
            ]
            parts.append((int(r0), int(r1), blocks))
        return parts

    def __call__(
        self,
        p: np.ndarray,
        out: np.ndarray | None = None,
        *,
        scale: float = 1.0,
        shift: float = 0.0,
        col_dots: bool = False,
    ):
        """(shift I + scale S) p for p `[N, q]`, the terms added row range by row range.

        Args:
          p: float `[N, q]`.
          out: C-contiguous float64 `[N, q]` to write into (must not be p); default a new one.
          scale: factor of S p.
          shift: factor of p (1 with scale = -alpha gives the diffusion operator I - alpha S).
          col_dots: also return the column dot products of p and the result (CG's p'Mp),
            summed while each range of rows is in cache.

        Returns:
          `out`, float64 `[N, q]`; with col_dots, `(out, dots)` with dots float64 `[q]`.
        """
        p = np.ascontiguousarray(p, dtype=np.float64)
        n_rows, n_cols = self.matrix.shape
        q = p.shape[1]
        if out is None:
            out = np.empty((n_rows, q))
        elif out.shape != (n_rows, q) or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous float64 array of shape {(n_rows, q)}, got "
                f"{out.dtype} {out.shape}"
            )
        if q <= 1 or self.matrix.nnz * q < 1 << 16:
            np.copyto(out, self.matrix @ p)  # too small for blocking or threads to pay
            _affine(out, p, scale, shift)
            return (out, _col_dot(p, out)) if col_dots else out
        if self._parts is None:
            # Built once, for the widest P (the first call); narrower P only fit better.
            self._parts = self._split(max(1024, self._block_bytes(q) // (8 * q)), q)

        def run(part) -> np.ndarray | None:
            r0, r1, blocks = part
            rows = out[r0:r1]
            rows[...] = 0.0
            for c0, c1, block in blocks:
                pb = p[c0:c1]
                if _csr_matvecs is not None:
                    # Adds into `rows` in place: no [rows, Q] temporary per block.
                    _csr_matvecs(
                        r1 - r0, c1 - c0, q, block.indptr, block.indices, block.data,
                        pb.ravel(), rows.ravel(),
                    )  # fmt: skip
                else:
                    rows += block @ pb
            if scale == 1.0 and shift == 0.0 and not col_dots:
                return None
            dots = np.zeros(q) if col_dots else None
            for c in _row_chunks(slice(r0, r1), q):  # both steps while a chunk is in cache
                _affine(out[c], p[c], scale, shift)
                if col_dots:
                    dots += _col_dot(p[c], out[c])
            return dots

        if len(self._parts) == 1:
            dots = [run(self._parts[0])]
        else:
            dots = list(_thread_pool().map(run, self._parts))
        return (out, sum(dots[1:], dots[0])) if col_dots else out


def _affine(sp_rows: np.ndarray, p_rows: np.ndarray, scale: float, shift: float) -> None:
    """sp_rows <- shift p_rows + scale sp_rows, in place."""
    if scale != 1.0:
        sp_rows *= scale
    if shift != 0.0:
        if shift == 1.0:
            sp_rows += p_rows
        else:
            sp_rows += shift * p_rows


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


def _check_alpha(alpha: float) -> None:
    # alpha < 1 keeps I - alpha S positive definite (S's eigenvalues lie in [-1, 1]).
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


def _sim_weights(sims: np.ndarray, gamma: float) -> np.ndarray:
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
    weights = _sim_weights(np.asarray(sims).ravel(), gamma)
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


def _neighbors64(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    index: search.SearchIndex | None = None,
    block_size: int = 65536,
    backend: str = "exact",
    refine: int = _REFINE,
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
    refine: int = _REFINE,
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
    sims, ids = _neighbors64(database, database, k, index=index, refine=refine)
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


def query_vectors(
    queries: np.ndarray,
    database: np.ndarray,
    kq: int = 10,
    gamma: float = 3.0,
    *,
    block_size: int = 65536,
    backend: str = "exact",
    index: search.SearchIndex | None = None,
    refine: int = _REFINE,
) -> np.ndarray:
    """Diffusion right-hand sides y: the kq most similar database items get max(s, 0)^gamma.

    Args:
      queries: float `[Q, D]` (validated by the caller).
      database: float `[N, D]`.
      kq: items per query (clipped to N).
      gamma: similarity exponent.
      block_size, backend: search settings (ignored when `index` is given).
      index: a prepared `search.SearchIndex` over `database`.
      refine: extra candidates re-scored in float64.

    Returns:
      float64 `[N, Q]` (column q is query q's y; N-major, the layout the solver uses).
    """
    n = database.shape[0]
    y = np.zeros((n, queries.shape[0]))
    if queries.shape[0] == 0:
        return y
    sims, ids = _neighbors64(
        queries, database, kq, index=index, block_size=block_size, backend=backend, refine=refine
    )
    cols = np.broadcast_to(np.arange(queries.shape[0])[:, None], ids.shape)
    y[ids.ravel(), cols.ravel()] = _sim_weights(sims.ravel(), gamma)
    return y


def _prepare(queries, database, block_size):
    database = search.validate_descriptors(database, "database", block_size=block_size)
    if database.shape[0] == 0:
        raise ValueError("database is empty: nothing to re-rank")
    queries = search.validate_descriptors(queries, "queries", dim=database.shape[1])
    return queries, database


def config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`diffusion_scores` keyword arguments from a config's `rerank.diffusion` block.

    Args:
      cfg: mapping with k, kq, gamma, alpha, max_iter, tol and optionally truncate (0 = off).

    Returns:
      {'k', 'kq', 'gamma', 'alpha', 'max_iter', 'tol', 'truncate' (int or None)}.
    """
    return {
        "k": int(cfg["k"]),
        "kq": int(cfg["kq"]),
        "gamma": float(cfg["gamma"]),
        "alpha": float(cfg["alpha"]),
        "max_iter": int(cfg["max_iter"]),
        "tol": float(cfg["tol"]),
        "truncate": int(cfg.get("truncate") or 0) or None,
    }


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
    block_size: int = 65536,
    backend: str = "exact",
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

    Returns:
      float64 `[Q, N]` scores, and the `CGInfo` when `return_info`.

    Raises:
      ValueError: invalid descriptors (rows named), dimension mismatch, empty database, bad
        parameters.
    """
    _check_alpha(alpha)
    queries, database = _prepare(queries, database, block_size)
    if truncate is not None:
        top_scores, top_ids, info = truncated_diffusion(
            queries, database, truncate, k=k, kq=kq, gamma=gamma, alpha=alpha,
            max_iter=max_iter, tol=tol, affinity=affinity, block_size=block_size,
            backend=backend, validate=False,
        )  # fmt: skip
        scores = _dense_with_fill(queries, database, top_scores, top_ids, block_size)
        return (scores, info) if return_info else scores

    index = search.SearchIndex(database, backend=backend, block_size=block_size, validate=False)
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
    out = np.empty((n_q, n))
    if n_q == 0:
        return out
    plain = search.inner_products(queries, database, block_size=block_size)
    for q in range(n_q):
        valid = top_ids[q] >= 0
        ids, sc = top_ids[q][valid], top_scores[q][valid]
        lo = sc.min() if sc.size else 0.0
        row = plain[q].astype(np.float64)
        scale = np.abs(row).max()
        out[q] = lo - 2.0 + row / (scale if scale > 0 else 1.0)
        out[q, ids] = sc
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
    block_size: int = 65536,
    backend: str = "exact",
    index: search.SearchIndex | None = None,
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
      index: a prepared `search.SearchIndex` over the database (reused across calls).
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
        index = search.SearchIndex(database, backend=backend, block_size=block_size, validate=False)
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
            sub_index = search.SearchIndex(xs, block_size=block_size, validate=False)
            sims, ids = _neighbors64(xs, xs, k, index=sub_index)
            a = mutual_knn_affinity(sims, ids, gamma, num_nodes=n)
        else:
            a = affinity[sub][:, sub]
        transitions.append(normalize_affinity(a))
        # y in float64 as the full mode; candidates are in plain (float32) order, so a stable
        # sort on the float64 similarities breaks remaining ties by that order.
        s64 = xs.astype(np.float64) @ np.asarray(queries[q], np.float64)
        first = np.argsort(-s64, kind="stable")[:kq]
        y[first, q] = _sim_weights(s64[first], gamma)
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


class OfflineDiffusion:
    """Diffusion with the solving done once, offline; a new query is then one sparse product.

    Since (I - alpha S) f = y is linear and y is sparse (kq items), f = sum_j y_j F[:, j] with
    F[:, j] = (I - alpha S)^-1 e_j, the diffusion vector of database item j. The constructor
    computes every F[:, j] with the same vectorised CG (column batches of `batch_size`) and keeps
    its `keep` largest entries (the "offline diffusion" of Yang et al., AAAI 2019). Querying
    costs a kq-NN search plus a sparse [N, N] x [N, Q] product with kq non-zeros per column.

    Precomputed and held: F, a float64 CSC `[N, N]` with at most N * keep non-zeros
    (12 bytes each: about N * keep * 12 bytes, e.g. 15 MB for N = 6 400, keep = 200), and a
    reference to the database for the query search. Precomputation costs N CG solves,
    O(N * max_iter * nnz(A)): for collections up to ~10^5 items; beyond, use truncation.

    With keep = N and a tight tolerance the scores equal `diffusion_scores` (up to the solver's
    accuracy); truncation drops the far tails, which only reorders the bottom of the list.
    Items no precomputed vector reaches rank below all reached ones, in plain order (as in
    truncated mode).

    Attributes:
      vectors: the CSC matrix F.
      info: `CGInfo` of the N offline solves.
      memory_bytes: bytes held by F.
    """

    def __init__(
        self,
        database: np.ndarray,
        *,
        k: int = 50,
        kq: int = 10,
        gamma: float = 3.0,
        alpha: float = 0.99,
        max_iter: int = 20,
        tol: float = 1e-6,
        keep: int = 200,
        batch_size: int = 256,
        affinity: sp.spmatrix | None = None,
        block_size: int = 65536,
        backend: str = "exact",
    ):
        _check_alpha(alpha)
        database = search.validate_descriptors(database, "database", block_size=block_size)
        if database.shape[0] == 0:
            raise ValueError("database is empty: nothing to precompute")
        if keep < 1 or batch_size < 1:
            raise ValueError(f"keep and batch_size must be >= 1, got {keep}, {batch_size}")
        self.database = database
        self.kq, self.gamma = kq, gamma
        self.block_size = block_size
        self.index = search.SearchIndex(
            database, backend=backend, block_size=block_size, validate=False
        )
        n = database.shape[0]
        if affinity is None:
            affinity = knn_affinity(
                database, k, gamma, block_size=block_size, backend=backend, validate=False
            )
        _check_affinity(affinity, n)
        operator = diffusion_operator(normalize_affinity(affinity), alpha)
        keep = min(int(keep), n)
        data, indices, infos = [], [], []
        for start in range(0, n, batch_size):
            cols = np.arange(start, min(n, start + batch_size))
            e = np.zeros((n, cols.size))
            e[cols, np.arange(cols.size)] = 1.0
            f, info = conjugate_gradient(operator, e, max_iter=max_iter, tol=tol)
            infos.append(info)
            top = search.top_k_indices(f.T, keep)  # [batch, keep], lower id on ties
            vals = np.take_along_axis(f.T, top, axis=1)
            nz = vals != 0
            indices.append(np.where(nz, top, -1))
            data.append(vals)
        idx = np.concatenate(indices)
        val = np.concatenate(data)
        counts = (idx >= 0).sum(axis=1)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        mask = idx >= 0
        self.vectors = sp.csc_matrix((val[mask], idx[mask].astype(np.int32), indptr), shape=(n, n))
        self.vectors.sort_indices()
        self.info = CGInfo.concatenate(infos)
        if not self.info.all_converged:
            _log.info("offline diffusion: %s", self.info.summary())

    @property
    def memory_bytes(self) -> int:
        f = self.vectors
        return int(f.data.nbytes + f.indices.nbytes + f.indptr.nbytes)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Diffusion scores `[Q, N]` float64 of new queries (one sparse product).

        Args:
          queries: float `[Q, D]` L2-normalised.

        Returns:
          float64 `[Q, N]`; items no kept vector reaches rank below the reached ones.
        """
        queries = search.validate_descriptors(queries, "queries", dim=self.database.shape[1])
        n, n_q = self.database.shape[0], queries.shape[0]
        if n_q == 0:
            return np.empty((0, n))
        sims, ids = _neighbors64(queries, self.database, self.kq, index=self.index)
        w = _sim_weights(sims, self.gamma)
        y = sp.csc_matrix(
            (w.ravel(), ids.ravel(), np.arange(0, ids.size + 1, ids.shape[1])), shape=(n, n_q)
        )
        f = (self.vectors @ y).tocsc()
        f.sort_indices()
        top_ids = np.full((n_q, n), -1, np.int64)
        top_scores = np.zeros((n_q, n))
        for q in range(n_q):
            lo, hi = f.indptr[q], f.indptr[q + 1]
            nz = f.data[lo:hi] != 0
            m = int(nz.sum())
            top_ids[q, :m] = f.indices[lo:hi][nz]
            top_scores[q, :m] = f.data[lo:hi][nz]
        return _dense_with_fill(queries, self.database, top_scores, top_ids, self.block_size)
