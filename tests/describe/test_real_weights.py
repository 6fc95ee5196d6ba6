"""Real-data check (issue 3): real ImageNet weights retrieve real photos better than random ones.

MobileNet(alpha=0.25) with the official Keras ImageNet file, leave-one-out retrieval on the 372
photos of clothing-small/test (10 classes): every photo queries all the others, its positives
being the other photos of its class. mAP must clearly beat the same backbone with random weights
(weights='none', fixed seed), for MAC, GeM and R-MAC. Run with `pytest -s` to see the figures
(they are also in the assertion message).

Feature maps are computed once per weight setting and pooled three ways.
"""

from __future__ import annotations

import pathlib
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_path

from cbir_tf.data.pipeline import image_dataset
from cbir_tf.describe.backbones import build_backbone
from cbir_tf.describe.models import Preprocess
from cbir_tf.describe.ops import pooling as pooling_ops
from cbir_tf.describe.ops.normalization import l2_normalize
from cbir_tf.evaluate.metrics import compute_map

pytestmark = pytest.mark.slow

WEIGHTS_FILE = "mobilenet_2_5_224_tf_no_top.h5"
IMAGE_SIZE = 224
# ImageNet must beat random weights by at least this much mAP, for every pooling.
MIN_MARGIN = 0.1
EXTENSIONS = (".jpg", ".jpeg", ".png")


def _collection(root: pathlib.Path) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels), classes


def _feature_maps(weights: str, images: list[np.ndarray]) -> list[np.ndarray]:
    keras.utils.set_random_seed(0)  # the random-weights network is the same on every run
    backbone = build_backbone("mobilenet", weights, alpha=0.25)
    preprocess = Preprocess("mobilenet")

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)])
    def forward(x):
        return backbone(preprocess(x))

    return [forward(tf.constant(img[None], tf.float32)).numpy() for img in images]


@tf.function(input_signature=[tf.TensorSpec([1, None, None, None], tf.float32)])
def _pool(feature_map):
    return {
        "mac": pooling_ops.mac(feature_map),
        "gem": pooling_ops.gem(feature_map, p=3.0),
        "rmac": pooling_ops.rmac(feature_map, levels=3),
    }


def _descriptors(feature_maps: list[np.ndarray]) -> dict[str, np.ndarray]:
    # Keras' random MobileNet has activations near 1e-16 (its initialisation shrinks them at
    # every block), where the 1e-6 eps of the L2 normalisations would swamp them. MAC, GeM and
    # R-MAC are positively homogeneous, so one global scale per weight setting changes no
    # ranking except for that eps: it makes the comparison fair to the random network.
    scale = max(float(np.abs(f).max()) for f in feature_maps) or 1.0
    pooled: dict[str, list[np.ndarray]] = {"mac": [], "gem": [], "rmac": []}
    for f in feature_maps:
        for name, vector in _pool(tf.constant(f / scale)).items():
            pooled[name].append(vector.numpy()[0])
    return {k: l2_normalize(np.stack(v)).numpy() for k, v in pooled.items()}


def _leave_one_out_map(descriptors: np.ndarray, labels: np.ndarray) -> float:
    scores = descriptors @ descriptors.T
    ranks = np.argsort(-scores, axis=1, kind="stable")
    gnd = [
        # The query itself is in the database: junk, removed before AP is computed.
        {
            "ok": np.flatnonzero((labels == labels[q]) & (np.arange(len(labels)) != q)),
            "junk": np.array([q]),
        }
        for q in range(len(labels))
    ]
    mean_ap, *_ = compute_map(ranks, gnd)
    return float(mean_ap)


@pytest.mark.slow
def test_imagenet_weights_beat_random_weights():
    weights = shared_path("weights", WEIGHTS_FILE)
    data = shared_path("data", "clothing-small", "test")
    start = time.perf_counter()
    paths, labels, classes = _collection(data)
    assert len(paths) > 300 and len(classes) == 10

    items = list(image_dataset(paths, IMAGE_SIZE).as_numpy_iterator())
    errors = {paths[int(x["index"])]: x["error"].decode() for x in items if x["error"]}
    assert not errors, errors
    images = [x["image"] for x in items]
    assert all(max(img.shape[:2]) == IMAGE_SIZE for img in images)

    results = {}
    for setting, w in (("imagenet", str(weights)), ("random", "none")):
        descriptors = _descriptors(_feature_maps(w, images))
        results[setting] = {k: _leave_one_out_map(d, labels) for k, d in descriptors.items()}
    # Chance level: a random ranking's AP is about the fraction of positives in the database.
    counts = np.bincount(labels)
    chance = float(np.mean((counts[labels] - 1) / (len(labels) - 1)))

    table = "\n".join(
        f"  {p:5s} imagenet {results['imagenet'][p]:.4f}  random {results['random'][p]:.4f}"
        for p in ("mac", "gem", "rmac")
    )
    report = (
        f"leave-one-out mAP, MobileNet(alpha=0.25), clothing-small/test ({len(paths)} photos, "
        f"{len(classes)} classes, longest side {IMAGE_SIZE}; chance ~{chance:.4f}; "
        f"{time.perf_counter() - start:.0f} s):\n{table}"
    )
    print("\n" + report)
    for p in ("mac", "gem", "rmac"):
        assert results["imagenet"][p] >= results["random"][p] + MIN_MARGIN, report
        assert results["imagenet"][p] > 2 * chance, report
