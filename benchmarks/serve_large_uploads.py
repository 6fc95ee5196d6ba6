"""The search service under large uploads: searches by row while clients send huge images.

Small files of huge images (a 9400 x 9400 RGBA PNG of ~350 KB, a 16-bit one of ~200 KB, a
9400 x 7050 JPEG) cost seconds and hundreds of MB each to decode (issue 24 item 2). This starts
`serve.py` over the clothing index of `serve_load.py`, then measures:

1. `--row_clients` clients searching by row (no decoding), alone: p50 / p95 latency;
2. the same while `--attackers` clients post the huge images and one client posts ordinary
   photos, for `--seconds`: row and small-upload p50 / p95 / max, large uploads done, the
   server's peak resident memory (VmHWM, reset before the phase);
3. the server's resident memory when idle, before the attack and `--idle_seconds` after it.

    python benchmarks/serve_large_uploads.py                        # this tree's serve.py
    python benchmarks/serve_large_uploads.py --tree /tmp/old-tree   # another checkout's

Each phase prints the load average beside its figures: on a shared machine they move with it.
Only 127.0.0.1 is contacted; every loop is bounded by `--seconds`.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import serve_load  # noqa: E402 (benchmarks/, beside this file)
from png_bytes import raw_png  # noqa: E402 (tests/png_bytes.py: PNGs PIL cannot write)

from cbir_tf.serve import client  # noqa: E402

HOST = serve_load.HOST
SIDE = 9400  # 88.4 M pixels: just under the default max_pixels (89.5 M)


def large_files(photo: pathlib.Path) -> dict[str, bytes]:
    """The attack: name -> file bytes (PNGs of a gradient row repeated, a photo enlarged)."""

    def png(channels: int, bit_depth: int, color_type: int) -> bytes:
        width = SIDE * channels * bit_depth // 8
        first = b"\x00" + bytes(i % 251 for i in range(width))
        up = b"\x02" + bytes(width)  # PNG filter Up: the row above again
        return raw_png(SIDE, SIDE, bit_depth, color_type, (first if i == 0 else up
                                                          for i in range(SIDE)))  # fmt: skip

    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize((SIDE, SIDE * 3 // 4)).save(buf, "JPEG", quality=85)
    return {"rgba_png": png(4, 8, 6), "gray16_png": png(1, 16, 0), "jpeg": buf.getvalue()}


def rss_mib(pid: int, field: str = "VmRSS:") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _figures(latencies: list[float]) -> dict[str, float | int | None]:
    lat = np.asarray(latencies) * 1e3
    if not lat.size:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    return {
        "n": int(lat.size),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "max_ms": round(float(lat.max()), 1),
    }


def clients(port: int, seconds: float, jobs: dict[str, tuple[int, list]]) -> dict[str, dict]:
    """Runs, for each name, `count` threads looping over its requests until `seconds` pass.

    Args:
      jobs: name -> (count, [(method, path, body bytes or None), ...]) cycled by each thread.

    Returns:
      name -> latency figures and errors.
    """
    deadline = time.monotonic() + seconds
    results = {name: {"latencies": [], "errors": []} for name in jobs}
    lock = threading.Lock()

    def loop(name: str, requests: list, offset: int):
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        i = offset
        while time.monotonic() < deadline:
            method, path, data = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            try:
                if data is None:
                    status, body, _ = client.request(conn, method, path)
                else:
                    status, answer = client.search(conn, data, k=10)
                    body = json.dumps(answer).encode()
                elapsed = time.perf_counter() - t0
                if status != 200:
                    raise RuntimeError(f"{status}: {body[:200]!r}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    results[name]["errors"].append(repr(e)[:200])
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
                continue
            with lock:
                results[name]["latencies"].append(elapsed)
        conn.close()

    threads = [
        threading.Thread(target=loop, args=(name, requests, j))
        for name, (count, requests) in jobs.items()
        for j in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        name: {
            **_figures(r["latencies"]),
            "errors": len(r["errors"]),
            "error_examples": r["errors"][:3],
        }  # fmt: skip
        for name, r in results.items()
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=pathlib.Path, default=ROOT, help="whose serve.py runs")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/serve_large"))
    parser.add_argument("--index", type=pathlib.Path, default=None)
    parser.add_argument("--images", type=pathlib.Path,
                        default=serve_load.SHARED / "data" / "clothing-small")  # fmt: skip
    parser.add_argument(
        "--weights",
        type=pathlib.Path,
        default=serve_load.SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5",
    )
    parser.add_argument("--row_clients", type=int, default=2)
    parser.add_argument("--attackers", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle_seconds", type=float, default=10.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    index = args.index or args.workdir / "clothing_index"
    if not (index / "COMPLETE").is_file():
        serve_load.build_index(args.images, args.weights, index)
    ids = (index / "ids.txt").read_text().splitlines()
    root = pathlib.Path(json.loads((index / "manifest.json").read_text())["root"])
    photos = [(root / ids[i]).read_bytes() for i in range(0, len(ids), len(ids) // 50)]
    attack = large_files(root / ids[0])
    print("large files:", {n: f"{len(b) / 1024:.0f} KiB" for n, b in attack.items()})
    rows = [("POST", f"/api/search?row={r}&k=10", None) for r in range(0, len(ids), 7)]
    small = [("POST", "/api/search", p) for p in photos]
    large = [("POST", "/api/search", b) for b in attack.values()]

    port = serve_load.free_port()
    proc = serve_load.start_server(index, port, None, args.workdir / "serve.log", tree=args.tree)
    out = {"label": args.label, "tree": str(args.tree),
           "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, "
                      "shared with other jobs"}  # fmt: skip
    try:
        clients(port, 5, {"warm": (2, small + rows)})
        time.sleep(2)
        out["idle_rss_before_mib"] = round(rss_mib(proc.pid), 1)
        print(f"idle RSS before: {out['idle_rss_before_mib']:.0f} MiB  (load {load()})")
        serve_load.reset_peak_rss(proc.pid)
        alone = clients(port, args.seconds, {"row": (args.row_clients, rows)})
        out["rows_alone"] = {**alone["row"], "load": load()}
        print("rows alone:", out["rows_alone"])
        serve_load.reset_peak_rss(proc.pid)
        jobs = {"row": (args.row_clients, rows), "small": (1, small),
                "large": (args.attackers, large)}  # fmt: skip
        under = clients(port, args.seconds, jobs)
        out["under_attack"] = {**under, "load": load(),
                               "peak_rss_mib": round(rss_mib(proc.pid, "VmHWM:"), 1)}  # fmt: skip
        for name in jobs:
            print(f"under attack, {name}:", under[name])
        print(f"peak RSS under attack: {out['under_attack']['peak_rss_mib']:.0f} MiB "
              f"(load {load()})")  # fmt: skip
        time.sleep(args.idle_seconds)
        out["idle_rss_after_mib"] = round(rss_mib(proc.pid), 1)
        print(f"idle RSS {args.idle_seconds:.0f} s after: {out['idle_rss_after_mib']:.0f} MiB "
              f"(load {load()})")  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.json)
        print("figures ->", args.json)


if __name__ == "__main__":
    main()
