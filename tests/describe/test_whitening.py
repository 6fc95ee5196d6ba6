"""PCA-whitening: learning, the reference formulation, numpy == Keras layers, files."""

import os

import keras
import numpy as np
import pytest

from cbir_tf.describe import layers
from cbir_tf.describe.ops import pooling
from cbir_tf.describe.whitening import (
    Whitening,
    apply_regional_whitening,
    apply_whitening,
    learn_pca_whitening,
    learn_regional_whitening,
)


def _correlated(n, d, seed=0):
    rng = np.random.default_rng(seed)
    # Distinct variances along random directions, plus an offset, so the mean matters too.
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.geomspace(5.0, 0.05, d)
    return (rng.normal(size=(n, d)) * scales) @ basis.T + rng.normal(size=d)


def _reference_pcawhitenlearn(X):
    """cnnimageretrieval-pytorch `pcawhitenlearn` on [D, N] columns (eig, inverse sqrt)."""
    n = X.shape[1]
    m = X.mean(axis=1, keepdims=True)
    xc = X - m
    cov = xc @ xc.T
    cov = (cov + cov.T) / (2 * n)
    eigval, eigvec = np.linalg.eig(cov)
    order = eigval.argsort()[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    P = np.linalg.inv(np.sqrt(np.diag(eigval))) @ eigvec.T
    return m, P


def _cov(y):
    yc = y - y.mean(axis=0)
    return yc.T @ yc / len(y)


def test_whitened_training_data_has_identity_covariance():
    X = _correlated(3000, 12)
    w = learn_pca_whitening(X)
    assert w.projection.shape == (12, 12) and w.mean.shape == (12,)
    y = apply_whitening(X, w, l2=False).astype(np.float64)
    np.testing.assert_allclose(_cov(y), np.eye(12), atol=2e-5)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
    assert np.all(np.diff(w.eigenvalues) <= 0), "eigenvalues not in decreasing order"
    assert w.info["num_floored"] == 0 and w.info["num_samples"] == 3000
    np.testing.assert_allclose(w.info["explained_variance"], 1.0)


def test_matches_reference_formulation_up_to_component_signs():
    X = _correlated(500, 8, seed=1)
    m, P = _reference_pcawhitenlearn(X.T)
    ref = (P @ (X.T - m)).T
    ref = ref / (np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6)
    ours = apply_whitening(X, learn_pca_whitening(X))
    signs = np.sign(np.sum(ours * ref, axis=0))  # eigenvector signs are arbitrary
    np.testing.assert_allclose(ours * signs, ref, atol=1e-5)


@pytest.mark.parametrize("dim, regional", [(0, False), (5, False), (0, True)])
def test_each_component_has_its_largest_magnitude_entry_positive(dim, regional):
    # The documented sign rule: results across LAPACK builds rely on it. Each projection column
    # is an eigenvector times a positive scale, so the rule holds for the columns themselves.
    X = _correlated(400, 8, seed=3)
    if regional:
        w = learn_regional_whitening([X[:200].astype(np.float32), X[200:].astype(np.float32)])
    else:
        w = learn_pca_whitening(X, dim=dim)
    cols = np.asarray(w.projection, np.float64)
    largest = cols[np.argmax(np.abs(cols), axis=0), np.arange(cols.shape[1])]
    assert np.all(largest > 0), largest
    # Hand-worked: a 2-D cloud stretched along (1, -2): the first component points to (-1, 2)
    # (its largest-magnitude entry, -2 -> +2, made positive), the second to (2, 1).
    t, u = np.array([1.0, 1.0, -1.0, -1.0]), np.array([0.1, -0.1, 0.1, -0.1])  # uncorrelated
    pts = t[:, None] * np.array([1.0, -2.0]) + u[:, None] * np.array([2.0, 1.0])
    p = learn_pca_whitening(pts).projection
    np.testing.assert_allclose(p[:, 0] / np.linalg.norm(p[:, 0]), [-1 / 5**0.5, 2 / 5**0.5],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(p[:, 1] / np.linalg.norm(p[:, 1]), [2 / 5**0.5, 1 / 5**0.5],
                               atol=1e-6)  # fmt: skip


def test_dimension_reduction_keeps_top_components():
    X = _correlated(2000, 10, seed=2)
    full = learn_pca_whitening(X)
    reduced = learn_pca_whitening(X, dim=3)
    assert reduced.projection.shape == (10, 3)
    np.testing.assert_allclose(reduced.projection, full.projection[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reduced.eigenvalues, full.eigenvalues[:3])
    # The kept directions are those of largest variance: geomspace(5, 0.05) -> 25, 15.6, 9.7 ...
    np.testing.assert_allclose(reduced.eigenvalues, np.geomspace(5.0, 0.05, 10)[:3] ** 2, rtol=0.1)
    y = apply_whitening(X, reduced, l2=False).astype(np.float64)
    np.testing.assert_allclose(_cov(y), np.eye(3), atol=2e-5)
    assert 0.9 < reduced.info["explained_variance"] < 1.0


def test_shrinkage_interpolates_between_whitening_and_pca():
    X = _correlated(2000, 6, seed=3)
    rotation = learn_pca_whitening(X, shrinkage=1.0)
    # s = 1: an orthonormal rotation; the covariance becomes diag(eigenvalues).
    np.testing.assert_allclose(rotation.projection.T @ rotation.projection, np.eye(6), atol=1e-5)
    y = apply_whitening(X, rotation, l2=False).astype(np.float64)
    np.testing.assert_allclose(_cov(y), np.diag(rotation.eigenvalues), rtol=1e-4, atol=1e-5)
    half = learn_pca_whitening(X, shrinkage=0.5)
    y = apply_whitening(X, half, l2=False).astype(np.float64)
    np.testing.assert_allclose(_cov(y), np.diag(np.sqrt(half.eigenvalues)), rtol=1e-4, atol=1e-5)


def test_rank_deficient_training_set_does_not_blow_up():
    rng = np.random.default_rng(4)
    n, d = 10, 64
    X = rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = learn_pca_whitening(X, eig_floor=1e-5)
    assert np.all(np.isfinite(w.projection))
    # n centred vectors span n - 1 dimensions: every other eigenvalue is ~0 and floored.
    assert w.info["num_floored"] == d - (n - 1)
    # Column i is a unit eigenvector times lambda_i^-1/2: the floor caps the boost of any
    # direction at eig_floor^-1/2 times that of the strongest one.
    gains = np.linalg.norm(w.projection, axis=0)
    np.testing.assert_allclose(gains.max() / gains[0], 1e-5**-0.5, rtol=1e-4)
    # Within the span of the training data it still whitens exactly.
    y = apply_whitening(X, w, l2=False).astype(np.float64)
    np.testing.assert_allclose(_cov(y)[: n - 1, : n - 1], np.eye(n - 1), atol=1e-4)
    new = rng.normal(size=(5, d))
    out = apply_whitening(new, w)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Without the floor the same data would divide by ~0: the floor is what keeps it sane.
    with pytest.raises(ValueError, match="zero eigenvalues|eig_floor"):
        learn_pca_whitening(np.ones((5, 4)), eig_floor=0.0)


def test_numpy_apply_equals_pca_whitening_layer():
    X = _correlated(400, 16, seed=5).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = learn_pca_whitening(X[:300], dim=8)
    test = X[300:]
    inputs = keras.Input(shape=(16,))
    whitened = layers.PCAWhitening.from_whitening(w)(inputs)
    model = keras.Model(inputs, layers.L2Normalization()(whitened))
    np.testing.assert_allclose(
        np.asarray(model(test)), apply_whitening(test, w), rtol=1e-5, atol=2e-6
    )
    np.testing.assert_allclose(
        np.asarray(model.layers[1](test)), apply_whitening(test, w, l2=False), rtol=1e-4, atol=1e-5
    )


def _regional_model(w, channels):
    inputs = keras.Input(shape=(None, channels))
    x = layers.L2Normalization()(inputs)
    x = layers.PCAWhitening.from_whitening(w)(x)
    x = layers.L2Normalization()(x)
    x = layers.SumRegions()(x)
    return keras.Model(inputs, layers.L2Normalization()(x))


def test_regional_numpy_equals_layer_chain():
    rng = np.random.default_rng(6)
    fmaps = rng.random((12, 9, 13, 16), dtype=np.float32)
    regions = pooling.rmac_region_vectors(fmaps).numpy()  # [12, R, 16], raw region MACs
    w = learn_regional_whitening(regions[:8], dim=10)
    assert w.info["regional"] is True and w.info["num_samples"] == 8 * regions.shape[1]
    expected = apply_regional_whitening(regions[8:], w)
    assert expected.shape == (4, 10)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    model = _regional_model(w, 16)
    np.testing.assert_allclose(np.asarray(model(regions[8:])), expected, rtol=1e-5, atol=2e-6)
    # Images of different sizes have different R: learning from a list gives the same result.
    other = pooling.rmac_region_vectors(rng.random((3, 4, 30, 16), dtype=np.float32)).numpy()
    as_list = learn_regional_whitening([*regions[:8], *other], dim=10)
    stacked = np.concatenate([regions[:8].reshape(-1, 16), other.reshape(-1, 16)])
    as_array = learn_regional_whitening(stacked[None], dim=10)
    np.testing.assert_allclose(as_list.projection, as_array.projection, rtol=1e-5, atol=1e-6)
    flat = learn_regional_whitening(stacked, dim=10)  # [M, D] rows, as gathered image by image
    np.testing.assert_allclose(flat.projection, as_array.projection, rtol=1e-5, atol=1e-6)
    # It is learned on L2-normalised regions: raw vectors would give another whitening.
    raw = learn_pca_whitening(stacked, dim=10)
    assert not np.allclose(raw.mean, flat.mean, atol=1e-3)


def test_regional_pipeline_with_identity_whitening_is_normalised_rmac():
    # With no whitening (mean 0, identity) the classic chain reduces to L2(R-MAC).
    rng = np.random.default_rng(8)
    fmaps = rng.random((3, 7, 11, 8), dtype=np.float32)
    identity = Whitening(mean=np.zeros(8), projection=np.eye(8), eigenvalues=np.ones(8))
    regional = apply_regional_whitening(pooling.rmac_region_vectors(fmaps).numpy(), identity)
    rmac = pooling.rmac(fmaps).numpy()
    np.testing.assert_allclose(
        regional, rmac / np.linalg.norm(rmac, axis=1, keepdims=True), atol=1e-5
    )


def test_save_load_and_dict_round_trip(tmp_path):
    w = learn_pca_whitening(_correlated(300, 6, seed=9), dim=4, info={"dataset": "roxford5k"})
    path = tmp_path / "whitening.npz"
    w.save(path)
    assert sorted(os.listdir(tmp_path)) == ["whitening.npz"]  # no temporary file left behind
    loaded = Whitening.load(path)
    for name in ("mean", "projection", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(w, name))
    assert loaded.info == w.info and loaded.info["dataset"] == "roxford5k"
    assert loaded.projection.dtype == np.float32
    with np.load(path, allow_pickle=False) as data:  # a plain, pickle-free npz
        assert {"mean", "projection", "eigenvalues", "info_json"} <= set(data.files)
    again = Whitening.from_dict(w.to_dict())
    np.testing.assert_array_equal(again.projection, w.projection)
    assert again.info == w.info and (again.input_dim, again.output_dim) == (6, 4)
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="not a whitening file"):
        Whitening.load(tmp_path / "other.npz")


def test_bad_arguments_are_refused():
    X = _correlated(50, 5)
    with pytest.raises(ValueError, match="dim must be"):
        learn_pca_whitening(X, dim=6)
    with pytest.raises(ValueError, match="shrinkage"):
        learn_pca_whitening(X, shrinkage=1.5)
    bad = X.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        learn_pca_whitening(bad)
    with pytest.raises(ValueError, match="at least 2"):
        learn_pca_whitening(X[:1])
    w = learn_pca_whitening(X)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        apply_whitening(X[:, :4], w)
    with pytest.raises(ValueError, match=r"\[N, R, 5\]"):
        apply_regional_whitening(X, w)
    with pytest.raises(ValueError, match="does not match"):
        Whitening(mean=np.zeros(3), projection=np.zeros((4, 2)), eigenvalues=np.ones(2))
