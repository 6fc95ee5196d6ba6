"""L2 normalisation layer over `cbir_tf.describe.ops.normalization.l2_normalize`."""

from __future__ import annotations

import keras

from cbir_tf.describe.ops.normalization import l2_normalize


@keras.saving.register_keras_serializable(package="cbir_tf")
class L2Normalization(keras.layers.Layer):
    """Divides vectors by their L2 norm plus eps along `axis` (shape unchanged).

    The reference's `L2N` (cnnimageretrieval-pytorch): x / (||x|| + eps), so that cosine
    similarity becomes a dot product (Radenović et al., TPAMI 2018). With `clamp`, x /
    max(||x||, eps): exactly unit vectors however small the activations (final descriptors).

    Args:
      axis: the axis holding the vector components (-1 for [B, D] and [B, R, D]).
      eps: added to the norm (with `clamp`: its lower bound); an all-zero vector stays zero.
      clamp: divide by max(norm, eps) instead of norm + eps.
      **kwargs: base Layer arguments.
    """

    def __init__(self, axis: int = -1, eps: float = 1e-6, clamp: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.eps = float(eps)
        self.clamp = bool(clamp)

    def call(self, inputs):
        return l2_normalize(inputs, axis=self.axis, eps=self.eps, clamp=self.clamp)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis, "eps": self.eps, "clamp": self.clamp})
        return config
