"""train.py as a user runs it: --help, a tiny end-to-end run in a subprocess, a clear error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_finetune import COLOURS, make_collection, write_calibrated_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mobilenet_025_calibrated.weights.h5"
    return write_calibrated_weights(path)


def run_train(*args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_help_lists_the_flags():
    proc = run_train("--help", timeout=120)
    # absl prints the usage and exits with status 1 after --help, by design.
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert "Fine-tunes a descriptor model" in proc.stdout
    for flag in (
        "--train_dir",
        "--train_data",
        "--val_dir",
        "--workdir",
        "--weights",
        "--recipe",
        "--backbone",
        "--config",
    ):
        assert flag in proc.stdout


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path, weights):
    train_dir = make_collection(tmp_path / "train", per_class=6)
    val_dir = make_collection(tmp_path / "val", per_class=3, seed=1)
    workdir = tmp_path / "run"
    proc = run_train(
        f"--train_dir={train_dir}",
        f"--val_dir={val_dir}",
        f"--workdir={workdir}",
        "--backbone=mobilenet",
        f"--weights={weights}",
        "--recipe=head",
        "--config=configs/train_head.py",
        "--config.model.alpha=0.25",
        "--config.train.image_size=64",
        "--config.train.batch_size=8",
        "--config.train.epochs=1",
        "--config.train.fine_tune_blocks=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/1 (stage 1)" in proc.stdout
    assert f"model: {workdir}/model.keras" in proc.stdout
    assert os.path.isfile(workdir / "model.keras")
    config = json.load(open(workdir / "config.json"))
    assert config["model"]["backbone"] == "mobilenet" and config["workdir"] == str(workdir)
    info = json.load(open(workdir / "model.json"))
    assert info["num_train_images"] == 24 and info["num_val_images"] == 12
    assert 0.0 <= info["best_val_map"] <= 1.0

    from cbir_tf.describe import models

    model = models.load_descriptor_model(workdir / "model.keras", safe_mode=True)
    out = model(np.zeros((1, 64, 48, 3), np.float32)).numpy()
    assert out.shape[0] == 1 and np.isclose(np.linalg.norm(out), 1.0, atol=1e-4)


@pytest.mark.slow
def test_one_class_folder_gives_one_clear_error_line(tmp_path):
    train_dir = make_collection(tmp_path / "train", per_class=2, colours=COLOURS[:1])
    proc = run_train(f"--train_dir={train_dir}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "at least 2 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_training_data_is_a_usage_error(tmp_path):
    proc = run_train(f"--workdir={tmp_path}", timeout=120)
    assert proc.returncode != 0 and "--train_dir" in proc.stderr
