"""What a training run leaves: the descriptor model, its whitening, model.json, the result.

workdir/model.keras     the descriptor model (backbone ▸ pooling ▸ [projection | whitening]
                        ▸ L2), in float32, loadable with safe_mode=True; `cbir_tf.json`
                        inside it carries its training image size (`models.saved_model_info`)
workdir/model.json      how it was made: backbone, pooling, whitening, val mAP, history,
                        settings (a finished run is recognised by them)
workdir/whitening.npz   the learned whitening (metric recipe, when kept)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import keras
import numpy as np

from cbir_tf import fileio
from cbir_tf.describe import catalog, models, whitening
from cbir_tf.describe.layers import GeM
from cbir_tf.train.data import TrainingData
from cbir_tf.train.network import TrainingModels, descriptor_model
from cbir_tf.train.settings import Settings
from cbir_tf.train.validation import describe, leave_one_out_map

MODEL_FILE = "model.keras"


@dataclasses.dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
      model_path: the saved `.keras` descriptor model.
      descriptor: 'pooled' or 'projected' (head), 'pooled' or 'whitened' (metric).
      best_val_map: best validation leave-one-out mAP (NaN without validation).
      off_the_shelf_val_map: validation mAP of the untrained descriptor.
      best_epoch: 0-based epoch of the best weights.
      history: one dict per epoch (loss, val maps, seconds, ...).
      train_seconds: wall time of the epochs of this run (a resumed run: this part only).
      skipped: (image, reason) of images that could not be read.
    """

    model_path: str
    descriptor: str
    best_val_map: float
    off_the_shelf_val_map: float
    best_epoch: int
    history: list[dict[str, Any]]
    train_seconds: float
    skipped: list[tuple[str, str]]


def as_float(x: Any) -> float:
    """`x` as a float; None (no validation) as NaN."""
    return float("nan") if x is None else float(x)


def trained_gem_p(networks: TrainingModels) -> float | None:
    """GeM's trained p (None for a descriptor without GeM)."""
    gems = [layer for layer in networks.descriptor.layers if isinstance(layer, GeM)]
    return float(np.ravel(gems[0].get_weights()[0])[0]) if gems else None


def final_descriptor_kind(settings: Settings, state: dict[str, Any]) -> str:
    """'pooled' or 'projected': the descriptor the saved model computes (before whitening)."""
    if settings.recipe == "metric":
        return "pooled"
    if settings.descriptor != "auto":
        return settings.descriptor
    if state.get("best_kind"):
        return state["best_kind"]
    # No validation to choose by: the projection when it was trained, else the pooled vector.
    return "projected" if state.get("history") else "pooled"


def learn_whitening(
    settings: Settings, networks: TrainingModels, data: TrainingData, state: dict[str, Any], say
) -> tuple[whitening.Whitening | None, float | None]:
    """PCA-whitening learned on the training images' descriptors; 'auto' keeps it if it helps.

    Args:
      settings: whitening mode, dimension and shrinkage; image and batch size.
      networks: the trained networks (`networks.descriptor` describes the images).
      data: training images (learning) and validation images (the 'auto' choice).
      state: the run's state; the validation mAP before and after whitening is recorded there.
      say: prints a progress line.

    Returns:
      (the whitening kept or None, the validation mAP of the descriptor kept; None without
      validation).
    """
    embed = networks.embed(networks.descriptor)

    def describe_all(images):
        return describe(
            networks.descriptor, images, None, settings.image_size, settings.batch_size, embed
        )

    train_desc = describe_all(data.train)
    dim = settings.whitening_dim if 0 < settings.whitening_dim <= train_desc.shape[1] else 0
    white = whitening.learn_pca_whitening(
        train_desc,
        dim=dim,
        shrinkage=settings.whitening_shrinkage,
        info={"backbone": settings.backbone, "learned_on": "fine-tuning training images"},
    )
    if data.val is None:
        return (white if settings.whitening == "pca" else None), None
    val_desc = describe_all(data.val)
    plain = leave_one_out_map(val_desc, data.val.labels)[0]
    whitened = leave_one_out_map(whitening.apply_whitening(val_desc, white), data.val.labels)[0]
    keep = settings.whitening == "pca" or whitened >= plain
    say(
        f"whitening learned on {train_desc.shape[0]} training descriptors: val mAP "
        f"{plain:.4f} -> {whitened:.4f} ({'kept' if keep else 'not kept'})"
    )
    state["val_map_before_whitening"] = plain
    state["val_map_whitened"] = whitened
    return (white, whitened) if keep else (None, plain)


def _copy_weights(src: keras.layers.Layer, dst: keras.layers.Layer) -> None:
    dst.set_weights([np.asarray(w) for w in src.get_weights()])


def final_model(
    settings: Settings,
    networks: TrainingModels,
    kind: str,
    white: whitening.Whitening | None,
) -> keras.Model:
    """The descriptor model to save, rebuilt in float32 with the trained weights copied in.

    Call it outside the run's mixed-precision scope: the model computes in the global policy.

    Args:
      settings: backbone, weights, pooling of the run.
      networks: the trained networks.
      kind: 'pooled' or 'projected' (the head's projection, L2-normalised).
      white: a whitening to place after the pooling (metric recipe), or None.

    Returns:
      raw RGB float32 [B, H, W, 3] -> float32 [B, D] descriptors.
    """
    spec = catalog.get_spec(settings.backbone)
    # Same `weights` argument as training: some constructors (EfficientNet) change their
    # layers with it; the values themselves are overwritten below.
    final = descriptor_model(settings, gem_p=trained_gem_p(networks), whitening=white)
    # Every layer with weights (backbone, GeM, a transformer's embedding head) by name.
    for layer in networks.descriptor.layers:
        if layer.weights and layer.name != "whitening":
            _copy_weights(layer, final.get_layer(layer.name))
    name = models.pooling_layer_name(settings.pooling)
    if kind != "projected":
        return final
    dense = keras.layers.Dense(settings.dense_units, name="projection", dtype="float32")
    x = dense(final.get_layer(name).output)
    _copy_weights(networks.train.get_layer("projection"), dense)
    out = models.unit_normalization("l2", dtype="float32")(x)
    return keras.Model(final.input, out, name=f"{spec.name}_{settings.pooling}_projected")


def model_info(settings: Settings, descriptor: str) -> dict[str, Any]:
    """Carried inside model.keras: extraction uses `image_size`, the resolution it was
    trained and validated at, unless the user asks for another."""
    info = {
        "image_size": settings.image_size,
        "backbone": settings.backbone,
        "pooling": settings.pooling,
        "recipe": settings.recipe,
        "descriptor": descriptor,
    }
    if catalog.get_spec(settings.backbone).has_alpha:
        info["alpha"] = settings.alpha
    return info


def save_model(model: keras.Model, workdir: str, info: dict[str, Any]) -> str:
    """Writes `workdir/model.keras` atomically with `info` inside; returns its path."""
    return models.save_descriptor_model(model, os.path.join(workdir, MODEL_FILE), info)


def write_model_json(
    workdir: str,
    settings: Settings,
    result: TrainResult,
    class_names: list[str],
    white: whitening.Whitening | None,
    data: TrainingData,
) -> None:
    """Writes `workdir/model.json`: how the model was made, its figures and the settings."""
    info = {
        "model": os.path.basename(result.model_path),
        "recipe": settings.recipe,
        "backbone": settings.backbone,
        "alpha": settings.alpha,
        "initial_weights": settings.weights,
        "pooling": settings.pooling,
        "descriptor": result.descriptor,
        "gem_p_initial": settings.gem_p,
        "image_size": settings.image_size,
        "whitening": None if white is None else white.info,
        "train_data": data.source,
        "val_data": data.val_source,
        "num_train_images": len(data.train),
        "num_val_images": 0 if data.val is None else len(data.val),
        "class_names": list(class_names),
        "best_val_map": result.best_val_map,
        "off_the_shelf_val_map": result.off_the_shelf_val_map,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
        "skipped_images": [list(x) for x in result.skipped],
        "history": result.history,
        "settings": settings.as_dict(),
    }
    fileio.atomic_write_json(os.path.join(workdir, "model.json"), info)


def result_from_json(workdir: str) -> TrainResult:
    """The result of the finished run in `workdir`, read back from its model.json."""
    with open(os.path.join(workdir, "model.json"), encoding="utf-8") as f:
        info = json.load(f)
    best_epoch = info.get("best_epoch")
    return TrainResult(
        model_path=os.path.join(workdir, info.get("model", MODEL_FILE)),
        descriptor=info.get("descriptor", "pooled"),
        best_val_map=as_float(info.get("best_val_map")),
        off_the_shelf_val_map=as_float(info.get("off_the_shelf_val_map")),
        best_epoch=int(best_epoch) if best_epoch is not None else -1,
        history=info.get("history", []),
        train_seconds=0.0,
        skipped=[tuple(x) for x in info.get("skipped_images", [])],
    )
