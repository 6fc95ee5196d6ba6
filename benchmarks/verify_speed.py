"""What the checksums cost: writing a store with them, checking it cheaply and fully.

Every commit records the SHA-256 of each file (`cbir_tf.store.files.write_store`: the
descriptors are hashed as they are written); every load checks sizes and headers; `extract.py
--verify` and `Retriever.load(full_check=True)` read every byte again. This writes a synthetic
store of random unit vectors (default 200 000 x 512 float32, 391 MiB) and prints:

  * SHA-256 alone on the bytes in memory (the hash's own speed, MB/s);
  * write_store: seconds and MB/s (with the hashing it includes), against the same bytes
    written by numpy without any hashing;
  * the cheap check at every load (sizes, header, ids): milliseconds;
  * the full check (`verify_folder`): MB/s, with the file in the page cache and, as root, after
    dropping the caches (a cold disk).

    python benchmarks/verify_speed.py [--rows 200000] [--dim 512] [--json FILE]

The machine is shared: the load average is printed beside each figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir_tf.store import files as store_lib  # noqa: E402
from cbir_tf.store.verify import verify_folder  # noqa: E402


def load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def drop_caches() -> bool:
    """Drops the page cache (root only) so that the next read comes from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"img/{i:07d}.jpg" for i in range(args.rows)]
    mb = x.nbytes / 1e6
    work = pathlib.Path(tempfile.mkdtemp(dir=args.workdir, prefix="verify_speed_"))
    figures = {"rows": args.rows, "dim": args.dim, "descriptors_mb": round(mb, 1)}
    try:
        t = time.perf_counter()
        hashlib.sha256(memoryview(x).cast("B")).hexdigest()
        s = time.perf_counter() - t
        figures["sha256_in_memory_mb_s"] = round(mb / s)
        print(f"SHA-256 in memory: {mb / s:.0f} MB/s ({load()})")

        t = time.perf_counter()
        np.save(work / "plain.npy", x)
        os.sync()
        plain = time.perf_counter() - t
        store = work / "store"
        t = time.perf_counter()
        store_lib.write_store(
            store, ids, store_lib.stacked_blocks([x]), dim=args.dim, skipped=[], meta={}
        )
        os.sync()
        written = time.perf_counter() - t
        hashing = mb / (mb / s)  # the descriptors' SHA-256 at the speed measured above
        figures.update(
            write_plain_npy_s=round(plain, 2),
            write_store_with_checksums_s=round(written, 2),
            write_store_mb_s=round(mb / written),
            checksum_share_of_write_store=round(hashing / written, 3),
        )
        print(
            f"write_store (SHA-256 included, fsync'd): {written:.2f} s = {mb / written:.0f} MB/s,"
            f" of which the descriptors' SHA-256 about {hashing:.2f} s "
            f"({100 * hashing / written:.0f} %); np.save of the same bytes: {plain:.2f} s "
            f"({load()})"
        )

        t = time.perf_counter()
        for _ in range(5):
            store_lib.load_store(store)
        cheap = (time.perf_counter() - t) / 5
        figures["cheap_check_load_ms"] = round(cheap * 1e3, 1)
        print(f"load with the cheap check (sizes, header, ids' fingerprint): {cheap * 1e3:.1f} ms")

        for label, cold in (("page cache", False), ("cold disk", True)):
            if cold and not drop_caches():
                print("cold disk: not measured (dropping the page cache needs root)")
                continue
            report = verify_folder(store)
            assert not report.damaged, report.damaged
            rate = report.bytes / 1e6 / report.seconds
            key = "full_check_cold_mb_s" if cold else "full_check_cached_mb_s"
            figures[key] = round(rate)
            print(f"full check ({label}): {report.bytes / 1e6:.0f} MB in {report.seconds:.2f} s"
                  f" = {rate:.0f} MB/s ({load()})")  # fmt: skip
        figures["load_average"] = [round(v, 2) for v in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print("figures ->", args.json)


if __name__ == "__main__":
    main()
