"""The saved approximate index (cbir_tf.search.ann) and the approximate kNN graph, on clustered
vectors.

IVF-PQ is forced by low thresholds (the defaults build it from 200k rows); no TensorFlow.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir_tf.rerank import graph, pipeline
from cbir_tf.retriever import Retriever
from cbir_tf.search import ann
from cbir_tf.search import exact as search
from cbir_tf.store import files as store

N, D = 10000, 32
SETTINGS = {"min_rows": 10000, "bytes_per_vector": 64, "target_recall": 0.9, "tune_queries": 300}
SMALL = {**SETTINGS, "min_rows": 4000, "tune_queries": 100}
STORE_META = {"backbone": "toy", "pooling": "gem", "dim": D}


def clustered(n, d=D, seed=0, centres_seed=0):
    """Unit vectors in clusters of ~20 with varying spread (fresh points: other `seed`)."""
    centres = np.random.default_rng(centres_seed).standard_normal((N // 20, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = np.random.default_rng(centres_seed + 1).uniform(0.5, 1.2, len(centres))
    rng = np.random.default_rng(seed + 100)
    c = rng.integers(0, len(centres), n)
    x = (centres[c] + spread[c, None] * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    return clustered(N)


@pytest.fixture(scope="module")
def built(data):
    return ann.build(data, ann.AnnSettings.from_config(SETTINGS))


def _recall(ids, exact_ids):
    k = exact_ids.shape[1]
    return np.mean([len(set(a) & set(e)) / k for a, e in zip(ids, exact_ids, strict=True)])


def test_recall_reaches_its_target_and_scores_come_from_the_rescoring_codes(built, data):
    assert built.kind == "ivfpq" and built.meta["factory"].endswith(",Refine(SQ8)")
    assert built.recall >= 0.9 and built.meta["tune_queries"] == 300 and built.target_met
    queries = clustered(500, seed=7)  # fresh points of the same clusters
    scores, ids = built.search(queries, 10)
    _, exact_ids = search.exact_knn(queries, data, 10, 65536)
    assert _recall(ids, exact_ids) >= 0.9
    # Re-scored from 8-bit codes: within a few thousandths of the exact inner products, sorted.
    exact_scores = np.einsum("qkd,qd->qk", data[ids], queries)
    assert 0 < np.abs(scores - exact_scores).max() < 0.01
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_saved_index_reopens_memory_mapped_with_the_same_results(built, data, tmp_path):
    ann.save(built, str(tmp_path), STORE_META)
    meta = json.loads((tmp_path / ann.META_FILE).read_text())
    assert meta["recall"] == built.recall and meta["rows"] == N and len(meta["sha256"]) == 64
    reopened = ann.load(str(tmp_path), data, STORE_META)
    assert f"recall@10 {built.recall:.3f}" in reopened.describe()  # what search.py prints
    queries = clustered(50, seed=8)
    for a, b in zip(built.search(queries, 20), reopened.search(queries, 20), strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupt_stale_or_foreign_index_files_are_refused(built, data, tmp_path):
    ann.save(built, str(tmp_path), STORE_META)
    path = tmp_path / ann.INDEX_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ann.AnnIndexError, match="truncated or corrupted"):
        ann.load(str(tmp_path), data, STORE_META)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ann.AnnIndexError, match="checksum"):
        ann.load(str(tmp_path), data, STORE_META)
    path.write_bytes(good)
    with pytest.raises(ann.AnnIndexError, match="another model or dimension"):
        ann.load(str(tmp_path), data, {**STORE_META, "backbone": "other"})
    with pytest.raises(ann.AnnIndexError, match="another model or dimension"):
        ann.load(str(tmp_path), data[:, :16], STORE_META)
    with pytest.raises(ann.AnnIndexError, match="covers 10000 rows but the store holds 9999"):
        ann.load(str(tmp_path), data[:-1], STORE_META)


def _retriever(directory, **kwargs):
    ref = {"kind": "config", "config": {}, "reproducible": True}
    return Retriever(None, model_ref=ref, directory=directory, ann=SMALL, **kwargs)


def _add(r, x, first):
    ids = [f"img{first + i}.jpg" for i in range(len(x))]
    paths = {i: f"/photos/{i}" for i in ids}
    r._apply((x, ids, []), paths, {i: [1, 0] for i in ids}, set())


def test_retriever_builds_adds_without_rebuild_and_searches_with_it(data, tmp_path, caplog):
    r = _retriever(str(tmp_path))
    _add(r, data[:3000], 0)  # below min_rows: no approximate index
    assert not ann.exists(str(tmp_path)) and r.approximate_index() is None
    _add(r, data[3000:5000], 3000)  # reaches min_rows: built
    first = ann.read_meta(str(tmp_path))
    assert first["rows"] == first["trained_rows"] == 5000 and first["kind"] == "ivfpq"
    with caplog.at_level(logging.WARNING, logger="cbir_tf.search.ann"):
        _add(r, data[5000:6500], 5000)  # appended: added to the saved index, not retrained
    meta = ann.read_meta(str(tmp_path))
    assert meta["rows"] == 6500 and meta["trained_rows"] == 5000 and meta["added_rows"] == 1500
    assert "rebuild it" in caplog.text  # 1500 / 5000 > stale_share 0.2
    # A fresh retriever on the folder searches through the saved, memory-mapped index.
    r2 = _retriever(str(tmp_path))
    assert r2.approximate_index() is not None and r2.approximate_index().ntotal == 6500
    queries = data[[3, 5001, 6499]]
    scores, rows = r2.search_descriptors(queries, k=5)
    assert rows[:, 0].tolist() == [3, 5001, 6499]  # the added rows are found too
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=0.01)  # from SQ8 codes
    exact = _retriever(str(tmp_path), backend="exact")
    assert exact.approximate_index() is None
    _, exact_rows = exact.search_descriptors(queries, k=5)
    np.testing.assert_array_equal(exact_rows[:, 0], rows[:, 0])
    # Saved elsewhere: the approximate index goes with the rows.
    copy = r2.save(str(tmp_path / "copy"))
    assert _retriever(copy).approximate_index().search(queries, 5)[1][:, 0].tolist() == [
        3, 5001, 6499]  # fmt: skip
    # Rows removed: the approximate index is rebuilt over the new rows.
    r2._apply(None, {}, {}, {"img0.jpg"})
    meta = ann.read_meta(str(tmp_path))
    assert meta["rows"] == meta["trained_rows"] == 6499 and meta["added_rows"] == 0


def test_a_damaged_index_is_not_used_by_the_retriever(data, tmp_path, caplog):
    r = _retriever(str(tmp_path))
    _add(r, data[:4000], 0)
    (tmp_path / ann.INDEX_FILE).write_bytes(b"garbage")
    r2 = _retriever(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="cbir_tf.retriever"):
        assert r2.approximate_index() is None
    assert "truncated or corrupted" in caplog.text
    _, rows = r2.search_descriptors(data[:2], k=3)  # exact search instead
    assert rows[:, 0].tolist() == [0, 1]
    # The next update rebuilds it.
    _add(r2, data[4000:4100], 4000)
    assert ann.load(str(tmp_path), r2.descriptors, store.DescriptorStore(str(tmp_path)).meta())


def test_approximate_graph_agrees_with_the_exact_graph():
    x = clustered(6000, seed=3)
    k = 20
    exact_sims, exact_ids = graph.neighbors64(x, x, k)
    e = graph.mutual_knn_affinity(exact_sims, exact_ids, 3.0)
    agreement = {}
    for probes in (30, 15):  # all 30 lists (exact up to float32 rounding), then half of them
        sims, ids = graph.approximate_knn(x, k, probes=probes, rows_per_list=200)
        assert np.all(np.diff(sims, axis=1) <= 0) and np.all(ids[:, 0] == np.arange(6000))
        same = ids == exact_ids
        np.testing.assert_allclose(sims[same], exact_sims[same], rtol=0, atol=1e-6)
        a = graph.mutual_knn_affinity(sims, ids, 3.0)
        agreement[probes] = e.multiply(a > 0).nnz / e.nnz
    assert agreement[30] >= 0.999 and agreement[15] >= 0.9


def test_database_switches_to_the_approximate_graph_above_its_threshold(monkeypatch):
    x = clustered(3000, seed=4)
    small = pipeline.Database(x, ann_settings={"graph_min_rows": 10**6}).graph(10, 3.0)
    exact = graph.knn_affinity(x, 10, 3.0)
    assert (small != exact).nnz == 0  # below the threshold: the exact graph, bit for bit
    calls = []
    real = graph.approximate_knn
    spy = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(pipeline, "approximate_knn", spy)
    approx = pipeline.Database(x, backend="auto", ann_settings={"graph_min_rows": 1000})
    approx = approx.graph(10, 3.0)
    assert calls and exact.multiply(approx > 0).nnz / exact.nnz >= 0.98
    forced = pipeline.Database(x, backend="exact", ann_settings={"graph_min_rows": 1000})
    assert (forced.graph(10, 3.0) != exact).nnz == 0


def test_ann_backend_gives_full_rankings_for_evaluation(built, data):
    db = pipeline.Database(data, backend="ann", ann=built)
    queries = clustered(5, seed=9)
    settings = pipeline.RerankSettings.from_config(None)
    top = pipeline.rerank("none", queries, db, settings, k=10)
    full = pipeline.rerank("none", queries, db, settings)  # evaluation's [Q, N] rankings
    assert full.ids.shape == (5, N)
    assert all(np.array_equal(np.sort(row), np.arange(N)) for row in full.ids)
    np.testing.assert_array_equal(full.ids[:, :10], top.ids)
    # Built in memory from the settings when no saved index is given (kind forced small).
    flat = pipeline.Database(data[:500], backend="ann", ann_settings={"kind": "flat"})
    assert flat.index.ann.kind == "flat"


def test_evaluation_ranks_ground_truth_the_index_missed_last(built, data):
    from cbir_tf.evaluate import methods as evaluation

    db = pipeline.Database(data, backend="ann", ann=built)
    queries = clustered(5, seed=9)
    ranks, info = evaluation.rank_method("plain", queries, db, None)
    retrieved = info["retrieved"]  # the IVF lists probed hold fewer than N rows
    assert (retrieved < N).all() and (retrieved > 10).all()
    # Targets: two rows the index returned and two it missed, per query.
    targets = [np.sort(np.r_[r[:2], r[c : c + 2]]) for r, c in zip(ranks, retrieved, strict=True)]
    out = evaluation.not_retrieved_last(ranks, retrieved, targets)
    for r, o, c, t in zip(ranks, out, retrieved, targets, strict=True):
        assert np.array_equal(o[:c], r[:c]) and np.array_equal(np.sort(o), np.arange(N))
        np.testing.assert_array_equal(o[-2:], r[c : c + 2])  # the missed ones, now last
        assert not np.isin(o[c:-2], t).any()


class Unreadable:
    """A store's rows that fail when read: only their shape may be asked for."""

    def __init__(self, shape):
        self.shape, self.ndim, self.dtype = tuple(shape), len(shape), np.dtype(np.float32)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        raise AssertionError("the float store was read")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the float store was read")


def test_approximate_queries_never_read_the_float_store(built, data, tmp_path):
    ann.save(built, str(tmp_path), STORE_META)
    queries = clustered(50, seed=8)
    opened = ann.load(str(tmp_path), Unreadable(data.shape), STORE_META)
    np.testing.assert_array_equal(opened.search(queries, 10)[1], built.search(queries, 10)[1])
    # Through the retriever, as search.py and serve.py search, with the store's memory map
    # replaced: approximate searches work; exact ones (--exact) read the store.
    folder = tmp_path / "index"
    _add(_retriever(str(folder)), data[:4000], 0)
    r = _retriever(str(folder))
    r._descriptors = Unreadable(r.descriptors.shape)
    scores, rows = r.search_descriptors(queries[:5], k=5)
    assert rows.shape == (5, 5) and r.approximate_index().database is None
    exact = _retriever(str(folder), backend="exact")
    exact._descriptors = Unreadable(exact.descriptors.shape)
    with pytest.raises(AssertionError, match="the float store was read"):
        exact.search_descriptors(queries[:5], k=5)


LEGACY = Path(__file__).resolve().parent.parent / "fixtures" / "legacy_ann"
LEGACY_META = {"backbone": "toy", "pooling": "gem", "dim": 16}


def test_an_index_of_format_1_still_loads_and_the_next_update_rebuilds_it(tmp_path, caplog):
    x = np.load(LEGACY / "descriptors.npy")
    for name in (ann.INDEX_FILE, ann.META_FILE):
        shutil.copy(LEGACY / name, tmp_path / name)
    old = ann.load(str(tmp_path), x, LEGACY_META)
    assert old.outdated and old.meta["version"] == 1 and "format 1" in old.describe()
    # It searches as it did: PQ candidates re-scored exactly from the float store.
    scores, ids = old.search(x[:20], 5)
    assert ids[:, 0].tolist() == list(range(20))
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[ids], x[:20]), atol=1e-6)
    # The next update rebuilds it, saying so in one line.
    more = np.vstack([x, x[:40] + 0.01])
    more /= np.linalg.norm(more, axis=1, keepdims=True)
    settings = ann.AnnSettings.from_config({"min_rows": 100, "tune_queries": 100})
    with caplog.at_level(logging.WARNING, logger="cbir_tf.search.ann"):
        new = ann.follow_rows(str(tmp_path), more, LEGACY_META, settings,
                              previous_rows=len(x), backend="auto")  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "saved by an earlier version (format 1" in warned[0]
    assert "\n" not in warned[0]
    assert not new.outdated and ann.read_meta(str(tmp_path))["version"] == ann.FORMAT_VERSION
    rebuilt = ann.load(str(tmp_path), more, LEGACY_META)
    assert rebuilt.search(more[[100, 200, 300]], 1)[1][:, 0].tolist() == [100, 200, 300]
