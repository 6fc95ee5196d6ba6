"""Throughput and memory of descriptor extraction (issue 3: speed and memory).

Prints, for each longest side in --sizes:
  * bare:  images/s of the bare backbone forward pass (one compiled function, input signature
           [1, None, None, 3]) over images already decoded and resized, held in memory;
  * full:  images/s of the full `cbir_tf.describe.extract.extract` path on the same images as JPEG
           files: decoding and resizing (low-priority threads, `pipeline.iter_images`), the
           descriptor model (backbone + pooling + L2), NaN checks and the resumable store with
           its chunks, finalize included;
  * ratio: full / bare (goal >= 0.90), and the same ratio in CPU time per image, which a
           machine shared with other work measures more reliably than wall-clock rates.
Then the peak RSS of the full path for each count in --rss_counts, each run in its own
subprocess (VmHWM, reset after building the model, so that it is the extraction's own peak; the
whole process's ru_maxrss otherwise): it must not grow with the number of images.

Images are synthetic JPEGs (smooth random colour fields plus noise) of landmark-photo shapes
(1024x768, 768x1024, 1024x683, 1024x1024), as in Revisited Oxford/Paris.

Run (CPU, the issue's figures):
  python benchmarks/extract_throughput.py
Reduced (a quick check):
  python benchmarks/extract_throughput.py --num_images=12 --rss_counts=20,80 --rss_size=256
GPU, mixed precision:
  python benchmarks/extract_throughput.py --mixed_precision --num_images=200

Each `extract` call has a fixed cost of a few tens of ms (starting the decoding threads, the
first image's decoding, which nothing can overlap, and finalizing the store); with few images it
weighs on the ratio, which is why the default is 100 images per run.
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

SHAPES = ((768, 1024), (1024, 768), (683, 1024), (1024, 1024))  # (height, width)


def make_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """Writes `count` synthetic JPEGs (reused when present) and returns their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        path = os.path.join(folder, f"{k:05d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        h, w = SHAPES[k % len(SHAPES)]
        coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3), np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def build_models(backbone: str, pooling: str, mixed_precision: bool):
    """(descriptor model, bare backbone model, description).

    Uses `cbir_tf.describe.models.build_descriptor_model` when available; otherwise the backbone
    from `keras.applications` with global max pooling (MAC) and L2 normalisation.
    """
    import keras

    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        from cbir_tf.describe.backbones import build_backbone
        from cbir_tf.describe.models import build_descriptor_model
    except ImportError:
        build_descriptor_model = None
    if build_descriptor_model is not None:
        model = build_descriptor_model(backbone=backbone, weights="none", pooling=pooling)
        bare = build_backbone(backbone, weights="none")
        return model, bare, f"cbir_tf.describe.models.build_descriptor_model({backbone}, {pooling})"
    if backbone != "efficientnetb1":
        raise SystemExit(
            "without cbir_tf.describe.models only --backbone=efficientnetb1 is available"
        )
    bare = keras.applications.EfficientNetB1(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    x = keras.layers.GlobalMaxPooling2D()(bare.output)
    x = keras.layers.UnitNormalization(dtype="float32")(x)
    return keras.Model(bare.input, x), bare, "EfficientNetB1 + MAC + L2 (keras.applications)"


def bare_forward_rate(bare, images) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the bare backbone on already-decoded tensors."""
    import tensorflow as tf

    fn = tf.function(
        lambda x: bare(x, training=False),
        input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)],
    )
    tensors = [tf.constant(im[None].astype(np.float32)) for im in images]
    for t in tensors[: len(SHAPES)]:  # warm up every shape (oneDNN primitive creation)
        fn(t).numpy()
    start, cpu = time.perf_counter(), time.process_time()
    for t in tensors:
        fn(t).numpy()  # .numpy() waits for the result, as extract does
    n = len(tensors)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n


def full_extract_rate(model, paths, size, workdir) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of `extract` from JPEG files to a finished store."""
    from cbir_tf.describe.extract import extract
    from cbir_tf.store.writer import StoreSink

    # Warm-up on the first shapes: traces the shared compiled function once.
    extract(model, paths[: len(SHAPES)], image_size=size, progress=False)
    start, cpu = time.perf_counter(), time.process_time()
    result = extract(
        model,
        paths,
        image_size=size,
        sink=StoreSink(os.path.join(workdir, f"store_{size}_{time.time_ns()}")),
        progress=False,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert result.descriptors.shape[0] == len(paths), result.skipped
    return len(paths) / seconds, cpu / len(paths)


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM (peak RSS since start or the last reset) in MiB; ru_maxrss where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args) -> None:
    """Runs the full path on `--rss_child` images and prints its peak RSS as JSON.

    The model is built and the compiled function warmed up first; the peak-RSS counter is then
    reset, so that `peak_rss_mib` is the peak of the extraction itself (building EfficientNet
    peaks higher than extracting with it, which would hide any growth). `build_peak_mib` is
    the peak before the reset (ru_maxrss).
    """
    import gc

    model, _, _ = build_models(args.backbone, args.pooling, args.mixed_precision)
    from cbir_tf.describe.extract import extract
    from cbir_tf.store.writer import StoreSink

    paths = make_images(args.image_dir, args.rss_child)
    extract(model, paths[: len(SHAPES)], image_size=args.rss_size, progress=False)
    gc.collect()
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = extract(
            model,
            paths,
            image_size=args.rss_size,
            sink=StoreSink(os.path.join(tmp, "store"), 64),
            progress=False,
        )
        n = result.descriptors.shape[0]
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "images": n,
                "peak_rss_mib": _peak_rss_mib(),
                "peak_is_extraction_only": reset,
                "build_peak_mib": build_peak,
                "images_per_second": n / seconds,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,1024", help="longest sides, comma-separated")
    parser.add_argument("--num_images", type=int, default=100, help="images per throughput run")
    parser.add_argument("--rss_counts", default="200,800", help="image counts of the RSS runs")
    parser.add_argument("--rss_size", type=int, default=512, help="longest side of the RSS runs")
    parser.add_argument("--backbone", default="efficientnetb1")
    parser.add_argument("--pooling", default="gem")
    parser.add_argument("--mixed_precision", action="store_true", help="mixed_float16 (GPU)")
    parser.add_argument("--image_dir", default="", help="where the JPEGs go (default: temp)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs, best kept")
    parser.add_argument("--skip_rss", action="store_true")
    parser.add_argument("--rss_child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    tmp = None
    if not args.image_dir:
        tmp = tempfile.TemporaryDirectory(prefix="cbir_bench_")
        args.image_dir = tmp.name
    if args.rss_child:
        rss_child(args)
        return

    import tensorflow as tf

    from cbir_tf.data.decode import load_resized

    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(c) for c in args.rss_counts.split(",") if c]
    n = max(args.num_images, len(SHAPES))
    paths = make_images(args.image_dir, max([n] + ([] if args.skip_rss else counts)))
    model, bare, description = build_models(args.backbone, args.pooling, args.mixed_precision)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(
        f"model: {description}; devices: {devices}; mixed precision: {args.mixed_precision}; "
        f"CPUs: {os.cpu_count()}; tf {tf.__version__}"
    )
    for size in sizes:
        decoded = [load_resized(p, size) for p in paths[:n]]
        # The machine may be shared: alternate the two measurements and keep the best of each.
        bare_runs, full_runs = [], []
        for _ in range(args.repeats):
            bare_runs.append(bare_forward_rate(bare, decoded))
            full_runs.append(full_extract_rate(model, paths[:n], size, args.image_dir))
        bare_ips, full_ips = max(r for r, _ in bare_runs), max(r for r, _ in full_runs)
        bare_cpu, full_cpu = min(c for _, c in bare_runs), min(c for _, c in full_runs)
        ratio = full_ips / bare_ips
        print(
            f"longest side {size:5d}: bare forward {bare_ips:8.2f} img/s | full extract "
            f"{full_ips:8.2f} img/s | ratio {ratio:6.1%} ({'ok' if ratio >= 0.9 else 'BELOW 90%'})"
            f" [{n} images, best of {args.repeats}: bare "
            f"{', '.join(f'{r:.2f}' for r, _ in bare_runs)}; full "
            f"{', '.join(f'{r:.2f}' for r, _ in full_runs)}]\n"
            f"{'':19}CPU time per image: bare {bare_cpu * 1e3:7.1f} ms | full "
            f"{full_cpu * 1e3:7.1f} ms | bare/full {bare_cpu / full_cpu:6.1%} (the ratio a "
            "machine whose cores the run has to itself would see when the network keeps them busy)",
            flush=True,
        )

    if not args.skip_rss:
        peaks = []
        for count in counts:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                f"--rss_child={count}",
                f"--rss_size={args.rss_size}",
                f"--backbone={args.backbone}",
                f"--pooling={args.pooling}",
                f"--image_dir={args.image_dir}",
            ] + (["--mixed_precision"] if args.mixed_precision else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            stats = json.loads(out.strip().splitlines()[-1])
            peaks.append(stats["peak_rss_mib"])
            print(
                f"peak RSS, {count:5d} images at {args.rss_size}: {stats['peak_rss_mib']:8.1f} "
                f"MiB during extraction"
                + ("" if stats["peak_is_extraction_only"] else " (whole process)")
                + f" (model building and warm-up peaked at {stats['build_peak_mib']:.1f} MiB); "
                f"{stats['images_per_second']:.2f} img/s",
                flush=True,
            )
        if len(peaks) > 1:
            growth = peaks[-1] - peaks[0]
            print(
                f"peak RSS growth {counts[0]} -> {counts[-1]} images: {growth:+.1f} MiB "
                f"({growth / peaks[0]:+.1%})"
            )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
