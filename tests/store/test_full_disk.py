"""A full disk during extraction, a merge, an index commit and while writing the approximate
index (issue 28 item 2): one line naming the path and the space needed, the last committed index
untouched and loadable, and once space is freed the same call or command resumes and ends with
the store an uninterrupted run makes.

The disk is a REAL size-limited filesystem: a tmpfs mounted for each test (the tests run as root
here; where mounting is impossible they skip with an allowed reason). Each stage meets the full
disk because the filesystem is filled (one file taking all its free space) at the moment the
stage starts: the writes then fail in the kernel with ENOSPC, as on a disk filled by others.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from photos import synthetic_photo

from cbir_tf.retriever import Retriever
from cbir_tf.store import files as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIRST, MORE = 5, 3  # photos in the committed index; photos the update adds


class Disk:
    """A mounted tmpfs that can be filled up and freed again."""

    def __init__(self, root):
        self.root = root
        self.filler = root / "filler"

    def fill(self):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)

    def free(self):
        os.unlink(self.filler)


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"needs root to mount a size-limited tmpfs ({done.stderr.strip()})")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Photos, a small saved model, and the reference: the index an uninterrupted run makes."""
    import keras

    from cbir_tf.describe import models
    from cbir_tf.describe.layers import GeM, L2Normalization

    base = tmp_path_factory.mktemp("fulldisk")
    photos = [synthetic_photo(base / "photos" / f"p{i}.jpg", 70 + i) for i in range(FIRST + MORE)]
    keras.utils.set_random_seed(8)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(
        keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    )
    model_file = models.save_descriptor_model(
        keras.Model(inp, L2Normalization()(GeM()(x))), base / "m.keras", {"image_size": 64}
    )
    reference = _open(model_file, base / "reference")
    reference.index(photos[:FIRST], progress=False)
    reference.index(str(base / "photos"), progress=False)
    return {"photos": photos, "folder": str(base / "photos"), "model": model_file,
            "reference": reference}  # fmt: skip


def _open(model_file, index, **kwargs):
    return Retriever.from_model(model_file, image_size=64, directory=index, **kwargs)


def _committed_index(setup, disk, **kwargs):
    """The index of the first photos, committed on the small disk."""
    r = _open(setup["model"], disk.root / "index", flush_every=2, **kwargs)
    r.index(setup["photos"][:FIRST], progress=False)
    return r


def _assert_untouched(index, commit):
    r = Retriever.load(index, full_check=True)  # every file checks out byte for byte
    assert r.commit == commit and len(r) == FIRST
    assert not os.path.exists(index / "staged") and not os.path.exists(index / "COMMIT")


def _assert_same_store(index, reference):
    r = Retriever.load(index, full_check=True)
    assert r.ids == reference.ids
    np.testing.assert_allclose(r.descriptors, reference.descriptors, atol=1e-6)
    assert dict(store_lib.DescriptorStore(index).skipped()) == reference.failed


def _fill_when_called(monkeypatch, disk, owner, name, nth=1):
    """Makes `owner.name` fill the disk on its `nth` call, before doing its work."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def filled_then_real(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            disk.fill()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_then_real)


def _one_line_naming(error, path_part):
    message = str(error)
    assert "\n" not in message and path_part in message, message
    assert "the disk is full" in message or "not enough space" in message, message
    assert " needed" in message and "free" in message, message
    return message


STAGES = {
    # stage: (object, function) that fills the disk as the stage starts, and its nth call
    "extraction (a chunk)": ("cbir_tf.store.writer:StoreWriter", "flush", 2, "pending/parts"),
    "extraction (the store)": ("cbir_tf.store.writer:StoreWriter", "finalize", 1, "pending"),
    "index commit": ("cbir_tf.store.index_folder", "write_index", 1, "staged"),
    "approximate index": ("cbir_tf.search.ann", "follow_rows", 1, "staged"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_full_disk_during_an_update_keeps_the_index_and_resumes(setup, disk, monkeypatch, stage):
    import importlib

    target, name, nth, path_part = STAGES[stage]
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    owner = getattr(owner, attr) if attr else owner
    ann = {"min_rows": 2, "kind": "flat"} if stage == "approximate index" else None
    r = _committed_index(setup, disk, ann=ann)
    index = disk.root / "index"
    _fill_when_called(monkeypatch, disk, owner, name, nth)
    with pytest.raises(OSError) as e:
        r.index(setup["folder"], progress=False)
    assert e.value.errno == errno.ENOSPC
    _one_line_naming(e.value, os.path.join(str(index), path_part))
    monkeypatch.undo()
    _assert_untouched(index, commit=1)
    disk.free()
    counts = _open(setup["model"], index, ann=ann).index(setup["folder"], progress=False)
    assert counts["total"] == FIRST + MORE
    _assert_same_store(index, setup["reference"])


@pytest.mark.slow
def test_full_disk_during_a_merge_resumes_to_the_same_index(setup, disk, monkeypatch, tmp_path):
    from cbir_tf.store import shards
    from cbir_tf.store.index_folder import merge_indexes

    parts = []
    for k in range(2):
        part = _open(setup["model"], tmp_path / f"part{k}")
        part.descriptor_meta.update(
            {"shard_index": k, "num_shards": 2, "shard_start": 4 * k, "shard_stop": 4 * k + 4,
             "total_images": 8}
        )  # fmt: skip
        part.index(setup["photos"][4 * k : 4 * k + 4], progress=False)
        parts.append(tmp_path / f"part{k}")
    reference = merge_indexes(parts, tmp_path / "merged")
    _fill_when_called(monkeypatch, disk, shards, "write_store")
    with pytest.raises(OSError) as e:
        merge_indexes(parts, disk.root / "merged")
    _one_line_naming(e.value, str(disk.root / "merged"))
    monkeypatch.undo()
    with pytest.raises((store_lib.StoreIncompleteError, FileNotFoundError)):
        Retriever.load(disk.root / "merged")  # nothing half-written passes for an index
    disk.free()
    merge_indexes(parts, disk.root / "merged")
    _assert_same_store(disk.root / "merged", Retriever.load(reference))


@pytest.mark.slow
def test_full_disk_through_the_extract_command(setup, disk):
    _committed_index(setup, disk)
    index = disk.root / "index"
    disk.fill()

    def extract():
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "extract.py"), f"--images={setup['folder']}",
             f"--out={index}", f"--model={setup['model']}", "--config.data.image_size=64",
             "--config.extract.flush_every=2"],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
        )  # fmt: skip

    full = extract()
    assert full.returncode == 1, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    _one_line_naming(errors[0], str(index))
    _assert_untouched(index, commit=1)
    disk.free()
    done = extract()
    assert done.returncode == 0, done.stderr
    _assert_same_store(index, setup["reference"])
    shutil.rmtree(index)
