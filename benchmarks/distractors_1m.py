"""Evaluation with a million distractors: time and peak memory of each method (bounded path).

Writes a synthetic distractor store of 1 001 001 random unit vectors of dimension 2048 (8 GB of
float32, the size of R1M with EfficientNet/ResNet descriptors) with `cbir_tf.store.files`, builds a
benchmark of 6 322 database images and 70 queries (the size of RParis6k: each query near its 10
positives, 3 junk images), and evaluates it as `evaluate.py --distractors=...` does
(`evaluation.evaluate_methods(..., distractors=store)`, the store memory-mapped), each method in
a fresh process so that its peak RSS is its own; then all four methods in one process, as
`evaluate.py` runs them. The store is deleted at the end (--keep keeps it).

    python benchmarks/distractors_1m.py --dir /tmp/r1m_bench          # 8 GB on disk
    python benchmarks/distractors_1m.py --n 100000 --dir /tmp/small   # a quick run

Prints, per method: seconds, peak RSS (VmHWM), mAP M; writes
benchmarks/results/distractors_1m_<cores>cores.{md,json} with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _data import random_unit  # noqa: E402

METHODS = ("plain", "aqe", "diffusion", "aqe+diffusion")


def write_distractors(directory: str, n: int, dim: int) -> float:
    """The synthetic store (block by block: bounded memory); returns seconds."""
    from cbir_tf.store import files as store

    t0 = time.perf_counter()
    chunk = 65536

    def blocks():
        for start in range(0, n, chunk):
            yield start, random_unit(min(chunk, n - start), dim, seed=1000 + start // chunk)

    ids = [f"d{i:07d}.jpg" for i in range(n)]
    store.write_store(directory, ids, blocks(), dim=dim, skipped=[], meta={"synthetic": True})
    return time.perf_counter() - t0


def benchmark_part(n_db: int, n_q: int, dim: int):
    """Database [n_db, dim], queries [n_q, dim] and a revisited ground truth (deterministic)."""
    x = random_unit(n_db, dim, seed=1)
    rng = np.random.default_rng(2)
    gnd, queries = [], []
    for _ in range(n_q):
        ids = rng.choice(n_db, 13, replace=False)
        # Easy positives close to the query, hard ones farther, junk in between.
        q = x[ids[:5]].sum(0) + 0.5 * x[ids[5:10]].sum(0) + rng.normal(0, 0.08, dim)
        queries.append(q / np.linalg.norm(q))
        gnd.append(
            {"easy": ids[:5].tolist(), "hard": ids[5:10].tolist(), "junk": ids[10:].tolist()}
        )
    return x, np.asarray(queries, np.float32), gnd


def _status_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, MiB. Unlike ru_maxrss, VmHWM starts afresh
    at exec, so a child's figure is its own and not its parent's."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def run_methods(methods: list[str], store_dir: str, n_db: int, n_q: int, truncate: int) -> dict:
    """One process: evaluate `methods` with the store as distractors; time and peak RSS."""
    from cbir_tf import config as config_lib
    from cbir_tf.evaluate import methods as evaluation
    from cbir_tf.store import files as store

    d, _, meta = store.load_store(store_dir)  # memory-mapped
    x, q, gnd = benchmark_part(n_db, n_q, d.shape[1])
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    results, _ = evaluation.evaluate_methods(
        q, x, gnd, methods=tuple(methods), rerank_cfg=config_lib.default_config().rerank.to_dict(),
        distractors=d, distractor_truncate=truncate,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return {
        "methods": methods,
        "seconds": round(seconds, 1),
        "method_seconds": {m: results[m]["info"]["seconds"] for m in methods},
        "peak_rss_mib": round(_status_mib("VmHWM")),
        "rss_before_mib": round(base),
        "map_medium": {
            m: round(100 * results[m]["revisited"]["medium"]["map"], 2) for m in methods
        },
    }


def _child(methods: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", ",".join(methods), "--dir", args.dir]
    cmd += ["--db", str(args.db), "--queries", str(args.queries), "--truncate", str(args.truncate)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_001_001)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--db", type=int, default=6322)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--truncate", type=int, default=1000)
    parser.add_argument("--dir", required=True, help="folder for the synthetic store")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    store_dir = os.path.join(args.dir, "distractors")
    if args.child:
        res = run_methods(args.child.split(","), store_dir, args.db, args.queries, args.truncate)
        print(json.dumps(res))
        return
    written = None
    if not os.path.isfile(os.path.join(store_dir, "COMPLETE")):
        written = round(write_distractors(store_dir, args.n, args.dim), 1)
        print(f"store: {args.n} x {args.dim} float32 written in {written} s", flush=True)
    rows = []
    try:
        for m in (*[[m] for m in METHODS], list(METHODS)):
            res = _child(m, args)
            rows.append(res)
            print(json.dumps(res), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    report(rows, args, written)


def report(rows: list[dict], args, written, load=None) -> None:
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg() if load is None else load
    made = f"written in {written} s" if written is not None else "written by an earlier run"
    lines = [
        f"# Evaluation with {args.n:,} distractors of dimension {args.dim} ({cores} cores)",
        "",
        f"`python benchmarks/distractors_1m.py --dir DIR` ({args.db} database images, "
        f"{args.queries} queries, truncated diffusion n = {args.truncate}; store "
        f"{args.n * args.dim * 4 / 1e9:.1f} GB memory-mapped, {made}). "
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"(other sessions shared the machine).",
        "",
        "| methods (one process each) | seconds | peak RSS (MiB) | RSS before (MiB) | mAP M |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        maps = ", ".join(f"{v:.2f}" for v in r["map_medium"].values())
        lines.append(
            f"| {' + '.join(r['methods'])} | {r['seconds']} | {r['peak_rss_mib']} | "
            f"{r['rss_before_mib']} | {maps} |"
        )
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / f"distractors_1m_{cores}cores"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "load": load, "args": vars(args), "written_s": written}, indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
