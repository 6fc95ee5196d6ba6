"""The numpy half of the benchmark run: alignment, missing images, methods, .mat input."""

import numpy as np
import pytest
import scipy.io

from cbir_tf.evaluate import benchmark, metrics
from cbir_tf.evaluate import methods as evaluation
from cbir_tf.evaluate.precomputed import align_rows, load_mat_descriptors, rankings_with_missing
from cbir_tf.runs import evaluate as run_evaluate

RERANK = {
    "qe": {"n": 2, "alpha": 3.0},
    "diffusion": {
        "k": 5,
        "kq": 3,
        "gamma": 3.0,
        "alpha": 0.99,
        "max_iter": 20,
        "tol": 1e-6,
        "truncate": 0,
    },
}


def _l2(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(seed=0, n_per=8, groups=4, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    x = _l2(np.repeat(centres, n_per, 0) + 0.3 * rng.normal(size=(groups * n_per, dim)))
    q = _l2(centres + 0.3 * rng.normal(size=(groups, dim)))
    labels = np.repeat(np.arange(groups), n_per)
    gnd = [
        {
            "easy": list(np.flatnonzero(labels == g)[:4]),
            "hard": list(np.flatnonzero(labels == g)[4:]),
            "junk": [],
        }
        for g in range(groups)
    ]
    return q, x, gnd


def test_align_rows_reorders_and_reports_missing_database_images():
    desc = np.eye(3, dtype=np.float32)
    rows, missing = align_rows(desc, ["c", "a", "b"], ["a", "b", "x", "c"], "database")
    np.testing.assert_array_equal(rows, desc[[1, 2, 0]])
    np.testing.assert_array_equal(missing, [2])


def test_align_rows_refuses_a_missing_query():
    with pytest.raises(ValueError, match="query images have no descriptor.*'q2'"):
        align_rows(np.eye(2, dtype=np.float32), ["q1", "q3"], ["q1", "q2"], "queries")


def test_missing_images_rank_last_and_count_as_not_retrieved():
    ranks = np.array([[1, 0, 2], [2, 1, 0]])
    full = rankings_with_missing(ranks, np.array([1, 3]), 5)
    np.testing.assert_array_equal(full, [[2, 0, 4, 1, 3], [4, 2, 0, 1, 3]])
    gnd = [{"ok": np.array([1]), "junk": np.array([])}]
    m, *_ = metrics.compute_map(full[:1], gnd)
    # The positive (id 1) is 4th: trapezoidal AP = (0/3 + 1/4) / 2.
    assert m == pytest.approx(0.125, abs=1e-15)


def test_evaluate_methods_all_methods_on_clustered_data():
    q, x, gnd = _clusters()
    results, rankings = evaluation.evaluate_methods(q, x, gnd, rerank_cfg=RERANK)
    assert list(results) == list(evaluation.METHODS)
    for method, res in results.items():
        assert rankings[method].shape == (4, 32)
        assert res["revisited"]["medium"]["map"] > 0.9, method
        assert res["original"] is None
    assert "diffusion" in results["diffusion"]["info"]


def test_evaluate_methods_with_original_protocol_subset():
    q, x, gnd = _clusters()
    orig = [{"ok": g["easy"] + g["hard"], "junk": []} for g in gnd[1:3]]
    results, _ = evaluation.evaluate_methods(
        q, x, gnd, methods=("plain",), rerank_cfg=RERANK, original_gnd=orig, original_queries=[1, 2]
    )
    plain = results["plain"]
    np.testing.assert_allclose(plain["original"]["aps"], plain["revisited"]["medium"]["aps"][1:3])


def test_unknown_method_lists_valid_ones():
    q, x, gnd = _clusters()
    with pytest.raises(ValueError, match="valid: plain, aqe, diffusion"):
        evaluation.evaluate_methods(q, x, gnd, methods=("magic",), rerank_cfg=RERANK)


def test_load_mat_descriptors_converts_columns_to_rows(tmp_path):
    q, x, _ = _clusters()
    path = tmp_path / "f.mat"
    scipy.io.savemat(path, {"X": x.T, "Q": q.T})
    x2, q2 = load_mat_descriptors(path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(q2, q)
    scipy.io.savemat(path, {"X": x.T})
    with pytest.raises(ValueError, match="'X' and 'Q'"):
        load_mat_descriptors(path)


def _spec(weights="imagenet", fallback="none"):
    from cbir_tf import config

    model = {**config.defaults("model"), "backbone": "mobilenet", "alpha": 0.25}
    return benchmark.DescriptorSpec(
        model={**model, "weights": weights, "weights_fallback": fallback}
    )


def test_offline_fallback_to_random_weights_is_named_in_the_title(monkeypatch):
    from cbir_tf.describe import backbones

    def offline(name, alpha):
        raise backbones.WeightsUnavailableError("no network", name, None, None)

    monkeypatch.setattr(backbones, "fetch_imagenet_weights", offline)
    spec, reason = _spec().with_available_weights()
    assert spec.model["weights"] == "none" and "could not be downloaded" in reason
    meta = {
        "backbone": "mobilenet",
        "weights": "none",
        "pooling": "gem",
        "image_size": 224,
        "scales": [1.0],
        "whitening": None,
        "weights_fallback": reason,
        "feature_scale": 3e-15,
    }
    title = run_evaluate._describe(meta)
    assert "mobilenet (random weights: ImageNet weights could not be downloaded)" in title
    assert "vanishing activations (max 3e-15)" in title
    assert "vanishing" not in run_evaluate._describe(dict(meta, feature_scale=6.0))
    # Without a fallback, or with weights given, nothing is tried: a failure stays an error.
    for spec in (_spec(fallback=""), _spec(weights="none")):
        assert spec.with_available_weights() == (spec, None)


def test_title_names_a_transformers_preset():
    meta = {
        "backbone": "dinov3_small",
        "weights": "imagenet",
        "pooling": "cls",
        "image_size": 224,
        "scales": [1.0],
        "whitening": None,
    }
    title = run_evaluate._describe(meta)
    assert title.startswith("dinov3_small (KerasHub preset dinov3_vit_small_lvd1689m) + cls")


def test_transformer_weights_are_named_as_given(tmp_path):
    """Keywords and KerasHub handles are names; a checkpoint folder is an absolute path."""
    from cbir_tf import config

    model = {**config.defaults("model"), "backbone": "dinov2_small", "pooling": "cls"}
    for weights, recorded in (
        ("pretrained", "pretrained"),
        ("hf://facebook/dinov2-small", "hf://facebook/dinov2-small"),
        (str(tmp_path / "dinov2-small"), str(tmp_path / "dinov2-small")),
    ):
        spec = benchmark.DescriptorSpec(model={**model, "weights": weights})
        assert spec.meta()["weights"] == recorded


def test_available_imagenet_weights_are_kept(monkeypatch):
    from cbir_tf.describe import backbones

    fetched = []
    monkeypatch.setattr(backbones, "fetch_imagenet_weights", lambda n, a: fetched.append((n, a)))
    spec = _spec()
    assert spec.with_available_weights() == (spec, None)
    assert fetched == [("mobilenet", 0.25)]


def test_benchmark_queries_are_described_cropped_to_their_box(tmp_path):
    """Query descriptors are those of the cropped query images, scaled like the full image."""
    import keras
    from PIL import Image

    from cbir_tf.data import prepare
    from cbir_tf.describe.layers import GeM
    from cbir_tf.describe.models import unit_normalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    model = keras.Model(inp, unit_normalization("l2")(GeM()(x)))
    ds = prepare.prepare_dataset("demo", tmp_path / "data", progress=False)
    spec = benchmark.DescriptorSpec(model={}, image_size=96, scales=(1.0,), ms_power=1.0)
    _, queries = benchmark.benchmark_descriptors(
        ds, model, spec, {"m": 1}, str(tmp_path / "s"), progress=False
    )
    assert list(queries.ids) == list(ds.qimlist)

    def described(path, box):
        img = Image.open(path).convert("RGB")
        full = max(img.size)
        if box is not None:
            img = img.crop(tuple(box))  # PIL rounds a float box
        size = max(1, int(96 * max(img.size) / full))
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        return model(np.asarray(img, np.float32)[None]).numpy()[0]

    boxes = ds.query_bboxes()
    for i, path in enumerate(ds.query_paths()):
        cropped = described(path, boxes[i])
        np.testing.assert_allclose(queries.descriptors[i], cropped, atol=1e-5)
        assert np.abs(cropped - described(path, None)).max() > 1e-2


def test_auto_settings_are_the_papers_on_revisited_benchmarks_and_the_collections_elsewhere():
    import types

    from cbir_tf import config as config_lib
    from cbir_tf.evaluate import report

    cfg = config_lib.default_config()
    papers = run_evaluate.papers_settings(cfg, types.SimpleNamespace(name="rparis6k"))
    assert papers == {"qe": {"n": 2}, "dba": {"n": 2},
                      "diffusion": {"k": 50, "kq": 10, "truncate": 0}}  # fmt: skip
    folder = types.SimpleNamespace(name="rparis6k", folder_benchmark=True)
    assert run_evaluate.papers_settings(cfg, folder) is None
    assert run_evaluate.papers_settings(cfg, types.SimpleNamespace(name="demo")) is None
    q, x, gnd = _clusters()
    methods = ("plain", "aqe", "diffusion", "dba")
    block = cfg.rerank.to_dict()
    res, _ = evaluation.evaluate_methods(q, x, gnd, methods=methods, rerank_cfg=block,
                                         papers=papers)  # fmt: skip
    info = res["diffusion"]["info"]
    assert info["auto"]["source"] == "papers"
    assert (info["settings"]["diffusion"]["k"], info["settings"]["diffusion"]["kq"]) == (50, 10)
    assert res["aqe"]["info"]["settings"] == {"qe": {"n": 2, "alpha": 3.0}}
    text = report.settings_text(res)
    assert text == ("re-ranking: α-QE n=2*, DBA n=2*, diffusion k=50* kq=10* "
                    "(* auto: the papers' settings)")  # fmt: skip
    # Elsewhere: the collection's own values, and the title says so.
    res, _ = evaluation.evaluate_methods(q, x, gnd, methods=methods, rerank_cfg=block)
    note = res["plain"]["info"]["auto"]
    assert note["source"] == "collection" and note["stats"]["images"] == len(x)
    from cbir_tf.rerank import auto

    values = auto.auto_values(note["stats"])
    assert res["diffusion"]["info"]["settings"]["diffusion"]["k"] == values["diffusion"]["k"]
    assert "auto: chosen from the collection" in report.settings_text(res)
    # Numbers given: used as they are, nothing marked automatic.
    block["diffusion"].update(k="7", kq="3", truncate="0")
    block["qe"]["n"] = block["dba"]["n"] = "1"
    res, _ = evaluation.evaluate_methods(q, x, gnd, methods=("diffusion",), rerank_cfg=block)
    assert "auto" not in res["diffusion"]["info"]
    assert report.settings_text(res) == "re-ranking: diffusion k=7 kq=3"
