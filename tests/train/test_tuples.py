"""Hard-negative mining: one negative per class, never the query's class, hardest first."""

import numpy as np
import pytest

from cbir_tf.train import tuples


def _random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _greedy_reference(scores_row, pool_labels, query_label, k):
    """The reference's walk down one query's ranking of the pool."""
    taken, classes = [], {query_label}
    for idx in np.argsort(-scores_row, kind="stable"):
        if pool_labels[idx] not in classes:
            taken.append(idx)
            classes.add(pool_labels[idx])
            if len(taken) == k:
                break
    return taken


def test_mining_matches_greedy_walk_and_rules():
    rng = np.random.default_rng(1)
    pool_labels = rng.integers(0, 7, size=60)
    pool = _random_unit(rng, 60, 12)
    query_labels = rng.integers(0, 7, size=15)
    queries = _random_unit(rng, 15, 12)
    neg, sims = tuples.mine_hard_negatives(queries, query_labels, pool, pool_labels, 4)
    assert neg.shape == (15, 4) and neg.dtype == np.int64
    scores = queries @ pool.T
    for q in range(15):
        assert neg[q].tolist() == _greedy_reference(scores[q], pool_labels, query_labels[q], 4)
        classes = pool_labels[neg[q]]
        assert len(set(classes.tolist())) == 4  # at most one negative per class
        assert query_labels[q] not in classes  # never a positive
        assert (np.diff(sims[q]) <= 1e-7).all()  # hardest first
        np.testing.assert_allclose(sims[q], scores[q, neg[q]], rtol=1e-6)


def test_mining_picks_the_hardest_of_each_class():
    # Query at (1, 0); class 1 has a near and a far image, class 2 one middle image.
    pool = np.array([[1, 0], [0.99, 0.141], [0, 1], [0.8, 0.6]], np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    pool_labels = np.array([0, 1, 1, 2])
    query = np.array([[1.0, 0.0]], np.float32)
    neg, _ = tuples.mine_hard_negatives(query, [0], pool, pool_labels, 2)
    assert neg.tolist() == [[1, 3]]


def test_mining_refuses_too_few_classes():
    pool = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="num_negatives=2"):
        tuples.mine_hard_negatives(pool[:1], [0], pool, np.array([0, 1, 1]), 2)


def test_query_positive_pairs():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # class 2 has a single image
    rng = np.random.default_rng(0)
    seen_pairs = set()
    for _ in range(50):
        q, p = tuples.sample_query_positive_pairs(labels, 20, rng)
        assert q.size == 9  # capped at the 9 eligible images, no repeats
        assert len(set(q.tolist())) == q.size
        assert 5 not in q.tolist() and 5 not in p.tolist()
        assert (labels[q] == labels[p]).all() and (q != p).all()
        seen_pairs.update(zip(q.tolist(), p.tolist(), strict=True))
    # Every other member of a class is drawn as a positive (uniform over the others).
    expected = {(a, b) for a in range(10) for b in range(10) if a != b and labels[a] == labels[b]}
    expected = {(a, b) for a, b in expected if labels[a] != 2}
    assert seen_pairs == expected


def test_create_epoch_tuples_describes_each_image_once():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(6), 5)
    table = _random_unit(rng, labels.size, 8)
    calls = []

    def describe(idx):
        calls.append(np.asarray(idx))
        return table[idx]

    t = tuples.create_epoch_tuples(labels, describe, 12, 20, 3, np.random.default_rng(0))
    assert len(calls) == 1 and len(np.unique(calls[0])) == calls[0].size
    arr = t.as_array()
    assert arr.shape == (12, 5)
    for row in arr:
        q, p, negs = row[0], row[1], row[2:]
        assert labels[p] == labels[q] and p != q
        assert len(set(labels[negs].tolist())) == 3 and labels[q] not in labels[negs]
    dists = np.linalg.norm(table[arr[:, :1]] - table[arr[:, 2:]], axis=-1)
    np.testing.assert_allclose(t.mean_negative_distance, dists.mean(), rtol=1e-5)


def test_check_tuple_labels_errors():
    with pytest.raises(ValueError, match="at least two images"):
        tuples.check_tuple_labels(np.arange(5), 2)
    with pytest.raises(ValueError, match="at least 4 classes"):
        tuples.check_tuple_labels(np.array([0, 0, 1, 1, 2]), 3)
