"""Vector normalisation ops (pure TensorFlow).

The field's reference code (cnnimageretrieval-pytorch `l2n`) divides by `norm + eps` rather than
by `max(norm, eps)`; the golden R-MAC values depend on that choice, so it is the default here.
Final descriptors use `clamp=True` (`max(norm, eps)`, as torch's `F.normalize`): with `norm + eps`
a vector whose norm is near eps (vanishing activations of a random network) keeps a norm well
below 1, and inner products stop being cosines.
"""

from __future__ import annotations

import tensorflow as tf

_HALF_DTYPES = (tf.float16, tf.bfloat16)


def l2_normalize(x: tf.Tensor, axis: int = -1, eps: float = 1e-6, clamp: bool = False) -> tf.Tensor:
    """Divides `x` by its L2 norm along `axis` plus `eps` (reference `l2n`), or by max(norm, eps).

    Half-precision inputs are normalised in float32 (a sum of 1280 squared activations overflows
    float16) and cast back, so the op is safe under a mixed-precision policy.

    Args:
      x: float tensor of any rank, e.g. float32 [B, D] descriptors or [B, R, D] region vectors.
      axis: the axis holding the vector components.
      eps: added to the norm (or, with `clamp`, its lower bound), so an all-zero vector stays
        zero instead of becoming NaN.
      clamp: divide by max(norm, eps): vectors of norm >= eps come out exactly unit length.

    Returns:
      A tensor of the shape and dtype of `x` whose vectors along `axis` have norm
      norm / (norm + eps) < 1, or with `clamp` norm 1 (norm / eps below eps).
    """
    x = tf.convert_to_tensor(x)
    dtype = x.dtype
    if dtype in _HALF_DTYPES:
        x = tf.cast(x, tf.float32)
    # sqrt of a floored sum of squares: tf.norm's gradient is NaN at an all-zero vector (a region
    # where every ReLU activation is 0), which would poison a training step. The floor (1e-30) is
    # far below `eps`, so values are unchanged.
    sum_sq = tf.reduce_sum(tf.square(x), axis=axis, keepdims=True)
    norm = tf.sqrt(tf.maximum(sum_sq, tf.cast(1e-30, x.dtype)))
    eps = tf.cast(eps, x.dtype)
    y = x / (tf.maximum(norm, eps) if clamp else norm + eps)
    return tf.cast(y, dtype) if dtype in _HALF_DTYPES else y
