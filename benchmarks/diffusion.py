"""Time and memory of diffusion re-ranking: graph building, solving, and the per-query baseline.

For random L2-normalised descriptors (512-D by default) and 70 queries, for each size N:
- full diffusion (N <= --full-max): time and peak memory of building the mutual kNN graph and
  of the vectorised CG solve of all queries at once; then the same graph solved with one
  `scipy.sparse.linalg.cg` call per query, at the reference setting (20 iterations, rtol 1e-6)
  and to convergence (rtol 1e-10), printing the speed ratio and the largest score difference
  (at the reference setting scipy returns its last iterate where ours, like Matlab's pcg,
  returns the smallest-residual one, so the converged comparison is the one that must agree),
  and how the vectorised solve's time splits between the sparse products and the vector
  updates: the per-query time over the products' time bounds the speed-up any faster update
  code could reach;
- truncated diffusion (every N): time and peak memory of the top-n search (the only step that
  grows with N) and of the per-query sub-graphs and solve (which must not).

    python benchmarks/diffusion.py                           # N = 6 400, 100 000, 1 000 000
    python benchmarks/diffusion.py --sizes 6400              # quick
    python benchmarks/diffusion.py --sizes 6400 20000 --full-max 6400   # 1M code path, small

Data is generated chunk by chunk in float32 (2 GiB at N = 1 000 000 x 512; pass --memmap DIR to
keep it on disk). Peak memory is measured with tracemalloc (numpy and scipy allocations) per
phase; the process's peak RSS is printed at the end. The two solvers' times are the best of
--repeats interleaved runs with tracemalloc paused, each also printing its time in the kernel:
the vectorised solve pages in its fresh [N, Q] arrays, which on some VMs costs much more after
the long baseline run than in back-to-back runs (as in the products / updates split). The
vectorised solve uses all CPUs (CBIR_NUM_THREADS=1 gives the one-thread figure); scipy's
per-query loop uses one.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _data import random_unit  # noqa: E402

from cbir_tf.rerank import cg, graph  # noqa: E402
from cbir_tf.rerank import diffusion as dfu  # noqa: E402
from cbir_tf.search.index import SearchIndex  # noqa: E402


class Phase:
    """Context manager timing a block and recording its tracemalloc peak (MiB).

    With trace=False, tracing is paused for the block (it slows every allocation, and threads
    contend for its lock): the time is clean and no peak is recorded.
    """

    def __init__(self, name: str, trace: bool = True):
        self.name = name
        self.trace = trace
        self.seconds = 0.0
        self.peak_mib = 0.0

    def __enter__(self):
        if self.trace:
            tracemalloc.reset_peak()
            self._base = tracemalloc.get_traced_memory()[0]
        else:
            tracemalloc.stop()
        self._t0 = time.perf_counter()
        self._sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        if self.trace:
            self.peak_mib = (tracemalloc.get_traced_memory()[1] - self._base) / 2**20
            peak = f"peak +{self.peak_mib:9.1f} MiB"
        else:
            tracemalloc.start()
            # Time in the kernel, summed over threads: mostly paging in fresh memory.
            sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - self._sys0
            peak = f"(untraced; {sys_s:.2f} s in the kernel)"
        print(f"  {self.name:<44s} {self.seconds:9.2f} s  {peak}")
        return False


def scipy_per_query(m: sp.csr_matrix, y: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The baseline: one scipy CG call per query (column of y)."""
    out = np.empty((y.shape[1], y.shape[0]))
    for q in range(y.shape[1]):
        out[q], _ = spla.cg(m, y[:, q], rtol=tol, maxiter=max_iter)
    return out


class TimedOperator:
    """Forwards to a `writes_out` operator, adding up the time and count of its products."""

    writes_out = True

    def __init__(self, op):
        self.op = op
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, p, cols=None, out=None, col_dots=False):
        t0 = time.perf_counter()
        result = self.op(p, cols, out=out, col_dots=col_dots)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return result


def split_solve(op, y, max_iter, tol, repeats) -> tuple[float, float, int]:
    """(products, everything else) seconds of the vectorised solve, best of back-to-back
    repeats, and the number of products: what no tuning of the vector updates can go below."""
    best = None
    tracemalloc.stop()  # (as in untraced Phases)
    for _ in range(repeats):
        timed = TimedOperator(op)
        t0 = time.perf_counter()
        cg.conjugate_gradient(timed, y, max_iter=max_iter, tol=tol)
        total = time.perf_counter() - t0
        if best is None or total < sum(best[:2]):
            best = (timed.seconds, total - timed.seconds, timed.calls)
    tracemalloc.start()
    return best


def run_full(x, queries, args) -> None:
    with Phase("graph: kNN search + mutual affinity") as g:
        affinity = graph.knn_affinity(x, args.k, args.gamma, validate=False)
    with Phase("normalise S, query vectors y"):
        s = graph.normalize_affinity(affinity)
        y = dfu.query_vectors(queries, x, args.kq, args.gamma)
    print(f"  graph: {affinity.nnz} edges ({affinity.nnz / x.shape[0]:.1f} per node), "
          f"{int((np.diff(affinity.indptr) == 0).sum())} isolated nodes")  # fmt: skip
    op = dfu.diffusion_operator(s, args.alpha)
    m = (sp.identity(x.shape[0], format="csr") - args.alpha * s).tocsr()
    for label, max_iter, tol in (
        ("reference setting", args.max_iter, args.tol),
        ("to convergence", 1000, 1e-10),
    ):
        # Peak memory from one traced run each; times from interleaved untraced repeats, best
        # of each (the first vectorised run also splits S into cache blocks, once per graph).
        with Phase(f"memory {label}: vectorised CG"):
            cg.conjugate_gradient(op, y, max_iter=max_iter, tol=tol)
        with Phase(f"memory {label}: scipy cg per query"):
            scipy_per_query(m, y, max_iter, tol)
        ours, base = [], []
        for _ in range(args.repeats):
            with Phase(f"solve {label}: vectorised CG, {y.shape[1]} queries", trace=False) as v:
                f, info = cg.conjugate_gradient(op, y, max_iter=max_iter, tol=tol)
            with Phase(f"solve {label}: scipy cg per query", trace=False) as b:
                ref = scipy_per_query(m, y, max_iter, tol)
            ours.append(v.seconds)
            base.append(b.seconds)
        diff = np.abs(f.T - ref).max() / np.abs(ref).max()
        print(f"  -> {label}: best of {args.repeats}: vectorised {min(ours):.3f} s, per query "
              f"{min(base):.3f} s: speed-up {min(base) / min(ours):.1f}x (goal >= 5x), "
              f"max |score diff| / max |score| = {diff:.2e}; "
              f"{info.summary()}")  # fmt: skip
        tprod, trest, calls = split_solve(op, y, max_iter, tol, args.repeats)
        print(f"     vectorised solve: {calls} products {tprod:.3f} s, the rest (vector "
              f"updates) {trest:.3f} s; the products alone bound the speed-up at "
              f"{min(base) / tprod:.1f}x")  # fmt: skip
    print(f"  graph build {g.seconds:.2f} s")


def run_truncated(x, queries, args) -> None:
    index = SearchIndex(x, validate=False)
    with Phase(f"truncated: top-{args.truncate} search over N") as s:
        index.search(queries, min(args.truncate, x.shape[0]), validate=False)
    with Phase(f"truncated: search + sub-graphs + solve (n={args.truncate})") as t:
        _, _, info = dfu.truncated_diffusion(
            queries, x, args.truncate, k=args.k, kq=args.kq, gamma=args.gamma,
            alpha=args.alpha, max_iter=args.max_iter, tol=args.tol, index=index,
            validate=False,
        )  # fmt: skip
    print(f"  -> beyond the search: {t.seconds - s.seconds:.2f} s for {queries.shape[0]} "
          f"queries (independent of N); {info.summary()}")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6400, 100_000, 1_000_000])
    parser.add_argument("--full-max", type=int, default=100_000,
                        help="largest N given full (non-truncated) diffusion")  # fmt: skip
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--kq", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--truncate", type=int, default=1000)
    parser.add_argument("--memmap", type=str, default=None, help="folder for on-disk data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per method")
    args = parser.parse_args(argv)

    tracemalloc.start()
    print(f"diffusion benchmark: D={args.dim}, Q={args.queries}, k={args.k}, kq={args.kq}, "
          f"gamma={args.gamma}, alpha={args.alpha}, CG {args.max_iter} it / tol {args.tol}, "
          f"{os.cpu_count()} CPUs, {cg.num_threads()} threads")  # fmt: skip
    queries = random_unit(args.queries, args.dim, args.seed + 1)
    for n in args.sizes:
        print(f"\nN = {n}")
        with Phase("generate data (chunked, float32)"):
            if args.memmap:
                path = pathlib.Path(args.memmap) / f"diffusion_bench_{n}x{args.dim}.npy"
                x = np.lib.format.open_memmap(path, "w+", np.float32, (n, args.dim))
                random_unit(n, args.dim, args.seed, out=x)
            else:
                x = random_unit(n, args.dim, args.seed)
        if n <= args.full_max:
            run_full(x, queries, args)
        run_truncated(x, queries, args)
        del x
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
