"""cbir_tf.rerank.pipeline: method names, settings from the config, one `rerank` for all callers."""

import ml_collections
import numpy as np
import pytest
from reference_rerank import arcs, dba, method_scores, ranks_from_scores

from cbir_tf import config as config_lib
from cbir_tf.rerank import diffusion, pipeline

QE = {"n": 2, "alpha": 3.0}
DBA = {"n": 3, "alpha": 3.0}
DIFFUSION = {"k": 5, "kq": 4, "gamma": 3.0, "alpha": 0.8, "max_iter": 1000, "tol": 1e-12,
             "truncate": 0}  # fmt: skip
SETTINGS = pipeline.RerankSettings.from_config({"qe": QE, "dba": DBA, "diffusion": DIFFUSION})


def test_settings_defaults_are_the_configs():
    block = config_lib.default_config().rerank
    settings = pipeline.RerankSettings.from_config(None)
    expected = block.to_dict()
    del expected["methods"], expected["papers"]
    assert settings.to_dict() == expected
    assert pipeline.RerankSettings.from_config(block) == settings  # a ConfigDict, methods ignored


def test_settings_partial_override_and_round_trip():
    settings = pipeline.RerankSettings.from_config(
        {"diffusion": {"k": 3, "truncate": 0}, "dba": {"n": 7}}
    )
    assert (settings.diffusion.k, settings.dba.n) == (3, 7)
    assert settings.diffusion.kq == config_lib.default_config().rerank.diffusion.kq
    assert pipeline.RerankSettings.from_config(settings.to_dict()) == settings
    assert pipeline.RerankSettings.from_config(settings) is settings
    assert settings.diffusion.kwargs()["truncate"] is None
    cfg = ml_collections.ConfigDict({"diffusion": {"truncate": 100}})
    assert pipeline.RerankSettings.from_config(cfg).diffusion.kwargs()["truncate"] == 100


def test_auto_fields_take_auto_or_a_whole_number_as_number_or_string():
    # A field whose default is the string "auto" keeps the type str: --config.rerank.qe.n=3
    # gives "3"; a dict (an index manifest, Retriever(rerank=...)) gives 3.
    cfg = config_lib.default_config()
    cfg.rerank.qe.n = "3"
    cfg.rerank.diffusion.k = " AUTO "
    settings = pipeline.RerankSettings.from_config(cfg.rerank)
    assert settings.qe.n == 3 and settings.diffusion.k == pipeline.AUTO
    assert pipeline.RerankSettings.from_config({"qe": {"n": 3}}).qe.n == 3
    assert pipeline.RerankSettings.from_config({"qe": {"n": 3.0}}).qe.n == 3
    assert settings.auto_fields() == ["dba.n", "diffusion.k", "diffusion.kq", "diffusion.truncate"]
    for bad in ("three", "2.5", -1, 2.5, True):
        with pytest.raises(ValueError, match=r"rerank.diffusion.kq must be 'auto' or a whole"):
            pipeline.RerankSettings.from_config({"diffusion": {"kq": bad}})


def test_resolved_replaces_only_the_auto_fields():
    settings = pipeline.RerankSettings.from_config({"qe": {"n": 4}, "diffusion": {"k": "7"}})
    values = {"qe": {"n": 1}, "dba": {"n": "5"}, "diffusion": {"k": 43, "kq": 3, "truncate": 0}}
    done = settings.resolved(values)
    assert (done.qe.n, done.dba.n, done.diffusion.k, done.diffusion.kq) == (4, 5, 7, 3)
    assert done.auto_fields() == [] and done.diffusion.truncate == 0
    # rerank resolves what is left from the database itself.
    x, q = arcs()
    db = pipeline.Database(x)
    auto_settings = pipeline.RerankSettings.from_config(None)
    got = pipeline.rerank("aqe+diffusion", q, db, auto_settings)
    want = pipeline.rerank("aqe+diffusion", q, x, db.resolve(auto_settings))
    np.testing.assert_array_equal(got.ids, want.ids)
    assert db.resolve(auto_settings).auto_fields() == []


def test_diffusion_ranks_what_it_never_reaches_in_plain_order():
    # Two far-apart groups: a query's seeds reach its own group only; the other group's items
    # score 0 and follow in the order of their plain similarity (not database order).
    rng = np.random.default_rng(3)
    a, b = np.eye(16)[0], np.eye(16)[1]
    x = np.concatenate([a + 0.05 * rng.normal(size=(6, 16)), b + 0.3 * rng.normal(size=(6, 16))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)[::-1].copy()
    q = (a + 0.3 * b)[None].astype(np.float32)
    q /= np.linalg.norm(q)
    s = pipeline.RerankSettings.from_config({"diffusion": {**DIFFUSION, "k": 3, "kq": 2}})
    got = pipeline.rerank("diffusion", q, x, s)
    reached = got.scores[0] > 0
    assert 0 < reached.sum() < len(x)
    tail = got.ids[0][~reached]
    plain = (x @ q[0])[tail]
    assert (np.diff(plain) <= 0).all()  # plain order, best first
    assert got.scores[0][~reached].max() < got.scores[0][reached].min()


def test_diffusion_without_a_graph_is_the_plain_ranking():
    # k = 1 (what 'auto' chooses when the collection has no groups): no edge, no re-ranking.
    x, q = arcs()
    off = pipeline.RerankSettings.from_config({"diffusion": {**DIFFUSION, "k": 1, "kq": 1}})
    plain = pipeline.rerank("none", q, x, off)
    for k in (None, 5):
        got = pipeline.rerank("diffusion", q, x, off, k=k)
        np.testing.assert_array_equal(got.ids, plain.ids[:, : got.ids.shape[1]])


def test_settings_unknown_block_or_field_is_named():
    with pytest.raises(ValueError, match="unknown rerank setting 'qee'"):
        pipeline.RerankSettings.from_config({"qee": {"n": 1}})
    with pytest.raises(ValueError, match=r"unknown rerank.diffusion field\(s\) \['kk'\]"):
        pipeline.RerankSettings.from_config({"diffusion": {"kk": 1}})


def test_method_names_and_the_alias_of_none():
    assert pipeline.METHODS[0] == pipeline.NONE == "none"
    assert pipeline.check_method("plain") == "none"
    assert pipeline.check_method("aqe+dba") == "aqe+dba"
    with pytest.raises(ValueError, match="unknown method 'qe'; valid: plain, aqe, diffusion"):
        pipeline.check_method("qe", "method", none_word="plain")
    with pytest.raises(ValueError, match=r"unknown rerank 'dba\+aqe'; valid: none, aqe"):
        pipeline.check_method("dba+aqe")


@pytest.mark.parametrize("method", pipeline.METHODS)
def test_top_k_is_the_head_of_the_full_ranking(method):
    x, q = arcs()
    x = np.concatenate([x, x[:6]])  # exact duplicates: tied scores, ordered by row
    db = pipeline.Database(x)
    full = pipeline.rerank(method, q, db, SETTINGS)
    assert full.ids.shape == (len(q), len(x))
    assert (np.diff(full.scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(np.sort(full.ids, axis=1), np.tile(np.arange(len(x)), (4, 1)))
    top = pipeline.rerank(method, q, db, SETTINGS, k=7)
    np.testing.assert_array_equal(top.ids, full.ids[:, :7])
    np.testing.assert_allclose(top.scores, full.scores[:, :7], rtol=1e-6)
    assert (top.cg is not None) == ("diffusion" in method)


def test_dba_scores_are_the_augmented_databases():
    x, q = arcs()
    got = pipeline.rerank("dba", q, x, SETTINGS)
    expected = np.asarray(q, np.float64) @ dba(x, DBA["n"], DBA["alpha"]).T
    np.testing.assert_array_equal(got.ids, ranks_from_scores(expected))
    np.testing.assert_allclose(got.scores, np.take_along_axis(expected, got.ids, 1), atol=1e-6)
    ref = method_scores("aqe+dba", q, x, QE, DIFFUSION, DBA)
    np.testing.assert_array_equal(pipeline.rerank("aqe+dba", q, x, SETTINGS).ids,
                                  ranks_from_scores(ref))  # fmt: skip


def test_database_side_is_built_once_and_reused():
    x, q = arcs()
    db = pipeline.Database(x)
    pipeline.rerank("dba", q, db, SETTINGS)
    augmented = db.augmented(SETTINGS.dba)
    pipeline.rerank("aqe+dba", q, db, SETTINGS)
    assert db.augmented(SETTINGS.dba) is augmented
    pipeline.rerank("diffusion", q, db, SETTINGS)
    graph = db.graph(DIFFUSION["k"], DIFFUSION["gamma"])
    pipeline.rerank("aqe+diffusion", q, db, SETTINGS)
    assert db.graph(DIFFUSION["k"], DIFFUSION["gamma"]) is graph


def test_truncated_diffusion_goes_through_each_querys_subgraph():
    x, q = arcs()
    d = {**DIFFUSION, "truncate": 20}
    db = pipeline.Database(x)
    got = pipeline.rerank("diffusion", q, db, pipeline.RerankSettings.from_config({"diffusion": d}))
    np.testing.assert_array_equal(got.ids, ranks_from_scores(diffusion.diffusion_scores(q, x, **d)))
    assert not db._graphs  # each query's own sub-graph: no global graph is built


def test_errors_name_the_problem():
    x, q = arcs()
    with pytest.raises(ValueError, match="unknown rerank 'magic'"):
        pipeline.rerank("magic", q, x, SETTINGS)
    with pytest.raises(ValueError, match="dimension 4 but 8 was expected"):
        pipeline.rerank("aqe", q[:, :4], x, SETTINGS)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        pipeline.rerank("none", q, x, SETTINGS, k=0)
