"""The names a model config chooses from that can be checked without TensorFlow.

The commands check a config's pooling and weights before they import TensorFlow (seconds), so
that a typo is answered at once; `models.build_descriptor_model` and `backbones.build_backbone`
check the same names with the same functions when they build the model.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CNN_POOLINGS",
    "POOLINGS",
    "TOKEN_POOLINGS",
    "WEIGHTS_KEYWORDS",
    "WEIGHTS_SUFFIXES",
    "check_model_names",
    "check_pooling",
    "normalize_weights",
]

CNN_POOLINGS = ("mac", "spoc", "gem", "rmac")
# A transformer's class token, class token beside GeM of the patches, its own embedding head.
TOKEN_POOLINGS = ("cls", "cls+gem", "head")
# 'auto': the backbone's paper's recipe (`cbir_tf.describe.catalog.resolve_pooling`, which also
# refuses a pooling the backbone does not take).
POOLINGS = ("auto", *CNN_POOLINGS, *TOKEN_POOLINGS)
# Weights keywords: a transformer's KerasHub preset is 'pretrained' (or 'imagenet').
WEIGHTS_KEYWORDS = ("imagenet", "pretrained", "none")
# A backbone's weights (.h5 / .weights.h5 / legacy .hdf5), or a saved descriptor model (.keras).
WEIGHTS_SUFFIXES = (".h5", ".hdf5", ".keras")


def check_pooling(pooling: str) -> str:
    """The pooling's registry name (lower case).

    Raises:
      KeyError: an unknown pooling; the message lists the valid ones.
    """
    name = str(pooling).strip().lower()
    if name not in POOLINGS:
        raise KeyError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
    return name


def normalize_weights(weights: str | os.PathLike | None) -> str:
    """Returns 'imagenet', 'none' or the path of a local file (user `~` expanded).

    Raises:
      ValueError: a string that is neither keyword nor a weights/model file name.
    """
    if weights is None:
        return "none"
    text = os.fspath(weights).strip()
    if text.lower() in ("imagenet", "none"):
        return text.lower()
    if not text.lower().endswith(WEIGHTS_SUFFIXES):
        raise ValueError(
            f"weights={text!r}: expected 'imagenet', 'none', a weights file (.h5 / .weights.h5) "
            "or a saved descriptor model (.keras)"
        )
    return os.path.expanduser(text)


def check_model_names(model: dict[str, Any]) -> None:
    """Checks a `model` config block's pooling and weights: a known pooling; a keyword
    (`WEIGHTS_KEYWORDS`), a KerasHub handle (`hf://...`), a folder that exists (a transformer's
    preset or checkpoint) or a weights file that exists (and `weights_fallback` likewise).

    Raises:
      KeyError: an unknown pooling.
      ValueError: weights that are neither keyword nor a weights or model file name.
      FileNotFoundError: a weights file that does not exist.
    """
    check_pooling(model["pooling"])
    for field in ("weights", "weights_fallback"):
        value = model.get(field)
        if field == "weights_fallback" and not value:
            continue
        text = "none" if value is None else os.fspath(value).strip()
        if text.lower() in WEIGHTS_KEYWORDS or "://" in text:
            continue
        if os.path.isdir(os.path.expanduser(text)):
            continue  # a transformer's preset folder; the backbone checks what it holds
        if not text.lower().endswith(WEIGHTS_SUFFIXES):
            raise ValueError(
                f"{field}={text!r}: expected 'imagenet', 'none', 'pretrained', a weights "
                "file (.h5 / .weights.h5), a saved descriptor model (.keras) or a transformer's "
                "preset folder that exists"
            )
        weights = normalize_weights(text)
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"model.{field}: the weights file {weights} does not exist (give an existing "
                "file or a transformer's preset folder with --weights=..., or 'imagenet' / "
                "'none')"
            )
