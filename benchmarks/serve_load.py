"""Load on the search service: concurrent clients posting photos to serve.py over loopback.

Starts `serve.py` as a child process on a free 127.0.0.1 port over an index of real photos,
then sends searches (multipart uploads of indexed photos, so each query's own image should come
back first) from 1 client and from 8 concurrent clients, and prints for each: requests per
second, p50 / p95 / p99 latency, errors (must be 0), how often the query's own image ranked
first, and the server's peak resident memory (VmHWM, reset before each phase).

    python benchmarks/serve_load.py                     # builds the index on first use
    python benchmarks/serve_load.py --index=/tmp/idx --requests 400 --clients 1 8
    python benchmarks/serve_load.py --mode=live+soak --json=benchmarks/results/x.json

`--mode=live` serves an index of `--live_initial` photos and, while 8 clients search, adds
`--live_batches` x `--live_batch_size` more with `extract.py` (one commit each): requests per
second, latency percentiles, errors, the seconds from each commit to the first answer from it
(the service reloads, `serve.py --reload_every`), and the server's RSS before and after.
`--mode=soak`: 8 clients x `--soak_requests` requests each, with a commit (one photo removed or
put back, `Retriever.remove` / `index` in this process) and `POST /api/reload` every
`--soak_reload_every` requests; the server's RSS at the start and the end. Every answer names the
commit it came from; the figures count answers from each.

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
import shutil
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


def build_index(
    images: pathlib.Path, weights: pathlib.Path, out: pathlib.Path, quiet: bool = False
) -> None:
    """Indexes `images` with extract.py (resumes, updates or reuses a finished index)."""
    cmd = [
        sys.executable, "extract.py", f"--images={images}", f"--out={out}",
        f"--weights={weights}", "--config.model.backbone=mobilenet",
        "--config.model.alpha=0.25", "--config.data.image_size=224",
    ]  # fmt: skip
    if not quiet:
        print("indexing:", " ".join(cmd[1:]), flush=True)
    output = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=output, stderr=output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    index: pathlib.Path,
    port: int,
    threads: int | None,
    log_path: pathlib.Path,
    extra: tuple[str, ...] = (),
    tree: pathlib.Path = ROOT,
):
    """serve.py of the source tree `tree` (this one by default) on 127.0.0.1:`port`, with the
    flags `extra`."""
    cmd = [sys.executable, "serve.py", f"--index={index}", f"--host={HOST}", f"--port={port}"]
    if threads:
        cmd.append(f"--threads={threads}")
    cmd += list(extra)
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


def peak_rss_mib(pid: int, field: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    """The process's resident memory now (VmRSS), MiB."""
    return peak_rss_mib(pid, "VmRSS")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


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


# -- live: the index grows while it is served ---------------------------------------------------


class Hammer:
    """`clients` threads searching without pause until `stop`; every answer recorded with the
    time it came and the commit it names."""

    def __init__(self, port: int, queries, clients: int, k: int, rerank: str, limit: int = 0):
        self.port, self.queries, self.k, self.rerank = port, queries, k, rerank
        self.limit = limit  # requests per client (0: until stop)
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, int | None]] = []  # (time, latency s, commit)
        self.errors: list[str] = []
        self.self_first = 0
        self.hooks: list = []  # called (with the number of answers so far) after each answer
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._worker, args=(c,), daemon=True) for c in range(clients)
        ]

    def start(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def _worker(self, c: int) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        done = 0
        while not self._stop.is_set() and (not self.limit or done < self.limit):
            image_id, data = self.queries[(c * 7919 + done) % len(self.queries)]
            done += 1
            t0 = time.perf_counter()
            try:
                status, answer = client.search(conn, data, k=self.k, rerank=self.rerank)
                if status != 200:
                    raise RuntimeError(f"{status}: {answer.get('error')}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.errors.append(f"{image_id}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
                continue
            now = time.perf_counter()
            with self.lock:
                self.answers.append((now, now - t0, answer["index"].get("commit")))
                self.self_first += answer["results"][0]["id"] == image_id
                count = len(self.answers)
            for hook in self.hooks:
                hook(count)
        conn.close()

    def figures(self, t0: float, t1: float) -> dict:
        lat = np.asarray([a[1] for a in self.answers if t0 <= a[0] <= t1]) * 1e3
        done = len(lat)
        return {
            "requests": done + len(self.errors),
            "errors": len(self.errors),
            "error_examples": self.errors[:3],
            "seconds": round(t1 - t0, 1),
            "requests_per_s": round(done / (t1 - t0), 2) if t1 > t0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if done else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if done else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if done else None,
            "self_first": round(self.self_first / max(1, len(self.answers)), 4),
        }


def committed_id(index: pathlib.Path) -> int | None:
    from cbir_tf.store.files import committed_id as read

    return read(index)


def live_phase(
    args, index: pathlib.Path, photos: pathlib.Path, pool: list[pathlib.Path], port, proc
):
    """Adds `live_batches` batches of photos with extract.py while 8 clients search."""
    queries = [(p.name, p.read_bytes()) for p in sorted(photos.rglob("*.jpg"))[:400]]
    queries = [(str(p.relative_to(photos)), p.read_bytes()) for p in sorted(photos.rglob("*.jpg"))]
    hammer = Hammer(port, queries[:400], args.live_clients, args.k, args.rerank)
    run_phase(port, queries, 2, 20, args.k, args.rerank, 60)  # warm-up
    rss_before = rss_mib(proc.pid)
    t0 = time.perf_counter()
    hammer.start()
    commits = []
    for b in range(args.live_batches):
        batch = pool[b * args.live_batch_size : (b + 1) * args.live_batch_size]
        for src in batch:
            link = photos / "added" / f"batch{b}" / f"{src.parent.name}_{src.name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
        before = committed_id(index)
        started = time.perf_counter()
        build_index(photos, args.weights, index, quiet=True)
        finished = time.perf_counter()
        commit = committed_id(index)
        assert commit is not None and commit > before, (before, commit)
        # The commit landed when the marker changed: the marker's mtime, on this clock.
        landed = finished - (time.time() - os.stat(index / "COMPLETE").st_mtime)
        commits.append({"commit": commit, "images_added": len(batch),
                        "extract_s": round(finished - started, 1), "landed": landed,
                        "load_average": load_average()})  # fmt: skip
        print(f"  commit {commit}: {len(batch)} photos added by extract.py in "
              f"{finished - started:.1f} s (load average {load_average()})",
              flush=True)  # fmt: skip
        time.sleep(args.live_pause)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:  # until the last commit has answered
        with hammer.lock:
            if any(a[2] == commits[-1]["commit"] for a in hammer.answers):
                break
        time.sleep(0.2)
    t1 = time.perf_counter()
    hammer.stop()
    rss_after = rss_mib(proc.pid)
    for c in commits:
        seen = [a[0] for a in hammer.answers if a[2] is not None and a[2] >= c["commit"]]
        c["first_answer_after_s"] = round(min(seen) - c.pop("landed"), 2) if seen else None
    out = hammer.figures(t0, t1)
    out.update({
        "clients": args.live_clients,
        "commits": commits,
        "answers_per_commit": {str(k): sum(1 for a in hammer.answers if a[2] == k)
                               for k in sorted({a[2] for a in hammer.answers}, key=str)},
        "server_rss_before_mib": round(rss_before, 1),
        "server_rss_after_mib": round(rss_after, 1),
        "rss_growth_percent": round(100 * (rss_after / rss_before - 1), 1),
        "load_average_end": load_average(),
    })  # fmt: skip
    return out


def soak_phase(args, index: pathlib.Path, photos: pathlib.Path, port, proc):
    """8 clients x soak_requests requests; a commit and a reload every soak_reload_every."""
    from cbir_tf.retriever import Retriever

    files = sorted(photos.rglob("*.jpg"))
    toggled = files[-1]  # removed, then put back, then removed, ... (never a query)
    queries = [(str(p.relative_to(photos)), p.read_bytes()) for p in files[:-1]]
    writer = Retriever.load(index)
    run_phase(port, queries, 2, 20, args.k, args.rerank, 60)  # warm-up
    hammer = Hammer(port, queries[:400], args.live_clients, args.k, args.rerank,
                    limit=args.soak_requests)  # fmt: skip
    pending = threading.Semaphore(0)
    last = [0]

    def on_answer(count: int) -> None:
        if count // args.soak_reload_every > last[0]:
            last[0] = count // args.soak_reload_every
            pending.release()

    hammer.hooks.append(on_answer)
    reloads, rss = [], [rss_mib(proc.pid)]
    t0 = time.perf_counter()
    hammer.start()
    while any(t.is_alive() for t in hammer.threads):
        if not pending.acquire(timeout=0.5):
            continue
        if writer.row_of(writer.id_of(toggled)) is None:
            writer.index([str(toggled)], progress=False)
        else:
            writer.remove([str(toggled)])
        # A connection per reload: an idle keep-alive one is closed by the server meanwhile.
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        status, data, _ = client.request(conn, "POST", "/api/reload")
        conn.close()
        answer = json.loads(data)
        reloads.append(answer["commit"])
        assert status == 200 and answer["commit"] == writer.commit, answer  # served now
        rss.append(rss_mib(proc.pid))
    t1 = time.perf_counter()
    hammer.stop()
    out = hammer.figures(t0, t1)
    out.update({
        "clients": args.live_clients,
        "requests_per_client": args.soak_requests,
        "reloads": len(reloads),
        "commits_served": len({a[2] for a in hammer.answers}),
        "server_rss_start_mib": round(rss[0], 1),
        "server_rss_end_mib": round(rss_mib(proc.pid), 1),
        "server_rss_every_10_reloads_mib": [round(v, 1) for v in rss[::10]],
        "rss_growth_percent": round(100 * (rss_mib(proc.pid) / rss[0] - 1), 1),
        "load_average_end": load_average(),
    })  # fmt: skip
    return out


def live_main(args) -> None:
    """--mode=live, soak or live+soak (see the module docstring)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = args.workdir / "live_photos"  # symbolic links to the shared photos, never copies
    index = args.workdir / "live_index"
    shutil.rmtree(photos, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    everything = sorted(args.images.rglob("*.jpg"))
    order = np.random.default_rng(args.seed).permutation(len(everything))
    everything = [everything[i] for i in order]
    need = args.live_initial + args.live_batches * args.live_batch_size
    initial, pool = everything[: args.live_initial], everything[args.live_initial : need]
    for src in initial:
        link = photos / "initial" / f"{src.parent.name}_{src.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src)
    t = time.perf_counter()
    build_index(photos, args.weights, index, quiet=True)
    print(f"index {index}: {args.live_initial} photos in {time.perf_counter() - t:.0f} s")
    port = free_port()
    proc = start_server(index, port, args.threads, args.workdir / "serve_live.log",
                        (f"--reload_every={args.reload_every}",))  # fmt: skip
    results = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores "
        "(shared with other sessions: see the load averages)",
        "load_average_start": load_average(),
        "initial_images": args.live_initial,
        "reload_every_s": args.reload_every,
        "k": args.k,
        "rerank": args.rerank,
    }
    try:
        if "live" in args.mode:
            print(f"live: {args.live_clients} clients while {args.live_batches} commits of "
                  f"{args.live_batch_size} photos land", flush=True)  # fmt: skip
            results["live"] = live = live_phase(args, index, photos, pool, port, proc)
            print(json.dumps({k: v for k, v in live.items() if k != "commits"}, indent=1))
            for c in live["commits"]:
                print("  ", c)
            write_json(args.json, results)  # kept should the soak fail
        if "soak" in args.mode:
            print(f"soak: {args.live_clients} clients x {args.soak_requests} requests, a commit "
                  f"and a reload every {args.soak_reload_every} requests", flush=True)  # fmt: skip
            results["soak"] = soak = soak_phase(args, index, photos, port, proc)
            print(json.dumps(soak, indent=1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["load_average_end"] = load_average()
    write_json(args.json, results)
    if args.json:
        print("figures ->", args.json)
    if any(results.get(p, {}).get("errors") for p in ("live", "soak")):
        sys.exit(1)


def write_json(path: pathlib.Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)


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
    parser.add_argument("--mode", default="load", choices=["load", "live", "soak", "live+soak"])
    parser.add_argument("--live_initial", type=int, default=1000, help="photos served at first")
    parser.add_argument("--live_batches", type=int, default=5, help="commits while serving")
    parser.add_argument("--live_batch_size", type=int, default=100, help="photos per commit")
    parser.add_argument("--live_clients", type=int, default=8)
    parser.add_argument("--live_pause", type=float, default=5.0, help="seconds between commits")
    parser.add_argument("--reload_every", type=float, default=1.0, help="serve.py --reload_every")
    parser.add_argument("--soak_requests", type=int, default=2000, help="per client")
    parser.add_argument("--soak_reload_every", type=int, default=200, help="requests per reload")
    args = parser.parse_args(argv)
    if args.mode != "load":
        live_main(args)
        return

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
