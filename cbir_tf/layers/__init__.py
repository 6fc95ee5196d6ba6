"""Keras layers of the descriptor models, all registered under the package "cbir_tf".

Importing this package registers them, so saved models load with `safe_mode=True`.
"""

from cbir_tf.layers.normalization import L2Normalization
from cbir_tf.layers.pooling import MAC, RMAC, GeM, SPoC, SumRegions
from cbir_tf.layers.whitening import PCAWhitening

__all__ = ["GeM", "L2Normalization", "MAC", "PCAWhitening", "RMAC", "SPoC", "SumRegions"]
