"""Every layer through the shared run_layer_test helper, plus layer-specific behaviour."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cbir_tf.describe import layers
from cbir_tf.describe.ops import pooling
from cbir_tf.describe.ops import tokens as tokens_ops
from cbir_tf.describe.whitening import learn_pca_whitening
from tests.layer_test_utils import run_layer_test

RNG = np.random.default_rng(0)
FMAP = RNG.random((2, 5, 7, 8), dtype=np.float32)
# Other sizes run through the same traced graph: 1x1, very elongated, a second batch size.
OTHER_FMAPS = [
    RNG.random((2, 1, 1, 8), dtype=np.float32),
    RNG.random((1, 3, 41, 8), dtype=np.float32),
    RNG.random((3, 12, 2, 8), dtype=np.float32),
]


def test_mac_layer(tmp_path):
    run_layer_test(
        layers.MAC,
        {},
        FMAP,
        (2, 8),
        tmp_path,
        expected_output_data=FMAP.max(axis=(1, 2)),
        other_input_data=OTHER_FMAPS,
    )


def test_spoc_layer(tmp_path):
    run_layer_test(
        layers.SPoC,
        {},
        FMAP,
        (2, 8),
        tmp_path,
        expected_output_data=FMAP.mean(axis=(1, 2)),
        other_input_data=OTHER_FMAPS,
    )


def test_gem_layer_learns_p(tmp_path):
    expected = np.mean(FMAP**2.5, axis=(1, 2)) ** (1 / 2.5)
    run_layer_test(
        layers.GeM,
        {"p": 2.5, "eps": 1e-6},
        FMAP,
        (2, 8),
        tmp_path,
        expected_num_trainable_weights=1,
        expected_output_data=expected,
        other_input_data=OTHER_FMAPS,
    )
    layer = layers.GeM(p=4.0)
    layer.build(FMAP.shape)
    assert layer.p_weight.shape == (1,) and float(layer.p_weight[0]) == 4.0
    layer.trainable = False
    assert not layer.trainable_weights


def test_rmac_layer(tmp_path):
    run_layer_test(
        layers.RMAC,
        {"levels": 3, "overlap": 0.4, "eps": 1e-6},
        FMAP,
        (2, 8),
        tmp_path,
        expected_output_data=pooling.rmac(FMAP).numpy(),
        other_input_data=OTHER_FMAPS,
    )


def test_rmac_layer_returns_regions_and_trains_under_xla(tmp_path):
    num_regions = pooling.num_rmac_regions(5, 7, levels=2)
    run_layer_test(
        layers.RMAC,
        {"levels": 2, "overlap": 0.4, "return_regions": True},
        FMAP,
        (2, num_regions, 8),
        tmp_path,
        expected_output_data=pooling.rmac_region_vectors(FMAP, levels=2).numpy(),
        expected_dynamic_output_shape=(None, None, 8),
        other_input_data=OTHER_FMAPS,
        jit_compile=True,
    )
    # R is static when the map size is.
    assert layers.RMAC(return_regions=True).compute_output_shape((None, 30, 40, 16)) == (
        None,
        21,
        16,
    )


def test_l2_normalization_layer(tmp_path):
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    expected = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
    run_layer_test(
        layers.L2Normalization,
        {"axis": -1, "eps": 1e-6},
        x,
        (4, 6),
        tmp_path,
        expected_output_data=expected,
        other_input_data=[x[:1]],
    )
    regions = RNG.normal(size=(2, 3, 6)).astype(np.float32)
    run_layer_test(
        layers.L2Normalization,
        {},
        regions,
        (2, 3, 6),
        tmp_path,
        expected_output_data=regions / (np.linalg.norm(regions, axis=-1, keepdims=True) + 1e-6),
        expected_dynamic_output_shape=(None, None, 6),
        other_input_data=[regions[:, :1]],
    )
    # clamp: tiny vectors (vanishing activations) come out exactly unit length.
    tiny = x * 1e-8
    run_layer_test(
        layers.L2Normalization,
        {"axis": -1, "eps": 1e-12, "clamp": True},
        tiny,
        (4, 6),
        tmp_path,
        expected_output_data=x / np.linalg.norm(x, axis=1, keepdims=True),
        other_input_data=[tiny[:1]],
    )


def test_sum_regions_layer(tmp_path):
    regions = RNG.normal(size=(2, 5, 6)).astype(np.float32)
    run_layer_test(
        layers.SumRegions,
        {},
        regions,
        (2, 6),
        tmp_path,
        expected_output_data=regions.sum(axis=1),
        other_input_data=[regions[:1, :1], regions[:, :3]],
    )


@pytest.fixture(scope="module")
def whitening():
    rng = np.random.default_rng(7)
    train = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
    return learn_pca_whitening(train, dim=4)


def test_pca_whitening_layer(tmp_path, whitening):
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    expected = (x - whitening.mean) @ whitening.projection
    run_layer_test(
        layers.PCAWhitening,
        {"input_dim": 6, "output_dim": 4},
        x,
        (3, 4),
        tmp_path,
        expected_num_non_trainable_weights=2,
        expected_output_data=expected,
        other_input_data=[x[:1]],
        setup_layer=lambda layer: layer.set_whitening(whitening),
        rtol=1e-5,
        atol=1e-5,
    )
    # Regional vectors [B, R, D] are whitened one by one.
    regions = RNG.normal(size=(2, 5, 6)).astype(np.float32)
    run_layer_test(
        layers.PCAWhitening,
        {"input_dim": 6, "output_dim": 4},
        regions,
        (2, 5, 4),
        tmp_path,
        expected_num_non_trainable_weights=2,
        expected_output_data=(regions - whitening.mean) @ whitening.projection,
        expected_dynamic_output_shape=(None, None, 4),
        other_input_data=[regions[:, :1]],
        setup_layer=lambda layer: layer.set_whitening(whitening),
        rtol=1e-5,
        atol=1e-5,
    )


def test_pca_whitening_from_whitening_and_shape_checks(whitening):
    layer = layers.PCAWhitening.from_whitening(whitening, name="whiten")
    assert layer.built and layer.name == "whiten"
    assert (layer.input_dim, layer.output_dim) == (6, 4)
    np.testing.assert_array_equal(np.asarray(layer.mean), whitening.mean)
    np.testing.assert_array_equal(np.asarray(layer.projection), whitening.projection)
    assert not layer.trainable_weights
    with pytest.raises(ValueError, match="does not fit"):
        layers.PCAWhitening(input_dim=5, output_dim=4).set_whitening(whitening)
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 5\]"):
        layers.PCAWhitening(input_dim=5, output_dim=2)(np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match="output_dim <= input_dim"):
        layers.PCAWhitening(input_dim=4, output_dim=6)


def test_layers_refuse_wrong_ranks():
    for layer in (layers.MAC(), layers.SPoC(), layers.GeM(), layers.RMAC()):
        with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
            layer(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[B, R, D\]"):
        layers.SumRegions()(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="levels"):
        layers.RMAC(levels=0)


def test_mixed_precision_layers_stay_finite():
    # Activations of 60 cubed overflow float16; the ops compute in float32 and cast back.
    x = (RNG.random((2, 9, 12, 16)) * 60).astype(np.float32)
    for cls, op in ((layers.GeM, pooling.gem), (layers.RMAC, pooling.rmac)):
        layer = cls(dtype="mixed_float16")
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        assert np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_allclose(np.asarray(y, np.float32), op(x).numpy(), rtol=5e-3, atol=1e-3)
        if cls is layers.GeM:
            assert layer.p_weight.dtype == "float32"


# -- vision-transformer layers -------------------------------------------------------------------

IMAGES = RNG.random((2, 28, 42, 3), dtype=np.float32)
OTHER_IMAGES = [
    RNG.random((1, 14, 14, 3), dtype=np.float32),
    RNG.random((3, 70, 28, 3), dtype=np.float32),
]


def test_snap_to_patches_layer(tmp_path):
    off_grid = RNG.random((2, 30, 45, 3), dtype=np.float32)
    expected = tf.image.resize(off_grid, (28, 42), method="bilinear").numpy()
    run_layer_test(
        layers.SnapToPatches,
        {"patch_size": 14},
        off_grid,
        (2, 28, 42, 3),
        tmp_path,
        expected_output_data=expected,
        expected_dynamic_output_shape=(None, None, None, 3),
        other_input_data=[IMAGES, RNG.random((1, 3, 100, 3), dtype=np.float32)],
    )


def test_patch_embedding_layer(tmp_path):
    init = {
        "hidden_dim": 8,
        "patch_size": 14,
        "grid": 2,
        "class_token": True,
        "num_registers": 2,
        "use_bias": True,
        "antialias": False,
    }
    run_layer_test(
        layers.PatchEmbedding,
        init,
        IMAGES,
        (2, 1 + 2 + 2 * 3, 8),
        tmp_path,
        expected_num_trainable_weights=5,  # kernel, bias, class token, registers, positions
        other_input_data=OTHER_IMAGES,
    )


def test_patch_embedding_token_layout():
    """[class + its position, registers, patches + resampled positions], row by row."""
    layer = layers.PatchEmbedding(8, 14, grid=2, num_registers=2, use_bias=False)
    layer.build(IMAGES.shape)
    out = layer(IMAGES).numpy()
    positions = layer.positions.numpy()[0]
    np.testing.assert_allclose(
        out[:, 0], np.broadcast_to(layer.cls.numpy()[0, 0] + positions[0], (2, 8)), atol=1e-6
    )
    np.testing.assert_allclose(out[:, 1:3], np.broadcast_to(layer.registers.numpy()[0], (2, 2, 8)))
    conv = tf.nn.conv2d(IMAGES, layer.kernel, 14, "VALID").numpy().reshape(2, 6, 8)
    grid = positions[1:].reshape(2, 2, 8)
    resampled = tokens_ops.interpolate_positions(grid, 2, 3).numpy()
    np.testing.assert_allclose(out[:, 3:], conv + resampled, atol=1e-5)
    no_prefix = layers.PatchEmbedding(8, 14, class_token=False)
    assert no_prefix(IMAGES).shape == (2, 6, 8) and no_prefix.num_prefix == 0


def test_class_token_layer(tmp_path):
    tokens = RNG.random((2, 5, 8), dtype=np.float32)
    run_layer_test(
        layers.ClassToken,
        {},
        tokens,
        (2, 8),
        tmp_path,
        expected_output_data=tokens[:, 0],
        other_input_data=[RNG.random((1, 1, 8), dtype=np.float32)],
    )


def _two_input_round_trip(layer, inputs, tmp_path):
    """Config and safe-mode serialisation of a layer with several inputs or outputs."""
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"cbir_tf>{type(layer).__name__}"
    symbolic = [keras.Input(shape=x.shape[1:]) for x in inputs]
    symbolic = symbolic if len(symbolic) > 1 else symbolic[0]
    model = keras.Model(symbolic, layer(symbolic))
    model.save(tmp_path / "layer.keras")
    loaded = keras.saving.load_model(tmp_path / "layer.keras", safe_mode=True)
    feed = list(inputs) if len(inputs) > 1 else inputs[0]
    outputs = keras.tree.flatten(loaded(feed)), keras.tree.flatten(model(feed))
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_patch_grid_layer(tmp_path):
    layer = layers.PatchGrid(patch_size=14, num_prefix=3)
    graph = tf.function(
        lambda t, i: layer([t, i]),
        input_signature=[tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None, None, 3])],
    )
    for h, w in ((2, 3), (1, 1), (5, 2)):
        tokens = RNG.random((2, 3 + h * w, 8), dtype=np.float32)
        image = np.zeros((2, 14 * h + 5, 14 * w, 3), np.float32)  # the remainder is dropped
        expected = tokens[:, 3:].reshape(2, h, w, 8)
        np.testing.assert_array_equal(layer([tokens, image]).numpy(), expected)
        np.testing.assert_array_equal(graph(tokens, image).numpy(), expected)
    assert graph.experimental_get_tracing_count() == 1
    assert layer.compute_output_shape(((None, None, 8), (None, 28, None, 3))) == (None, 2, None, 8)
    _two_input_round_trip(layer, [RNG.random((1, 9, 8), np.float32), IMAGES[:1]], tmp_path)


def test_patch_rope_layer_is_keras_hubs_dinov3_rope(tmp_path):
    from keras_hub.src.models.dinov3.dinov3_layers import DINOV3RopePositionEmbedding

    ours = layers.PatchRope(patch_size=16, head_dim=16, theta=100.0)
    theirs = DINOV3RopePositionEmbedding(
        hidden_dim=32, num_heads=2, rope_theta=100.0, patch_size=16
    )
    for h, w in ((64, 64), (48, 80), (16, 16)):
        image = np.zeros((1, h, w, 3), np.float32)
        for a, b in zip(ours(image), theirs(image), strict=True):
            assert a.shape == (h // 16 * (w // 16), 16)
            np.testing.assert_allclose(a.numpy(), np.asarray(b), atol=1e-6)
    _two_input_round_trip(ours, [np.zeros((1, 48, 80, 3), np.float32)], tmp_path)
