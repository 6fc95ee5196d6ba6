"""evaluate.py --compare: combinations, the table and CSV, failures, resuming, and --tune's run."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from photos import synthetic_photo, tiny_benchmark

from cbir_tf import config as config_lib
from cbir_tf.evaluate import comparison

ROOT = pathlib.Path(__file__).resolve().parents[2]
METHODS = ("plain", "aqe", "diffusion", "dba")


def test_combinations_expand_every_flag_and_values_may_set_more_fields():
    combos = comparison.combinations(
        ["model.backbone:mobilenet[model.alpha=0.25;model.weights=a,b.h5],vgg16",
         "model.pooling:gem,rmac"]
    )  # fmt: skip
    assert [c.text() for c in combos] == [
        "mobilenet, gem", "mobilenet, rmac", "vgg16, gem", "vgg16, rmac"
    ]  # fmt: skip
    assert combos[0].fields == {
        "model.backbone": "mobilenet", "model.alpha": "0.25", "model.weights": "a,b.h5",
        "model.pooling": "gem",
    }  # fmt: skip
    assert combos[2].fields == {"model.backbone": "vgg16", "model.pooling": "gem"}
    assert combos[0].key() == "backbone=mobilenet,pooling=gem"
    for bad, match in (
        ("model.pooling", "expected FIELD:v1"),
        ("model.pooling:gem[x", "unbalanced"),
        ("model.backbone:vgg16[model.alpha]", "is not FIELD=VALUE"),
        ("model.pooling:gem,gem", "given twice"),
    ):
        with pytest.raises(ValueError, match=match):
            comparison.combinations([bad])
    with pytest.raises(ValueError, match="compared twice"):
        comparison.combinations(["model.pooling:gem", "model.pooling:mac"])


def _entries():
    combos = comparison.combinations(["model.pooling:gem,mac,rmac"])
    rows = [{"method": m, "mAP E": 10.0 + i, "mAP M": 20.0 + i, "mAP H": None} for i, m in
            enumerate(("plain", "aqe"))]  # fmt: skip
    return [
        {"combination": combos[0], "rows": rows},
        {"combination": combos[1], "rows": None, "error": "ValueError: no weights offline"},
        {"combination": combos[2], "rows": rows},
    ]


def test_tidy_csv_has_a_line_per_combination_method_and_metric(tmp_path):
    rows = comparison.tidy_rows(_entries())
    path = comparison.write_csv(str(tmp_path / "c.csv"), rows)
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == 2 * 2 * 3 + 1
    assert read[0] == {"model.pooling": "gem", "method": "plain", "metric": "mAP E",
                       "value": "10.0", "error": ""}  # fmt: skip
    failed = [r for r in read if r["error"]]
    assert failed == [{"model.pooling": "mac", "method": "", "metric": "", "value": "",
                       "error": "ValueError: no weights offline"}]  # fmt: skip
    table = comparison.format_table(_entries(), title="t").splitlines()
    assert table[0] == "t" and table[1].split() == ["pooling", "method", "mAP", "E", "mAP", "M",
                                                    "mAP", "H"]  # fmt: skip
    assert table[3].split() == ["gem", "plain", "10.00", "20.00", "-"]
    assert table[5].split()[:2] == ["mac", "failed:"] and "no weights offline" in table[5]
    wide = comparison.wide_rows(_entries())
    assert [r["error"] for r in wide] == ["", "", "ValueError: no weights offline", "", ""]


def _config(bench, work):
    cfg = config_lib.default_config()
    for field, value in {
        "data.dataset": bench, "workdir": str(work), "model.backbone": "mobilenet",
        "model.alpha": "0.25", "model.weights": "none", "model.pooling": "gem",
        "data.image_size": "64", "rerank.methods": str(METHODS), "eval.num_visualize": "1",
    }.items():  # fmt: skip
        config_lib.set_field(cfg, field, value)
    return cfg


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return tiny_benchmark(tmp_path_factory.mktemp("bench") / "tiny", groups=6)


@pytest.mark.slow
def test_comparison_reports_each_combination_and_failures_then_reuses_them(
    bench, tmp_path, monkeypatch
):
    from cbir_tf.runs import compare

    cfg = _config(bench, tmp_path / "work")
    items = ["model.pooling:gem,mac", "data.image_size:64,48[model.weights=/nowhere/w.h5]"]
    out = compare.run_comparison(cfg, items, out_dir=str(tmp_path / "cmp"), progress=False)
    errors = [e.get("error") for e in out["entries"]]
    assert [bool(e) for e in errors] == [False, True, False, True]
    assert "/nowhere/w.h5" in errors[1]
    files = out["files"]
    with open(files["csv"]) as f:
        read = list(csv.DictReader(f))
    assert len(read) == 2 * len(METHODS) * 12 + 2  # 2 combinations x methods x 12 metrics
    assert {r["method"] for r in read if not r["error"]} == set(METHODS)
    page = pathlib.Path(files["report"]).read_text()
    assert "<h2>Comparison</h2>" in page and "data:image/png;base64," in page
    assert "failed: " in page and page.count("<tr>") == 1 + 2 * len(METHODS) + 2
    assert pathlib.Path(files["chart"]).read_bytes()[:4] == b"\x89PNG"
    # Each row is that combination's own evaluation.
    done = json.loads((tmp_path / "cmp" / "pooling=mac,image_size=64" / "combination.json")
                      .read_text())  # fmt: skip
    own = json.loads((tmp_path / "cmp" / "pooling=mac,image_size=64" / "results.json").read_text())
    assert done["rows"] == own["table"]
    # Run again with one value more: finished combinations are reused, not evaluated.
    evaluated = []
    real = compare.run_benchmark

    def counting(c, **kw):
        evaluated.append((c.model.pooling, int(c.data.image_size)))
        return real(c, **kw)

    monkeypatch.setattr(compare, "run_benchmark", counting)
    items[0] = "model.pooling:gem,mac,spoc"
    again = compare.run_comparison(cfg, items, out_dir=str(tmp_path / "cmp"), progress=False)
    # The failed ones are tried again; of the others only the new value is evaluated.
    assert sorted(evaluated) == [("gem", 48), ("mac", 48), ("spoc", 48), ("spoc", 64)]
    assert again["entries"][0]["rows"] == out["entries"][0]["rows"]


def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in pathlib.Path(folder).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_comparison_killed_half_way_resumes_without_recomputing_what_finished(bench, tmp_path):
    work, out = tmp_path / "work", tmp_path / "cmp"
    args = [
        sys.executable, "evaluate.py", f"--dataset={bench}", f"--workdir={work}", f"--out={out}",
        "--backbone=mobilenet", "--weights=none", "--config.model.alpha=0.25",
        f"--config.rerank.methods={METHODS}", "--config.eval.num_visualize=0",
        "--config.extract.flush_every=4", "--compare=model.pooling:gem",
        "--compare=data.image_size:48,320",
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = out / "pooling=gem,image_size=48" / "combination.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # while the second combination is being described
    proc.communicate()
    assert not (out / "comparison.csv").exists()
    stores = sorted((work / "descriptors").glob("*/*"))
    finished = {s: _snapshot(s) for s in stores if "-48px-" in s.name}
    assert finished and all(any(p.name == "COMPLETE" for p in f) for f in finished.values())
    before = _snapshot(first.parent)
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "gem, 48 finished before: reusing" in second.stderr
    assert _snapshot(first.parent) == before  # its results untouched
    assert {s: _snapshot(s) for s in finished} == finished  # its descriptors untouched
    assert "evaluating gem, 48" not in second.stderr
    lines = (out / "comparison.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * len(METHODS) * 12


@pytest.mark.slow
def test_tune_writes_a_config_the_commands_take(bench, tmp_path):
    from cbir_tf.runs.evaluate import run_benchmark
    from cbir_tf.runs.tune import run_tune

    whiten_on = tmp_path / "whiten"
    for i in range(12):
        synthetic_photo(whiten_on / f"w{i}.jpg", 900 + i)
    cfg = _config(bench, tmp_path / "work")
    config_lib.set_field(cfg, "whitening.dataset", str(whiten_on))
    # A random MobileNet's activations vanish (~1e-16): nothing to whiten; a random VGG16's
    # do not.
    config_lib.set_field(cfg, "model.backbone", "vgg16")
    config_lib.set_field(cfg, "model.alpha", "1.0")
    config_lib.set_field(cfg, "tune.folds", "3")
    config_lib.set_field(cfg, "tune.grid", str(("rerank.qe.n:0,1", "rerank.diffusion.k:1,4",
                                                "whitening.dim:0,8")))  # fmt: skip
    out = run_tune(cfg, out_dir=str(tmp_path / "tune"), progress=False)
    assert len(out["result"].settings) == 2 * 2 * 2  # two whitening dimensions: two variants
    assert "cross-validated, 3 folds" in out["table"].splitlines()[0]
    tuned = config_lib.load_config(out["config"])
    for field, value in out["settings"].items():
        block, *rest = field.split(".")
        node = tuned[block]
        for name in rest:
            node = node[name]
        assert str(node) == str(value), field
    assert tuned.data.dataset == bench and tuned.model.backbone == "vgg16"
    # evaluate.py takes it as it is (--config=tuned.py): the same descriptors, its settings.
    res = run_benchmark(tuned, out_dir=str(tmp_path / "again"), progress=False, echo=False)
    title_settings = res["table"].splitlines()[0]
    assert f"α-QE n={tuned.rerank.qe.n}" in title_settings
    with pytest.raises(ValueError, match="6 queries cannot make 4 folds"):
        config_lib.set_field(cfg, "tune.folds", "4")
        run_tune(cfg, out_dir=str(tmp_path / "t2"), progress=False)
    assert np.isfinite(out["result"].scores).any()
