"""Issue 7 end to end: bad images, interrupted runs, hostile files and wrong combinations.

The module tests (test_pipeline, test_store, test_descriptors, test_revisited, test_models,
test_diffusion) prove each guarantee inside its module; these tests prove them where a user meets
them: through `extract.py` / `evaluate.py` in a subprocess (exit status, the one-line error, what
is left on disk) and across modules (the pipeline's skips reaching the store and the summary, the
store's chunks surviving a SIGKILL of the command line, the solver's report reaching
results.json).

Subprocess runs share two module fixtures (one `evaluate.py` demo run, one uninterrupted
`extract.py` run over the bad-image corpus) to keep the file well under two minutes.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from png_bytes import bomb_png, raw_png

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
IMAGE_SIZE = 64


def _cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(script, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused run (exit 1, no traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


class _Payload:
    """Unpickling this runs `touch <marker>`: what a hostile download would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _hostile_pickle(marker: pathlib.Path) -> bytes:
    data = pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [_Payload(marker)]})
    # The payload is real: a plain pickle.loads runs it (then the evidence is removed).
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    return data


# ---------------------------------------------------------------------------------------------
# The bad-image corpus (issue 7 item 1), plus ordinary photos
# ---------------------------------------------------------------------------------------------

# Unreadable files and a word of the reason each must be skipped with.
BAD = {
    "zero.jpg": "empty",
    "truncated.jpg": "truncated",
    "random.jpg": "not an image",
    "notes.jpg": "not an image",
    "bomb.png": "decompression bomb",
}
ODD = (
    "alpha.png",
    "gray16.png",
    "rgb16.png",
    "gray.png",
    "cmyk.jpg",
    "palette.gif",
    "animated.gif",
    "upright.jpg",
    "exif6.jpg",
    "tiny.png",
    "tall.png",
)
NUM_NORMAL = 240  # enough that a SIGKILL lands part-way through the extraction


def _blocks(height: int, width: int, seed: int) -> np.ndarray:
    """RGB of constant 8x8 blocks: JPEG (quality 95, no chroma subsampling) keeps the pixels of
    its rotations exactly rotated, so EXIF orientation can be tested to float precision."""
    blocks = np.random.RandomState(seed).randint(0, 256, (height // 8, width // 8, 3))
    return np.kron(blocks.astype(np.uint8), np.ones((8, 8, 1), np.uint8))


def _write_corpus(d: pathlib.Path) -> None:
    d.mkdir(parents=True)
    photo = _blocks(64, 96, seed=1)
    (d / "zero.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(photo).save(jpeg, "JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "random.jpg").write_bytes(np.random.RandomState(0).bytes(4096))
    (d / "notes.jpg").write_text("this is a text file, not a photo\n" * 50)
    (d / "bomb.png").write_bytes(bomb_png())

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = photo[:40, :40]
    rgba[:, :20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(d / "gray16.png")
    rows = [b"\x00" + (photo[r].astype(">u2") * 257).tobytes() for r in range(photo.shape[0])]
    (d / "rgb16.png").write_bytes(raw_png(96, 64, 16, 2, rows))
    Image.fromarray(photo[..., 0], "L").save(d / "gray.png")
    Image.fromarray(photo).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    palette = Image.fromarray(np.random.RandomState(5).randint(0, 4, (30, 44)).astype(np.uint8))
    palette.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 250, 7, 7, 7])
    palette.save(d / "palette.gif")
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)

    upright = _blocks(32, 48, seed=2)
    Image.fromarray(upright).save(d / "upright.jpg", quality=95, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored turned counter-clockwise
    Image.fromarray(np.rot90(upright)).save(
        d / "exif6.jpg", quality=95, subsampling=0, exif=exif.tobytes()
    )
    Image.new("RGB", (1, 1), (12, 34, 56)).save(d / "tiny.png")
    Image.fromarray(np.full((4000, 8, 3), 77, np.uint8)).save(d / "tall.png")

    rng = np.random.default_rng(0)
    for k in range(NUM_NORMAL):
        small = rng.integers(0, 256, (5, 7, 3), np.uint8)
        Image.fromarray(small).resize((56, 40), Image.NEAREST).save(d / f"photo{k:03d}.png")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("corpus") / "images"
    _write_corpus(d)
    return d


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The demo's network (MobileNet 0.25 + R-MAC) with seeded He-initialised random kernels,
    saved once, so that every run (command line or in-process) uses the very same model.

    Not the ImageNet weights of ../shared: a user's clone has no ../shared, and every assertion
    here must decide the same way in both. Lively random kernels keep activations of order 1, so
    descriptors are unit rows and tell images apart (Keras's own random init makes them vanish).
    """
    import keras
    from lively import lively

    from cbir_tf.describe import models

    keras.utils.set_random_seed(0)
    model = lively(
        models.build_descriptor_model(
            backbone="mobilenet", alpha=0.25, weights="none", pooling="rmac"
        )
    )
    path = tmp_path_factory.mktemp("model") / "descriptor.keras"
    model.save(path)
    return path


def _extract_args(images: pathlib.Path, out: pathlib.Path, model: pathlib.Path) -> list[str]:
    return [
        f"--images={images}",
        f"--out={out}",
        "--config=configs/demo.py",
        f"--config.data.image_size={IMAGE_SIZE}",
        "--config.extract.flush_every=2",
        f"--model={model}",
    ]


@pytest.fixture(scope="module")
def clean_index(corpus, model_file, tmp_path_factory):
    """One uninterrupted `extract.py --images` run over the corpus."""
    out = tmp_path_factory.mktemp("clean") / "index"
    proc = _run("extract.py", *_extract_args(corpus, out, model_file))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc


def _read_index(out: pathlib.Path):
    from cbir_tf.store import files as store

    desc, ids, meta = store.load_store(out, mmap=False)
    skipped = json.loads((out / "skipped.json").read_text())
    return np.asarray(desc), ids, meta, skipped


@pytest.mark.slow
def test_bad_image_corpus_through_the_extract_command(corpus, clean_index, model_file):
    out, proc = clean_index
    everything = sorted(p.name for p in corpus.iterdir())
    desc, ids, meta, skipped = _read_index(out)

    # Exactly the unreadable files are skipped, each with its own reason, in the store...
    assert {s["id"] for s in skipped} == set(BAD)
    assert len(skipped) == len(BAD) == meta["num_skipped"]
    for s in skipped:
        assert BAD[s["id"]] in s["reason"].lower(), s
    # Refused from the header's size (PIL's open reads no pixel), not after a 2.7 GB decode.
    assert "900000000 pixels" in next(s["reason"] for s in skipped if s["id"] == "bomb.png")
    # ... and in the summary the run printed.
    assert f"{len(BAD)} of {len(everything)} skipped" in proc.stderr
    for name in BAD:
        assert f"skipped {name}: " in proc.stderr
    assert f"{len(everything) - len(BAD)} added" in proc.stderr
    assert f"{len(BAD)} unreadable" in proc.stderr

    # Every other file, odd ones included, has a finite unit descriptor.
    assert sorted(ids) == sorted(set(everything) - set(BAD))
    assert set(ODD) <= set(ids)
    assert desc.dtype == np.float32 and np.isfinite(desc).all()
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-4)

    # The EXIF-rotated photo is described as the upright one...
    row = {i: r for r, i in enumerate(ids)}
    np.testing.assert_allclose(desc[row["exif6.jpg"]], desc[row["upright.jpg"]], atol=1e-5)
    # ... and as the stored pixels turned upright by hand; a loader ignoring the EXIF tag would
    # describe the stored (turned) pixels, far from it (the test can fail).
    from cbir_tf.describe import models

    model = models.load_descriptor_model(model_file)
    stored = np.asarray(Image.open(corpus / "exif6.jpg").convert("RGB"), np.float32)
    turned_back = model(np.ascontiguousarray(np.rot90(stored, k=-1))[None]).numpy()[0]
    ignored_tag = model(stored[None]).numpy()[0]
    np.testing.assert_allclose(desc[row["exif6.jpg"]], turned_back, atol=1e-5)
    assert np.linalg.norm(ignored_tag - desc[row["exif6.jpg"]]) > 0.1


def test_library_extract_agrees_with_the_command_line(corpus, clean_index, model_file, tmp_path):
    from cbir_tf.describe import models
    from cbir_tf.describe.extract import extract
    from cbir_tf.store.writer import StoreSink

    out, _ = clean_index
    cli_desc, cli_ids, _, cli_skipped = _read_index(out)
    names = sorted(p.name for p in corpus.iterdir())
    model = models.load_descriptor_model(model_file)
    start = time.perf_counter()
    result = extract(
        model,
        [str(corpus / n) for n in names],
        ids=names,
        image_size=IMAGE_SIZE,
        sink=StoreSink(tmp_path / "store", 7),
        progress=False,
    )
    # 900 M pixels are never decoded: the bomb costs nothing (decoding it takes minutes).
    assert time.perf_counter() - start < 60
    assert [i for i, _ in result.skipped] == [n for n in names if n in BAD]
    assert [r for _, r in result.skipped] == [
        s["reason"] for s in sorted(cli_skipped, key=lambda s: names.index(s["id"]))
    ]
    assert result.ids == [n for n in names if n not in BAD] and sorted(cli_ids) == result.ids
    cli_rows = {i: r for r, i in enumerate(cli_ids)}
    np.testing.assert_allclose(
        np.asarray(result.descriptors), cli_desc[[cli_rows[i] for i in result.ids]], atol=1e-5
    )
    assert result.meta["num_skipped"] == len(BAD)


# ---------------------------------------------------------------------------------------------
# Interruption and concurrent writers (issue 7 item 2)
# ---------------------------------------------------------------------------------------------


def _chunks(folder: pathlib.Path) -> int:
    parts = folder / "pending" / "parts"
    try:
        return sum(n.endswith(".npz") and not n.startswith(".") for n in os.listdir(parts))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkilled_extract_command_resumes_to_the_uninterrupted_index(
    corpus, clean_index, model_file, tmp_path
):
    from cbir_tf.fileio import folder_lock
    from cbir_tf.store import files as store

    out = tmp_path / "index"
    args = _extract_args(corpus, out, model_file)
    proc = subprocess.Popen(
        _cmd("extract.py", *args),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and _chunks(out) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "extract.py finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = _chunks(out)
    # A killed run is never taken for a finished one.
    with pytest.raises(store.StoreIncompleteError):
        store.load_store(out)

    # A second writer is refused while the folder is locked, and touches nothing.
    with folder_lock(out, what="the test"):
        refused = _run("extract.py", *args)
    line = _one_line_error(refused)
    assert str(out) in line and "being written by another process" in line
    assert _chunks(out) == done_at_kill

    # Running the same command again resumes (the dead run's lock went with it) and finishes.
    again = _run("extract.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    resumed = re.search(r"resuming .*: (\d+) of (\d+) images already done", again.stderr)
    assert resumed and int(resumed.group(1)) >= 10, again.stderr[-3000:]
    # What happened, in the summary (issue 26 item 3): not "0 added, ... N unchanged".
    summary = re.search(r"index \S+: (\d+) added \((\d+) resumed from the interrupted run\), "
                        r"0 updated, 0 unchanged", again.stderr)  # fmt: skip
    assert summary, again.stderr[-3000:]
    assert int(summary.group(2)) == int(resumed.group(1))

    desc, ids, meta, skipped = _read_index(out)
    clean_desc, clean_ids, clean_meta, clean_skipped = _read_index(clean_index[0])
    assert ids == clean_ids
    np.testing.assert_array_equal(desc, clean_desc)
    assert skipped == clean_skipped
    assert meta["num_images"] == clean_meta["num_images"] and meta["dim"] == clean_meta["dim"]
    assert not (out / "pending").exists() and not (out / "pending.json").exists()


# ---------------------------------------------------------------------------------------------
# The synthetic benchmark run shared by the evaluate.py tests
# ---------------------------------------------------------------------------------------------

DEMO = [
    "--config=configs/demo.py",
    "--weights=none",  # never download in a test
    f"--config.data.image_size={IMAGE_SIZE}",
    "--config.rerank.diffusion.k=8",
    "--config.rerank.diffusion.max_iter=2",  # too few iterations: CG cannot converge
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    proc = _run("evaluate.py", *DEMO, f"--workdir={work}", f"--data_root={work / 'data'}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return work, proc


def _results(path: pathlib.Path) -> dict:
    return json.loads((path / "results.json").read_text())


@pytest.mark.slow
def test_diffusion_non_convergence_is_reported_in_the_results(demo_run):
    work, proc = demo_run
    results = _results(work / "eval" / "demo")
    num_queries = 6
    for method in ("diffusion", "aqe+diffusion"):
        info = results["methods"][method]["info"]["diffusion"]
        assert info["max_iter"] == 2 and info["tol"] == 1e-6
        assert info["converged"] == {"all": False, "count_false": num_queries}
        assert info["residuals"]["max"] > info["tol"] and info["iterations"]["max"] <= 2
    for method in ("plain", "aqe"):
        assert "diffusion" not in results["methods"][method]["info"]
    assert f"0/{num_queries} converged" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Hostile files (issue 7 item 3)
# ---------------------------------------------------------------------------------------------


def _roxford_gnd(num_images: int = 4993, num_queries: int = 70) -> dict:
    """A structurally valid Revisited Oxford ground truth (the registry's counts)."""
    imlist = [f"oxc1_image_{k:05d}" for k in range(num_images)]
    qimlist = [f"oxc1_query_{k:02d}" for k in range(num_queries)]
    gnd = [
        {"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [q], "hard": [q + 100], "junk": [q + 200]}
        for q in range(num_queries)
    ]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _evaluate_oxford_offline(tmp_path):
    """evaluate.py on the Oxford files placed under tmp_path/data, never downloading."""
    return _run(
        "evaluate.py",
        "--config=configs/demo.py",
        "--weights=none",
        "--dataset=oxford5k",
        f"--data_root={tmp_path / 'data'}",
        f"--workdir={tmp_path / 'work'}",
        "--nodownload",
    )


@pytest.mark.slow
def test_hostile_ground_truth_is_refused_by_evaluate(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "data" / "datasets" / "roxford5k"
    folder.mkdir(parents=True)
    # Revisited Oxford has no published hash to check: the unpickler alone must refuse it.
    (folder / "gnd_roxford5k.pkl").write_bytes(_hostile_pickle(marker))
    proc = _evaluate_oxford_offline(tmp_path)
    line = _one_line_error(proc)
    assert "gnd_roxford5k.pkl" in line and "refusing to load" in line and "system" in line
    assert not marker.exists()


@pytest.mark.slow
def test_tampered_demo_benchmark_is_regenerated_never_trusted(demo_run, tmp_path):
    """The demo is generated data: a demo folder whose files no longer match its COMPLETE
    marker (a replaced ground truth, deleted images) is generated again, so the hostile pickle
    is overwritten unread and the numbers are those of the genuine benchmark."""
    work, _ = demo_run
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    folder = data / "datasets" / "demo"
    originals = {p.name: p.read_bytes() for p in [folder / "gnd_demo.pkl", *folder.glob("jpg/*")]}
    marker = tmp_path / "pwned"
    (folder / "gnd_demo.pkl").write_bytes(_hostile_pickle(marker))
    deleted = sorted((folder / "jpg").iterdir())[:2]
    for p in deleted:
        p.unlink()
    proc = _run(
        "evaluate.py", *DEMO, f"--workdir={work}", f"--data_root={data}", f"--out={tmp_path / 'r'}"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not marker.exists()
    for p in [folder / "gnd_demo.pkl", *deleted]:
        assert p.read_bytes() == originals[p.name]
    assert _results(tmp_path / "r")["table"] == _results(work / "eval" / "demo")["table"]


def test_object_arrays_in_npy_and_npz_files_are_refused(tmp_path):
    from cbir_tf import fileio as cio
    from cbir_tf.describe import whitening
    from cbir_tf.store import files as store
    from cbir_tf.store.files import DescriptorStore
    from cbir_tf.store.writer import StoreWriter

    marker = tmp_path / "pwned"
    hostile = np.empty(2, dtype=object)
    hostile[0] = _Payload(marker)
    np.save(tmp_path / "hostile.npy", hostile, allow_pickle=True)
    np.savez(tmp_path / "hostile.npz", mean=hostile, projection=hostile, eigenvalues=hostile)
    np.load(tmp_path / "hostile.npy", allow_pickle=True)  # the payload is real
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match="allow_pickle"):
        cio.load_npy(tmp_path / "hostile.npy")
    with pytest.raises(ValueError, match="allow_pickle"):
        cio.load_npz(tmp_path / "hostile.npz")
    with pytest.raises(ValueError, match="allow_pickle"):
        whitening.Whitening.load(tmp_path / "hostile.npz")

    # A finished store whose descriptors.npy was swapped for an object array (its marker
    # updated to the new size, so only the loader stands in the way).
    s = tmp_path / "store"
    with StoreWriter(DescriptorStore(s), ["a", "b"], {"backbone": "x"}) as w:
        w.add("a", np.ones(4))
        w.add("b", np.ones(4))
        w.finalize()
    shutil.copyfile(tmp_path / "hostile.npy", s / "descriptors.npy")
    complete = json.loads((s / "COMPLETE").read_text())
    complete["descriptors_bytes"] = os.path.getsize(s / "descriptors.npy")
    complete["files"]["descriptors.npy"] = store.file_record(str(s / "descriptors.npy"))
    (s / "COMPLETE").write_text(json.dumps(complete))
    # Refused by the loader, and named as a damaged file of the store.
    with pytest.raises(store.StoreCorruptError, match="descriptors.npy is damaged .*allow_pickle"):
        store.load_store(s, mmap=False)
    with pytest.raises(store.StoreCorruptError, match="descriptors.npy is damaged .*Python obj"):
        store.load_store(s, mmap=True)
    assert not marker.exists()


@pytest.mark.slow
def test_lambda_model_is_refused_by_loader_and_evaluate(demo_run, tmp_path):
    import keras

    from cbir_tf.describe import models

    work, _ = demo_run
    marker = tmp_path / "pwned"
    # The Lambda's code writes the marker whenever it runs (it runs when a model is rebuilt).
    fn = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Lambda(fn)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    marker.unlink(missing_ok=True)

    with pytest.raises(models.UnsafeModelError, match="safe_mode"):
        models.load_descriptor_model(path)
    assert not marker.exists()
    proc = _run(
        "evaluate.py",
        *DEMO,
        f"--workdir={tmp_path / 'work'}",
        f"--data_root={work / 'data'}",
        f"--model={path}",
    )
    line = _one_line_error(proc)
    assert str(path) in line and "Lambda" in line and "safe_mode=False" in line
    assert not marker.exists()
    # The opt-in runs the stored code: what safe_mode protected against.
    models.load_descriptor_model(path, safe_mode=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Wrong combinations (issue 7 item 4)
# ---------------------------------------------------------------------------------------------


def _demo_store_root(work: pathlib.Path) -> pathlib.Path:
    roots = [p.parent.parent for p in (work / "descriptors" / "demo").glob("*/db/COMPLETE")]
    assert len(roots) == 1, roots
    return roots[0]


def _rewrite_store(src: pathlib.Path, dst: pathlib.Path, transform=None, **meta_changes) -> None:
    from cbir_tf.store import files as store
    from cbir_tf.store.files import DescriptorStore
    from cbir_tf.store.writer import StoreWriter

    desc, ids, meta = store.load_store(src)
    desc = np.asarray(desc) if transform is None else transform(np.asarray(desc))
    keep = {k: v for k, v in meta.items() if k not in ("num_images", "num_skipped", "dim")}
    keep.update(meta_changes)
    with StoreWriter(DescriptorStore(dst), ids, keep) as w:
        for i, v in zip(ids, desc, strict=True):
            w.add(i, v)
        w.finalize()


@pytest.mark.slow
def test_descriptors_of_other_settings_are_refused_by_evaluate(demo_run, tmp_path):
    work, _ = demo_run
    root = _demo_store_root(work)
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "db", mixed / "db")
    _rewrite_store(root / "queries", mixed / "queries", image_size=2 * IMAGE_SIZE)
    proc = _run(
        "evaluate.py",
        *DEMO,
        f"--workdir={tmp_path}",
        f"--data_root={work / 'data'}",
        f"--descriptors={mixed}",
    )
    line = _one_line_error(proc)
    assert "cannot be compared" in line
    assert f"image_size (first: {IMAGE_SIZE}, second: {2 * IMAGE_SIZE})" in line

    # Other dimensions (e.g. queries reduced by another whitening): named too.
    from cbir_tf.data import prepare
    from cbir_tf.evaluate.precomputed import load_precomputed

    shutil.rmtree(mixed / "queries")
    _rewrite_store(root / "queries", mixed / "queries", transform=lambda d: d[:, :32])
    ds = prepare.prepare_dataset("demo", work / "data", download=False)
    with pytest.raises(ValueError, match=r"dim \(first: \d+, second: 32\)"):
        load_precomputed(str(mixed), ds)


@pytest.mark.slow
def test_ground_truth_and_image_folder_mismatch_names_the_missing_files(tmp_path):
    folder = tmp_path / "data" / "datasets" / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    gnd = _roxford_gnd()
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=3))
    missing = {gnd["imlist"][17], gnd["qimlist"][3]}
    for name in gnd["imlist"] + gnd["qimlist"]:
        if name not in missing:
            (folder / "jpg" / f"{name}.jpg").write_bytes(b"")
    proc = _evaluate_oxford_offline(tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: " in proc.stderr
    assert f"2 of the {len(gnd['imlist']) + len(gnd['qimlist'])} images" in proc.stderr
    for name in missing:
        assert f"{name}.jpg" in proc.stderr
    assert not (folder / "COMPLETE").exists()


def test_whitening_learned_for_another_backbone_is_refused(demo_run):
    from cbir_tf import config as config_lib
    from cbir_tf.describe import models, whitening
    from cbir_tf.evaluate import benchmark

    work, _ = demo_run
    cfg = config_lib.load_config("demo")
    cfg.model.weights = "none"
    cfg.whitening.kind = "pca"  # off in the demo config
    cfg.whitening.dataset = "demo"
    cfg.data.image_size = IMAGE_SIZE
    cfg.data.data_root = str(work / "data")
    from cbir_tf.runs.extract import descriptor_spec, whitening_spec

    benchmark.learn_benchmark_whitening(
        descriptor_spec(cfg), whitening_spec(cfg), "demo", data_root=str(work / "data"),
        workdir=str(work), progress=False,
    )  # fmt: skip
    files = sorted((work / "whitening").glob("*.npz"))
    assert len(files) == 1, files
    w = whitening.Whitening.load(files[0])  # learned as a run would: MobileNet 0.25, R-MAC
    assert w.info["backbone"] == "mobilenet"
    kwargs = dict(weights="none", pooling="rmac", whitening=w, regional_whitening=True)
    with pytest.raises(ValueError, match="another backbone"):
        models.build_descriptor_model(backbone="mobilenet", alpha=0.5, **kwargs)
    # Same width, other network: refused by the name it was learned for.
    w.info["backbone"] = "mobilenetv2"
    with pytest.raises(ValueError, match="learned for backbone 'mobilenetv2'"):
        models.build_descriptor_model(backbone="mobilenet", alpha=0.25, **kwargs)
