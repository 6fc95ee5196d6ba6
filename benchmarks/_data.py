"""Data shared by the benchmarks: synthetic descriptors; where the real photos and weights are."""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Inside ../shared (or $CBIR_SHARED): the official MobileNet (alpha 0.25) ImageNet weights and the
# real clothing photos.
WEIGHTS_FILE = "weights/mobilenet_2_5_224_tf_no_top.h5"
DATA = "data/clothing-small"


def shared_dir() -> str:
    """The workspace's read-only shared folder: $CBIR_SHARED, else ../shared."""
    return os.environ.get("CBIR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def random_unit(n: int, d: int, seed: int, out: np.ndarray | None = None, chunk: int = 65536):
    """float32 [n, d] random unit rows, generated chunk by chunk (bounded temporary memory)."""
    out = np.empty((n, d), np.float32) if out is None else out
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + block.shape[0]] = block
    return out
