"""Small helpers shared by the entry points: short flags onto the config, logging, errors.

The entry points (`train.py`, `extract.py`, `evaluate.py`, `search.py`) stay thin: they parse
flags, call `apply_overrides`, then one library function, and report failures through
`run_main` so that users see one clear line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

# Errors whose message already tells the user what to do: printed alone, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, OSError)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted config fields from short flags, ignoring flags left at None / ''.

    Args:
      cfg: the config to update in place.
      overrides: {'model.backbone': 'vgg16', 'data.dataset': None, ...}.
    """
    for dotted, value in overrides.items():
        if value is None or value == "":
            continue
        node = cfg
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        with cfg.unlocked():
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


def setup_logging(verbose: bool = False) -> None:
    """Plain, timestamped logging on stderr; quiets TensorFlow's C++ start-up chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_main(fn: Callable[[], Any]) -> Any:
    """Runs `fn`, turning the library's explanatory errors into one line and exit status 1.

    Set CBIR_DEBUG=1 to see the full traceback.
    """
    if os.environ.get("CBIR_DEBUG"):
        return fn()
    try:
        return fn()
    except KeyboardInterrupt:
        print(
            "interrupted: finished work is saved; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as e:
        # The library's own exceptions (download, weights, pickle, lock, ...) and the usual
        # input errors explain themselves; anything else is a bug and keeps its traceback.
        if not (isinstance(e, USER_ERRORS) or type(e).__module__.startswith("cbir_tf")):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


def define_benchmark_flags() -> None:
    """Defines the short flags `extract.py` and `evaluate.py` share (see `benchmark_overrides`)."""
    from absl import flags

    flags.DEFINE_string("dataset", None, "paris6k | oxford5k | rparis6k | roxford5k | demo.")
    flags.DEFINE_string("data_root", None, "Folder holding datasets/<name>/ (default: config).")
    flags.DEFINE_string("workdir", None, "Folder for cached whitening, descriptors and results.")
    flags.DEFINE_string("backbone", None, "Backbone name (overrides config.model.backbone).")
    flags.DEFINE_string("weights", None, "'imagenet', 'none', or a weights file (.h5).")
    flags.DEFINE_string("model", None, "A saved .keras descriptor model (from train.py).")
    flags.DEFINE_bool("download", True, "Download missing benchmark files.")
    flags.DEFINE_bool("verbose", False, "Debug logging.")


def benchmark_overrides(values: Any) -> dict[str, Any]:
    """Config fields set by the flags of `define_benchmark_flags` (for `apply_overrides`)."""
    return {
        "data.dataset": values.dataset,
        "data.data_root": values.data_root,
        "workdir": values.workdir,
        "model.backbone": values.backbone,
        "model.weights": values.weights,
    }
