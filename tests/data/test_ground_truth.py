"""Ground-truth files: the real rparis6k file loads; malformed ones give clear GroundTruthErrors."""

from __future__ import annotations

import pickle

import pytest
from conftest import RPARIS_SHA

from cbir_tf.data.download import file_sha256
from cbir_tf.data.ground_truth import GroundTruthError, load_ground_truth, validate_ground_truth


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
    assert validate_ground_truth(cfg) == "revisited"


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
