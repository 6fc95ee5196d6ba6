"""Distractors: bounded-memory rankings equal the full ones, to the last bit of every metric."""

import numpy as np
import pytest

from cbir_tf.evaluate import bounded, metrics
from cbir_tf.evaluate import methods as evaluation
from cbir_tf.rerank import pipeline

RERANK = {
    "qe": {"n": 2, "alpha": 3.0},
    "diffusion": {"k": 5, "kq": 3, "gamma": 3.0, "alpha": 0.99, "max_iter": 20, "tol": 1e-6},
}
METHODS = ("plain", "aqe", "diffusion", "aqe+diffusion")


def _l2(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _benchmark(seed=0, groups=5, n_per=8, dim=16, distractors=300):
    """Clustered database, queries near the cluster centres, distractors near them too (so
    that they push positives down), and a ground truth with easy, hard and junk images."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    x = _l2(np.repeat(centres, n_per, 0) + 0.5 * rng.normal(size=(groups * n_per, dim)))
    q = _l2(centres + 0.4 * rng.normal(size=(groups, dim)))
    d = _l2(
        centres[rng.integers(0, groups, distractors)] + 0.8 * rng.normal(size=(distractors, dim))
    )
    d[7] = d[3]  # exact ties: ordered by id in both paths
    x[5] = x[1]  # a positive tied with a lower-id positive
    if distractors > 491:
        d[491] = d[60]  # ids 531 and 100: a tie across blocks of 64 rows
    labels = np.repeat(np.arange(groups), n_per)
    gnd = []
    for g in range(groups):
        ids = np.flatnonzero(labels == g)
        gnd.append({"easy": list(ids[:3]), "hard": list(ids[3:6]), "junk": list(ids[6:])})
    gnd[1]["hard"] = []  # a query without Hard positives: NaN, left out of the mean
    return q, x, d, gnd


def _assert_same(res_a, res_b):
    for protocol in metrics.PROTOCOLS:
        a, b = res_a["revisited"][protocol], res_b["revisited"][protocol]
        assert a["map"] == b["map"] or (np.isnan(a["map"]) and np.isnan(b["map"]))
        np.testing.assert_array_equal(a["aps"], b["aps"])
        np.testing.assert_array_equal(a["prs"], b["prs"])


@pytest.mark.parametrize("missing", [False, True])
def test_distractor_evaluation_equals_the_concatenated_full_ranking(missing):
    q, x, d, gnd = _benchmark()
    miss = np.array([2, 17]) if missing else np.zeros(0, np.int64)
    present = np.delete(x, miss, axis=0)
    cfg = {**RERANK, "diffusion": {**RERANK["diffusion"], "truncate": 60}}
    full, full_ranks = evaluation.evaluate_methods(
        q, np.concatenate([present, d]), gnd, methods=METHODS, rerank_cfg=cfg, missing=miss
    )
    part, part_ranks = evaluation.evaluate_methods(
        q, present, gnd, methods=METHODS, rerank_cfg=RERANK, missing=miss, distractors=d,
        distractor_truncate=60,
    )  # fmt: skip
    for m in METHODS:
        _assert_same(full[m], part[m])
        assert isinstance(part_ranks[m], bounded.PartialRanking)
        np.testing.assert_array_equal(
            part_ranks[m].top, full_ranks[m][:, : part_ranks[m].top.shape[1]]
        )
    # The distractors matter: some positive went down, so the mAP with them is lower.
    plain = evaluation.evaluate_methods(
        q, present, gnd, methods=("plain",), rerank_cfg=RERANK, missing=miss
    )[0]
    assert (
        part["plain"]["revisited"]["medium"]["map"] < plain["plain"]["revisited"]["medium"]["map"]
    )


def test_plain_map_by_hand_from_the_concatenated_ranking():
    """The plain row: mAP computed by hand (argsort of the concatenated scores, junk removed,
    trapezoidal AP) equals the bounded path's."""
    q, x, d, gnd = _benchmark(seed=1)
    part, _ = evaluation.evaluate_methods(
        q, x, gnd, methods=("plain",), rerank_cfg=RERANK, distractors=d
    )
    scores = q @ np.concatenate([x, d]).T
    aps = []
    for i, g in enumerate(gnd):
        ok = set(g["easy"]) | set(g["hard"])
        ranking = [j for j in np.argsort(-scores[i], kind="stable") if j not in set(g["junk"])]
        hits = [r for r, j in enumerate(ranking) if j in ok]
        ap = 0.0
        for k, r in enumerate(hits):
            ap += ((k / r if r else 1.0) + (k + 1) / (r + 1)) / 2 / len(ok)
        aps.append(ap)
    assert part["plain"]["revisited"]["medium"]["map"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_bounded_scan_over_many_blocks_equals_the_full_ranking():
    """Blocks of 64 rows, targets in several blocks (the ones read first), ties across blocks."""
    q, x, d, gnd = _benchmark(seed=2, distractors=500)
    db = np.concatenate([x, d])
    rows = bounded.Rows(x, d[:200], d[200:])
    targets = [
        np.unique(np.r_[g["easy"], g["hard"], g["junk"], [100, 300, 531]]).astype(np.int64)
        for g in gnd
    ]
    settings = pipeline.RerankSettings.from_config(
        {**RERANK, "diffusion": {**RERANK["diffusion"], "truncate": 50}}
    )
    ranked = bounded.rank_methods(
        METHODS, q, rows, settings, targets, top=20, truncate=50, block_size=64
    )
    dense = pipeline.Database(db, block_size=64)
    for m in METHODS:
        full = pipeline.rerank(m, q, dense, settings).ids
        part, _ = ranked[m]
        for i, t in enumerate(targets):
            expected = np.argsort(full[i])[t]  # id -> position
            np.testing.assert_array_equal(part.positions[i], expected, err_msg=m)
        np.testing.assert_array_equal(part.top, full[:, :20])


def test_rows_read_slices_and_gathers_across_parts(tmp_path):
    a, b = np.arange(12, dtype=np.float32).reshape(4, 3), -np.ones((2, 3), np.float32)
    c = np.arange(30, dtype=np.float32).reshape(10, 3) / 7
    np.save(tmp_path / "c.npy", c)
    rows = bounded.Rows(a, b, np.load(tmp_path / "c.npy", mmap_mode="r"))  # read, not mapped
    both = np.concatenate([a, b, c])
    assert rows.shape == (16, 3)
    for lo, hi in ((3, 5), (5, 9), (0, 16), (7, 16), (12, 13)):
        np.testing.assert_array_equal(rows[lo:hi], both[lo:hi])
    np.testing.assert_array_equal(rows[np.array([5, 0, 4, 15])], both[[5, 0, 4, 15]])


def test_methods_that_need_the_whole_graph_are_refused_with_distractors():
    q, x, d, gnd = _benchmark()
    with pytest.raises(ValueError, match="dba.*O\\(N²\\)"):
        evaluation.evaluate_methods(q, x, gnd, methods=("dba",), rerank_cfg=RERANK, distractors=d)
    with pytest.raises(ValueError, match="truncate"):
        evaluation.evaluate_methods(
            q, x, gnd, methods=("diffusion",), rerank_cfg=RERANK, distractors=d,
            distractor_truncate=0,
        )  # fmt: skip


def test_a_nan_distractor_is_named():
    q, x, d, gnd = _benchmark()
    d[5, 0] = np.nan
    with pytest.raises(ValueError, match=f"rows \\[{len(x) + 5}\\]"):
        evaluation.evaluate_methods(q, x, gnd, methods=("plain",), rerank_cfg=RERANK, distractors=d)


def test_original_protocol_subset_with_distractors_equals_the_full_ranking():
    q, x, d, gnd = _benchmark(seed=3)
    original = [{"ok": np.r_[g["easy"], g["hard"]].astype(np.int64), "junk": []} for g in gnd[1:4]]
    kwargs = dict(methods=("plain", "aqe"), rerank_cfg=RERANK, original_gnd=original)
    full, _ = evaluation.evaluate_methods(
        q, np.concatenate([x, d]), gnd, original_queries=[1, 2, 3], **kwargs
    )
    part, _ = evaluation.evaluate_methods(
        q, x, gnd, original_queries=[1, 2, 3], distractors=d, **kwargs
    )
    for m in ("plain", "aqe"):
        assert part[m]["original"]["map"] == full[m]["original"]["map"]
        np.testing.assert_array_equal(part[m]["original"]["aps"], full[m]["original"]["aps"])


def test_approximate_index_with_distractors_ranks_missed_ground_truth_last():
    """search.backend=ann: the index's top candidates, the rows it did not return by id, and the
    ground-truth images it missed last, as never retrieved (kind 'flat' returns the exact top,
    so the ranking is known in advance)."""
    q, x, d, gnd = _benchmark(distractors=3000)
    search_cfg = {"backend": "ann", "ann": {"kind": "flat"}}
    part, _ = evaluation.evaluate_methods(
        q, x, gnd, methods=("plain", "aqe"), rerank_cfg=RERANK, distractors=d,
        search_cfg=search_cfg,
    )  # fmt: skip
    assert "approximate index: flat" in part["plain"]["info"]["search"]
    scores = q @ np.concatenate([x, d]).T
    full = np.argsort(-scores, axis=1, kind="stable")
    head = full[:, :100]  # the candidates asked: max(top 100, α-QE's n)
    positives = [g["easy"] + g["hard"] for g in gnd]
    beyond = [np.isin(p, h, invert=True).any() for p, h in zip(positives, head, strict=True)]
    assert any(beyond)  # some positive lies past the candidates: its position is tested
    rows = []
    for h, g in zip(head, gnd, strict=True):
        rest = np.setdiff1d(np.arange(scores.shape[1]), h)
        late = np.isin(rest, g["easy"] + g["hard"] + g["junk"])
        rows.append(np.concatenate([h, rest[~late], rest[late]]))
    want = evaluation.evaluate_rankings(np.stack(rows), gnd, (1, 5, 10))
    _assert_same(part["plain"], want)
    exact, _ = evaluation.evaluate_methods(
        q, x, gnd, methods=("plain",), rerank_cfg=RERANK, distractors=d
    )
    # Positives past the candidates count as not retrieved: the mAP can only go down.
    assert part["plain"]["revisited"]["hard"]["map"] <= exact["plain"]["revisited"]["hard"]["map"]


def test_ann_scan_fills_missing_candidates_with_the_rows_it_did_not_return():
    class Partial:  # an index that found rows 4 and 1 only, of 6
        ntotal = 6

        def search(self, queries, k):
            ids = np.full((1, k), -1, np.int64)
            ids[0, :2] = [4, 1]
            return np.where(ids >= 0, 0.5, -np.inf).astype(np.float32), ids

    r = bounded.ann_scan(Partial(), np.ones((1, 3), np.float32), [np.array([0, 1, 3, 4])], 4)
    np.testing.assert_array_equal(r.top, [[4, 1, 2, 5]])  # then missed non-targets by id
    np.testing.assert_array_equal(r.positions[0], [4, 1, 5, 0])  # missed targets 0, 3 last
