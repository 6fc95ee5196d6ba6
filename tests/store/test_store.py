"""Descriptor store: layout, atomic resumable chunks, lock, disk full, compatibility, shards."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cbir_tf.data.image_list import shard_range
from cbir_tf.describe.extract import NonFiniteDescriptorError
from cbir_tf.fileio import LockError, atomic_open, folder_lock
from cbir_tf.store import files as st
from cbir_tf.store import writer as store_writer
from cbir_tf.store.files import (
    DescriptorStore,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreWriteError,
    load_store,
)
from cbir_tf.store.meta import check_compatible
from cbir_tf.store.shards import merge_shards
from cbir_tf.store.writer import StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = {"backbone": "mobilenet", "alpha": 0.25, "weights": "none", "pooling": "gem", "gem_p": 3.0}


def _vectors(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(n):
    return [f"img/{k:03d}.jpg" for k in range(n)]


def _write(path, ids, vecs, meta=META, flush_every=4, skip=()):
    with StoreWriter(DescriptorStore(path), ids, meta, flush_every=flush_every) as w:
        for i, v in zip(ids, vecs, strict=True):
            if i in w.done:
                continue
            if i in skip:
                w.skip(i, "cannot identify image file")
            else:
                w.add(i, v)
        w.finalize()
    return load_store(path)


def _chunks(path):
    parts = os.path.join(path, "parts")
    return (
        sorted(n for n in os.listdir(parts) if n.endswith(".npz")) if os.path.isdir(parts) else []
    )


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_round_trip_layout_and_memory_map(tmp_path):
    ids, vecs = _ids(10), _vectors(10)
    desc, out_ids, meta = _write(tmp_path / "s", ids, vecs, skip={ids[3], ids[7]})
    keep = [k for k in range(10) if k not in (3, 7)]
    assert isinstance(desc, np.memmap) and desc.dtype == np.float32 and desc.shape == (8, 8)
    np.testing.assert_array_equal(desc, vecs[keep])
    assert out_ids == [ids[k] for k in keep]
    assert meta["num_images"] == 8 and meta["num_skipped"] == 2 and meta["dim"] == 8
    assert meta["backbone"] == "mobilenet" and meta["gem_p"] == 3.0
    assert set(meta["versions"]) >= {"cbir_tf", "tensorflow", "keras"} and meta["created"]
    names = set(os.listdir(tmp_path / "s"))
    assert {"descriptors.npy", "ids.txt", "meta.json", "skipped.json", "COMPLETE"} <= names
    assert "parts" not in names  # chunks are removed once the store is complete
    skipped = json.loads((tmp_path / "s" / "skipped.json").read_text())
    assert skipped == [{"id": ids[k], "reason": "cannot identify image file"} for k in (3, 7)]
    assert DescriptorStore(tmp_path / "s").skipped() == [(s["id"], s["reason"]) for s in skipped]
    assert (tmp_path / "s" / "ids.txt").read_text().splitlines() == out_ids
    # Plain numpy reads it too, without pickle.
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "descriptors.npy"), vecs[keep])
    desc2, _, _ = load_store(tmp_path / "s", mmap=False)
    assert not isinstance(desc2, np.memmap)


def test_rows_follow_input_order_whatever_the_recording_order(tmp_path):
    ids, vecs = _ids(9), _vectors(9)
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        for k in order:
            w.add(ids[k], vecs[k])
        w.finalize()
    desc, out_ids, _ = load_store(tmp_path / "s")
    assert out_ids == ids
    np.testing.assert_array_equal(desc, vecs)


def test_chunks_are_unpickled_unicode_with_checksum(tmp_path):
    ids, vecs = _ids(7), _vectors(7)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=3) as w:
        for i, v in zip(ids[:6], vecs[:6], strict=True):
            w.add(i, v)
        assert _chunks(tmp_path / "s") == ["00000.npz", "00001.npz"]
        assert w.num_pending == 0
        w.skip(ids[6], "truncated")
        assert w.num_pending == 1
    # Leaving the block without finalize saves the pending image as a chunk.
    assert _chunks(tmp_path / "s") == ["00000.npz", "00001.npz", "00002.npz"]
    with np.load(tmp_path / "s" / "parts" / "00001.npz", allow_pickle=False) as data:
        assert data["ids"].dtype.kind == "U" and data["ids"].tolist() == ids[3:6]
        assert data["descriptors"].dtype == np.float32
        np.testing.assert_array_equal(data["descriptors"], vecs[3:6])
        assert len(str(data["sha256"])) == 64
    with np.load(tmp_path / "s" / "parts" / "00002.npz", allow_pickle=False) as data:
        assert data["skipped_ids"].tolist() == [ids[6]]
        assert data["skipped_reasons"].tolist() == ["truncated"]
    assert DescriptorStore(tmp_path / "s").status() == {
        "complete": False,
        "chunks": 3,
        "images_done": 7,
    }


def test_incomplete_store_is_never_loaded(tmp_path):
    ids, vecs = _ids(6), _vectors(6)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        for i, v in zip(ids[:4], vecs[:4], strict=True):
            w.add(i, v)
    with pytest.raises(StoreIncompleteError, match=r"interrupted after 4 images.*resume"):
        load_store(tmp_path / "s")
    # Even when descriptors.npy and meta.json exist (killed during finalize, before COMPLETE).
    np.save(tmp_path / "s" / "descriptors.npy", vecs)
    (tmp_path / "s" / "meta.json").write_text("{}")
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    with pytest.raises(StoreIncompleteError, match="no COMPLETE marker"):
        load_store(_mkdir(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        load_store(tmp_path / "missing")


def _mkdir(p):
    p.mkdir()
    return p


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from cbir_tf.store.files import DescriptorStore
    from cbir_tf.store.writer import StoreWriter
    path, n_add = sys.argv[1], int(sys.argv[2])
    ids = [f"img/{k:03d}.jpg" for k in range(10)]
    vecs = np.load(sys.argv[3], allow_pickle=False)
    meta = {"backbone": "mobilenet", "alpha": 0.25, "weights": "none", "pooling": "gem",
            "gem_p": 3.0}
    w = StoreWriter(DescriptorStore(path), ids, meta, flush_every=3)
    w.__enter__()
    for k in range(n_add):
        w.add(ids[k], vecs[k])
    # A half-written temporary chunk, as a kill during a write leaves it.
    with open(os.path.join(path, "parts", ".00099.npz.abc.tmp"), "wb") as f:
        f.write(b"PK\\x03\\x04 half a zip")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_loses_at_most_unflushed_images_and_resume_is_identical(tmp_path):
    ids, vecs = _ids(10), _vectors(10)
    np.save(tmp_path / "vecs.npy", vecs)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "s"), "7", str(tmp_path / "vecs.npy")],
        env=_subprocess_env(),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=3) as w:
        # 7 added with flush_every=3: two chunks (6 images) survived, the 7th was lost.
        assert w.done == set(ids[:6]) and w.num_resumed == 6
        assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "s" / "parts"))
        for i, v in zip(ids, vecs, strict=True):
            if i not in w.done:
                w.add(i, v)
        w.finalize()
    desc, out_ids, _ = load_store(tmp_path / "s")
    ref_desc, ref_ids, _ = _write(tmp_path / "ref", ids, vecs)
    assert out_ids == ref_ids
    np.testing.assert_array_equal(desc, ref_desc)
    assert (tmp_path / "s" / "descriptors.npy").read_bytes() == (
        tmp_path / "ref" / "descriptors.npy"
    ).read_bytes()


def test_corrupt_chunk_is_set_aside_and_redone(tmp_path):
    ids, vecs = _ids(6), _vectors(6)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        for i, v in zip(ids[:4], vecs[:4], strict=True):
            w.add(i, v)
    chunk = tmp_path / "s" / "parts" / "00000.npz"
    data = dict(np.load(chunk, allow_pickle=False))
    data["descriptors"] = data["descriptors"] + 1.0  # content no longer matches its sha256
    np.savez(chunk, **data)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        assert w.done == set(ids[2:4])
        assert os.path.exists(str(chunk) + ".corrupt")
        for k in (0, 1, 4, 5):
            w.add(ids[k], vecs[k])
        w.finalize()
    desc, out_ids, _ = load_store(tmp_path / "s")
    assert out_ids == ids
    np.testing.assert_array_equal(desc, vecs)


def test_resume_with_other_settings_or_images_is_refused(tmp_path):
    ids, vecs = _ids(6), _vectors(6)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        for i, v in zip(ids[:2], vecs[:2], strict=True):
            w.add(i, v)
    other = dict(META, backbone="vgg16", pooling="rmac")
    with pytest.raises(StoreMismatchError, match=r"backbone.*pooling|pooling.*backbone") as e:
        StoreWriter(DescriptorStore(tmp_path / "s"), ids, other).__enter__()
    assert "vgg16" in str(e.value) and "never mixed" in str(e.value)
    with pytest.raises(StoreMismatchError, match="another image list"):
        StoreWriter(DescriptorStore(tmp_path / "s"), ids + ["img/new.jpg"], META).__enter__()
    # The refused attempts released the lock and left the interrupted work intact.
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META) as w:
        assert w.done == set(ids[:2])
        for i, v in zip(ids[2:], vecs[2:], strict=True):
            w.add(i, v)
        w.finalize()
    # A finished store: same settings -> nothing to do; other settings -> refused.
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META) as w:
        assert w.already_complete and w.done == set(ids)
    with pytest.raises(StoreMismatchError, match="finished store made with other settings"):
        StoreWriter(DescriptorStore(tmp_path / "s"), ids, dict(META, whitening="pca")).__enter__()
    with pytest.raises(StoreMismatchError, match="another image list"):
        StoreWriter(DescriptorStore(tmp_path / "s"), ids[:5], META).__enter__()


_LOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    from cbir_tf.store.files import DescriptorStore
    from cbir_tf.store.writer import StoreWriter
    with StoreWriter(DescriptorStore(sys.argv[1]), ["a", "b"], {"backbone": "vgg16"}) as w:
        print("locked", flush=True)
        sys.stdin.read()
    """
)


def test_second_writer_is_refused_while_the_first_runs(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCK_SCRIPT, str(tmp_path / "s")],
        env=_subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match="being written by another process"):
            StoreWriter(
                DescriptorStore(tmp_path / "s"), ["a", "b"], {"backbone": "vgg16"}
            ).__enter__()
        assert not DescriptorStore(tmp_path / "s").is_complete
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    # Once the first writer is gone the store can be written.
    with StoreWriter(DescriptorStore(tmp_path / "s"), ["a", "b"], {"backbone": "vgg16"}) as w:
        w.add("a", np.ones(3))
        w.add("b", np.ones(3))
        w.finalize()
    assert load_store(tmp_path / "s")[1] == ["a", "b"]


class _FullDisk:
    """Patches the stores' atomic_open: files chosen by `fail_on` hit ENOSPC after a few bytes."""

    def __init__(self, monkeypatch, fail_on, after_bytes=100):
        self.calls = 0
        self.fail_on = fail_on
        self.after_bytes = after_bytes
        monkeypatch.setattr(st, "atomic_open", self._open)  # the finished files
        monkeypatch.setattr(store_writer, "atomic_open", self._open)  # the chunks

    @contextlib.contextmanager
    def _open(self, path, mode="wb"):
        self.calls += 1
        fail = self.fail_on(self.calls, os.path.basename(path))
        with atomic_open(path, mode) as f:
            if fail:
                written = [0]
                real_write = f.write

                def write(data, _real=real_write, _w=written):
                    _w[0] += len(data)
                    if _w[0] > self.after_bytes:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return _real(data)

                f.write = write
            yield f


def test_disk_full_during_a_chunk_keeps_the_store_consistent_and_resumable(tmp_path, monkeypatch):
    ids, vecs = _ids(10), _vectors(10)
    _FullDisk(monkeypatch, lambda call, name: name == "00002.npz")
    with pytest.raises(StoreWriteError, match="disk is full.*6 of 10.*resume") as e:
        with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=3) as w:
            for i, v in zip(ids, vecs, strict=True):
                w.add(i, v)
    assert e.value.errno == errno.ENOSPC
    # No partial chunk, no temporary file, no COMPLETE.
    assert _chunks(tmp_path / "s") == ["00000.npz", "00001.npz"]
    assert not [n for n in os.listdir(tmp_path / "s" / "parts") if n.endswith(".tmp")]
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    monkeypatch.undo()
    desc, out_ids, _ = _write(tmp_path / "s", ids, vecs, flush_every=3)
    ref_desc, ref_ids, _ = _write(tmp_path / "ref", ids, vecs, flush_every=3)
    assert out_ids == ref_ids
    np.testing.assert_array_equal(desc, ref_desc)


def test_disk_full_during_finalize_keeps_the_chunks(tmp_path, monkeypatch):
    ids, vecs = _ids(5), _vectors(5)
    _FullDisk(monkeypatch, lambda call, name: name == "descriptors.npy")
    with pytest.raises(StoreWriteError, match="final store files"):
        _write(tmp_path / "s", ids, vecs, flush_every=2)
    assert not os.path.exists(tmp_path / "s" / "descriptors.npy")
    with pytest.raises(StoreIncompleteError):
        load_store(tmp_path / "s")
    monkeypatch.undo()
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META, flush_every=2) as w:
        assert w.done == set(ids)  # nothing to compute again
        w.finalize()
    desc, out_ids, _ = load_store(tmp_path / "s")
    np.testing.assert_array_equal(desc, vecs)


def test_non_finite_descriptor_is_refused_naming_the_image(tmp_path):
    ids = _ids(3)
    with StoreWriter(DescriptorStore(tmp_path / "s"), ids, META) as w:
        w.add(ids[0], np.ones(4))
        with pytest.raises(NonFiniteDescriptorError, match="img/001.jpg"):
            w.add(ids[1], np.array([1.0, np.nan, 0.0, 0.0]))
        with pytest.raises(NonFiniteDescriptorError, match="img/002.jpg"):
            w.add(ids[2], np.array([1.0, np.inf, 0.0, 0.0]))
        assert w.done == {ids[0]}
        with pytest.raises(st.StoreMismatchError, match="dimension 5"):
            w.add(ids[1], np.ones(5))


def test_bad_ids_are_refused(tmp_path):
    for ids in (["a", "a"], ["a\nb"], [""]):
        with pytest.raises(ValueError, match="ids must|duplicate"):
            StoreWriter(DescriptorStore(tmp_path / "s"), ids, META)


def test_damaged_finished_store_is_detected(tmp_path):
    _write(tmp_path / "s", _ids(4), _vectors(4))
    path = tmp_path / "s" / "descriptors.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(StoreCorruptError, match="damaged"):
        load_store(tmp_path / "s")


def test_check_compatible_names_the_differing_fields():
    a = {**META, "whitening": None, "image_size": 1024, "scales": [1.0], "dim": 256}
    check_compatible(a, dict(a, scales=(1.0,), created="later", versions={"x": 1}))
    with pytest.raises(ValueError) as e:
        check_compatible(a, dict(a, backbone="vgg16", image_size=512, dim=512), "queries", "db")
    msg = str(e.value)
    assert "backbone (queries: 'mobilenet', db: 'vgg16')" in msg
    assert "image_size" in msg and "dim" in msg and "pooling" not in msg
    with pytest.raises(ValueError, match="whitening"):
        check_compatible(a, dict(a, whitening={"kind": "pca", "dataset": "roxford5k"}))
    with pytest.raises(ValueError, match="gem_p"):
        check_compatible(a, dict(a, gem_p=2.0))
    # gem_p does not change R-MAC descriptors; alpha only matters for MobileNets.
    r = dict(a, pooling="rmac", rmac_levels=3, backbone="efficientnetb1")
    check_compatible(r, dict(r, gem_p=2.0, alpha=0.5))
    with pytest.raises(ValueError, match="rmac_levels"):
        check_compatible(r, dict(r, rmac_levels=2))
    with pytest.raises(ValueError, match="alpha"):
        check_compatible(a, dict(a, alpha=0.5))
    with pytest.raises(ValueError, match="weights"):
        check_compatible(a, {k: v for k, v in a.items() if k != "weights"})


def test_shard_range_is_contiguous_and_covers_everything():
    for n in (0, 1, 7, 10, 101):
        for s in (1, 3, 4):
            bounds = [shard_range(n, k, s) for k in range(s)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:], strict=False))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="shard_index"):
        shard_range(10, 3, 3)


def _write_shards(root, ids, vecs, num_shards, skip=(), meta=META):
    dirs = []
    for k in range(num_shards):
        lo, hi = shard_range(len(ids), k, num_shards)
        shard_meta = dict(
            meta,
            shard_index=k,
            num_shards=num_shards,
            shard_start=lo,
            shard_stop=hi,
            total_images=len(ids),
        )
        d = root / f"shard{k}"
        _write(d, ids[lo:hi], vecs[lo:hi], meta=shard_meta, skip=skip)
        dirs.append(d)
    return dirs


def test_merge_shards_equals_unsharded(tmp_path):
    ids, vecs = _ids(11), _vectors(11)
    skip = {ids[1], ids[9]}
    whole = dict(META, shard_index=0, num_shards=1, shard_start=0, shard_stop=11, total_images=11)
    ref_desc, ref_ids, ref_meta = _write(tmp_path / "whole", ids, vecs, meta=whole, skip=skip)
    dirs = _write_shards(tmp_path, ids, vecs, 3, skip=skip)
    merge_shards(list(reversed(dirs)), tmp_path / "merged")  # joined in shard_index order
    desc, out_ids, meta = load_store(tmp_path / "merged")
    assert out_ids == ref_ids
    np.testing.assert_array_equal(desc, ref_desc)
    assert (
        DescriptorStore(tmp_path / "merged").skipped()
        == DescriptorStore(tmp_path / "whole").skipped()
    )
    check_compatible(meta, ref_meta)
    for key in ("num_images", "num_skipped", "num_shards", "total_images", "shard_stop"):
        assert meta[key] == ref_meta[key]
    with pytest.raises(FileExistsError):
        merge_shards(dirs, tmp_path / "merged")
    merge_shards(dirs, tmp_path / "merged", overwrite=True)


def test_merge_shards_refuses_bad_inputs(tmp_path):
    ids, vecs = _ids(9), _vectors(9)
    dirs = _write_shards(tmp_path / "a", ids, vecs, 3)
    with pytest.raises(StoreMismatchError, match="shard 2 of 3 missing: got shards"):
        merge_shards(dirs[:2], tmp_path / "m1")
    other = _write_shards(tmp_path / "b", ids, vecs, 3, meta=dict(META, pooling="mac"))
    with pytest.raises(StoreMismatchError, match="pooling"):
        merge_shards([dirs[0], other[1], dirs[2]], tmp_path / "m2")
    # The same images in two shards (shard fields absent: joined in the given order).
    plain = [tmp_path / "p0", tmp_path / "p1"]
    _write(plain[0], ids[:5], vecs[:5])
    _write(plain[1], ids[4:], vecs[4:])
    with pytest.raises(StoreMismatchError, match="img/004.jpg.*more than one shard"):
        merge_shards(plain, tmp_path / "m3")
    with StoreWriter(DescriptorStore(tmp_path / "inc"), ids[:2], META, flush_every=1) as w:
        w.add(ids[0], vecs[0])
    with pytest.raises(StoreIncompleteError):
        merge_shards([plain[0], tmp_path / "inc"], tmp_path / "m4")
    assert not DescriptorStore(tmp_path / "m4").is_complete


def test_merge_shards_says_which_shard_is_missing_or_doubled(tmp_path):
    """Issue 14: 'expected shards 0..0 of 1, got shard indices [0] of num_shards [2]'."""
    ids, vecs = _ids(8), _vectors(8)
    halves = _write_shards(tmp_path / "two", ids, vecs, 2)
    with pytest.raises(StoreMismatchError) as e:
        merge_shards(halves[:1], tmp_path / "m")
    assert str(e.value).startswith("shard 1 of 2 missing: got shards [0] (")
    assert str(halves[0]) in str(e.value)
    with pytest.raises(StoreMismatchError, match="shards \\[1, 2\\] of 4 missing"):
        merge_shards(_write_shards(tmp_path / "four", ids, vecs, 4)[::3], tmp_path / "m")
    with pytest.raises(StoreMismatchError, match="shard 0 is given more than once"):
        merge_shards([halves[0], halves[0], halves[1]], tmp_path / "m")
    thirds = _write_shards(tmp_path / "three", ids, vecs, 3)
    with pytest.raises(StoreMismatchError, match="different splits \\(num_shards .*: 2, .*: 3"):
        merge_shards([halves[0], thirds[1]], tmp_path / "m")
    assert not DescriptorStore(tmp_path / "m").is_complete


def test_write_store_places_row_blocks_and_its_journal_survives_a_crash(tmp_path, monkeypatch):
    vecs = _vectors(7)
    ids = _ids(7)
    # Blocks in any order land at their rows; (array, rows) sources take the chosen rows.
    blocks = list(st.stacked_blocks([(vecs, np.array([0, 1, 2])), vecs[3:]], block_rows=2))
    assert [row for row, _ in blocks] == [0, 2, 3, 5]
    st.write_store(tmp_path / "s", ids, blocks[::-1], dim=8, skipped=[("x", "bad")], meta=META)
    desc, out_ids, meta = load_store(tmp_path / "s")
    np.testing.assert_array_equal(desc, vecs)
    assert out_ids == ids and meta["num_skipped"] == 1 and meta["backbone"] == "mobilenet"
    assert DescriptorStore(tmp_path / "s").skipped() == [("x", "bad")]

    # A staged rewrite killed before its renames keeps the old store until recovered.
    def power_cut(directory):
        raise OSError("power cut")

    monkeypatch.setattr(st, "finish_commit", power_cut)
    new = [(0, vecs[:2])]
    staged = st.stage_folder(tmp_path / "s")
    st.write_store(staged, ids[:2], new, dim=8, skipped=[], meta=META, commit=2)
    with pytest.raises(OSError, match="power cut"):
        st.commit_staged(tmp_path / "s")
    monkeypatch.undo()
    assert os.path.isfile(tmp_path / "s" / st.COMMIT_FILE)
    # While its writer lives (holds the lock) a reader waits, then says so; it touches nothing.
    with folder_lock(tmp_path / "s"):
        with pytest.raises(st.StoreBusyError, match="is being updated .* within 0.2 s"):
            DescriptorStore(tmp_path / "s").load(wait=0.2)
        assert os.path.isfile(tmp_path / "s" / st.COMMIT_FILE)
        assert os.listdir(tmp_path / "s" / st.STAGED_DIR)
        assert st.recover(tmp_path / "s") is True  # the lock holder completes it
    desc, out_ids, _ = load_store(tmp_path / "s")
    assert out_ids == ids[:2] and not os.path.exists(tmp_path / "s" / st.COMMIT_FILE)
    np.testing.assert_array_equal(desc, vecs[:2])
    assert st.committed_id(tmp_path / "s") == 2
    assert sorted(os.listdir(tmp_path / "s")) == sorted(st.STORE_FILES)  # the lock file went too
    # A journal damaged on disk still completes from what is left in staged/.
    staged = st.stage_folder(tmp_path / "s")
    st.write_store(staged, ids[:3], [(0, vecs[:3])], dim=8, skipped=[], meta=META, commit=3)
    monkeypatch.setattr(st, "finish_commit", power_cut)
    with pytest.raises(OSError, match="power cut"):
        st.commit_staged(tmp_path / "s")
    monkeypatch.undo()
    (tmp_path / "s" / st.COMMIT_FILE).write_text('{"staged": "sta')
    with folder_lock(tmp_path / "s"):
        assert st.recover(tmp_path / "s") is True
    assert load_store(tmp_path / "s")[1] == ids[:3] and st.committed_id(tmp_path / "s") == 3
