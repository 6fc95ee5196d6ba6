"""A KerasHub vision transformer as a token model that takes images of any size.

KerasHub's backbones are built for one square image size (their position embeddings are
resampled once, to that size). Here the transformer blocks of the tower that
`cbir_tf.describe.transformers.load_tower` loads are reused as they are, behind the toolkit's own
`PatchEmbedding` (learned positions resampled to every image's patch grid, as Hugging Face does)
or `PatchRope` (DINOv3's rotary angles for the image's grid), so that every image keeps its own
size and aspect through one traced function, and a saved descriptor model loads with
`safe_mode=True` (KerasHub's layers are found by their module; `keras-hub` must be installed
where the model is loaded).

  preprocessed image [B, H, W, 3] ▸ PatchEmbedding [▸ pre-norm (CLIP)] ▸ blocks ▸ final norm
    -> tokens [B, class + registers + (H/p)(W/p), D]
  tokens ▸ the model's own image embedding head (CLIP's projected class token, SigLIP's
    attention pooling) -> [B, E]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from cbir_tf.describe import transformers
from cbir_tf.describe.layers.tokens import ClassToken, PatchEmbedding, PatchRope

__all__ = ["TransformerParts", "build_transformer"]


@dataclasses.dataclass
class TransformerParts:
    """What a descriptor model needs of a transformer backbone.

    Attributes:
      tokens: keras.Model named after the entry: preprocessed float32 [B, H, W, 3] (H, W
        multiples of `patch_size`) -> tokens [B, num_prefix + (H/p)(W/p), channels].
      head: CLIP / SigLIP: tokens -> the model's own image embedding [B, E]; else None.
      patch_size: p.
      num_prefix: tokens before the patches (class token and registers).
      channels: token width D.
      class_token: whether the first token is a class token (SigLIP has none).
    """

    tokens: keras.Model
    head: keras.Model | None
    patch_size: int
    num_prefix: int
    channels: int
    class_token: bool


def _embedding(
    hidden: int,
    patch: int,
    kernel,
    bias=None,
    cls=None,
    registers=None,
    positions=None,
    antialias=False,
) -> PatchEmbedding:
    """A `PatchEmbedding` holding a KerasHub embedding's weights (numpy arrays)."""
    positions = None if positions is None else np.asarray(positions).reshape(1, -1, hidden)
    rows = 0 if positions is None else positions.shape[1] - int(cls is not None)
    layer = PatchEmbedding(
        hidden,
        patch,
        grid=int(round(rows**0.5)),
        class_token=cls is not None,
        num_registers=0 if registers is None else int(np.shape(registers)[1]),
        use_bias=bias is not None,
        antialias=antialias,
        name="patch_embedding",
    )
    layer.build((None, None, None, 3))
    layer.kernel.assign(np.asarray(kernel))
    for variable, value in (
        (getattr(layer, "bias", None), bias),
        (getattr(layer, "cls", None), cls),
        (getattr(layer, "registers", None), registers),
        (getattr(layer, "positions", None), positions),
    ):
        if value is not None:
            variable.assign(np.asarray(value).reshape(tuple(variable.shape)))
    return layer


def _opt(layer: Any, name: str) -> Any:
    return getattr(layer, name).numpy() if hasattr(layer, name) else None


def _dino_tokens(spec_name: str, tower: Any, family: str) -> tuple[keras.Model, int]:
    emb = tower.embeddings
    conv = emb.patch_embeddings.projection
    image = keras.Input((None, None, 3), name="image")
    registers = _opt(emb, "register_tokens") if tower.num_register_tokens else None
    arrays = (conv.kernel.numpy(), conv.bias.numpy(), emb.cls_token.numpy(), registers)
    if family == "dinov2":
        embed = _embedding(
            tower.hidden_dim,
            tower.patch_size,
            *arrays,
            emb.position_embeddings.numpy(),
            antialias=tower.antialias_in_interpolation,
        )
        x = embed(image)
        for block in tower.encoder.layers:
            x = block(x)
    else:  # DINOv3: rotary positions follow the patch grid
        embed = _embedding(tower.hidden_dim, tower.patch_size, *arrays)
        x = embed(image)
        rope = PatchRope(
            tower.patch_size,
            tower.hidden_dim // tower.num_heads,
            float(tower.rope_theta),
            name="rope",
        )(image)
        for block in tower.encoder.layers:
            x = block(x, position_embeddings=rope, num_prefix_tokens=embed.num_prefix)
    x = tower.layernorm(x)
    return keras.Model(image, x, name=spec_name), embed.num_prefix


def _clip_tokens(spec_name: str, tower: Any) -> keras.Model:
    emb = tower.embedding
    image = keras.Input((None, None, 3), name="image")
    x = _embedding(
        tower.hidden_dim,
        tower.patch_size,
        emb.patch_embedding.kernel.numpy(),
        cls=emb.class_embedding.numpy(),
        positions=emb.position_embedding.embeddings.numpy(),
    )(image)
    x = tower.pre_layer_norm(x)
    for block in tower.encoder_layers:
        x = block(x)
    return keras.Model(image, tower.layer_norm(x), name=spec_name)


def _siglip_tokens(spec_name: str, tower: Any) -> keras.Model:
    emb = tower.embedding
    image = keras.Input((None, None, 3), name="image")
    x = _embedding(
        tower.hidden_dim,
        tower.patch_size,
        emb.patch_embedding.kernel.numpy(),
        emb.patch_embedding.bias.numpy(),
        positions=emb.position_embedding.embeddings.numpy(),
    )(image)
    for block in tower.encoder_layers:
        x = block(x)
    return keras.Model(image, tower.post_layer_norm(x), name=spec_name)


def _head(
    spec: transformers.TransformerSpec, tower: Any, projection: Any, channels: int
) -> keras.Model:
    tokens = keras.Input((None, channels), name="tokens")
    if spec.family == "clip":
        out = projection(ClassToken(name="class_token")(tokens))
    else:
        out = tower.head(tokens)
    return keras.Model(tokens, out, name="embedding_head")


def build_transformer(name: str, weights: Any = "pretrained", *, seed: int = 0) -> TransformerParts:
    """Builds a transformer backbone as a token model that takes images of any size.

    Args:
      name: registry name (`TRANSFORMERS`).
      weights: 'imagenet' / 'pretrained' (the KerasHub preset), 'none' (random, from `seed`),
        a local preset or Hugging Face checkpoint folder, or a KerasHub handle ('hf://...').
      seed: seed of the random weights.

    Returns:
      TransformerParts.

    Raises:
      KeyError: unknown name.
      KerasHubMissingError: keras-hub is not installed.
      WeightsUnavailableError: the preset cannot be downloaded (one line naming the folder to
        give with --weights=DIR).
      WeightsFileError: a folder that is missing, of another family or size, or unreadable.
    """
    spec, tower, projection = transformers.load_tower(name, weights, seed=seed)
    if spec.family in ("dinov2", "dinov3"):
        tokens, num_prefix = _dino_tokens(spec.name, tower, spec.family)
    elif spec.family == "clip":
        tokens, num_prefix = _clip_tokens(spec.name, tower), 1
    else:
        tokens, num_prefix = _siglip_tokens(spec.name, tower), 0
    channels = int(tower.hidden_dim)
    head = _head(spec, tower, projection, channels) if spec.family_spec.has_head else None
    return TransformerParts(
        tokens,
        head,
        int(tower.patch_size),
        num_prefix,
        channels,
        class_token=spec.family != "siglip",
    )
