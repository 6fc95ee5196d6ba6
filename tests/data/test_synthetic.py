"""The synthetic benchmark: revisitop format, determinism, speed, and labels that fit the images."""

from __future__ import annotations

import os
import pickle
import pickletools
import time

import numpy as np
import pytest
from PIL import Image

from cbir_tf.data.download import read_complete_marker
from cbir_tf.data.revisited import BenchmarkDataset, load_ground_truth
from cbir_tf.data.synthetic import make_synthetic_benchmark


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    start = time.process_time()
    folder = make_synthetic_benchmark(root)
    return folder, time.process_time() - start


def _files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if n != "COMPLETE":  # holds a time stamp
                path = os.path.join(dirpath, n)
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_default_benchmark_is_fast(demo):
    _, cpu_seconds = demo
    assert cpu_seconds < 2.0


def test_revisitop_layout_and_pickle_format(demo):
    folder, _ = demo
    assert sorted(os.listdir(folder)) == [
        "COMPLETE",
        "gnd_demo.pkl",
        "gnd_demo_original.pkl",
        "jpg",
    ]
    data = open(os.path.join(folder, "gnd_demo.pkl"), "rb").read()
    assert data[:2] == b"\x80\x03", "protocol 3, as the published files"
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    assert not opcodes & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "INST", "OBJ"}
    cfg = pickle.loads(data)
    assert set(cfg) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    assert len(imlist) == 6 * 6 + 12 and len(qimlist) == 6 and len(gnd) == 6
    assert len(set(imlist)) == len(imlist) and not set(imlist) & set(qimlist)
    assert cfg == load_ground_truth(os.path.join(folder, "gnd_demo.pkl"), kind="revisited")
    jpgs = sorted(os.listdir(os.path.join(folder, "jpg")))
    assert jpgs == sorted(n + ".jpg" for n in imlist + qimlist)
    for g in gnd:
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        assert (len(g["easy"]), len(g["hard"]), len(g["junk"])) == (3, 2, 1)
        for key in ("easy", "hard", "junk"):
            assert all(type(i) is int and 0 <= i < len(imlist) for i in g[key])
            assert g[key] == sorted(g[key])
        assert all(type(v) is float for v in g["bbx"])
        assert not (set(g["easy"]) & set(g["hard"]) or set(g["hard"]) & set(g["junk"]))
    # Each database image belongs to at most one landmark; distractors to none.
    labelled = [i for g in gnd for k in ("easy", "hard", "junk") for i in g[k]]
    assert len(labelled) == len(set(labelled)) == 36
    assert all(imlist[i].startswith("distractor_") for i in set(range(48)) - set(labelled))


def test_images_are_real_jpegs_and_boxes_frame_the_landmark(demo):
    folder, _ = demo
    ds = BenchmarkDataset("demo", folder)
    for path in ds.image_paths()[:5] + ds.query_paths():
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (160, 120) and im.mode == "RGB"
    boxes = ds.query_bboxes()
    assert boxes.shape == (6, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 160) and np.all(boxes[:, 3] <= 120)
    area = w * h / (160 * 120)
    assert np.all(area > 0.25) and np.all(area < 0.9), area  # a real crop, not the whole image


def test_marker_and_original_protocol(demo):
    folder, _ = demo
    marker = read_complete_marker(folder)
    assert marker["dataset"] == "demo" and marker["num_images"] == 48
    assert set(marker["files"]) == {"gnd_demo.pkl", "gnd_demo_original.pkl"}
    ds = BenchmarkDataset("demo", folder)
    # As the real originals: fewer queries than the revisited ground truth, queries inside
    # the original database (dropped when mapped to the revisited one).
    np.testing.assert_array_equal(ds.original_queries, [0, 1, 2, 3, 4])
    for q, entry in zip(ds.original_queries, ds.original_gnd, strict=True):
        g = ds.gnd[q]
        np.testing.assert_array_equal(entry["ok"], sorted(g["easy"] + g["hard"]))
        np.testing.assert_array_equal(entry["junk"], g["junk"])
    assert ds.original_info["dropped_ids"] == 5


def test_deterministic_for_a_seed(demo, tmp_path):
    folder, _ = demo
    again = make_synthetic_benchmark(tmp_path / "a")
    assert _files(again) == _files(folder)
    other = make_synthetic_benchmark(tmp_path / "b", seed=1)
    a, b = _files(folder), _files(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) == len(a), "another seed gives other images"


def test_more_distractors_leave_the_other_images_unchanged(demo, tmp_path):
    folder, _ = demo
    more = make_synthetic_benchmark(tmp_path, distractors=14)
    a, b = _files(folder), _files(more)
    assert {k for k in a if k.startswith("jpg")} <= set(b)
    assert all(a[k] == b[k] for k in a if k.startswith("jpg"))


def test_arguments_are_honoured(tmp_path):
    # An earlier run's original-protocol file must not survive a run without one.
    make_synthetic_benchmark(tmp_path, name="tiny", num_landmarks=2, images_per_landmark=3)
    assert os.path.exists(tmp_path / "datasets" / "tiny" / "gnd_tiny_original.pkl")
    folder = make_synthetic_benchmark(
        tmp_path,
        name="tiny",
        num_landmarks=2,
        images_per_landmark=3,
        distractors=0,
        queries_per_landmark=2,
        image_size=(64, 48),
        seed=5,
        original_protocol=False,
    )
    assert folder == str(tmp_path / "datasets" / "tiny")
    ds = BenchmarkDataset("tiny", folder)
    assert (ds.num_images, ds.num_queries) == (6, 4) and not ds.has_original
    assert [len(g["easy"]) + len(g["hard"]) + len(g["junk"]) for g in ds.gnd] == [3, 3, 3, 3]
    assert ds.gnd[0]["easy"] == ds.gnd[1]["easy"]  # two queries of the same landmark
    with Image.open(ds.image_paths()[0]) as im:
        assert im.size == (64, 48)
    for bad in (
        dict(num_landmarks=0),
        dict(images_per_landmark=0),
        dict(distractors=-1),
        dict(image_size=(8, 8)),
        dict(name="../x"),
    ):
        with pytest.raises(ValueError):
            make_synthetic_benchmark(tmp_path / "bad", **bad)


def _histogram(im):
    a = np.asarray(im.convert("RGB")) // 64
    h = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64)
    h = np.sqrt(h.astype(np.float64))
    return h / np.linalg.norm(h)


def _map(ranks, gnd, protocol):
    aps = []
    for order, g in zip(ranks, gnd, strict=True):
        pos = {"easy": g["easy"], "medium": g["easy"] + g["hard"], "hard": g["hard"]}[protocol]
        ignore = {"easy": g["hard"] + g["junk"], "medium": g["junk"], "hard": g["easy"] + g["junk"]}
        kept = [i for i in order if i not in set(ignore[protocol])]
        hits = np.flatnonzero(np.isin(kept, pos))
        aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
    return float(np.mean(aps))


def test_labels_fit_the_image_content(demo):
    """Even a colour histogram finds the landmarks, easy views more easily than hard ones:
    the ground truth describes what the images show (shuffled labels would score ~0.17)."""
    folder, _ = demo
    ds = BenchmarkDataset("demo", folder)
    x = np.stack([_histogram(Image.open(p)) for p in ds.image_paths()])
    q = np.stack(
        [
            _histogram(Image.open(p).crop(tuple(b)))
            for p, b in zip(ds.query_paths(), ds.query_bboxes(), strict=True)
        ]
    )
    ranks = np.argsort(-(q @ x.T), axis=1)
    easy, medium, hard = (_map(ranks, ds.gnd, p) for p in ("easy", "medium", "hard"))
    assert easy > 0.7 and medium > 0.5, (easy, medium, hard)
    assert easy > hard
    rng = np.random.default_rng(0)
    shuffled = _map(np.stack([rng.permutation(len(x)) for _ in ds.gnd]), ds.gnd, "medium")
    assert shuffled < 0.4
