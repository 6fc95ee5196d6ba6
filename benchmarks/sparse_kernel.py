"""Diffusion's sparse product with scipy's private `csr_matvecs` kernel against the public `@`.

`cbir_tf.rerank.product.BlockedSparseProduct` adds each column block's product into its output
with scipy's private kernel; without it (the fallback) each block makes a temporary and adds
it. This times one product (I - alpha S) P, P of 70 columns, both ways, interleaved, best of
--repeats, on the diffusion graph of random 512-D descriptors.

    python benchmarks/sparse_kernel.py --sizes 6400 25000
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _data import random_unit  # noqa: E402

from cbir_tf.rerank import cg, graph, product  # noqa: E402


def time_product(s, p, kernel, calls: int) -> float:
    """Seconds per product with `kernel` as the module's kernel (None: the public product)."""
    saved = product._csr_matvecs
    product._csr_matvecs = kernel
    try:
        op = product.BlockedSparseProduct(s)
        out = np.empty_like(p)
        op(p, out=out, scale=-0.99, shift=1.0)  # splits S into blocks once
        t0 = time.perf_counter()
        for _ in range(calls):
            op(p, out=out, scale=-0.99, shift=1.0)
        return (time.perf_counter() - t0) / calls
    finally:
        product._csr_matvecs = saved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6400, 25000])
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="products per timing")
    args = parser.parse_args(argv)
    if product._csr_matvecs is None:
        sys.exit("this scipy has no scipy.sparse._sparsetools.csr_matvecs: nothing to compare")
    print(f"{cg.num_threads()} threads, Q = {args.queries}, best of {args.repeats}")
    for n in args.sizes:
        x = random_unit(n, 512, 0)
        s = graph.normalize_affinity(graph.knn_affinity(x, 50, 3.0, validate=False))
        p = np.random.default_rng(1).standard_normal((n, args.queries))
        private, public = [], []
        for _ in range(args.repeats):
            private.append(time_product(s, p, product._csr_matvecs, args.calls))
            public.append(time_product(s, p, None, args.calls))
        print(f"N = {n}: private kernel {min(private) * 1e3:.2f} ms, public product "
              f"{min(public) * 1e3:.2f} ms per product: public / private "
              f"{min(public) / min(private):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
