"""Stores, index folders and models written by an earlier version still load, with equal numbers.

The fixture in tests/fixtures/legacy was written by the code before the redesign (see its README):
the on-disk formats are a promise to users, whatever the modules that read them become.
"""

import pathlib
import shutil

import numpy as np

LEGACY = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "legacy"


def test_old_store_loads_with_its_descriptors():
    from cbir_tf.store import files as store

    x, ids, meta = store.load_store(str(LEGACY / "store"))
    assert list(ids) == ["a", "b", "c"] and meta["backbone"] == "legacy"
    np.testing.assert_array_equal(np.asarray(x), np.load(LEGACY / "store_descriptors.npy"))


def test_old_model_loads_safely_and_describes_as_before():
    from cbir_tf.describe import models

    model = models.load_descriptor_model(str(LEGACY / "model.keras"), safe_mode=True)
    out = model(np.load(LEGACY / "probe.npy")).numpy()
    np.testing.assert_allclose(out, np.load(LEGACY / "probe_descriptor.npy"), rtol=1e-6, atol=1e-7)


def test_old_index_opens_searches_and_grows(tmp_path):
    from cbir_tf.retriever import Retriever

    # A copy: opening may complete a journal and adding images writes to the folder.
    index, images = tmp_path / "index", tmp_path / "images"
    shutil.copytree(LEGACY / "index", index)
    shutil.copytree(LEGACY / "images", images)
    r = Retriever.load(str(index), root=str(images))
    assert sorted(r.ids) == ["img0.png", "img1.png", "img2.png"]
    np.testing.assert_array_equal(
        np.asarray(r.descriptors)[np.argsort(r.ids)], np.load(LEGACY / "store_descriptors.npy")
    )
    hits = r.search(str(images / "img1.png"), k=3)
    assert hits[0].id == "img1.png" and abs(hits[0].score - 1.0) < 1e-5
    shutil.copy(images / "img0.png", images / "img3.png")
    assert r.index(str(images), progress=False)["added"] == 1
    again = Retriever.load(str(index), root=str(images))
    assert len(again) == 4 and again.search(str(images / "img3.png"), k=1)[0].score > 0.99999
