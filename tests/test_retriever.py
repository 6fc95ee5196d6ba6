"""End to end on generated photo folders: index, search, add/remove, save/load, resume."""

import copy
import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import shared_path
from photos import synthetic_photo
from PIL import Image, ImageEnhance

from cbir_tf import retriever as retriever_lib
from cbir_tf.retriever import Retriever, summary
from cbir_tf.runs import extract as runs
from cbir_tf.store import files as store
from cbir_tf.store.writer import StoreWriter

NUM_PHOTOS = 10


def _near_duplicate(path, out):
    """The same photo, a bit brighter and re-encoded at another JPEG quality."""
    img = ImageEnhance.Brightness(Image.open(path).convert("RGB")).enhance(1.1)
    img.save(out, quality=80)
    return str(out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(NUM_PHOTOS):
        synthetic_photo(root / ("sub" if i % 3 == 0 else "") / f"img{i}.jpg", i)
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def model():
    """A small deterministic descriptor model (conv -> GeM -> L2), built from cbir_tf layers."""
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    out = L2Normalization()(GeM()(x))
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def built(photos, model):
    """An in-memory retriever over the photo folder."""
    r = Retriever(model, image_size=96)
    counts = r.index(photos, progress=False)
    assert counts == {
        "added": NUM_PHOTOS,
        "updated": 0,
        "unchanged": 0,
        "failed": 0,
        "removed": 0,
        "resumed": 0,
        "total": NUM_PHOTOS,
    }
    return r


def _copy_photos(photos, tmp_path):
    dest = tmp_path / "photos"
    shutil.copytree(photos, dest)
    return str(dest)


def test_ids_are_relative_paths_and_descriptors_are_unit_rows(built, photos):
    assert sorted(built.ids) == sorted(
        [("sub/" if i % 3 == 0 else "") + f"img{i}.jpg" for i in range(NUM_PHOTOS)]
    )
    assert built.root == os.path.abspath(photos)
    assert built.path_of("sub/img0.jpg") == os.path.join(photos, "sub", "img0.jpg")
    d = np.asarray(built.descriptors)
    assert d.dtype == np.float32 and d.shape == (NUM_PHOTOS, 32)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)


def test_near_duplicate_comes_first(built, photos, tmp_path):
    for i in range(NUM_PHOTOS):
        image_id = ("sub/" if i % 3 == 0 else "") + f"img{i}.jpg"
        query = _near_duplicate(built.path_of(image_id), tmp_path / f"q{i}.jpg")
        hits = built.search(query, k=3)
        assert [h.rank for h in hits] == [1, 2, 3]
        assert hits[0].id == image_id, (image_id, hits)
        assert hits[0].path == built.path_of(image_id)
        assert hits[0].score > hits[1].score >= hits[2].score
    # The indexed file itself scores ~1 (the same pipeline described it).
    assert built.search(built.path_of("img4.jpg"), k=1)[0].score == pytest.approx(1.0, abs=1e-4)


def test_in_memory_queries_match_file_queries(built, tmp_path):
    path = built.path_of("img5.jpg")
    from_file = built.describe([path])[0]
    pil = Image.open(path)
    pil.load()
    as_array = np.asarray(pil)
    np.testing.assert_allclose(built.describe([as_array])[0], from_file, atol=1e-5)
    np.testing.assert_allclose(built.describe([pil])[0], from_file, atol=1e-5)
    # A PIL image stored rotated with an EXIF tag that turns it back: described upright.
    rotated = pil.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    rotated.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert built.search(Image.open(tmp_path / "rot.jpg"), k=1)[0].id == "img5.jpg"
    assert built.search(str(tmp_path / "rot.jpg"), k=1)[0].id == "img5.jpg"
    # Floats 0..255, grayscale-free RGBA: accepted.
    rgba = np.dstack([as_array, np.full(as_array.shape[:2], 255, np.uint8)])
    assert built.search(rgba.astype(np.float32), k=1)[0].id == "img5.jpg"


def test_batch_search_equals_single_searches_and_rerankers(built, tmp_path):
    queries = [_near_duplicate(built.path_of(i), tmp_path / f"q{j}.jpg") for j, i in
               enumerate(built.ids[:4])]  # fmt: skip
    batch = built.search_batch(queries, k=4)
    for q, hits in zip(queries, batch, strict=True):
        single = built.search(q, k=4)
        # One matrix product for the batch vs one per query: the last float bits may differ.
        assert [(h.rank, h.id, h.path) for h in hits] == [(h.rank, h.id, h.path) for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    hits = built.search_batch(queries, k=4, rerank="aqe")
    assert [h[0].id for h in hits] == built.ids[:4]
    # Diffusion: the top of the reference scores of cbir_tf.rerank.diffusion, settings passed
    # through (a graph sparser than the 10 images: 4 neighbours).
    from cbir_tf.rerank import diffusion
    from cbir_tf.rerank.query_expansion import alpha_query_expansion

    saved = copy.deepcopy(built.rerank_settings)
    built.rerank_settings["diffusion"].update({"k": 4, "kq": 3, "gamma": 2.0})
    built.rerank_settings["qe"]["n"] = 2
    try:
        q = built.describe(queries)
        db = np.asarray(built.descriptors)
        for rerank in ("diffusion", "aqe+diffusion"):
            qq = alpha_query_expansion(q, db, n=2, alpha=3.0) if "aqe" in rerank else q
            expected = diffusion.diffusion_scores(qq, db, k=4, kq=3, gamma=2.0)
            for row, hits in zip(expected, built.search_batch(queries, 4, rerank), strict=True):
                top = np.argsort(-row, kind="stable")[:4]
                assert [h.id for h in hits] == [built.ids[i] for i in top], rerank
                np.testing.assert_allclose([h.score for h in hits], row[top], rtol=1e-5)
    finally:
        built.rerank_settings = saved
    # k larger than the index: every image once.
    hits = built.search(queries[0], k=100)
    assert sorted(h.id for h in hits) == sorted(built.ids)
    table = retriever_lib.format_results(hits[:2])
    assert table.splitlines()[0].split() == ["rank", "score", "image", "id"]
    assert hits[0].id in table.splitlines()[1]


def test_search_errors(model, built, tmp_path):
    empty = Retriever(model, image_size=96)
    with pytest.raises(ValueError, match="empty"):
        empty.search(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown rerank"):
        built.search(built.path_of("img1.jpg"), rerank="qe")
    with pytest.raises(FileNotFoundError):
        built.search(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="must be an image"):
        built.search(np.zeros((4, 4, 2), np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="cannot be read"):
        built.search(str(bad))
    with pytest.raises(KeyError, match="not in the index"):
        Retriever(model, image_size=96).remove(["nope.jpg"])


def test_save_load_round_trip_is_identical(built, tmp_path):
    d = built.save(tmp_path / "index")
    assert os.path.isfile(os.path.join(d, "manifest.json"))
    assert os.path.isfile(os.path.join(d, "model.keras"))  # an inline model is saved with it
    # The folder is an ordinary descriptor store too.
    desc, ids, meta = store.load_store(d)
    assert ids == built.ids and meta["image_size"] == 96
    np.testing.assert_array_equal(desc, built.descriptors)

    loaded = Retriever.load(d)
    assert loaded.ids == built.ids and loaded.root == built.root
    np.testing.assert_array_equal(loaded.descriptors, built.descriptors)
    query = _near_duplicate(built.path_of("img7.jpg"), tmp_path / "q.jpg")
    for rerank in ("none", "aqe", "diffusion"):
        assert loaded.search(query, k=5, rerank=rerank) == built.search(query, k=5, rerank=rerank)


def test_incremental_add_update_remove_on_disk(model, photos, tmp_path):
    root = _copy_photos(photos, tmp_path)
    index_dir = tmp_path / "index"
    r = Retriever(model, image_size=96, directory=index_dir)
    assert r.index(root, progress=False)["added"] == NUM_PHOTOS
    again = r.index(root, progress=False)
    assert again["unchanged"] == NUM_PHOTOS and again["added"] == again["updated"] == 0

    # Two new photos, one photo replaced by another picture.
    synthetic_photo(os.path.join(root, "new", "a.jpg"), 100)
    synthetic_photo(os.path.join(root, "b.jpg"), 101)
    synthetic_photo(os.path.join(root, "img2.jpg"), 102)
    old_row = np.array(r.descriptors[r.ids.index("img2.jpg")])
    counts = r.index(root, progress=False)
    assert counts["added"] == 2 and counts["updated"] == 1
    assert counts["unchanged"] == NUM_PHOTOS - 1 and counts["total"] == NUM_PHOTOS + 2
    new_row = np.array(r.descriptors[r.ids.index("img2.jpg")])
    assert not np.allclose(old_row, new_row)
    q = _near_duplicate(os.path.join(root, "new", "a.jpg"), tmp_path / "qa.jpg")
    assert r.search(q, k=1)[0].id == "new/a.jpg"

    # Remove by id and by path; the change is on disk at once.
    removed = r.remove(["new/a.jpg", os.path.join(root, "sub", "img3.jpg")])
    assert removed == ["new/a.jpg", "sub/img3.jpg"]
    assert "new/a.jpg" not in r.ids and len(r) == NUM_PHOTOS
    assert all(h.id != "new/a.jpg" for h in r.search(q, k=len(r)))
    reopened = Retriever.load(index_dir)
    assert reopened.ids == r.ids
    np.testing.assert_array_equal(reopened.descriptors, r.descriptors)
    # Files that are already indexed stay skipped after reopening; a removed one comes back.
    counts = reopened.index(root, progress=False)
    assert counts["added"] == 2 and counts["unchanged"] == NUM_PHOTOS

    # prune=True drops images whose files were deleted.
    os.unlink(os.path.join(root, "b.jpg"))
    counts = reopened.index(root, prune=True, progress=False)
    assert counts["removed"] == 1 and "b.jpg" not in reopened.ids
    assert not os.path.exists(os.path.join(index_dir, "pending"))
    assert not os.path.exists(os.path.join(index_dir, "COMMIT"))


def test_unreadable_files_are_recorded_and_retried_when_changed(model, photos, tmp_path):
    root = _copy_photos(photos, tmp_path)
    broken = os.path.join(root, "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff not really a jpeg")
    r = Retriever(model, image_size=96, directory=tmp_path / "index")
    counts = r.index(root, progress=False)
    assert counts["added"] == NUM_PHOTOS and counts["failed"] == 1
    assert "broken.jpg" in r.failed and "broken.jpg" not in r.ids
    assert store.DescriptorStore(tmp_path / "index").skipped()[0][0] == "broken.jpg"
    assert r.index(root, progress=False)["unchanged"] == NUM_PHOTOS + 1  # not retried
    synthetic_photo(broken, 55)  # fixed
    counts = r.index(root, progress=False)
    assert counts["added"] == 1 and "broken.jpg" in r.ids and not r.failed


def test_interrupted_indexing_resumes(model, photos, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    r = Retriever(model, image_size=96, directory=index_dir, flush_every=2)
    calls = {"n": 0}
    real_add = StoreWriter.add

    def add_then_die(self, image_id, descriptor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_add(self, image_id, descriptor)

    monkeypatch.setattr(StoreWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        r.index(photos, progress=False)
    assert os.path.isfile(index_dir / "pending.json")
    assert not os.path.exists(index_dir / "manifest.json")  # nothing committed yet

    calls["n"] = -1000
    fresh = Retriever(model, image_size=96, directory=index_dir, flush_every=2)
    counts = fresh.index(photos, progress=False)
    assert calls["n"] == -1000 + NUM_PHOTOS - 4  # the 4 saved images were not recomputed
    assert counts["total"] == NUM_PHOTOS
    # Issue 26 item 3: what happened, not "0 added, N unchanged".
    assert (counts["added"], counts["unchanged"], counts["resumed"]) == (NUM_PHOTOS, 0, 4)
    assert summary(counts).startswith(
        f"{NUM_PHOTOS} added (4 resumed from the interrupted run), 0 updated, 0 unchanged"
    )
    again = fresh.index(photos, progress=False)
    assert (again["added"], again["unchanged"], again["resumed"]) == (0, NUM_PHOTOS, 0)
    reference = Retriever(model, image_size=96)
    reference.index(photos, progress=False)
    assert sorted(fresh.ids) == sorted(reference.ids)
    order = [fresh.ids.index(i) for i in reference.ids]
    np.testing.assert_allclose(fresh.descriptors[order], reference.descriptors, atol=1e-6)


def test_interrupted_commit_is_completed_on_next_open(model, photos, tmp_path, monkeypatch):
    root = _copy_photos(photos, tmp_path)
    index_dir = tmp_path / "index"
    r = Retriever(model, image_size=96, directory=index_dir)
    r.index(root, progress=False)
    synthetic_photo(os.path.join(root, "extra.jpg"), 77)
    real_finish = store.finish_commit

    def die(directory):
        raise OSError("power cut")

    monkeypatch.setattr(store, "finish_commit", die)
    with pytest.raises(OSError, match="power cut"):
        r.index(root, progress=False)
    assert os.path.isfile(index_dir / "COMMIT")
    monkeypatch.setattr(store, "finish_commit", real_finish)
    reopened = Retriever.load(index_dir)
    assert "extra.jpg" in reopened.ids and len(reopened) == NUM_PHOTOS + 1
    assert not os.path.exists(index_dir / "COMMIT")
    assert not [n for n in os.listdir(index_dir) if n.endswith(".new")]
    assert reopened.index(root, progress=False)["unchanged"] == NUM_PHOTOS + 1


def test_index_of_other_settings_is_refused(model, photos, tmp_path):
    r = Retriever(model, image_size=96, directory=tmp_path / "index")
    r.index([os.path.join(photos, "img1.jpg")], progress=False)
    with pytest.raises(ValueError, match="image_size"):
        Retriever(model, image_size=64, directory=tmp_path / "index")
    # A benchmark store (no manifest) is never overwritten by an index.
    plain = tmp_path / "store"
    plain.mkdir()
    (plain / "COMPLETE").write_text("{}")
    with pytest.raises(ValueError, match="not an image index"):
        Retriever(model, image_size=96, directory=plain)
    with pytest.raises(ValueError, match="not an image index"):
        r.save(plain)


def test_explicit_paths_and_ids(model, photos, tmp_path):
    r = Retriever(model, image_size=96)
    paths = [os.path.join(photos, "img1.jpg"), os.path.join(photos, "img2.jpg")]
    r.index(paths, ids=["one", "two"], progress=False)
    assert r.ids == ["one", "two"] and r.path_of("two") == paths[1]
    r.save(tmp_path / "index")
    assert Retriever.load(tmp_path / "index").path_of("one") == paths[0]
    with pytest.raises(ValueError, match="2 paths but 1 ids"):
        r.index(paths, ids=["x"], progress=False)


def test_build_index_shards_merge_to_the_full_index(model, photos, tmp_path):
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    cfg = {"data": {"image_size": 96, "scales": (1.0,), "ms_power": 1.0}}
    full = runs.build_index(cfg, photos, tmp_path / "full", model_path=model_path,
                                     progress=False)  # fmt: skip
    shards = [
        str(tmp_path / f"part{s}")
        for s in range(2)
        if runs.build_index(
            cfg,
            photos,
            tmp_path / f"part{s}",
            model_path=model_path,
            shard_index=s,
            num_shards=2,
            progress=False,
        )  # fmt: skip
    ]
    merged = Retriever.load(runs.merge_indexes(shards, tmp_path / "merged"))
    assert merged.ids == full.ids
    np.testing.assert_allclose(merged.descriptors, full.descriptors, atol=1e-6)
    with open(tmp_path / "merged" / "manifest.json") as f:
        assert len(json.load(f)["files"]) == NUM_PHOTOS
    q = _near_duplicate(full.path_of("img8.jpg"), tmp_path / "q.jpg")
    assert merged.search(q, k=3) == full.search(q, k=3)


def test_from_config_round_trip_keeps_the_random_model(tmp_path, photos):
    from cbir_tf import config as config_lib

    cfg = config_lib.load_config("demo")
    cfg.model.weights = "none"
    cfg.data.image_size = 64
    cfg.model.pooling = "gem"
    index_dir = tmp_path / "index"
    r = Retriever.from_config(cfg, directory=index_dir)
    r.index(photos, progress=False)
    # Random weights cannot be rebuilt from the config: the model is saved with the index.
    with open(index_dir / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["model"]["kind"] == "config" and manifest["model"]["file"] == "model.keras"
    assert manifest["model"]["config"]["backbone"] == "mobilenet"
    query = os.path.join(photos, "img4.jpg")
    before = r.search(query, k=4)
    assert Retriever.load(index_dir).search(query, k=4) == before
    # Reopening from the same config (new random weights) uses the saved model instead.
    assert Retriever.from_config(cfg, directory=index_dir).search(query, k=4) == before


def test_pretrained_mobilenet_finds_near_duplicates(photos, tmp_path):
    weights = shared_path("weights", "mobilenet_2_5_224_tf_no_top.h5")
    from cbir_tf import config as config_lib

    cfg = config_lib.load_config("demo")
    cfg.model.weights = str(weights)
    cfg.data.image_size = 96
    r = Retriever.from_config(cfg)
    r.index(photos, progress=False)
    assert not r.model_ref["reproducible"]  # the weights file may move: the index keeps it
    for image_id in r.ids:
        q = _near_duplicate(r.path_of(image_id), tmp_path / "q.jpg")
        assert r.search(q, k=1)[0].id == image_id
    r.save(tmp_path / "index")
    assert os.path.exists(tmp_path / "index" / "model.keras")  # the folder works on its own
    assert Retriever.load(tmp_path / "index").search(q, k=3) == r.search(q, k=3)


def test_file_names_that_cannot_be_ids_are_skipped_and_reported(model, photos, tmp_path):
    root = _copy_photos(photos, tmp_path)
    img = os.path.join(root, "img1.jpg")
    shutil.copy(img, os.fsencode(root) + b"/bad\xff\xfe.jpg")  # not UTF-8
    shutil.copy(img, os.path.join(root, "new\nline.jpg"))
    shutil.copy(img, os.path.join(root, "sub", "carriage\rreturn.jpg"))
    r = Retriever(model, image_size=96, directory=tmp_path / "index")
    counts = r.index(root, progress=False)
    assert counts["added"] == NUM_PHOTOS and counts["failed"] == 3
    skipped = dict(store.DescriptorStore(tmp_path / "index").skipped())
    utf8, line_break = "is not valid UTF-8", "holds a line break"
    assert skipped == {
        "bad\\xff\\xfe.jpg": f"its file name {utf8}; rename the file to index it",
        "new\\nline.jpg": f"its file name {line_break}; rename the file to index it",
        "sub/carriage\\rreturn.jpg": f"its file name {line_break}; rename the file to index it",
    }
    assert not os.path.exists(tmp_path / "index" / "pending.json")
    again = Retriever.load(tmp_path / "index")
    counts = again.index(root, progress=False, prune=True)
    assert counts["unchanged"] == NUM_PHOTOS + 3 and counts["removed"] == 0
    os.rename(os.path.join(root, "new\nline.jpg"), os.path.join(root, "newline.jpg"))
    counts = again.index(root, progress=False, prune=True)
    assert counts["added"] == 1 and counts["removed"] == 1  # renamed: indexed; the old entry gone
    assert "new\\nline.jpg" not in dict(store.DescriptorStore(tmp_path / "index").skipped())


def test_a_pending_batch_that_no_longer_matches_the_folder_starts_afresh(
    model, photos, tmp_path, monkeypatch, caplog
):
    root = _copy_photos(photos, tmp_path)
    index_dir = tmp_path / "index"
    r = Retriever(model, image_size=96, directory=index_dir, flush_every=2)
    real_add = StoreWriter.add
    calls = {"n": 0}

    def add_then_die(self, image_id, descriptor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_add(self, image_id, descriptor)

    monkeypatch.setattr(StoreWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        r.index(root, progress=False)
    monkeypatch.undo()
    pending = json.loads((index_dir / "pending.json").read_text())
    moved = pending["paths"][-1]
    os.rename(moved, moved.replace(".jpg", "-renamed.jpg"))
    with caplog.at_level("WARNING"):
        counts = Retriever(model, image_size=96, directory=index_dir).index(root, progress=False)
    lines = [m for m in caplog.messages if "no longer matches" in m]
    assert len(lines) == 1 and lines[0].endswith("starting it afresh")
    assert counts["total"] == NUM_PHOTOS and not os.path.exists(index_dir / "pending.json")

    # A batch an earlier version saved with an id it could not store, or a damaged file: the
    # same (nothing to delete by hand).
    (index_dir / "pending.json").write_text(
        json.dumps({"ids": ["bad\udcff.jpg"], "paths": [moved], "stats": [[1, 2]], "remove": []})
    )
    again = Retriever(model, image_size=96, directory=index_dir)
    assert again.index(root, progress=False)["unchanged"] == NUM_PHOTOS
    (index_dir / "pending.json").write_text('{"ids": ["a.jpg"], "paths": [')
    assert again.index(root, progress=False)["unchanged"] == NUM_PHOTOS
    assert not os.path.exists(index_dir / "pending.json")


def test_auto_rerank_settings_are_counted_once_per_collection_and_kept_in_the_manifest(
    model, tmp_path, monkeypatch
):
    from photos import view_of

    from cbir_tf.rerank import auto
    from cbir_tf.runs.search import run_search
    from cbir_tf.serve.service import open_service

    root = tmp_path / "photos"
    for i in range(8):  # 8 photos, each with two other views: groups for the rule to find
        src = synthetic_photo(root / f"p{i}.jpg", 200 + i)
        for v in range(2):
            view_of(src, root / f"p{i}v{v}.jpg", 300 + 10 * i + v)
    folder = tmp_path / "index"
    r = Retriever(model, image_size=96, directory=folder)
    r.index(str(root), progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rerank"]["diffusion"]["k"] == "auto"  # the settings as configured ...
    entry = manifest["rerank_auto"]  # ... and what 'auto' means for these rows
    assert entry == json.loads(json.dumps(auto.collection_entry(r.descriptors, r.ids)))
    assert r.resolved_rerank().to_dict()["diffusion"] == {
        **r.resolved_rerank().to_dict()["diffusion"],
        **entry["values"]["diffusion"],
    }
    query = str(root / "p3v1.jpg")
    methods = ("aqe", "diffusion", "aqe+diffusion", "dba")
    expected = {m: r.search(query, k=6, rerank=m) for m in methods}

    # Reopened by search.py, Retriever.load or serve.py: nothing is counted again, same results.
    monkeypatch.setattr(auto, "collection_stats", lambda *a, **k: pytest.fail("counted again"))
    loaded = Retriever.load(folder)
    assert loaded.rerank_auto() == entry
    assert {m: loaded.search(query, k=6, rerank=m) for m in methods} == expected
    for m in methods:
        ((_, hits),) = run_search(folder, query, k=6, rerank=m, stream=io.StringIO())
        assert [h.id for h in hits] == [h.id for h in expected[m]]
    service = open_service(folder)
    try:
        assert service.info()["rerank_settings"] == loaded.resolved_rerank().to_dict()
    finally:
        service.close()
    monkeypatch.undo()

    # The collection changes: its entry is counted again, once, and saved.
    synthetic_photo(root / "new.jpg", 999)
    loaded.index(str(root), progress=False)
    after = json.loads((folder / "manifest.json").read_text())["rerank_auto"]
    assert after["images"] == len(loaded) == 25 and after["ids_sha256"] != entry["ids_sha256"]
    assert auto.entry_matches(after, loaded.ids)


def test_search_and_serve_take_a_configs_rerank_block(built, tmp_path):
    from cbir_tf import config as config_lib
    from cbir_tf.runs.search import run_search
    from cbir_tf.serve.service import open_service

    folder = built.save(tmp_path / "index")
    cfg = config_lib.default_config()
    config_lib.set_field(cfg, "rerank.diffusion.k", "3")
    config_lib.set_field(cfg, "rerank.diffusion.kq", "2")
    block = config_lib.block(cfg, "rerank")
    query = _near_duplicate(built.path_of("img4.jpg"), tmp_path / "q.jpg")
    want = Retriever.load(folder, rerank=block).search(query, k=len(built), rerank="diffusion")
    default = Retriever.load(folder).search(query, k=len(built), rerank="diffusion")
    assert [h.id for h in want] != [h.id for h in default]  # the block makes a difference
    (_, hits), = run_search(folder, query, k=len(built), rerank="diffusion",
                            rerank_settings=block, stream=io.StringIO())  # fmt: skip
    assert [h.id for h in hits] == [h.id for h in want]
    service = open_service(folder, rerank=block)
    try:
        settings = service.info()["rerank_settings"]["diffusion"]
        assert (settings["k"], settings["kq"]) == (3, 2)
    finally:
        service.close()
