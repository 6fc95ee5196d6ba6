"""The approximate index's files as search.py, serve.py and extract.py meet them (issue 24 items
5 and 6): a damaged index means one warning and exact search, never a stop, and the next update
rebuilds it; an index that cannot fit is refused before anything is written, or exact search is
used, saying so."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from photos import synthetic_photo

from cbir_tf import config as config_lib
from cbir_tf.retriever import Retriever
from cbir_tf.runs.extract import build_index
from cbir_tf.runs.search import run_search
from cbir_tf.search import ann
from cbir_tf.store import files as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA_ROWS = 700  # synthetic rows added to the photos' so that an IVF index can be built


def _config(**ann_fields):
    cfg = config_lib.default_config()
    cfg.data.image_size = 64
    for name, value in ann_fields.items():
        cfg.search.ann[name] = value
    return cfg


def _model(path):
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    keras.Model(inp, L2Normalization()(GeM()(x))).save(path)
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An index of 8 photos and 700 synthetic rows with an IVF approximate index."""
    base = tmp_path_factory.mktemp("ann_commands")
    photos = base / "photos"
    for i in range(8):
        synthetic_photo(photos / f"p{i}.jpg", i)
    model = _model(base / "tiny.keras")
    index = base / "index"
    build_index(_config(min_rows=100), photos, index, model_path=model, progress=False)
    r = Retriever.load(index, ann={"min_rows": 100, "tune_queries": 200})
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((EXTRA_ROWS, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"synthetic/{i}.jpg" for i in range(EXTRA_ROWS)]
    r._apply((x, ids, []), {i: f"/nowhere/{i}" for i in ids}, {i: [1, 0] for i in ids}, set())
    assert ann.read_meta(str(index))["kind"] == "ivfpq"
    return {"base": base, "photos": photos, "model": model, "index": index}


def _damage(folder, how):
    meta = folder / ann.META_FILE
    if how == "ann.faiss missing":
        os.unlink(folder / ann.INDEX_FILE)
    elif how == "ann.json truncated":
        meta.write_bytes(meta.read_bytes()[:100])
    elif how == "ann.json holding []":
        meta.write_text("[]")
    else:  # checksum mismatch
        data = bytearray((folder / ann.INDEX_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / ann.INDEX_FILE).write_bytes(bytes(data))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


DAMAGES = ["ann.faiss missing", "ann.json truncated", "ann.json holding []", "checksum mismatch"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_approximate_index_means_one_warning_exact_search_and_a_rebuild(
    made, how, tmp_path, caplog
):
    folder = tmp_path / "index"
    shutil.copytree(made["index"], folder)
    _damage(folder, how)
    query = str(made["photos"] / "p3.jpg")
    exact = run_search(made["index"], query, k=5, exact=True, stream=open(os.devnull, "w"))
    # search.py: one warning, exact results.
    with caplog.at_level(logging.WARNING):
        found = run_search(folder, query, k=5, stream=open(os.devnull, "w"))
    assert [(h.id, h.score) for h in found[0][1]] == [(h.id, h.score) for h in exact[0][1]]
    (warning,) = _warnings(caplog)
    assert "not using the approximate index, searching exactly" in warning and "\n" not in warning
    # serve.py: opens, warns once, searches exactly.
    from cbir_tf.serve import service as service_lib

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        service = service_lib.open_service(folder)
        try:
            answer = service.search_image((made["photos"] / "p3.jpg").read_bytes(), 5, "none")
        finally:
            service.close()
    assert len(_warnings(caplog)) == 1
    assert [h["id"] for h in answer["results"]] == [h.id for h in exact[0][1]]
    # extract.py: the next update (one more photo) runs, and rebuilds the approximate index.
    photos = tmp_path / "photos"
    shutil.copytree(made["photos"], photos)
    synthetic_photo(photos / "new.jpg", 99)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        r = build_index(_config(min_rows=100), photos, folder, model_path=made["model"],
                        progress=False)  # fmt: skip
    assert len(r) == 8 + EXTRA_ROWS + 1
    assert any("rebuilding the approximate index" in w for w in _warnings(caplog))
    meta = store_lib.DescriptorStore(str(folder)).meta()
    rebuilt = ann.load(str(folder), r.descriptors, meta)
    assert rebuilt.kind == "ivfpq" and rebuilt.ntotal == len(r)


@pytest.mark.slow
def test_search_py_on_an_ann_json_holding_a_list_is_one_warning_line(made, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(made["index"], folder)
    _damage(folder, "ann.json holding []")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "search.py"), f"--index={folder}",
         f"--query={made['photos'] / 'p3.jpg'}", "--k=3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ann.META_FILE in line]
    assert len(lines) == 1 and "searching exactly" in lines[0], proc.stderr
    assert "p3.jpg" in proc.stdout


def _store_files(folder):
    names = ("descriptors.npy", "ids.txt", "manifest.json", "meta.json", "pending")
    return {n: os.path.getmtime(folder / n) for n in names if (folder / n).exists()}


@pytest.mark.slow
def test_forcing_the_approximate_index_on_179_images(made, tmp_path, caplog):
    photos = tmp_path / "photos"
    for i in range(179):
        synthetic_photo(photos / f"p{i:03d}.jpg", 1000 + i, size=(48, 40))
    index = tmp_path / "index"
    # kind 'auto' past min_rows=100: exact search ('flat'), saying why; nothing left pending.
    with caplog.at_level(logging.WARNING):
        r = build_index(_config(min_rows=100), photos, index, model_path=made["model"],
                        progress=False)  # fmt: skip
    assert len(r) == 179 and not (index / "pending").exists()
    (warning,) = _warnings(caplog)
    assert "179 rows are too few for an approximate index" in warning
    assert "exact search ('flat') is used instead" in warning
    meta = json.loads((index / ann.META_FILE).read_text())
    assert meta["kind"] == "flat" and "too few" in meta["fallback"]
    # Run again: nothing is committed again, nothing fails.
    before = _store_files(index)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_index(_config(min_rows=100), photos, index, model_path=made["model"], progress=False)
    assert _store_files(index) == before and not _warnings(caplog)
    # kind 'ivfpq' asked for: refused in one line before anything is written.
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"^179 rows are too few[^\n]*$"):
        build_index(_config(min_rows=100, kind="ivfpq"), photos, fresh,
                    model_path=made["model"], progress=False)  # fmt: skip
    assert not _store_files(fresh)


@pytest.mark.slow
def test_search_py_says_when_the_recall_target_is_missed(made, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(made["index"], folder)
    r = Retriever.load(folder, ann={"min_rows": 100, "tune_queries": 200, "target_recall": 0.9999,
                                    "bytes_per_vector": 36})  # fmt: skip
    rebuilt = r.rebuild_ann()
    # 36 bytes at 32-D: coarse codes only (the smallest inverted file, 22, and SQ4 take 38).
    assert rebuilt.meta["rescoring"] == "" and not rebuilt.target_met
    assert ann.read_meta(str(folder))["target_met"] is False  # what /api/index can report
    out = io.StringIO()
    run_search(folder, made["photos"] / "p3.jpg", k=3, stream=out)
    summary = out.getvalue().splitlines()[0]
    assert summary.startswith("approximate index: ") and "TARGET 0.9999 MISSED" in summary
    assert f"recall@10 {rebuilt.recall:.3f}" in summary
