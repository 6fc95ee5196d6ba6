"""Global pooling of CNN feature maps into image descriptors (pure TensorFlow).

All ops take channels-last feature maps `x` float [B, H, W, C] of any spatial size (1x1 and very
elongated maps included) and work eagerly and inside `tf.function` with unknown H and W
(input_signature [None, None, None, C]). They follow the field's reference implementation,
cnnimageretrieval-pytorch `cirtorch/layers/functional.py`, whose outputs are reproduced by the
tests to 1e-5 (../shared/golden/pooling_cirtorch.npz):

  MAC   (Tolias et al., ICLR 2016; Razavian et al. 2016): max over the map, per channel.
  SPoC  (Babenko & Lempitsky, ICCV 2015): mean over the map (without the centre prior).
  GeM   (Radenović et al., TPAMI 2018): (mean(max(x, eps)^p))^(1/p); p=1 is SPoC, p -> inf is MAC.
  R-MAC (Tolias et al., ICLR 2016): sum of the L2-normalised MAC vectors of the whole map and of
        square regions sampled on L levels, as the reference samples them (`rmac_regions`).

Region sampling has two implementations that must agree exactly: `rmac_regions` in numpy for a
known (h, w), and `rmac_regions_tf` built from tensors (tf.shape) for maps whose size is only
known at run time; `rmac_region_vectors` uses the numpy one when the size is static.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cbir_tf.describe.ops.normalization import l2_normalize

_HALF_DTYPES = (tf.float16, tf.bfloat16)
# The reference chooses how many extra regions to place along the long side among these counts.
_LONG_SIDE_STEPS = (2, 3, 4, 5, 6, 7)


def _check_rank4(x: tf.Tensor, name: str) -> None:
    if x.shape.rank is not None and x.shape.rank != 4:
        raise ValueError(
            f"{name} expects a channels-last feature map [B, H, W, C], got shape {x.shape}"
        )


def _to_float32(x: tf.Tensor) -> tuple[tf.Tensor, tf.DType]:
    """Half precision is upcast for powers and sums (x^3 overflows float16 for x > 40)."""
    x = tf.convert_to_tensor(x)
    if x.dtype in _HALF_DTYPES:
        return tf.cast(x, tf.float32), x.dtype
    return x, x.dtype


def mac(x: tf.Tensor) -> tf.Tensor:
    """Maximum activation of convolutions: max over H and W.

    Args:
      x: float [B, H, W, C] feature map, H and W >= 1 (may be unknown until run time).

    Returns:
      [B, C] of the dtype of `x`.
    """
    x = tf.convert_to_tensor(x)
    _check_rank4(x, "mac")
    return tf.reduce_max(x, axis=[1, 2])


def spoc(x: tf.Tensor) -> tf.Tensor:
    """Sum-pooled convolutional features (average form, as the reference): mean over H and W.

    Args:
      x: float [B, H, W, C] feature map.

    Returns:
      [B, C] of the dtype of `x` (accumulated in float32 for half-precision inputs).
    """
    x, dtype = _to_float32(x)
    _check_rank4(x, "spoc")
    return tf.cast(tf.reduce_mean(x, axis=[1, 2]), dtype)


def gem(x: tf.Tensor, p: float | tf.Tensor = 3.0, eps: float = 1e-6) -> tf.Tensor:
    """Generalised-mean pooling: (mean over H, W of max(x, eps)^p)^(1/p).

    Computed as m * (mean((x / m)^p))^(1/p) with m the per-channel maximum (held constant for
    the gradient). This is the same function, with the same gradients for x and p, but large p
    neither overflows nor underflows float32 (the plain form overflows from 100^20 on), so a
    learned p that drifts high stays finite and p -> inf tends to MAC.

    Args:
      x: float [B, H, W, C] feature map (non-negative activations; values below eps are clamped).
      p: the power, a Python number or a float tensor of shape [] or [1] (a trainable weight).
      eps: clamp floor, keeps the p-th root differentiable at 0.

    Returns:
      [B, C] of the dtype of `x`.
    """
    x, dtype = _to_float32(x)
    _check_rank4(x, "gem")
    p = tf.cast(tf.convert_to_tensor(p), x.dtype)
    x = tf.maximum(x, tf.cast(eps, x.dtype))
    scale = tf.stop_gradient(tf.reduce_max(x, axis=[1, 2], keepdims=True))
    pooled = tf.reduce_mean(tf.pow(x / scale, p), axis=[1, 2])
    y = tf.squeeze(scale, axis=[1, 2]) * tf.pow(pooled, 1.0 / p)
    return tf.cast(y, dtype)


# --------------------------------------------------------------------------------------------
# R-MAC region sampling
# --------------------------------------------------------------------------------------------


def _extra_regions_np(h: int, w: int, overlap: float) -> tuple[int, int]:
    """(Hd, Wd): extra regions along the long side, chosen as the reference does (float32)."""
    side = min(h, w)
    if h == w:
        return 0, 0
    steps = np.asarray(_LONG_SIDE_STEPS, np.float32)
    # The reference computes this in float32 torch tensors; mimic every rounding step.
    b = np.float32(max(h, w) - side) / (steps - np.float32(1))
    side2 = np.float32(side * side)
    err = np.abs((side2 - np.float32(side) * b) / side2 - np.float32(overlap))
    extra = int(np.argmin(err)) + 1  # np.argmin returns the first minimum, as torch.min
    return (0, extra) if h < w else (extra, 0)


def _centres_np(length: int, wl: int, count: int) -> np.ndarray:
    """Region starts along one axis: floor(wl2 + k * b) - wl2 in float32, as the reference."""
    wl2 = (wl - 2) // 2  # floor(wl / 2 - 1)
    b = 0.0 if count == 1 else (length - wl) / (count - 1)  # a Python (float64) number there
    k = np.arange(count, dtype=np.float32)
    return (np.floor(np.float32(wl2) + k * np.float32(b)).astype(np.int64)) - wl2


def _level_grids_np(
    h: int, w: int, levels: int, overlap: float
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per level l = 1..levels: (side wl, row starts [nH], column starts [nW]); side 0 skipped."""
    hd, wd = _extra_regions_np(h, w, overlap)
    side = min(h, w)
    grids = []
    for level in range(1, levels + 1):
        wl = (2 * side) // (level + 1)  # floor(2 * min / (l + 1)), exact in integers
        if wl == 0:
            continue
        tops = _centres_np(h, wl, level + hd)
        lefts = _centres_np(w, wl, level + wd)
        grids.append((wl, tops, lefts))
    return grids


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """R-MAC boxes of a h x w feature map, whole map first, exactly as the reference samples them.

    Level l (1..levels) has square regions of side floor(2 * min(h, w) / (l + 1)) on a grid of
    (l + Hd) rows by (l + Wd) columns, where the long side gets the extra count (1..6) whose
    overlap is closest to `overlap`. Regions of side 0 are skipped. Like the reference, small maps
    repeat boxes (a 2x2 map has duplicates at levels 2 and 3); they are kept, since each adds its
    vector to the R-MAC sum.

    Args:
      h: feature-map height in cells (>= 1).
      w: feature-map width in cells (>= 1).
      levels: number of levels L.
      overlap: desired overlap of neighbouring regions along the long side.

    Returns:
      int64 [R, 4] boxes (top, left, height, width): the whole map, then level by level, rows then
      columns.
    """
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"feature map must be at least 1x1, got {h}x{w}")
    boxes = [np.array([[0, 0, h, w]], np.int64)]
    for wl, tops, lefts in _level_grids_np(h, w, levels, overlap):
        tt, ll = np.meshgrid(tops, lefts, indexing="ij")
        side = np.full(tt.size, wl, np.int64)
        boxes.append(np.stack([tt.ravel(), ll.ravel(), side, side], axis=1))
    return np.concatenate(boxes, axis=0)


def num_rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> int:
    """Number of R-MAC vectors (whole map included) for a h x w map."""
    return 1 + sum(t.size * s.size for _, t, s in _level_grids_np(h, w, levels, overlap))


def _level_grids_tf(
    h: tf.Tensor, w: tf.Tensor, levels: int, overlap: float
) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """Graph version of `_level_grids_np` for int32 scalar tensors h, w (same float32 rounding).

    A level of side 0 yields empty start vectors instead of being skipped, so the number of
    levels stays a Python constant.
    """
    h = tf.cast(h, tf.int32)
    w = tf.cast(w, tf.int32)
    side = tf.minimum(h, w)
    steps = tf.constant(_LONG_SIDE_STEPS, tf.float32)
    sidef = tf.cast(side, tf.float32)
    b = tf.cast(tf.maximum(h, w) - side, tf.float32) / (steps - 1.0)
    err = tf.abs((sidef * sidef - sidef * b) / (sidef * sidef) - tf.constant(overlap, tf.float32))
    # First index of the minimum (tf.argmin does not promise which tie it returns).
    first = tf.reduce_min(
        tf.where(tf.equal(err, tf.reduce_min(err)), tf.range(len(_LONG_SIDE_STEPS)), 1000)
    )
    extra = first + 1
    hd = tf.where(h > w, extra, 0)
    wd = tf.where(h < w, extra, 0)

    def centres(length, wl, count):
        wl2 = tf.math.floordiv(wl - 2, 2)
        # The reference's step is a float64 Python number that torch rounds to float32. Dividing
        # in float32 gives the same number: a quotient by count - 1 <= 8 cannot fall on a float32
        # rounding tie, so rounding once or twice agrees (checked for every length < 5000); and
        # TFLite has no float64 division.
        b = tf.cast(length - wl, tf.float32) / tf.cast(tf.maximum(count - 1, 1), tf.float32)
        b = tf.where(count > 1, b, 0.0)
        k = tf.cast(tf.range(count), tf.float32)
        return tf.cast(tf.floor(tf.cast(wl2, tf.float32) + k * b), tf.int32) - wl2

    grids = []
    for level in range(1, levels + 1):
        wl = tf.math.floordiv(2 * side, level + 1)
        keep = tf.cast(wl > 0, tf.int32)
        tops = centres(h, wl, (level + hd) * keep)
        lefts = centres(w, wl, (level + wd) * keep)
        grids.append((wl, tops, lefts))
    return grids


def rmac_regions_tf(
    h: tf.Tensor | int, w: tf.Tensor | int, levels: int = 3, overlap: float = 0.4
) -> tf.Tensor:
    """Graph-mode `rmac_regions`: the same boxes from scalar tensors (e.g. `tf.shape(x)[1]`).

    Args:
      h: int scalar tensor, feature-map height (>= 1).
      w: int scalar tensor, feature-map width (>= 1).
      levels: number of levels L.
      overlap: desired overlap of neighbouring regions along the long side.

    Returns:
      int32 [R, 4] boxes (top, left, height, width), R known only at run time.
    """
    h = tf.cast(h, tf.int32)
    w = tf.cast(w, tf.int32)
    boxes = [tf.stack([0, 0, h, w])[None, :]]
    for wl, tops, lefts in _level_grids_tf(h, w, levels, overlap):
        tt, ll = tf.meshgrid(tops, lefts, indexing="ij")
        side = tf.fill(tf.shape(tf.reshape(tt, [-1])), wl)
        boxes.append(tf.stack([tf.reshape(tt, [-1]), tf.reshape(ll, [-1]), side, side], axis=1))
    return tf.concat(boxes, axis=0)


def _regional_max(x: tf.Tensor, wl, tops, lefts) -> tf.Tensor:
    """MAC of every wl x wl region of one level: [B, H, W, C] -> [B, nH * nW, C].

    Separable: max over each row band (gather the band's rows, reduce), then over each column
    band of those. It costs about nH * wl * W * C comparisons, is one vectorised kernel per step
    (no per-region loop) and has a gradient.
    """
    offsets = tf.range(wl)
    rows = tf.gather(x, tops[:, None] + offsets[None, :], axis=1)  # [B, nH, wl, W, C]
    rows = tf.reduce_max(rows, axis=2)  # [B, nH, W, C]
    cells = tf.gather(rows, lefts[:, None] + offsets[None, :], axis=2)  # [B, nH, nW, wl, C]
    cells = tf.reduce_max(cells, axis=3)  # [B, nH, nW, C]
    shape = tf.shape(cells)
    return tf.reshape(cells, tf.stack([shape[0], shape[1] * shape[2], shape[3]]))


def rmac_region_vectors(x: tf.Tensor, levels: int = 3, overlap: float = 0.4) -> tf.Tensor:
    """Raw (not normalised) MAC vector of the whole map and of every R-MAC region.

    This is what regional PCA-whitening is learned on and applied to (Tolias et al.: each region
    L2-normalised, whitened, L2-normalised again, then summed).

    Args:
      x: float [B, H, W, C] feature map; H and W may be unknown until run time.
      levels: number of levels L.
      overlap: desired overlap of neighbouring regions along the long side.

    Returns:
      [B, R, C] of the dtype of `x`, in `rmac_regions` order (whole map first). R is static when
      H and W are.
    """
    x = tf.convert_to_tensor(x)
    _check_rank4(x, "rmac_region_vectors")
    h, w = x.shape[1], x.shape[2]
    parts = [tf.reduce_max(x, axis=[1, 2])[:, None, :]]
    if h is not None and w is not None:
        for wl, tops, lefts in _level_grids_np(h, w, levels, overlap):
            parts.append(
                _regional_max(x, wl, tf.constant(tops, tf.int32), tf.constant(lefts, tf.int32))
            )
    else:
        shape = tf.shape(x)
        for wl, tops, lefts in _level_grids_tf(shape[1], shape[2], levels, overlap):
            parts.append(_regional_max(x, wl, tops, lefts))
    return tf.concat(parts, axis=1)


def rmac(x: tf.Tensor, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> tf.Tensor:
    """Regional maximum activation of convolutions (Tolias, Sicre & Jégou, ICLR 2016).

    The sum of the L2-normalised MAC vectors (eps added to each norm) of the whole map and of
    every region of `rmac_regions`, as the reference `rmac`; not normalised at the end and not
    whitened (add L2Normalization / PCAWhitening after it).

    Args:
      x: float [B, H, W, C] feature map.
      levels: number of levels L.
      overlap: desired overlap of neighbouring regions along the long side.
      eps: added to each region vector's norm.

    Returns:
      [B, C] of the dtype of `x`.
    """
    regions = rmac_region_vectors(x, levels=levels, overlap=overlap)
    return tf.reduce_sum(l2_normalize(regions, axis=-1, eps=eps), axis=1)


def rmac_output_regions(h: int | None, w: int | None, levels: int = 3, overlap: float = 0.4):
    """Static R of `rmac_region_vectors` for a map of static size, else None (for shapes)."""
    if h is None or w is None:
        return None
    return num_rmac_regions(int(h), int(w), levels, overlap)


__all__ = [
    "gem",
    "mac",
    "num_rmac_regions",
    "rmac",
    "rmac_output_regions",
    "rmac_region_vectors",
    "rmac_regions",
    "rmac_regions_tf",
    "spoc",
]
