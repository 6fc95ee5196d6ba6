"""Tuning the approximate index for cost (cbir_tf.search.ann_tune): worked examples."""

import numpy as np
import pytest

from cbir_tf.search import ann_tune

COST = np.array([1.0, 2, 4, 8, 16])  # e.g. lists probed: 1, 2, 4, 8, 16


def _uniform(means, n_queries=100):
    """Every query with the same recall under each setting."""
    return np.tile(np.asarray(means, float), (n_queries, 1))


def _choose(recall, nearest, target, margin=0.005, far_recall=None, far_cost=None):
    """No settings of their own for the far queries unless given."""
    far = np.argsort(nearest, kind="stable")[:30]
    far_recall = recall[far] if far_recall is None else far_recall
    far_cost = COST if far_cost is None else far_cost
    return ann_tune.choose(
        recall, COST, far_recall, far_cost, nearest, target=target, margin=margin
    )


def test_the_cheapest_setting_that_reaches_the_target():
    recall = _uniform([0.80, 0.90, 0.96, 0.99, 1.0])
    c = _choose(recall, np.linspace(0.2, 0.9, 100), 0.95)
    assert (c["near"], c["far"], c["far_below"]) == (2, None, None)
    assert c["recall"] == 0.96 and c["target_met"] and c["cost"] == 4


def test_out_of_reach_the_cheapest_within_the_margin_of_the_best_and_the_miss_said():
    # The case: the best recall costs 16, 8 gives 0.005 less for half the cost.
    recall = _uniform([0.80, 0.90, 0.915, 0.930, 0.935])
    c = _choose(recall, np.linspace(0, 1, 100), 0.95)
    assert c["near"] == 3 and c["recall"] == 0.93 and c["best_recall"] == 0.935
    assert not c["target_met"]
    assert _choose(recall, np.linspace(0, 1, 100), 0.95, margin=0.0)["near"] == 4


def test_queries_far_from_every_centroid_get_a_setting_of_their_own_when_that_is_cheaper():
    # 90 queries near their list centroid find everything with the cheapest setting; the 10
    # farthest (lowest similarity to their nearest centroid) reach 0.6 only with the dearest.
    rng = np.random.default_rng(0)
    nearest = np.r_[rng.uniform(0.1, 0.2, 10), rng.uniform(0.5, 0.9, 90)]
    recall = np.vstack([_uniform([0.1, 0.2, 0.3, 0.45, 0.6], 10), _uniform([1.0] * 5, 90)])
    order = rng.permutation(100)
    c = _choose(recall[order], nearest[order], 0.96)
    # Without a split the dearest for everyone (cost 16); with it 0.9 * 1 + 0.1 * 16 = 2.5.
    assert (c["near"], c["far"]) == (0, 4) and c["far_share"] == 0.1
    assert 0.2 < c["far_below"] < 0.5 and c["cost"] == 2.5
    assert c["recall"] == 0.96 and c["recall_far"] == 0.6 and c["target_met"]
    # A setting only the far queries may use (more candidates) that is cheaper for them.
    far_recall = np.vstack([_uniform([0.1, 0.2, 0.3, 0.45, 0.6, 0.7], 10), _uniform([1.0] * 6, 20)])
    c = _choose(recall[order], nearest[order], 0.96, far_recall=far_recall,
                far_cost=np.r_[COST, 6.0])  # fmt: skip
    # 9 far queries at 0.7 (one left at 0.1): (90 + 0.1 + 6.3) / 100 for 0.91 + 9 * 0.06.
    assert (c["near"], c["far"], c["far_share"]) == (0, 5, 0.09) and c["recall"] == 0.964
    assert c["cost"] == pytest.approx(0.91 * 1 + 0.09 * 6)


def test_per_query_recall_leaves_the_query_row_out():
    exact = np.array([[5, 1, 2, 3], [7, 8, 9, 4]])
    approx = np.array([[1, 5, 2, 9], [8, 0, 7, 1]])
    r = ann_tune.per_query_recall(approx, exact, np.array([5, 7]), k=3)
    np.testing.assert_allclose(r, [2 / 3, 1 / 3])
