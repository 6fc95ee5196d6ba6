"""Benchmark registry and BenchmarkDataset: names, URLs, hashes, images, original protocol."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import RPARIS_SHA

from cbir_tf.data import revisited
from cbir_tf.data.revisited import (
    BenchmarkDataset,
    GroundTruthError,
    ImageListMismatchError,
    UnsafePickleError,
    resolve_dataset_name,
)

# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, canonical",
    [
        ("paris6k", "rparis6k"),
        ("oxford5k", "roxford5k"),
        ("Paris6k", "rparis6k"),
        (" OXFORD5K ", "roxford5k"),
        ("rparis6k", "rparis6k"),
        ("roxford5k", "roxford5k"),
        ("demo", "demo"),
    ],
)
def test_resolve_dataset_name(typed, canonical):
    assert resolve_dataset_name(typed) == canonical


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(KeyError) as exc:
        resolve_dataset_name("holidays")
    msg = str(exc.value)
    for name in ("demo", "oxford5k", "paris6k", "roxford5k", "rparis6k", "holidays"):
        assert name in msg


def test_registry_urls_and_pinned_hash():
    spec = revisited.DATASETS["rparis6k"]
    assert spec.gnd.sha256 == RPARIS_SHA
    assert (
        spec.gnd.url == "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl"
    )
    assert [a.filename for a in spec.archives] == ["paris_1-v1.tgz", "paris_2-v1.tgz"]
    assert all(a.url.endswith("/parisbuildings/" + a.filename) for a in spec.archives)
    ox = revisited.DATASETS["roxford5k"]
    assert [a.url for a in ox.archives] == [
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
    ]
    assert ox.original_gnd.url.endswith("/cnnimageretrieval/data/test/oxford5k/gnd_oxford5k.pkl")
    assert (ox.num_images, ox.num_queries, spec.num_images, spec.num_queries) == (
        4993,
        70,
        6322,
        70,
    )


# ----------------------------------------------------------------------------------------------
# BenchmarkDataset
# ----------------------------------------------------------------------------------------------


def test_benchmark_dataset_on_the_real_ground_truth(rparis_folder):
    folder, cfg = rparis_folder
    ds = BenchmarkDataset("rparis6k", folder)
    assert (ds.num_images, ds.num_queries) == (6322, 70)
    assert ds.db_ids() == cfg["imlist"] and ds.query_ids() == cfg["qimlist"]
    assert ds.image_paths()[0] == str(folder / "jpg" / (cfg["imlist"][0] + ".jpg"))
    assert ds.query_paths()[5] == str(folder / "jpg" / (cfg["qimlist"][5] + ".jpg"))
    boxes = ds.query_bboxes()
    assert boxes.shape == (70, 4) and boxes.dtype == np.float64
    np.testing.assert_array_equal(boxes, np.array([g["bbx"] for g in cfg["gnd"]], dtype=float))
    assert ds.gnd == cfg["gnd"]
    assert ds.original_gnd is None and not ds.has_original
    assert "6322 images" in repr(ds)


def test_missing_images_are_named(rparis_folder, rparis_jpg):
    folder, cfg = rparis_folder
    gone = [cfg["imlist"][100], cfg["imlist"][7], cfg["qimlist"][3]]
    for n in gone:
        os.rename(rparis_jpg / f"{n}.jpg", rparis_jpg / f"{n}.hidden")
    try:
        with pytest.raises(ImageListMismatchError) as exc:
            BenchmarkDataset("rparis6k", folder)
        msg = str(exc.value)
        # First missing in list order: imlist[7], imlist[100], then the query.
        assert f"{gone[1]}.jpg, {gone[0]}.jpg, {gone[2]}.jpg" in msg
        assert msg.startswith("3 of the 6392 images")
        assert "paris_1-v1.tgz" in msg and str(folder / "jpg") in msg
        ds = BenchmarkDataset("rparis6k", folder, check_images=False)
        assert ds.missing_images() == [gone[1], gone[0], gone[2]]
    finally:
        for n in gone:
            os.rename(rparis_jpg / f"{n}.hidden", rparis_jpg / f"{n}.jpg")


def test_wrong_ground_truth_for_the_dataset_is_refused(tmp_path, real_gnd_path):
    folder = tmp_path / "roxford5k"
    folder.mkdir()
    shutil.copy(real_gnd_path, folder / "gnd_roxford5k.pkl")
    with pytest.raises(
        GroundTruthError, match="6322 database images, but Revisited Oxford5k has 4993"
    ):
        BenchmarkDataset("roxford5k", folder, check_images=False)


def test_original_protocol_ground_truth_is_aligned_by_name(rparis_folder):
    """An original-style file (queries inside the database, good/ok/junk, numpy arrays)."""
    folder, cfg = rparis_folder
    imlist, qimlist = cfg["imlist"], cfg["qimlist"]
    # The original database holds the queries too, in another order than the revisited one.
    o_imlist = list(reversed(imlist)) + qimlist
    o_pos = {n: i for i, n in enumerate(o_imlist)}
    covered = list(range(0, 70, 2))[:30]  # the original covers a subset of the queries
    o_qimlist = [qimlist[i] for i in covered] + ["paris_notinrevisited_000001"]
    o_gnd = []
    for i in covered:
        g = cfg["gnd"][i]
        o_gnd.append(
            {
                "bbx": [float(v) for v in g["bbx"]],
                "good": np.array([o_pos[imlist[j]] for j in g["easy"]], dtype=np.int64),
                "ok": [o_pos[imlist[j]] for j in g["hard"]] + [o_pos[qimlist[i]]],
                "junk": np.array([o_pos[imlist[j]] for j in g["junk"]], dtype=np.int32),
            }
        )
    o_gnd.append({"bbx": [0, 0, 5, 5], "ok": [0], "junk": []})
    (folder / "gnd_paris6k.pkl").write_bytes(
        pickle.dumps({"imlist": o_imlist, "qimlist": o_qimlist, "gnd": o_gnd}, protocol=2)
    )

    ds = BenchmarkDataset("rparis6k", folder)
    assert ds.has_original
    np.testing.assert_array_equal(ds.original_queries, covered)
    assert ds.original_queries.dtype == np.int64
    assert len(ds.original_gnd) == len(covered)
    for entry, i in zip(ds.original_gnd, covered, strict=True):
        g = cfg["gnd"][i]
        np.testing.assert_array_equal(entry["ok"], sorted(g["easy"] + g["hard"]))
        np.testing.assert_array_equal(entry["junk"], sorted(g["junk"]))
        assert entry["ok"].dtype == np.int64
        assert entry["bbx"] == [float(v) for v in g["bbx"]]
    info = ds.original_info
    assert info["unmatched_queries"] == ["paris_notinrevisited_000001"]
    assert info["dropped_ids"] == len(covered)  # each query's own image is not in the database
    assert info["num_queries_in_file"] == len(covered) + 1


def test_hostile_original_ground_truth_is_refused(rparis_folder):
    folder, _ = rparis_folder
    (folder / "gnd_paris6k.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(UnsafePickleError, match="gnd_paris6k.pkl"):
        BenchmarkDataset("rparis6k", folder)
