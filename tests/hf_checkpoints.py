"""Tiny random vision-transformer checkpoints written as Hugging Face folders, for the tests.

A folder holds `config.json` and `model.safetensors` with the tensor names and layouts of
Hugging Face transformers' `Dinov2Model` / `Dinov2WithRegistersModel` / `DINOv3ViTModel`
(PyTorch layouts: Linear weights [out, in], Conv2d weights [out, in, kh, kw]), so the toolkit
loads them exactly as it loads `facebook/dinov2-small` from the hub: through KerasHub's
converter. Nothing is downloaded.

Also tiny KerasHub preset folders of CLIP and SigLIP (KerasHub converts no Hugging Face CLIP or
SigLIP checkpoint): `save_to_preset` of a small random backbone.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

TINY = {"hidden": 32, "layers": 2, "heads": 2, "patch": 14, "grid": 4}


def _normal(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def dinov2_weights(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    patch: int = 14,
    grid: int = 4,
    registers: int = 0,
) -> dict[str, np.ndarray]:
    """Random DINOv2 weights under Hugging Face's names (layer scales and norms away from
    their constant initialisations, so that every term of the forward pass matters)."""
    rng = np.random.default_rng(seed)
    d = hidden
    w = {
        "embeddings.cls_token": _normal(rng, 1, 1, d),
        "embeddings.mask_token": np.zeros((1, d), np.float32),
        "embeddings.position_embeddings": _normal(rng, 1, grid * grid + 1, d),
        "embeddings.patch_embeddings.projection.weight": _normal(
            rng, d, 3, patch, patch, scale=0.05
        ),
        "embeddings.patch_embeddings.projection.bias": _normal(rng, d),
        "layernorm.weight": 1 + _normal(rng, d),
        "layernorm.bias": _normal(rng, d),
    }
    if registers:
        w["embeddings.register_tokens"] = _normal(rng, 1, registers, d)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for norm in ("norm1", "norm2"):
            w[f"{p}.{norm}.weight"] = 1 + _normal(rng, d)
            w[f"{p}.{norm}.bias"] = _normal(rng, d)
        for name in ("query", "key", "value"):
            w[f"{p}.attention.attention.{name}.weight"] = _normal(rng, d, d)
            w[f"{p}.attention.attention.{name}.bias"] = _normal(rng, d)
        w[f"{p}.attention.output.dense.weight"] = _normal(rng, d, d)
        w[f"{p}.attention.output.dense.bias"] = _normal(rng, d)
        w[f"{p}.layer_scale1.lambda1"] = 0.5 + _normal(rng, d)
        w[f"{p}.layer_scale2.lambda1"] = 0.5 + _normal(rng, d)
        w[f"{p}.mlp.fc1.weight"] = _normal(rng, 4 * d, d)
        w[f"{p}.mlp.fc1.bias"] = _normal(rng, 4 * d)
        w[f"{p}.mlp.fc2.weight"] = _normal(rng, d, 4 * d)
        w[f"{p}.mlp.fc2.bias"] = _normal(rng, d)
    return w


def _write(folder: pathlib.Path, config: dict, weights: dict[str, np.ndarray]) -> pathlib.Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def write_dinov2(
    folder: pathlib.Path, seed: int = 0, registers: int = 0, **sizes: int
) -> tuple[pathlib.Path, dict, dict[str, np.ndarray]]:
    """A Hugging Face DINOv2 checkpoint folder (with registers when `registers` > 0).

    Returns:
      (folder, its config, its weights by Hugging Face name).
    """
    s = {**TINY, **sizes}
    weights = dinov2_weights(seed, s["hidden"], s["layers"], s["patch"], s["grid"], registers)
    config = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": s["grid"] * s["patch"],
        "patch_size": s["patch"],
        "num_channels": 3,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if registers:
        config["num_register_tokens"] = registers
    return _write(folder, config, weights), config, weights


def write_dinov3(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A Hugging Face DINOv3 (`dinov3_vit`) checkpoint folder: hidden 32, 2 layers, patch 16,
    4 registers, rotary positions, no key bias (as the released models)."""
    rng = np.random.default_rng(seed)
    d, layers = 32, 2
    w = {
        "embeddings.cls_token": _normal(rng, 1, 1, d),
        "embeddings.mask_token": np.zeros((1, 1, d), np.float32),
        "embeddings.register_tokens": _normal(rng, 1, 4, d),
        "embeddings.patch_embeddings.weight": _normal(rng, d, 3, 16, 16, scale=0.05),
        "embeddings.patch_embeddings.bias": _normal(rng, d),
        "norm.weight": 1 + _normal(rng, d),
        "norm.bias": _normal(rng, d),
    }
    for i in range(layers):
        p = f"layer.{i}"
        for norm in ("norm1", "norm2"):
            w[f"{p}.{norm}.weight"] = 1 + _normal(rng, d)
            w[f"{p}.{norm}.bias"] = _normal(rng, d)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[f"{p}.attention.{name}.weight"] = _normal(rng, d, d)
            if name != "k_proj":
                w[f"{p}.attention.{name}.bias"] = _normal(rng, d)
        w[f"{p}.layer_scale1.lambda1"] = 0.5 + _normal(rng, d)
        w[f"{p}.layer_scale2.lambda1"] = 0.5 + _normal(rng, d)
        w[f"{p}.mlp.up_proj.weight"] = _normal(rng, 4 * d, d)
        w[f"{p}.mlp.up_proj.bias"] = _normal(rng, 4 * d)
        w[f"{p}.mlp.down_proj.weight"] = _normal(rng, d, 4 * d)
        w[f"{p}.mlp.down_proj.bias"] = _normal(rng, d)
    config = {
        "model_type": "dinov3_vit",
        "hidden_size": d,
        "intermediate_size": 4 * d,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "patch_size": 16,
        "image_size": 64,
        "num_register_tokens": 4,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
        "use_gated_mlp": False,
        "query_bias": True,
        "key_bias": False,
        "value_bias": True,
        "proj_bias": True,
        "mlp_bias": True,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "layer_norm_eps": 1e-5,
        "rope_theta": 100.0,
    }
    return _write(folder, config, w)


def write_keras_hub_preset(folder: pathlib.Path, family: str, seed: int = 0) -> pathlib.Path:
    """A tiny random KerasHub CLIP or SigLIP backbone saved as a preset folder (its image
    tower: hidden 32, 2 layers, patch 16, 64 x 64 learned positions)."""
    import keras_hub

    from cbir_tf.describe.transformers import seeded_initialize

    vision = dict(
        patch_size=16,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        image_shape=(64, 64, 3),
    )
    text = dict(
        vocabulary_size=64,
        embedding_dim=32,
        hidden_dim=32,
        num_layers=1,
        num_heads=2,
        intermediate_dim=64,
    )
    models = keras_hub.models
    if family == "clip":
        backbone = models.CLIPBackbone(
            models.CLIPVisionEncoder(**vision),
            models.CLIPTextEncoder(**text, max_sequence_length=8),
            projection_dim=24,
        )
        # KerasHub leaves a new CLIP's position ids at 0; a released preset holds 0..N-1.
        ids = backbone.vision_encoder.embedding.position_ids
        ids.assign(np.arange(ids.shape[1])[None])
    else:
        backbone = models.SigLIPBackbone(
            models.SigLIPVisionEncoder(**vision),
            models.SigLIPTextEncoder(**text, max_sequence_length=8),
        )
    seeded_initialize(backbone, seed)
    backbone.save_to_preset(str(folder))
    return folder
