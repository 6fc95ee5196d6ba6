"""Random descriptor models with informative outputs, for tests that cannot download weights."""

from __future__ import annotations

import keras
import numpy as np


def lively(model: keras.Model, seed: int = 0) -> keras.Model:
    """Re-draws the backbone's convolution kernels with He initialisation (std sqrt(2/fan_in)).

    Keras initialises MobileNet with Glorot kernels, and its depthwise kernels count fan-in over
    all channels: activations shrink by orders of magnitude per block and end near 1e-16,
    where the 1e-6 eps of L2 normalisation dominates and descriptors stop being unit vectors.
    He-initialised kernels keep activations of order 1 through the ReLUs, giving informative
    random descriptors to compare without downloading weights.

    Args:
      model: a descriptor model whose backbone is the layer named "mobilenet"; changed in place.
      seed: seed of the kernels drawn (the same seed gives the same model).

    Returns:
      The same model.
    """
    rng = np.random.RandomState(seed)
    for layer in model.get_layer("mobilenet").layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            fan_in = layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Conv2D):
            fan_in = np.prod(layer.kernel.shape[:3])
        else:
            continue
        std = np.sqrt(2.0 / fan_in)
        layer.kernel.assign(rng.normal(0.0, std, layer.kernel.shape).astype(np.float32))
    return model
