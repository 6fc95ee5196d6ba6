"""Which image size suits a backbone's ImageNet weights, on real photos: mAP and speed.

`data.image_size` is the longest side images are shrunk to before the network. The landmark
benchmarks describe at 1024 px; ImageNet weights were trained on 224 px crops (MobileNet,
MobileNetV2, ResNet, VGG; EfficientNet-B1: 240). This measures, for one backbone and weights
file, leave-one-out retrieval mAP on clothing-small/test (each photo queries the others; its
positives are its class) and images per second of the whole extraction path (decoding
included), at several sizes and poolings: the figures behind docs/own-collections.md's advice.

Run:
  python benchmarks/image_size.py            # MobileNetV2 (alpha 1.0), 224 / 320 / 448 px
  python benchmarks/image_size.py --backbone=mobilenet --alpha=0.25 \
      --weights=weights/mobilenet_2_5_224_tf_no_top.h5 --sizes=224,448
The photos and weights are looked up in ../shared (or $CBIR_SHARED). The load average is
printed beside each figure: on a shared machine only the mAP is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from _data import DATA, shared_dir  # noqa: E402


def photos(folder: str) -> tuple[list[str], np.ndarray]:
    """The image files of a labelled folder (one sub-folder per class) and their labels."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            if f.lower().endswith((".jpg", ".jpeg", ".png")):
                paths.append(os.path.join(folder, name, f))
                labels.append(label)
    return paths, np.asarray(labels)


def measure(args, paths, labels, size: int, pooling: str) -> dict:
    """One setting: its leave-one-out mAP and images per second (load average beside it)."""
    from cbir_tf.describe.extract import extract
    from cbir_tf.describe.models import build_descriptor_model
    from cbir_tf.train.validation import leave_one_out_map

    model = build_descriptor_model(
        backbone=args.backbone, alpha=args.alpha, weights=args.weights_path, pooling=pooling
    )
    extract(model, paths[:2], image_size=size, progress=False)  # trace once, outside the timing
    start = time.perf_counter()
    res = extract(model, paths, image_size=size, progress=False)
    seconds = time.perf_counter() - start
    mean_ap, _ = leave_one_out_map(np.asarray(res.descriptors), labels)
    return {
        "image_size": size,
        "pooling": pooling,
        "mAP": round(float(mean_ap), 4),
        "images_per_second": round(len(paths) / seconds, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--weights", default="weights/mobilenet_v2_1.0_224_no_top.weights.h5")
    parser.add_argument("--sizes", default="224,320,448")
    parser.add_argument("--poolings", default="gem,rmac")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.weights_path = os.path.join(shared_dir(), args.weights)
    paths, labels = photos(os.path.join(shared_dir(), DATA, "test"))
    print(f"{args.backbone} (alpha {args.alpha:g}), {os.path.basename(args.weights)}: "
          f"{len(paths)} photos of {labels.max() + 1} classes")  # fmt: skip
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for pooling in args.poolings.split(","):
            row = measure(args, paths, labels, size, pooling)
            rows.append(row)
            print(f"{size:5d} px  {pooling:5s}  mAP {row['mAP']:.4f}  "
                  f"{row['images_per_second']:6.2f} img/s  load {row['load_average']}",
                  flush=True)  # fmt: skip
    base = {r["pooling"]: r for r in rows if r["image_size"] == rows[0]["image_size"]}
    for r in rows:
        b = base[r["pooling"]]
        print(f"{r['image_size']} px vs {b['image_size']} px, {r['pooling']}: "
              f"mAP {r['mAP'] - b['mAP']:+.4f}, "
              f"speed x{r['images_per_second'] / b['images_per_second']:.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"backbone": args.backbone, "alpha": args.alpha,
                       "weights": os.path.basename(args.weights), "photos": len(paths),
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
