"""Tests for cbir_tf.rerank.diffusion against the reference's golden values and by hand."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from cbir_tf.rerank import cg, graph
from cbir_tf.rerank import diffusion as dfu
from cbir_tf.rerank.product import BlockedSparseProduct


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "diffusion_public.npz", allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def golden_affinity(golden):
    return dfu.knn_affinity(golden["X"], k=50, gamma=3.0)


def _label_map(scores, labels, qlabels):
    aps = []
    for q in range(scores.shape[0]):
        order = np.argsort(-scores[q], kind="stable")
        hits = np.flatnonzero(labels[order] == qlabels[q]) + 1
        aps.append(np.mean(np.arange(1, hits.size + 1) / hits))
    return float(np.mean(aps))


def _rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ---------------------------------------------------------------- golden (reference) values


def test_graph_matches_reference(golden, golden_affinity):
    n = golden["X"].shape[0]
    ref = sp.csr_matrix(
        (golden["graph_weights"], (golden["graph_rows"], golden["graph_cols"])), shape=(n, n)
    )
    a = golden_affinity
    assert a.dtype == np.float64 and sp.issparse(a)
    assert a.nnz == ref.nnz
    ours = set(zip(*a.nonzero(), strict=True))
    theirs = set(zip(golden["graph_rows"].tolist(), golden["graph_cols"].tolist(), strict=True))
    assert ours == theirs
    rows, cols = golden["graph_rows"], golden["graph_cols"]
    np.testing.assert_allclose(
        np.asarray(a[rows, cols]).ravel(), golden["graph_weights"], rtol=1e-12
    )
    assert a.diagonal().max() == 0


def test_graph_via_float32_search_and_float64_refinement(golden, golden_affinity, monkeypatch):
    # Large databases take the blocked float32 search + float64 re-scoring path; force it here.
    monkeypatch.setattr(graph, "_DIRECT_FLOAT64", 0)
    a = dfu.knn_affinity(golden["X"], k=50, gamma=3.0, block_size=700)
    assert set(zip(*a.nonzero(), strict=True)) == set(zip(*golden_affinity.nonzero(), strict=True))
    rows, cols = golden["graph_rows"], golden["graph_cols"]
    np.testing.assert_allclose(
        np.asarray(a[rows, cols]).ravel(), golden["graph_weights"], rtol=1e-12
    )


def test_scores_cg20_match_reference(golden):
    scores, info = dfu.diffusion_scores(
        golden["Q"], golden["X"], max_iter=20, tol=1e-6, return_info=True
    )
    assert scores.dtype == np.float64 and scores.shape == (20, 2000)
    assert _rel_err(scores, golden["scores_cg20"]) < 1e-6
    # The reference setting stops before the tolerance for most queries: reported, not hidden.
    assert not info.all_converged
    assert info.iterations.shape == info.residuals.shape == info.converged.shape == (20,)
    assert np.all(info.residuals[~info.converged] > 1e-6)
    assert np.all(info.residuals[info.converged] <= 1e-6)
    assert np.all(info.iterations <= 20)
    assert "converged" in info.summary()


def test_scores_exact_match_reference(golden, golden_affinity):
    scores, info = dfu.diffusion_scores(
        golden["Q"], golden["X"], tol=1e-12, max_iter=2000, return_info=True,
        affinity=golden_affinity,
    )  # fmt: skip
    assert info.all_converged
    assert _rel_err(scores, golden["scores_exact"]) < 1e-6


def test_label_map_plain_vs_diffusion(golden):
    x, q = golden["X"], golden["Q"]
    plain = _label_map(q @ x.T, golden["labels"], golden["qlabels"])
    diffused = _label_map(dfu.diffusion_scores(q, x), golden["labels"], golden["qlabels"])
    assert plain == pytest.approx(0.448, abs=5e-4)
    assert diffused == pytest.approx(1.0, abs=1e-9)


def test_vectorised_solve_equals_scipy_per_query(golden, golden_affinity):
    s = dfu.normalize_affinity(golden_affinity)
    y = dfu.query_vectors(golden["Q"][:5], golden["X"], 10, 3.0)
    f, info = cg.conjugate_gradient(dfu.diffusion_operator(s, 0.99), y, max_iter=500, tol=1e-10)
    m = sp.identity(s.shape[0], format="csr") - 0.99 * s
    for q in range(5):
        ref, flag = spla.cg(m, y[:, q], rtol=1e-10, maxiter=500)
        assert flag == 0
        np.testing.assert_allclose(f[:, q], ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    assert info.all_converged


# ---------------------------------------------------------------- the solver


def _spd(n, seed, low=1e-3):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (basis * np.geomspace(low, 1.0, n)) @ basis.T


def _reference_pcg(m, b, max_iter, tol):
    """Plain single-column CG keeping every iterate; returns (x, relres) like Matlab's pcg."""
    x = np.zeros_like(b)
    r = b.copy()
    iterates = [(np.linalg.norm(b), x.copy())]
    p = r.copy()
    rho = r @ r
    for _ in range(max_iter):
        q = m @ p
        a = rho / (p @ q)
        x = x + a * p
        r = r - a * q
        true = np.linalg.norm(b - m @ x)
        iterates.append((true, x.copy()))
        if true <= tol * np.linalg.norm(b):
            return x, true / np.linalg.norm(b), True
        rho, rho_old = r @ r, rho
        p = r + (rho / rho_old) * p
    best = min(iterates, key=lambda t: t[0])
    return best[1], best[0] / np.linalg.norm(b), False


def test_unconverged_returns_min_residual_iterate():
    # Small, well-conditioned systems: CG's rounding stays tiny, but its residual norm is not
    # monotone, so stopping early sometimes leaves a worse last iterate than an earlier one.
    earlier = 0
    for seed in range(3):
        m = _spd(12, seed, low=1e-2)
        b = np.random.default_rng(seed + 100).standard_normal(12)
        for max_iter in range(1, 11):
            x, info = cg.conjugate_gradient(m, b, max_iter=max_iter, tol=1e-14)
            ref_x, ref_res, _ = _reference_pcg(m, b, max_iter, 1e-14)
            np.testing.assert_allclose(x, ref_x, rtol=1e-9, atol=1e-12)
            assert info.residuals[0] == pytest.approx(ref_res, rel=1e-9)
            assert not info.converged[0] and info.iterations[0] <= max_iter
            last = np.linalg.norm(b - m @ _plain_cg_last(m, b, max_iter)) / np.linalg.norm(b)
            earlier += bool(info.iterations[0] < max_iter and last > info.residuals[0] * 1.001)
    assert earlier >= 3  # some runs really returned an earlier, better iterate


def _plain_cg_last(m, b, max_iter):
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rho = r @ r
    for _ in range(max_iter):
        q = m @ p
        a = rho / (p @ q)
        x, r = x + a * p, r - a * q
        rho, rho_old = r @ r, rho
        p = r + (rho / rho_old) * p
    return x


def test_columns_are_independent_and_frozen():
    m = _spd(40, 2, low=1e-2)
    rng = np.random.default_rng(3)
    eigvec = np.linalg.eigh(m)[1][:, 5]
    b = np.stack([rng.standard_normal(40), np.zeros(40), eigvec, rng.standard_normal(40)], 1)
    ms = sp.csr_matrix(m)
    x, info = cg.conjugate_gradient(ms, b, max_iter=200, tol=1e-9)
    assert info.all_converged and not info.breakdown.any()
    assert info.iterations[1] == 0 and info.residuals[1] == 0  # b = 0: x = 0 at once
    assert info.iterations[2] == 1  # an eigenvector converges in one step
    np.testing.assert_array_equal(x[:, 1], 0)
    for c in range(4):
        xc, ic = cg.conjugate_gradient(ms, b[:, c], max_iter=200, tol=1e-9)
        # Same recurrence; only rounding differs (column-wise reductions over other shapes).
        np.testing.assert_allclose(x[:, c], xc, rtol=1e-6, atol=1e-9)
        # (rounding may move the stopping test across the tolerance by one iteration)
        assert abs(int(ic.iterations[0]) - int(info.iterations[c])) <= 1
        np.testing.assert_allclose(m @ x[:, c], b[:, c], atol=1e-8 * max(1, np.abs(b).max()))


def test_breakdown_is_reported_without_nan():
    m = np.diag([1.0, -1.0])  # indefinite: p'Mp = 0 on the first step for b = (1, 1)
    x, info = cg.conjugate_gradient(m, np.array([[1.0], [1.0]]), max_iter=10)
    assert np.isfinite(x).all()
    assert info.breakdown[0] and not info.converged[0]
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg.conjugate_gradient(m, np.array([np.nan, 1.0]))


class _FusedOperator:
    """A matrix behind the `writes_out` protocol (out= and col_dots=), as DiffusionOperator."""

    writes_out = True

    def __init__(self, m):
        self.m = m
        self.calls = 0

    def __call__(self, p, cols=None, out=None, col_dots=False):
        self.calls += 1
        q = np.asarray(self.m @ p)
        if out is not None:
            out[...] = q
            q = out
        return (q, np.einsum("ij,ij->j", p, q)) if col_dots else q


@pytest.fixture(scope="module")
def staggered(golden, golden_affinity):
    """M = I - 0.99 S on the golden graph and 70 right-hand sides that finish at different
    iterations: 40 eigenvectors of S (one step each), 29 query vectors and a zero column."""
    s = dfu.normalize_affinity(golden_affinity)
    _, vecs = spla.eigsh(s, k=40, which="LA")
    y = dfu.query_vectors(golden["Q"], golden["X"], 10, 3.0)
    y = np.concatenate([y, y[:, :9] + 0.5 * y[:, 10:19]], 1)
    b = np.concatenate([vecs[:, :20], y[:, :15], np.zeros((s.shape[0], 1)), vecs[:, 20:],
                        y[:, 15:]], 1)  # fmt: skip
    return s, b


@pytest.mark.parametrize("max_iter, tol", [(500, 1e-10), (12, 1e-12)])
def test_fused_operator_parks_and_compacts_like_single_solves(
    staggered, monkeypatch, max_iter, tol
):
    # Several row ranges (run in threads) of several chunks, whatever the machine; early
    # columns are parked, then compacted; with max_iter 12 every column with 12 iterations ends
    # by the xmin rule.
    monkeypatch.setenv("CBIR_NUM_THREADS", "3")
    monkeypatch.setattr(cg._RowRanges, "_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(cg, "_CHUNK_BYTES", 1 << 15)
    s, b = staggered
    n = s.shape[0]
    assert len(cg._RowRanges(n, b.shape[1]).slices) == 3
    op = dfu.diffusion_operator(s, 0.99)
    x, info = cg.conjugate_gradient(op, b, max_iter=max_iter, tol=tol)
    assert np.isfinite(x).all() and not info.breakdown.any()
    assert (info.iterations[:20] == 1).all() and (info.iterations[36:56] == 1).all()
    assert info.iterations[35] == 0 and info.converged[35] and (x[:, 35] == 0).all()
    assert len(set(info.iterations[info.iterations > 1].tolist())) >= 2  # staggered finishes
    m = sp.identity(n, format="csr") - 0.99 * s
    for c in range(b.shape[1]):
        xc, ic = cg.conjugate_gradient(m, b[:, c], max_iter=max_iter, tol=tol)
        np.testing.assert_allclose(x[:, c], xc, rtol=0, atol=1e-9 * max(1e-12, np.abs(xc).max()))
        assert ic.converged[0] == info.converged[c]
        assert abs(int(ic.iterations[0]) - int(info.iterations[c])) <= 1
        assert ic.residuals[0] == pytest.approx(info.residuals[c], rel=1e-6, abs=1e-14)
    if max_iter == 12:
        assert not info.converged[info.iterations > 1].any()


def test_fused_protocol_equals_plain_operator():
    # Same matrix behind the fused protocol and as a plain matrix: identical recurrences,
    # including the xmin rule and a breakdown column (indefinite M).
    m = _spd(30, 4, low=1e-2)
    m[0, 0] = -m[0, 0] - 1.0  # makes some p'Mp <= 0
    rng = np.random.default_rng(5)
    b = rng.standard_normal((30, 6))
    b[:, 1] = 0.0
    b[:, 2] = np.eye(30)[0]  # p'Mp < 0 at once: breakdown
    fused = _FusedOperator(m)
    x1, i1 = cg.conjugate_gradient(fused, b, max_iter=8, tol=1e-12)
    x2, i2 = cg.conjugate_gradient(m, b, max_iter=8, tol=1e-12)
    np.testing.assert_allclose(x1, x2, rtol=1e-12, atol=1e-14)
    for field in ("iterations", "converged", "breakdown"):
        np.testing.assert_array_equal(getattr(i1, field), getattr(i2, field))
    np.testing.assert_allclose(i1.residuals, i2.residuals, rtol=1e-12)
    assert i1.breakdown[2] and np.isfinite(x1).all() and fused.calls > 0


def test_num_threads(monkeypatch):
    monkeypatch.delenv("CBIR_NUM_THREADS", raising=False)
    assert 1 <= cg.num_threads() <= 32
    monkeypatch.setenv("CBIR_NUM_THREADS", "5")
    assert cg.num_threads() == 5
    monkeypatch.setenv("CBIR_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="CBIR_NUM_THREADS"):
        cg.num_threads()


def test_blocked_sparse_product(monkeypatch):
    monkeypatch.setattr(BlockedSparseProduct, "_MIN_WORK", 1 << 16)  # several ranges
    rng = np.random.default_rng(11)
    s = sp.random(3000, 3000, density=0.01, random_state=12, format="csr")
    p = rng.standard_normal((3000, 40))
    direct = 1.5 * p - 0.7 * (s @ p)
    # Small cache: several column blocks; three row ranges in threads.
    product = BlockedSparseProduct(s, cache_bytes=8 * 40 * 1024, threads=3)
    out = np.full((3000, 40), np.nan)
    got, dots = product(p, out=out, scale=-0.7, shift=1.5, col_dots=True)
    assert got is out and len(product._parts) == 3 and len(product._parts[0][2]) == 3
    np.testing.assert_allclose(got, direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dots, np.einsum("ij,ij->j", p, direct), rtol=1e-12)
    np.testing.assert_allclose(product(p[:, ::2]), s @ p[:, ::2], rtol=1e-12, atol=1e-12)
    # One column (scipy's own product) and a non-contiguous p.
    got1, dots1 = product(p[:, 3:4], scale=2.0, col_dots=True)
    np.testing.assert_allclose(got1, 2.0 * (s @ p[:, 3:4]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dots1, [p[:, 3] @ got1[:, 0]], rtol=1e-12)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        product(p, out=np.empty((40, 3000)).T)
    with pytest.raises(ValueError, match="shape"):
        product(p, out=np.empty((3000, 39)))


def test_blocked_sparse_product_default_blocks(monkeypatch):
    # A P that fits the last-level cache gets L2-sized column blocks, a larger one LLC-sized.
    s = sp.random(3000, 3000, density=0.01, random_state=12, format="csr")
    p = np.random.default_rng(11).standard_normal((3000, 40))  # 960 000 bytes
    monkeypatch.setattr(BlockedSparseProduct, "_L2_BLOCK", 8 * 40 * 1024)
    monkeypatch.setattr(BlockedSparseProduct, "_LLC_BLOCK", 8 * 40 * 2048)
    for small_p, blocks in ((960_000, 3), (959_999, 2)):
        monkeypatch.setattr(BlockedSparseProduct, "_SMALL_P", small_p)
        product = BlockedSparseProduct(s, threads=1)
        np.testing.assert_allclose(product(p), s @ p, rtol=1e-12, atol=1e-12)
        assert len(product._parts) == 1 and len(product._parts[0][2]) == blocks


# ---------------------------------------------------------------- graph pieces


def test_mutual_knn_affinity_by_hand():
    ids = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 1], [3, 2, 0]])
    sims = np.array([[1, 0.5, 0.4], [1, 0.5, 0.3], [1, -0.2, 0.2], [1, -0.2, 0.1]])
    a = graph.mutual_knn_affinity(sims, ids, gamma=2.0).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 0.25  # the only mutual pair with a positive similarity
    np.testing.assert_allclose(a, expected)


def test_normalize_affinity_isolated_nodes():
    a = sp.csr_matrix(np.array([[0, 2.0, 0], [2.0, 0, 0], [0, 0, 0]]))
    s, deg = dfu.normalize_affinity(a, return_degrees=True)
    np.testing.assert_allclose(deg, [2, 2, 0])
    np.testing.assert_allclose(s.toarray(), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert np.isfinite(s.data).all()


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_isolated_node_keeps_its_y_value():
    rng = np.random.default_rng(4)
    centre = _unit(rng.standard_normal((1, 16)))
    cluster = _unit(centre + 0.05 * rng.standard_normal((30, 16)))
    loner = _unit(centre + 1.0 * rng.standard_normal((1, 16)))  # nobody's neighbour
    x = np.concatenate([cluster, loner])
    a = dfu.knn_affinity(x, k=5)
    assert a[30].nnz == 0 and a[:, 30].nnz == 0
    q = loner.copy()
    scores = dfu.diffusion_scores(q, x, k=5, kq=3, tol=1e-12, max_iter=500)
    assert np.isfinite(scores).all()
    assert scores[0, 30] == pytest.approx(1.0, rel=1e-6)  # f = y = s^3 on an isolated node


def test_duplicates_do_not_break_the_solver():
    rng = np.random.default_rng(5)
    base = _unit(rng.standard_normal((4, 16)))
    x = np.concatenate([np.repeat(base, 20, axis=0), _unit(rng.standard_normal((40, 16)))])
    scores, info = dfu.diffusion_scores(base[:2], x, k=10, kq=5, return_info=True)
    assert np.isfinite(scores).all() and not info.breakdown.any()
    # Copies beyond the k-th tie are nobody's mutual neighbour (isolated, score 0, as in the
    # reference); the linked copies lead the list.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert np.all(top[0] < 20) and np.all((top[1] >= 20) & (top[1] < 40))
    t_scores = dfu.diffusion_scores(base[:2], x, k=10, kq=5, truncate=30)
    assert np.isfinite(t_scores).all()


def test_bad_input(golden):
    x, q = golden["X"], golden["Q"]
    bad = q.copy()
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"queries .*row\(s\) \[4\]"):
        dfu.diffusion_scores(bad, x)
    zero = x[:50].copy()
    zero[[7, 9]] = 0
    with pytest.raises(ValueError, match=r"database .*row\(s\) \[7, 9\]"):
        dfu.diffusion_scores(q, zero)
    with pytest.raises(ValueError, match="database is empty"):
        dfu.diffusion_scores(q, np.zeros((0, 64), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        dfu.diffusion_scores(q, x, alpha=1.0)
    with pytest.raises(ValueError, match="dimension"):
        dfu.diffusion_scores(q[:, :10], x)


def test_k_and_kq_larger_than_n(golden):
    x, q = golden["X"][:40], golden["Q"][:3]
    scores = dfu.diffusion_scores(q, x, k=500, kq=500)
    assert scores.shape == (3, 40) and np.isfinite(scores).all()
    a = dfu.knn_affinity(x, k=500)  # k clipped to N: every pair is mutual
    assert a.nnz == np.count_nonzero(np.maximum(x.astype(np.float64) @ x.T, 0)) - np.count_nonzero(
        np.diag(x @ x.T)
    )


# ---------------------------------------------------------------- truncated


def test_truncate_to_n_equals_full(golden, golden_affinity):
    kw = dict(tol=1e-12, max_iter=1000)
    q = golden["Q"][:5]
    full = dfu.diffusion_scores(q, golden["X"], affinity=golden_affinity, **kw)
    trunc = dfu.diffusion_scores(q, golden["X"], truncate=5000, **kw)  # n clipped to N
    assert _rel_err(trunc, full) < 1e-9


def test_truncated_outside_items_rank_below_in_plain_order(golden):
    x, q = golden["X"], golden["Q"][:4]
    n = 300
    top_scores, top_ids, info = dfu.truncated_diffusion(q, x, n)
    assert top_scores.shape == top_ids.shape == (4, n) and info.converged.shape == (4,)
    assert np.all(np.diff(top_scores, axis=1) <= 0)
    dense = dfu.diffusion_scores(q, x, truncate=n)
    plain = q @ x.T
    for i in range(4):
        inside = np.zeros(x.shape[0], bool)
        inside[top_ids[i]] = True
        np.testing.assert_array_equal(dense[i, top_ids[i]], top_scores[i])
        assert dense[i, ~inside].max() < dense[i, inside].min()
        outside = np.flatnonzero(~inside)
        np.testing.assert_array_equal(
            outside[np.argsort(-dense[i, outside], kind="stable")],
            outside[np.argsort(-plain[i, outside], kind="stable")],
        )
        assert set(top_ids[i]) == set(np.argsort(-plain[i], kind="stable")[:n])


def test_truncated_does_not_depend_on_the_rest_of_the_database(golden):
    x, q = golden["X"], golden["Q"]
    rng = np.random.default_rng(6)
    # Distractors orthogonal to every query stay out of each query's top n.
    d = rng.standard_normal((3000, 64))
    basis, _ = np.linalg.qr(q.T.astype(np.float64))
    d -= (d @ basis) @ basis.T
    bigger = np.concatenate([x, _unit(d)])
    a = dfu.truncated_diffusion(q, x, 300)
    b = dfu.truncated_diffusion(q, bigger, 300)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_truncated_with_global_graph_matches_reference_trunclap(golden, golden_affinity):
    x, q = golden["X"], golden["Q"][:2]
    scores, ids, _ = dfu.truncated_diffusion(
        q, x, 400, affinity=golden_affinity, tol=1e-13, max_iter=2000
    )
    for i in range(2):
        sub = np.argsort(-(x.astype(np.float64) @ q[i].astype(np.float64)), kind="stable")[:400]
        s = dfu.normalize_affinity(golden_affinity[sub][:, sub])
        y = np.zeros(400)
        y[:10] = np.maximum(x[sub[:10]].astype(np.float64) @ q[i].astype(np.float64), 0) ** 3
        f = spla.spsolve(sp.identity(400, format="csc") - 0.99 * s.tocsc(), y)
        got = dict(zip(ids[i].tolist(), scores[i].tolist(), strict=True))
        np.testing.assert_allclose([got[j] for j in sub], f, rtol=1e-8, atol=1e-12)


def test_tiny_and_empty_cases():
    rng = np.random.default_rng(7)
    x = _unit(rng.standard_normal((5, 8)))
    assert dfu.diffusion_scores(np.zeros((0, 8), np.float32), x).shape == (0, 5)
    # k = 1 keeps only each node itself: no edge, S = 0, so f = y = max(s, 0)^3.
    f = dfu.diffusion_scores(x[:2], x, k=1, kq=5)
    np.testing.assert_allclose(f, np.maximum(x[:2].astype(np.float64) @ x.T, 0) ** 3, rtol=1e-6)
    one = dfu.diffusion_scores(x[:2], x[:1], truncate=10)  # N = 1, n clipped to 1
    assert one.shape == (2, 1) and np.isfinite(one).all()
    # A query with no positive similarity has y = 0: f = 0 at once, reported converged.
    scores, info = dfu.diffusion_scores(-x[:1], x[:1], kq=1, return_info=True)
    assert scores[0, 0] == 0 and info.converged[0] and info.iterations[0] == 0
