"""Tests for cbir_tf.search.exact: blocked exact top-k, tie-breaking, validation, faiss backend."""

import sys

import numpy as np
import pytest

from cbir_tf.search import exact as search
from cbir_tf.search.index import SearchIndex


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _knn(queries, database, k, block_size=65536, backend="exact", **faiss_kwargs):
    index = SearchIndex(database, block_size=block_size, backend=backend, **faiss_kwargs)
    return index.search(queries, k)


def _brute(queries, database, k):
    s = queries.astype(np.float32) @ database.astype(np.float32).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return _unit(rng, 30, 16), _unit(rng, 1000, 16)


@pytest.mark.parametrize("block_size", [1, 7, 64, 333, 1000, 65536])
def test_knn_matches_brute_force(data, block_size):
    q, x = data
    s, i = _knn(q, x, 10, block_size=block_size)
    bs, bi = _brute(q, x, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64
    assert s.shape == i.shape == (30, 10)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=0, atol=1e-6)
    assert np.all(np.diff(s, axis=1) <= 0)


def test_ties_keep_lower_ids_across_blocks():
    rng = np.random.default_rng(1)
    base = _unit(rng, 4, 8)
    # Ten copies of each of four vectors, interleaved: every score is tied ten times.
    x = np.tile(base, (10, 1))
    for block_size in (3, 5, 40):
        s, i = _knn(base, x, 6, block_size=block_size)
        for qi in range(4):
            expected = np.arange(qi, 40, 4)[:6]  # the copies of query qi, lowest ids first
            np.testing.assert_array_equal(i[qi], expected)
            np.testing.assert_allclose(s[qi], 1.0, atol=1e-6)


def test_tie_at_kth_place_keeps_lower_id():
    x = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8], [0.6, 0.8], [0, 1]], np.float32)
    q = np.array([[1, 0]], np.float32)
    # scores: 1, .6, .6, .6, 0 -> the two places after id 0 go to ids 1 and 2.
    for block_size in (1, 2, 5):
        _, i = _knn(q, x, 3, block_size=block_size)
        np.testing.assert_array_equal(i, [[0, 1, 2]])


def test_memmap_database(tmp_path, data):
    q, x = data
    path = tmp_path / "db.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    s, i = _knn(q, mm, 5, block_size=128)
    bs, bi = _brute(q, x, 5)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, atol=1e-6)
    assert search.validate_descriptors(mm, "db") is mm  # validated without a copy


def test_k_larger_than_n_is_clipped(data):
    q, x = data
    s, i = _knn(q, x[:5], 50)
    assert s.shape == i.shape == (30, 5)
    np.testing.assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(5), (30, 1)))


def test_bad_k_empty_database_and_empty_queries(data):
    q, x = data
    with pytest.raises(ValueError, match="k must be a positive integer"):
        _knn(q, x, 0)
    with pytest.raises(ValueError, match="database is empty"):
        _knn(q, np.zeros((0, 16), np.float32), 3)
    s, i = _knn(np.zeros((0, 16), np.float32), x, 3)
    assert s.shape == i.shape == (0, 3)


def test_validation_names_rows():
    x = np.ones((12, 4), np.float32)
    x[3, 1] = np.nan
    x[7] = 0
    x[9, 0] = np.inf
    with pytest.raises(ValueError) as err:
        search.validate_descriptors(x, "database", block_size=5)
    msg = str(err.value)
    assert "database" in msg and "NaN or Inf values in row(s) [3, 9]" in msg
    assert "all-zero vectors in row(s) [7]" in msg
    with pytest.raises(ValueError, match=r"queries \[3, 4\] .* row\(s\) \[1\]"):
        _knn(x[[0, 7, 0]], np.ones((3, 4), np.float32), 1)


def test_validation_many_rows_is_abbreviated():
    x = np.zeros((50, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(50 rows in all\)"):
        search.validate_descriptors(x)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones(4, np.float32), "2-D"),
        (np.ones((3, 4), np.int32), "floating-point"),
        (np.ones((3, 0), np.float32), "dimension 0"),
    ],
)
def test_validation_shapes_and_dtypes(bad, match):
    with pytest.raises(ValueError, match=match):
        search.validate_descriptors(bad)


def test_dimension_mismatch(data):
    q, x = data
    with pytest.raises(ValueError, match="dimension 8 but 16 was expected"):
        _knn(q[:, :8], x, 3)


def test_rank_all(data):
    q, x = data
    ranks, scores = search.rank_all(q, x)
    assert ranks.dtype == np.int64 and ranks.shape == (30, 1000)
    np.testing.assert_allclose(scores, q @ x.T, atol=1e-6)
    _, bi = _brute(q, x, 1000)
    np.testing.assert_array_equal(ranks, bi)
    dup = np.tile(x[:3], (3, 1))  # ties ranked by id
    r, _ = search.rank_all(x[:1], dup)
    np.testing.assert_array_equal(r[0, :3], [0, 3, 6])


def test_knn_graph_includes_self(data):
    _, x = data
    sims, ids = _knn(x, x, 8, block_size=100)
    assert sims.shape == ids.shape == (1000, 8)
    np.testing.assert_array_equal(ids[:, 0], np.arange(1000))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    _, bi = _brute(x, x, 8)
    np.testing.assert_array_equal(ids, bi)


def test_refine_knn_float64(data):
    q, x = data
    _, ids = _knn(q, x, 12)
    sims, rid = search.refine_knn(q, x, ids[:, ::-1])
    assert sims.dtype == np.float64
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-exact, axis=1, kind="stable")[:, :12]
    np.testing.assert_array_equal(rid, order)
    np.testing.assert_allclose(sims, np.take_along_axis(exact, order, axis=1), rtol=1e-12)
    missing = ids.copy()
    missing[:, 3] = -1
    s2, i2 = search.refine_knn(q, x, missing)
    assert np.all(i2[:, -1] == -1) and np.all(np.isneginf(s2[:, -1]))


def test_inner_products_blocked(data):
    q, x = data
    np.testing.assert_allclose(search.inner_products(q, x, block_size=77), q @ x.T, atol=1e-6)
    out64 = search.inner_products(q, x, block_size=77, dtype=np.float64)
    assert out64.dtype == np.float64


def test_search_index_reuse_and_unknown_backend(data):
    q, x = data
    index = SearchIndex(x, block_size=256)
    assert (index.ntotal, index.dim) == (1000, 16)
    np.testing.assert_array_equal(index.search(q, 4)[1], _brute(q, x, 4)[1])
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        SearchIndex(x, backend="annoy")


def test_missing_faiss_error_names_extra(monkeypatch, data):
    q, x = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"\[faiss\]"):
        _knn(q, x, 3, backend="faiss")


def test_faiss_flat_matches_exact(data):
    pytest.importorskip("faiss")
    q, x = data
    s, i = _knn(q, x, 10, backend="faiss")
    bs, bi = _brute(q, x, 10)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    # Identical ids except where float rounding could swap near-ties.
    gaps = np.abs(np.diff(bs, axis=1)) > 1e-5
    same = i == bi
    assert np.all(same[:, 0]) and np.all(same[:, 1:] | ~gaps)
    dup = np.tile(x[:2], (5, 1))
    _, di = _knn(x[:1], dup, 3, backend="faiss")
    np.testing.assert_array_equal(di, [[0, 2, 4]])  # ties re-sorted by id


def test_faiss_approximate_recall_and_graph(data):
    pytest.importorskip("faiss")
    q, x = data
    _, i = _knn(q, x, 10, backend="faiss", faiss_factory="HNSW32", ef_search=64)
    _, bi = _brute(q, x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, bi, strict=True)])
    assert recall > 0.9
    _, gi = _knn(x, x, 5, backend="faiss", faiss_factory="IVF16,Flat", nprobe=16)
    np.testing.assert_array_equal(gi, _brute(x, x, 5)[1])  # nprobe = all lists: exact
