"""Keras layers of the descriptor models, all registered under the package "cbir_tf".

Importing this package registers them, so saved models load with `safe_mode=True`.
"""

from cbir_tf.describe.layers.normalization import L2Normalization
from cbir_tf.describe.layers.pooling import MAC, RMAC, GeM, SPoC, SumRegions
from cbir_tf.describe.layers.tokens import (
    ClassToken,
    PatchEmbedding,
    PatchGrid,
    PatchRope,
    SnapToPatches,
)
from cbir_tf.describe.layers.whitening import PCAWhitening

__all__ = [
    "ClassToken",
    "GeM",
    "L2Normalization",
    "MAC",
    "PCAWhitening",
    "PatchEmbedding",
    "PatchGrid",
    "PatchRope",
    "RMAC",
    "SPoC",
    "SnapToPatches",
    "SumRegions",
]
