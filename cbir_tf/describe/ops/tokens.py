"""Vision-transformer maths: patch grids, position-embedding interpolation, 2-D rotary angles.

Pure TensorFlow functions of dynamic image sizes, so one traced graph serves every image (and a
SavedModel or TFLite file keeps working at any size); the layers in
`cbir_tf.describe.layers.tokens` hold the weights and forward here.

Position embeddings learned on an h0 x w0 grid are resampled to the image's h x w grid the way
the checkpoints' own code does it (Hugging Face transformers' `interpolate_pos_encoding`, i.e.
PyTorch's `interpolate(mode='bicubic', align_corners=False)`): Keys' cubic kernel with a = -0.75
and clamped borders, or, with `antialias=True` (DINOv2 with registers), PyTorch's antialiased
kernel (a = -0.5, widened by the scale when shrinking, rows renormalised). TensorFlow's own
bicubic resize uses a = -0.5 and zero-weight borders, which differs by ~1e-2 on learned
embeddings; the separable matrices below reproduce PyTorch's.
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = [
    "bicubic_matrix",
    "interpolate_positions",
    "patch_grid",
    "rope_angles",
    "snapped_size",
]

_TORCH_A = -0.75  # PyTorch's bicubic (non-antialiased) kernel
_AA_A = -0.5  # PyTorch's antialiased bicubic kernel (as PIL's)


def _cubic_near(x: tf.Tensor, a: float) -> tf.Tensor:
    """Keys' kernel for |x| <= 1."""
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_far(x: tf.Tensor, a: float) -> tf.Tensor:
    """Keys' kernel for 1 < |x| < 2."""
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


def bicubic_matrix(in_size: int, out_size, antialias: bool = False) -> tf.Tensor:
    """The [out, in] matrix of PyTorch's 1-D bicubic resampling (align_corners=False).

    Args:
      in_size: input length (a Python int: the learned grid's side).
      out_size: output length (int or scalar int tensor: the image's grid side).
      antialias: PyTorch's `antialias=True` kernel.

    Returns:
      float32 [out_size, in_size]; row i holds the weights of output sample i (rows sum to 1).
    """
    in_size = int(in_size)
    out = tf.cast(out_size, tf.float32)
    scale = tf.cast(in_size, tf.float32) / out
    dst = tf.range(tf.cast(out_size, tf.int32), dtype=tf.float32)
    if antialias:
        support_scale = tf.maximum(scale, 1.0)  # the kernel widens only when shrinking
        centre = scale * (dst + 0.5)
        src = tf.range(in_size, dtype=tf.float32)
        x = tf.abs((src[None, :] + 0.5 - centre[:, None]) / support_scale)
        w = tf.where(x < 1.0, _cubic_near(x, _AA_A), tf.where(x < 2.0, _cubic_far(x, _AA_A), 0.0))
        return w / tf.reduce_sum(w, axis=1, keepdims=True)
    real = scale * (dst + 0.5) - 0.5
    first = tf.floor(real)
    t = real - first
    coefficients = (
        _cubic_far(t + 1.0, _TORCH_A),
        _cubic_near(t, _TORCH_A),
        _cubic_near(1.0 - t, _TORCH_A),
        _cubic_far(2.0 - t, _TORCH_A),
    )
    matrix = 0.0
    for k, c in enumerate(coefficients):
        index = tf.clip_by_value(tf.cast(first, tf.int32) - 1 + k, 0, in_size - 1)
        matrix += tf.one_hot(index, in_size, dtype=tf.float32) * c[:, None]
    return matrix


def interpolate_positions(grid: tf.Tensor, out_h, out_w, antialias: bool = False) -> tf.Tensor:
    """Resamples learned patch position embeddings to an h x w grid (PyTorch bicubic).

    Args:
      grid: float [h0, w0, D] position embeddings of the patches on their learned grid.
      out_h, out_w: the image's patch grid (ints or scalar int tensors).
      antialias: PyTorch's antialiased kernel (DINOv2 with registers).

    Returns:
      float32 [out_h * out_w, D], row-major (row by row, as patches are flattened).
    """
    grid = tf.cast(grid, tf.float32)
    rows = bicubic_matrix(grid.shape[0], out_h, antialias)
    cols = bicubic_matrix(grid.shape[1], out_w, antialias)
    out = tf.einsum("ah,hwd,bw->abd", rows, grid, cols)
    return tf.reshape(out, [-1, grid.shape[-1]])


def snapped_size(size, patch_size: int):
    """`size` rounded to the nearest multiple of `patch_size` (at least one patch).

    Args:
      size: an int or int tensor (a side in pixels).
      patch_size: the patch side.
    """
    p = int(patch_size)
    if isinstance(size, int):
        return max(1, int(math.floor(size / p + 0.5))) * p
    n = tf.cast(tf.floor(tf.cast(size, tf.float32) / p + 0.5), tf.int32)
    return tf.maximum(n, 1) * p


def patch_grid(tokens: tf.Tensor, num_prefix: int, height, width) -> tf.Tensor:
    """Lays the patch tokens back on their grid: [B, P + h*w, D] -> [B, h, w, D].

    Args:
      tokens: float [B, num_prefix + h*w, D]; the class and register tokens come first.
      num_prefix: number of tokens before the patches (class token + registers).
      height, width: the patch grid (ints or scalar int tensors).
    """
    patches = tokens[:, int(num_prefix) :, :]
    return tf.reshape(patches, [tf.shape(tokens)[0], height, width, tf.shape(tokens)[-1]])


def rope_angles(height, width, head_dim: int, theta: float) -> tuple[tf.Tensor, tf.Tensor]:
    """cos and sin of DINOv3's 2-D rotary position embedding for an h x w patch grid.

    Patch centres are normalised to [-1, 1] on each axis; a head's dimensions split into a
    row half and a column half, each rotated at frequencies theta^(-4k / head_dim)
    (Siméoni et al., "DINOv3", 2025; Hugging Face's `DINOv3ViTRopePositionEmbedding` at inference).

    Args:
      height, width: the patch grid.
      head_dim: attention head width (a multiple of 4).
      theta: the base period.

    Returns:
      (cos, sin), each float32 [h*w, head_dim].
    """
    inv_freq = 1.0 / (float(theta) ** tf.range(0.0, 1.0, 4.0 / int(head_dim), dtype=tf.float32))
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    rows = tf.range(0.5, h, dtype=tf.float32) / h
    cols = tf.range(0.5, w, dtype=tf.float32) / w
    grid_r, grid_c = tf.meshgrid(rows, cols, indexing="ij")
    coords = 2.0 * tf.stack([tf.reshape(grid_r, [-1]), tf.reshape(grid_c, [-1])], -1) - 1.0
    angles = 2.0 * math.pi * coords[:, :, None] * inv_freq[None, None, :]
    angles = tf.reshape(angles, [tf.shape(coords)[0], -1])
    angles = tf.tile(angles, [1, 2])
    return tf.cos(angles), tf.sin(angles)
