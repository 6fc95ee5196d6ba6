"""Tuple losses against numbers worked out by hand and against the reference's [D, N] form."""

import numpy as np
import pytest
import tensorflow as tf

from cbir_tf.train import losses


def _unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _tuple(*rows):
    return tf.constant(np.stack(rows)[None], tf.float32)  # [1, T, D]


def test_contrastive_hand_worked():
    q = _unit(1, 0)
    p = _unit(0, 1)  # d = sqrt(2): pull term 0.5 * 2 = 1
    n_far = _unit(0.6, 0.8)  # d = sqrt(0.8) = 0.894 > 0.7: no push
    n_near = _unit(0.96, 0.28)  # d = sqrt(0.0016 + 0.0784) = 0.2828: 0.5 (0.7 - 0.2828)^2
    got = losses.contrastive_loss(_tuple(q, p, n_far, n_near), margin=0.7, eps=0.0).numpy()
    expected = 1.0 + 0.0 + 0.5 * (0.7 - np.sqrt(0.08)) ** 2
    assert got.shape == (1,)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_contrastive_eps_inside_norm_as_reference():
    # Identical negative: d = ||eps * 1|| = sqrt(D) eps, so the push is 0.5 (m - sqrt(2) eps)^2.
    q = _unit(1, 0)
    got = losses.contrastive_loss(_tuple(q, q, q), margin=0.7, eps=1e-3).numpy()[0]
    d = np.sqrt(2) * 1e-3
    np.testing.assert_allclose(got, 0.5 * d**2 + 0.5 * (0.7 - d) ** 2, rtol=1e-5)


def _reference_contrastive(x, label, margin=0.7, eps=1e-6):
    """cnnimageretrieval-pytorch layers/functional.contrastive_loss, in numpy ([D, N] layout)."""
    nq = int(np.sum(label == -1))
    s = x.shape[1] // nq
    x1 = np.repeat(x[:, ::s], s - 1, axis=1)
    x2 = x[:, label != -1]
    lbl = label[label != -1]
    d = np.sqrt(np.sum((x1 - x2 + eps) ** 2, axis=0))
    y = 0.5 * lbl * d**2 + 0.5 * (1 - lbl) * np.maximum(margin - d, 0) ** 2
    return np.sum(y)


def _reference_triplet(x, label, margin=0.1):
    """cnnimageretrieval-pytorch layers/functional.triplet_loss, in numpy."""
    nq = int(np.sum(label == -1))
    s = x.shape[1] // nq
    xa = np.repeat(x[:, label == -1], s - 2, axis=1)
    xp = np.repeat(x[:, label == 1], s - 2, axis=1)
    xn = x[:, label == 0]
    dp = np.sum((xa - xp) ** 2, axis=0)
    dn = np.sum((xa - xn) ** 2, axis=0)
    return np.sum(np.maximum(dp - dn + margin, 0))


def test_losses_match_reference_layout():
    rng = np.random.default_rng(0)
    b, t, d = 3, 6, 8
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    ref_x = x.reshape(b * t, d).T  # [D, N], tuples contiguous
    label = np.tile(np.array([-1, 1] + [0] * (t - 2)), b)
    got_c = losses.contrastive_loss(tf.constant(x), margin=0.7).numpy()
    got_t = losses.triplet_loss(tf.constant(x), margin=0.1).numpy()
    np.testing.assert_allclose(got_c.sum(), _reference_contrastive(ref_x, label), rtol=1e-5)
    np.testing.assert_allclose(got_t.sum(), _reference_triplet(ref_x, label), rtol=1e-5)
    assert (got_t >= 0).all() and got_t.shape == (b,)


def test_triplet_hand_worked():
    q = _unit(1, 0)
    p = _unit(0.8, 0.6)  # ||q - p||^2 = 0.04 + 0.36 = 0.4
    n1 = _unit(0, 1)  # ||q - n||^2 = 2: satisfied, 0
    n2 = _unit(0.6, 0.8)  # 0.16 + 0.64 = 0.8: 0.4 - 0.8 + 0.5 = 0.1
    got = losses.triplet_loss(_tuple(q, p, n1, n2), margin=0.5).numpy()[0]
    np.testing.assert_allclose(got, 0.1, rtol=1e-5)


def test_keras_wrapper_round_trip_and_graph_mode():
    loss = losses.TupleLoss("triplet", margin=0.2)
    clone = losses.TupleLoss.from_config(loss.get_config())
    assert (clone.kind, clone.margin) == ("triplet", 0.2)
    x = tf.random.normal([4, 5, 16])
    x = tf.math.l2_normalize(x, axis=-1)
    eager = loss(tf.zeros([4]), x)
    graph = tf.function(lambda y: clone(tf.zeros([4]), y))(x)
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), rtol=1e-6)
    np.testing.assert_allclose(eager.numpy(), losses.triplet_loss(x, 0.2).numpy().mean(), 1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.TupleLoss("arcface")


def test_float16_descriptors_are_computed_in_float32():
    x = tf.math.l2_normalize(tf.random.normal([2, 4, 8]), axis=-1)
    full = losses.contrastive_loss(x).numpy()
    half = losses.contrastive_loss(tf.cast(x, tf.float16))
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half.numpy(), full, atol=5e-3)


def test_tuple_without_negative_is_refused():
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        losses.contrastive_loss(tf.zeros([2, 2, 4]))
