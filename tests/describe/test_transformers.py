"""Vision-transformer backbones (DINOv2, DINOv3, CLIP, SigLIP through KerasHub), checked offline.

No pretrained transformer weights exist on a test machine, so:
  * the backbone: a tiny random DINOv2 (2 layers, hidden 32) is written by the test as a Hugging
    Face checkpoint folder (config.json + model.safetensors), loaded through the toolkit, and its
    tokens compared with `reference_vit.dinov2_tokens`, an independent numpy forward pass;
    DINOv3, CLIP and SigLIP token models are compared with KerasHub's own towers at the size
    KerasHub builds them for (and positions at other sizes with the numpy resampling);
  * the pooling: every descriptor against numpy on the backbone's own tokens.
"""

from __future__ import annotations

import json
import math
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf
from hf_checkpoints import write_dinov2, write_dinov3, write_keras_hub_preset
from PIL import Image
from reference_vit import bicubic_matrix as reference_bicubic
from reference_vit import dinov2_tokens, imagenet_normalize

from cbir_tf.describe import catalog, models, token_models, transformers
from cbir_tf.describe.backbones import WeightsFileError, WeightsUnavailableError
from cbir_tf.describe.ops import pooling as pooling_ops
from cbir_tf.describe.ops import tokens as token_ops

RNG = np.random.default_rng(7)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """(folder, config, weights) of a tiny DINOv2 checkpoint: patch 14, a 4 x 4 position grid."""
    return write_dinov2(tmp_path_factory.mktemp("hf") / "dinov2-tiny")


@pytest.fixture(scope="module")
def dinov2_registers(tmp_path_factory):
    return write_dinov2(tmp_path_factory.mktemp("hf") / "dinov2-reg-tiny", seed=1, registers=4)


# -- the resampling of position embeddings -------------------------------------------------------


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_is_pytorchs(antialias):
    sizes = [(37, 16), (37, 73), (4, 7), (4, 3), (5, 5), (4, 1), (1, 3), (16, 37)]
    traced = tf.function(
        lambda n: token_ops.bicubic_matrix(4, n, antialias),
        input_signature=[tf.TensorSpec([], tf.int32)],
    )
    for n_in, n_out in sizes:
        ours = token_ops.bicubic_matrix(n_in, n_out, antialias).numpy()
        # float32 source coordinates, as PyTorch computes them: a few 1e-6 off float64
        np.testing.assert_allclose(ours, reference_bicubic(n_in, n_out, antialias), atol=1e-5)
        np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-6)
        if n_in == 4:  # the output size may be a tensor known only at run time
            np.testing.assert_allclose(traced(tf.constant(n_out)).numpy(), ours, atol=1e-7)
    assert traced.experimental_get_tracing_count() == 1
    # Same size: exactly the identity, as Hugging Face returns the table unchanged.
    np.testing.assert_array_equal(token_ops.bicubic_matrix(6, 6, antialias).numpy(), np.eye(6))


def test_antialiased_resampling_is_pils_bicubic():
    """PyTorch's antialiased bicubic was written to match PIL's: a second, independent check."""
    for n_in, n_out in ((37, 16), (4, 3), (37, 73), (9, 2)):
        column = RNG.standard_normal(n_in).astype(np.float32)
        image = Image.fromarray(np.tile(column[:, None], (1, 3)), mode="F")
        pil = np.asarray(image.resize((3, n_out), Image.BICUBIC))[:, 0]
        ours = token_ops.bicubic_matrix(n_in, n_out, antialias=True).numpy() @ column
        np.testing.assert_allclose(ours, pil, atol=2e-5)


def test_interpolated_positions_are_separable_bicubic():
    grid = RNG.standard_normal((4, 4, 6)).astype(np.float32)
    for h, w, aa in ((5, 3, False), (2, 7, True), (4, 4, False)):
        ours = token_ops.interpolate_positions(grid, h, w, aa).numpy()
        ref = np.einsum(
            "ah,hwd,bw->abd", reference_bicubic(4, h, aa), grid, reference_bicubic(4, w, aa)
        )
        np.testing.assert_allclose(ours, ref.reshape(h * w, 6), atol=1e-5)


# -- the backbone against the independent reference ----------------------------------------------


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (28, 84), (112, 98), (14, 14)])
def test_dinov2_checkpoint_folder_agrees_with_the_numpy_reference(dinov2, size):
    """Native grid (4 x 4), grids grown and shrunk on each axis, non-square, one patch."""
    folder, config, weights = dinov2
    parts = token_models.build_transformer("dinov2", folder)
    rgb = _rgb(*size, seed=size[0])
    spec = catalog.get_spec("dinov2")
    ours = parts.tokens(np.asarray(spec.preprocess_input(rgb))[None]).numpy()[0]
    ref = dinov2_tokens(weights, config, imagenet_normalize(rgb))
    assert ours.shape == ref.shape == (1 + (size[0] // 14) * (size[1] // 14), 32)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("size", [(56, 56), (28, 42), (98, 70)])
def test_dinov2_with_registers_agrees_with_the_numpy_reference(dinov2_registers, size):
    """Four registers after the class token; positions resampled with the antialiased kernel."""
    folder, config, weights = dinov2_registers
    parts = token_models.build_transformer("dinov2", folder)
    assert parts.num_prefix == 5
    rgb = _rgb(*size, seed=3)
    spec = catalog.get_spec("dinov2")
    ours = parts.tokens(np.asarray(spec.preprocess_input(rgb))[None]).numpy()[0]
    np.testing.assert_allclose(
        ours, dinov2_tokens(weights, config, imagenet_normalize(rgb)), atol=1e-4
    )


def test_the_class_token_descriptor_is_the_reference_class_token(dinov2):
    """The whole descriptor model (pooling 'auto' = DINOv2's class token) on raw RGB."""
    folder, config, weights = dinov2
    model = models.build_descriptor_model("dinov2", folder, pooling="auto")
    assert model.name == "dinov2_cls"
    for size in ((70, 42), (42, 98)):
        rgb = _rgb(*size, seed=11)
        cls = dinov2_tokens(weights, config, imagenet_normalize(rgb))[0]
        np.testing.assert_allclose(
            model(rgb[None]).numpy()[0], cls / np.linalg.norm(cls), atol=1e-4
        )


# -- the poolings on the backbone's own tokens ---------------------------------------------------


def _l2n(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _numpy_rmac(grid: np.ndarray, levels: int = 3) -> np.ndarray:
    total = 0.0
    for top, left, h, w in pooling_ops.rmac_regions(*grid.shape[:2], levels=levels):
        region = grid[top : top + h, left : left + w].max(axis=(0, 1))
        total = total + region / (np.linalg.norm(region) + 1e-6)
    return total


def test_poolings_against_numpy_on_the_backbones_own_tokens(dinov2_registers):
    folder, _, _ = dinov2_registers
    rgb = _rgb(84, 126, seed=5)  # a 6 x 9 patch grid
    p, eps = 3.0, 1e-6
    expected = {}
    for pooling in ("cls", "mac", "spoc", "gem", "rmac", "cls+gem"):
        model = models.build_descriptor_model("dinov2", folder, pooling=pooling, gem_p=p)
        tokens_model = model.get_layer("dinov2")
        pre = model.get_layer("preprocess")(model.get_layer("snap_to_patches")(rgb[None]))
        tokens = tokens_model(pre).numpy()[0].astype(np.float64)
        grid = tokens[5:].reshape(6, 9, 32)  # class token and 4 registers first
        gem = np.mean(np.maximum(grid, eps) ** p, axis=(0, 1)) ** (1 / p)
        expected = {
            "cls": tokens[0],
            "mac": grid.max(axis=(0, 1)),
            "spoc": grid.mean(axis=(0, 1)),
            "gem": gem,
            "rmac": _numpy_rmac(grid),
            "cls+gem": np.concatenate([_l2n(tokens[0]), _l2n(gem)]),
        }[pooling]
        out = model(rgb[None]).numpy()[0]
        assert out.shape == expected.shape, pooling
        np.testing.assert_allclose(out, _l2n(expected), atol=2e-5, err_msg=pooling)


def test_image_sides_are_rounded_to_the_patch_size(dinov2):
    folder, _, _ = dinov2
    model = models.build_descriptor_model("dinov2", folder, pooling="gem")
    tokens = keras.Model(model.input, model.get_layer("patch_grid").output)
    # 100 x 71 -> 98 x 70 (7 x 5 patches): the nearest multiples of 14, aspect kept.
    assert tokens(_rgb(100, 71)[None]).shape == (1, 7, 5, 32)
    rgb = _rgb(100, 71, seed=2)
    snapped = tf.image.resize(rgb[None], (98, 70), method="bilinear").numpy()
    np.testing.assert_allclose(model(rgb[None]).numpy(), model(snapped).numpy(), atol=1e-5)
    # Already on the grid: untouched.
    on_grid = _rgb(56, 84)
    np.testing.assert_array_equal(
        model.get_layer("snap_to_patches")(on_grid[None]).numpy(), on_grid[None]
    )
    # Tiny and thin images still give unit descriptors (edge-padded to 32, then 28 px).
    for h, w in ((1, 1), (8, 400)):
        out = model(_rgb(h, w)[None]).numpy()
        np.testing.assert_allclose(np.linalg.norm(out), 1.0, atol=1e-5)


# -- DINOv3, CLIP, SigLIP against KerasHub's own towers ------------------------------------------


def test_dinov3_tokens_equal_keras_hubs_at_any_size(tmp_path):
    import keras_hub

    folder = write_dinov3(tmp_path / "dinov3-tiny")
    parts = token_models.build_transformer("dinov3", folder)
    assert (parts.patch_size, parts.num_prefix, parts.channels) == (16, 5, 32)
    for size in ((64, 64), (48, 80)):
        # KerasHub builds DINOv3 for one size; its rotary angles follow that size.
        hub = keras_hub.models.DINOV3Backbone.from_preset(str(folder), image_shape=(*size, 3))
        x = RNG.standard_normal((2, *size, 3)).astype(np.float32)
        np.testing.assert_allclose(
            parts.tokens(x).numpy(), hub({"pixel_values": x}).numpy(), atol=1e-5
        )


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_and_siglip_towers_equal_keras_hubs(family, tmp_path):
    import keras_hub

    folder = write_keras_hub_preset(tmp_path / family, family)
    parts = token_models.build_transformer(family, folder)
    hub = keras_hub.models.Backbone.from_preset(str(folder))
    x = RNG.standard_normal((2, 64, 64, 3)).astype(np.float32)
    tokens = parts.tokens(x)
    if family == "clip":
        sequence = hub.vision_encoder({"images": x})
        np.testing.assert_allclose(tokens.numpy(), sequence.numpy(), atol=1e-5)
        embedding = hub.vision_projection(sequence[:, 0])
    else:
        embedding = hub.vision_encoder({"images": x})
    np.testing.assert_allclose(parts.head(tokens).numpy(), embedding.numpy(), atol=1e-5)
    # At another size the learned positions are resampled as Hugging Face does (PyTorch
    # bicubic); the rest of the tower is KerasHub's, checked above.
    embed = parts.tokens.get_layer("patch_embedding")
    table = embed.positions.numpy()[0, int(embed.class_token) :].reshape(4, 4, 32)
    ref = np.einsum("ah,hwd,bw->abd", reference_bicubic(4, 3), table, reference_bicubic(4, 5))
    y = RNG.standard_normal((1, 48, 80, 3)).astype(np.float32)
    conv = tf.nn.conv2d(y, embed.kernel, 16, "VALID").numpy()
    if embed.use_bias:
        conv = conv + embed.bias.numpy()
    patches = embed(y).numpy()[0, embed.num_prefix :]
    np.testing.assert_allclose(patches, (conv[0] + ref).reshape(15, 32), atol=1e-5)


def test_default_poolings_follow_the_papers():
    assert catalog.resolve_pooling("efficientnetb1", "auto") == "rmac"
    assert catalog.resolve_pooling("convnext_tiny", "auto") == "rmac"
    assert catalog.resolve_pooling("dinov2_small", "auto") == "cls"
    assert catalog.resolve_pooling("dinov3_base", "auto") == "cls"
    assert catalog.resolve_pooling("clip_vit_base_patch16", "auto") == "head"
    assert catalog.resolve_pooling("siglip_base_patch16_224", "AUTO") == "head"
    with pytest.raises(KeyError, match="valid poolings: auto, mac, spoc, gem, rmac, head"):
        catalog.resolve_pooling("siglip", "cls")  # SigLIP has no class token
    with pytest.raises(KeyError, match="valid backbones: efficientnetb0.*dinov2_small"):
        catalog.get_spec("vit_tiny")


# -- weights: offline, folders, sizes ------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No name resolves and KerasHub's download cache is empty: as on an offline machine."""

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_preset_is_one_line_naming_the_folder_to_give(offline):
    with pytest.raises(WeightsUnavailableError) as info:
        transformers.load_tower("dinov2_small", "imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "dinov2_small" in message and "--weights=DIR" in message, message
    assert "facebook/dinov2-small" in message and "save_to_preset" in message, message
    # The demo's fallback takes random weights instead, and says why.
    weights, why = catalog.resolve_weights("dinov2_small", 1.0, "imagenet", "none")
    assert weights == "none" and "could not be downloaded" in why


def test_folders_that_do_not_fit_are_one_line(dinov2, tmp_path):
    folder = dinov2[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    cases = [
        ("dinov2", tmp_path / "missing", "not found"),
        ("dinov2", tmp_path / "empty", "has no config.json"),
        ("dinov2", tmp_path / "vit", "Hugging Face 'vit' checkpoint"),
        ("clip", folder, "KerasHub does not convert to a clip backbone"),
        ("dinov2_small", folder, "or use --backbone=dinov2"),
        ("dinov2", None, "is any dinov2 checkpoint"),
    ]
    for name, weights, expected in cases:
        with pytest.raises(WeightsFileError) as info:
            transformers.load_tower(name, "none" if weights is None else weights)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_saved_descriptor_models_load_in_safe_mode(dinov2_registers, tmp_path):
    folder = write_dinov3(tmp_path / "dinov3")
    cases = [("dinov2", dinov2_registers[0], "cls+gem"), ("dinov3", folder, "rmac")]
    cases.append(("clip", write_keras_hub_preset(tmp_path / "clip", "clip"), "head"))
    for name, weights, pooling in cases:
        model = models.build_descriptor_model(name, weights, pooling=pooling)
        path = models.save_descriptor_model(model, tmp_path / f"{name}.keras")
        loaded = models.load_descriptor_model(path, safe_mode=True)
        for size in ((64, 64), (40, 90)):
            x = _rgb(*size)[None]
            np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


@pytest.mark.slow
def test_random_weights_are_the_same_network_in_every_build():
    first = token_models.build_transformer("dinov2_small", "none").tokens
    second = token_models.build_transformer("dinov2_small", "none").tokens
    for a, b in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    x = _rgb(70, 56)[None] / 255.0
    out = first(x).numpy()
    assert out.shape == (1, 1 + 5 * 4, 384) and np.all(np.isfinite(out))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov2_small", "dinov2_with_registers_base", "dinov3_small"])
def test_architectures_have_the_presets_parameter_counts(name):
    """The registry's architectures (used for random weights) against KerasHub's preset cards."""
    import keras_hub

    spec = transformers.get_transformer_spec(name)
    hub_class = getattr(keras_hub.models, spec.family_spec.hub_class)
    built = hub_class(**spec.architecture).count_params()
    card = hub_class.presets[spec.preset]["metadata"]["params"]
    assert math.isclose(built, card, rel_tol=2e-3), (built, card)


def test_alpha_is_refused_as_for_cnns_without_a_width_multiplier(dinov2):
    with pytest.raises(ValueError, match="alpha=0.25 applies only to mobilenet and mobilenetv2"):
        models.build_descriptor_model("dinov2", dinov2[0], alpha=0.25)


def test_query_crops_are_described_as_for_cnns(dinov2):
    """describe_queries crops the box, then resizes the longest side, then the model snaps the
    sides to the patch grid: the same descriptor as the cropped image described directly."""
    from cbir_tf.data.decode import resize_longest
    from cbir_tf.describe.queries import describe_queries

    model = models.build_descriptor_model("dinov2", dinov2[0], pooling="gem")
    image = _rgb(120, 160, seed=4).astype(np.uint8)
    box = (30, 10, 130, 90)  # x1, y1, x2, y2
    got = describe_queries(model, [image], [box], image_size=64)
    # The crop is scaled by the factor that brings the whole image to 64 px (the reference).
    crop = resize_longest(image[10:90, 30:130], 64, reference_longest=160)
    np.testing.assert_allclose(got[0], model(crop[None].astype(np.float32)).numpy()[0], atol=1e-5)
