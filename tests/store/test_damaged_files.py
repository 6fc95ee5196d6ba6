"""A damaged file of an index is named in one line, never a traceback (issue 24 item 7): a
truncated manifest.json, meta.json or COMPLETE, a manifest holding `[1,2]`, a truncated
model.keras; with and without the checksums of its commit (indexes written before them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from photos import synthetic_photo

from cbir_tf.retriever import Retriever

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(6)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(
        keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    )
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    base = tmp_path_factory.mktemp("damaged")
    for i in range(4):
        synthetic_photo(base / "photos" / f"p{i}.jpg", 60 + i)
    r = Retriever(model, image_size=64, directory=base / "index")
    r.index(str(base / "photos"), progress=False)
    return base / "index"


def _copy(built, tmp_path, checksums=True):
    index = tmp_path / "index"
    shutil.copytree(built, index)
    if not checksums:  # as an index written before checksums were recorded
        marker = json.loads((index / "COMPLETE").read_text())
        del marker["files"]
        (index / "COMPLETE").write_text(json.dumps(marker))
    return index


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CASES = {
    "truncated manifest": ("manifest.json", _truncate, "is damaged|has .* bytes"),
    "manifest [1,2]": ("manifest.json", lambda p: p.write_text("[1,2]"), "holds a JSON list|has"),
    "truncated meta": ("meta.json", _truncate, "is damaged|has .* bytes"),
    "truncated marker": ("COMPLETE", _truncate, "COMPLETE marker\\) is damaged"),
    "truncated model": ("model.keras", _truncate, "is damaged: not a complete .keras|has"),
}


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no checksums"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_file_is_named_in_one_line(built, tmp_path, case, checksums):
    name, damage, expected = CASES[case]
    index = _copy(built, tmp_path, checksums)
    damage(index / name)
    with pytest.raises((ValueError, RuntimeError)) as e:
        Retriever.load(index)
    message = str(e.value)
    assert str(index / name) in message and "\n" not in message, message
    assert re.search(expected, message), message
    if checksums and name != "COMPLETE":
        assert "committed: truncated or altered" in message  # caught by its recorded size


def test_search_command_says_it_in_one_line(built, tmp_path):
    index = _copy(built, tmp_path, checksums=False)
    (index / "manifest.json").write_text("[1,2]")
    query = next((built.parent / "photos").iterdir())
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "search.py"), f"--index={index}", f"--query={query}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
    )  # fmt: skip
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {index / 'manifest.json'} (the index manifest) is damaged: it holds a JSON "
        "list, not a JSON object; restore it from a copy or rebuild the folder"
    ], out.stderr
    assert "Traceback" not in out.stderr
