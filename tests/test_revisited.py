"""Benchmark datasets: names, the restricted unpickler, BenchmarkDataset, prepare_dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import socket
import sys
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
from file_server import RangeServer

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
    GroundTruthError,
    ImageListMismatchError,
    RemoteFile,
    UnsafePickleError,
    load_ground_truth,
    resolve_dataset_name,
)
from cbir_tf.data.synthetic import make_synthetic_benchmark

RPARIS_SHA = "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499"


@pytest.fixture(scope="module")
def real_gnd_path(golden_dir):
    return golden_dir / "gnd_rparis6k.pkl"


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
# The real ground truth and the restricted unpickler
# ----------------------------------------------------------------------------------------------


def test_real_rparis6k_ground_truth_loads(real_gnd_path):
    assert file_sha256(real_gnd_path) == RPARIS_SHA
    cfg = load_ground_truth(real_gnd_path)
    assert len(cfg["imlist"]) == 6322 and len(cfg["qimlist"]) == 70 and len(cfg["gnd"]) == 70
    assert not set(cfg["imlist"]) & set(cfg["qimlist"]), "queries are not in the database"
    # Identical to what an unrestricted load gives (the file is trusted here).
    with open(real_gnd_path, "rb") as f:
        assert cfg == pickle.load(f)
    for g in cfg["gnd"]:
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        assert len(g["bbx"]) == 4 and g["easy"] and g["hard"]
    assert revisited.validate_ground_truth(cfg) == "revisited"


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_pickles(target):
    cmd = f"touch {target}"
    return {
        "os.system-proto0": f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
        "posix.system-proto2": pickle.dumps(_Evil(os.system, cmd), protocol=2),
        "os.system-proto4": pickle.dumps(_Evil(os.system, cmd), protocol=4),
        "eval-proto5": pickle.dumps(_Evil(eval, f"__import__('os').system({cmd!r})"), protocol=5),
        "exec-nested-in-gnd": pickle.dumps(
            {
                "imlist": ["a"],
                "qimlist": [],
                "gnd": [],
                "x": [_Evil(exec, f"open({str(target)!r}, 'w')")],
            }
        ),
        "getattr": b"c__builtin__\ngetattr\n(c__builtin__\nopen\nS'write'\ntR.",
        "class-instance": pickle.dumps(
            {"imlist": [], "qimlist": [], "gnd": [], "obj": revisited.RemoteFile("a", "b")}
        ),
        "shutil.rmtree-proto0": pickle.dumps(_Evil(shutil.rmtree, str(target)), protocol=0),
    }


@pytest.mark.parametrize("case", sorted(_malicious_pickles("x")))
def test_malicious_pickle_is_refused_without_running(tmp_path, case):
    target = tmp_path / "pwned"
    data = _malicious_pickles(target)[case]
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError) as exc:
        load_ground_truth(path)
    msg = str(exc.value)
    assert str(path) in msg and "refusing to load" in msg
    assert not target.exists(), "the pickle's payload ran"


def test_the_crafted_pickle_really_is_malicious(tmp_path):
    """Guards the test above: unrestricted, the payload does run."""
    target = tmp_path / "pwned"
    pickle.loads(_malicious_pickles(target)["os.system-proto0"])
    assert target.exists()


def test_refusal_names_the_callable(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"asks for os\.system"):
        load_ground_truth(path)
    path.write_bytes(pickle.dumps(_Evil(print, "x"), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"asks for builtins\.print"):
        load_ground_truth(path)


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_arrays_load_exactly(tmp_path, protocol):
    """cnnimageretrieval-era files may hold numpy arrays: rebuilt from bytes, nothing called."""
    gnd = {
        "imlist": np.array(["a", "b", "c", "d"]),
        "qimlist": ["q0"],
        "gnd": [
            {
                "ok": np.array([0, 2], dtype=np.int64),
                "good": np.array([3], dtype=">i4"),
                "junk": np.array([], dtype=np.int32),
                "bbx": np.array([1.5, 2.0, 30.0, 40.25]),
                "f": np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
                "s": np.float32(2.5),
                "e": b"",
                "b": b"\x00\xff",
            }
        ],
    }
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    cfg = load_ground_truth(path, kind="original")
    g = cfg["gnd"][0]
    assert cfg["imlist"].tolist() == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(g["ok"], [0, 2])
    assert g["ok"].dtype == np.int64 and g["good"].dtype == np.dtype(">i4")
    np.testing.assert_array_equal(g["good"], [3])
    assert g["junk"].shape == (0,)
    np.testing.assert_array_equal(g["f"], np.arange(6).reshape(2, 3))
    assert g["s"] == np.float32(2.5) and isinstance(g["s"], np.float32)
    assert (g["e"], g["b"]) == (b"", b"\x00\xff")


@pytest.mark.parametrize(
    "value, match",
    [
        (np.array([1, "a"], dtype=object), "dtype 'O"),
        (np.zeros(2, dtype=[("a", "<i4")]), "dtype 'V"),
        (np.zeros(2, dtype="datetime64[s]"), "dtype 'M8"),
    ],
)
def test_unsafe_numpy_dtypes_are_refused(tmp_path, value, match):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [], "v": value}))
    with pytest.raises(UnsafePickleError, match=match) as exc:
        load_ground_truth(path)
    assert str(exc.value).startswith(f"{path}: refusing to load")


def test_admitted_globals_cannot_be_misused_or_tampered_with(tmp_path):
    path = tmp_path / "g.pkl"
    cases = {
        # BUILD on the stand-in of numpy.dtype would modify it for later loads.
        b"\x80\x02cnumpy\ndtype\n}b.": "tried to modify",
        # _reconstruct with arguments numpy never writes.
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nX\x01\x00\x00\x00a\x85R.": "never writes",
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nX\x01\x00\x00\x00aK\x00\x85C\x01b\x87R.": (
            "never writes"
        ),
        # numpy.ndarray itself is an inert token, not the class.
        b"\x80\x02cnumpy\nndarray\n)R.": "cannot be called",
        # bytes(n) would allocate n bytes.
        b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.": "only allowed",
        # _codecs.encode with another codec.
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.": "latin1",
    }
    for data, match in cases.items():
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError, match=match):
            load_ground_truth(path, validate=False)
    # Nothing was tampered with: numpy arrays still load.
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [], "v": np.ones(3)}))
    np.testing.assert_array_equal(load_ground_truth(path)["v"], np.ones(3))


def test_numpy_can_be_disallowed(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": np.array(["a"]), "qimlist": [], "gnd": []}))
    with pytest.raises(UnsafePickleError, match="numpy"):
        load_ground_truth(path, allow_numpy=False)


def _write_gnd(path, cfg, protocol=3):
    path.write_bytes(pickle.dumps(cfg, protocol=protocol))
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.pop("qimlist"), "missing key.*qimlist"),
        (lambda c: c["gnd"].pop(), "'gnd' has 1 entries but 'qimlist' has 2"),
        (
            lambda c: c["gnd"][1]["easy"].append(5),
            r"gnd\[1\]\['easy'\] holds index 5, outside 0..4",
        ),
        (lambda c: c["gnd"][0]["junk"].append(-1), "index -1"),
        (lambda c: c["gnd"][0]["hard"].append("2"), "not an index"),
        (lambda c: c["gnd"][0]["hard"].append(True), "not an index"),
        (lambda c: c["gnd"][0].pop("hard"), "lacks hard"),
        (lambda c: c["gnd"][0].update(bbx=[1, 2, 3]), "4 numbers"),
        (lambda c: c["gnd"][0].update(bbx=[5, 2, 3, 8]), "need x2 > x1"),
        (lambda c: c["gnd"][0].update(bbx=[1, 2, float("nan"), 8]), "non-finite"),
        (lambda c: c["imlist"].append("a"), "lists 'a' more than once"),
        (lambda c: c["imlist"].__setitem__(0, "../../etc/passwd"), "not a plain file name"),
        (lambda c: c.__setitem__("gnd", "x"), "'gnd' must be a list"),
    ],
)
def test_structure_errors_are_clear(tmp_path, mutate, match):
    cfg = {
        "imlist": ["a", "b", "c", "d", "e"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": [1, 2, 30.5, 40], "easy": [0], "hard": [1], "junk": [2]},
            {"bbx": [0, 0, 10, 10], "easy": [3], "hard": [], "junk": [4]},
        ],
    }
    mutate(cfg)
    with pytest.raises(GroundTruthError, match=match):
        load_ground_truth(_write_gnd(tmp_path / "g.pkl", cfg))


def test_truncated_or_non_pickle_files_give_ground_truth_errors(tmp_path, real_gnd_path):
    data = real_gnd_path.read_bytes()
    path = tmp_path / "g.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GroundTruthError, match="truncated"):
        load_ground_truth(path)
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(GroundTruthError, match="not a readable ground-truth pickle"):
        load_ground_truth(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ground_truth(tmp_path / "nope.pkl")


# ----------------------------------------------------------------------------------------------
# BenchmarkDataset
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rparis_jpg(tmp_path_factory, real_gnd_path):
    """Empty stand-ins for the 6392 images of rparis6k, made once (thousands of files)."""
    jpg = tmp_path_factory.mktemp("rparis_jpg")
    cfg = load_ground_truth(real_gnd_path)
    for n in [*cfg["imlist"], *cfg["qimlist"]]:
        (jpg / f"{n}.jpg").touch()
    return jpg


@pytest.fixture
def rparis_folder(tmp_path, real_gnd_path, rparis_jpg):
    """<tmp>/data/datasets/rparis6k with the real ground truth; jpg/ links to the stand-ins."""
    folder = tmp_path / "data" / "datasets" / "rparis6k"
    folder.mkdir(parents=True)
    shutil.copy(real_gnd_path, folder / "gnd_rparis6k.pkl")
    os.symlink(rparis_jpg, folder / "jpg")
    return folder, load_ground_truth(real_gnd_path)


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
    _write_gnd(
        folder / "gnd_paris6k.pkl", {"imlist": o_imlist, "qimlist": o_qimlist, "gnd": o_gnd}, 2
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


# ----------------------------------------------------------------------------------------------
# prepare_dataset
# ----------------------------------------------------------------------------------------------


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


def _offline(request, timeout):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def _no_network(request, timeout):
    raise AssertionError(f"unexpected network access: {request.full_url}")


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
        ".lock",
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
    again = prepare_dataset("roxford5k", tmp_path, progress=False, opener=_no_network)
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
        prepare_dataset("paris6k", tmp_path, progress=False, opener=_offline)
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
        prepare_dataset("rparis6k", tmp_path, download=False, opener=_no_network)
    assert "gnd_rparis6k.pkl" in str(exc.value)
    # With the ground truth placed by hand only the archives are asked for.
    folder = tmp_path / "datasets" / "rparis6k"
    shutil.copy(real_gnd_path, folder / "gnd_rparis6k.pkl")
    with pytest.raises(DatasetUnavailableError) as exc:
        prepare_dataset("rparis6k", tmp_path, download=False, opener=_no_network)
    msg = str(exc.value)
    assert str(folder / "downloads" / "paris_1-v1.tgz") in msg
    assert "from http://cmp.felk.cvut.cz/revisitop" not in msg  # the gnd is there already


def test_prepare_accepts_files_placed_by_hand(tmp_path, rparis_folder):
    ds = prepare_dataset("paris6k", tmp_path / "data", download=False, opener=_no_network)
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
    ds = prepare_dataset("roxford5k", tmp_path, download=False, opener=_no_network)
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
        prepare_dataset("roxford5k", tmp_path, download=False, opener=_no_network)
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
    ds = prepare_dataset("demo", tmp_path, opener=_no_network)
    assert ds.name == "demo" and ds.num_images == 48 and ds.num_queries == 6 and ds.has_original
    first = os.stat(ds.image_paths()[0]).st_mtime_ns
    again = prepare_dataset("demo", tmp_path)
    assert os.stat(again.image_paths()[0]).st_mtime_ns == first, "regenerated needlessly"
    os.unlink(os.path.join(ds.root, COMPLETE_MARKER))  # as if killed before the end
    prepare_dataset("demo", tmp_path)
    assert read_complete_marker(ds.root) is not None


def test_prepare_is_locked_against_a_concurrent_writer(tmp_path):
    from cbir_tf import io as cio

    folder = tmp_path / "datasets" / "demo"
    code = (
        "import sys, time; from cbir_tf import io as cio\n"
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
        prepare_dataset("roxford5k", tmp_path / "b", progress=False, opener=_offline)
    assert "gnd_roxford5k.pkl (unverified: no published sha256" in str(exc.value)
