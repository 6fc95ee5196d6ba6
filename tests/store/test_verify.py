"""Integrity: every file of a committed state is checked against the size and SHA-256 recorded
at its commit (issue 28 item 3, issue 24 item 8): cheaply (sizes, headers) at every load, fully
by `extract.py --verify --out=DIR`, `Retriever.load(full_check=True)` and the service's
`--verify`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from photos import synthetic_photo

from cbir_tf.retriever import Retriever
from cbir_tf.store import files as store_lib
from cbir_tf.store.verify import verify_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEGACY = os.path.join(ROOT, "tests", "fixtures", "legacy")


@pytest.fixture(scope="module")
def model():
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(5)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    return keras.Model(inp, L2Normalization()(GeM()(x)))


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    """An index of 12 photos with its model and an approximate index ('flat', forced)."""
    base = tmp_path_factory.mktemp("verify")
    photos = base / "photos"
    for i in range(12):
        synthetic_photo(photos / f"p{i:02d}.jpg", 40 + i)
    r = Retriever(
        model, image_size=64, directory=base / "index", ann={"min_rows": 10, "kind": "flat"}
    )
    r.index(str(photos), progress=False)
    return base / "index", str(photos)


def _copy(built, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(built[0], index)
    return index


def _damaged(index):
    return verify_folder(index).damaged


def test_commit_records_every_file_and_a_fresh_index_verifies(built):
    index, _ = built
    marker = json.loads((index / "COMPLETE").read_text())
    assert marker["commit"] == 1 and marker["checksum"] == "sha256"
    assert sorted(marker["files"]) == sorted(
        ["descriptors.npy", "ids.txt", "skipped.json", "meta.json", "manifest.json",
         "model.keras", "ann.json"]
    )  # fmt: skip
    for name, record in marker["files"].items():
        assert record == store_lib.file_record(str(index / name)), name
    report = verify_folder(index)
    assert report.damaged == [] and report.notes == [] and report.files == 7
    assert json.loads((index / "manifest.json").read_text())["commit"] == 1


def test_a_flipped_byte_or_swapped_rows_in_descriptors_are_named(built, tmp_path):
    index = _copy(built, tmp_path)
    path = index / "descriptors.npy"
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-10] ^= 0x01  # one bit of the last row: the size and header stay right
    path.write_bytes(bytes(flipped))
    (line,) = _damaged(index)
    assert line.startswith(f"{path} does not match the SHA-256 recorded at its commit")
    Retriever.load(index)  # the cheap check at every load cannot see it ...
    with pytest.raises(store_lib.StoreCorruptError, match="descriptors.npy does not match"):
        Retriever.load(index, full_check=True)  # ... the full one does

    path.write_bytes(good)
    x = np.load(path, mmap_mode="r+")
    x[[0, 5]] = x[[5, 0]]  # two rows swapped
    x.flush()
    del x
    assert [line.split(" does not")[0] for line in _damaged(index)] == [str(path)]


def test_a_truncated_ids_file_is_named_at_every_load(built, tmp_path):
    index = _copy(built, tmp_path)
    path = index / "ids.txt"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(store_lib.StoreCorruptError, match=f"^{path} has .* bytes, .* committed"):
        Retriever.load(index)
    (line,) = _damaged(index)
    assert line.startswith(f"{path} has ")


def test_an_index_copied_without_its_last_files_is_named(built, tmp_path):
    index = _copy(built, tmp_path)
    os.unlink(index / "ann.json")
    os.unlink(index / "model.keras")
    damaged = _damaged(index)
    assert damaged == [
        f"{index / 'ann.json'} is missing (" + damaged[0].split(" is missing (")[1],
        f"{index / 'model.keras'} is missing (" + damaged[1].split(" is missing (")[1],
    ]
    with pytest.raises(store_lib.StoreCorruptError, match="model.keras is missing"):
        Retriever.load(index)
    # A copy stopped before its marker is not taken for a finished index at all.
    os.unlink(index / "COMPLETE")
    with pytest.raises(store_lib.StoreIncompleteError, match="no COMPLETE marker"):
        Retriever.load(index)


def test_a_damaged_chunk_of_an_unfinished_extraction_is_named(built, tmp_path, model):
    from cbir_tf.store.writer import StoreWriter

    store = store_lib.DescriptorStore(tmp_path / "store")
    with StoreWriter(store, ["a", "b", "c"], {"backbone": "x"}, flush_every=1) as w:
        for i, name in enumerate("ab"):
            w.add(name, np.eye(4, dtype=np.float32)[i])
    chunk = tmp_path / "store" / "parts" / "00001.npz"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (line,) = _damaged(tmp_path / "store")
    assert line.startswith(f"{chunk}: ")


def test_the_verify_command_prints_one_line_per_damaged_file_and_exits_1(built, tmp_path):
    index = _copy(built, tmp_path)

    def run():
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "extract.py"), "--verify", f"--out={index}"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )  # fmt: skip

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1].startswith(f"{index}: 7 files checked (")
    assert ok.stdout.splitlines()[-1].endswith("): no damage found")
    (index / "skipped.json").write_text("[]\n ")
    (index / "meta.json").write_bytes((index / "meta.json").read_bytes()[:-20])
    bad = run()
    assert bad.returncode == 1, bad.stderr
    lines = bad.stdout.splitlines()
    assert [line.split(" has ")[0] for line in lines[:-1]] == [
        f"damaged: {index / 'meta.json'}",
        f"damaged: {index / 'skipped.json'}",
    ]
    assert lines[-1].endswith("): 2 damaged")


def test_an_index_without_checksums_loads_with_one_line_and_gets_them_at_its_update(
    tmp_path, caplog
):
    index, images = tmp_path / "index", tmp_path / "images"
    shutil.copytree(os.path.join(LEGACY, "index"), index)
    shutil.copytree(os.path.join(LEGACY, "images"), images)
    with caplog.at_level(logging.INFO):
        r = Retriever.load(index, root=images)
    notes = [m for m in caplog.messages if "before checksums" in m]
    assert notes == [
        f"{index} was written before checksums were recorded: only sizes and headers are "
        "checked until its next update"
    ]
    assert r.commit == 0
    report = verify_folder(index)
    assert report.damaged == [] and len(report.notes) == 1
    shutil.copy(images / "img0.png", images / "img3.png")
    r.index(str(images), progress=False)
    assert r.commit == 1
    report = verify_folder(index)
    assert report.damaged == [] and report.notes == [] and report.files >= 6


def test_search_command_checks_every_byte_with_verify(built, tmp_path):
    index = _copy(built, tmp_path)
    path = index / "descriptors.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    query = os.path.join(built[1], "p00.jpg")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "search.py"), f"--index={index}", f"--query={query}",
         "--verify"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
    )  # fmt: skip
    assert out.returncode == 1
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {path} does not match the SHA-256 recorded at its commit: its bytes changed on "
        "disk; copy the folder again or rebuild it"
    ], out.stderr
