"""Validation of a training run: leave-one-out retrieval mAP of the validation images.

Every validation image queries all the others; its positives are the images of its class. The
descriptors are computed as extraction computes them (whole images, longest side `image_size`).
"""

from __future__ import annotations

import keras
import numpy as np

from cbir_tf.train import images as training
from cbir_tf.train.data import TrainingData
from cbir_tf.train.network import TrainingModels, embed_function
from cbir_tf.train.settings import Settings


def leave_one_out_map(
    descriptors: np.ndarray, labels: np.ndarray, max_pairs: int = 1 << 24
) -> tuple[float, np.ndarray]:
    """Retrieval mAP where every image queries all the others; positives share its label.

    Args:
      descriptors: float32 [N, D], L2-normalised.
      labels: int [N].
      max_pairs: queries are ranked in chunks of about max_pairs / N (bounded memory).

    Returns:
      (mAP over queries with at least one positive, aps float64 [N] with NaN for the others).
    """
    from cbir_tf.evaluate import metrics
    from cbir_tf.search import exact as search

    labels = np.asarray(labels)
    n = labels.size
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    aps = np.full(n, np.nan)
    # Queries in chunks: full rankings take 8 bytes per (query, image) pair.
    chunk = max(1, int(max_pairs) // max(n, 1))
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        ranks, _ = search.rank_all(descriptors[rows], descriptors)
        # The query itself is in the database: junk, so it neither helps nor hurts.
        gnd = [
            {"ok": members[labels[i]][members[labels[i]] != i], "junk": np.array([i])} for i in rows
        ]
        aps[rows] = metrics.compute_map(ranks, gnd, kappas=(1,), num_images=n)[1]
    valid = ~np.isnan(aps)
    return (float(np.mean(aps[valid])) if valid.any() else float("nan")), aps


def describe(
    model: keras.Model,
    images: training.TrainingImages,
    indices: np.ndarray | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    embed=None,
) -> np.ndarray:
    """Descriptors of whole images (longest side `image_size`), as extraction computes them.

    Args:
      model: raw RGB float32 [B, H, W, 3] -> [B, D].
      images: the images.
      indices: int [M] which images (default all).
      image_size: longest side.
      batch_size: images per forward pass (same-shape images are batched together).
      embed: a compiled `model` call to reuse (`embed_function(model)`).

    Returns:
      float32 [M, D].
    """
    indices = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
    embed = embed or embed_function(model)
    out: np.ndarray | None = None
    for pos, batch in training.eval_batches(images, indices, image_size, batch_size):
        vec = np.asarray(embed(batch), dtype=np.float32)
        if out is None:
            out = np.zeros((indices.size, vec.shape[1]), np.float32)
        out[pos] = vec
    return out if out is not None else np.zeros((0, 0), np.float32)


def validate(
    settings: Settings, networks: TrainingModels, data: TrainingData, kinds: tuple[str, ...]
) -> dict[str, float]:
    """Leave-one-out validation mAP of each descriptor kind ({} without validation images).

    Args:
      settings: image size and batch size of the run.
      networks: the run's networks ('pooled': `networks.descriptor`, 'projected': the head's
        projection).
      data: the run's images; `data.val` is validated.
      kinds: descriptor kinds to validate.

    Returns:
      {kind: mAP}.
    """
    if data.val is None:
        return {}
    out = {}
    for kind in kinds:
        model = networks.projected if kind == "projected" else networks.descriptor
        desc = describe(
            model, data.val, None, settings.image_size, settings.batch_size, networks.embed(model)
        )
        out[kind] = leave_one_out_map(desc, data.val.labels)[0]
    return out


def validation_kinds(settings: Settings) -> tuple[str, ...]:
    """The descriptor kinds a run validates each epoch: both of the head recipe's with 'auto'."""
    if settings.recipe == "metric" or settings.descriptor == "pooled":
        return ("pooled",)
    if settings.descriptor == "projected":
        return ("projected",)
    return ("pooled", "projected")
