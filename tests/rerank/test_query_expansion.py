"""Tests for cbir_tf.rerank.query_expansion: alphaQE (alpha 0: average QE), DBA."""

import numpy as np
import pytest

from cbir_tf.rerank import query_expansion as qe


def _unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def small():
    # Query along x; database ranked by similarity to it: ids 2 (0.8), 0 (0.6), 1 (-0.6).
    q = _unit([[1.0, 0.0, 0.0]])
    x = _unit([[0.6, 0.8, 0.0], [-0.6, 0.0, 0.8], [0.8, 0.0, 0.6]])
    return q, x


def test_alpha_qe_by_hand(small):
    q, x = small
    out = qe.alpha_query_expansion(q, x, n=2, alpha=3.0)
    expected = q[0] + 0.8**3 * x[2] + 0.6**3 * x[0]  # the query enters with weight 1
    expected /= np.linalg.norm(expected)
    assert out.dtype == np.float32 and out.shape == (1, 3)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_negative_similarities_are_clipped(small):
    q, x = small
    # n = 3 reaches id 1 (similarity -0.6): weight max(-0.6, 0)^3 = 0, so nothing changes.
    np.testing.assert_allclose(
        qe.alpha_query_expansion(q, x, n=3, alpha=3.0),
        qe.alpha_query_expansion(q, x, n=2, alpha=3.0),
        rtol=1e-6,
    )
    # A non-integer alpha must not turn the negative similarity into NaN.
    assert np.isfinite(qe.alpha_query_expansion(q, x, n=3, alpha=2.5)).all()


def test_alpha_zero_is_average_qe(small):
    q, x = small
    avg = qe.alpha_query_expansion(q, x, n=2, alpha=0.0)
    expected = q[0] + x[2] + x[0]
    np.testing.assert_allclose(avg[0], expected / np.linalg.norm(expected), rtol=1e-6)


def test_n_zero_and_n_larger_than_database(small):
    q, x = small
    np.testing.assert_allclose(qe.alpha_query_expansion(q, x, n=0), q, rtol=1e-6)
    np.testing.assert_allclose(
        qe.alpha_query_expansion(q, x, n=10), qe.alpha_query_expansion(q, x, n=3), rtol=1e-6
    )
    with pytest.raises(ValueError, match="n must be >= 0"):
        qe.alpha_query_expansion(q, x, n=-1)


def test_outputs_are_unit_float32():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((200, 32)))
    q = _unit(rng.standard_normal((7, 32)))
    for out in (
        qe.alpha_query_expansion(q, x),
        qe.alpha_query_expansion(q, x, 5, alpha=0.0),
        qe.database_side_augmentation(x),
    ):
        assert out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_database_side_augmentation_matches_loop():
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((60, 8)))
    out = qe.database_side_augmentation(x, n=3, alpha=3.0, block_size=17)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    for i in range(60):
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i][:3]
        v = x[i].astype(np.float64) + sum(max(s[i, j], 0) ** 3 * x[j] for j in order)
        np.testing.assert_allclose(out[i], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)


def test_database_side_augmentation_duplicates():
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((5, 8)))
    x = np.concatenate([base, base, base])  # every vector three times: ties with itself
    out = qe.database_side_augmentation(x, n=2, alpha=3.0)
    assert np.isfinite(out).all()
    # Each item plus its two exact copies (weight 1 each): the direction is unchanged.
    np.testing.assert_allclose(out, x, atol=1e-6)
    single = qe.database_side_augmentation(x[:1], n=2)  # N = 1: no neighbour to add
    np.testing.assert_allclose(single, x[:1], rtol=1e-6)


def test_bad_input_names_rows(small):
    q, x = small
    bad_q = np.concatenate([q, np.zeros((1, 3), np.float32)])
    with pytest.raises(ValueError, match=r"queries .*row\(s\) \[1\]"):
        qe.alpha_query_expansion(bad_q, x)
    bad_x = x.copy()
    bad_x[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"database .*row\(s\) \[2\]"):
        qe.database_side_augmentation(bad_x)
    with pytest.raises(ValueError, match="database is empty"):
        qe.alpha_query_expansion(q, np.zeros((0, 3), np.float32))


def test_alpha_qe_helps_on_golden_manifolds(golden_dir):
    with np.load(golden_dir / "diffusion_public.npz", allow_pickle=False) as g:
        x, q, labels, qlabels = g["X"], g["Q"], g["labels"], g["qlabels"]

    def label_map(queries, database):
        aps = []
        for qi in range(len(queries)):
            order = np.argsort(-(database @ queries[qi]), kind="stable")
            hits = np.flatnonzero(labels[order] == qlabels[qi]) + 1
            aps.append(np.mean(np.arange(1, hits.size + 1) / hits))
        return float(np.mean(aps))

    plain = label_map(q, x)
    assert plain == pytest.approx(0.448, abs=5e-4)
    assert label_map(qe.alpha_query_expansion(q, x, 2, 3.0), x) > plain + 0.004
