"""The saved approximate index (`cbir_tf.search.ann`) and the approximate diffusion graph, measured.

On a synthetic collection shaped like real descriptors (unit vectors in many small clusters,
~20 rows each, plus noise of a spread that varies per cluster; cluster centres grouped around
~N/1000 group centres from an anisotropic distribution; not uniform noise), written chunk by
chunk to a memory-mapped .npy as a store is:

    python benchmarks/ann.py --n 1000000 --dim 512 --out=benchmarks/results/ann_1m_2cores.json
    python benchmarks/ann.py --mode graph --n 100000 --out=benchmarks/results/ann_graph_100k.json

Index mode prints and writes: build_seconds, bytes_per_vector (the faiss index's bytes per row,
what it keeps in memory; the memory-mapped descriptors are not counted), recall_at_10 (against
exact search, same queries: fresh points of the collection's clusters), qps (all queries in one
batch, all cores), latency_ms (median of single queries), exact_qps (exact blocked search, same
queries), the kind and factory chosen, and the machine's load (`uptime`) before and after.

Graph mode: approximate kNN graph build time and peak RSS; with --exact (sizes up to ~200k):
edge agreement with the exact mutual kNN graph and the top-100 agreement of full diffusion on
the two graphs for --queries queries (default 50 in this mode).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir_tf.rerank import diffusion, graph  # noqa: E402
from cbir_tf.search import ann  # noqa: E402
from cbir_tf.search import exact as search  # noqa: E402


def uptime_load() -> str:
    with open("/proc/loadavg", encoding="utf-8") as f:
        return " ".join(f.read().split()[:3])


def clustered(
    n: int,
    dim: int,
    seed: int,
    out: np.ndarray | None = None,
    chunk: int = 65536,
    clusters_of: int | None = None,
    isotropic: float = 0.0,
):
    """Unit vectors in clusters of ~20 (Poisson sizes; noise of a spread that varies per cluster).

    `isotropic` > 0 makes the hard collection: that share of the rows (drawn with a generator of
    their own, so the other rows are those of the clustered collection) is replaced by
    isotropic random unit vectors, a stand-in for the odd photos every real collection has,
    whose neighbours are near-ties that no coarse list predicts.

    Returns:
      float32 `[n, dim]` and bool `[n]`, True for the isotropic rows.
    """
    rng = np.random.default_rng(seed)
    loner_rng = np.random.default_rng([seed, 29])
    loners = np.zeros(n, bool)
    size = n if clusters_of is None else clusters_of  # the clusters of a collection of this size
    n_clusters = max(1, size // 20)
    scale = (1.0 / np.sqrt(1.0 + np.arange(dim))).astype(np.float32) ** 0.5
    # Clusters of clusters (near-duplicates of one object, objects of one place, ...): centres
    # spread around ~n/1000 group centres, so that a row's 50 neighbours are its cluster and
    # its group's nearest clusters, not a random draw over the sphere.
    groups = rng.standard_normal((max(1, size // 1000), dim), dtype=np.float32) * scale
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = groups[rng.integers(0, len(groups), n_clusters)] + 0.7 * rng.standard_normal(
        (n_clusters, dim), dtype=np.float32
    ) * scale / np.sqrt(np.mean(scale**2) * dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.2, n_clusters).astype(np.float32)
    x = np.empty((n, dim), np.float32) if out is None else out
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.integers(0, n_clusters, m)
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        block = centres[c] + spread[c, None] * noise
        if isotropic > 0:
            mask = loner_rng.random(m) < isotropic
            block[mask] = loner_rng.standard_normal((int(mask.sum()), dim), dtype=np.float32)
            loners[start : start + m] = mask
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start : start + m] = block
    return x, loners


def collection(n: int, dim: int, folder: str, isotropic: float = 0.0) -> np.ndarray:
    """The collection as a memory-mapped .npy, generated once into `folder` (chunk by chunk)."""
    hard = f"_isotropic{round(100 * isotropic)}" if isotropic else ""
    path = os.path.join(folder, f"synthetic_{n}x{dim}{hard}.npy")
    if not os.path.exists(path):
        x = np.lib.format.open_memmap(path + ".tmp.npy", "w+", np.float32, (n, dim))
        clustered(n, dim, seed=1, out=x, isotropic=isotropic)
        x.flush()
        del x
        os.replace(path + ".tmp.npy", path)
    return np.load(path, mmap_mode="r")


def queries_like(
    n_queries: int, n: int, dim: int, isotropic: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh points of the collection's clusters (and isotropic ones): `[Q, dim]`, loners `[Q]`."""
    # Same generator and cluster centres as the collection (seed 1), fresh points (later rows).
    x, loners = clustered(n + n_queries, dim, seed=1, clusters_of=n, isotropic=isotropic)
    return np.ascontiguousarray(x[n:]), loners[n:]


def ground_truth(args, database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact top-10 ids `[Q, 10]` of the queries (cached beside the collection)."""
    path = os.path.join(args.data, f"exact10_{collection_name(args)}_{len(queries)}q.npy")
    if not os.path.exists(path):
        _, ids = search.exact_knn(queries, database, 10, 65536)
        np.save(path + ".tmp.npy", ids)
        os.replace(path + ".tmp.npy", path)
    return np.load(path)


def collection_name(args) -> str:
    return f"{args.n}x{args.dim}" + (
        f"_isotropic{round(100 * args.isotropic)}" if args.isotropic else ""
    )


def recall_of(ids: np.ndarray, exact_ids: np.ndarray, rows: np.ndarray | None = None) -> float:
    pairs = zip(ids, exact_ids, strict=True)
    hits = np.array([len(set(a[:10].tolist()) & set(e.tolist())) / 10 for a, e in pairs])
    return round(float(hits.mean() if rows is None else hits[rows].mean()), 4)


def timed_batches(index, queries: np.ndarray, repeats: int = 3) -> list[dict]:
    """Batched searches of all the queries, `repeats` times: q/s with the load average beside."""
    index.search(queries[:50], 10)  # the page cache of the lists and codes, warmed
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, 10)
        runs.append({"qps": round(len(queries) / (time.perf_counter() - t0), 1),
                     "load": round(os.getloadavg()[0], 2)})  # fmt: skip
    return runs


def index_mode(args, database: np.ndarray, budget: float | None = None) -> dict:
    queries, loners = queries_like(args.queries, args.n, args.dim, args.isotropic)
    exact_ids = ground_truth(args, database, queries)
    load_before = uptime_load()
    given = {"kind": args.kind, "refine": args.refine}
    if budget is not None:
        given["bytes_per_vector"] = budget
    settings = ann.AnnSettings.from_config({k: v for k, v in given.items() if v is not None})
    t0 = time.perf_counter()
    index = ann.build(database, settings)
    build_s = time.perf_counter() - t0
    load_build = uptime_load()
    with tempfile.TemporaryDirectory() as tmp:
        ann.save(index, tmp, {})
        file_bytes = os.path.getsize(os.path.join(tmp, ann.INDEX_FILE))
        # Memory-mapped, as search.py and serve.py open it; the store is not handed over.
        index = ann.load(tmp, database, {}, mmap=True)
        assert index.database is None or index.kind == "flat"
        _, ids = index.search(queries, 10)
        runs = timed_batches(index, queries)
        single = []
        for i in range(min(200, args.queries)):
            t1 = time.perf_counter()
            index.search(queries[i : i + 1], 10)
            single.append(time.perf_counter() - t1)
    m = index.meta
    out = {
        "mode": "index", "collection": collection_name(args), "n": args.n, "dim": args.dim,
        "isotropic_share": args.isotropic, "queries": args.queries,
        "isotropic_queries": int(loners.sum()), "kind": index.kind, "factory": m.get("factory"),
        "budget_bytes_per_vector": settings.bytes_per_vector, "refine": settings.refine,
        "bytes_per_vector": {**m.get("memory", {}), "index_file": round(file_bytes / args.n, 1)},
        "build_seconds": round(build_s, 1),
        "build_parts_seconds": {key: m.get(f"{key}_seconds")
                                for key in ("train", "add", "exact", "tune")},
        "recall_at_10": recall_of(ids, exact_ids),
        "recall_at_10_clustered_queries": recall_of(ids, exact_ids, ~loners),
        "recall_at_10_isotropic_queries": (
            recall_of(ids, exact_ids, loners) if loners.any() else None),
        "tuned": {key: m.get(key) for key in (
            "nprobe", "refine", "nprobe_far", "refine_far", "far_below", "far_share", "recall",
            "recall_far", "best_recall", "cpu_ms_per_query", "target_met", "tune_queries")},
        "qps_batched": max(r["qps"] for r in runs), "qps_runs": runs,
        "latency_ms": round(1000 * float(np.median(single)), 2),
        "load_before": load_before, "load_after_build": load_build,
        "load_after": uptime_load(), "cpus": os.cpu_count(),
    }  # fmt: skip
    return out


# Runs in autofaiss's own environment (numpy < 2): builds its index of the collection under
# the same memory budget, then searches the same queries with the parameters it chose.
AUTOFAISS_RUNNER = r"""
import json, os, sys, time
import numpy as np
import faiss
from autofaiss import build_index

a = json.loads(sys.argv[1])
index_path = os.path.join(a["work"], "knn.index")
infos_path = os.path.join(a["work"], "index_infos.json")
t0 = time.perf_counter()
build_index(embeddings=a["embeddings"], index_path=index_path, index_infos_path=infos_path,
            max_index_memory_usage=f"{a['bytes']}B", current_memory_available="12G",
            metric_type="ip", nb_cores=a["cores"], verbose=30)
build_s = time.perf_counter() - t0
with open(infos_path) as f:
    infos = json.load(f)
index = faiss.read_index(index_path)
faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
q = np.load(a["queries"])
index.search(q[:50], 10)
runs = []
for _ in range(3):
    t1 = time.perf_counter()
    _, ids = index.search(q, 10)
    runs.append({"qps": round(len(q) / (time.perf_counter() - t1), 1),
                 "load": round(os.getloadavg()[0], 2)})
np.save(a["ids"], ids)
print(json.dumps({"build_seconds": round(build_s, 1), "index_key": infos["index_key"],
                  "index_param": infos["index_param"], "qps_runs": runs,
                  "index_file_bytes": os.path.getsize(index_path)}))
"""


def autofaiss_mode(args, database: np.ndarray) -> dict:
    """autofaiss on the same collection and queries, under the same total bytes per vector."""
    import subprocess

    queries, loners = queries_like(args.queries, args.n, args.dim, args.isotropic)
    exact_ids = ground_truth(args, database, queries)
    budget = float(args.budgets or ann.AnnSettings.from_config({}).bytes_per_vector)
    with tempfile.TemporaryDirectory(dir=args.data) as work:
        embeddings = os.path.join(work, "embeddings")
        os.makedirs(embeddings)
        os.symlink(os.path.abspath(database.filename), os.path.join(embeddings, "x.npy"))
        np.save(os.path.join(work, "queries.npy"), queries)
        given = {"work": work, "embeddings": embeddings, "bytes": int(budget * args.n),
                 "queries": os.path.join(work, "queries.npy"), "cores": os.cpu_count(),
                 "ids": os.path.join(work, "ids.npy")}  # fmt: skip
        load_before = uptime_load()
        # Its OpenMP threads sleep when idle, as cbir_tf's do (`ann.require_faiss`).
        proc = subprocess.run(
            [args.autofaiss_python, "-c", AUTOFAISS_RUNNER, json.dumps(given)],
            capture_output=True, text=True, check=False,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        if proc.returncode:
            raise SystemExit(f"autofaiss failed:\n{proc.stderr[-3000:]}")
        ran = json.loads(proc.stdout.strip().splitlines()[-1])
        ids = np.load(given["ids"])
    return {
        "mode": "autofaiss", "collection": collection_name(args), "n": args.n,
        "dim": args.dim, "queries": args.queries, "isotropic_queries": int(loners.sum()),
        "budget_bytes_per_vector": budget, "index_key": ran["index_key"],
        "index_param": ran["index_param"],
        "bytes_per_vector": {"index_file": round(ran["index_file_bytes"] / args.n, 1),
                             "rescoring": 0.0},
        "build_seconds": ran["build_seconds"], "recall_at_10": recall_of(ids, exact_ids),
        "recall_at_10_clustered_queries": recall_of(ids, exact_ids, ~loners),
        "recall_at_10_isotropic_queries": (
            recall_of(ids, exact_ids, loners) if loners.any() else None),
        "qps_batched": max(r["qps"] for r in ran["qps_runs"]), "qps_runs": ran["qps_runs"],
        "load_before": load_before, "load_after": uptime_load(), "cpus": os.cpu_count(),
    }  # fmt: skip


def graph_mode(args, database: np.ndarray) -> dict:
    k, gamma = 50, 3.0
    load_before = uptime_load()
    t0 = time.perf_counter()
    sims, ids = graph.approximate_knn(database, k, probes=args.probes)
    approx = graph.mutual_knn_affinity(sims, ids, gamma, num_nodes=args.n)
    del sims, ids
    build_s = time.perf_counter() - t0
    out = {
        "mode": "graph", "n": args.n, "dim": args.dim, "k": k, "probes": args.probes,
        "graph_seconds": round(build_s, 1), "edges": int(approx.nnz),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }  # fmt: skip
    if args.solve:  # full diffusion on the approximate graph, as pipeline.rerank runs it
        queries, _ = queries_like(args.queries, args.n, args.dim)
        t0 = time.perf_counter()
        _, info = diffusion.diffusion_scores(
            queries, database, affinity=approx, validate=False, return_info=True
        )
        out["diffusion_queries"] = args.queries
        out["diffusion_seconds"] = round(time.perf_counter() - t0, 1)
        out["diffusion_converged"] = f"{int(np.sum(info.converged))}/{args.queries}"
        out["diffusion_max_iter"] = int(info.max_iter)  # the authors' 20 by default
        out["diffusion_residual_max"] = float(np.max(info.residuals))
    if args.exact:
        t0 = time.perf_counter()
        exact = graph.knn_affinity(database, k, gamma, validate=False)
        out["exact_graph_seconds"] = round(time.perf_counter() - t0, 1)
        both = exact.multiply(approx > 0)
        out["edge_agreement"] = round(both.nnz / max(1, exact.nnz), 5)
        queries, _ = queries_like(args.queries, args.n, args.dim)
        tops = []
        for a in (exact, approx):
            s = diffusion.diffusion_scores(queries, database, affinity=a, validate=False)
            tops.append(np.argsort(-s, axis=1, kind="stable")[:, :100])
        out["diffusion_top100_agreement"] = round(
            float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(*tops, strict=True)])), 5
        )
    out.update({"load_before": load_before, "load_after": uptime_load()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("index", "graph", "autofaiss"), default="index")
    p.add_argument(
        "--autofaiss_python",
        default="/work/venv-autofaiss/bin/python",
        help="autofaiss mode: the Python of a virtual environment holding autofaiss "
        "(it needs numpy < 2): python -m venv V && V/bin/pip install autofaiss",
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--kind", default="ivfpq", help="index kind (auto: by size)")
    p.add_argument(
        "--hard",
        action="store_true",
        help="the hard collection: 10%% of rows and queries isotropic random",
    )
    p.add_argument(
        "--budgets",
        default=None,
        help="index mode: bytes_per_vector budgets to build and measure, e.g. 80,600 "
        "(default: the config's)",
    )
    p.add_argument("--refine", type=int, default=None, help="search.ann.refine (default: config)")
    p.add_argument("--probes", type=int, default=8, help="graph mode: lists probed per row")
    p.add_argument("--exact", action="store_true", help="graph mode: compare with the exact graph")
    p.add_argument("--solve", action="store_true", help="graph mode: full diffusion on it too")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "cbir_ann_bench"))
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args()
    if args.queries is None:
        args.queries = 50 if args.mode == "graph" else 1000
    os.makedirs(args.data, exist_ok=True)
    args.isotropic = 0.1 if args.hard else 0.0
    database = collection(args.n, args.dim, args.data, args.isotropic)
    if args.mode == "graph":
        result = graph_mode(args, database)
    elif args.mode == "autofaiss":
        result = autofaiss_mode(args, database)
    elif args.budgets:
        result = [index_mode(args, database, float(b)) for b in args.budgets.split(",")]
    else:
        result = index_mode(args, database)
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    for r in result if isinstance(result, list) else [result]:
        r["peak_rss_gb"] = rss
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
