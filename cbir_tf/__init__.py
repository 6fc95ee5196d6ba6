"""cbir-tf: content-based image retrieval with TensorFlow/Keras.

`Retriever` (index a folder, search it with a photo) is re-exported lazily: `import cbir_tf`
stays fast, and the numpy-only modules (metrics, search, re-ranking) never load TensorFlow.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Retriever", "SearchResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Retriever", "SearchResult"):
        from cbir_tf import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'cbir_tf' has no attribute {name!r}")
