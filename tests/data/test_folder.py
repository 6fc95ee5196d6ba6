"""Image folders: listing, list files, labelled folders, splits and verification."""

import os
import warnings

import numpy as np
import pytest
from photos import labelled_collection, plain_image

from cbir_tf.data import folder

# --------------------------------------------------------------------------- folder listing


def test_list_images_sorted_relative_recursive(tmp_path):
    plain_image(str(tmp_path / "b.JPG"))
    plain_image(str(tmp_path / "a.png"), fmt="PNG")
    plain_image(str(tmp_path / "sub" / "deep" / "c.jpeg"))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    plain_image(str(tmp_path / ".hidden" / "x.jpg"))
    plain_image(str(tmp_path / ".dot.jpg"))
    assert folder.list_images(tmp_path) == ["a.png", "b.JPG", "sub/deep/c.jpeg"]
    assert folder.list_images(tmp_path, recursive=False) == ["a.png", "b.JPG"]
    assert folder.list_images(tmp_path, extensions=["png"]) == ["a.png"]
    with pytest.raises(FileNotFoundError):
        folder.list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        folder.list_images(tmp_path / "notes.txt")


def test_list_labelled(tmp_path):
    labelled_collection(str(tmp_path), {"cat": 2, "ant": 3})
    plain_image(str(tmp_path / "cat" / "nested" / "z.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="empty"):
        paths, labels, names = folder.list_labelled(tmp_path)
    assert names == ["ant", "cat"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert paths[0] == os.path.join(str(tmp_path), "ant", "00.jpg")
    assert paths[-1] == os.path.join(str(tmp_path), "cat", "nested/z.jpg")
    assert all(os.path.isfile(p) for p in paths)


def test_list_labelled_needs_two_classes(tmp_path):
    labelled_collection(str(tmp_path), {"only": 3})
    plain_image(str(tmp_path / "loose.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            folder.CollectionError, match=r"1 class folder.*found: only.*at least 2 classes"
        ):
            folder.list_labelled(tmp_path)


def test_list_labelled_single_image_class_for_metric(tmp_path):
    labelled_collection(str(tmp_path), {"a": 3, "b": 1, "c": 1})
    folder.list_labelled(tmp_path)  # fine for the head recipe
    with pytest.raises(folder.CollectionError, match=r"too few in: b \(1\), c \(1\)"):
        folder.list_labelled(tmp_path, min_images_per_class=2)


def test_split_indices_stratified_and_deterministic():
    labels = np.repeat([0, 1, 2], [10, 4, 1])
    tr, va = folder.split_indices(labels, 0.25, seed=3)
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).size == labels.size
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]  # round(n/4), keep 1
    tr2, va2 = folder.split_indices(labels, 0.25, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    with pytest.raises(ValueError):
        folder.split_indices(labels, 1.0)


def test_verify_images_counts_unreadable(tmp_path):
    good = str(tmp_path / "good.jpg")
    plain_image(good, size=(200, 100))
    truncated = str(tmp_path / "trunc.jpg")
    data = open(good, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    text = str(tmp_path / "text.jpg")
    open(text, "w").write("not an image")
    ok, skipped = folder.verify_images([good, truncated, text])
    assert ok.tolist() == [True, False, False]
    assert [p for p, _ in skipped] == [truncated, text]
    assert all(reason for _, reason in skipped)
