"""Load on the search service: concurrent clients posting photos to serve.py over loopback.

Starts `serve.py` as a child process on a free 127.0.0.1 port over an index of real photos,
then sends searches (multipart uploads of indexed photos, so each query's own image should come
back first) from 1 client and from 8 concurrent clients, and prints for each: requests per
second, p50 / p95 / p99 latency, errors (must be 0), how often the query's own image ranked
first, and the server's peak resident memory (VmHWM, reset before each phase).

    python benchmarks/serve_load.py                     # builds the index on first use
    python benchmarks/serve_load.py --index=/tmp/idx --requests 400 --clients 1 8

The default index is ../shared/data/clothing-small (3781 photos) with MobileNet (alpha 0.25,
224 px, R-MAC) and the real weights in ../shared/weights; it is built once with extract.py into
--workdir. Every loop is bounded: `--requests` per phase and `--max_seconds` per phase; the
server is only ever contacted on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir_tf.serve import client  # noqa: E402

SHARED = ROOT.parent / "shared"
HOST = "127.0.0.1"  # loopback only, always


def build_index(images: pathlib.Path, weights: pathlib.Path, out: pathlib.Path) -> None:
    """Indexes `images` with extract.py (resumes or reuses a finished index)."""
    cmd = [
        sys.executable, "extract.py", f"--images={images}", f"--out={out}",
        f"--weights={weights}", "--config.model.backbone=mobilenet",
        "--config.model.alpha=0.25", "--config.data.image_size=224",
    ]  # fmt: skip
    print("indexing:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    index: pathlib.Path,
    port: int,
    threads: int | None,
    log_path: pathlib.Path,
    tree: pathlib.Path = ROOT,
):
    """serve.py of the source tree `tree` (this one by default) on 127.0.0.1:`port`."""
    cmd = [sys.executable, "serve.py", f"--index={index}", f"--host={HOST}", f"--port={port}"]
    if threads:
        cmd.append(f"--threads={threads}")
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}; see {log_path}")
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            if client.request(c, "GET", "/api/health")[0] == 200:
                c.close()
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"serve.py did not answer within 300 s; see {log_path}")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_phase(port, queries, clients, requests, k, rerank, max_seconds):
    """`requests` searches spread over `clients` threads, stopped at `max_seconds` at the latest.

    Returns:
      dict of figures (latencies in ms).
    """
    lock = threading.Lock()
    next_job = [0]
    latencies, errors, self_first = [], [], [0]
    stages = {"decode": [], "describe": [], "search": []}  # server-side, ms
    deadline = time.monotonic() + max_seconds

    def take() -> int | None:
        with lock:
            if next_job[0] >= requests or time.monotonic() > deadline:
                return None
            next_job[0] += 1
            return next_job[0] - 1

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        while (job := take()) is not None:
            image_id, data = queries[job % len(queries)]
            t0 = time.perf_counter()
            try:
                status, answer = client.search(conn, data, k=k, rerank=rerank)
                elapsed = time.perf_counter() - t0
                if status != 200:
                    raise RuntimeError(f"{status}: {answer.get('error')}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{image_id}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                continue
            with lock:
                latencies.append(elapsed)
                self_first[0] += answer["results"][0]["id"] == image_id
                for name, values in stages.items():
                    values.append(answer["timing_ms"][name])
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    done = len(latencies)
    return {
        "clients": clients,
        "requests": done + len(errors),
        "ok": done,
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 2),
        "requests_per_s": round(done / wall, 2) if wall > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if done else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if done else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if done else None,
        "self_first": round(self_first[0] / done, 4) if done else None,
        "server_median_ms": {n: round(float(np.median(v)), 1) for n, v in stages.items() if v},
        "stopped_by_time": done + len(errors) < requests,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=pathlib.Path, default=None)
    parser.add_argument("--images", type=pathlib.Path, default=SHARED / "data" / "clothing-small")
    parser.add_argument(
        "--weights", type=pathlib.Path,
        default=SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5",
    )  # fmt: skip
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/serve_load"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank", default="none")
    parser.add_argument("--threads", type=int, default=None, help="serve.py --threads")
    parser.add_argument("--max_seconds", type=float, default=600.0, help="per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    index = args.index or args.workdir / "clothing_index"
    if not (index / "COMPLETE").is_file():
        build_index(args.images, args.weights, index)
    manifest = json.loads((index / "manifest.json").read_text())
    ids = (index / "ids.txt").read_text().splitlines()
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(ids), size=min(args.requests, len(ids)), replace=False)
    root = pathlib.Path(manifest["root"])
    queries = [(ids[i], (root / ids[i]).read_bytes()) for i in picked]
    sizes = [len(d) for _, d in queries]
    print(
        f"index {index}: {len(ids)} images; {len(queries)} distinct query photos "
        f"(median {np.median(sizes) / 1024:.0f} KiB)"
    )

    port = free_port()
    started = time.perf_counter()
    proc = start_server(index, port, args.threads, args.workdir / "serve.log")
    results = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores",
        "index_images": len(ids),
        "k": args.k,
        "rerank": args.rerank,
        "server_start_s": round(time.perf_counter() - started, 1),
        "server_rss_after_start_mib": round(peak_rss_mib(proc.pid), 1),
        "phases": [],
    }
    try:
        run_phase(port, queries, 2, 20, args.k, args.rerank, 60)  # warm-up (caches, threads)
        print(f"\n{'clients':>7} {'req':>5} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'errors':>6} {'self@1':>6} {'peak RSS':>9}")  # fmt: skip
        for clients in args.clients:
            reset_peak_rss(proc.pid)
            r = run_phase(
                port, queries, clients, args.requests, args.k, args.rerank, args.max_seconds
            )
            r["server_peak_rss_mib"] = round(peak_rss_mib(proc.pid), 1)
            results["phases"].append(r)
            print(
                f"{clients:>7} {r['requests']:>5} {r['requests_per_s']:>7.1f} {r['p50_ms']:>7.1f} "
                f"{r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6} "
                f"{r['self_first']:>6.3f} {r['server_peak_rss_mib']:>6.0f} MiB",
                flush=True,
            )
            print("  server-side medians (ms):", r["server_median_ms"])
            for e in r["error_examples"]:
                print("  error:", e)
            if r["stopped_by_time"]:
                print(f"  stopped at --max_seconds={args.max_seconds}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if len(results["phases"]) > 1:
        base = results["phases"][0]["requests_per_s"]
        for r in results["phases"][1:]:
            print(f"throughput with {r['clients']} clients: {r['requests_per_s'] / base:.2f}x "
                  f"that of {results['phases'][0]['clients']}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.json)
        print("figures ->", args.json)
    if any(r["errors"] for r in results["phases"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
