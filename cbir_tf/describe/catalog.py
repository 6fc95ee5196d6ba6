"""Every backbone by name, convolutional or transformer: lookup, poolings, weights.

The two registries (`cbir_tf.describe.backbones.BACKBONES`, `keras.applications` CNNs, and
`cbir_tf.describe.transformers.TRANSFORMERS`, KerasHub ViTs) answer to one set of names, so that a
config's `model.backbone` (and `evaluate.py --compare=model.backbone:...`) takes either kind.

Poolings (`model.pooling`):
  * CNNs: mac, spoc, gem, rmac over the feature map;
  * transformers: the same four over the patch tokens laid back on their grid, plus 'cls' (the
    class token), 'cls+gem' (L2-normalised class token and GeM of the patches, concatenated:
    whiten it), and 'head' (CLIP's projected class token, SigLIP's attention-pooling head);
  * 'auto' (the default): the recipe of the backbone's paper: R-MAC for CNNs (Tolias et al.,
    ICLR 2016; Gordo et al., IJCV 2017), the class token for DINOv2 / DINOv3, the image
    embedding head for CLIP / SigLIP.
"""

from __future__ import annotations

from typing import Any

from cbir_tf.describe import backbones, transformers
from cbir_tf.describe.choices import CNN_POOLINGS, POOLINGS, TOKEN_POOLINGS

__all__ = [
    "CNN_POOLINGS",
    "POOLINGS",
    "TOKEN_POOLINGS",
    "display_name",
    "get_spec",
    "is_transformer",
    "names",
    "poolings",
    "resolve_pooling",
    "resolve_weights",
    "with_pooling",
]

CNN_RECIPE = "rmac"


def names() -> list[str]:
    """Every backbone name: the CNNs, then the transformers."""
    return [*backbones.BACKBONES, *transformers.TRANSFORMERS]


def is_transformer(name: str) -> bool:
    """Whether `name` is a transformer backbone (KerasHub)."""
    return str(name).strip().lower() in transformers.TRANSFORMERS


def get_spec(name: str) -> backbones.BackboneSpec | transformers.TransformerSpec:
    """The registry entry of a backbone of either kind (case-insensitive).

    Both kinds have `name`, `has_alpha`, `imagenet_alphas` and `preprocess_input`.

    Raises:
      KeyError: unknown name; the message lists every valid name.
    """
    key = str(name).strip().lower()
    if key in backbones.BACKBONES:
        return backbones.BACKBONES[key]
    if key in transformers.TRANSFORMERS:
        return transformers.TRANSFORMERS[key]
    raise KeyError(f"unknown backbone {name!r}; valid backbones: {', '.join(names())}")


def display_name(name: str, alpha: float = 1.0) -> str:
    """The backbone as printed for users: 'mobilenet (alpha 0.25)', 'dinov2_small'."""
    if is_transformer(name):
        return get_spec(name).name
    return backbones.display_name(name, alpha)


def poolings(name: str) -> tuple[str, ...]:
    """The poolings a backbone takes ('auto' included)."""
    spec = get_spec(name)
    if not is_transformer(name):
        return ("auto", *CNN_POOLINGS)
    family = spec.family_spec
    extra = ("cls", "cls+gem") if family.name != "siglip" else ()
    return ("auto", *CNN_POOLINGS, *extra, *(("head",) if family.has_head else ()))


def resolve_pooling(backbone: str, pooling: str) -> str:
    """`pooling` checked against the backbone, with 'auto' replaced by its paper's recipe.

    Raises:
      KeyError: unknown backbone, or a pooling this backbone does not take (listing those it
        takes).
    """
    spec = get_spec(backbone)
    key = str(pooling).strip().lower()
    valid = poolings(spec.name)
    if key not in valid:
        raise KeyError(
            f"unknown pooling {pooling!r} for backbone {spec.name}; valid poolings: "
            f"{', '.join(valid)}"
        )
    if key != "auto":
        return key
    return spec.pooling if is_transformer(spec.name) else CNN_RECIPE


def with_pooling(model: dict[str, Any]) -> dict[str, Any]:
    """A config's `model` block with `pooling` resolved (`resolve_pooling`): what is built,
    recorded in stores and compared, whatever the config said ('auto')."""
    out = dict(model)
    out["pooling"] = resolve_pooling(out["backbone"], out["pooling"])
    return out


def resolve_weights(
    name: str, alpha: float, weights: Any, weights_fallback: str = ""
) -> tuple[Any, str | None]:
    """The weights to build a backbone with: `weights_fallback` when the pretrained ones
    cannot be had (see `cbir_tf.describe.backbones.resolve_weights`).

    Returns:
      (weights to use, why the fallback was taken or None).
    """
    if not is_transformer(name):
        return backbones.resolve_weights(name, alpha, weights, weights_fallback)
    if transformers.weights_kind(weights) != "pretrained" or not weights_fallback:
        return weights, None
    try:
        transformers.fetch_preset(name)
        return weights, None
    except backbones.WeightsUnavailableError:
        return weights_fallback, "the pretrained preset could not be downloaded"
