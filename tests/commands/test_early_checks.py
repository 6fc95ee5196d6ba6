"""Mistakes answered at once, in one line (issue 26 items 1, 2 and 4).

Every command runs in a subprocess, as a user runs it, from a folder outside the repository. A
mistake must end it with one `error: ...` line before TensorFlow is imported: each run reports
(through an exit hook) whether `tensorflow` was in `sys.modules`, and the CPU time it used is
measured, which shared-machine load does not inflate the way it inflates wall time.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMANDS = ("extract", "evaluate", "search", "serve", "train", "export")
WITH_CONFIG = ("extract", "evaluate", "train", "export")
# Whether TensorFlow was imported, printed on stderr when the command exits (sys.exit included).
PROBE = """import atexit, sys
atexit.register(lambda: print("probe: tensorflow " + ("loaded" if "tensorflow" in sys.modules
                                                       else "not loaded"), file=sys.stderr))
sys.argv = {argv!r}
from cbir_tf.commands import {command}
{command}.run()
"""
# The CPU seconds a refused command may use: Python, absl, the config and the numpy-only checks
# take well under one; importing TensorFlow alone takes several.
CPU_BOUND_S = 2.0
UNKNOWN_POOLING = (
    "error: unknown pooling 'gam'; valid poolings: auto, mac, spoc, gem, rmac, cls, cls+gem, head"
)


def _command(command, args, cwd):
    """(CompletedProcess, CPU seconds, wall seconds) of `command` run with `args` in `cwd`."""
    env = {k: v for k, v in os.environ.items() if k not in ("CBIR_DEBUG", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    code = PROBE.format(argv=[f"{command}.py", *map(str, args)], command=command)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, cpu, wall


def _refused(command, args, cwd):
    """The one `error:` line of a run refused before TensorFlow loaded, in bounded CPU time."""
    proc, cpu, wall = _command(command, args, cwd)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines[-1] == "probe: tensorflow not loaded", proc.stderr[-3000:]
    assert len(lines) == 2 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert cpu < CPU_BOUND_S, f"{cpu:.2f} CPU seconds ({wall:.2f} s wall, load {os.getloadavg()})"
    return lines[0]


# -- item 2: a misspelt override, with and without --config, in every command -------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("form", [[], ["--config=default"]], ids=["without", "with"])
def test_a_misspelt_override_is_one_line_with_and_without_config(command, form, tmp_path):
    # search and serve take an optional --config (its rerank block); overrides given without
    # one start from configs/default.py, as in the other commands.
    line = _refused(command, [*form, "--config.model.poolin=gem"], tmp_path)
    assert line == 'error: config has no field model.poolin: did you mean "pooling"?'


# -- item 1: the user's own config file is checked, every block ---------------------------------

OWN_CONFIG = """from cbir_tf import config
import ml_collections


def get_config():
    c = config.default_config()
{body}
    return c
"""


@pytest.mark.parametrize("command", WITH_CONFIG)
@pytest.mark.parametrize(
    "body, expected",
    [
        (
            '    c.model.polling = "gem"',
            'config has no field model.polling: did you mean "pooling"?',
        ),
        (
            "    c.search.ann.min_rowz = 10",
            'config has no field search.ann.min_rowz: did you mean "min_rows"?',
        ),
        ("    c.eval.kapas = (1, 5)", 'config has no field eval.kapas: did you mean "kappas"?'),
        (
            '    c.rerank = ml_collections.ConfigDict({"qe": {"n": "two"}})',
            "config.rerank.qe.n must be 'auto' or a whole number, got 'two'",
        ),
    ],
    ids=["model", "search.ann", "eval", "type"],
)
def test_an_own_config_file_with_a_typo_is_refused_naming_file_and_field(
    command, body, expected, tmp_path
):
    path = tmp_path / "mine.py"
    path.write_text(OWN_CONFIG.format(body=body))
    line = _refused(command, [f"--config={path}"], tmp_path)
    assert line == f"error: {path}: {expected}"


def test_an_own_config_file_written_from_scratch_takes_the_other_defaults(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'model': {'pooling': 'gam'}})\n"
    )
    # Checked, completed from default.py, then the pooling name is refused before TensorFlow.
    line = _refused("extract", ["--config=mine.py", "--images=.", "--out=index"], tmp_path)
    assert line == UNKNOWN_POOLING


def test_an_error_inside_a_config_file_names_its_line(tmp_path):
    (tmp_path / "mine.py").write_text(OWN_CONFIG.format(body='    c.data.image_size = "512px"'))
    line = _refused("evaluate", ["--config=mine.py"], tmp_path)
    assert line.startswith('error: config file mine.py, line 7 (c.data.image_size = "512px"): ')
    assert "TypeError" in line and "image_size" in line


# -- item 4: argument and file mistakes, before TensorFlow ------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A photo folder, a malformed benchmark and a file that is no weights file."""
    root = tmp_path_factory.mktemp("early")
    (root / "photos").mkdir()
    (root / "photos" / "a.jpg").write_bytes(b"not decoded by the checks")
    bench = root / "bench"
    (bench / "jpg").mkdir(parents=True)
    for name in ("img1", "q1"):
        (bench / "jpg" / f"{name}.jpg").write_bytes(b"")
    gnd = {"imlist": ["img1"], "qimlist": ["q1"], "gnd": [{"eazy": [0], "hard": []}]}
    (bench / "gnd.json").write_text(json.dumps(gnd))
    (root / "weights.txt").write_text("no weights")
    return root


MISTAKES = [
    ("extract", ["--images=missing", "--out=index"], "error: --images=missing: {root}/missing"),
    ("extract", ["--images=photos"], "error: --out is needed with --images"),
    ("search", ["--index=index", "--query=photos/a.jpg", "--k=0"], "error: k (results per query)"),
    ("search", ["--index=missing", "--query=photos/a.jpg"], "error: missing is not an image index"),
    ("serve", ["--index=photos"], "error: photos is not an image index (no manifest.json)"),
    ("evaluate", ["--dataset=bench"], "error: {root}/bench/gnd.json: gnd[0] (query 'q1') has "),
    (
        "evaluate",
        ["--dataset=paris6k", "--descriptors=missing"],
        "error: --descriptors=missing: {root}/missing does not exist (a store folder holding db/",
    ),
    (
        "extract",
        ["--images=photos", "--out=index", "--config.model.pooling=gam"],
        UNKNOWN_POOLING,
    ),
    (
        "train",
        ["--train_dir=photos", "--config.model.pooling=maxx"],
        "error: unknown pooling 'maxx'",
    ),
    (
        "extract",
        ["--images=photos", "--out=index", "--weights=weights.txt"],
        "error: weights='weights.txt': expected 'imagenet', 'none', 'pretrained', a weights file",
    ),
    (
        "export",
        ["--out=exported/1", "--weights=missing.weights.h5"],
        "error: model.weights: the weights file missing.weights.h5 does not exist",
    ),
    ("train", ["--train_dir=missing"], "error: --train_dir=missing: "),
    ("export", ["--model=missing.keras", "--out=exported/1"], "error: --model=missing.keras: "),
]


@pytest.mark.parametrize(
    "command, args, expected", MISTAKES, ids=[f"{c}-{a[-1]}" for c, a, _ in MISTAKES]
)
def test_mistakes_are_answered_before_tensorflow_loads(command, args, expected, files):
    line = _refused(command, args, files)
    assert line.startswith(expected.format(root=files)), line
