"""What `evaluate.py --compare` runs: every combination of config values, one table out.

Each combination of the `--compare` values is the config with those fields set, evaluated as
`evaluate.py` evaluates one (`run_benchmark`, every method of `rerank.methods`) into a folder of
its own, `<out>/<combination>/` (its results files and report). Descriptors go to the usual
stores, named by everything that makes them (backbone, weights, pooling, size, whitening), so
they are computed once per combination and an interrupted extraction resumes from its saved
chunks. A finished combination writes `combination.json` last; a later run with the same
config reuses it instead of evaluating again, so a comparison killed half-way resumes where it
stopped and adding a value computes only the new combinations. A combination that fails
(weights missing offline, say) is reported in its row, not retried until the next run, and the
others still run.

Outputs in `<out>` (default `<workdir>/eval/<dataset>/compare`): the table (printed and
`comparison.txt`), `comparison.csv` (tidy: one line per combination, method and metric),
`comparison.png` (mAP Medium and Hard per combination and method) and `report.html`.
This is the run layer; the pieces are `cbir_tf.evaluate.comparison`, `plots`, `pages`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.evaluate import comparison, report
from cbir_tf.fileio import atomic_write_json, atomic_write_text, json_safe
from cbir_tf.runs.evaluate import open_inputs, run_benchmark

log = logging.getLogger(__name__)

DONE_FILE = "combination.json"
CHART_METRICS = ("mAP M", "mAP H")


def _config_for(cfg: Any, combo: comparison.Combination) -> Any:
    c = copy.deepcopy(cfg)
    for field, value in combo.fields.items():
        config_lib.set_field(c, field, value)
    return c


def _normal(value: Any) -> Any:
    """A config as JSON gives it back (tuples as lists), to compare with a saved one."""
    return json.loads(json.dumps(json_safe(value)))


def _finished(folder: str, config: dict[str, Any]) -> dict[str, Any] | None:
    path = os.path.join(folder, DONE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    return done if done.get("config") == _normal(config) else None


def _evaluate(cfg, combo, folder, kwargs) -> dict[str, Any]:
    """One combination: reused when finished with the same config, else evaluated."""
    c = _config_for(cfg, combo)
    done = _finished(folder, c.to_dict())
    if done is not None:
        log.info("comparison: %s finished before: reusing %s", combo.text(), folder)
        return {"combination": combo, "rows": done["rows"], "settings": done["settings"]}
    log.info("comparison: evaluating %s", combo.text())
    t0 = time.perf_counter()
    out = run_benchmark(c, out_dir=folder, echo=False, **kwargs)
    kappas = tuple(int(k) for k in c.eval.kappas)
    entry = {
        "combination": combo,
        "rows": report.table_rows(out["results"], kappas),
        "settings": report.settings_text(out["results"]),
    }
    # Written last: its presence means the combination is finished.
    atomic_write_json(
        os.path.join(folder, DONE_FILE),
        {
            "labels": combo.labels, "fields": combo.fields, "config": _normal(c.to_dict()),
            "rows": entry["rows"], "settings": entry["settings"],
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )  # fmt: skip
    return entry


def run_comparison(
    cfg: Any,
    items: Sequence[str],
    *,
    model_path: str | None = None,
    descriptors: str | None = None,
    out_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates every combination of the `--compare` values with every method.

    Args:
      cfg: the config the combinations start from.
      items: the `--compare` flags ('FIELD:v1,v2,...', see `cbir_tf.evaluate.comparison`).
      model_path, descriptors, download, progress: as `run_benchmark` (the same for every
        combination).
      out_dir: the comparison's folder (default `<workdir>/eval/<dataset>/compare`).

    Returns:
      {'entries': per combination {'combination', 'rows' or 'error', 'settings'}, 'table',
      'files': {'csv', 'chart', 'report', 'table'}}.

    Raises:
      ValueError, KeyError: a malformed `--compare`, or a field or value the config refuses
        (checked for every combination before the first is evaluated).
    """
    combos = comparison.combinations(items)
    for combo in combos:  # every field and value checked before any work
        _config_for(cfg, combo)
    ds, _ = open_inputs(cfg, descriptors, download, progress)
    out_dir = out_dir or os.path.join(cfg.workdir, "eval", ds.name, "compare")
    kwargs = {
        "model_path": model_path, "descriptors": descriptors, "download": download,
        "progress": progress,
    }  # fmt: skip
    entries = []
    for combo in combos:
        folder = os.path.join(out_dir, combo.key())
        try:
            entries.append(_evaluate(cfg, combo, folder, kwargs))
        except Exception as e:  # noqa: BLE001 - reported in its row; the others still run
            log.warning("comparison: %s failed: %s", combo.text(), e, exc_info=True)
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            entries.append({"combination": combo, "rows": None, "error": error, "settings": ""})
    return _write_outputs(out_dir, ds, combos, entries, cfg)


def _write_outputs(out_dir, ds, combos, entries, cfg) -> dict[str, Any]:
    from cbir_tf.evaluate import pages, plots

    fields = list(combos[0].labels)
    title = (
        f"{ds.name} ({ds.num_images} images, {ds.num_queries} queries): comparison of "
        f"{' x '.join(fields)} ({len(combos)} combinations x every method of rerank.methods)"
    )
    notes = [
        f"{e['combination'].text()}: {e.get('settings') or 'no re-ranking settings'}"
        for e in entries
        if not e.get("error")
    ]
    table = comparison.format_table(entries, title=title)
    text = table + "\n\n" + "\n".join(notes)
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    files = {"table": os.path.join(out_dir, "comparison.txt")}
    atomic_write_text(files["table"], text + "\n")
    files["csv"] = comparison.write_csv(
        os.path.join(out_dir, "comparison.csv"), comparison.tidy_rows(entries)
    )
    methods = [str(m) for m in cfg.rerank.methods]
    values = {}
    for metric in CHART_METRICS:
        v = np.full((len(entries), len(methods)), np.nan)
        for i, e in enumerate(entries):
            for row in e.get("rows") or []:
                if row["method"] in methods and row.get(metric) is not None:
                    v[i, methods.index(row["method"])] = row[metric]
        values[metric] = v
    files["chart"] = plots.comparison_chart(
        [e["combination"].text() for e in entries], methods, values,
        os.path.join(out_dir, "comparison.png"), title=f"{ds.name}: {' x '.join(fields)}",
    )  # fmt: skip
    links = {"comparison (CSV)": files["csv"]}
    for e in entries:
        page = os.path.join(out_dir, e["combination"].key(), "report.html")
        if os.path.isfile(page):
            links[f"{e['combination'].text()}: report"] = page
    files["report"] = pages.comparison_report(
        out_dir, comparison.wide_rows(entries), chart=files["chart"], notes=notes, links=links,
        title=title,
    )  # fmt: skip
    log.info("comparison written to %s", out_dir)
    return {"entries": entries, "table": table, "files": files}
