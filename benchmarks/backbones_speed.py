"""Speed and memory of the backbones on this machine's CPU (issue 27).

For each backbone and longest side: images per second of the whole descriptor model (one image
at a time through `cbir_tf.describe.extract.build_extract_function`, as extraction runs it:
EdgePad ▸ [SnapToPatches] ▸ preprocessing ▸ backbone ▸ the backbone's recipe pooling ('auto':
R-MAC for CNNs, the class token for DINOv2) ▸ L2) on 4:3 images already in memory, and the peak
resident memory of a process that builds the model and runs it (VmHWM), beside the same figure
for a process that only imports TensorFlow and Keras. Each measurement runs in its own
subprocess; random weights (the speed does not depend on them). The load average of the
machine is printed and recorded beside every figure: on a shared machine other work slows the
measurement down.

Run:
  python benchmarks/backbones_speed.py                    # the issue's table (a few minutes)
  python benchmarks/backbones_speed.py --seconds=5 --only=dinov2_small:224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (backbone, longest side): the list.
CASES = (
    ("mobilenetv2", 224),
    ("efficientnetb1", 224),
    ("efficientnetv2s", 224),
    ("convnext_tiny", 224),
    ("dinov2_small", 224),
    ("mobilenetv2", 518),
    ("efficientnetb1", 518),
    ("efficientnetv2s", 518),
    ("convnext_tiny", 518),
    ("dinov2_small", 518),
)


def _peak_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def measure_one(backbone: str, size: int, seconds: float) -> dict:
    """Images/s and peak memory of one backbone at one size (run in a fresh process)."""
    import numpy as np

    from cbir_tf import quiet

    quiet.import_tensorflow(False)
    import tensorflow as tf

    if backbone == "baseline":
        import keras  # noqa: F401

        return {"backbone": "baseline", "peak_rss_mib": _peak_rss_mib()}
    from cbir_tf.describe import catalog, models
    from cbir_tf.describe.extract import build_extract_function

    t0 = time.perf_counter()
    model = models.build_descriptor_model(backbone, "none", pooling="auto")
    build_s = time.perf_counter() - t0
    fn = build_extract_function(model)
    h, w = size * 3 // 4, size  # a landscape photo, longest side `size`
    images = [
        tf.constant(np.random.default_rng(k).uniform(0, 255, (1, h, w, 3)).astype(np.float32))
        for k in range(4)
    ]
    for image in images:  # trace and warm up
        fn(image).numpy()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 8:
        fn(images[done % len(images)]).numpy()
        done += 1
    elapsed = time.perf_counter() - start
    return {
        "backbone": backbone,
        "image": f"{w}x{h}",
        "longest_side": size,
        "pooling": catalog.resolve_pooling(backbone, "auto"),
        "params_m": round(model.count_params() / 1e6, 2),
        "dim": int(model.output.shape[-1]),
        "images_per_s": done / elapsed,
        "ms_per_image": 1000 * elapsed / done,
        "images": done,
        "build_s": build_s,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _child(backbone: str, size: int, seconds: float) -> dict:
    load = os.getloadavg()
    proc = subprocess.run(
        [sys.executable, __file__, f"--child={backbone}:{size}", f"--seconds={seconds}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{backbone} at {size}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_before"] = [round(x, 2) for x in load]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--only", default="", help="backbone:size[,backbone:size...]")
    parser.add_argument("--out", default="", help="JSON file for the results")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backbone, size = args.child.split(":")
        print(json.dumps(measure_one(backbone, int(size), args.seconds)))
        return
    cases = CASES
    if args.only:
        cases = tuple((b, int(s)) for b, s in (c.split(":") for c in args.only.split(",")))
    baseline = _child("baseline", 0, 0)
    print(
        f"cores: {os.cpu_count()}; TensorFlow + Keras alone: "
        f"{baseline['peak_rss_mib']:.0f} MiB peak; shared machine: load averages (1, 5, 15 min)"
        " before each case"
    )
    head = f"{'backbone':<16}{'side':>5}{'pool':>6}{'params':>8}{'dim':>6}{'img/s':>8}"
    print(head + f"{'ms/img':>9}{'peak MiB':>10}{'vs mobilenetv2':>16}   load")
    rows, reference = [], {}
    for backbone, size in cases:
        r = _child(backbone, size, args.seconds)
        rows.append(r)
        reference.setdefault(size, r["images_per_s"] if backbone == "mobilenetv2" else None)
        ref = reference.get(size)
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else "-"
        print(
            f"{backbone:<16}{size:>5}{r['pooling']:>6}{r['params_m']:>7.1f}M{r['dim']:>6}"
            f"{r['images_per_s']:>8.2f}{r['ms_per_image']:>9.1f}{r['peak_rss_mib']:>10.0f}"
            f"{ratio:>16}   {r['load_before'][0]:.2f}",
            flush=True,
        )
    if args.out:
        from cbir_tf.fileio import atomic_write_text

        record = {
            "cpu_count": os.cpu_count(),
            "seconds_per_case": args.seconds,
            "baseline_peak_rss_mib": baseline["peak_rss_mib"],
            "rows": rows,
        }
        atomic_write_text(args.out, json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
