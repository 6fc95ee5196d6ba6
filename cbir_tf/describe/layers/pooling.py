"""Global pooling layers: thin, serialisable Keras wrappers over `cbir_tf.describe.ops.pooling`.

Each layer keeps its hyper-parameters (one attribute per constructor argument) and weights; its
`call` forwards to the op, so the maths is tested once, in the op (cnnimageretrieval-pytorch's
`layers/pooling.py` over `layers/functional.py`). All are registered under the package
"cbir_tf", so a model using them loads with `keras.saving.load_model(path, safe_mode=True)`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from cbir_tf.describe.ops import pooling as pooling_ops


def _check_feature_map_shape(layer: keras.layers.Layer, input_shape) -> None:
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer.__class__.__name__} expects a channels-last feature map [B, H, W, C], "
            f"got shape {tuple(input_shape)}"
        )


@keras.saving.register_keras_serializable(package="cbir_tf")
class MAC(keras.layers.Layer):
    """Maximum activation of convolutions: [B, H, W, C] -> [B, C].

    Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations", ICLR 2016.
    """

    def build(self, input_shape):
        _check_feature_map_shape(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        return pooling_ops.mac(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="cbir_tf")
class SPoC(keras.layers.Layer):
    """Sum-pooled convolutional features (mean form): [B, H, W, C] -> [B, C].

    Babenko & Lempitsky, "Aggregating local deep features for image retrieval", ICCV 2015.
    """

    def build(self, input_shape):
        _check_feature_map_shape(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        return pooling_ops.spoc(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="cbir_tf")
class GeM(keras.layers.Layer):
    """Generalised-mean pooling with a learnable power p: [B, H, W, C] -> [B, C].

    Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
    TPAMI 2018. p is a trainable weight of shape [1] (shared by all channels, as in the paper),
    initialised to `p`; `layer.trainable = False` freezes it.

    Args:
      p: initial power (3.0 in the paper); p = 1 is SPoC, large p approaches MAC.
      eps: activations are clamped to at least eps before the power.
      **kwargs: base Layer arguments (name, dtype, trainable, ...).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.eps = float(eps)

    def build(self, input_shape):
        _check_feature_map_shape(self, input_shape)
        self.p_weight = self.add_weight(
            name="p",
            shape=(1,),
            initializer=keras.initializers.Constant(self.p),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        return pooling_ops.gem(inputs, p=self.p_weight, eps=self.eps)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.p, "eps": self.eps})
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class RMAC(keras.layers.Layer):
    """Regional maximum activation of convolutions: [B, H, W, C] -> [B, C] (or [B, R, C]).

    Tolias, Sicre & Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations", ICLR 2016; regions sampled exactly as cnnimageretrieval-pytorch's `rmac`.

    With `return_regions=False` the output is the sum of the L2-normalised MAC vectors of the
    whole map and of every region (not normalised at the end). With `return_regions=True` it is
    the raw region MACs [B, R, C] (whole map first) for the classic regional-whitening pipeline:
    L2Normalization -> PCAWhitening -> L2Normalization -> SumRegions -> L2Normalization. R is
    static when H and W are, else None.

    Args:
      levels: number of region levels L.
      overlap: desired overlap of neighbouring regions along the long side.
      eps: added to each region vector's norm.
      return_regions: return the [B, R, C] regional vectors instead of their normalised sum.
      **kwargs: base Layer arguments.
    """

    def __init__(
        self,
        levels: int = 3,
        overlap: float = 0.4,
        eps: float = 1e-6,
        return_regions: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(levels) < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = int(levels)
        self.overlap = float(overlap)
        self.eps = float(eps)
        self.return_regions = bool(return_regions)

    def build(self, input_shape):
        _check_feature_map_shape(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        if self.return_regions:
            return pooling_ops.rmac_region_vectors(inputs, levels=self.levels, overlap=self.overlap)
        return pooling_ops.rmac(inputs, levels=self.levels, overlap=self.overlap, eps=self.eps)

    def compute_output_shape(self, input_shape):
        if self.return_regions:
            regions = pooling_ops.rmac_output_regions(
                input_shape[1], input_shape[2], self.levels, self.overlap
            )
            return (input_shape[0], regions, input_shape[-1])
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "levels": self.levels,
                "overlap": self.overlap,
                "eps": self.eps,
                "return_regions": self.return_regions,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class SumRegions(keras.layers.Layer):
    """Sums regional vectors into one image vector: [B, R, D] -> [B, D].

    The aggregation step of R-MAC with regional whitening (Tolias et al., ICLR 2016).
    """

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"SumRegions expects regional vectors [B, R, D], got shape {tuple(input_shape)}"
            )
        super().build(input_shape)

    def call(self, inputs):
        return tf.reduce_sum(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
