"""Real-data check of fine-tuning (issue 5): does training raise retrieval mAP on unseen photos?

MobileNet (alpha 0.25) with the official Keras ImageNet weights, GeM pooling, on the
clothing-small photos of ../shared/data (10 classes; train/, validation/, test/ folders):

  1. off-the-shelf: the ImageNet descriptor (same backbone and pooling, p = 3);
  2. fine-tuned: `cbir_tf.finetune.train` on train/ (validation mAP on validation/ each epoch,
     best epoch kept), saved as a .keras model and loaded back with safe_mode=True;

then leave-one-out mAP on test/ (each test photo queries the other test photos; positives are
the photos of its class) with descriptors computed by `cbir_tf.describe.extract.extract` from the
image files, exactly as extract.py would. Prints both figures, the gain and the training time.

Run (2 shared CPU cores: a few minutes; images decoded once and kept in memory):
  python benchmarks/finetune_clothing.py                      # both recipes
  python benchmarks/finetune_clothing.py --recipe=metric     # one recipe
  python benchmarks/finetune_clothing.py --image_size=224 --epochs=5 --json=figures.json
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


def make_config(args, recipe: str, weights: str):
    from cbir_tf import config as config_lib

    c = config_lib.load_config("train_head" if recipe == "head" else "train_metric")
    c.model.backbone = "mobilenet"
    c.model.alpha = 0.25
    c.model.weights = weights
    c.model.pooling = "gem"
    c.model.gem_p = 3.0
    t = c.train
    t.image_size = args.image_size
    t.cache = "memory"
    t.seed = args.seed
    t.early_stopping_patience = 0
    if recipe == "head":
        t.epochs = args.epochs
        t.batch_size = 32
        t.learning_rate = 1e-3
        t.fine_tune_blocks = args.fine_tune_blocks
        t.fine_tune_epochs = args.fine_tune_epochs
        t.fine_tune_learning_rate = 1e-4
        t.dense_units = 256
        t.dropout = 0.3
        t.descriptor = "auto"
    else:
        t.epochs = args.epochs
        t.batch_size = 5 * (2 + args.num_negatives)  # 5 tuples per step
        t.learning_rate = args.metric_lr
        t.num_negatives = args.num_negatives
        t.tuples_per_epoch = args.tuples_per_epoch
        t.pool_size = args.pool_size
        t.loss = "contrastive"
        t.margin = 0.7
        t.whitening = "auto"
    return c


def test_map(model, paths: list[str], labels: np.ndarray, image_size: int) -> float:
    from cbir_tf import train as finetune
    from cbir_tf.describe import extract as descriptors

    result = descriptors.extract(model, paths, image_size=image_size, progress=False)
    if result.skipped:
        raise RuntimeError(f"test images could not be read: {result.skipped[:3]}")
    return finetune.leave_one_out_map(result.descriptors, labels)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=("head", "metric", "both"), default="both")
    parser.add_argument("--image_size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fine_tune_blocks", type=int, default=2, help="head: stage-2 blocks")
    parser.add_argument("--fine_tune_epochs", type=int, default=1, help="head: stage-2 epochs")
    parser.add_argument("--metric_lr", type=float, default=1e-4)
    parser.add_argument("--num_negatives", type=int, default=5)
    parser.add_argument("--tuples_per_epoch", type=int, default=400)
    parser.add_argument("--pool_size", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    shared = shared_dir()
    weights = os.path.join(shared, WEIGHTS_FILE)
    data = os.path.join(shared, DATA)
    for path in (weights, data):
        if not os.path.exists(path):
            sys.exit(f"{path} not found: point CBIR_SHARED at the shared folder")

    import tensorflow as tf

    from cbir_tf import train as finetune
    from cbir_tf.data import folder
    from cbir_tf.describe import models

    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, GPUs: "
        f"{len(tf.config.list_physical_devices('GPU'))}"
    )
    test_paths, test_labels, test_classes = folder.list_labelled(os.path.join(data, "test"))
    n_train = len(folder.list_labelled(os.path.join(data, "train")).paths)
    print(
        f"clothing-small: {n_train} train, {len(test_paths)} test photos, "
        f"{len(test_classes)} classes; image size {args.image_size}"
    )

    t0 = time.perf_counter()
    base = models.build_descriptor_model(
        "mobilenet", weights=weights, alpha=0.25, pooling="gem", gem_p=3.0
    )
    base_map = test_map(base, test_paths, test_labels, args.image_size)
    print(
        f"off-the-shelf (ImageNet, GeM p=3) test mAP {base_map:.4f} "
        f"[{time.perf_counter() - t0:.1f}s]"
    )

    recipes = ("head", "metric") if args.recipe == "both" else (args.recipe,)
    figures = {"off_the_shelf": base_map, "image_size": args.image_size, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            workdir = os.path.join(args.workdir or tmp, f"clothing_{recipe}")
            config = make_config(args, recipe, weights)
            t0 = time.perf_counter()
            result = finetune.train(
                config,
                os.path.join(data, "train"),
                workdir,
                os.path.join(data, "validation"),
            )
            seconds = time.perf_counter() - t0
            model = models.load_descriptor_model(result.model_path, safe_mode=True)
            tuned_map = test_map(model, test_paths, test_labels, args.image_size)
            figures["recipes"][recipe] = {
                "test_map": tuned_map,
                "val_map": result.best_val_map,
                "val_map_off_the_shelf": result.off_the_shelf_val_map,
                "descriptor": result.descriptor,
                "train_seconds_total": seconds,
                "train_seconds_epochs": result.train_seconds,
                "epochs": len(result.history),
            }
            print(
                f"{recipe}: fine-tuned ({result.descriptor}) test mAP {tuned_map:.4f} vs "
                f"off-the-shelf {base_map:.4f} ({tuned_map - base_map:+.4f}); training "
                f"{seconds:.0f}s in all ({result.train_seconds:.0f}s of epochs, "
                f"{len(result.history)} epochs)"
            )

    print("\nrecipe   test mAP (off-the-shelf -> fine-tuned)   gain     training time")
    for recipe, f in figures["recipes"].items():
        print(
            f"{recipe:8s} {base_map:.4f} -> {f['test_map']:.4f}{'':22s}"
            f"{f['test_map'] - base_map:+.4f}  {f['train_seconds_total']:.0f}s"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    worse = [r for r, f in figures["recipes"].items() if f["test_map"] <= base_map]
    if worse:
        sys.exit(f"fine-tuning did not beat the off-the-shelf descriptor: {', '.join(worse)}")


if __name__ == "__main__":
    main()
