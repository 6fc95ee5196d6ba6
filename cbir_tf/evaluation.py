"""The benchmark run: descriptors → search → re-ranking → Revisited Oxford/Paris metrics.

Each stage is a plain function over arrays so that it can run alone: `evaluate_methods` needs
only query and database descriptors and the ground truth; `cbir_tf.benchmark` produces
those descriptors (extracting them, or reusing a finished store); `run_benchmark` wires both
to a config and writes the report. `evaluate.py` only parses flags and calls `run_benchmark`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import benchmark, bounded, config, metrics, report, search
from cbir_tf.configs import default as default_config
from cbir_tf.precomputed import (  # noqa: F401 (evaluation's names before the split)
    align_rows,
    load_mat_descriptors,
    load_precomputed,
    rankings_with_missing,
)
from cbir_tf.rerank import pipeline

log = logging.getLogger(__name__)

# The rows of the default table (configs/default.py); every method: `pipeline.METHODS`.
METHODS = tuple(default_config.get_config().rerank.methods)


# --------------------------------------------------------------------------------------------
# Ranking and metrics (numpy only)
# --------------------------------------------------------------------------------------------


def rank_method(
    method: str,
    queries: np.ndarray,
    database: np.ndarray | pipeline.Database,
    rerank_cfg: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Full rankings of `database` for `queries` under one retrieval method.

    Args:
      method: a name of `pipeline.METHODS`, 'plain' for no re-ranking (e.g. 'aqe+diffusion').
      queries: float32 [Q, D], L2-normalised.
      database: float32 [N, D], L2-normalised (or a `pipeline.Database`, reused across methods).
      rerank_cfg: the config's `rerank` block (or `pipeline.RerankSettings`).

    Returns:
      (ranks int64 [Q, N] best first, info dict: timings and, for diffusion, convergence).
    """
    pipeline.check_method(method, "method", none_word="plain")
    settings = pipeline.RerankSettings.from_config(rerank_cfg)
    t0 = time.perf_counter()
    ranking = pipeline.rerank(method, queries, database, settings)
    info: dict[str, Any] = {}
    if ranking.cg is not None:
        info["diffusion"] = _diffusion_info(ranking.cg)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    retrieved = np.isfinite(ranking.scores).sum(axis=1)
    if (retrieved < ranking.ids.shape[1]).any():  # an approximate index missed rows
        info["retrieved"] = retrieved
    return ranking.ids, info


def not_retrieved_last(
    ranks: np.ndarray, retrieved: np.ndarray, targets: Sequence[np.ndarray]
) -> np.ndarray:
    """Rankings `[Q, N]` whose targets (ground-truth ids) past each query's `retrieved` head
    move to the end: an approximate search never found them (rows it missed come in row order,
    which must not favour the ground truth's images)."""
    out = np.array(ranks, np.int64)
    for q, (c, t) in enumerate(zip(retrieved, targets, strict=True)):
        tail = out[q, int(c) :]
        late = np.isin(tail, t)
        out[q, int(c) :] = np.concatenate([tail[~late], tail[late]])
    return out


def _diffusion_info(dinfo: Any) -> dict[str, Any]:
    """Summarises the solver report so that non-convergence shows in the results."""
    if dataclasses.is_dataclass(dinfo):
        dinfo = dataclasses.asdict(dinfo)
    elif not isinstance(dinfo, Mapping):
        dinfo = dict(vars(dinfo))
    out: dict[str, Any] = {}
    for key, value in dinfo.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            out[key] = arr.item()
        elif arr.dtype == bool:
            out[key] = {"all": bool(arr.all()), "count_false": int((~arr).sum())}
        elif np.issubdtype(arr.dtype, np.number) and arr.size:
            out[key] = {"max": float(arr.max()), "mean": float(arr.mean())}
    return out


def evaluate_rankings(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int],
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Revisited E/M/H metrics, and the original protocol when its ground truth is given.

    Args:
      ranks: int [Q, N] rankings of every query of the revisited ground truth.
      gnd: the revisited ground truth, one dict (easy/hard/junk) per query.
      kappas: the k of mP@k.
      original_gnd: the original protocol's ground truth (ok/junk per query) or None.
      original_queries: rows of `ranks` that `original_gnd` covers, in its order
        (None: all rows, in order).

    Returns:
      {'revisited': {protocol: metrics}, 'original': metrics or None}.
    """
    out: dict[str, Any] = {"revisited": metrics.evaluate_revisited(ranks, gnd, kappas=kappas)}
    out["original"] = None
    if original_gnd is not None:
        rows = np.arange(len(ranks)) if original_queries is None else np.asarray(original_queries)
        mp, aps, mpr, prs = metrics.compute_map(
            ranks[rows], metrics.original_gnd(original_gnd), kappas=kappas
        )
        out["original"] = {"map": mp, "aps": aps, "mpr": mpr, "prs": prs}
    return out


def _warn_unless_unit_norm(x: np.ndarray, name: str) -> None:
    # Scores, query expansion weights and diffusion affinities all assume unit vectors; rows of
    # another length (e.g. a random network whose activations vanish under the L2 eps) give
    # numbers that mean little, which the user must hear about.
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        log.warning(
            "%d of %d %s descriptors are not L2-normalised (norms %.3g to %.3g): scores and "
            "re-ranking assume unit vectors (random weights give vanishing activations)",
            int(off.sum()),
            len(norms),
            name,
            norms.min(),
            norms.max(),
        )


def evaluate_methods(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str] = METHODS,
    rerank_cfg: Any,
    kappas: Sequence[int] = (1, 5, 10),
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
    missing: np.ndarray | None = None,
    distractors: np.ndarray | None = None,
    distractor_truncate: int = 1000,
    search_cfg: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluates every retrieval method on one benchmark.

    Args:
      queries: float32 [Q, D] query descriptors, row i for query i of `gnd`.
      database: float32 [N, D] database descriptors, row j for image j of the ground truth.
      gnd: revisited ground truth (list of Q dicts).
      methods: names accepted by `rank_method` (table rows and result keys, as given).
      rerank_cfg: the config's `rerank` block (or `pipeline.RerankSettings`).
      kappas: the k of mP@k.
      original_gnd, original_queries: see `evaluate_rankings`.
      missing: ground-truth ids of database images without a descriptor (see `align_rows`);
        `database` then holds only the present ones, in ground-truth order.
      distractors: float32 [M, D] (memory-mapped) appended after the database: ids N.. N+M-1.
        Rankings are then `bounded.PartialRanking`s (bounded memory; same metrics), and
        diffusion is truncated to each query's top n: rerank.diffusion.truncate, or
        `distractor_truncate` when that is 0.
      search_cfg: the config's `search` block (backend 'ann' ranks with an approximate index
        built over `database` and the distractors, `cbir_tf.ann`); None: the defaults.

    Returns:
      (results {method: {'revisited', 'original', 'info'}}, rankings {method: int [Q, N]}).
    """
    if len(queries) != len(gnd):
        raise ValueError(
            f"{len(queries)} query descriptors for {len(gnd)} queries in the ground truth"
        )
    for method in methods:  # every name checked before the first (costly) one runs
        pipeline.check_method(method, "method", none_word="plain")
    settings = pipeline.RerankSettings.from_config(rerank_cfg)
    search.validate_descriptors(queries, "queries")
    sc = config.block({"search": config.as_dict(search_cfg)}, "search")
    if distractors is not None:
        from cbir_tf import with_distractors

        return with_distractors.evaluate(
            queries, database, distractors, gnd, methods, settings, kappas,
            original_gnd, original_queries,
            np.zeros(0, np.int64) if missing is None else np.asarray(missing, np.int64),
            settings.diffusion.truncate or int(distractor_truncate),
            sc["ann"] if sc["backend"] == "ann" else None,
        )  # fmt: skip
    # Validated once; DBA and the diffusion graph are built once for all the methods.
    db = pipeline.Database(
        database, backend=sc["backend"], block_size=int(sc["block_size"]), ann_settings=sc["ann"]
    )
    ann = getattr(db.index, "ann", None)
    if ann is not None:  # the table must say that rankings come from an approximate index
        log.info("ranking with the %s", ann.describe())
    _warn_unless_unit_norm(queries, "queries")
    _warn_unless_unit_norm(database, "database")
    results: dict[str, Any] = {}
    rankings: dict[str, np.ndarray] = {}
    target_rows = None  # the ground truth's rows, for an approximate index's misses
    for method in methods:
        ranks, info = rank_method(method, queries, db, settings)
        if "retrieved" in info:
            if target_rows is None:
                targets, row_of = bounded.ground_truth_rows(
                    gnd, original_gnd, original_queries, missing, len(database)
                )
                target_rows = [row_of[t][row_of[t] >= 0] for t in targets]
            ranks = not_retrieved_last(ranks, info.pop("retrieved"), target_rows)
        if missing is not None and len(missing):
            ranks = rankings_with_missing(ranks, missing, len(database) + len(missing))
        res = evaluate_rankings(ranks, gnd, kappas, original_gnd, original_queries)
        res["info"] = info if ann is None else {**info, "search": ann.describe()}
        results[method] = res
        rankings[method] = ranks
        log.info(
            "%s: mAP M %.2f (%.1f s)",
            method,
            100 * res["revisited"]["medium"]["map"],
            info["seconds"],
        )
    return results, rankings


def _inputs(cfg: Any, descriptors: str | None, download: bool, progress: bool):
    """The benchmark and the distractor set of the config, both checked before any work: one
    error lists every file to place when some are missing (offline)."""
    from cbir_tf.data import distractors as distractors_lib
    from cbir_tf.data import prepare

    problems, ds, dset = [], None, None
    try:
        ds = prepare.open_benchmark(
            cfg.data.dataset, cfg.data.data_root, download=download, progress=progress,
            images=not descriptors,
        )  # fmt: skip
    except prepare.DatasetUnavailableError as e:
        problems.append(str(e))
    value = cfg.data.get("distractors", "")
    try:
        if descriptors and value:  # their descriptors are given: the images are not needed
            dset = distractors_lib.named(value, cfg.data.data_root)
        else:
            dset = distractors_lib.open_distractors(
                value, cfg.data.data_root, download=download, progress=progress
            )
    except prepare.DatasetUnavailableError as e:
        problems.append(str(e))
    if problems:
        raise prepare.DatasetUnavailableError("\n".join(problems))
    return ds, dset


def _descriptors(cfg, ds, dset, descriptors, model_path, download, progress, size_explicit):
    """(database, queries, missing, meta, skipped, what, distractor rows or None)."""
    from cbir_tf import store

    skipped: dict[str, Any] = {}
    dx = None
    if descriptors:
        x, q, missing, meta = load_precomputed(descriptors, ds)
        what = f"descriptors from {descriptors}"
        if dset is not None:
            path = os.path.join(descriptors, "distractors")
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{path}: with --descriptors and distractors, their store is read from the "
                    "descriptor folder's distractors/ (as extract.py --out=FOLDER writes it)"
                )
            dx, dset.ids, dmeta = store.load_store(path)
            store.check_compatible(meta, dmeta)
            meta["distractors"] = {"name": dset.name, "title": dset.title, "store": path}
    else:
        db, qr, meta = benchmark.extract_benchmark(
            cfg, ds, model_path=model_path, download=download, progress=progress,
            image_size_explicit=size_explicit, distractors=dset,
        )  # fmt: skip
        skipped = {"database": list(map(list, db.skipped)), "queries": list(map(list, qr.skipped))}
        x, missing = align_rows(db.descriptors, db.ids, list(ds.imlist), "database")
        q, _ = align_rows(qr.descriptors, qr.ids, list(ds.qimlist), "queries")
        what = _describe(meta)
        if dset is not None:
            dx = store.load_store(meta["distractors"]["store"])[0]
    return x, q, missing, meta, skipped, what, dx


def _title(
    cfg: Any, ds: Any, dset: Any, dx: Any, what: str, truncate: int, results: Mapping[str, Any]
) -> str:
    """'rparis6k+r1m (6322 images + 1001001 distractors, 70 queries): <descriptors>...'."""
    if dset is None:
        title = f"{ds.name} ({ds.num_images} images, {ds.num_queries} queries): {what}"
    else:
        title = (
            f"{ds.name}+{dset.title} ({ds.num_images} images + {len(dx)} distractors, "
            f"{ds.num_queries} queries): {what}"
        )
        if any("diffusion" in m for m in cfg.rerank.methods):
            title += f"; diffusion truncated to each query's top {truncate}"
    search = next(iter(results.values()), {}).get("info", {}).get("search")
    if search:
        title += f"; {search}"
    if getattr(ds, "ok_lists", 0):
        title += f"; {ds.ok_lists} queries with one 'ok' list (Easy = Medium; Hard: none)"
    return title


def run_benchmark(
    cfg: Any,
    *,
    model_path: str | None = None,
    descriptors: str | None = None,
    out_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
    image_size_explicit: bool = False,
) -> dict[str, Any]:
    """Runs the whole benchmark and writes its report.

    Args:
      cfg: a config as in `configs/default.py` (`data.dataset` a name or a benchmark folder;
        `data.distractors` '', 'r1m' or a folder of images).
      model_path: a saved `.keras` descriptor model to use instead of `cfg.model`.
      descriptors: precomputed descriptors (store folder or `.mat`); skips extraction.
      out_dir: where results go (default `<workdir>/eval/<dataset>[+<distractors>]`).
      download: fetch missing benchmark files.
      progress: show progress bars.
      image_size_explicit: the user set `data.image_size`; it then wins over the size a saved
        model was trained at.

    Returns:
      {'results': per-method metrics, 'table': the printed table, 'files': written paths}.
    """
    t0 = time.perf_counter()
    ds, dset = _inputs(cfg, descriptors, download, progress)
    name = ds.name + (f"+{dset.title}" if dset is not None else "")
    out_dir = out_dir or os.path.join(cfg.workdir, "eval", name)
    x, q, missing, meta, skipped, what, dx = _descriptors(
        cfg, ds, dset, descriptors, model_path, download, progress, image_size_explicit
    )
    if len(missing):
        log.warning(
            "%d of %d database images have no descriptor and count as never retrieved (first: %s)",
            len(missing),
            ds.num_images,
            [ds.imlist[i] for i in missing[:3]],
        )
    kappas = tuple(int(k) for k in cfg.eval.kappas)
    truncate = int(cfg.rerank.diffusion.truncate) or int(cfg.eval.get("distractor_truncate", 0))
    results, rankings = evaluate_methods(
        q, x, ds.gnd, methods=tuple(cfg.rerank.methods), rerank_cfg=cfg.rerank.to_dict(),
        kappas=kappas, original_gnd=ds.original_gnd,
        original_queries=getattr(ds, "original_queries", None), missing=missing,
        distractors=dx, distractor_truncate=truncate, search_cfg=cfg.get("search"),
    )  # fmt: skip
    title = _title(cfg, ds, dset, dx, what, truncate, results)
    table = report.format_table(results, kappas, title=title)
    print(table, flush=True)
    extra = {
        "dataset": name,
        "descriptors": meta,
        "missing_database_images": [ds.imlist[i] for i in missing],
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": cfg.to_dict(),
    }
    extra["report"] = "report.html"
    files = report.write_results(out_dir, results, kappas, extra=extra)
    files.update(_visual_report(out_dir, ds, results, rankings, cfg, title, files, meta, dset))
    log.info("results written to %s", out_dir)
    return {"results": results, "table": table, "files": files, "rankings": rankings}


# Below this largest feature-map activation the network's signal has vanished (trained networks
# give activations of order 1 to 100; a random MobileNet ~1e-8).
VANISHING_ACTIVATION = 1e-3


def _describe(meta: Mapping[str, Any]) -> str:
    size = f"{meta['image_size']} px, scales {meta['scales']}"
    if "fine_tuning" in meta:  # a saved model carries its own pooling and whitening
        text = f"saved model {meta['weights']} ({meta['backbone']} + {meta['pooling']}), {size}"
        return text + _vanishing_note(meta)
    wt = whitening_text(meta.get("whitening"))
    weights = {"none": "random weights", "imagenet": "ImageNet weights"}.get(
        str(meta["weights"]).lower(), meta["weights"]
    )
    if meta.get("weights_fallback"):
        weights += f": {meta['weights_fallback']}"
    if meta.get("whitening_note"):
        wt += f" ({meta['whitening_note']})"
    text = f"{meta['backbone']} ({weights}) + {meta['pooling']}, {wt}, {size}"
    return text + _vanishing_note(meta)


def _vanishing_note(meta: Mapping[str, Any]) -> str:
    scale = meta.get("feature_scale")
    if scale is None or scale >= VANISHING_ACTIVATION:
        return ""
    log.warning(
        "the network's activations vanish (largest %.2g): descriptors are unit vectors of little "
        "signal; use trained weights for real numbers",
        scale,
    )
    return f"; vanishing activations (max {scale:.1g}), descriptors normalised exactly"


def whitening_text(w: Mapping[str, Any] | None) -> str:
    """How descriptors were whitened, in words: 'no whitening', 'regional PCA-whitening ...'."""
    if not w:
        return "no whitening"
    learned = f" learned on {w['learned_on']}" if w.get("learned_on") else ""
    return f"{'regional ' if w.get('regional') else ''}PCA-whitening{learned}"


def report_meta(meta: Mapping[str, Any], ds: Any) -> dict[str, Any]:
    """The 'Run' table of the HTML report: the benchmark and how its descriptors were made."""
    described: dict[str, Any] = {
        "dataset": ds.name,
        "images": ds.num_images,
        "queries": ds.num_queries,
    }
    for k in ("backbone", "weights", "pooling", "image_size", "scales", "whitening", "source"):
        if k in meta:
            # Said as the title says it, not as a Python value ('None', a dict).
            described[k] = whitening_text(meta[k]) if k == "whitening" else meta[k]
    return described


def _visual_report(
    out_dir: str,
    ds: Any,
    results: Mapping[str, Any],
    rankings: Mapping[str, np.ndarray],
    cfg: Any,
    title: str,
    files: Mapping[str, str],
    meta: Mapping[str, Any],
    dset: Any = None,
) -> dict[str, str]:
    """Writes precision-recall plots, per-query result grids and the HTML report.

    Grids need the images; with precomputed descriptors and no images on disk only the plots
    and the table go into the report. Distractors (ids after the database's) are named and
    read by their relative paths, without a list of a million paths.
    """
    from cbir_tf import pages as html_pages
    from cbir_tf import visualize

    query_paths = ds.query_paths()
    have_images = bool(query_paths) and all(os.path.exists(p) for p in query_paths[:1])
    have_images = have_images and (dset is None or os.path.isdir(dset.root))
    names, paths = list(ds.imlist), ds.image_paths()
    if dset is not None:
        from cbir_tf.with_distractors import Joined

        names = Joined(names, lambda i: dset.ids[i])
        paths = Joined(paths, lambda i: os.path.join(dset.root, *dset.ids[i].split("/")))
    figures = visualize.evaluation_figures(
        out_dir,
        rankings,
        ds.gnd,
        query_paths,
        paths,
        num_queries=int(cfg.eval.num_visualize) if have_images else 0,
        top=int(cfg.eval.top_visualize),
        query_names=list(ds.qimlist),
        database_names=names,
        query_bboxes=ds.query_bboxes(),
    )
    described = report_meta(meta, ds)
    # The report is one file: the plots and grids are embedded, not linked beside it.
    page = html_pages.evaluation_report(
        out_dir,
        results,
        kappas=tuple(int(k) for k in cfg.eval.kappas),
        pr_plots=figures["pr_plots"],
        grids=figures["grids"],
        meta=described,
        links={"results (JSON)": files["json"], "results (CSV)": files["csv"]},
        title=title,
        embed=True,
    )
    return {"report": page}
