"""Block conjugate gradient: many independent CG recurrences sharing each product, threaded.

`conjugate_gradient` solves M x = b for every column of b at once (one recurrence per column,
all columns sharing each product with M), following Matlab's `pcg` from a zero start, as the
diffusion reference (Iscen et al., CVPR 2017) does per query. The vector updates run over row
ranges of the `[N, Q]` arrays in a shared thread pool (`num_threads`, $CBIR_NUM_THREADS; numpy
releases the GIL in its loops), chunk by chunk so that each chunk's updates stay in cache, and
the loop allocates no `[N, Q]` array per iteration. Measurements behind this design:
benchmarks/results/diffusion_design.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "CGInfo",
    "Operator",
    "column_dots",
    "conjugate_gradient",
    "num_threads",
    "row_chunks",
    "thread_pool",
]

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


def column_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
    return column_dots(a[s], b[s])


def _next_direction(w: _CGWork, beta: np.ndarray, s: slice) -> None:
    """Rows s: p <- r + beta p."""
    p = w.p[s]
    p *= beta
    p += w.r[s]


# Row chunks of the CG updates: the updates of a chunk run one after the other while it is
# still in cache, and their temporaries stay one chunk big (reused by the allocator instead of
# fresh [N, Q] arrays, whose page faults are costly).
_CHUNK_BYTES = 1 << 19


def row_chunks(s: slice, width: int) -> list[slice]:
    """Splits the row range s into chunks of about `_CHUNK_BYTES` per `[rows, width]` array."""
    size = max(1, _CHUNK_BYTES // (8 * max(1, width)))
    return [slice(a, min(a + size, s.stop)) for a in range(s.start, s.stop, size)]


def _step_residual(w: _CGWork, step: np.ndarray, s: slice) -> np.ndarray:
    """Rows s: r <- r - step q; returns their partial r'r."""
    rr = np.zeros(w.width)
    for c in row_chunks(s, w.width):
        r = w.r[c]
        r -= w.q[c] * step
        rr += column_dots(r, r)
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
        return list(thread_pool().map(fn, self.slices))

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
        self.rho = column_dots(self.r, self.r)
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
    `diffusion.DiffusionOperator` does). Unlike `pcg`, there is no stagnation test (it only
    matters for tolerances near eps).

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
    b, vector = _as_columns(b)
    out = _Solution(b, tol, max_iter)
    act = np.flatnonzero(~out.converged)  # x = 0 already satisfies the others
    # The vector updates run over row ranges in parallel, like the sparse product.
    rows = _RowRanges(b.shape[0], act.size)
    # (b itself when every column is active: no copy; fancy indexing would give one.)
    whole = act.size == b.shape[1]
    w = _CGWork(np.ascontiguousarray(b if whole else b[:, act]), act, out.tolb[act], rows)
    p_ready = True  # p holds this iteration's search direction
    for it in range(1, max_iter + 1):
        if not w.live.any():
            break
        ok, bad, res, p_ready = _iterate(matvec, w, rows, it, p_ready)
        conv = ok & (res <= w.tolb)
        out.converge(w, conv, res, it)
        if bad.any():
            # x did not move (step 0): the best of iterates 0 .. it - 1 goes out.
            _finish_unconverged(matvec, w, bad, it - 1, out)
            out.breakdown[w.cols[bad]] = True
        if conv.any() or bad.any():
            w.park(conv | bad)
    if w.live.any():
        _finish_unconverged(matvec, w, w.live, max_iter, out)
    return (out.x[:, 0] if vector else out.x), out.info()


def _as_columns(b: np.ndarray) -> tuple[np.ndarray, bool]:
    """b as float64 `[N, Q]`, and whether it was one vector `[N]`."""
    b = np.asarray(b, dtype=np.float64)
    vector = b.ndim == 1
    if vector:
        b = b[:, None]
    if b.ndim != 2:
        raise ValueError(f"b must be [N] or [N, Q], got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("b holds NaN or Inf values")
    return b, vector


class _Solution:
    """The solver's outputs, per column of b, filled in as columns finish."""

    def __init__(self, b: np.ndarray, tol: float, max_iter: int):
        n, m = b.shape
        self.x = np.zeros((n, m))  # (calloc'd: its pages cost nothing until columns are written)
        self.iterations = np.zeros(m, np.int64)
        self.residuals = np.zeros(m)
        self.converged = np.zeros(m, bool)
        self.breakdown = np.zeros(m, bool)
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.n2b = np.linalg.norm(b, axis=0)
        self.tolb = tol * self.n2b
        # x = 0 already satisfies columns with b = 0 (and every column when tol >= 1).
        done0 = self.n2b <= self.tolb
        self.converged[done0] = True
        self.residuals[done0 & (self.n2b > 0)] = 1.0

    def converge(self, w: _CGWork, conv: np.ndarray, res: np.ndarray, it: int) -> None:
        """Records the working columns `conv` (bool) as converged at iteration `it`."""
        if not conv.any():
            return
        cols = w.cols[conv]
        if cols.size == self.x.shape[1]:
            # Every column at once, as is usual (w.x then holds them all, in order): x is
            # the output, with no copy (self.x, never written, was never paged in).
            self.x = w.x
        else:
            self.x[:, cols] = w.x[:, conv]
        self.iterations[cols] = it
        self.residuals[cols] = res[conv] / self.n2b[cols]
        self.converged[cols] = True

    def info(self) -> CGInfo:
        return CGInfo(self.iterations, self.residuals, self.converged, self.breakdown,
                      self.max_iter, self.tol)  # fmt: skip


def _iterate(
    matvec: Operator, w: _CGWork, rows: _RowRanges, it: int, p_ready: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One CG iteration of every live column: (ok, bad, residual norms, p_ready)."""
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
    return ok, bad, res, p_ready


def _step_solution(
    w: _CGWork, step: np.ndarray, save: np.ndarray, beta: np.ndarray | None, s: slice
) -> None:
    """Rows s: saves x into x_min where `save`, x <- x + step p, then p <- r + beta p if given."""
    any_save = save.any()
    for c in row_chunks(s, w.width):
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
        for c in row_chunks(s, w.width):
            r = w.r[c]
            if every:
                np.subtract(w.b[c], mx[c], out=r)
                rr += column_dots(r, r)
            else:
                r_true = w.b[c][:, cand] - (mx[c][:, cand] if full else mx[c])
                r[:, cand] = r_true
                rr += column_dots(r_true, r_true)
        return rr

    return rows.sum(update)


def _finish_unconverged(
    matvec: Operator,
    w: _CGWork,
    sel: np.ndarray,
    last_it: int,
    out: _Solution,
) -> None:
    """Matlab pcg's exit for unconverged working columns `sel` (bool): xmin if its true
    residual is not larger than the last iterate's residual, else the last iterate."""
    cols = w.cols[sel]
    xm = w.best(sel)
    true_min = np.linalg.norm(w.b[:, sel] - _apply(matvec, xm, cols, None), axis=0)
    use_min = true_min <= w.res_last[sel]
    out.x[:, cols] = np.where(use_min, xm, w.x[:, sel])
    out.iterations[cols] = np.where(use_min, w.it_min[sel], last_it)
    out.residuals[cols] = np.where(use_min, true_min, w.res_last[sel]) / out.n2b[cols]


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


def thread_pool() -> ThreadPoolExecutor:
    """One pool shared by the sparse products and the CG updates, of `num_threads()` workers."""
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
