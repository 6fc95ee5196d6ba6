"""The command-line entry points: --help, and end-to-end runs on the synthetic benchmark."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(args, cwd=ROOT, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", ["train.py", "extract.py", "evaluate.py", "search.py"])
def test_help(script):
    proc = _run([script, "--help"])
    # absl's --help prints the usage and exits with status 1 by design.
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--config" in proc.stdout or "--index" in proc.stdout, proc.stdout


def test_readme_opens_with_the_commands_ci_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert block[0].startswith('pip install -e ".[dev]"')
    assert block[1].startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 '^pip install'" in ci and "grep -m1 '^python -m pytest'" in ci


DEMO = [
    "--config=configs/demo.py",
    "--weights=none",  # never download in a test (the demo's offline fallback, taken at once)
    "--config.data.image_size=96",
    "--config.rerank.diffusion.k=8",  # numbers, not 'auto': their rows must differ from plain
    "--config.rerank.diffusion.kq=5",
    "--config.rerank.qe.n=2",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One evaluate.py run of the synthetic benchmark; later tests reuse its stores."""
    work = tmp_path_factory.mktemp("demo")
    proc = _run(["evaluate.py", *DEMO, f"--workdir={work}", f"--data_root={work / 'data'}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work, proc


@pytest.mark.slow
def test_evaluate_demo_end_to_end(demo_run):
    work, proc = demo_run
    for method in ("plain", "aqe", "diffusion", "aqe+diffusion"):
        assert re.search(rf"^{re.escape(method)}\s+\d+\.\d\d", proc.stdout, re.M), proc.stdout
    assert "demo" in proc.stdout.splitlines()[0]
    results = json.loads((work / "eval" / "demo" / "results.json").read_text())
    assert [r["method"] for r in results["table"]] == ["plain", "aqe", "diffusion", "aqe+diffusion"]
    assert all(0 <= r["mAP M"] <= 100 for r in results["table"])
    assert (work / "eval" / "demo" / "results.csv").exists()


def test_demo_descriptors_are_unit_vectors_and_its_rows_differ(demo_run):
    work, proc = demo_run
    # Issue 26 item 8: progress into a pipe is plain lines, not bar redraws joined by `\r` (which
    # text mode turns into line breaks: look for the bar itself, `  0%|   | 0/48`).
    assert "descriptors -> " in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r"\d%\|", proc.stderr), proc.stderr[-3000:]
    assert re.search(r"descriptors -> \S+: 48/48 img \(100%\), ", proc.stderr), proc.stderr[-3000:]
    title = proc.stdout.splitlines()[0]
    assert "mobilenet (random weights)" in title and "vanishing activations" in title, title
    assert "re-ranking: α-QE n=2, diffusion k=8 kq=5" in title, title  # as given: no stars
    stores = sorted((work / "descriptors" / "demo").glob("*/*/descriptors.npy"))
    assert [p.parent.name for p in stores] == ["db", "queries"]
    x, q = (np.load(p) for p in stores)
    for d in (x, q):
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # Ranking by inner product is ranking by cosine.
    raw = q @ x.T
    cos = raw / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1))
    np.testing.assert_array_equal(np.argsort(-raw, 1, "stable"), np.argsort(-cos, 1, "stable"))
    table = json.loads((work / "eval" / "demo" / "results.json").read_text())["table"]
    rows = {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in table}
    assert rows["aqe"] != rows["plain"] and rows["diffusion"] != rows["plain"], rows


@pytest.mark.slow
def test_evaluate_precomputed_store_and_mat_give_the_same_table(demo_run, tmp_path):
    work, proc = demo_run
    stores = [p.parent.parent for p in (work / "descriptors" / "demo").glob("*/db/descriptors.npy")]
    assert len(stores) == 1
    root = stores[0]
    args = [*DEMO, f"--workdir={work}", f"--data_root={work / 'data'}"]
    p1 = _run(["evaluate.py", *args, f"--descriptors={root}", f"--out={tmp_path / 'a'}"])
    assert p1.returncode == 0, p1.stderr

    import scipy.io

    from cbir_tf.store import files as store

    x, x_ids, _ = store.load_store(root / "db")
    q, q_ids, _ = store.load_store(root / "queries")
    scipy.io.savemat(tmp_path / "feats.mat", {"X": np.asarray(x).T, "Q": np.asarray(q).T})
    p2 = _run(
        ["evaluate.py", *args, f"--descriptors={tmp_path / 'feats.mat'}", f"--out={tmp_path / 'b'}"]
    )
    assert p2.returncode == 0, p2.stderr
    a = json.loads((tmp_path / "a" / "results.json").read_text())["table"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["table"]
    assert a == b
    # The precomputed descriptors are those of the end-to-end run: same numbers again.
    c = json.loads((work / "eval" / "demo" / "results.json").read_text())["table"]
    assert a == c


@pytest.mark.slow
def test_evaluate_refuses_missing_descriptor_folder(tmp_path):
    proc = _run(
        [
            "evaluate.py",
            *DEMO,
            f"--workdir={tmp_path}",
            f"--data_root={tmp_path}",
            f"--descriptors={tmp_path / 'nope'}",
        ]
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "db/" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluate_with_a_saved_keras_model(demo_run, tmp_path):
    from cbir_tf.describe import models

    work, _ = demo_run
    path = tmp_path / "model.keras"
    models.build_descriptor_model(
        backbone="mobilenet", weights="none", alpha=0.25, pooling="gem"
    ).save(path)
    proc = _run(
        [
            "evaluate.py",
            *DEMO,
            f"--workdir={tmp_path}",
            f"--data_root={work / 'data'}",
            f"--model={path}",
            "--config.rerank.methods=('plain',)",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert f"saved model {path}" in proc.stdout
    results = json.loads((tmp_path / "eval" / "demo" / "results.json").read_text())
    assert [r["method"] for r in results["table"]] == ["plain"]
    assert results["descriptors"]["weights"] == str(path)


@pytest.mark.slow
def test_extract_demo_in_two_shards_then_merge_equals_one_run(demo_run, tmp_path):
    from cbir_tf.store import files as store

    work, _ = demo_run
    common = [*DEMO, f"--workdir={tmp_path}", f"--data_root={work / 'data'}"]
    for i in range(2):
        proc = _run(
            [
                "extract.py",
                *common,
                f"--out={tmp_path / f'shard{i}'}",
                f"--shard_index={i}",
                "--num_shards=2",
            ]
        )
        assert proc.returncode == 0, proc.stderr
        assert "demo database: " in proc.stdout and str(tmp_path / f"shard{i}") in proc.stdout
    proc = _run(
        [
            "extract.py",
            "--merge",
            f"{tmp_path / 'shard0'},{tmp_path / 'shard1'}",
            f"--out={tmp_path / 'merged'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    whole = [p.parent.parent for p in (work / "descriptors" / "demo").glob("*/db/descriptors.npy")]
    for part in ("db", "queries"):
        x, ids, _ = store.load_store(tmp_path / "merged" / part)
        y, y_ids, _ = store.load_store(whole[0] / part)
        assert ids == y_ids
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
