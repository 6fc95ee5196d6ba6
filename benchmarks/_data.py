"""Synthetic descriptors shared by the benchmarks."""

import numpy as np


def random_unit(n: int, d: int, seed: int, out: np.ndarray | None = None, chunk: int = 65536):
    """float32 [n, d] random unit rows, generated chunk by chunk (bounded temporary memory)."""
    out = np.empty((n, d), np.float32) if out is None else out
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + block.shape[0]] = block
    return out
