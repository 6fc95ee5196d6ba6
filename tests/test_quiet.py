"""What is not the user's business stays off the terminal (issue 26 item 7): TensorFlow's
start-up lines on `import cbir_tf`, Beam's lines per worker process (filtered_stderr)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from cbir_tf import quiet

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHILD = """import sys
sys.stderr.write("WARNING:root:apitools not found, and bigquery client libraries ...\\n")
sys.stderr.write("worker: shard 3 written\\n")
sys.stderr.write("WARNING:apache_beam.options.pipeline_options:Discarding unparseable args: []\\n")
"""


def test_filtered_stderr_drops_noise_of_this_process_and_of_its_children(capfd):
    stderr = sys.__stderr__  # the process's own (pytest's sys.stderr bypasses descriptor 2)
    with quiet.filtered_stderr(quiet.BEAM_NOISE):
        print("INFO No semi_persistent_directory found: ...", file=stderr, flush=True)
        print("kept: the driver's own line", file=stderr, flush=True)
        os.write(2, b"kept: written to the descriptor\n")  # as C++ code writes
        subprocess.run([sys.executable, "-c", CHILD], check=True)  # inherits descriptor 2
        os.write(2, b"progress 1/2\rprogress 2/2\r")  # a bar redrawn in place, passed as it comes
    err = capfd.readouterr().err
    assert err.split("\n") == [
        "kept: the driver's own line",
        "kept: written to the descriptor",
        "worker: shard 3 written",
        "progress 1/2\rprogress 2/2\r",
    ], err
    print("after the block: unfiltered", file=stderr, flush=True)
    assert capfd.readouterr().err == "after the block: unfiltered\n"
    with quiet.filtered_stderr(quiet.BEAM_NOISE, enabled=False):  # --verbose
        print("Logging handler created.", file=stderr, flush=True)
    assert capfd.readouterr().err == "Logging handler created.\n"


# What TensorFlow prints at start-up when nothing silences it.
TF_NOISE = re.compile(r"cuInit|absl::InitializeLog|oneDNN|cuda drivers|^[IWE]\d{4} ", re.M)
BUILD = """import cbir_tf
model = cbir_tf.build_descriptor_model(backbone="mobilenet", alpha=0.25, weights="none")
print("dimension", model.output_shape[-1])
"""


@pytest.mark.slow
def test_import_cbir_tf_then_tensorflow_prints_no_start_up_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", BUILD], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "dimension 256\n", proc.stderr[-3000:]
    assert not TF_NOISE.search(proc.stderr), proc.stderr[-3000:]
    # Asked for (TensorFlow told to say everything), the lines are there: they were hidden.
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    loud = subprocess.run(
        [sys.executable, "-c", BUILD], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert loud.returncode == 0 and TF_NOISE.search(loud.stderr), loud.stderr[-3000:]
