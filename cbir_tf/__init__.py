"""cbir-tf: content-based image retrieval with TensorFlow/Keras.

The public API is re-exported lazily: `import cbir_tf` stays fast and loads no TensorFlow;
each name imports its module on first use (the numpy-only ones — metrics, search, stores,
whitening — never load TensorFlow). `dir(cbir_tf)` lists them.

    from cbir_tf import Retriever                 # index a folder, search it with a photo
    from cbir_tf import compute_map, load_store   # numpy only
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Retriever": "retriever",
    "SearchResult": "retriever",
    "build_index": "runs",
    "merge_indexes": "runs",
    "build_descriptor_model": "models",
    "load_descriptor_model": "models",
    "model_from_config": "models",
    "save_descriptor_model": "models",
    "saved_model_info": "models",
    "extract": "descriptors",
    "ExtractionResult": "descriptors",
    "DescriptorStore": "store",
    "load_store": "store",
    "merge_shards": "shards",
    "Whitening": "whitening",
    "learn_pca_whitening": "whitening",
    "compute_map": "metrics",
    "evaluate_revisited": "metrics",
    "evaluate_methods": "evaluation",
    "run_benchmark": "evaluation",
}

# Sub-modules reachable as attributes (`cbir_tf.metrics`) without an explicit import.
_SUBMODULES = (
    "backbones",
    "descriptors",
    "evaluation",
    "finetune",
    "metrics",
    "models",
    "retriever",
    "search",
    "store",
    "train",
    "whitening",
)

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cbir_tf' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public API and the module's own dunders, not its implementation helpers.
    dunders = {n for n in globals() if n.startswith("__") and n.endswith("__")}
    return sorted(dunders | set(_EXPORTS) | set(_SUBMODULES))
