"""Distractor downloads (R1M-shaped archives from a local server) and own benchmark folders."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from file_server import RangeServer, no_network_opener, offline_opener

from cbir_tf.data import distractors
from cbir_tf.data.archive import UnsafeArchiveError
from cbir_tf.data.download import COMPLETE_MARKER, DatasetUnavailableError, read_complete_marker
from cbir_tf.data.ground_truth import GroundTruthError
from cbir_tf.data.own import open_folder
from cbir_tf.data.revisited import ImageListMismatchError, RemoteFile


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.fixture
def r1m(monkeypatch):
    """A revisitop1m-shaped set: an image list and 3 archives of nested jpgs, served locally."""
    names = [f"{a}/{b}/img{a}{b}{i}.jpg" for a in "xy" for b in "pq" for i in range(3)]
    bodies = {n: os.urandom(3000) + n.encode() for n in names}  # incompressible: partial reads
    parts = [names[0:4], names[4:8], names[8:]]
    files = {"/r/revisitop1m.txt": ("\n".join(names) + "\n").encode()}
    for i, part in enumerate(parts, 1):
        files[f"/r/jpg/revisitop1m.{i}.tar.gz"] = _tgz({n: bodies[n] for n in part})
    server = RangeServer(files)
    spec = distractors.DistractorSpec(
        name="revisitop1m",
        title="Revisited 1M distractors",
        image_list=RemoteFile("revisitop1m.txt", server.url("/r/revisitop1m.txt")),
        archives=tuple(
            RemoteFile(f"revisitop1m.{i}.tar.gz", server.url(f"/r/jpg/revisitop1m.{i}.tar.gz"))
            for i in (1, 2, 3)
        ),
        num_images=len(names),
    )
    monkeypatch.setitem(distractors.SPECS, "r1m", spec)
    yield server, names, bodies
    server.close()


def test_r1m_download_resumes_mid_archive_and_counts_no_partial_set(r1m, tmp_path):
    server, names, bodies = r1m
    folder = tmp_path / "datasets" / "revisitop1m"
    second = "/r/jpg/revisitop1m.2.tar.gz"
    server.die_after[second] = len(server.files[second]) // 2
    with pytest.raises(DatasetUnavailableError, match="revisitop1m.2.tar.gz"):
        distractors.open_distractors("r1m", tmp_path, progress=False, retries=0)
    # Archive 1 is unpacked (its record kept, the archive deleted); archive 2 is half there.
    downloads = folder / "downloads"
    assert (downloads / "revisitop1m.1.tar.gz.extracted").is_file()
    assert not (downloads / "revisitop1m.1.tar.gz").exists()
    assert (downloads / "revisitop1m.2.tar.gz.part").stat().st_size > 0
    assert read_complete_marker(folder) is None  # a partial set never counts

    before = len(server.requests)
    ds = distractors.open_distractors("r1m", tmp_path, progress=False)
    fetched = server.requests[before:]
    assert [p for p, _ in fetched] == [second, "/r/jpg/revisitop1m.3.tar.gz"]
    assert fetched[0][1] is not None and fetched[0][1].startswith("bytes=")  # resumed
    assert ds.ids == names and len(ds) == len(names)
    for n in names:  # sub-folders kept, as revisitop1m.txt names them
        assert (folder / "jpg" / n).read_bytes() == bodies[n]
    assert sorted(p.name for p in downloads.iterdir()) == [
        f"revisitop1m.{i}.tar.gz.extracted" for i in (1, 2, 3)
    ]  # every archive deleted once unpacked
    assert read_complete_marker(folder)["num_images"] == len(names)
    # Complete: used as is, without network access.
    again = distractors.open_distractors("r1m", tmp_path, progress=False, opener=no_network_opener)
    assert again.paths()[0] == str(folder / "jpg" / names[0])


def test_r1m_refuses_a_hostile_archive(r1m, tmp_path):
    server, _, _ = r1m
    server.files["/r/jpg/revisitop1m.2.tar.gz"] = _tgz({"../../evil.jpg": b"x"})
    with pytest.raises(UnsafeArchiveError, match="evil.jpg"):
        distractors.open_distractors("r1m", tmp_path, progress=False)
    folder = tmp_path / "datasets" / "revisitop1m"
    assert not (tmp_path / "evil.jpg").exists() and not (folder.parent / "evil.jpg").exists()
    assert not (folder / "downloads" / "revisitop1m.2.tar.gz").exists()
    assert not (folder / COMPLETE_MARKER).exists()


def test_r1m_offline_stops_at_once_listing_the_files_to_place(r1m, tmp_path):
    with pytest.raises(DatasetUnavailableError) as exc:
        distractors.open_distractors("r1m", tmp_path, progress=False, opener=offline_opener)
    msg = str(exc.value)
    folder = tmp_path / "datasets" / "revisitop1m"
    assert "Place these files by hand" in msg
    for f in (
        "revisitop1m.txt",
        "downloads/revisitop1m.1.tar.gz",
        "downloads/revisitop1m.3.tar.gz",
    ):
        assert str(folder / f) in msg
    assert "/r/jpg/revisitop1m.3.tar.gz" in msg  # where to get it


def test_evaluate_offline_names_the_dataset_and_distractor_files_before_any_work(r1m, tmp_path):
    """`evaluate.py --dataset=paris6k --distractors=r1m` without network: one error listing
    every file to place, for the benchmark and the distractors, before a model is built."""
    from cbir_tf import config as config_lib
    from cbir_tf.runs.evaluate import run_benchmark

    cfg = config_lib.default_config()
    cfg.data.dataset, cfg.data.distractors = "paris6k", "r1m"
    cfg.data.data_root = str(tmp_path)
    with pytest.raises(DatasetUnavailableError) as exc:
        run_benchmark(cfg, download=False, progress=False)
    msg = str(exc.value)
    assert str(tmp_path / "datasets" / "rparis6k" / "gnd_rparis6k.pkl") in msg
    assert str(tmp_path / "datasets" / "revisitop1m" / "revisitop1m.txt") in msg
    assert str(tmp_path / "datasets" / "revisitop1m" / "downloads" / "revisitop1m.3.tar.gz") in msg
    assert not (tmp_path / "runs").exists() and r1m[0].requests == []


def test_distractor_folder_and_unknown_names(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for n in ("a.jpg", "sub/b.png", "notes.txt"):
        (tmp_path / "d" / n).write_bytes(b"x")
    ds = distractors.open_distractors(str(tmp_path / "d"), tmp_path)
    assert ds.ids == ["a.jpg", "sub/b.png"] and ds.name.startswith("folder-d-")
    assert distractors.open_distractors("", tmp_path) is None
    with pytest.raises(ValueError, match="neither a known distractor set.*r1m"):
        distractors.open_distractors("r2m", tmp_path)


# -- own benchmark folders ---------------------------------------------------------------------


def _own(tmp_path, gnd, images=("a", "b", "c", "q1")):
    folder = tmp_path / "mine"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for n in images:
        (folder / "jpg" / f"{n}.jpg").write_bytes(b"x")
    (folder / "gnd.json").write_text(gnd if isinstance(gnd, str) else json.dumps(gnd))
    return folder


GOOD = {
    "imlist": ["a", "b", "c"],
    "qimlist": ["q1"],
    "gnd": [{"easy": [0], "hard": [2], "junk": [1], "bbx": [0, 0, 10, 10]}],
}


def test_own_benchmark_folder_with_gnd_json(tmp_path):
    ds = open_folder(_own(tmp_path, GOOD))
    assert ds.name == "mine" and ds.imlist == ["a", "b", "c"] and ds.qimlist == ["q1"]
    assert ds.gnd[0]["easy"] == [0] and ds.gnd[0]["hard"] == [2] and ds.ok_lists == 0
    ok = {**GOOD, "gnd": [{"ok": [0, 2], "bbx": None}]}
    ds = open_folder(_own(tmp_path, ok))
    assert ds.gnd[0]["easy"] == [0, 2] and ds.gnd[0]["hard"] == [] and ds.ok_lists == 1


@pytest.mark.parametrize(
    "gnd, message",
    [
        ("{not json", r"not valid JSON \(line 1"),
        ({"imlist": ["a"], "gnd": []}, "missing key.*qimlist"),
        ({**GOOD, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({**GOOD, "imlist": ["a", "b", "a"]}, "'imlist' lists 'a' twice"),
        ({**GOOD, "qimlist": ["q1", "q1"], "gnd": GOOD["gnd"] * 2}, "'qimlist' lists 'q1' twice"),
        ({**GOOD, "imlist": ["a.jpg", "b", "c"]}, "without extension"),
        ({**GOOD, "gnd": [{"easy": [0], "hard": [3]}]}, r"index 3, outside 0\.\.2"),
        ({**GOOD, "gnd": [{"easy": [0]}]}, "needs 'easy' and 'hard'"),
        ({**GOOD, "gnd": [{"ok": [0], "easy": [1]}]}, "either 'ok' or 'easy' and 'hard'"),
        ({**GOOD, "gnd": [{"eazy": [0], "hard": []}]}, r"unknown key\(s\) \['eazy'\]"),
        ({**GOOD, "gnd": []}, "one entry per query: 0 entries, 1 queries"),
        ({**GOOD, "gnd": [{"ok": [0], "bbx": [5, 5, 1, 1]}]}, "is empty"),
    ],
)
def test_malformed_gnd_json_gets_a_one_line_error(tmp_path, gnd, message):
    with pytest.raises(GroundTruthError, match=message) as exc:
        open_folder(_own(tmp_path, gnd))
    assert "\n" not in str(exc.value) and "gnd.json" in str(exc.value)


def test_own_benchmark_lists_missing_images_and_warns_on_queries_without_positives(
    tmp_path, caplog
):
    with pytest.raises(ImageListMismatchError, match=r"2 of the 4 images.*c\.jpg, q1\.jpg"):
        open_folder(_own(tmp_path, GOOD, images=("a", "b")))
    caplog.set_level("WARNING")
    open_folder(_own(tmp_path, {**GOOD, "gnd": [{"easy": [], "hard": [2]}]}))
    assert "1 of 1 queries have no positives under Easy" in caplog.text


def test_own_benchmark_without_ground_truth_says_what_to_write(tmp_path):
    (tmp_path / "empty" / "jpg").mkdir(parents=True)
    with pytest.raises(GroundTruthError, match="no ground truth: write .*gnd.json"):
        open_folder(tmp_path / "empty")


# -- end to end (TensorFlow: a random MobileNet at 64 px) ----------------------------------------


def _stores(root, kind):
    return sorted(p.parent for p in root.glob(f"descriptors/*/*/{kind}/COMPLETE"))


@pytest.mark.slow
def test_own_benchmark_with_a_distractor_folder_end_to_end(tmp_path, capsys):
    """gnd.json benchmark + a distractor folder: extract.py's run writes the stores, evaluate's
    reuses them; the plain row's mAP is the one computed by hand from the concatenated full
    ranking of those stores."""
    import pickle

    import numpy as np

    from cbir_tf import config as config_lib
    from cbir_tf.data.synthetic import make_synthetic_benchmark
    from cbir_tf.evaluate import metrics
    from cbir_tf.runs import extract as runs
    from cbir_tf.runs.evaluate import run_benchmark
    from cbir_tf.store import files as store

    folder = make_synthetic_benchmark(
        tmp_path / "src", name="mine", num_landmarks=3, images_per_landmark=4, distractors=3
    )
    with open(os.path.join(folder, "gnd_mine.pkl"), "rb") as f:
        gnd = pickle.load(f)
    for name in ("gnd_mine.pkl", "gnd_mine_original.pkl", COMPLETE_MARKER):
        os.unlink(os.path.join(folder, name))
    hand = {
        "imlist": list(gnd["imlist"]),
        "qimlist": list(gnd["qimlist"]),
        "gnd": [
            {k: [int(i) for i in g[k]] for k in ("easy", "hard", "junk")} | {"bbx": None}
            for g in gnd["gnd"]
        ],
    }
    with open(os.path.join(folder, "gnd.json"), "w") as f:
        json.dump(hand, f)
    other = make_synthetic_benchmark(tmp_path / "d", name="x", num_landmarks=3, seed=7)
    cfg = config_lib.load_config("demo")
    cfg.model.weights = "none"
    cfg.data.image_size = 64
    cfg.data.dataset = folder
    cfg.data.distractors = os.path.join(other, "jpg")
    cfg.whitening.kind = "pca"  # auto: none for a folder, said in the title
    cfg.workdir = str(tmp_path / "runs")
    cfg.eval.num_visualize = 1
    cfg.rerank.methods = ("plain", "aqe+diffusion")
    runs.extract_dataset(cfg, progress=False, download=False)  # what extract.py runs
    printed = capsys.readouterr().out
    assert "jpg distractors: " in printed and "descriptors in " in printed
    d_store = [p for p in _stores(tmp_path / "runs", "db") if "folder-jpg-" in str(p)]
    stamp = (d_store[0] / "descriptors.npy").stat().st_mtime_ns
    out = run_benchmark(cfg, progress=False, download=False)
    assert (d_store[0] / "descriptors.npy").stat().st_mtime_ns == stamp  # reused as it is
    title = out["table"].splitlines()[0]
    n_d = len(os.listdir(os.path.join(other, "jpg")))
    assert title.startswith(f"mine+jpg ({len(hand['imlist'])} images + {n_d} distractors, ")
    assert "whitening.dataset=auto: none for a benchmark folder" in title
    assert "diffusion truncated to each query's top 1000" in title

    runs = tmp_path / "runs"
    (db_dir,) = [p for p in _stores(runs, "db") if "folder-mine-" in str(p)]
    (d_dir,) = [p for p in _stores(runs, "db") if "folder-jpg-" in str(p)]
    x, x_ids, _ = store.load_store(db_dir)
    q, q_ids, _ = store.load_store(db_dir.parent / "queries")
    d, _, _ = store.load_store(d_dir)
    x = np.asarray(x)[[x_ids.index(n) for n in hand["imlist"]]]
    q = np.asarray(q)[[q_ids.index(n) for n in hand["qimlist"]]]
    ranks = np.argsort(-(q @ np.concatenate([x, np.asarray(d)]).T), axis=1, kind="stable")
    by_hand = metrics.compute_map(ranks, metrics.revisited_gnd(hand["gnd"], "medium"))[0]
    assert out["results"]["plain"]["revisited"]["medium"]["map"] == by_hand
    assert os.path.isfile(out["files"]["report"])

    # The same stores given as precomputed descriptors (as extract.py --out / --merge lays
    # them out): the same numbers, without the distractor images.
    import shutil

    given = tmp_path / "given"
    for part, src in (
        ("db", db_dir),
        ("queries", db_dir.parent / "queries"),
        ("distractors", d_dir),
    ):
        shutil.copytree(src, given / part)
    shutil.rmtree(os.path.join(other, "jpg"))
    again = run_benchmark(cfg, descriptors=str(given), progress=False, download=False)
    assert again["results"]["plain"]["revisited"]["medium"]["map"] == by_hand


def test_whitening_source_for_benchmark_folders(tmp_path):
    import ml_collections

    from cbir_tf.evaluate.benchmark import whitening_dataset

    def w(dataset, kind="pca"):
        return ml_collections.ConfigDict({"kind": kind, "dataset": dataset})

    assert whitening_dataset("rparis6k", w("auto")) == "roxford5k"
    assert whitening_dataset("mine", w("auto"), folder=True) is None  # said in the title
    assert whitening_dataset("mine", w("none"), folder=True) is None
    assert whitening_dataset("mine", w("paris6k"), folder=True) == "rparis6k"
    (tmp_path / "imgs").mkdir()
    assert whitening_dataset("mine", w(str(tmp_path / "imgs")), folder=True) == str(
        tmp_path / "imgs"
    )
    with pytest.raises(KeyError, match="unknown dataset 'nowhere'"):
        whitening_dataset("mine", w("nowhere"), folder=True)


def test_r1m_set_yields_a_distractor_store(r1m, tmp_path):
    """The downloaded set is described into its own store (a tiny network), unreadable files
    skipped and counted; a second run reuses the store as it is."""
    import keras
    import numpy as np
    from PIL import Image

    from cbir_tf import config as config_lib
    from cbir_tf.describe.layers import GeM, L2Normalization
    from cbir_tf.evaluate import benchmark
    from cbir_tf.store import files as store

    server, names, _ = r1m
    for i, part in enumerate([names[0:4], names[4:8], names[8:]], 1):
        bodies = {}
        for j, n in enumerate(part):
            buf = io.BytesIO()
            rgb = np.random.default_rng(j + 10 * i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(buf, format="JPEG")
            bodies[n] = buf.getvalue()
        bodies[part[0]] = b"not an image"  # one per archive: skipped, counted
        server.files[f"/r/jpg/revisitop1m.{i}.tar.gz"] = _tgz(bodies)
    dset = distractors.open_distractors("r1m", tmp_path, progress=False)
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    spec = benchmark.DescriptorSpec(model=config_lib.defaults("model"), image_size=32)
    where = benchmark.distractor_store("", str(tmp_path / "runs"), dset, "tiny-32px")
    info = benchmark.distractor_descriptors(
        dset, model, spec, {"model": "tiny"}, where, progress=False
    )
    assert info["images"] == len(names) - 3 and info["skipped"] == 3
    assert where == str(tmp_path / "runs" / "descriptors" / "revisitop1m" / "tiny-32px" / "db")
    d, ids, _ = store.load_store(where)
    assert d.shape == (len(names) - 3, 8) and ids == [n for n in names if n not in names[::4]]
    stamp = os.stat(os.path.join(where, "descriptors.npy")).st_mtime_ns
    benchmark.distractor_descriptors(dset, model, spec, {"model": "tiny"}, where, progress=False)
    assert os.stat(os.path.join(where, "descriptors.npy")).st_mtime_ns == stamp
    # Through Apache Beam (issue 17; the runner in-process): the same store and skips.
    from cbir_tf.beam import extract as beam_extract

    beam = beam_extract.BeamExtractor("--direct_running_mode=in_memory", shard_images=4)
    where_b = str(tmp_path / "beam" / "db")
    info_b = benchmark.distractor_descriptors(
        dset, model, spec, {"model": "tiny"}, where_b, progress=False, extract_fn=beam.extract
    )
    assert (info_b["images"], info_b["skipped"]) == (info["images"], info["skipped"])
    d_b, ids_b, _ = store.load_store(where_b)
    assert ids_b == ids and beam.last_metrics["shards_written"] == 3
    np.testing.assert_allclose(d_b, d, atol=1e-5)
    with open(os.path.join(where, "skipped.json"), encoding="utf-8") as a:
        with open(os.path.join(where_b, "skipped.json"), encoding="utf-8") as b:
            assert json.load(a) == json.load(b)


def test_own_benchmark_folder_with_a_revisitop_pickle(tmp_path):
    from cbir_tf.data.safe_pickle import UnsafePickleError
    from cbir_tf.data.synthetic import make_synthetic_benchmark

    folder = make_synthetic_benchmark(tmp_path, name="mine", num_landmarks=2, distractors=2)
    ds = open_folder(folder)
    assert ds.name == "mine" and ds.num_queries == 2 and ds.has_original
    os.unlink(os.path.join(folder, "gnd_mine.pkl"))
    touched = tmp_path / "ran"
    with open(os.path.join(folder, "gnd_mine.pkl"), "wb") as f:  # names os.system
        f.write(f"cos\nsystem\n(S'touch {touched}'\ntR.".encode())
    with pytest.raises(UnsafePickleError):
        open_folder(folder)
    assert not touched.exists()
