"""Training images and the training tf.data pipelines (incl. TFDS, mocked), and augmentations."""

import os

import numpy as np
import pytest
import tensorflow as tf
from photos import labelled_collection, plain_image

from cbir_tf.data import folder
from cbir_tf.train import augment
from cbir_tf.train import images as training

# --------------------------------------------------------------------------- training images


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_images_from_paths_skips_unreadable(tmp_path, cache):
    labelled_collection(str(tmp_path), {"a": 3, "b": 2}, size=(64, 48))
    open(tmp_path / "a" / "bad.jpg", "wb").write(b"\xff\xd8garbage")
    paths, labels, names = folder.list_labelled(tmp_path)
    images = training.images_from_paths(paths, labels, names, load_size=32, cache=cache)
    assert len(images) == 5 and len(images.skipped) == 1
    assert images.skipped[0][0].endswith("bad.jpg")
    assert images.in_memory == (cache == "memory")
    assert images.labels.tolist() == [0, 0, 0, 1, 1]
    first = images.image(0)
    assert first.dtype == np.uint8 and first.shape == (24, 32, 3)  # longest side 32


def test_auto_cache_streams_when_memory_is_short(tmp_path, monkeypatch):
    labelled_collection(str(tmp_path), {"a": 2, "b": 2}, size=(64, 48))
    paths, labels, names = folder.list_labelled(tmp_path)
    need = training.estimated_cache_bytes(4, 32)
    monkeypatch.setattr(training, "_available_memory", lambda: 2 * need)
    assert training.images_from_paths(paths, labels, names, 32, cache="auto").in_memory
    monkeypatch.setattr(training, "_available_memory", lambda: 2 * need - 2)
    assert not training.images_from_paths(paths, labels, names, 32, cache="auto").in_memory
    with pytest.raises(ValueError, match="valid: auto, memory, none"):
        training.images_from_paths(paths, labels, names, 32, cache="disk")


def test_images_from_paths_class_all_unreadable(tmp_path):
    labelled_collection(str(tmp_path), {"a": 2})
    os.makedirs(tmp_path / "b")
    open(tmp_path / "b" / "x.jpg", "wb").write(b"nope")
    paths, labels, names = folder.list_labelled(tmp_path)
    with pytest.raises(folder.CollectionError, match="class.*b.*unreadable"):
        training.images_from_paths(paths, labels, names, load_size=32, cache="memory")


# --------------------------------------------------------------------------- augmentations


def test_augment_bounds_eager_and_in_dataset_map():
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (90, 120, 3)), tf.uint8)
    aug = augment.Augment(crop_scale=(0.3, 0.6), color_jitter=0.5)
    seed = tf.constant([1, 2], tf.int64)
    eager = augment.augment_image(image, 48, seed, aug)
    assert eager.shape == (48, 48, 3) and eager.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(eager)) and float(tf.reduce_max(eager)) <= 255.0
    ds = tf.data.Dataset.from_tensors((image, seed)).map(
        lambda im, s: augment.augment_image(im, 48, s, aug)
    )
    np.testing.assert_allclose(next(iter(ds)).numpy(), eager.numpy(), atol=1e-3)
    other = augment.augment_image(image, 48, tf.constant([5, 6], tf.int64), aug)
    assert not np.allclose(other.numpy(), eager.numpy())


def test_random_resized_crop_area_within_bounds():
    # A ramp image: the crop's value range tells which columns were kept.
    ramp = tf.tile(tf.range(200, dtype=tf.float32)[None, :, None], [100, 1, 3])
    for s in range(20):
        out = augment.random_resized_crop(ramp, 32, tf.constant([s, 7]), (0.2, 0.3), (0.5, 2.0))
        width = float(tf.reduce_max(out) - tf.reduce_min(out)) + 1
        assert 200 * 0.2 * 0.5 / 2 <= width <= 200 * 0.6, width  # area and ratio bound width


def test_center_crop_and_eval_shape():
    image = tf.zeros([30, 60, 3], tf.uint8)
    assert augment.center_crop(image, 20).shape == (20, 20, 3)
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: augment.center_crop(x, 20))
    assert next(iter(ds)).shape == (20, 20, 3)
    assert training.eval_shape(30, 60, 40) == (20, 40)
    assert training.eval_shape(601, 1, 40) == (40, 1)  # never a zero side


def _memory_images(shapes, labels):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (*s, 3)).astype(np.uint8) for s in shapes]
    return training.TrainingImages(
        [f"im{i}" for i in range(len(imgs))], np.asarray(labels), ["a", "b", "c"], 64, images=imgs
    )


def test_classification_dataset_reproducible_per_seed():
    images = _memory_images([(40, 50)] * 5, [0, 1, 2, 0, 1])
    aug = augment.Augment()
    ds = training.classification_dataset(images, 24, 2, aug, seed=4)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][0].shape[1:] == (24, 24, 3) and batches[0][1].dtype == tf.int64
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2]
    again = list(training.classification_dataset(images, 24, 2, aug, seed=4))
    np.testing.assert_array_equal(batches[0][0].numpy(), again[0][0].numpy())


def test_tuple_dataset_layout():
    images = _memory_images([(40, 50)] * 6, [0, 0, 1, 1, 2, 2])
    arr = np.array([[0, 1, 2, 4], [2, 3, 0, 5], [4, 5, 1, 3]])
    ds = training.tuple_dataset(images, arr, 16, 2, None, seed=0)
    x, y = next(iter(ds))
    assert x.shape == (2, 4, 16, 16, 3) and y.shape == (2,)
    # Without augmentation each slot is the centre crop of its image: find the tuple order.
    order = np.random.default_rng(0).permutation(3)
    expect = augment.center_crop(images.image(int(arr[order[0], 2])), 16)
    np.testing.assert_allclose(x[0, 2].numpy(), expect.numpy(), atol=1e-4)


def _check_eval_batches(images, chunk):
    seen = {}
    for pos, batch in training.eval_batches(images, np.array([3, 1, 0, 2]), 25, 2, chunk):
        assert batch.shape[0] <= 2 and batch.dtype == tf.float32
        for p, x in zip(pos.tolist(), batch, strict=True):
            seen[p] = tuple(x.shape)
    assert seen == {0: (20, 25, 3), 1: (25, 20, 3), 2: (20, 25, 3), 3: (20, 25, 3)}


def test_eval_batches_group_by_shape():
    images = _memory_images([(40, 50), (50, 40), (40, 50), (40, 50)], [0, 1, 2, 0])
    _check_eval_batches(images, 512)


def test_eval_batches_streaming_in_chunks(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(50, 40), (40, 50), (50, 40), (50, 40)]):
        paths.append(str(tmp_path / f"{i}.png"))
        plain_image(paths[-1], size=(w, h), fmt="PNG")
    images = training.TrainingImages(paths, [0, 1, 2, 0], ["a", "b", "c"], 64, paths=paths)
    _check_eval_batches(images, 2)
    _check_eval_batches(images, 3)


# --------------------------------------------------------------------------- TFDS


def test_tfds_source_parsing():
    assert training.parse_tfds_spec("tfds:oxford_flowers102") == ("oxford_flowers102", None)
    assert training.parse_tfds_spec("tfds:beans:train[:80%]") == ("beans", "train[:80%]")
    assert training.parse_tfds_spec("/data/train") is None
    with pytest.raises(ValueError):
        training.parse_tfds_spec("tfds:")


def test_load_tfds_mocked(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        images = training.load_tfds("beans", "train", load_size=48, data_dir=str(tmp_path))
    assert len(images) == 6 and images.in_memory
    assert images.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert max(images.image(0).shape[:2]) <= 48 and images.image(0).dtype == np.uint8
    assert set(images.labels.tolist()) <= {0, 1, 2}
    assert images.ids[0] == "beans/train/0"
