"""cbir_tf.evaluate.tune: settings chosen on the other folds only, and the table they give."""

import numpy as np
import pytest

from cbir_tf.evaluate import methods as evaluation
from cbir_tf.evaluate import metrics, tune
from cbir_tf.rerank import pipeline

BASE = pipeline.RerankSettings.from_config(
    {"qe": {"n": 1}, "dba": {"n": 2}, "diffusion": {"k": 5, "kq": 3, "truncate": 0}}
)
GRID = {"rerank.qe.n": ("0", "1", "3"), "rerank.diffusion.k": ("1", "5", "10")}
METHODS = ("plain", "aqe", "diffusion")


def _data(seed=0, groups=12, views=5, loners=60, dim=24):
    """Groups of views (arcs through the sphere) among loners; one query per group."""
    rng = np.random.default_rng(seed)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    x, q, gnd = [], [], []
    for g in range(groups):
        a, b = unit(rng.normal(size=dim)), unit(rng.normal(size=dim))
        t = np.linspace(0, 1.2, views + 1)[:, None]
        arc = unit(np.cos(t) * a + np.sin(t) * b + 0.08 * rng.normal(size=(views + 1, dim)))
        q.append(arc[0])
        gnd.append({"easy": list(range(g * views, g * views + 2)),
                    "hard": list(range(g * views + 2, (g + 1) * views)), "junk": []})  # fmt: skip
        x.extend(arc[1:])
    x.extend(unit(rng.normal(size=(loners, dim))))
    return np.asarray(x, np.float32), np.asarray(q, np.float32), gnd


def _run(gnd, x, q, folds=3, **kw):
    return tune.cross_validate(
        [tune.Variant({}, q, x)], gnd, methods=METHODS, base=BASE, grid=GRID, folds=folds, **kw
    )


def test_scores_are_the_mean_ap_of_the_methods_under_each_setting():
    x, q, gnd = _data()
    r = _run(gnd, x, q)
    assert len(r.settings) == 9 and r.scores.shape == (9, len(q))
    medium = metrics.revisited_gnd(gnd, "medium")
    for i in (0, 4, 8):
        s = dict(r.settings[i])
        s.pop("variant")
        cfg = BASE.to_dict()
        cfg["qe"]["n"], cfg["diffusion"]["k"] = s["qe.n"], s["diffusion.k"]
        _, rankings = evaluation.evaluate_methods(q, x, gnd, methods=METHODS, rerank_cfg=cfg)
        aps = [metrics.compute_map(rankings[m], medium)[1] for m in METHODS]
        np.testing.assert_allclose(r.scores[i], np.mean(aps, axis=0), atol=1e-12)


def test_each_fold_is_ranked_with_settings_chosen_on_the_other_folds():
    x, q, gnd = _data()
    first = _run(gnd, x, q, folds=2)
    fold = first.folds[0]
    for i, part in enumerate(first.folds):
        others = np.setdiff1d(np.arange(len(q)), part)
        assert first.chosen[i] == tune.choose(first.scores, others)
    # Fold 0's ground truth rewritten so that one setting ranks its queries perfectly: a choice
    # that looked at fold 0 would move to that setting; the honest one for fold 0 cannot.
    target = next(i for i in range(len(first.settings)) if i != first.chosen[0])
    s = dict(first.settings[target])
    s.pop("variant")
    cfg = BASE.to_dict()
    cfg["qe"]["n"], cfg["diffusion"]["k"] = s["qe.n"], s["diffusion.k"]
    ranks = pipeline.rerank("diffusion", q, x, pipeline.RerankSettings.from_config(cfg)).ids
    rigged = [dict(g) for g in gnd]
    for qi in fold:
        rigged[qi] = {"easy": ranks[qi, :3].tolist(), "hard": [], "junk": []}
    second = _run(rigged, x, q, folds=2)
    assert second.chosen[0] == first.chosen[0]
    others = np.setdiff1d(np.arange(len(q)), fold)
    np.testing.assert_array_equal(second.scores[:, others], first.scores[:, others])
    # Fold 0 alone now prefers another setting: a choice that looked at it would differ.
    assert tune.choose(second.scores, fold) != first.chosen[0]


def test_the_table_ranks_each_fold_with_its_chosen_settings():
    x, q, gnd = _data(seed=1)
    r = _run(gnd, x, q)
    for part, c in zip(r.folds, r.chosen, strict=True):
        s = dict(r.settings[c])
        s.pop("variant")
        cfg = BASE.to_dict()
        cfg["qe"]["n"], cfg["diffusion"]["k"] = s["qe.n"], s["diffusion.k"]
        settings = pipeline.RerankSettings.from_config(cfg)
        for m in METHODS:
            want = pipeline.rerank(m, q[part], x, settings).ids
            np.testing.assert_array_equal(r.rankings[m][part], want)
    medium = metrics.revisited_gnd(gnd, "medium")
    for m in METHODS:
        assert r.results[m]["revisited"]["medium"]["map"] == pytest.approx(
            metrics.compute_map(r.rankings[m], medium)[0], abs=1e-12
        )


def test_variants_are_chosen_among_like_settings():
    x, q, gnd = _data(seed=2)
    rng = np.random.default_rng(0)
    noisy = x + 0.5 * rng.normal(size=x.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    variants = [tune.Variant({"whitening.dim": "8"}, q, noisy), tune.Variant({}, q, x)]
    r = tune.cross_validate(variants, gnd, methods=METHODS, base=BASE, grid=GRID, folds=3)
    assert len(r.settings) == 18
    assert all(r.settings[c]["variant"] == 1 for c in (*r.chosen, r.best))


def test_too_few_queries_per_fold_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"9 queries cannot make 5 folds of at least 2 queries; "
                       r"lower tune.folds \(--config.tune.folds=4\)"):  # fmt: skip
        tune.folds_of(9, 5)
    with pytest.raises(ValueError, match="3 queries cannot make 2 folds"):
        tune.folds_of(3, 2)
    with pytest.raises(ValueError, match="at least 2 folds"):
        tune.folds_of(10, 1)
    parts = tune.folds_of(11, 3, seed=4)
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]


def test_grid_items_are_checked():
    assert tune.parse_grid(["rerank.qe.n:0, 1", "whitening.dim:0,256"]) == {
        "rerank.qe.n": ("0", "1"),
        "whitening.dim": ("0", "256"),
    }
    for bad, match in (("rerank.qe.n", "expected FIELD:v1"), ("rerank.qe.n:", "expected")):
        with pytest.raises(ValueError, match=match):
            tune.parse_grid([bad])
    with pytest.raises(ValueError, match="given twice"):
        tune.parse_grid(["rerank.qe.n:1", "rerank.qe.n:2"])
    x, q, gnd = _data()
    with pytest.raises(ValueError, match="not a field of rerank.qe"):
        tune.cross_validate([tune.Variant({}, q, x)], gnd, methods=METHODS, base=BASE,
                            grid={"rerank.qee.n": ("1",)})  # fmt: skip
