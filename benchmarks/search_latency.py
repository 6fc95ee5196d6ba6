"""Query latency of search over a large descriptor collection (1 000 000 x 512 by default).

Builds a random L2-normalised float32 database chunk by chunk (in memory, or as a memory-mapped
.npy with --memmap DIR), prepares it once (`SearchIndex`: validation; faiss: index build), then
times single queries (the latency a user waits for) and a batch of queries (throughput):
- exact blocked search (`cbir_tf.search.exact`, the default backend, numpy only);
- faiss indexes when faiss is installed (the `[faiss]` extra): 'Flat' (exact) and, by default,
  'IVF1024,Flat' (approximate, nprobe 16), with recall@k against the exact result.

    python benchmarks/search_latency.py                       # 1M x 512, k = 10
    python benchmarks/search_latency.py --n 200000 --faiss Flat HNSW32
    python benchmarks/search_latency.py --memmap /tmp/bench   # search a memory-mapped store

Queries are database rows plus noise, so each has a true nearest neighbour (checked).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _data import random_unit  # noqa: E402

from cbir_tf.search.ann import require_faiss  # noqa: E402
from cbir_tf.search.index import SearchIndex  # noqa: E402


def time_queries(index: SearchIndex, queries: np.ndarray, k: int, label: str):
    """Prints single-query latency (median, 90th percentile) and batch time per query."""
    index.search(queries[:1], k)  # warm-up (page cache, BLAS threads)
    single = []
    for i in range(queries.shape[0]):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k)
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    scores, ids = index.search(queries, k)
    batch = time.perf_counter() - t0
    single = np.asarray(single) * 1e3
    print(
        f"  {label:<28s} single query: median {np.median(single):7.1f} ms, "
        f"p90 {np.percentile(single, 90):7.1f} ms | batch of {queries.shape[0]}: "
        f"{batch * 1e3 / queries.shape[0]:6.1f} ms/query"
    )
    return ids


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=65536)
    parser.add_argument("--faiss", nargs="*", default=["Flat", "IVF1024,Flat"],
                        help="faiss index-factory strings to time (none: skip faiss)")  # fmt: skip
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--memmap", type=str, default=None, help="folder for an on-disk database")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"search latency: N={args.n}, D={args.dim}, k={args.k}, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    if args.memmap:
        path = pathlib.Path(args.memmap) / f"search_bench_{args.n}x{args.dim}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        db = np.lib.format.open_memmap(path, "w+", np.float32, (args.n, args.dim))
        random_unit(args.n, args.dim, args.seed, out=db)
        db.flush()
        db = np.load(path, mmap_mode="r")
    else:
        db = random_unit(args.n, args.dim, args.seed)
    print(f"  generated database ({db.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed + 1)
    truth = rng.choice(args.n, args.queries, replace=False)
    queries = np.asarray(db[truth]) + 0.05 * random_unit(args.queries, args.dim, args.seed + 2)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    t0 = time.perf_counter()
    exact = SearchIndex(db, block_size=args.block_size)
    print(f"  exact: validated database in {time.perf_counter() - t0:.1f} s (once per index)")
    exact_ids = time_queries(exact, queries, args.k, "exact (blocked numpy)")
    found = np.mean(exact_ids[:, 0] == truth)
    print(f"  exact: true neighbour ranked first for {found:.0%} of queries")

    if args.faiss:
        try:
            require_faiss()
        except ImportError as err:
            print(f"  faiss: skipped ({err})")
            return
        for factory in args.faiss:
            t0 = time.perf_counter()
            index = SearchIndex(
                db, backend="faiss", faiss_factory=factory, nprobe=args.nprobe,
                ef_search=args.ef_search, block_size=args.block_size, validate=False,
            )  # fmt: skip
            print(f"  faiss {factory}: built in {time.perf_counter() - t0:.1f} s")
            ids = time_queries(index, queries, args.k, f"faiss {factory}")
            recall = np.mean(
                [len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids, strict=True)]
            )
            print(
                f"  faiss {factory}: recall@{args.k} vs exact {recall:.3f}, true neighbour "
                f"first for {np.mean(ids[:, 0] == truth):.0%} of queries (random data is the "
                "hardest case for approximate indexes: its other neighbours are barely closer "
                "than the rest)"
            )
            del index


if __name__ == "__main__":
    main()
