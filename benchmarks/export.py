"""Exported descriptor models on real photos: agreement, retrieval mAP and speed (issue 19).

MobileNet (alpha 0.25, the official Keras ImageNet weights) + GeM (p = 3) with PCA-whitening
learned on clothing-small/validation, described at image size 224 on clothing-small/test:

  keras         `cbir_tf.describe.extract.extract` on the files (what extract.py does)
  saved_model   the SavedModel's `serving_default` on the encoded file bytes, one file per call
                (decoding, EXIF orientation and resizing in TF ops inside the model)
  tflite-*      the TFLite files (float32, float16 weights, dynamic-range int8 weights) on the
                pixels extraction decodes (PIL), one image at a time, through LiteRT

For each: max |difference| and mean cosine against the Keras descriptors, leave-one-out mAP
(each test photo queries the others; positives are its class) and its difference from the
Keras mAP, and images per second on this CPU: end to end from files/bytes for keras and
saved_model (one pass), and network only (pixels already decoded; fastest of three passes) for
all.

Run:
  python benchmarks/export.py                       # all test photos (391)
  python benchmarks/export.py --limit=200 --image_size=320 --out=benchmarks/results/x
The data and weights are looked up in ../shared (or $CBIR_SHARED).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from _data import DATA, WEIGHTS_FILE, shared_dir  # noqa: E402


def timed(fn, items, rounds: int = 3) -> tuple[np.ndarray, float]:
    """Stacked fn(item) over items, and images per second of the fastest of `rounds` passes
    (after one warm-up call): other jobs on a shared machine only ever slow a pass down."""
    fn(items[0])
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        out = np.stack([np.asarray(fn(x)).reshape(-1) for x in items])
        best = min(best, time.perf_counter() - start)
    return out, len(items) / best


def build_model(weights: str, image_size: int, data: str):
    """GeM MobileNet with whitening learned on the validation photos."""
    from cbir_tf.data import folder
    from cbir_tf.describe import extract as descriptors
    from cbir_tf.describe import models, whitening

    plain = models.build_descriptor_model("mobilenet", weights, alpha=0.25, pooling="gem")
    val = folder.list_labelled(os.path.join(data, "validation")).paths
    learn = descriptors.extract(plain, val, image_size=image_size, progress=False).descriptors
    white = whitening.learn_pca_whitening(learn, shrinkage=0.5, info={"backbone": "mobilenet"})
    return models.build_descriptor_model(
        "mobilenet", weights, alpha=0.25, pooling="gem", whitening=white
    ), len(val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=0, help="first N test photos (0 = all)")
    parser.add_argument("--out", default="", help="write <out>.json and <out>.md")
    args = parser.parse_args()

    shared = shared_dir()
    weights, data = os.path.join(shared, WEIGHTS_FILE), os.path.join(shared, DATA)
    for path in (weights, data):
        if not os.path.exists(path):
            sys.exit(f"{path} not found: point CBIR_SHARED at the shared folder")

    import tensorflow as tf

    from cbir_tf import train as finetune
    from cbir_tf.data import folder
    from cbir_tf.data.decode import load_resized
    from cbir_tf.describe import extract as descriptors
    from cbir_tf.export import formats as export

    test = folder.list_labelled(os.path.join(data, "test"))
    paths, labels = list(test.paths), np.asarray(test.labels)
    if args.limit:
        paths, labels = paths[: args.limit], labels[: args.limit]
    size = args.image_size
    model, n_val = build_model(weights, size, data)
    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs; {len(paths)} test photos, "
        f"whitening learned on {n_val} validation photos; image size {size}"
    )

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    ref = descriptors.extract(model, paths, image_size=size, progress=False)
    results["keras"] = {"end_to_end_img_s": len(paths) / (time.perf_counter() - t0)}
    keras_desc = ref.descriptors
    pixels = [load_resized(p, size).astype(np.float32)[None] for p in paths]
    call = descriptors.build_extract_function(model).get_concrete_function()
    _, results["keras"]["network_img_s"] = timed(lambda x: call(tf.constant(x)), pixels)

    source = export.ExportSource(model, size)
    outputs = {"keras": keras_desc}
    with tempfile.TemporaryDirectory() as tmp:
        sm = tf.saved_model.load(export.export_saved_model(source, os.path.join(tmp, "sm")))
        serve = sm.signatures["serving_default"]
        from_pixels = sm.signatures["descriptors_from_pixels"]
        blobs = [tf.constant([open(p, "rb").read()]) for p in paths]
        outputs["saved_model"], rate = timed(
            lambda b: serve(image_bytes=b)["descriptors"], blobs, rounds=1
        )
        _, net_rate = timed(lambda x: from_pixels(pixels=tf.constant(x))["descriptors"], pixels)
        results["saved_model"] = {"end_to_end_img_s": rate, "network_img_s": net_rate}
        for quantization in export.QUANTIZATIONS:
            path = export.export_tflite(
                source, os.path.join(tmp, f"{quantization}.tflite"), quantization
            )
            interpreter = export.tflite_interpreter(path, num_threads=os.cpu_count())
            key = f"tflite-{quantization}"
            outputs[key], rate = timed(lambda x, it=interpreter: export.run_tflite(it, x), pixels)
            results[key] = {"network_img_s": rate, "file_mb": os.path.getsize(path) / 2**20}

    keras_map = finetune.leave_one_out_map(keras_desc, labels)[0]
    for key, desc in outputs.items():
        r = results[key]
        r["max_abs_diff"] = float(np.abs(desc - keras_desc).max())
        cos = np.sum(desc * keras_desc, axis=1) / np.linalg.norm(desc, axis=1)
        r["mean_cosine"], r["min_cosine"] = float(cos.mean()), float(cos.min())
        r["map"] = float(finetune.leave_one_out_map(desc.astype(np.float32), labels)[0])
        r["map_diff"] = r["map"] - keras_map
    portrait = np.array([h > w for h, w in (p.shape[1:3] for p in pixels)])
    diff = np.abs(outputs["saved_model"] - keras_desc).max(axis=1)
    results["saved_model"]["max_abs_diff_landscape_square"] = float(diff[~portrait].max())
    results["saved_model"]["num_portrait"] = int(portrait.sum())

    lines = [
        "| export | max abs diff | mean cosine | mAP | mAP - Keras | img/s network | "
        "img/s end to end |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        e2e = f"{r['end_to_end_img_s']:.1f}" if "end_to_end_img_s" in r else "-"
        lines.append(
            f"| {key} | {r['max_abs_diff']:.2e} | {r['mean_cosine']:.6f} | {r['map']:.4f} | "
            f"{r['map_diff']:+.4f} | {r['network_img_s']:.1f} | {e2e} |"
        )
    table = "\n".join(lines)
    print(table)
    print(
        f"saved_model on the {int((~portrait).sum())} landscape/square photos: max abs diff "
        f"{results['saved_model']['max_abs_diff_landscape_square']:.2e}"
    )
    if args.out:
        meta = {
            "image_size": size,
            "num_test": len(paths),
            "num_val": n_val,
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
        }
        with open(args.out + ".json", "w") as f:
            json.dump({"settings": meta, "results": results}, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(f"# `benchmarks/export.py`\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
