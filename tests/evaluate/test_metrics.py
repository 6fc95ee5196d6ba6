"""Tests of cbir_tf.evaluate.metrics: golden values of the revisitop reference evaluation,
hand-worked cases, limit cases, the reference loop on random inputs, and input validation."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from reference_metrics import reference_compute_map

from cbir_tf.data.revisited import load_ground_truth
from cbir_tf.evaluate import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]

CASES = ("random", "noisy", "oracle")
FIELDS = ("map", "aps", "mpr", "prs")


def assert_same(actual, expected):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=0,
        atol=1e-12,
        equal_nan=True,
    )


def assert_identical(actual, expected):
    """Bit for bit, NaN in the same places (the code follows the reference's sum order)."""
    for name, a, b in zip(FIELDS, actual, expected, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), name


@pytest.fixture(scope="module")
def gnd_raw(golden_dir):
    return load_ground_truth(golden_dir / "gnd_rparis6k.pkl")["gnd"]


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "map_rparis6k.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# ----------------------------------------------------------------------------- golden data


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("case", CASES)
def test_golden_rparis6k(golden, gnd_raw, case, protocol):
    ranks = golden[f"ranks_{case}"].T  # stored [N, Q] int16
    assert ranks.shape == (70, 6322)
    result = metrics.compute_map(
        ranks, metrics.revisited_gnd(gnd_raw, protocol), golden["kappas"], num_images=6322
    )
    for name, value in zip(FIELDS, result, strict=True):
        assert_same(value, golden[f"{name}_{case}_{protocol}"])
    assert isinstance(result[0], float)
    assert result[1].shape == (70,) and result[1].dtype == np.float64
    assert result[2].shape == (3,) and result[3].shape == (70, 3)


@pytest.mark.parametrize("case", CASES)
def test_golden_evaluate_revisited(golden, gnd_raw, case):
    results = metrics.evaluate_revisited(golden[f"ranks_{case}"].T, gnd_raw, golden["kappas"])
    assert set(results) == set(metrics.PROTOCOLS)
    for protocol, result in results.items():
        assert set(result) == set(FIELDS)
        for name in FIELDS:
            assert_same(result[name], golden[f"{name}_{case}_{protocol}"])


def test_golden_values_do_not_depend_on_dtype_or_layout(golden, gnd_raw):
    gnd = metrics.revisited_gnd(gnd_raw, "medium")
    base = golden["ranks_noisy"].T  # int16, a non-contiguous view
    expected = metrics.compute_map(base, gnd)
    for ranks in (
        np.ascontiguousarray(base),
        base.astype(np.int32),
        base.astype(np.int64),
        base.astype(np.uint16),
        base.astype(np.uint64),
    ):
        assert_identical(metrics.compute_map(ranks, gnd), expected)


def test_golden_matches_reference_loop_bit_for_bit(golden, gnd_raw):
    ranks = golden["ranks_noisy"].T.astype(np.int64)
    for protocol in metrics.PROTOCOLS:
        gnd = metrics.revisited_gnd(gnd_raw, protocol)
        assert_identical(
            metrics.compute_map(ranks, gnd), reference_compute_map(ranks, gnd, (1, 5, 10))
        )


def test_golden_accepts_pickle_dict_and_raw_lists(golden, gnd_raw):
    ranks = golden["ranks_random"].T
    from_list = metrics.evaluate_revisited(ranks, gnd_raw)
    from_dict = metrics.evaluate_revisited(ranks, {"gnd": gnd_raw})
    for protocol in metrics.PROTOCOLS:
        assert from_list[protocol]["map"] == from_dict[protocol]["map"]


def test_edge_cases_json(golden_dir):
    data = json.loads((golden_dir / "map_edge_cases.json").read_text())
    ranks = np.asarray(data["ranks"]).T  # stored [N, Q]
    mean_ap, aps, mpr, prs = metrics.compute_map(ranks, data["gnd"], data["kappas"])

    def with_nan(x):
        return np.array(
            [
                [np.nan if v is None else v for v in row]
                if isinstance(row, list)
                else (np.nan if row is None else row)
                for row in x
            ],
            dtype=np.float64,
        )

    assert_same(mean_ap, data["map"])
    assert_same(aps, with_nan(data["aps"]))
    assert_same(mpr, with_nan(data["mpr"]))
    assert_same(prs, with_nan(data["prs"]))
    assert np.isnan(aps[2]) and np.isnan(prs[2]).all()


def test_speed_benchmark_runs_and_checks_values(golden_dir):
    script = ROOT / "benchmarks" / "metrics_speed.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--golden_dir", str(golden_dir), "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical to the reference loop" in proc.stdout and "speed-up" in proc.stdout


# ----------------------------------------------------------------------------- hand-worked


@pytest.mark.parametrize(
    "positions, num_positives, expected",
    [
        ([0], 1, 1.0),  # (1 + 1) / 2
        ([1], 1, 0.25),  # (0/1 + 1/2) / 2
        ([0, 2], 2, 19 / 24),  # (1 + 1) / 4 + (1/2 + 2/3) / 4
        ([0], 2, 0.5),  # the second positive was never retrieved
        ([], 3, 0.0),
        ([0, 1, 2], 3, 1.0),
        ([2, 3], 2, (0 + 1 / 3 + 1 / 3 + 2 / 4) / 4),
    ],
)
def test_compute_ap_hand_worked(positions, num_positives, expected):
    assert metrics.compute_ap(np.array(positions, dtype=np.int64), num_positives) == pytest.approx(
        expected, abs=1e-15
    )


def test_compute_ap_validation():
    with pytest.raises(ValueError, match="num_positives"):
        metrics.compute_ap(np.array([0]), 0)
    with pytest.raises(ValueError, match="num_positives is 1"):
        metrics.compute_ap(np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.compute_ap(np.array([2, 1]), 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.compute_ap(np.array([-1]), 1)
    with pytest.raises(ValueError, match="integer"):
        metrics.compute_ap(np.array([0.0]), 1)


def test_compute_map_hand_worked_with_junk():
    # Query 0: ranking 5 0 3 1 2 4, positives {0, 1}, junk {5}. With junk removed the ranking
    # is 0 3 1 2 4: positives at 0-based positions 0 and 2 -> AP 19/24.
    # Precision at kappa is taken at min(kappa, last positive position = 3): P@1 = 1,
    # P@5 = 2/3 (not 2/5), as the reference computes it.
    # Query 1: ranking 0..5, positive {4}, junk {1, 2} -> position 2: AP (0 + 1/3) / 2.
    # P@1 at min(1, 3) = 1 -> 0; P@5 at min(5, 3) = 3 -> 1/3.
    ranks = np.array([[5, 0, 3, 1, 2, 4], [0, 1, 2, 3, 4, 5]])
    gnd = [{"ok": [0, 1], "junk": [5]}, {"ok": [4], "junk": [1, 2]}]
    mean_ap, aps, mpr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 5))
    assert_same(aps, [19 / 24, 1 / 6])
    assert_same(prs, [[1.0, 2 / 3], [0.0, 1 / 3]])
    assert_same(mean_ap, (19 / 24 + 1 / 6) / 2)
    assert_same(mpr, [0.5, 0.5])


def test_id_both_positive_and_junk_counts_as_positive_at_its_own_position():
    # The reference removes junk ranked strictly before a positive; an id listed in both is
    # kept as a positive at its position, and removed for the positives after it.
    ranks = np.array([[3, 1, 0, 2]])
    gnd = [{"ok": [1, 2], "junk": [1]}]
    _, aps, _, _ = metrics.compute_map(ranks, gnd, kappas=(1,))
    # positives at raw positions 1 and 3; junk (id 1) at 1: shifts only the second -> 1, 2.
    expected = metrics.compute_ap(np.array([1, 2]), 2)
    assert_same(aps, [expected])
    assert_identical(
        metrics.compute_map(ranks, gnd, (1, 2)), reference_compute_map(ranks, gnd, (1, 2))
    )


def test_missing_junk_key_means_no_junk():
    ranks = np.array([[2, 0, 1]])
    with_key = metrics.compute_map(ranks, [{"ok": [0], "junk": []}])
    without_key = metrics.compute_map(ranks, [{"ok": [0]}])
    assert_identical(with_key, without_key)
    assert_same(with_key[1], [0.25])


# ----------------------------------------------------------------------------- limit cases


def test_all_positives_first_gives_ap_one():
    rng = np.random.default_rng(0)
    num_images, num_queries = 50, 6
    ranks, gnd = [], []
    for q in range(num_queries):
        ids = rng.permutation(num_images)
        num_pos = q + 1
        junk = ids[num_pos : num_pos + 3]
        # junk interleaved among the positives must not matter
        order = np.concatenate([ids[:1], junk, ids[1:num_pos], ids[num_pos + 3 :]])
        ranks.append(order)
        gnd.append({"ok": ids[:num_pos], "junk": junk})
    mean_ap, aps, mpr, prs = metrics.compute_map(np.stack(ranks), gnd, kappas=(1, 3, 10))
    assert_same(aps, np.ones(num_queries))
    assert mean_ap == pytest.approx(1.0, abs=1e-12)
    # precision is taken at min(kappa, last positive): 1 everywhere.
    assert_same(prs, np.ones((num_queries, 3)))
    assert_same(mpr, np.ones(3))


def test_all_positives_last_gives_low_ap():
    ranks = np.arange(10)[None, :]
    _, aps, _, prs = metrics.compute_map(ranks, [{"ok": [9]}], kappas=(1, 10))
    assert_same(aps, [(0 + 1 / 10) / 2])  # precision 0/9 before it, 1/10 at it
    assert_same(prs, [[0.0, 0.1]])


def test_query_without_positives_is_nan_and_left_out_of_means():
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 2, 3]])
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [3]}, {"ok": [0], "junk": [1]}]
    mean_ap, aps, mpr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 2))
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert_same(aps[[0, 2]], [1.0, 1.0])
    assert mean_ap == 1.0
    assert_same(mpr, [1.0, 1.0])


def test_no_query_with_positives_gives_nan_without_warnings():
    ranks = np.array([[0, 1], [1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean_ap, aps, mpr, prs = metrics.compute_map(ranks, [{"ok": []}, {"ok": []}], (1, 5))
    assert np.isnan(mean_ap) and np.isnan(aps).all()
    assert np.isnan(mpr).all() and mpr.shape == (2,) and np.isnan(prs).all()


def test_no_kappas():
    mean_ap, aps, mpr, prs = metrics.compute_map(np.array([[1, 0]]), [{"ok": [0]}], kappas=())
    assert mean_ap == 0.25 and mpr.shape == (0,) and prs.shape == (1, 0)


def test_kappa_beyond_ranking_length():
    # kappa 100 > N: the cut is min(kappa, last positive position), as the reference does.
    ranks = np.array([[4, 0, 1, 2, 3]])
    _, _, _, prs = metrics.compute_map(ranks, [{"ok": [0, 3]}], kappas=(100,))
    assert_same(prs, [[2 / 5]])


# ----------------------------------------------------------------------------- top-k rankings


def test_truncated_rankings_match_reference_when_positives_are_retrieved():
    rng = np.random.default_rng(1)
    num_images, num_queries, top_k = 200, 12, 40
    full = np.stack([rng.permutation(num_images) for _ in range(num_queries)])
    gnd = []
    for q in range(num_queries):
        # one positive surely inside the top-k (the reference fails when none is)
        others = rng.choice(full[q, 1:], size=8, replace=False)
        junk = rng.choice(full[q], size=5, replace=False)
        gnd.append({"ok": np.concatenate([full[q, :1], others]), "junk": junk})
    truncated = full[:, :top_k]
    assert_identical(
        metrics.compute_map(truncated, gnd, (1, 5, 10), num_images=num_images),
        reference_compute_map(truncated, gnd, (1, 5, 10)),
    )
    # Truncation only drops positives beyond k: AP never increases.
    full_aps = metrics.compute_map(full, gnd)[1]
    assert (metrics.compute_map(truncated, gnd)[1] <= full_aps + 1e-15).all()


def test_truncated_ranking_without_retrieved_positive_scores_zero():
    ranks = np.array([[5, 6, 7], [0, 1, 2]])
    gnd = [{"ok": [0, 1], "junk": [6]}, {"ok": [1]}]
    mean_ap, aps, mpr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 2), num_images=8)
    assert_same(aps, [0.0, 0.25])
    assert_same(prs, [[0.0, 0.0], [0.0, 0.5]])
    assert_same(mean_ap, 0.125)
    assert_same(mpr, [0.0, 0.25])


def test_ground_truth_ids_beyond_ranked_ids_are_not_retrieved():
    # Without num_images, ids in the ground truth larger than any ranked id are fine.
    _, aps, _, _ = metrics.compute_map(np.array([[0, 1]]), [{"ok": [1, 99]}])
    assert_same(aps, [0.125])


# ----------------------------------------------------------------------------- random vs loop


def _random_problem(rng, num_queries, num_images):
    """Random rankings and ground truth; junk overlaps positives, ids repeat in the lists."""
    ranks = np.stack([rng.permutation(num_images) for _ in range(num_queries)])
    gnd = []
    for q in range(num_queries):
        repeat = bool(rng.random() < 0.3)
        num_pos = min(int(rng.integers(0, 12)), num_images)
        pos = rng.choice(ranks[q], size=num_pos, replace=repeat)
        junk = rng.choice(num_images, size=int(rng.integers(0, 15)), replace=True)
        entry = {"ok": pos.tolist(), "junk": junk.astype(np.int32)}
        if rng.random() < 0.2:
            del entry["junk"]
        gnd.append(entry)
    return ranks, gnd


@pytest.mark.parametrize("num_images", [7, 40, 300, 1000])
def test_random_problems_identical_to_reference_loop(num_images):
    rng = np.random.default_rng(num_images)
    for _ in range(5):
        ranks, gnd = _random_problem(rng, 9, num_images)
        kappas = (1, 2, 5, 10, 1000)
        assert_identical(
            metrics.compute_map(ranks, gnd, kappas), reference_compute_map(ranks, gnd, kappas)
        )


@pytest.mark.parametrize("strategy", ["inverse", "sort"])
def test_strategies_blocks_and_scatter_paths_agree(monkeypatch, strategy):
    rng = np.random.default_rng(7)
    ranks, gnd = _random_problem(rng, 23, 500)
    expected = reference_compute_map(ranks, gnd, (1, 5, 10))
    # ratio 0: always match by sorting; huge: always through the inverse table
    monkeypatch.setattr(metrics, "_INVERSE_MAX_RATIO", 0 if strategy == "sort" else 10**9)
    assert_identical(metrics.compute_map(ranks, gnd), expected)
    # several query blocks
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * 500)
    assert_identical(metrics.compute_map(ranks, gnd), expected)
    # the flat scatter used for short rankings, on long ones
    monkeypatch.setattr(metrics, "_ROW_SCATTER_MIN", 10**9)
    assert_identical(metrics.compute_map(ranks, gnd), expected)


def test_top_k_lists_over_a_large_database():
    # Short rankings over a large database are matched by sorting (an inverse table would
    # cost the database size per query); values identical to the reference loop.
    rng = np.random.default_rng(3)
    num_images, num_queries, top_k = 100_000, 40, 25
    ranks = np.stack(
        [rng.choice(num_images, size=top_k, replace=False) for _ in range(num_queries)]
    )
    gnd = []
    for q in range(num_queries):
        inside = rng.choice(ranks[q], size=int(rng.integers(1, 6)), replace=False)
        outside = rng.choice(num_images, size=5, replace=False)
        junk = np.concatenate([rng.choice(ranks[q], size=3), rng.choice(num_images, size=3)])
        gnd.append({"ok": np.concatenate([inside, outside]), "junk": junk})
    kappas = (1, 5, 10, 50)
    assert_identical(
        metrics.compute_map(ranks, gnd, kappas, num_images=num_images),
        reference_compute_map(ranks, gnd, kappas),
    )


def test_duplicate_ids_in_ground_truth_are_found_once():
    # An id listed twice in 'ok' is one ranked image; len(ok) still counts it twice, as
    # the reference's len(qgnd) does.
    ranks = np.array([[0, 1, 2, 3]])
    gnd = [{"ok": [1, 1], "junk": [0, 0]}]
    assert_identical(
        metrics.compute_map(ranks, gnd, (1, 2)), reference_compute_map(ranks, gnd, (1, 2))
    )
    assert_same(metrics.compute_map(ranks, gnd)[1], [0.5])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "ranks, match",
    [
        (np.array([0, 1, 2]), "2-D"),
        (np.array([[0.0, 1.0]]), "integer"),
        (np.array([[True, False]]), "integer"),
        (np.array([[0, 1], [1, 0]]), "2 rows but the ground truth has 1"),
        (np.array([[0, -1]]), "negative ids in rows \\[0\\]"),
        (np.array([[0, 1, 0]]), "distinct ids; rows \\[0\\]"),
    ],
)
def test_invalid_ranks(ranks, match):
    with pytest.raises(ValueError, match=match):
        metrics.compute_map(ranks, [{"ok": [0]}])


def test_transposed_ranks_hint():
    with pytest.raises(ValueError, match="pass ranks.T"):
        metrics.compute_map(np.zeros((5, 2), dtype=np.int64), [{"ok": [0]}, {"ok": [1]}])


@pytest.mark.parametrize("ratio", [0, 10**9])  # sort / inverse-table matching
def test_duplicate_detected_in_later_block_and_long_rows(monkeypatch, ratio):
    ranks = np.stack([np.random.default_rng(i).permutation(400) for i in range(6)])
    ranks[4, 10] = ranks[4, 11]
    ranks[5, 0] = ranks[5, 399]
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 2 * 400)
    monkeypatch.setattr(metrics, "_INVERSE_MAX_RATIO", ratio)
    with pytest.raises(ValueError, match="rows \\[4, 5\\] repeat ids"):
        metrics.compute_map(ranks, [{"ok": [0]}] * 6)


def test_ids_out_of_range():
    with pytest.raises(ValueError, match="ranks holds id 5 but the database has 5"):
        metrics.compute_map(np.array([[0, 5]]), [{"ok": [0]}], num_images=5)
    with pytest.raises(ValueError, match="ground truth holds id 9"):
        metrics.compute_map(np.array([[0, 1]]), [{"ok": [9]}], num_images=5)
    with pytest.raises(ValueError, match="ground-truth ids must be >= 0"):
        metrics.compute_map(np.array([[0, 1]]), [{"ok": [0], "junk": [-2]}])
    with pytest.raises(ValueError, match="int64 range"):
        metrics.compute_map(np.array([[0, 2**63]], dtype=np.uint64), [{"ok": [0]}])


@pytest.mark.parametrize(
    "gnd, match",
    [
        ({"ok": [0]}, "list with one"),
        ([{"junk": [0]}], "gnd\\[0\\] must be a dict with an 'ok'"),
        (["not a dict"], "gnd\\[0\\] must be a dict"),
        ([{"ok": [0.5]}], "gnd\\[0\\]\\['ok'\\] must hold integer"),
        ([{"ok": [[0, 1]]}], "1-D"),
        ([{"ok": [0], "junk": [True]}], "gnd\\[0\\]\\['junk'\\] must hold integer"),
    ],
)
def test_invalid_ground_truth(gnd, match):
    with pytest.raises(ValueError, match=match):
        metrics.compute_map(np.array([[0, 1]]), gnd)


@pytest.mark.parametrize("kappas", [(0,), (1, -5), (1.5,), ((1, 2),)])
def test_invalid_kappas(kappas):
    with pytest.raises(ValueError, match="kappas"):
        metrics.compute_map(np.array([[0, 1]]), [{"ok": [0]}], kappas=kappas)


# ----------------------------------------------------------------------------- protocols

RAW = [
    {"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [0, 0, 10, 10]},
    {"easy": [], "hard": [4, 5], "junk": []},
]


@pytest.mark.parametrize(
    "protocol, ok, junk",
    [
        ("easy", [[0, 1], []], [[3, 2], [4, 5]]),
        ("medium", [[0, 1, 2], [4, 5]], [[3], []]),
        ("hard", [[2], [4, 5]], [[3, 0, 1], []]),
    ],
)
def test_revisited_gnd(protocol, ok, junk):
    gnd = metrics.revisited_gnd(RAW, protocol)
    assert [g["ok"].tolist() for g in gnd] == ok
    assert [g["junk"].tolist() for g in gnd] == junk
    assert all(g["ok"].dtype == np.int64 and g["junk"].dtype == np.int64 for g in gnd)
    assert metrics.revisited_gnd({"gnd": RAW, "imlist": []}, protocol)[0]["ok"].tolist() == ok[0]


def test_revisited_easy_query_without_easy_positives_is_excluded():
    ranks = np.array([[0, 1, 2, 3, 4, 5]] * 2)
    results = metrics.evaluate_revisited(ranks, RAW, kappas=(1,))
    assert np.isnan(results["easy"]["aps"][1])
    assert results["easy"]["map"] == results["easy"]["aps"][0] == 1.0
    assert not np.isnan(results["hard"]["aps"]).any()


def test_revisited_gnd_errors():
    with pytest.raises(ValueError, match="unknown protocol 'medum'; valid: easy, medium, hard"):
        metrics.revisited_gnd(RAW, "medum")
    with pytest.raises(ValueError, match="query 0 has no 'hard' list"):
        metrics.revisited_gnd([{"easy": [0], "junk": []}], "medium")
    with pytest.raises(ValueError, match="no 'gnd'"):
        metrics.revisited_gnd({"imlist": []}, "easy")
    with pytest.raises(ValueError, match="list of per-query dicts"):
        metrics.revisited_gnd("gnd.pkl", "easy")


def test_original_gnd_forms():
    # original annotation lists: positives are good + ok
    raw = [{"good": [0, 1], "ok": [2], "junk": [5]}, {"good": [3], "ok": [], "junk": []}]
    gnd = metrics.original_gnd(raw)
    assert [g["ok"].tolist() for g in gnd] == [[0, 1, 2], [3]]
    assert [g["junk"].tolist() for g in gnd] == [[5], []]
    # cirtorch's gnd_oxford5k.pkl: 'ok' already holds good + ok; 'bbx' is ignored
    merged = metrics.original_gnd({"gnd": [{"ok": [0, 1, 2], "junk": [5], "bbx": [0, 0, 1, 1]}]})
    assert merged[0]["ok"].tolist() == [0, 1, 2] and merged[0]["junk"].tolist() == [5]
    # no junk list: nothing ignored
    assert metrics.original_gnd([{"ok": [4]}])[0]["junk"].size == 0
    with pytest.raises(ValueError, match="query 0 has neither 'good' nor 'ok'"):
        metrics.original_gnd([{"junk": [1]}])


def test_original_protocol_evaluates():
    ranks = np.array([[5, 0, 3, 1, 2, 4]])
    gnd = metrics.original_gnd([{"good": [0], "ok": [1], "junk": [5]}])
    _, aps, _, _ = metrics.compute_map(ranks, gnd)
    assert_same(aps, [19 / 24])
