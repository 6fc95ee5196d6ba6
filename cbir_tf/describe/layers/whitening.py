"""PCA-whitening as a Keras layer, with weights learned by `cbir_tf.describe.whitening`."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="cbir_tf")
class PCAWhitening(keras.layers.Layer):
    """Learned PCA-whitening y = (x - mean) @ projection over the last axis.

    Jégou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012; applied
    to CNN descriptors by Babenko & Lempitsky (ICCV 2015) and Tolias et al. (ICLR 2016). Works on
    descriptors [B, input_dim] -> [B, output_dim] and regional vectors [B, R, input_dim] ->
    [B, R, output_dim]. No L2 normalisation inside: put L2Normalization after it.

    `mean` [input_dim] and `projection` [input_dim, output_dim] are non-trainable weights, learned
    outside the model by `cbir_tf.describe.whitening.learn_pca_whitening` and handed over with
    `PCAWhitening.from_whitening(w)` or `layer.set_whitening(w)` (no I/O in the layer); they are
    saved with the model. Until then the layer keeps the first `output_dim` coordinates
    (zero mean, truncated identity).

    Args:
      input_dim: D, the size of the last input axis.
      output_dim: d <= D, the size of the last output axis.
      **kwargs: base Layer arguments.
    """

    def __init__(self, input_dim: int, output_dim: int, **kwargs):
        super().__init__(**kwargs)
        if int(input_dim) < 1 or not 1 <= int(output_dim) <= int(input_dim):
            raise ValueError(
                f"need 1 <= output_dim <= input_dim, got input_dim={input_dim}, "
                f"output_dim={output_dim}"
            )
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)

    @classmethod
    def from_whitening(cls, whitening, **kwargs) -> PCAWhitening:
        """Builds a layer holding a learned whitening.

        Args:
          whitening: a `cbir_tf.describe.whitening.Whitening` (or any object with `mean` [D] and
            `projection` [D, d] arrays).
          **kwargs: layer arguments (name, dtype, ...).

        Returns:
          A built PCAWhitening(input_dim=D, output_dim=d) with those weights.
        """
        projection = np.asarray(whitening.projection)
        if projection.ndim != 2:
            raise ValueError(f"projection must be [D, d], got shape {projection.shape}")
        layer = cls(input_dim=projection.shape[0], output_dim=projection.shape[1], **kwargs)
        layer.set_whitening(whitening)
        return layer

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] != self.input_dim:
            raise ValueError(
                f"PCAWhitening(input_dim={self.input_dim}) expects inputs [..., {self.input_dim}],"
                f" got shape {tuple(input_shape)}"
            )
        self.mean = self.add_weight(
            name="mean", shape=(self.input_dim,), initializer="zeros", trainable=False
        )
        self.projection = self.add_weight(
            name="projection",
            shape=(self.input_dim, self.output_dim),
            initializer=keras.initializers.Identity(),
            trainable=False,
        )
        super().build(input_shape)

    def set_whitening(self, whitening) -> None:
        """Loads `whitening.mean` [D] and `whitening.projection` [D, d] into the weights.

        Raises:
          ValueError: the shapes do not match (input_dim, output_dim), or values are not finite.
        """
        mean = np.asarray(whitening.mean, np.float32)
        projection = np.asarray(whitening.projection, np.float32)
        if mean.shape != (self.input_dim,) or projection.shape != (
            self.input_dim,
            self.output_dim,
        ):
            raise ValueError(
                f"whitening with mean {mean.shape} and projection {projection.shape} does not "
                f"fit PCAWhitening(input_dim={self.input_dim}, output_dim={self.output_dim})"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(projection))):
            raise ValueError("whitening mean/projection contain NaN or Inf")
        if not self.built:
            self.build((None, self.input_dim))
        self.mean.assign(mean)
        self.projection.assign(projection)

    def call(self, inputs):
        # matmul broadcasts the [D, d] projection over [B, D] and [B, R, D] alike.
        return tf.linalg.matmul(inputs - self.mean, self.projection)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update({"input_dim": self.input_dim, "output_dim": self.output_dim})
        return config
