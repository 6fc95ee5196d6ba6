"""cbir_tf.fileio's folder lock: a finished folder keeps no `.lock` (issue 26 item 9), a stale
lock of a killed writer is taken over, and deleting the file never lets two writers in."""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from cbir_tf import fileio

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_lock_file_goes_when_the_writer_leaves(tmp_path):
    with fileio.folder_lock(tmp_path / "a"):
        assert (tmp_path / "a" / ".lock").read_text() == str(os.getpid())
    assert os.listdir(tmp_path / "a") == []
    with pytest.raises(RuntimeError, match="boom"), fileio.folder_lock(tmp_path / "a"):
        raise RuntimeError("boom")
    assert os.listdir(tmp_path / "a") == []  # an error is a clean exit too


def test_a_finished_index_folder_has_no_lock_file(tmp_path):
    import keras
    import numpy as np
    from PIL import Image

    from cbir_tf.describe.layers import GeM, L2Normalization
    from cbir_tf.retriever import Retriever

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2)(inp)
    r = Retriever(keras.Model(inp, L2Normalization()(GeM()(x))), image_size=32)
    r = Retriever(r.model, image_size=32, directory=tmp_path / "index")
    r.index(str(photos), progress=False)
    assert len(r) == 3 and (tmp_path / "index" / "manifest.json").is_file()
    assert not (tmp_path / "index" / ".lock").exists()
    assert not any(p.name == ".lock" for p in (tmp_path / "index").rglob("*"))


HOLDER = """import sys, time
from cbir_tf.fileio import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_lock_is_taken_over(tmp_path):
    folder = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(fileio.LockError, match="being written by another process"):
            with fileio.folder_lock(folder):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
    assert (folder / ".lock").read_text() == str(proc.pid)  # stale: its holder is dead
    with fileio.folder_lock(folder):
        assert (folder / ".lock").read_text() == str(os.getpid())
    assert not (folder / ".lock").exists()


def test_a_taker_that_opened_the_file_before_it_was_deleted_locks_the_new_one(
    tmp_path, monkeypatch
):
    # The race deleting the file opens: B opens `.lock`, the holder A deletes it and unlocks,
    # B locks the deleted file. B must notice and lock the file at `.lock`, so that a third
    # writer C is refused while B holds it.
    folder = tmp_path / "f"
    holder = fileio.folder_lock(folder)
    holder.__enter__()
    real_flock = fcntl.flock
    released = []

    def flock(fd, operation):
        if operation & fcntl.LOCK_EX and not released:
            released.append(True)
            holder.__exit__(None, None, None)  # A leaves between B's open and B's lock
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with fileio.folder_lock(folder):
        assert released and (folder / ".lock").read_text() == str(os.getpid())
        with pytest.raises(fileio.LockError):
            with fileio.folder_lock(folder):  # C, with its own open file
                pass
    assert not (folder / ".lock").exists()
