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
    "build_index": "runs.extract",
    "merge_indexes": "store.index_folder",
    "build_descriptor_model": "describe.models",
    "load_descriptor_model": "describe.models",
    "save_descriptor_model": "describe.models",
    "saved_model_info": "describe.models",
    "extract": "describe.extract",
    "ExtractionResult": "describe.extract",
    "Whitening": "describe.whitening",
    "learn_pca_whitening": "describe.whitening",
    "DescriptorStore": "store.files",
    "load_store": "store.files",
    "merge_shards": "store.shards",
    "compute_map": "evaluate.metrics",
    "evaluate_revisited": "evaluate.metrics",
    "evaluate_methods": "evaluate.methods",
    "run_benchmark": "runs.evaluate",
}

# The stages of the data flow, reachable as attributes (`cbir_tf.search`) without an import.
_SUBMODULES = (
    "data",
    "describe",
    "store",
    "search",
    "rerank",
    "evaluate",
    "train",
    "retriever",
)

__all__ = sorted(_EXPORTS) + ["__version__"]


def _hide_tensorflow_start_up() -> None:
    # TensorFlow's start-up lines (CUDA probes, CPU features) are not the user's business; the
    # first import of TensorFlow, wherever it happens, leaves them out (see cbir_tf.quiet).
    from cbir_tf import quiet

    quiet.hide_tensorflow_start_up()


_hide_tensorflow_start_up()


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
