"""Vision-transformer layers: image to tokens at any size, and tokens back to a grid or a vector.

Thin registered layers over `cbir_tf.describe.ops.tokens`, so that a descriptor model built on a
KerasHub transformer describes every image at its own size (KerasHub's embeddings are fixed to
one square size) and still loads with `safe_mode=True`:

  image ▸ SnapToPatches ▸ (preprocessing) ▸ PatchEmbedding ▸ transformer blocks ▸ tokens
  tokens ▸ ClassToken                      the class token [B, D] (DINO's global descriptor)
  [tokens, image] ▸ PatchGrid              patch tokens laid back on their grid [B, h, w, D],
                                           for MAC / SPoC / GeM / R-MAC
  image ▸ PatchRope                        DINOv3's rotary angles for the image's grid
"""

from __future__ import annotations

import keras
import tensorflow as tf

from cbir_tf.describe.ops import tokens as token_ops

__all__ = ["ClassToken", "PatchEmbedding", "PatchGrid", "PatchRope", "SnapToPatches"]


def _check_image_shape(layer: keras.layers.Layer, input_shape) -> None:
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer.__class__.__name__} expects images [B, H, W, C], got shape "
            f"{tuple(input_shape)}"
        )


@keras.saving.register_keras_serializable(package="cbir_tf")
class SnapToPatches(keras.layers.Layer):
    """Resizes images so that each side is the nearest multiple of the patch size.

    A vision transformer cuts the image into p x p patches and drops what is left over; rounding
    each side to the nearest multiple of p (bilinear) keeps the whole picture with its aspect.
    Exactly the identity for sides that already are multiples.

    Args:
      patch_size: the patch side p in pixels.
      **kwargs: base Layer arguments.
    """

    def __init__(self, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)

    def build(self, input_shape):
        _check_image_shape(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        size = tf.shape(x)[1:3]
        target = token_ops.snapped_size(size, self.patch_size)
        # Plain bilinear (TFLite has it built in; antialiasing does not): the side changes by
        # less than half a patch, too little to alias. At equal sizes it is exactly the identity,
        # so images already on the grid are not blurred.
        return tf.cast(tf.image.resize(x, target, method="bilinear"), x.dtype)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in (1, 2):
            if shape[axis] is not None:
                shape[axis] = token_ops.snapped_size(int(shape[axis]), self.patch_size)
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"patch_size": self.patch_size})
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class PatchEmbedding(keras.layers.Layer):
    """Images to tokens: patch projection, class and register tokens, position embeddings.

    Dosovitskiy et al., "An image is worth 16x16 words", ICLR 2021; registers: Darcet et al.,
    "Vision transformers need registers", ICLR 2024. The learned position embeddings (a `grid` x
    `grid` table) are resampled to the image's patch grid at every call, exactly as Hugging Face
    transformers does (`cbir_tf.describe.ops.tokens.interpolate_positions`), so one model serves
    every image size. Token order: [class, registers, patches row by row], as DINOv2.

    Args:
      hidden_dim: token width D.
      patch_size: patch side p.
      grid: side of the learned position-embedding grid; 0 = no learned positions (DINOv3's
        rotary positions live in the attention instead).
      class_token: prepend a learned class token (its position embedding is the table's first
        row when `grid` > 0).
      num_registers: learned register tokens after the class token (no position).
      use_bias: the patch projection has a bias (CLIP's has none).
      antialias: resample positions with PyTorch's antialiased kernel (DINOv2 with registers).
      **kwargs: base Layer arguments.

    Input: float [B, H, W, 3] preprocessed images (H, W multiples of p; the rest is dropped).
    Output: float [B, class + registers + (H/p)(W/p), D].
    """

    def __init__(
        self,
        hidden_dim: int,
        patch_size: int,
        grid: int = 0,
        class_token: bool = True,
        num_registers: int = 0,
        use_bias: bool = True,
        antialias: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.patch_size = int(patch_size)
        self.grid = int(grid)
        self.class_token = bool(class_token)
        self.num_registers = int(num_registers)
        self.use_bias = bool(use_bias)
        self.antialias = bool(antialias)

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches (class token and registers)."""
        return int(self.class_token) + self.num_registers

    def build(self, input_shape):
        _check_image_shape(self, input_shape)
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        p, d = self.patch_size, self.hidden_dim
        self.kernel = self.add_weight(
            name="kernel", shape=(p, p, input_shape[-1], d), initializer=init
        )
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(d,), initializer="zeros")
        if self.class_token:
            self.cls = self.add_weight(name="class_token", shape=(1, 1, d), initializer=init)
        if self.num_registers:
            self.registers = self.add_weight(
                name="registers", shape=(1, self.num_registers, d), initializer=init
            )
        if self.grid:
            rows = self.grid * self.grid + int(self.class_token)
            self.positions = self.add_weight(name="positions", shape=(1, rows, d), initializer=init)
        super().build(input_shape)

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        dtype = x.dtype
        x = tf.nn.conv2d(x, tf.cast(self.kernel, dtype), self.patch_size, "VALID")
        if self.use_bias:
            x = x + tf.cast(self.bias, dtype)
        batch, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        patches = tf.reshape(x, [batch, h * w, self.hidden_dim])
        prefix = []
        if self.grid:
            table = self.positions[0, int(self.class_token) :]
            table = tf.reshape(table, [self.grid, self.grid, self.hidden_dim])
            positions = token_ops.interpolate_positions(table, h, w, self.antialias)
            patches = patches + tf.cast(positions, dtype)[None]
        if self.class_token:
            cls = tf.cast(self.cls, dtype)
            if self.grid:
                cls = cls + tf.cast(self.positions[:, :1], dtype)
            prefix.append(tf.tile(cls, [batch, 1, 1]))
        if self.num_registers:
            prefix.append(tf.tile(tf.cast(self.registers, dtype), [batch, 1, 1]))
        return tf.concat([*prefix, patches], axis=1) if prefix else patches

    def compute_output_shape(self, input_shape):
        tokens = None
        if input_shape[1] is not None and input_shape[2] is not None:
            p = self.patch_size
            tokens = self.num_prefix + (input_shape[1] // p) * (input_shape[2] // p)
        return (input_shape[0], tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "grid": self.grid,
                "class_token": self.class_token,
                "num_registers": self.num_registers,
                "use_bias": self.use_bias,
                "antialias": self.antialias,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class PatchRope(keras.layers.Layer):
    """DINOv3's rotary position angles for the patch grid of the images: [B, H, W, C] ->
    (cos, sin), each [h*w, head_dim] (see `cbir_tf.describe.ops.tokens.rope_angles`).

    Args:
      patch_size: patch side p.
      head_dim: attention head width.
      theta: base period of the rotation frequencies.
      **kwargs: base Layer arguments.
    """

    def __init__(self, patch_size: int, head_dim: int, theta: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.head_dim = int(head_dim)
        self.theta = float(theta)

    def call(self, inputs):
        h = tf.shape(inputs)[1] // self.patch_size
        w = tf.shape(inputs)[2] // self.patch_size
        cos, sin = token_ops.rope_angles(h, w, self.head_dim, self.theta)
        return tf.cast(cos, self.compute_dtype), tf.cast(sin, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        n = None
        if input_shape[1] is not None and input_shape[2] is not None:
            n = (input_shape[1] // self.patch_size) * (input_shape[2] // self.patch_size)
        return (n, self.head_dim), (n, self.head_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"patch_size": self.patch_size, "head_dim": self.head_dim, "theta": self.theta}
        )
        return config


@keras.saving.register_keras_serializable(package="cbir_tf")
class ClassToken(keras.layers.Layer):
    """The class token: [B, N, D] -> [B, D] (the first token).

    DINO's global image descriptor (Caron et al., ICCV 2021; Oquab et al., "DINOv2", TMLR 2024,
    instance retrieval on the class token).
    """

    def call(self, inputs):
        return inputs[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="cbir_tf")
class PatchGrid(keras.layers.Layer):
    """Patch tokens laid back onto the image's patch grid: [tokens, image] -> [B, h, w, D].

    The grid's size comes from the image the tokens were computed from (h = H // p, w = W // p),
    so the CNN poolings (MAC, SPoC, GeM, R-MAC) apply unchanged.

    Args:
      patch_size: patch side p.
      num_prefix: tokens before the patches (class token and registers).
      **kwargs: base Layer arguments.
    """

    def __init__(self, patch_size: int, num_prefix: int, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.num_prefix = int(num_prefix)

    def call(self, inputs):
        tokens, image = inputs
        h = tf.shape(image)[1] // self.patch_size
        w = tf.shape(image)[2] // self.patch_size
        return token_ops.patch_grid(tokens, self.num_prefix, h, w)

    def compute_output_shape(self, input_shape):
        tokens, image = input_shape
        h, w = image[1], image[2]
        h = None if h is None else h // self.patch_size
        w = None if w is None else w // self.patch_size
        return (tokens[0], h, w, tokens[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"patch_size": self.patch_size, "num_prefix": self.num_prefix})
        return config
