"""Export for deployment: SavedModel signatures and TFLite files against the library's own path.

The descriptor models are `models.build_descriptor_model` with every pooling and whitening, on
a three-convolution stand-in for the backbone (random weights): the export machinery sees the
same layers as with MobileNet, and each conversion takes a second instead of ten.
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from photos import smooth_pixels
from PIL import Image, ImageOps

from cbir_tf.data.decode import load_image, resize_longest
from cbir_tf.describe import backbones, models, whitening
from cbir_tf.describe import extract as descriptors
from cbir_tf.export import formats as export
from cbir_tf.export import tf_image

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE = 64
CHANNELS = backbones.get_backbone_spec("mobilenet").num_channels(0.25)


def _tiny_backbone(name, weights, alpha, **kwargs):
    del name, weights, kwargs
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((None, None, 3))
    for filters in (8, 16, CHANNELS):  # total stride 8
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inp, x, name="tiny")


def _whitening(dim_in: int, dim_out: int, seed: int) -> whitening.Whitening:
    rng = np.random.default_rng(seed)
    return whitening.Whitening(
        mean=rng.normal(0, 0.01, dim_in),
        projection=rng.normal(0, 1, (dim_in, dim_out)),
        eigenvalues=np.linspace(2, 1, dim_out),
    )


VARIANTS = {
    "mac": dict(pooling="mac"),
    "spoc": dict(pooling="spoc"),
    "gem": dict(pooling="gem", gem_p=3.0),
    "rmac": dict(pooling="rmac"),
    "gem+whitening": dict(pooling="gem", whitening=_whitening(CHANNELS, 32, 1)),
    "rmac+regional whitening": dict(
        pooling="rmac", whitening=_whitening(CHANNELS, 48, 2), regional_whitening=True
    ),
}


@pytest.fixture(scope="module")
def tiny_models():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "build_backbone", _tiny_backbone)
        return {
            k: models.build_descriptor_model("mobilenet", "none", alpha=0.25, **v)
            for k, v in VARIANTS.items()
        }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """JPEGs of every shape (two shrunk with PIL's reduce step), an EXIF-rotated PNG."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, (h, w) in enumerate([(48, 80), (64, 64), (200, 300), (37, 150), (300, 120), (90, 70)]):
        path = folder / f"{k}.jpg"
        Image.fromarray(smooth_pixels(h, w, k)).save(path, quality=90)
        paths.append(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 wide x 90 high, shown rotated: 90 x 60
    path = folder / "rotated.png"
    Image.fromarray(smooth_pixels(90, 60, 9)).save(path, exif=exif.tobytes())
    paths.append(path)
    return [str(p) for p in paths]


# -- TFLite ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tflite_of(tiny_models):
    """tflite_of(variant, quantization) -> flatbuffer, each converted once (conversion is slow)."""
    cache = {}

    def convert(variant, quantization):
        key = (variant, quantization)
        if key not in cache:
            cache[key] = export.tflite_bytes(tiny_models[variant], quantization)
        return cache[key]

    return convert


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tflite_float32_matches_keras(tiny_models, tflite_of, variant):
    model = tiny_models[variant]
    interpreter = export.tflite_interpreter(tflite_of(variant, "float32"))
    rng = np.random.default_rng(3)
    for shape in [(48, 64), (90, 40), (20, 20)]:  # sizes set at run time; 20 px is edge-padded
        pixels = rng.uniform(0, 255, (1, *shape, 3)).astype(np.float32)
        want = model(pixels).numpy()[0]
        got = export.run_tflite(interpreter, pixels)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_tflite_quantized_weights_stay_close(tiny_models, tflite_of):
    model = tiny_models["gem+whitening"]
    pixels = np.random.default_rng(4).uniform(0, 255, (1, 64, 48, 3)).astype(np.float32)
    want = model(pixels).numpy()[0]
    sizes = {}
    for quantization in ("float32", "float16", "int8"):
        data = tflite_of("gem+whitening", quantization)
        sizes[quantization] = len(data)
        got = export.run_tflite(export.tflite_interpreter(data), pixels)
        assert float(got @ want) > 0.99, quantization
    # The second convolution's float32 kernel is most of the file: halved / quartered.
    assert sizes["float16"] < 0.6 * sizes["float32"]
    assert sizes["int8"] < 0.35 * sizes["float32"]


def test_tflite_refuses_unknown_quantization(tiny_models):
    with pytest.raises(ValueError, match="float16"):
        export.tflite_bytes(tiny_models["mac"], "int4")


# -- SavedModel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tiny_models, tmp_path_factory):
    """Single-scale R-MAC with regional whitening, and two-scale GeM with whitening."""
    out = tmp_path_factory.mktemp("saved")
    sources = {
        "rmac": export.ExportSource(tiny_models["rmac+regional whitening"], SIZE),
        "gem-ms": export.ExportSource(tiny_models["gem+whitening"], SIZE, (1.0, 0.5), 1.0),
    }
    paths = {k: export.export_saved_model(s, out / k) for k, s in sources.items()}
    return sources, paths


@pytest.mark.slow
def test_serving_default_matches_extract_on_files(saved_models, image_files):
    sources, paths = saved_models
    data = tf.constant([pathlib.Path(p).read_bytes() for p in image_files])
    for key, source in sources.items():
        serve = tf.saved_model.load(paths[key]).signatures["serving_default"]
        got = serve(image_bytes=data)["descriptors"].numpy()
        want = descriptors.extract(
            source.model, image_files, image_size=SIZE, scales=source.scales, progress=False
        ).descriptors
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=key)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_descriptors_from_pixels_matches_the_model(saved_models):
    sources, paths = saved_models
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 40, 56, 3)).astype(np.float32)
    for key, source in sources.items():
        fn = tf.saved_model.load(paths[key]).signatures["descriptors_from_pixels"]
        got = fn(pixels=tf.constant(pixels))["descriptors"].numpy()
        call = descriptors.build_extract_function(source.model, source.scales)
        want = np.concatenate([call(tf.constant(p[None])).numpy() for p in pixels])
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=key)


def test_export_info_and_refusal_to_overwrite(saved_models):
    _, paths = saved_models
    info = json.loads((pathlib.Path(paths["gem-ms"]) / export.INFO_FILE).read_text())
    assert info["scales"] == [1.0, 0.5] and info["image_size"] == SIZE and info["dim"] == 32
    assert info["input"] == "image_bytes"
    sources, _ = saved_models
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_saved_model(sources["rmac"], paths["rmac"])


# What a deployment does: TensorFlow only, then `saved_model_cli show` (the same tool, in-process).
LOADER = r"""
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
files = json.loads(sys.argv[2])
out = loaded.signatures["serving_default"](
    image_bytes=tf.constant([open(f, "rb").read() for f in files]))["descriptors"]
print(json.dumps({"cbir_tf": any(m.startswith("cbir_tf") for m in sys.modules),
                  "signatures": sorted(loaded.signatures), "descriptors": out.numpy().tolist()}))
sys.stdout.flush()
from tensorflow.python.tools import saved_model_cli
sys.argv = ["saved_model_cli", "show", "--dir", sys.argv[1], "--all"]
saved_model_cli.main()
"""


@pytest.mark.slow
def test_saved_model_runs_in_a_process_without_cbir_tf(saved_models, image_files, tmp_path):
    _, paths = saved_models
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    # Run from an empty folder, so the package in the working tree cannot be imported.
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, paths["rmac"], json.dumps(image_files)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, cli_output = proc.stdout.split("\n", 1)
    result = json.loads(first)
    assert not result["cbir_tf"]
    assert result["signatures"] == ["descriptors_from_pixels", "serving_default"]
    here = tf.saved_model.load(paths["rmac"]).signatures["serving_default"]
    want = here(image_bytes=tf.constant([pathlib.Path(p).read_bytes() for p in image_files]))
    np.testing.assert_allclose(result["descriptors"], want["descriptors"].numpy(), atol=1e-6)
    for name in ("serving_default", "descriptors_from_pixels", "image_bytes", "descriptors"):
        assert f"'{name}'" in cli_output or f"[{name}]" in cli_output, cli_output


# -- Where the model comes from: a .keras file, an index folder, a config; the entry point ----


@pytest.fixture(scope="module")
def keras_file(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "gem.keras"
    tiny_models["gem"].save(path)
    return path


def test_sources_keras_file_and_index_folder(tiny_models, keras_file, image_files, tmp_path):
    from cbir_tf import retriever

    source = export.source_from_path(keras_file, image_size=48, scales=(1.0, 0.5))
    assert (source.image_size, source.scales) == (48, (1.0, 0.5))
    pixels = np.random.default_rng(7).uniform(0, 255, (1, 40, 60, 3)).astype(np.float32)
    np.testing.assert_allclose(source.model(pixels), tiny_models["gem"](pixels), atol=1e-6)

    index = retriever.Retriever.from_model(keras_file, image_size=SIZE, directory=tmp_path / "ix")
    index.index(image_files, progress=False)
    source = export.source_from_path(tmp_path / "ix")
    assert (source.image_size, source.scales) == (SIZE, (1.0,))
    again = descriptors.extract(source.model, image_files, image_size=SIZE, progress=False)
    rows = [index.ids.index(index.id_of(p)) for p in image_files]
    np.testing.assert_allclose(again.descriptors, index.descriptors[rows], atol=1e-6)


def test_source_from_the_model_block_builds_regional_whitening(tmp_path, monkeypatch):
    from cbir_tf import config as config_lib

    monkeypatch.setattr(backbones, "build_backbone", _tiny_backbone)
    cfg = config_lib.default_config()
    cfg.model.backbone, cfg.model.alpha, cfg.model.weights = "mobilenet", 0.25, "none"
    cfg.model.pooling, cfg.data.image_size = "rmac", 96
    white = _whitening(CHANNELS, 24, 3)
    white.info["regional"] = True
    white.save(tmp_path / "w.npz")
    source = export.source_from_model(
        config_lib.block(cfg, "model"), whitening_path=tmp_path / "w.npz", image_size=96
    )
    assert source.image_size == 96 and int(source.model.output.shape[-1]) == 24
    assert "sum_regions" in [layer.name for layer in source.model.layers]
    assert source.description["pooling"] == "rmac"


def _run(args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_export_py_writes_tflite_and_refuses_to_overwrite(keras_file, tmp_path):
    out = tmp_path / "gem.tflite"
    args = ["export.py", f"--model={keras_file}", f"--out={out}", "--format=tflite"]
    proc = _run([*args, "--quantization=int8", "--config.data.image_size=48"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(pathlib.Path(f"{out}.json").read_text())
    assert info["quantization"] == "int8" and info["image_size"] == 48
    pixels = np.random.default_rng(8).uniform(0, 255, (1, 48, 40, 3)).astype(np.float32)
    got = export.run_tflite(export.tflite_interpreter(out), pixels)
    want = models.load_descriptor_model(keras_file)(pixels).numpy()[0]
    assert float(got @ want) > 0.99

    again = _run(args)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {out} already exists: remove it or choose another --out"
    )


# -- The TF-ops image path against PIL -------------------------------------------------------


@pytest.mark.slow
def test_tf_decode_and_resize_equal_pil(image_files):
    decode = tf.function(tf_image.decode_rgb, input_signature=[tf.TensorSpec([], tf.string)])
    for path in image_files:
        pixels = decode(tf.constant(pathlib.Path(path).read_bytes())).numpy()
        np.testing.assert_array_equal(pixels, load_image(path), err_msg=path)
    rng = np.random.default_rng(6)
    resize = tf.function(
        lambda x: tf_image.resize_longest(x, 37),
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
    )
    # Random shapes, tall ones included (Pillow 13 runs their passes in the other order);
    # sides over 148 px go through PIL's `reduce` step first.
    shapes = [(5, 300), (37, 37), (1, 80), (300, 5)]
    shapes += [tuple(int(v) for v in rng.integers(20, 400, 2)) for _ in range(12)]
    for h, w in shapes:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(
            resize(image).numpy(), resize_longest(image, 37), err_msg=f"{h}x{w}"
        )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_jpeg_bytes(orientation):
    image = np.zeros((4, 6, 3), np.uint8)
    image[0, 0] = 255  # a white corner shows which way the pixels moved
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    assert int(tf_image.exif_orientation(tf.constant(buf.getvalue()))) == orientation
    upright = tf_image.apply_orientation(tf.constant(image), orientation).numpy()
    # PIL's own EXIF rotation of the same bytes is the reference.
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(upright, want)


@pytest.mark.slow
def test_export_py_saved_model_logs_nothing_that_is_not_the_users_business(keras_file, tmp_path):
    # Issue 26 item 7: TensorFlow's SavedModel writer logs two ~4 KB INFO lines listing the
    # renamed inputs (input_6 ... input_140), the sharding callback's duration and more.
    out = tmp_path / "exported" / "gem" / "1"
    proc = _run(["export.py", f"--model={keras_file}", f"--out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"exported saved_model (float32) to {out}"
    assert "renamed" not in proc.stderr and "input name(s)" not in proc.stderr, proc.stderr[:3000]
    assert "Sharding callback" not in proc.stderr and len(proc.stderr) < 500, proc.stderr[:3000]
