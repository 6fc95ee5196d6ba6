"""What `evaluate.py --tune` runs: settings chosen on a benchmark, cross-validated; a config out.

`run_tune` describes the benchmark once per descriptor variant of the grid (whitening dimension
and shrinkage, where whitening is learned; the stores are the evaluation's, cached), ranks every
re-ranking setting of `tune.grid` on those descriptors (`cbir_tf.evaluate.tune`), prints the
cross-validated table and the settings chosen on all the queries, and writes them as a config
file (`tuned.py`) that extract.py, search.py, serve.py and evaluate.py take with `--config=`.
This is the run layer: it reads the config; the work is in `cbir_tf.evaluate.tune`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.evaluate import report, tune
from cbir_tf.fileio import atomic_write_text
from cbir_tf.rerank import pipeline
from cbir_tf.runs.evaluate import (
    benchmark_title,
    load_benchmark,
    open_inputs,
    papers_settings,
)
from cbir_tf.runs.extract import whitening_spec

log = logging.getLogger(__name__)

# Grid fields outside `rerank` that need descriptors of their own (one extraction per value).
DESCRIPTOR_FIELDS = ("whitening.dim", "whitening.shrinkage")
CONFIG_FILE = "tuned.py"


def _split_grid(items) -> tuple[dict[str, tuple], dict[str, tuple]]:
    grid = tune.parse_grid(items)
    rerank = {f: v for f, v in grid.items() if f.startswith(tune.RERANK_PREFIX)}
    other = {f: v for f, v in grid.items() if f not in rerank}
    for field in other:
        if field not in DESCRIPTOR_FIELDS:
            raise ValueError(
                f"tune.grid: {field} cannot be tuned on descriptors computed once; tune rerank.* "
                f"fields and {', '.join(DESCRIPTOR_FIELDS)} (compare others with --compare)"
            )
    return rerank, other


def _learns_whitening(cfg: Any, ds: Any, model_path: str | None, descriptors: str | None) -> bool:
    from cbir_tf.evaluate.benchmark import whitening_dataset

    if model_path or descriptors:
        return False
    folder = bool(getattr(ds, "folder_benchmark", False))
    return whitening_dataset(ds.name, whitening_spec(cfg), folder=folder) is not None


def _variants(cfg, other, learned, model_path, descriptors, download, progress):
    """(descriptor variants, their configs): one per whitening value, or the config's own."""
    combos = [{}]
    if other and learned:
        combos = [
            dict(zip(other, vals, strict=True)) for vals in itertools.product(*other.values())
        ]
    elif other:
        log.info("%s: not tuned: no whitening is learned here", ", ".join(other))
    variants, configs, first = [], [], None
    for combo in combos:
        c = copy.deepcopy(cfg)
        for field, value in combo.items():
            config_lib.set_field(c, field, value)
        b = load_benchmark(c, model_path, descriptors, download, progress)
        first = first or b
        variants.append(tune.Variant(combo, b.queries, b.database, np.asarray(b.missing)))
        configs.append(c)
    return variants, configs, first


def run_tune(
    cfg: Any,
    *,
    model_path: str | None = None,
    descriptors: str | None = None,
    out_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Chooses re-ranking (and whitening) settings on the config's benchmark.

    Args:
      cfg: a config as in `configs/default.py`; `tune` holds the grid, folds and protocol.
      model_path, descriptors, download, progress: as `run_benchmark`.
      out_dir: where the results and `tuned.py` go (default `<workdir>/eval/<dataset>/tune`).

    Returns:
      {'result': `tune.TuneResult`, 'table', 'settings': {field: value} chosen on all the
      queries, 'config': the written config file, 'files'}.

    Raises:
      ValueError: fewer than 2 queries per fold, distractors, a grid field that cannot be
        tuned (one line each).
    """
    rerank_grid, other = _split_grid(cfg.tune.grid)
    ds, dset = open_inputs(cfg, descriptors, download, progress)
    if dset is not None:
        raise ValueError("--tune takes a benchmark without distractors (drop --distractors)")
    folds, seed = int(cfg.tune.folds), int(cfg.tune.seed)
    tune.folds_of(ds.num_queries, folds, seed)  # refused before any extraction
    learned = _learns_whitening(cfg, ds, model_path, descriptors)
    variants, configs, b = _variants(
        cfg, other, learned, model_path, descriptors, download, progress
    )
    base = pipeline.RerankSettings.from_config(config_lib.block(cfg, "rerank"))
    papers = papers_settings(cfg, ds)
    databases = [pipeline.Database(v.database) for v in variants]
    base = base.resolved(papers) if papers else databases[0].resolve(base)
    kappas = tuple(int(k) for k in cfg.eval.kappas)
    result = tune.cross_validate(
        variants, ds.gnd, methods=tuple(cfg.rerank.methods), base=base, grid=rerank_grid,
        folds=folds, seed=seed, protocol=str(cfg.tune.protocol), kappas=kappas,
        original_gnd=ds.original_gnd, original_queries=getattr(ds, "original_queries", None),
        databases=databases,
    )  # fmt: skip
    best = dict(result.settings[result.best])
    chosen = {**variants[best.pop("variant")].label, **{f"rerank.{k}": v for k, v in best.items()}}
    tuned = copy.deepcopy(cfg)
    for field, value in chosen.items():
        config_lib.set_field(tuned, field, value)
    out_dir = out_dir or os.path.join(cfg.workdir, "eval", b.name, "tune")
    path = os.path.join(out_dir, CONFIG_FILE)
    table = report.format_table(result.results, kappas, title=_title(cfg, b, result))
    print(_summary(table, result, variants, ds.num_queries, path), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    doc = (
        f"Settings chosen by `evaluate.py --tune` on {b.name} ({ds.num_queries} queries, "
        f"{folds}-fold cross-validated mAP {cfg.tune.protocol}: see results.json beside it)."
    )
    atomic_write_text(path, config_lib.config_file_text(config_lib.differences(tuned), doc))
    extra = {
        "dataset": b.name,
        "tune": {
            "grid": list(cfg.tune.grid),
            "folds": [p.tolist() for p in result.folds],
            "chosen_per_fold": [result.settings[c] for c in result.chosen],
            "chosen": chosen,
            "settings": len(result.settings),
            "seconds": result.seconds,
            "config": path,
        },
        "descriptors": b.meta,
        "config": cfg.to_dict(),
    }
    files = report.write_results(out_dir, result.results, kappas, extra=extra)
    return {"result": result, "table": table, "settings": chosen, "config": path, "files": files}


def _title(cfg: Any, b: Any, result: tune.TuneResult) -> str:
    folds = len(result.folds)
    return (
        benchmark_title(cfg, b, {}) + f"; cross-validated, {folds} folds: each fold's rows "
        f"ranked with the settings chosen on the other {folds - 1} (grid of "
        f"{len(result.settings)} settings, mAP {str(cfg.tune.protocol).capitalize()})"
    )


def _summary(table: str, result: tune.TuneResult, variants, num_queries: int, path: str) -> str:
    lines = [table, "", "settings chosen per fold (on the other folds):"]
    for i, c in enumerate(result.chosen):
        size = len(result.folds[i])
        lines.append(f"  fold {i + 1} ({size} queries): {_words(result, c, variants)}")
    lines.append(f"chosen on all {num_queries} queries: {_words(result, result.best, variants)}")
    lines.append(f"config written: {path} (use it with --config={path})")
    return "\n".join(lines)


def _words(result: tune.TuneResult, index: int, variants) -> str:
    s = dict(result.settings[index])
    label = variants[s.pop("variant")].label
    return ", ".join(
        f"{k}={v}" for k, v in {**label, **{f"rerank.{k}": v for k, v in s.items()}}.items()
    )
