"""prepare_dataset: download, resume, extract, place by hand, mark complete (local server)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import sys
import tarfile
import zipfile

import pytest
from conftest import RPARIS_SHA
from file_server import RangeServer, no_network_opener, offline_opener

from cbir_tf.data import revisited
from cbir_tf.data.download import (
    COMPLETE_MARKER,
    ChecksumError,
    DatasetUnavailableError,
    file_sha256,
    read_complete_marker,
)
from cbir_tf.data.prepare import prepare_dataset
from cbir_tf.data.revisited import (
    BenchmarkDataset,
    DatasetSpec,
    ImageListMismatchError,
    RemoteFile,
)
from cbir_tf.data.synthetic import make_synthetic_benchmark


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small synthetic 'roxford5k' and its files as a server would publish them."""
    root = tmp_path_factory.mktemp("src")
    folder = make_synthetic_benchmark(
        root, name="roxford5k", num_landmarks=3, images_per_landmark=4, distractors=4, seed=3
    )
    jpgs = sorted(os.listdir(os.path.join(folder, "jpg")))
    half = len(jpgs) // 2
    # Archive 1: a .tgz nested per landmark (as the Paris archives); archive 2: a zip.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for n in jpgs[:half]:
            tf.add(os.path.join(folder, "jpg", n), arcname=f"oxbuild/{n.split('_')[0]}/{n}")
    tgz = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in jpgs[half:]:
            zf.write(os.path.join(folder, "jpg", n), arcname=f"more/{n}")
    files = {
        "/gnd_roxford5k.pkl": open(os.path.join(folder, "gnd_roxford5k.pkl"), "rb").read(),
        "/gnd_oxford5k.pkl": open(os.path.join(folder, "gnd_roxford5k_original.pkl"), "rb").read(),
        "/a1.tgz": tgz,
        "/a2.zip": buf.getvalue(),
    }
    return folder, jpgs, files


@pytest.fixture
def served(source, monkeypatch):
    folder, jpgs, files = source
    server = RangeServer(dict(files))
    spec = DatasetSpec(
        name="roxford5k",
        title="Revisited Oxford5k",
        gnd=RemoteFile(
            "gnd_roxford5k.pkl",
            server.url("/gnd_roxford5k.pkl"),
            hashlib.sha256(files["/gnd_roxford5k.pkl"]).hexdigest(),
        ),
        archives=(
            RemoteFile("a1.tgz", server.url("/a1.tgz")),
            RemoteFile("a2.zip", server.url("/a2.zip")),
        ),
        original_gnd=RemoteFile("gnd_oxford5k.pkl", server.url("/gnd_oxford5k.pkl")),
    )
    monkeypatch.setitem(revisited.DATASETS, "roxford5k", spec)
    yield server, folder, jpgs
    server.close()


def test_prepare_downloads_extracts_and_marks_complete(served, tmp_path):
    server, src, jpgs = served
    ds = prepare_dataset("oxford5k", tmp_path, progress=False)
    folder = tmp_path / "datasets" / "roxford5k"
    assert ds.name == "roxford5k" and ds.root == str(folder)
    assert sorted(os.listdir(folder / "jpg")) == jpgs  # flattened, nothing else
    for n in jpgs[:: max(1, len(jpgs) // 5)]:
        assert (folder / "jpg" / n).read_bytes() == open(os.path.join(src, "jpg", n), "rb").read()
    assert ds.has_original and len(ds.original_gnd) == 2  # last landmark's query not covered
    assert sorted(os.listdir(folder)) == [
        COMPLETE_MARKER,
        "gnd_oxford5k.pkl",
        "gnd_roxford5k.pkl",
        "jpg",
    ]
    marker = read_complete_marker(folder)
    assert marker["dataset"] == "roxford5k" and marker["num_images"] == ds.num_images
    assert marker["files"]["gnd_roxford5k.pkl"]["sha256"] == file_sha256(
        folder / "gnd_roxford5k.pkl"
    )
    assert marker["files"]["gnd_roxford5k.pkl"]["sha256_pinned"] is True
    assert [a["filename"] for a in marker["archives"]] == ["a1.tgz", "a2.zip"]
    assert sorted(server.paths()) == [
        "/a1.tgz",
        "/a2.zip",
        "/gnd_oxford5k.pkl",
        "/gnd_roxford5k.pkl",
    ]

    # Complete: the next call uses it as is, without any network access.
    n_requests = len(server.requests)
    again = prepare_dataset("roxford5k", tmp_path, progress=False, opener=no_network_opener)
    assert again.imlist == ds.imlist and len(server.requests) == n_requests


def test_prepare_interrupted_then_resumed(served, tmp_path):
    server, _, jpgs = served
    size = len(server.files["/a2.zip"])
    server.die_after["/a2.zip"] = size // 3
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("roxford5k", tmp_path, progress=False, retries=0)
    folder = tmp_path / "datasets" / "roxford5k"
    msg = str(exc.value)
    assert "a2.zip" in msg and "resumes" in msg
    assert not (folder / COMPLETE_MARKER).exists(), "an interrupted prepare must not look done"
    assert (folder / "downloads" / "a2.zip.part").stat().st_size == size // 3
    with pytest.raises(ImageListMismatchError):
        BenchmarkDataset("roxford5k", folder)

    ds = prepare_dataset("roxford5k", tmp_path, progress=False, retries=0)
    assert server.requests[-1] == ("/a2.zip", f"bytes={size // 3}-")
    assert server.paths().count("/a1.tgz") == 1, "an extracted archive is not fetched again"
    assert sorted(os.listdir(folder / "jpg")) == jpgs and ds.num_images > 0
    assert read_complete_marker(folder) is not None
    assert not (folder / "downloads").exists() and not (folder / "_extracting").exists()


def test_prepare_refuses_a_hostile_archive(served, tmp_path):
    server, _, _ = served
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../../../escaped.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    server.files["/a1.tgz"] = buf.getvalue()
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("roxford5k", tmp_path, progress=False, retries=0)
    msg = str(exc.value)
    assert "'../../../escaped.jpg'" in msg and "the archive was deleted" in msg
    folder = tmp_path / "datasets" / "roxford5k"
    assert not (folder / "downloads" / "a1.tgz").exists()
    assert not (folder / COMPLETE_MARKER).exists()
    assert not list(tmp_path.rglob("escaped.jpg"))


def test_prepare_offline_names_every_file_and_place(tmp_path):
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("paris6k", tmp_path, progress=False, opener=offline_opener)
    msg = str(exc.value)
    folder = tmp_path / "datasets" / "rparis6k"
    assert "Temporary failure in name resolution" in msg
    assert str(folder / "gnd_rparis6k.pkl") in msg
    assert "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl" in msg
    assert RPARIS_SHA in msg
    for a in ("paris_1-v1.tgz", "paris_2-v1.tgz"):
        assert str(folder / "downloads" / a) in msg
        assert f"https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/{a}" in msg
    assert str(folder / "jpg") in msg and "gnd_paris6k.pkl" in msg
    assert "Traceback" not in msg
    assert not (folder / COMPLETE_MARKER).exists()


def test_prepare_without_download_never_touches_the_network(tmp_path, real_gnd_path):
    with pytest.raises(DatasetUnavailableError, match="download=False") as exc:
        prepare_dataset("rparis6k", tmp_path, download=False, opener=no_network_opener)
    assert "gnd_rparis6k.pkl" in str(exc.value)
    # With the ground truth placed by hand only the archives are asked for.
    folder = tmp_path / "datasets" / "rparis6k"
    shutil.copy(real_gnd_path, folder / "gnd_rparis6k.pkl")
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("rparis6k", tmp_path, download=False, opener=no_network_opener)
    msg = str(exc.value)
    assert str(folder / "downloads" / "paris_1-v1.tgz") in msg
    assert "from http://cmp.felk.cvut.cz/revisitop" not in msg  # the gnd is there already


def test_prepare_accepts_files_placed_by_hand(tmp_path, rparis_folder):
    ds = prepare_dataset("paris6k", tmp_path / "data", download=False, opener=no_network_opener)
    assert ds.num_images == 6322
    marker = read_complete_marker(tmp_path / "data" / "datasets" / "rparis6k")
    assert marker["files"]["gnd_rparis6k.pkl"]["sha256"] == RPARIS_SHA


def test_prepare_accepts_archives_placed_by_hand(served, tmp_path):
    server, _, jpgs = served
    downloads = tmp_path / "datasets" / "roxford5k" / "downloads"
    downloads.mkdir(parents=True)
    for name in ("a1.tgz", "a2.zip"):
        (downloads / name).write_bytes(server.files["/" + name])
    (downloads.parent / "gnd_roxford5k.pkl").write_bytes(server.files["/gnd_roxford5k.pkl"])
    ds = prepare_dataset("roxford5k", tmp_path, download=False, opener=no_network_opener)
    assert sorted(os.listdir(ds.image_dir)) == jpgs
    assert not ds.has_original  # optional file, not placed: fine
    assert server.requests == []


def test_prepare_ground_truth_only(served, tmp_path):
    server, _, _ = served
    ds = prepare_dataset("roxford5k", tmp_path, progress=False, images=False)
    assert ds.num_queries == 3 and ds.has_original
    assert "/a1.tgz" not in server.paths() and "/a2.zip" not in server.paths()
    assert read_complete_marker(ds.root) is None  # images not there: not complete


def test_complete_marker_is_not_trusted_blindly(served, tmp_path):
    server, _, _ = served
    ds = prepare_dataset("roxford5k", tmp_path, progress=False)
    folder = tmp_path / "datasets" / "roxford5k"
    # An image deleted after completion: the folder is repaired, not used as is.
    os.unlink(ds.image_paths()[0])
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        prepare_dataset("roxford5k", tmp_path, download=False, opener=no_network_opener)
    assert read_complete_marker(folder) is None
    prepare_dataset("roxford5k", tmp_path, progress=False)
    assert os.path.exists(ds.image_paths()[0]) and read_complete_marker(folder) is not None
    # A ground-truth file replaced after completion: the pinned hash catches it.
    with open(folder / "gnd_roxford5k.pkl", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="delete it"):
        prepare_dataset("roxford5k", tmp_path, download=False)


def test_prepare_refuses_a_ground_truth_with_the_wrong_hash(tmp_path, source):
    folder = tmp_path / "datasets" / "rparis6k"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(source[0], "gnd_roxford5k.pkl"), folder / "gnd_rparis6k.pkl")
    with pytest.raises(ChecksumError, match=RPARIS_SHA):
        prepare_dataset("rparis6k", tmp_path, download=False)


def test_prepare_demo_generates_once(tmp_path):
    ds = prepare_dataset("demo", tmp_path, opener=no_network_opener)
    assert ds.name == "demo" and ds.num_images == 48 and ds.num_queries == 6 and ds.has_original
    first = os.stat(ds.image_paths()[0]).st_mtime_ns
    again = prepare_dataset("demo", tmp_path)
    assert os.stat(again.image_paths()[0]).st_mtime_ns == first, "regenerated needlessly"
    os.unlink(os.path.join(ds.root, COMPLETE_MARKER))  # as if killed before the end
    prepare_dataset("demo", tmp_path)
    assert read_complete_marker(ds.root) is not None


def test_prepare_is_locked_against_a_concurrent_writer(tmp_path):
    from cbir_tf import fileio as cio

    folder = tmp_path / "datasets" / "demo"
    code = (
        "import sys, time; from cbir_tf import fileio as cio\n"
        f"with cio.folder_lock({str(folder)!r}):\n"
        "    print('locked', flush=True); time.sleep(30)\n"
    )
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(cio.LockError, match="another process"):
            prepare_dataset("demo", tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert prepare_dataset("demo", tmp_path).num_queries == 6


def test_unpinned_ground_truth_is_said_to_be_unverified(served, tmp_path, monkeypatch, caplog):
    """gnd_roxford5k.pkl has no published sha256: downloads and instructions say so."""
    spec = revisited.DATASETS["roxford5k"]
    monkeypatch.setitem(
        revisited.DATASETS,
        "roxford5k",
        dataclasses.replace(spec, gnd=dataclasses.replace(spec.gnd, sha256=None)),
    )
    with caplog.at_level("WARNING"):
        prepare_dataset("roxford5k", tmp_path / "a", progress=False, images=False)
    assert "gnd_roxford5k.pkl: downloaded, unverified: no published sha256" in caplog.text
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("roxford5k", tmp_path / "b", progress=False, opener=offline_opener)
    assert "gnd_roxford5k.pkl (unverified: no published sha256" in str(exc.value)
