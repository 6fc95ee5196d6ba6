"""Descriptor extraction: correctness, multi-scale, one trace, skips, NaN, resume, shards."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cbir_tf.describe.extract import NonFiniteDescriptorError, build_extract_function, extract
from cbir_tf.fileio import LockError, atomic_open
from cbir_tf.store import writer as store_writer
from cbir_tf.store.files import (
    DescriptorStore,
    StoreIncompleteError,
    StoreMismatchError,
    StoreWriteError,
    load_store,
)
from cbir_tf.store.meta import check_compatible
from cbir_tf.store.shards import merge_shards
from cbir_tf.store.writer import StoreSink, StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = {"backbone": "tiny", "weights": "none", "pooling": "mac", "whitening": None}


def _tiny_model(seed=0):
    """float32 RGB 0..255 [B, H, W, 3] -> non-negative L2-normalised [B, 16]."""
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(
        8, 3, strides=2, padding="same", activation="relu", kernel_initializer=init
    )(x)
    x = keras.layers.Conv2D(
        16, 3, padding="same", activation="relu", kernel_initializer=init, bias_initializer="ones"
    )(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _images(n, seed=0, lo=32, hi=96):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), 3), np.uint8)
        for _ in range(n)
    ]


def _direct(model, image):
    return model(image[None].astype(np.float32), training=False).numpy()[0]


def test_single_scale_equals_the_direct_model_call(model):
    images = _images(6)
    result = extract(model, images, progress=False)
    assert result.descriptors.dtype == np.float32 and result.descriptors.shape == (6, 16)
    assert result.ids == [str(k) for k in range(6)] and result.skipped == []
    for k, image in enumerate(images):
        np.testing.assert_allclose(result.descriptors[k], _direct(model, image), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, atol=1e-5)
    assert result.meta["num_images"] == 6 and result.meta["dim"] == 16


@pytest.mark.parametrize("ms_power", [1.0, 3.0])
def test_multi_scale_matches_a_numpy_combination(model, ms_power):
    scales = (1.0, 2**-0.5, 0.5)
    images = _images(4, seed=1, lo=40)
    result = extract(model, images, scales=scales, ms_power=ms_power, progress=False)
    for k, image in enumerate(images):
        h, w = image.shape[:2]
        per_scale = []
        for s in scales:
            x = image[None].astype(np.float32)
            if s != 1.0:
                size = (max(1, int(np.floor(h * s))), max(1, int(np.floor(w * s))))
                x = tf.image.resize(x, size, method="bilinear", antialias=True).numpy()
            per_scale.append(model(x, training=False).numpy()[0].astype(np.float64))
        v = np.mean(np.power(per_scale, ms_power), axis=0) ** (1.0 / ms_power)
        v = v / (np.linalg.norm(v) + 1e-6)
        np.testing.assert_allclose(result.descriptors[k], v, atol=2e-6)
        # Multi-scale really differs from single-scale (the test would notice a no-op).
        assert np.abs(result.descriptors[k] - per_scale[0]).max() > 1e-4
    assert result.meta["scales"] == list(scales) and result.meta["ms_power"] == ms_power


def test_reference_resize_without_antialias_differs(model):
    image = _images(1, seed=2, lo=80)[0]
    a = extract(model, [image], scales=(1.0, 0.5), progress=False).descriptors[0]
    b = extract(model, [image], scales=(1.0, 0.5), antialias=False, progress=False).descriptors[0]
    assert not np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 2**-0.5, 0.5)])
def test_one_trace_serves_every_image_shape(scales):
    model = _tiny_model(seed=3)  # fresh model: nothing traced before
    fn = build_extract_function(model, scales)
    assert fn.experimental_get_tracing_count() == 0
    shapes = [(33, 47), (90, 31), (64, 64), (12, 95), (57, 58), (1, 1)]
    images = [np.full((h, w, 3), 100, np.uint8) for h, w in shapes]
    result = extract(model, images, scales=scales, progress=False)
    assert result.num_traces == 1 and fn.experimental_get_tracing_count() == 1
    assert result.descriptors.shape == (len(shapes), 16)
    # The same settings reuse the compiled function (database then queries).
    again = extract(model, images[:2], scales=scales, progress=False)
    assert again.num_traces == 0 and build_extract_function(model, scales) is fn


def test_unreadable_images_are_skipped_counted_and_reported(model, tmp_path, capsys):
    images = _images(5, seed=4)
    images[1] = np.zeros((0, 10, 3), np.uint8)
    images[3] = np.zeros((10, 10), np.uint8)
    ids = [f"im{k}" for k in range(5)]
    result = extract(model, images, ids=ids, sink=StoreSink(tmp_path / "s", 2))
    assert result.ids == ["im0", "im2", "im4"]
    assert [s for s, _ in result.skipped] == ["im1", "im3"]
    assert all("shape" in reason for _, reason in result.skipped)
    for row, k in enumerate((0, 2, 4)):
        np.testing.assert_allclose(result.descriptors[row], _direct(model, images[k]), atol=1e-6)
    assert result.meta["num_skipped"] == 2
    err = capsys.readouterr().err
    assert "2 of 5 skipped" in err and "skipped im1:" in err and "img/s" in err


@pytest.mark.parametrize("num_parallel_calls", [None, 0, 3])
def test_image_files_go_through_the_pipeline(model, tmp_path, num_parallel_calls):
    from cbir_tf.data.decode import load_resized

    images = _images(4, seed=5, lo=60, hi=120)
    paths = []
    for k, image in enumerate(images):
        path = tmp_path / f"{k}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    bboxes = [None, (5, 5, 40, 30), None, None, None]
    result = extract(
        model,
        paths,
        image_size=64,
        bboxes=bboxes,
        progress=False,
        num_parallel_calls=num_parallel_calls,
    )
    assert result.ids == [p for p in paths if not p.endswith("bad.jpg")]
    assert [s for s, _ in result.skipped] == [str(tmp_path / "bad.jpg")]
    assert result.skipped[0][1]
    for row, path in enumerate(result.ids):
        k = paths.index(path)
        image = load_resized(path, 64, bboxes[k])
        assert max(image.shape[:2]) <= 64
        np.testing.assert_allclose(result.descriptors[row], _direct(model, image), atol=1e-6)


@keras.saving.register_keras_serializable(package="cbir_tf_tests")
class _SqrtShift(keras.layers.Layer):
    """sqrt(x - 0.2): NaN for dark images, to test the NaN check."""

    def call(self, x):
        return keras.ops.sqrt(x - 0.2)


def test_nan_descriptor_fails_loudly_naming_the_image_and_keeps_finished_work(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    nan_model = keras.Model(inputs, _SqrtShift()(x))
    images = [np.full((20, 20, 3), 200, np.uint8) for _ in range(5)]
    images[3][:] = 10  # dark: sqrt of a negative number
    ids = [f"photos/{k}.jpg" for k in range(5)]
    with pytest.raises(NonFiniteDescriptorError, match=r"photos/3\.jpg.*NaN or Inf"):
        extract(nan_model, images, ids=ids, sink=StoreSink(tmp_path / "s", 10), progress=False)
    # The three images finished before it were saved; the store is not complete.
    assert DescriptorStore(tmp_path / "s").status()["images_done"] == 3
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    # Without a store too; and the ms_power hint when a power mean meets negative values.
    with pytest.raises(NonFiniteDescriptorError, match="photos/3.jpg"):
        extract(nan_model, images, ids=ids, progress=False)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import keras, numpy as np
    from cbir_tf.describe.extract import extract
    from cbir_tf.store import writer as store
    from cbir_tf.store.writer import StoreSink

    model_path, images_path, store_dir = sys.argv[1:4]
    add = store.StoreWriter.add

    def slow_add(self, *args, **kwargs):  # a slow network, so the parent can kill mid-run
        time.sleep(0.15)
        return add(self, *args, **kwargs)

    store.StoreWriter.add = slow_add
    model = keras.saving.load_model(model_path)
    with np.load(images_path, allow_pickle=False) as data:
        images = [data[f"im{k:02d}"] for k in range(len(data.files))]
    extract(model, images, ids=[f"im{k:02d}" for k in range(len(images))],
            scales=(1.0, 0.5), sink=StoreSink(store_dir, 2), meta={"backbone": "tiny"},
            progress=False)
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(model, tmp_path):
    images = _images(30, seed=6, lo=32, hi=64)
    ids = [f"im{k:02d}" for k in range(30)]
    np.savez(tmp_path / "images.npz", **dict(zip(ids, images, strict=True)))
    model.save(tmp_path / "model.keras")
    store_dir = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILL_SCRIPT,
            str(tmp_path / "model.keras"),
            str(tmp_path / "images.npz"),
            str(store_dir),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    parts = store_dir / "parts"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and len([n for n in os.listdir(parts) if n.endswith(".npz")]) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(StoreIncompleteError, match="interrupted"):
        load_store(store_dir)
    kwargs = dict(ids=ids, scales=(1.0, 0.5), meta={"backbone": "tiny"}, progress=False)
    resumed = extract(model, images, sink=StoreSink(store_dir, 2), **kwargs)
    assert 8 <= resumed.num_resumed < 30
    assert resumed.num_computed == 30 - resumed.num_resumed
    clean = extract(model, images, sink=StoreSink(tmp_path / "clean", 2), **kwargs)
    assert resumed.ids == clean.ids == ids
    np.testing.assert_array_equal(np.asarray(resumed.descriptors), np.asarray(clean.descriptors))
    assert not (store_dir / "parts").exists()
    # Running the finished extraction again computes nothing.
    again = extract(model, images, sink=StoreSink(store_dir, 2), **kwargs)
    assert again.num_resumed == 30 and again.num_computed == 0


def test_second_writer_of_a_store_is_refused(model, tmp_path):
    images = _images(2, seed=7)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ["0", "1"], {"backbone": "x"}):
        with pytest.raises(LockError, match="another process"):
            extract(model, images, sink=StoreSink(tmp_path / "s"), progress=False)


def test_disk_full_is_a_clear_error_and_the_store_resumes(model, tmp_path, monkeypatch):
    images = _images(7, seed=8)
    calls = []

    @contextlib.contextmanager
    def full_on_third_chunk(path, mode="wb"):
        calls.append(os.path.basename(path))
        with atomic_open(path, mode) as f:
            if os.path.basename(path) == "00002.npz":
                raise OSError(errno.ENOSPC, "No space left on device")
            yield f

    monkeypatch.setattr(store_writer, "atomic_open", full_on_third_chunk)
    with pytest.raises(StoreWriteError, match="disk is full.*resume"):
        extract(model, images, sink=StoreSink(tmp_path / "s", 2), progress=False)
    assert "00002.npz" in calls
    monkeypatch.undo()
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    resumed = extract(model, images, sink=StoreSink(tmp_path / "s", 2), progress=False)
    assert resumed.num_resumed == 4
    clean = extract(model, images, progress=False)
    np.testing.assert_allclose(resumed.descriptors, clean.descriptors, atol=1e-6)


def test_shards_merge_back_to_the_unsharded_store(model, tmp_path):
    images = _images(10, seed=9)
    images[4] = np.zeros((3, 3, 4), np.uint8)  # one skipped image inside a shard
    ids = [f"im{k}" for k in range(10)]
    whole = extract(
        model, images, ids=ids, meta=META, sink=StoreSink(tmp_path / "whole"), progress=False
    )
    shard_dirs = []
    for k in range(3):
        r = extract(
            model,
            images,
            ids=ids,
            meta=META,
            sink=StoreSink(tmp_path / f"shard{k}"),
            shard_index=k,
            num_shards=3,
            progress=False,
        )
        assert r.meta["shard_index"] == k and r.meta["num_shards"] == 3
        shard_dirs.append(tmp_path / f"shard{k}")
    assert [load_store(d)[1] for d in shard_dirs] == [
        ["im0", "im1", "im2"],
        ["im3", "im5"],
        ["im6", "im7", "im8", "im9"],
    ]
    merge_shards(shard_dirs, tmp_path / "merged")
    desc, merged_ids, merged_meta = load_store(tmp_path / "merged")
    assert merged_ids == whole.ids
    np.testing.assert_array_equal(np.asarray(desc), np.asarray(whole.descriptors))
    assert DescriptorStore(tmp_path / "merged").skipped() == whole.skipped
    check_compatible(merged_meta, whole.meta)


def test_metadata_mismatch_is_refused(model, tmp_path):
    images = _images(3, seed=10)
    extract(model, images, meta=META, sink=StoreSink(tmp_path / "s"), progress=False)
    with pytest.raises(StoreMismatchError, match="pooling"):
        extract(
            model,
            images,
            meta=dict(META, pooling="gem"),
            sink=StoreSink(tmp_path / "s"),
            progress=False,
        )
    with pytest.raises(StoreMismatchError, match="scales"):
        extract(
            model,
            images,
            meta=META,
            scales=(1.0, 0.5),
            sink=StoreSink(tmp_path / "s"),
            progress=False,
        )
    with pytest.raises(StoreMismatchError, match="image_size"):
        extract(
            model, images, meta=META, image_size=512, sink=StoreSink(tmp_path / "s"), progress=False
        )
    with pytest.raises(ValueError, match="disagrees"):
        extract(model, images, meta=dict(META, image_size=512), image_size=1024, progress=False)


def test_bad_arguments_are_refused(model):
    images = _images(2)
    with pytest.raises(ValueError, match="ids"):
        extract(model, images, ids=["a"], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        extract(model, images, ids=["a", "a"], progress=False)
    with pytest.raises(ValueError, match="scales"):
        extract(model, images, scales=(1.0, 0.0), progress=False)
    with pytest.raises(ValueError, match="shard_index"):
        extract(model, images, shard_index=2, num_shards=2, progress=False)
    with pytest.raises(TypeError, match="mixture"):
        extract(model, [images[0], "x.jpg"], progress=False)
