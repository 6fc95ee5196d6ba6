"""Committed states of an index folder: readers against a writer that commits in a loop.

Issue 24 item 1: readers used to delete the writer's files in flight and destroy the index.
Here a writer process commits in a loop (its renames slowed by a fault-injecting `os.replace`,
tests/commit_race.py), while reader processes open the index with `Retriever.load` and
`search.py` runs: every reader must see exactly one committed state (checked against what the
writer logged for that commit), and the index must load and verify afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from photos import synthetic_photo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")


def _tiny_model_file(path):
    """A small random conv net (cbir_tf layers) saved as .keras: fast to run on 2 cores."""
    import keras

    from cbir_tf.describe import models
    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(3)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    models.save_descriptor_model(model, path, {"image_size": 64})
    return str(path)


def _env():
    # The child processes run this checkout's code, whatever is installed.
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")


def _read_log(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_readers_see_one_committed_state_while_a_writer_commits_in_a_loop(tmp_path):
    from cbir_tf.retriever import Retriever

    photos = tmp_path / "photos"
    base = [synthetic_photo(photos / f"p{i}.jpg", i) for i in range(6)]
    for i in range(3):
        synthetic_photo(photos / f"extra{i}.jpg", 100 + i)
    index = tmp_path / "index"
    r = Retriever.from_model(_tiny_model_file(tmp_path / "m.keras"), image_size=64, directory=index)
    r.index(base, progress=False)
    query = base[0]

    wlog, stop = tmp_path / "writer.jsonl", tmp_path / "stop"
    script = os.path.join(TESTS, "commit_race.py")
    writer = subprocess.Popen(
        [sys.executable, script, "writer", str(index), str(photos), str(wlog), "24", "0.03"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    rlogs = [tmp_path / f"reader{k}.jsonl" for k in range(2)]
    readers = [
        subprocess.Popen(
            [sys.executable, script, "reader", str(index), query, str(log), str(stop)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for log in rlogs
    ]
    # search.py, the command, opened meanwhile (twice, while the writer still commits).
    searches = []
    deadline = time.monotonic() + 400
    while writer.poll() is None and len(searches) < 2 and time.monotonic() < deadline:
        if len(_read_log(wlog)) > 2 + 6 * len(searches):
            searches.append(
                subprocess.run(
                    [
                        sys.executable,
                        os.path.join(ROOT, "search.py"),
                        f"--index={index}",
                        f"--query={query}",
                        "--k=3",
                    ],
                    env=_env(),
                    capture_output=True,
                    text=True,
                    timeout=300,
                )  # fmt: skip
            )
        time.sleep(0.2)
    out, _ = writer.communicate(timeout=600)
    stop.write_text("")
    reader_out = [p.communicate(timeout=300)[0] for p in readers]
    assert writer.returncode == 0, out
    for p, text in zip(readers, reader_out, strict=True):
        assert p.returncode == 0, text

    committed = {e["commit"]: e for e in _read_log(wlog)}
    assert len(committed) == 25 and None not in committed  # the initial state and 24 commits
    seen = [e for log in rlogs for e in _read_log(log)]
    assert len(seen) >= 20
    assert len({e["commit"] for e in seen}) >= 3  # the readers overlapped several commits
    for e in seen:
        # Exactly the state the writer committed under that number: never a mix of two.
        state = committed[e["commit"]]
        assert {k: e[k] for k in state} == state, e
        assert e["top"][0] == "p0.jpg" and abs(e["top"][1] - 1.0) < 1e-5, e
        assert e["same_after_pause"], e
    for result in searches:
        assert result.returncode == 0, result.stdout + result.stderr
        m = re.search(r": (\d+) images \(commit (\d+)\)", result.stdout)
        assert m and committed[int(m.group(2))]["images"] == int(m.group(1)), result.stdout
        first = re.search(r"^\s*1\s+(\S+)\s+(\S+)\s*$", result.stdout, re.M)
        assert first and first.group(2) == "p0.jpg" and first.group(1) == "1.0000"

    # Afterwards: the last commit stands, whole, and checks out byte for byte.
    final = Retriever.load(index, full_check=True)
    assert final.commit == max(committed)
    assert not os.path.exists(index / "COMMIT") and not os.path.exists(index / "staged")
