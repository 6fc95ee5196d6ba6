"""Backbone registry: constructors, feature layers, preprocessing, weights (local, offline)."""

from __future__ import annotations

import socket
import time

import keras
import numpy as np
import pytest
from conftest import shared_path

from cbir_tf import config
from cbir_tf.describe.backbones import (
    BACKBONES,
    WeightsFileError,
    WeightsUnavailableError,
    build_backbone,
    fetch_imagenet_weights,
    get_backbone_spec,
)

MOBILENET_FILE = "mobilenet_2_5_224_tf_no_top.h5"


@pytest.fixture(scope="module")
def mobilenet_weights():
    return str(shared_path("weights", MOBILENET_FILE))


def _image(h=64, w=80, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (1, h, w, 3)).astype(np.float32)


def test_registry_names_and_lookup():
    expected = [f"efficientnetb{i}" for i in range(8)]
    expected += [f"efficientnetv2{s}" for s in ("b0", "b1", "b2", "b3", "s", "m", "l")]
    expected += [f"convnext_{s}" for s in ("tiny", "small", "base", "large", "xlarge")]
    expected += ["vgg16", "resnet50", "resnet101", "mobilenet", "mobilenetv2"]
    assert list(BACKBONES) == expected
    assert config.default("model.backbone") == "efficientnetb1"
    assert get_backbone_spec("VGG16") is BACKBONES["vgg16"]
    with pytest.raises(KeyError, match="valid backbones: efficientnetb0.*mobilenetv2"):
        get_backbone_spec("alexnet")


def test_each_entry_has_its_own_preprocess_input():
    pixel = np.array([[[[255.0, 0.0, 0.0]]]], np.float32)
    caffe = [0 - 103.939, 0 - 116.779, 255 - 123.68]  # RGB -> BGR, ImageNet mean removed
    expectations = {
        "vgg16": caffe,
        "resnet50": caffe,
        "resnet101": caffe,
        "mobilenet": [1.0, -1.0, -1.0],  # x / 127.5 - 1
        "mobilenetv2": [1.0, -1.0, -1.0],
        "efficientnetb3": [255.0, 0.0, 0.0],  # normalisation inside the network
        "efficientnetv2s": [255.0, 0.0, 0.0],
        "convnext_tiny": [255.0, 0.0, 0.0],
    }
    for name, expected in expectations.items():
        out = np.asarray(get_backbone_spec(name).preprocess_input(pixel.copy()))
        np.testing.assert_allclose(out.reshape(3), expected, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "name, alpha, last_layer, stride",
    [
        ("mobilenet", 0.25, "conv_pw_13_relu", 32),
        ("mobilenetv2", 0.35, "out_relu", 32),
        ("vgg16", 1.0, "block5_conv3", 16),  # the last convolution, before block5_pool
        ("resnet50", 1.0, "conv5_block3_out", 32),
        ("efficientnetb1", 1.0, "top_activation", 32),
        ("efficientnetv2b0", 1.0, "top_activation", 32),
        ("convnext_tiny", 1.0, None, 32),  # Keras' unnamed final LayerNormalization
    ],
)
def test_feature_layer_channels_and_dynamic_shapes(name, alpha, last_layer, stride):
    spec = get_backbone_spec(name)
    model = build_backbone(name, weights="none", alpha=alpha)
    assert model.name == name
    if last_layer is not None:
        assert model.layers[-1].name == last_layer
    assert tuple(model.input.shape) == (None, None, None, 3)
    channels = spec.num_channels(alpha)
    assert model.output.shape[-1] == channels
    for h, w in ((64, 64), (96, 160)):
        out = model(_image(h, w))
        assert tuple(out.shape) == (1, h // stride, w // stride, channels)


def test_channels_follow_alpha():
    assert get_backbone_spec("mobilenet").num_channels(0.25) == 256
    assert get_backbone_spec("mobilenet").num_channels(0.5) == 512
    assert get_backbone_spec("mobilenetv2").num_channels(0.35) == 1280  # kept for alpha <= 1
    assert get_backbone_spec("mobilenetv2").num_channels(1.4) == 1792
    assert [get_backbone_spec(f"efficientnetb{i}").num_channels() for i in range(8)] == [
        1280,
        1280,
        1408,
        1536,
        1792,
        2048,
        2304,
        2560,
    ]


def test_channels_of_the_new_convolutional_backbones():
    # keras.applications' own no-top outputs (and the papers' widths).
    v2 = [get_backbone_spec(f"efficientnetv2{s}").num_channels() for s in ("b0", "b3", "s", "l")]
    assert v2 == [1280, 1536, 1280, 1280]
    convnext = [get_backbone_spec(f"convnext_{s}").num_channels() for s in ("tiny", "base")]
    assert convnext == [768, 1024]


@pytest.mark.slow
def test_random_convnext_is_the_same_network_in_every_build():
    """ConvNeXt's stem and downsampling blocks are nested Sequential models: their kernels are
    drawn from the seed too, so an interrupted extraction resumes with the same network."""
    first = build_backbone("convnext_tiny", "none")
    second = build_backbone("convnext_tiny", "none")
    for a, b in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    stem = [i for i, w in enumerate(first.weights) if w.path.endswith("stem_conv/kernel")]
    assert len(stem) == 1
    other = build_backbone("convnext_tiny", "none", seed=1)
    assert not np.allclose(other.weights[stem[0]].numpy(), first.weights[stem[0]].numpy())


def test_alpha_errors():
    with pytest.raises(ValueError, match="alpha=0.5 applies only to mobilenet and mobilenetv2"):
        build_backbone("vgg16", "none", alpha=0.5)
    with pytest.raises(ValueError, match="ImageNet weights only for alpha in 0.25, 0.5"):
        build_backbone("mobilenet", "imagenet", alpha=0.3)
    with pytest.raises(ValueError, match="expected 'imagenet', 'none'"):
        build_backbone("mobilenet", "weights.bin", alpha=0.25)
    with pytest.raises(ValueError, match="expected .imagenet., .none."):
        build_backbone("mobilenet", "", alpha=0.25)


def test_local_official_weights_file(mobilenet_weights):
    model = build_backbone("mobilenet", mobilenet_weights, alpha=0.25)
    reference = keras.applications.MobileNet(
        input_shape=(None, None, 3), alpha=0.25, include_top=False, weights=None
    )
    reference.load_weights(mobilenet_weights)
    x = _image(96, 128)
    np.testing.assert_array_equal(model(x), reference(x))
    random = build_backbone("mobilenet", "none", alpha=0.25)
    assert not np.allclose(random(x), reference(x))


def test_mismatched_weights_files_name_file_and_backbone(mobilenet_weights, tmp_path):
    with pytest.raises(WeightsFileError) as info:
        build_backbone("mobilenet", mobilenet_weights, alpha=0.5)
    message = str(info.value)
    assert mobilenet_weights in message and "mobilenet (alpha=0.5)" in message
    assert "mobilenet_5_0_224_tf_no_top.h5" in message  # the file that would fit

    with pytest.raises(WeightsFileError) as info:
        build_backbone("vgg16", mobilenet_weights)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(info.value)

    garbage = tmp_path / "garbage.h5"
    garbage.write_text("not hdf5")
    with pytest.raises(WeightsFileError, match="garbage.h5 does not fit backbone mobilenet"):
        build_backbone("mobilenet", garbage, alpha=0.25)
    with pytest.raises(WeightsFileError, match="not found"):
        build_backbone("mobilenet", tmp_path / "missing.h5", alpha=0.25)
    with pytest.raises(WeightsFileError, match="load_descriptor_model"):
        build_backbone("mobilenet", tmp_path / "model.keras", alpha=0.25)


def test_keras3_weights_file_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    source = keras.applications.MobileNetV2(
        input_shape=(None, None, 3), alpha=0.35, include_top=False, weights=None
    )
    path = tmp_path / "trained.weights.h5"
    source.save_weights(path)
    model = build_backbone("mobilenetv2", path, alpha=0.35)
    x = _image(64, 64)
    np.testing.assert_allclose(model(x), source(x), rtol=1e-6, atol=1e-6)


def test_efficientnet_file_gets_the_imagenet_network(tmp_path):
    # Keras builds EfficientNet with an extra input rescaling only for ImageNet weights; a local
    # copy of those weights must get the same network, hence the same features.
    source = build_backbone("efficientnetb0", "none")
    path = tmp_path / "b0.weights.h5"
    keras.Model(source.input, source.output).save_weights(path)

    def rescalings(model):
        return [layer for layer in model.layers if isinstance(layer, keras.layers.Rescaling)]

    loaded = build_backbone("efficientnetb0", path)
    assert len(rescalings(source)) == 1 and len(rescalings(loaded)) == 2
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------------------------
# Offline ImageNet weights: one clear error, never a hang
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _point_mobilenet_at(monkeypatch, base_url):
    module = pytest.importorskip("keras.src.applications.mobilenet")
    if not hasattr(module, "BASE_WEIGHT_PATH"):
        pytest.skip("this Keras version keeps the MobileNet URL elsewhere")
    monkeypatch.setattr(module, "BASE_WEIGHT_PATH", base_url)
    return module


def test_offline_imagenet_gives_one_clear_error(monkeypatch, tmp_path, no_proxy):
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    module = _point_mobilenet_at(monkeypatch, f"http://127.0.0.1:{port}/keras/")
    file_utils = module.file_utils
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("mobilenet", "imagenet", alpha=0.25, cache_dir=str(tmp_path))
    e = info.value
    assert e.file_name == MOBILENET_FILE
    assert e.url == f"http://127.0.0.1:{port}/keras/{MOBILENET_FILE}"
    message = str(e)
    assert e.url in message and f"--weights=/path/to/{MOBILENET_FILE}" in message
    assert "Could not download the ImageNet weights of mobilenet (alpha=0.25)" in message
    assert e.__cause__ is None and e.__suppress_context__  # no chained raw traceback
    assert module.file_utils is file_utils  # the temporary hook is gone
    assert not list(tmp_path.rglob("*.h5"))  # no partial file left in the cache


def test_stalled_download_times_out(monkeypatch, tmp_path, no_proxy):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections into the backlog and never answers
    port = server.getsockname()[1]
    try:
        _point_mobilenet_at(monkeypatch, f"http://127.0.0.1:{port}/")
        previous = socket.getdefaulttimeout()
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="timed out"):
            build_backbone(
                "mobilenet", "imagenet", alpha=0.25, cache_dir=str(tmp_path), download_timeout=1
            )
        assert time.perf_counter() - start < 20
        assert socket.getdefaulttimeout() == previous  # restored
    finally:
        server.close()


def test_imagenet_weights_from_the_keras_cache(mobilenet_weights, tmp_path):
    # The file Keras would download, already in its cache: no network needed.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / MOBILENET_FILE).write_bytes(open(mobilenet_weights, "rb").read())
    model = build_backbone("mobilenet", "imagenet", alpha=0.25, cache_dir=str(tmp_path))
    reference = build_backbone("mobilenet", mobilenet_weights, alpha=0.25)
    x = _image(64, 64)
    np.testing.assert_array_equal(model(x), reference(x))


def test_corrupt_cached_imagenet_file_says_what_to_delete(tmp_path):
    cached = tmp_path / "models" / MOBILENET_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)  # cut short
    with pytest.raises(WeightsFileError) as info:
        build_backbone("mobilenet", "imagenet", alpha=0.25, cache_dir=str(tmp_path))
    assert str(cached) in str(info.value) and "delete that file" in str(info.value)


def test_fetch_imagenet_weights_finds_the_cache_or_fails_clearly(monkeypatch, tmp_path, no_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _point_mobilenet_at(monkeypatch, f"http://127.0.0.1:{port}/keras/")
    with pytest.raises(WeightsUnavailableError, match="Could not download") as info:
        fetch_imagenet_weights("mobilenet", 0.25, cache_dir=str(tmp_path))
    assert info.value.file_name == MOBILENET_FILE
    # Already in the Keras cache: found without network and without building the network.
    (tmp_path / "models" / MOBILENET_FILE).write_bytes(b"cached")
    assert fetch_imagenet_weights("mobilenet", 0.25, cache_dir=str(tmp_path)) is None


@pytest.mark.slow
def test_convnext_depthwise_convolutions_are_keras_grouped_ones():
    """ConvNeXt's 7 x 7 depthwise convolutions (grouped Conv2Ds in keras.applications, which
    TensorFlow runs through XLA on CPU, slowly) are DepthwiseConv2Ds here: the same network."""
    ours = build_backbone("convnext_tiny", "none")
    grouped = [layer for layer in ours.layers if getattr(layer, "groups", 1) > 1]
    assert not grouped
    depthwise = [layer for layer in ours.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == 18  # one per block
    reference = keras.applications.ConvNeXtTiny(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    # Same layers in the same order (the unnamed final LayerNorm's name differs by build).
    for mine, layer in zip(ours.layers[1:], reference.layers[1:], strict=True):
        weights = mine.get_weights()
        if getattr(layer, "groups", 1) > 1:
            weights[0] = weights[0].reshape(7, 7, 1, -1)
        layer.set_weights(weights)
    x = _image(70, 100) * 127 + 128
    np.testing.assert_allclose(ours(x).numpy(), reference(x).numpy(), atol=1e-5)
