"""Export of transformer descriptor models: the SavedModel's `serving_default` against
`extract.py`'s descriptors, and TFLite files against the Keras model, at several image sizes.

Tiny random checkpoints written by the tests (no download): a DINOv2 with registers as a
Hugging Face folder, a DINOv3 folder, and KerasHub presets of CLIP and SigLIP.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf
from hf_checkpoints import write_dinov2, write_dinov3, write_keras_hub_preset
from photos import smooth_pixels
from PIL import Image

from cbir_tf import config
from cbir_tf.describe import catalog
from cbir_tf.describe import extract as descriptors
from cbir_tf.export import formats as export

SIZE = 70  # longest side: 70 = 5 patches of 14; the other side is snapped to the grid


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "dinov2": write_dinov2(root / "dinov2", registers=4)[0],
        "dinov3": write_dinov3(root / "dinov3"),
        "clip": write_keras_hub_preset(root / "clip", "clip"),
        "siglip": write_keras_hub_preset(root / "siglip", "siglip"),
    }


def _model_block(backbone: str, weights: pathlib.Path, **fields) -> dict:
    block = {**config.defaults("model"), "backbone": backbone, "weights": str(weights), **fields}
    return catalog.with_pooling(block)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """JPEGs of several shapes and an EXIF-rotated PNG."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, (h, w) in enumerate([(48, 80), (64, 64), (200, 300), (37, 150), (90, 70)]):
        Image.fromarray(smooth_pixels(h, w, k)).save(folder / f"{k}.jpg", quality=90)
        paths.append(folder / f"{k}.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth_pixels(90, 60, 9)).save(folder / "rotated.png", exif=exif.tobytes())
    paths.append(folder / "rotated.png")
    return [str(p) for p in paths]


@pytest.mark.slow
@pytest.mark.parametrize("pooling, scales", [("auto", (1.0,)), ("gem", (1.0, 0.7071067811865476))])
def test_dinov2_saved_model_equals_extract(folders, image_files, tmp_path, pooling, scales):
    """serving_default on the files' bytes = descriptors.extract on the files, within 1e-4."""
    source = export.source_from_model(
        _model_block("dinov2", folders["dinov2"], pooling=pooling), image_size=SIZE, scales=scales
    )
    path = export.export_saved_model(source, tmp_path / "saved")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    data = tf.constant([pathlib.Path(p).read_bytes() for p in image_files])
    got = serve(image_bytes=data)["descriptors"].numpy()
    want = descriptors.extract(
        source.model, image_files, image_size=SIZE, scales=scales, progress=False
    ).descriptors
    assert got.shape == want.shape == (len(image_files), 32)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, pooling",
    [("dinov2", "cls+gem"), ("dinov3", "rmac"), ("clip", "head"), ("siglip", "head")],
)
def test_tflite_float32_matches_keras(folders, family, pooling):
    """Every op of the transformer path is a TFLite built-in: one file serves every size."""
    source = export.source_from_model(
        _model_block(family, folders[family], pooling=pooling), image_size=SIZE
    )
    interpreter = export.tflite_interpreter(export.tflite_bytes(source.model, "float32"))
    rng = np.random.default_rng(3)
    for shape in [(56, 84), (100, 70), (20, 20)]:
        pixels = rng.uniform(0, 255, (1, *shape, 3)).astype(np.float32)
        want = source.model(pixels).numpy()[0]
        np.testing.assert_allclose(export.run_tflite(interpreter, pixels), want, atol=1e-4)
