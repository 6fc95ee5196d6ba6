"""The commands as a new user meets them (issue 14 items 6-10): one-line errors, runnable from
any directory and once installed, quiet start-up, a --help that shows the flags of the
examples, and TFDS sources that fail fast offline.

Commands run in subprocesses from a directory outside the repository. Only one of them imports
TensorFlow (a TFDS source offline); the others end during flag parsing, in about a second each.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ("extract", "evaluate", "search", "train")
# What TensorFlow prints at start-up when nothing silences it (issue 14 item 8).
TF_NOISE = re.compile(r"cuInit|absl::InitializeLog|oneDNN|cuda drivers|^[IWE]\d{4} ", re.M)


def _env(**extra: str) -> dict[str, str]:
    # As a user's shell has it: no TF_CPP_MIN_LOG_LEVEL, no CBIR_DEBUG.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CBIR_DEBUG")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(args, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's only stderr line, `error: ...`, with exit status 1 (no traceback, no noise)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# -- item 9: --help shows the flags the examples use --------------------------------------------

HELP_FLAGS = {
    "extract": ("config", "images", "out", "dataset", "model", "weights", "workdir", "verbose"),
    "evaluate": ("config", "dataset", "descriptors", "model", "weights", "workdir", "out"),
    "search": ("index", "query", "k", "rerank", "out", "verbose"),
    "train": ("config", "train_dir", "train_data", "workdir", "backbone", "weights", "recipe"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_flags_of_the_examples(script, tmp_path):
    proc = _run([ROOT / f"{script}.py", "--help"], cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", proc.stdout, re.M))
    assert set(HELP_FLAGS[script]) <= listed, proc.stdout
    assert "Try --helpfull" in proc.stdout


# -- item 6: flag and config errors in one line ---------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["evaluate.py", "--config=configs/demo.py", "--config.model.poolin=gem"],
            'error: config has no field model.poolin: did you mean "pooling"?',
        ),
        (["extract.py", "--datset=paris6k"], "error: Unknown command line flag 'datset'"),
        (["search.py", "--index=i", "--query=q", "--k=abc"], "error: flag --k=abc: invalid"),
        (["train.py", "--config=/no/such/config.py"], "error: config file /no/such/config.py"),
    ],
)
def test_flag_errors_are_one_line(args, expected, tmp_path):
    start = time.perf_counter()
    proc = _run([ROOT / args[0], *args[1:]], cwd=tmp_path)
    assert _error_line(proc).startswith(expected)
    assert time.perf_counter() - start < 60  # ends while parsing flags: TensorFlow not loaded


def test_weights_file_that_does_not_fit_is_one_short_line(tmp_path):
    import keras

    from cbir_tf.describe.backbones import WeightsFileError, build_backbone

    # A real Keras 3 weights file of MobileNet alpha 0.5, given to an alpha 0.25 network: Keras's
    # own message holds the target variable's values (6 KB); the command prints `error: <msg>`.
    wrong = tmp_path / "alpha05.weights.h5"
    keras.applications.MobileNet(
        input_shape=(None, None, 3), alpha=0.5, include_top=False, weights=None
    ).save_weights(wrong)
    with pytest.raises(WeightsFileError) as info:
        build_backbone("mobilenet", str(wrong), alpha=0.25)
    message = str(info.value)
    assert "\n" not in message and len(message) < 800, message
    assert str(wrong) in message and "backbone mobilenet (alpha=0.25)" in message, message
    assert "first mismatching layer conv1" in message and "(3, 3, 3, 16)" in message, message


# -- item 7: any directory, installed commands ---------------------------------------------------


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    from cbir_tf import config
    from cbir_tf.commands import cli

    monkeypatch.chdir(tmp_path)
    shipped = ROOT / "configs" / "demo.py"
    for value in ("configs/demo.py", "demo", "demo.py"):
        assert cli.resolve_config(value) == str(shipped)
    assert cli.resolve_config("configs/demo.py:arg") == f"{shipped}:arg"
    (tmp_path / "demo.py").write_text("def get_config(): ...\n")
    assert cli.resolve_config("demo.py") == "demo.py"  # a file of the user's own comes first
    assert cli.resolve_config("configs/nothing.py") == "configs/nothing.py"
    assert pathlib.Path(config.config_path()).is_file()


@pytest.mark.parametrize("script", ["extract", "evaluate", "train"])
def test_default_config_loads_outside_the_repository(script, tmp_path):
    # --only_check_args parses the flags (and with an override, loads the config) and stops.
    proc = _run(
        [ROOT / f"{script}.py", "--only_check_args", "--config.model.pooling=gem"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_commands_are_installed_as_console_scripts_and_modules(tmp_path):
    import setuptools

    setup_py = (ROOT / "setup.py").read_text()
    packages = setuptools.find_packages(str(ROOT), include=["cbir_tf", "cbir_tf.*"])
    assert "cbir_tf.commands" in packages
    # The top-level configs/ folder is installed as cbir_tf/configs/, where config_dir looks.
    assert re.search(r'package_dir=\{"cbir_tf.configs": "configs"\}', setup_py)
    assert '"cbir_tf.configs"]' in setup_py
    for name in SCRIPTS:
        assert re.search(r'f"cbir-\{name\} = cbir_tf\.commands\.\{name\}:run"', setup_py)
        assert name in re.search(r"for name in \(([^)]*)\)", setup_py).group(1)
    # python -m works outside the repository (the package on the path, as after pip install).
    proc = _run(["-m", "cbir_tf.commands.search", "--help"], cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert "--index" in proc.stdout and "Searches an image index" in proc.stdout, proc.stderr


# -- item 10: TFDS sources offline ----------------------------------------------------------------

OFFLINE = """import socket

def _offline(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

socket.getaddrinfo = _offline
"""


@pytest.mark.slow
def test_tfds_source_offline_fails_fast_with_what_to_do(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    # Offline whatever this machine's network: no name resolves in the command's process.
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(OFFLINE)
    tfds_dir = tmp_path / "tfds"
    start = time.perf_counter()
    proc = _run(
        [
            ROOT / "train.py",
            "--train_data=tfds:oxford_flowers102",
            f"--workdir={tmp_path / 'run'}",
            f"--tfds_data_dir={tfds_dir}",
        ],
        cwd=tmp_path,
        timeout=180,
        PYTHONPATH=str(tmp_path / "offline"),
    )
    elapsed = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not TF_NOISE.search(proc.stderr), proc.stderr
    line = errors[0]
    assert "oxford_flowers102 is not prepared in" in line and str(tfds_dir) in line, line
    assert "--tfds_data_dir" in line and "no DNS answer" in line, line
    assert elapsed < 120  # TFDS alone retries for minutes


def test_tfds_probe_names_the_host_it_could_not_reach(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from cbir_tf.data.download import DatasetUnavailableError
    from cbir_tf.train import images as training

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(DatasetUnavailableError, match=r"www\.robots\.ox\.ac\.uk: .*refused"):
        training.load_tfds("oxford_flowers102", "train", 64, data_dir=str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="not prepared in .*--tfds_data_dir"):
        training.load_tfds("oxford_flowers102", "train", 64, data_dir=str(tmp_path), download=False)


# -- issue 26 item 10: export's examples write into the version folder TF Serving needs ----------


def test_export_help_writes_saved_models_into_version_folders(tmp_path):
    proc = _run([ROOT / "export.py", "--help"], cwd=tmp_path)
    outs = re.findall(r"--out=(\S+)", proc.stdout)
    saved_models = [out for out in outs if not out.endswith(".tflite")]
    assert len(saved_models) >= 3, proc.stdout
    for out in saved_models:
        assert re.fullmatch(r"\S+/\d+", out), f"--out={out}: TF Serving needs MODEL_DIR/<version>"
    assert "MODEL_DIR/1" in proc.stdout
