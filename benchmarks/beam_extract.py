"""Images per second of extraction on Apache Beam (2 local workers) against the sequential path.

The same real photos (the first --num_images of ../shared/data/clothing-small, sorted), the same
model (MobileNetV2, alpha 1.0, the official ImageNet weights file in ../shared/weights, GeM),
the same settings (longest side --image_size: the photos, 400 px wide, are not resized at 1024):

  * sequential: `cbir_tf.describe.extract.extract` into a store (decoding threads + one network);
  * beam:       `cbir_tf.beam.extract.BeamExtractor(num_workers=N).extract` into a store: the
                whole command's time, the workers' start (Python, Beam, TensorFlow, the model),
                the shards, their stores and the merge included;
  * ratio:      beam / sequential images per second (issue 17's goal: >= 0.8 on 2 cores, the
                pipeline's overhead small; the gain comes from more workers);
  * cpu:        the same ratio in CPU seconds (this process plus the worker processes, its
                children), which a machine shared with other work measures more reliably than
                wall-clock rates: what the pipeline's overhead costs in work;
  * command:    what a user sees: `extract.py --images=DIR --out=...` against the same command
                with `--runner=beam`, each a fresh process (Python, TensorFlow, the model built
                from its weights file, the folder listed and indexed), timed from outside;
  * fixed:      the Beam call's time for 2 images (workers started, one shard, merge):
                the cost that does not grow with the collection; `ratio_without_fixed` sets it
                aside, which is what a long extraction sees.

The descriptors of both paths are compared (max |difference|). Results go to
benchmarks/results/beam_extract_<cores>cores.{json,md}, with the machine's load.

  python benchmarks/beam_extract.py                      # 500 photos, 2 workers
  python benchmarks/beam_extract.py --num_images=60      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from _data import DATA, shared_dir  # noqa: E402

V2_WEIGHTS = "weights/mobilenet_v2_1.0_224_no_top.weights.h5"


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (Beam's worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _load() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def _commands(args, data: str, ids: list[str], weights: str, tmp: str) -> dict[str, float]:
    """Seconds of `extract.py --images=...` without and with `--runner=beam`, fresh processes."""
    folder = os.path.join(tmp, "photos")  # the same first images, linked
    for i in ids:
        os.makedirs(os.path.dirname(os.path.join(folder, i)), exist_ok=True)
        os.symlink(os.path.join(data, i), os.path.join(folder, i))
    base = [
        sys.executable, os.path.join(ROOT, "extract.py"), f"--images={folder}",
        "--backbone=mobilenetv2", f"--weights={weights}", "--config.model.pooling=gem",
        f"--config.data.image_size={args.image_size}",
    ]  # fmt: skip
    beam = [
        "--runner=beam", f"--config.extract.beam_workers={args.workers}",
        f"--config.extract.beam_shard_images={args.shard_images}",
    ] + ([f"--beam_options={args.beam_options}"] if args.beam_options else [])  # fmt: skip
    out = {}
    for name, extra in (("sequential", []), ("beam", beam)):
        t = time.perf_counter()
        proc = subprocess.run(
            base + [f"--out={os.path.join(tmp, 'cmd_' + name)}"] + extra, capture_output=True,
            text=True, env=dict(os.environ, PYTHONPATH=ROOT),
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"extract.py ({name}) failed:\n{proc.stderr[-3000:]}")
        out[name] = time.perf_counter() - t
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--shard_images", type=int, default=0, help="0: the config's (256)")
    parser.add_argument("--beam_options", default="", help="passed to BeamExtractor")
    parser.add_argument("--commands", type=int, default=1, help="also time the commands (0: no)")
    parser.add_argument(
        "--tf_threads", type=int, default=0,
        help="TensorFlow threads per worker: 0 = the extractor's (cores / workers), -1 = TF's",
    )  # fmt: skip
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if not args.shard_images:
        from cbir_tf import config as config_lib

        args.shard_images = int(config_lib.defaults("extract")["beam_shard_images"])

    from cbir_tf.beam import extract as beam_extract
    from cbir_tf.data.folder import list_images
    from cbir_tf.describe import extract as descriptors
    from cbir_tf.describe import models
    from cbir_tf.store.writer import StoreSink

    shared = shared_dir()
    weights, data = os.path.join(shared, V2_WEIGHTS), os.path.join(shared, DATA)
    for path in (weights, data):
        if not os.path.exists(path):
            print(f"missing {path}: set CBIR_SHARED to the shared folder", file=sys.stderr)
            return 1
    ids = list_images(data, recursive=True)[: args.num_images]
    paths = [os.path.join(data, *i.split("/")) for i in ids]
    model = models.build_descriptor_model(
        "mobilenetv2", weights=weights, alpha=1.0, pooling="gem", gem_p=3.0
    )
    common = {"ids": ids, "image_size": args.image_size, "meta": {"backbone": "mobilenetv2"}}
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="beam-bench-") as tmp:
        load_before = _load()
        t, c = time.perf_counter(), _cpu()
        seq = descriptors.extract(
            model, paths, sink=StoreSink(os.path.join(tmp, "seq")), progress=False, **common
        )
        seq_s, seq_cpu = time.perf_counter() - t, _cpu() - c
        load_mid = _load()
        extractor = beam_extract.BeamExtractor(
            args.beam_options, shard_images=args.shard_images, num_workers=args.workers
        )
        if args.tf_threads:
            extractor.threads = None if args.tf_threads < 0 else args.tf_threads
        t, c = time.perf_counter(), _cpu()
        beam = extractor.extract(
            model, paths, sink=StoreSink(os.path.join(tmp, "beam")), progress=False, **common
        )
        beam_s, beam_cpu = time.perf_counter() - t, _cpu() - c
        t = time.perf_counter()
        extractor.extract(
            model, paths[:2], sink=StoreSink(os.path.join(tmp, "fixed")), progress=False,
            **dict(common, ids=ids[:2]),
        )  # fmt: skip
        fixed_s = time.perf_counter() - t
        load_cmd = _load()
        cmd = _commands(args, data, ids, weights, tmp) if args.commands else {}
        load_after = _load()
        assert beam.ids == seq.ids and beam.skipped == seq.skipped
        diff = float(np.max(np.abs(np.asarray(beam.descriptors) - np.asarray(seq.descriptors))))
    n = len(paths)
    result = {
        "images": n,
        "described": len(seq.ids),
        "skipped": len(seq.skipped),
        "model": "mobilenetv2 (alpha 1.0, ImageNet weights file) + GeM, longest side "
        f"{args.image_size}",
        "cores": cores,
        "workers": args.workers,
        "shard_images": args.shard_images,
        "tf_threads_per_worker": extractor.threads,
        "sequential_s": round(seq_s, 2),
        "sequential_img_s": round(n / seq_s, 2),
        "beam_s": round(beam_s, 2),
        "beam_img_s": round(n / beam_s, 2),
        "ratio": round(seq_s / beam_s, 3),
        "sequential_cpu_s": round(seq_cpu, 1),
        "beam_cpu_s": round(beam_cpu, 1),
        "cpu_ratio": round(seq_cpu / beam_cpu, 3),
        "beam_fixed_s": round(fixed_s, 2),
        "ratio_without_fixed": round(seq_s / max(beam_s - fixed_s, 1e-9), 3),
        "beam_images_computed": beam.num_computed,
        "max_abs_descriptor_difference": diff,
        "load_before_seq_mid_after": [load_before, load_mid, load_after],
    }
    if cmd:
        result.update(
            {
                "command_sequential_s": round(cmd["sequential"], 2),
                "command_beam_s": round(cmd["beam"], 2),
                "command_ratio": round(cmd["sequential"] / cmd["beam"], 3),
                "load_before_commands": load_cmd,
            }
        )
    print(json.dumps(result, indent=2))
    print(
        f"sequential {n / seq_s:.2f} img/s, beam ({args.workers} workers) {n / beam_s:.2f} img/s: "
        f"ratio {seq_s / beam_s:.2f} (goal >= 0.8); fixed cost {fixed_s:.1f} s, ratio without it "
        f"{seq_s / max(beam_s - fixed_s, 1e-9):.2f}; in CPU time {seq_cpu / beam_cpu:.2f}; "
        f"load {load_before} / {load_after}"
    )
    if cmd:
        print(
            f"commands: extract.py {cmd['sequential']:.1f} s, --runner=beam {cmd['beam']:.1f} s: "
            f"ratio {cmd['sequential'] / cmd['beam']:.2f}"
        )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"beam_extract_{cores}cores")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
