"""The names a model config chooses from that can be checked without TensorFlow.

The commands check a config's pooling and weights before they import TensorFlow (seconds), so
that a typo is answered at once; `models.build_descriptor_model` and `backbones.build_backbone`
check the same names with the same functions when they build the model.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "POOLINGS",
    "WEIGHTS_SUFFIXES",
    "check_model_names",
    "check_pooling",
    "normalize_weights",
]

POOLINGS = ("mac", "spoc", "gem", "rmac")
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
    """Checks a `model` config block's pooling and weights: a known pooling; 'imagenet', 'none'
    or a weights file that exists (and `weights_fallback` likewise, when set).

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
        weights = normalize_weights(value)
        if weights not in ("imagenet", "none") and not os.path.isfile(weights):
            raise FileNotFoundError(
                f"model.{field}: the weights file {weights} does not exist (give an existing "
                "file with --weights=FILE, or 'imagenet' / 'none')"
            )
