"""Descriptor models: composition, whitening placement, tiny images, saving and safe loading."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_test_utils import run_layer_test
from lively import lively
from PIL import Image

from cbir_tf.data.decode import load_image
from cbir_tf.describe.backbones import get_backbone_spec
from cbir_tf.describe.models import (
    EdgePad,
    Preprocess,
    UnsafeModelError,
    build_descriptor_model,
    feature_scale,
    load_descriptor_model,
)
from cbir_tf.describe.ops import pooling as pooling_ops
from cbir_tf.describe.whitening import Whitening, apply_regional_whitening, apply_whitening

SMALL = {"backbone": "mobilenet", "weights": "none", "alpha": 0.25}
C = 256  # MobileNet(alpha=0.25) channels


def _images(n=2, h=64, w=96, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)


def _copy_backbone(dst: keras.Model, src: keras.Model) -> keras.Model:
    dst.get_layer("mobilenet").set_weights(src.get_layer("mobilenet").get_weights())
    return dst


def _random_whitening(dim_in=C, dim_out=32, seed=0, **info):
    rng = np.random.RandomState(seed)
    return Whitening(
        mean=rng.normal(0, 0.05, dim_in),
        projection=rng.normal(0, 1, (dim_in, dim_out)),
        eigenvalues=np.linspace(2, 1, dim_out),
        info=info,
    )


@pytest.fixture(scope="module")
def features_and_regions():
    """Feature maps and model parts of one lively random MobileNet, shared by several tests."""
    keras.utils.set_random_seed(0)
    model = lively(build_descriptor_model(pooling="rmac", **SMALL))

    def features(x):
        for name in ("edge_pad", "preprocess", "mobilenet"):
            x = model.get_layer(name)(x)
        return x

    return model, features


# ---------------------------------------------------------------------------------------------
# Layers of this module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet", "efficientnetb0"])
def test_preprocess_layer(backbone, tmp_path):
    x = _images(2, 5, 7)
    expected = np.asarray(get_backbone_spec(backbone).preprocess_input(x.copy()))
    run_layer_test(
        Preprocess,
        {"backbone": backbone},
        x,
        (2, 5, 7, 3),
        tmp_path,
        expected_output_data=expected,
        expected_dynamic_output_shape=(None, None, None, 3),
        other_input_data=[_images(1, 9, 4, seed=1), _images(3, 1, 1, seed=2)],
        rtol=1e-5,
        atol=1e-4,
    )


def test_preprocess_unknown_backbone():
    with pytest.raises(KeyError, match="valid backbones"):
        Preprocess("alexnet")


def test_edge_pad_layer(tmp_path):
    x = _images(2, 3, 40)
    # 3 rows -> 12: 4 copies of the first row before, 5 of the last after.
    expected = np.concatenate([np.repeat(x[:, :1], 4, 1), x, np.repeat(x[:, -1:], 5, 1)], axis=1)
    run_layer_test(
        EdgePad,
        {"min_size": 12},
        x,
        (2, 12, 40, 3),
        tmp_path,
        expected_output_data=expected,
        expected_dynamic_output_shape=(None, None, None, 3),
        other_input_data=[_images(1, 1, 1, seed=1), _images(1, 30, 2, seed=2)],
    )
    tiny = EdgePad(min_size=4)(np.array([[[[1.0, 2.0, 3.0]]]], np.float32))
    np.testing.assert_array_equal(tiny, np.broadcast_to([1.0, 2.0, 3.0], (1, 4, 4, 3)))
    big = _images(1, 40, 33)
    np.testing.assert_array_equal(EdgePad(min_size=32)(big), big)  # identity when large enough
    with pytest.raises(ValueError):
        EdgePad(min_size=0)


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling, op",
    [
        ("mac", pooling_ops.mac),
        ("spoc", pooling_ops.spoc),
        ("gem", lambda f: pooling_ops.gem(f, p=3.0)),
        ("rmac", lambda f: pooling_ops.rmac(f, levels=3)),
    ],
)
def test_descriptor_is_l2_of_pooled_features(features_and_regions, pooling, op):
    rmac_model, features = features_and_regions
    model = _copy_backbone(build_descriptor_model(pooling=pooling, **SMALL), rmac_model)
    assert model.name == f"mobilenet_{pooling}"
    x = _images()
    pooled = np.asarray(op(features(x)))
    expected = pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-6)
    out = model(x).numpy()
    assert out.shape == (2, C) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_gem_p_and_rmac_levels_are_passed():
    model = build_descriptor_model(pooling="gem", gem_p=4.5, **SMALL)
    np.testing.assert_allclose(model.get_layer("gem").p_weight.numpy(), [4.5])
    assert (
        build_descriptor_model(pooling="rmac", rmac_levels=2, **SMALL).get_layer("rmac").levels == 2
    )


def test_whitening_after_pooling_matches_numpy(features_and_regions):
    plain, _ = features_and_regions
    w = _random_whitening()
    whitened = _copy_backbone(build_descriptor_model(pooling="rmac", whitening=w, **SMALL), plain)
    x = _images(3)
    out = whitened(x).numpy()
    assert out.shape == (3, 32)
    np.testing.assert_allclose(out, apply_whitening(plain(x).numpy(), w), rtol=1e-4, atol=1e-5)


def test_regional_whitening_matches_numpy(features_and_regions):
    plain, features = features_and_regions
    regions_model = _copy_backbone(
        build_descriptor_model(pooling="rmac", output="regions", **SMALL), plain
    )
    x = _images(2, 96, 96)
    regions = regions_model(x).numpy()
    # 96 px -> 3x3 map: whole map + level 1 (1 region) + level 2 (4) ... per the golden layout
    assert regions.shape[0] == 2 and regions.shape[2] == C
    assert regions.shape[1] == pooling_ops.num_rmac_regions(3, 3, 3)
    np.testing.assert_allclose(
        regions[:, 0],
        pooling_ops.mac(plain.get_layer("mobilenet")(plain.get_layer("preprocess")(x))).numpy(),
        rtol=1e-6,
    )  # whole map first

    w = _random_whitening(seed=3, regional=True)
    model = build_descriptor_model(pooling="rmac", whitening=w, regional_whitening=True, **SMALL)
    _copy_backbone(model, plain)
    out = model(x).numpy()
    np.testing.assert_allclose(out, apply_regional_whitening(regions, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_invalid_combinations():
    with pytest.raises(KeyError, match="valid poolings: auto, mac, spoc, gem, rmac"):
        build_descriptor_model(pooling="avg", **SMALL)
    with pytest.raises(KeyError, match="for backbone mobilenet; valid poolings: auto, mac"):
        build_descriptor_model(pooling="cls", **SMALL)  # a CNN has no class token
    with pytest.raises(ValueError, match="output='regions' needs pooling='rmac'"):
        build_descriptor_model(pooling="gem", output="regions", **SMALL)
    with pytest.raises(ValueError, match="regional_whitening needs pooling='rmac'"):
        build_descriptor_model(
            pooling="mac", whitening=_random_whitening(), regional_whitening=True, **SMALL
        )
    with pytest.raises(ValueError, match="needs a whitening"):
        build_descriptor_model(pooling="rmac", regional_whitening=True, **SMALL)
    with pytest.raises(ValueError, match="unknown output"):
        build_descriptor_model(output="logits", **SMALL)
    with pytest.raises(ValueError, match="another backbone"):
        build_descriptor_model(pooling="gem", whitening=_random_whitening(dim_in=512), **SMALL)
    with pytest.raises(ValueError, match="learned for backbone 'vgg16'"):
        build_descriptor_model(
            pooling="gem", whitening=_random_whitening(backbone="vgg16"), **SMALL
        )


def test_dynamic_shapes_in_graph_mode(features_and_regions):
    model, _ = features_and_regions
    fn = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for shape in ((1, 64, 64), (2, 100, 37), (1, 33, 250)):
        x = _images(*shape, seed=sum(shape))
        np.testing.assert_allclose(fn(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(fn._list_all_concrete_functions()) == 1  # traced once for every size


@pytest.mark.parametrize("pooling", ["gem", "rmac"])
def test_random_weights_give_unit_descriptors_and_report_vanishing_activations(
    pooling, features_and_regions
):
    # Keras' own random MobileNet: activations end near 1e-15 (see `_lively`).
    keras.utils.set_random_seed(1)
    model = build_descriptor_model(pooling=pooling, **SMALL)
    x = _images(3)
    out = model(x).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Inner products are then cosines: both rank alike.
    raw = out @ out.T
    cos = raw / np.outer(np.linalg.norm(out, axis=1), np.linalg.norm(out, axis=1))
    np.testing.assert_array_equal(np.argsort(-raw, 1, "stable"), np.argsort(-cos, 1, "stable"))
    assert feature_scale(model, list(x)) < 1e-6
    lively, _ = features_and_regions
    assert feature_scale(lively, list(x)) > 1e-2
    assert feature_scale(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), []) is None


@pytest.mark.parametrize("backbone", ["vgg16", "efficientnetb0"])
def test_tiny_and_extreme_aspect_images_give_descriptors(backbone):
    # VGG16 needs 16 px and EfficientNet 2 px per side: EdgePad lets them through.
    model = build_descriptor_model(backbone=backbone, weights="none", pooling="gem")
    for shape in ((1, 1), (224, 1), (1, 8), (4000 // 18, 8)):
        out = model(_images(1, *shape)).numpy()
        assert out.shape == (1, get_backbone_spec(backbone).num_channels())
        assert np.isfinite(out).all(), shape


def test_exif_rotated_jpeg_gives_the_upright_descriptor(tmp_path, features_and_regions):
    model, _ = features_and_regions
    blocks = np.random.RandomState(0).randint(0, 256, (6, 8, 3)).astype(np.uint8)
    upright = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # 48 x 64, JPEG-exact rotations
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=95, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 270 CW to view": stored turned clockwise
    Image.fromarray(np.rot90(upright, k=-1)).save(
        tmp_path / "rot.jpg", quality=95, subsampling=0, exif=exif.tobytes()
    )
    a = model(load_image(tmp_path / "up.jpg")[None].astype(np.float32)).numpy()
    b = model(load_image(tmp_path / "rot.jpg")[None].astype(np.float32)).numpy()
    np.testing.assert_array_equal(a, b)
    stored = np.asarray(Image.open(tmp_path / "rot.jpg"))[None].astype(np.float32)
    assert not np.allclose(model(stored).numpy(), a, atol=1e-3)  # orientation matters


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def test_saved_model_loads_safely_with_identical_outputs(tmp_path, features_and_regions):
    plain, _ = features_and_regions
    w = _random_whitening(seed=4)
    model = build_descriptor_model(pooling="rmac", whitening=w, regional_whitening=True, **SMALL)
    _copy_backbone(model, plain)
    path = tmp_path / "descriptor.keras"
    model.save(path)
    loaded = load_descriptor_model(path)  # safe_mode=True
    x = _images(2, 70, 50)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]

    gem = build_descriptor_model(pooling="gem", gem_p=2.5, **SMALL)
    gem.save(tmp_path / "gem.keras")
    np.testing.assert_array_equal(load_descriptor_model(tmp_path / "gem.keras")(x), gem(x))


def test_lambda_model_is_refused_by_default(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    outputs = keras.layers.GlobalMaxPooling2D()(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(UnsafeModelError) as info:
        load_descriptor_model(path)
    message = str(info.value)
    assert str(path) in message and "Lambda" in message
    assert "safe_mode=False" in message and "arbitrary code" in message
    model = load_descriptor_model(path, safe_mode=False)  # the explicit opt-in works
    np.testing.assert_allclose(model(np.ones((1, 2, 2, 3), np.float32)), [[2.0, 2.0, 2.0]])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_descriptor_model(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="expected a saved Keras model"):
        load_descriptor_model(tmp_path / "weights.h5")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_model_from_the_config_model_block():
    from cbir_tf import config as config_lib

    cfg = config_lib.default_config()
    cfg.model.backbone = "mobilenet"
    cfg.model.alpha = 0.25
    cfg.model.weights = "none"
    cfg.model.pooling = "gem"
    cfg.model.gem_p = 2.0
    model = build_descriptor_model(**cfg.model)
    assert model.name == "mobilenet_gem" and model.output.shape[-1] == C
    np.testing.assert_allclose(model.get_layer("gem").p_weight.numpy(), [2.0])
    cfg.model.pooling = "rmac"
    cfg.model.rmac_levels = 2
    assert build_descriptor_model(**cfg.model).get_layer("rmac").levels == 2
    regions = build_descriptor_model(**cfg.model, output="regions")
    assert len(regions.output.shape) == 3


def test_saved_model_as_weights_with_whitening(tmp_path, features_and_regions):
    plain, _ = features_and_regions
    path = tmp_path / "trained.keras"
    plain.save(path)
    loaded = build_descriptor_model(weights=str(path))
    x = _images(2)
    np.testing.assert_array_equal(loaded(x), plain(x))
    w = _random_whitening(seed=5)
    whitened = build_descriptor_model(weights=str(path), whitening=w)
    np.testing.assert_allclose(
        whitened(x), apply_whitening(plain(x).numpy(), w), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="learned on 512"):
        build_descriptor_model(weights=str(path), whitening=_random_whitening(dim_in=512))
    with pytest.raises(ValueError, match="regional whitening"):
        build_descriptor_model(weights=str(path), whitening=w, regional_whitening=True)
