"""Training augmentations: random resized crop, horizontal flip, colour jitter; centre crop.

The augmentations retrieval fine-tuning uses, as stateless ops driven by per-example seeds, so a
pipeline with a given seed yields the same batches on every run (resume included). Images are
float32 RGB in 0..255 (the models hold their own preprocessing).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cbir_tf import config as config_lib

_TRAIN = config_lib.defaults("train")  # the defaults below are configs/default.py's


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation settings.

    Attributes:
      crop_scale: (min, max) fraction of the image area kept by the random resized crop.
      crop_ratio: (min, max) aspect ratio (width / height) of that crop.
      flip: random horizontal flip.
      color_jitter: strength s in [0, 1]: brightness +-0.4 s, contrast and saturation
        x[1 - 0.4 s, 1 + 0.4 s], hue +-0.1 s (0 disables).
    """

    crop_scale: tuple[float, float] = tuple(_TRAIN["crop_scale"])
    crop_ratio: tuple[float, float] = tuple(_TRAIN["crop_ratio"])
    flip: bool = _TRAIN["flip"]
    color_jitter: float = _TRAIN["color_jitter"]

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        rlo, rhi = self.crop_ratio
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1], got {self.color_jitter}")


def random_resized_crop(
    image: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tf.Tensor:
    """Crops a random window of bounded area and aspect ratio and resizes it to size x size.

    Args:
      image: uint8 or float [H, W, 3].
      size: output side.
      seed: int [2] stateless seed.
      scale: bounds of the crop area as a fraction of the image area.
      ratio: bounds of the crop aspect ratio (width / height).

    Returns:
      float32 [size, size, 3] in the input's value range.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    # No box given: sample a window of the whole image; after 100 failed draws (extreme
    # bounds on a thin image) the op falls back to the whole image.
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(tf.cast(crop, tf.float32), [size, size], antialias=True)


def color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Random brightness, contrast, saturation and hue changes, in a fixed order.

    Args:
      image: float32 [H, W, 3] in 0..255.
      strength: s in [0, 1] (see `Augment.color_jitter`).
      seed: int [2] stateless seed.

    Returns:
      float32 [H, W, 3] in 0..255.
    """
    if strength <= 0:
        return image
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, 0.4 * strength, seed=seeds[0])
    x = tf.image.stateless_random_contrast(x, 1 - 0.4 * strength, 1 + 0.4 * strength, seeds[1])
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = tf.image.stateless_random_saturation(x, 1 - 0.4 * strength, 1 + 0.4 * strength, seeds[2])
    x = tf.image.stateless_random_hue(x, 0.1 * strength, seed=seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def augment_image(image: tf.Tensor, size: int, seed: tf.Tensor, augment: Augment) -> tf.Tensor:
    """Random resized crop, flip and colour jitter of one image.

    Args:
      image: uint8 [H, W, 3].
      size: output side.
      seed: int [2] stateless seed.
      augment: the settings.

    Returns:
      float32 [size, size, 3] in 0..255.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    x = random_resized_crop(image, size, seeds[0], augment.crop_scale, augment.crop_ratio)
    if augment.flip:
        x = tf.image.stateless_random_flip_left_right(x, seeds[1])
    x = color_jitter(x, augment.color_jitter, seeds[2])
    return tf.ensure_shape(x, [size, size, 3])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the shorter side to `size` and keeps the central size x size square.

    Args:
      image: uint8 or float [H, W, 3].
      size: output side.

    Returns:
      float32 [size, size, 3].
    """
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = float(size) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.math.ceil(shape * factor), tf.int32), size)
    resized = tf.image.resize(image, new, antialias=True)
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return tf.ensure_shape(resized[top : top + size, left : left + size, :], [size, size, 3])
