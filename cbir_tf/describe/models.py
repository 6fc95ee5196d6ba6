"""Descriptor models: raw RGB image -> backbone's preprocessing -> feature map -> pooling ->
(whitening) -> L2-normalised global descriptor, as one serialisable Keras model.

Images with a side under 32 pixels are edge-extended to 32 first (`EdgePad`, identity for
larger images), so that 1 x 1 or 8 x 4000 photos still give a descriptor on every backbone.

The model holds no Python code outside registered layers (no `Lambda`), so a saved `.keras` file
loads with `safe_mode=True`, i.e. without running code stored in the file.

Whitening placement follows the reference (cnnimageretrieval-pytorch `whitenapply`): it is
learned on the stored, L2-normalised descriptors, so the model applies it to the L2-normalised
pooled vector and L2-normalises again:
    pool -> L2 -> PCAWhitening -> L2
and, for R-MAC with regional whitening (Tolias et al., ICLR 2016):
    RMAC(return_regions) -> L2 -> PCAWhitening -> L2 -> SumRegions -> L2.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

import keras
import tensorflow as tf

from cbir_tf.config import default
from cbir_tf.describe import backbones, catalog, token_models
from cbir_tf.describe.layers import (
    MAC,
    RMAC,
    ClassToken,
    GeM,
    L2Normalization,
    PatchGrid,
    PCAWhitening,
    SnapToPatches,
    SPoC,
    SumRegions,
)

log = logging.getLogger(__name__)

__all__ = [
    "EdgePad",
    "Preprocess",
    "UnsafeModelError",
    "build_descriptor_model",
    "feature_scale",
    "image_size_for_model",
    "load_descriptor_model",
    "unit_normalization",
]

OUTPUTS = ("descriptor", "regions")
MIN_IMAGE_SIZE = 32  # the backbones' total stride: every one gives >= 1 feature cell
# Lower bound of the norm a descriptor is divided by: far below the norms of any network's
# pooled activations (a random MobileNet's vanish to ~1e-8), so descriptors are unit length.
UNIT_EPS = 1e-12


def unit_normalization(name: str, **kwargs: Any) -> L2Normalization:
    """The L2 normalisation of a descriptor: exactly unit length, whatever its scale."""
    return L2Normalization(eps=UNIT_EPS, clamp=True, name=name, **kwargs)


class UnsafeModelError(ValueError):
    """A saved model holds Python code (a `Lambda` layer) and safe_mode refused to load it."""


@keras.saving.register_keras_serializable(package="cbir_tf")
class Preprocess(keras.layers.Layer):
    """Applies a backbone's own `preprocess_input` to raw RGB float 0..255 images.

    VGG16/ResNet: RGB -> BGR and ImageNet mean subtraction (caffe); MobileNet(V2): scaling to
    [-1, 1]; EfficientNet(V2), ConvNeXt: identity (their normalisation is inside the network);
    DINOv2/v3, CLIP, SigLIP: (x / 255 - mean) / std of their training. Shape-agnostic, so it
    works with dynamic spatial sizes, and serialisable by the backbone's registry name (the
    function is looked up again on load, not pickled).

    Args:
      backbone: a name of `cbir_tf.describe.catalog.names()`.
      **kwargs: base Layer arguments.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = catalog.get_spec(backbone).name

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        return catalog.get_spec(self.backbone).preprocess_input(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"backbone": self.backbone})
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class EdgePad(keras.layers.Layer):
    """Edge-replicates images smaller than `min_size` up to `min_size` (centred); else identity.

    VGG16 needs 16 pixels per side and EfficientNet 2 before they produce a feature map at all;
    padding every side below the networks' total stride (32) to 32 lets a 1 x 1 or 8 x 4000
    image still give a descriptor. Edge replication adds no colour that is not in the image.

    Args:
      min_size: smallest height and width passed on.
      **kwargs: base Layer arguments.
    """

    def __init__(self, min_size: int = MIN_IMAGE_SIZE, **kwargs):
        super().__init__(**kwargs)
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        self.min_size = int(min_size)

    def call(self, inputs):
        x = inputs
        for axis in (1, 2):
            size = tf.shape(x)[axis]
            target = tf.maximum(size, self.min_size)
            before = (target - size) // 2
            # Clamped indices replicate the first/last row (column) into the padding.
            index = tf.clip_by_value(tf.range(target) - before, 0, size - 1)
            x = tf.gather(x, index, axis=axis)
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in (1, 2):
            if shape[axis] is not None:
                shape[axis] = max(shape[axis], self.min_size)
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"min_size": self.min_size})
        return config


def _pooling_layer(pooling: str, gem_p: float, rmac_levels: int, return_regions: bool = False):
    if pooling == "mac":
        return MAC(name="mac")
    if pooling == "spoc":
        return SPoC(name="spoc")
    if pooling == "gem":
        return GeM(p=gem_p, name="gem")
    return RMAC(levels=rmac_levels, return_regions=return_regions, name="rmac")


def _check_whitening(whitening: Any, channels: int, backbone: str, alpha: float) -> None:
    input_dim = int(whitening.projection.shape[0])
    if input_dim != channels:
        raise ValueError(
            f"the whitening was learned on {input_dim}-dimensional vectors but {backbone} "
            f"(alpha={alpha:g}) gives {channels}: it belongs to another backbone; learn it again "
            "for this one"
        )
    info = getattr(whitening, "info", None) or {}
    learned_for = info.get("backbone")
    if learned_for and str(learned_for).lower() != backbone:
        raise ValueError(
            f"the whitening was learned for backbone {learned_for!r}, not {backbone!r}; learn "
            "it again for this backbone"
        )


def build_descriptor_model(
    backbone: str = default("model.backbone"),
    weights: str | os.PathLike | None = default("model.weights"),
    alpha: float = default("model.alpha"),
    pooling: str = default("model.pooling"),
    gem_p: float = default("model.gem_p"),
    rmac_levels: int = default("model.rmac_levels"),
    weights_fallback: str = default("model.weights_fallback"),
    *,
    whitening: Any = None,
    regional_whitening: bool = False,
    output: str = "descriptor",
    safe_mode: bool = True,
    **backbone_kwargs: Any,
) -> keras.Model:
    """Builds the descriptor model a config's `model` block describes: `(**cfg.model)`.

    Args:
      backbone: registry name (`cbir_tf.describe.catalog.names()`: a `keras.applications` CNN or
        a KerasHub vision transformer).
      weights: 'imagenet', 'none', a local `.h5` / `.weights.h5` file of the no-top backbone,
        or a saved `.keras` descriptor model (used as it is, `whitening` appended); for a
        transformer 'imagenet' / 'pretrained' is its KerasHub preset, and a folder (KerasHub
        preset or Hugging Face checkpoint) or 'hf://...' handle is accepted (see
        `cbir_tf.describe.transformers`).
      alpha: width multiplier (mobilenet, mobilenetv2).
      pooling: 'auto' (the backbone's recipe: R-MAC for CNNs, the class token for DINOv2/v3,
        the image embedding head for CLIP/SigLIP), 'mac', 'spoc', 'gem', 'rmac'; transformers
        also 'cls', 'cls+gem', 'head' (see `cbir_tf.describe.catalog`).
      gem_p: initial GeM power (trainable).
      rmac_levels: R-MAC region levels.
      weights_fallback: weights used when ImageNet's cannot be downloaded ('' = fail; see
        `backbones.resolve_weights`).
      whitening: a `cbir_tf.describe.whitening.Whitening` learned on this model's descriptors
        (or, with `regional_whitening`, on its L2-normalised region vectors); None for none.
      regional_whitening: R-MAC only: whiten the regional vectors (classic R-MAC) instead of the
        final descriptor.
      output: 'descriptor', or 'regions' (R-MAC only: the raw regional vectors, to learn a
        regional whitening).
      safe_mode: as `load_descriptor_model` (a `.keras` model only).
      **backbone_kwargs: passed to `build_backbone` (cache_dir, download_timeout, seed; a
        transformer takes seed only).

    Returns:
      keras.Model named '<backbone>_<pooling>': raw RGB float32 0..255 [B, None, None, 3] ->
      float32 [B, D] L2-normalised descriptors (D = channels, twice the token width for
      'cls+gem', the head's width for 'head', or the whitening's output dim);
      with output='regions': float32 [B, R, C] raw region MACs, whole map first.

    Raises:
      KeyError / ValueError: unknown backbone / pooling / output, or an invalid combination
        (regions or regional whitening without R-MAC, whitening of another dimension).
      cbir_tf.describe.backbones.WeightsUnavailableError, WeightsFileError: see `build_backbone`.
    """
    if weights is not None and os.fspath(weights).strip().lower().endswith(".keras"):
        if regional_whitening or output != "descriptor":
            raise ValueError(
                "a saved .keras model gives final descriptors only: regional whitening and "
                "output='regions' need a model built from a backbone"
            )
        return _saved_with_whitening(weights, whitening, safe_mode)
    weights, _ = catalog.resolve_weights(backbone, alpha, weights, weights_fallback)
    pooling = catalog.resolve_pooling(backbone, pooling)
    _check_output(pooling, output, whitening, regional_whitening)
    spec = catalog.get_spec(backbone)
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = EdgePad(name="edge_pad")(image)
    if catalog.is_transformer(spec.name):
        if float(alpha) != 1.0:  # refused as for the CNNs without a width multiplier
            with_alpha = [s.name for s in backbones.BACKBONES.values() if s.has_alpha]
            raise ValueError(
                f"alpha={float(alpha):g} applies only to {' and '.join(with_alpha)}, not "
                f"{spec.name}"
            )
        grid, pooled = _transformer_features(
            spec.name, weights, x, pooling, gem_p, **backbone_kwargs
        )
    else:
        channels = spec.num_channels(float(alpha))
        if whitening is not None:  # before the (costly) backbone is built
            _check_whitening(whitening, channels, spec.name, float(alpha))
        features = backbones.build_backbone(spec.name, weights, alpha, **backbone_kwargs)
        grid, pooled = features(Preprocess(spec.name, name="preprocess")(x)), None
    if output == "regions":
        out = _pooling_layer(pooling, gem_p, rmac_levels, return_regions=True)(grid)
    elif regional_whitening:
        _check_whitening(whitening, int(grid.shape[-1]), spec.name, float(alpha))
        x = _pooling_layer(pooling, gem_p, rmac_levels, return_regions=True)(grid)
        x = L2Normalization(name="region_l2")(x)
        x = PCAWhitening.from_whitening(whitening, name="whitening")(x)
        x = L2Normalization(name="whitened_region_l2")(x)
        x = SumRegions(name="sum_regions")(x)
        out = unit_normalization("l2", dtype="float32")(x)
    else:
        x = pooled if pooled is not None else _pooling_layer(pooling, gem_p, rmac_levels)(grid)
        if whitening is not None:
            _check_whitening(whitening, int(x.shape[-1]), spec.name, float(alpha))
            x = unit_normalization("pooled_l2")(x)
            x = PCAWhitening.from_whitening(whitening, name="whitening")(x)
        out = unit_normalization("l2", dtype="float32")(x)
    return keras.Model(image, out, name=f"{spec.name}_{pooling_layer_name(pooling)}")


def pooling_layer_name(pooling: str) -> str:
    """The name of the layer (or head model) giving the pooled vector of a descriptor model."""
    return str(pooling).replace("+", "_")


def _check_output(pooling: str, output: str, whitening: Any, regional_whitening: bool) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; valid outputs: {', '.join(OUTPUTS)}")
    if output == "regions" and pooling != "rmac":
        raise ValueError("output='regions' needs pooling='rmac'")
    if regional_whitening and pooling != "rmac":
        raise ValueError("regional_whitening needs pooling='rmac'")
    if regional_whitening and whitening is None:
        raise ValueError("regional_whitening=True needs a whitening learned on region vectors")
    if output == "regions" and whitening is not None:
        raise ValueError("output='regions' gives raw region vectors: pass no whitening")


def _transformer_features(
    name: str, weights: Any, image: Any, pooling: str, gem_p: float, seed: int = 0
) -> tuple[Any, Any]:
    """(patch grid [B, h, w, D] or None, pooled vector or None) of a transformer backbone.

    The image is snapped to the patch grid, normalised, and turned into tokens; the CNN
    poolings get the patch tokens laid back on their grid, 'cls' the class token, 'head' the
    model's own embedding head, 'cls+gem' the L2-normalised class token and GeM of the patches
    side by side.
    """
    parts = token_models.build_transformer(name, weights, seed=seed)
    x = SnapToPatches(parts.patch_size, name="snap_to_patches")(image)
    x = Preprocess(name, name="preprocess")(x)
    tokens = parts.tokens(x)
    if pooling == "head":
        # A plain layer gives the pooled vector its name (`pooling_layer_name`), so that
        # training can reach its output in this graph (a nested model's `.output` is its own).
        return None, keras.layers.Identity(name="head")(parts.head(tokens))
    if pooling == "cls":
        return None, ClassToken(name="cls")(tokens)
    grid = PatchGrid(parts.patch_size, parts.num_prefix, name="patch_grid")([tokens, x])
    if pooling != "cls+gem":
        return grid, None
    cls = unit_normalization("cls_l2")(ClassToken(name="cls")(tokens))
    patches = unit_normalization("gem_l2")(GeM(p=gem_p, name="gem")(grid))
    return grid, keras.layers.Concatenate(name=pooling_layer_name(pooling))([cls, patches])


def feature_scale(model: keras.Model, images: Any) -> float | None:
    """Largest absolute activation of the feature map a descriptor model pools, over `images`.

    A random network's activations can vanish (~1e-8 for a random MobileNet): its descriptors
    are still unit vectors, but carry little signal, which a report must say.

    Args:
      model: a descriptor model holding one of this toolkit's pooling layers.
      images: iterable of float or uint8 [H, W, 3] RGB images (0..255).

    Returns:
      The largest |activation|, or None when `model` has no such pooling layer (or no image).
    """
    pools = [layer for layer in model.layers if isinstance(layer, (MAC, SPoC, GeM, RMAC))]
    if not pools:
        return None
    probe = keras.Model(model.input, pools[0].input)
    scales = [
        float(tf.reduce_max(tf.abs(probe(tf.cast(image, tf.float32)[None], training=False))))
        for image in images
    ]
    return max(scales) if scales else None


def _unsafe_message(path: str, error: Exception) -> str:
    return (
        f"{path} contains a Lambda layer (or other stored Python code), which Keras refuses to "
        f"load with safe_mode=True: loading it would run code written into the file. Descriptor "
        f"models of this toolkit never need one. If you wrote the file yourself or trust where "
        f"it came from, load it with load_descriptor_model(path, safe_mode=False); never do so "
        f"for a file from an unknown source, since it can execute arbitrary code on this "
        f"machine. (Keras said: {error})"
    )


def load_descriptor_model(path: str | os.PathLike, safe_mode: bool = True) -> keras.Model:
    """Loads a saved `.keras` descriptor model (e.g. written by train.py).

    Args:
      path: the `.keras` file.
      safe_mode: refuse files holding Python code (Lambda layers). Turn off only for files you
        trust.

    Returns:
      The keras.Model: raw RGB float32 [B, None, None, 3] -> float32 [B, D].

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a `.keras` file, or a damaged one (truncated).
      UnsafeModelError: a Lambda layer refused by safe_mode.
    """
    path = os.path.expanduser(os.fspath(path))
    if not path.lower().endswith(".keras"):
        raise ValueError(f"{path}: expected a saved Keras model (.keras)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} not found")
    damaged = (
        f"{path} is damaged: not a complete .keras archive (a truncated or partial copy?); "
        "copy it again, or save the model again"
    )
    # Keras reports a file that is not a zip archive as "File not found".
    if not zipfile.is_zipfile(path):
        raise ValueError(damaged)
    # Importing the layer modules registers their classes for deserialisation.
    import cbir_tf.describe.layers  # noqa: F401

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except zipfile.BadZipFile:
        raise ValueError(damaged) from None
    except Exception as e:
        text = str(e)
        if safe_mode and ("safe_mode" in text or "Lambda" in text or "lambda" in text):
            raise UnsafeModelError(_unsafe_message(path, e)) from None
        raise


MODEL_INFO_ENTRY = "cbir_tf.json"  # inside the .keras zip: how the model was made
MODEL_INFO_SIDECAR = "model.json"  # beside it: what train.py writes (older models only have it)


def save_descriptor_model(
    model: keras.Model, path: str | os.PathLike, info: dict[str, Any] | None = None
) -> str:
    """Saves a descriptor model as `.keras` atomically, with `info` carried inside the file.

    `info` (e.g. {'image_size': 224, 'backbone': ..., 'recipe': ...}) is stored as the zip entry
    `cbir_tf.json`, which Keras ignores when loading: the model keeps the resolution it was
    trained and validated at wherever it is copied (see `saved_model_info`).

    Args:
      model: the model to save.
      path: the `.keras` file.
      info: JSON-serialisable facts about the model.

    Returns:
      `path`.
    """
    import json
    import zipfile

    from cbir_tf.fileio import json_safe

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".tmp.keras")
    try:
        model.save(tmp)
        if info:
            with zipfile.ZipFile(tmp, "a") as z:
                z.writestr(MODEL_INFO_ENTRY, json.dumps(json_safe(info), indent=2))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def saved_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """What is known about a saved `.keras` model: the info inside it, else its `model.json`.

    Args:
      path: the `.keras` file.

    Returns:
      {'image_size', 'backbone', 'alpha', 'pooling', 'recipe', ...} as far as known; {} for a
      model saved without info and without a `model.json` naming it beside it.
    """
    import json
    import zipfile

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        with zipfile.ZipFile(path) as z:
            if MODEL_INFO_ENTRY in z.namelist():
                return dict(json.loads(z.read(MODEL_INFO_ENTRY).decode("utf-8")))
    except (OSError, zipfile.BadZipFile, ValueError):
        pass
    sidecar = os.path.join(os.path.dirname(path), MODEL_INFO_SIDECAR)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return {}
        # A model.json of the same folder may describe another model file.
        if isinstance(info, dict) and info.get("model") == os.path.basename(path):
            return info
    return {}


def _saved_with_whitening(path: Any, whitening: Any, safe_mode: bool) -> keras.Model:
    """A saved descriptor model, with `whitening` appended (L2 -> PCAWhitening -> L2)."""
    model = load_descriptor_model(path, safe_mode=safe_mode)
    if whitening is None:
        return model
    dim = int(model.output.shape[-1])
    if int(whitening.projection.shape[0]) != dim:
        raise ValueError(
            f"the whitening was learned on {whitening.projection.shape[0]}-dimensional "
            f"vectors but the model {path} gives {dim}"
        )
    x = unit_normalization("pooled_l2")(model.output)
    x = PCAWhitening.from_whitening(whitening, name="whitening")(x)
    out = unit_normalization("whitened_l2", dtype="float32")(x)
    return keras.Model(model.input, out, name=f"{model.name}_whitened")


def image_size_for_model(path: str | os.PathLike, image_size: int | None) -> int:
    """The longest image side to describe images with for a saved model.

    A fine-tuned model is trained and validated at `train.image_size` (224 px by default);
    describing images at another size (the benchmark default of 1024 px) can make it worse than
    the model it started from. The model carries that size (`saved_model_info`).

    Args:
      path: the `.keras` model.
      image_size: the size the user asked for, or None: the trained size (else the default
        config's `data.image_size`). A size other than the trained one is used, with a warning.
    """
    trained = saved_model_info(path).get("image_size")
    if image_size is None:
        if trained:
            log.info(
                "describing images at %d px, the size %s was trained and validated at "
                "(--config.data.image_size=N overrides it)",
                int(trained),
                path,
            )
        return int(trained) if trained else int(default("data.image_size"))
    if trained and int(trained) != int(image_size):
        log.warning(
            "describing images at %d px as asked, not at the %d px %s was trained and validated at",
            int(image_size),
            int(trained),
            path,
        )
    return int(image_size)
