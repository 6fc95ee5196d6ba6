"""The benchmark run of `evaluate.py`: a config in, the table, results files and report out.

`run_benchmark` opens the config's benchmark (and distractor set), gets its descriptors
(`cbir_tf.evaluate.benchmark`, or precomputed ones), ranks and scores every method of
`rerank.methods` (`cbir_tf.evaluate.methods`), prints the table and writes the results and the
HTML report. This is the run layer: it reads the config; everything it calls takes arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.evaluate import benchmark, methods, report
from cbir_tf.evaluate.precomputed import align_rows, load_precomputed
from cbir_tf.runs.extract import descriptor_spec, whitening_spec

log = logging.getLogger(__name__)


def open_inputs(cfg: Any, descriptors: str | None, download: bool, progress: bool):
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


def _descriptors(cfg, ds, dset, descriptors, model_path, download, progress):
    """(database, queries, missing, meta, skipped, what, distractor rows or None)."""
    from cbir_tf.store import files as store
    from cbir_tf.store.meta import check_compatible

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
            check_compatible(meta, dmeta)
            meta["distractors"] = {"name": dset.name, "title": dset.title, "store": path}
    else:
        db, qr, meta = benchmark.extract_benchmark(
            ds, descriptor_spec(cfg, model_path), whitening_spec(cfg),
            data_root=cfg.data.data_root, workdir=cfg.workdir, out=cfg.extract.out,
            flush_every=int(cfg.extract.flush_every), download=download, progress=progress,
            distractors=dset,
        )  # fmt: skip
        skipped = {"database": list(map(list, db.skipped)), "queries": list(map(list, qr.skipped))}
        x, missing = align_rows(db.descriptors, db.ids, list(ds.imlist), "database")
        q, _ = align_rows(qr.descriptors, qr.ids, list(ds.qimlist), "queries")
        what = _describe(meta)
        if dset is not None:
            dx = store.load_store(meta["distractors"]["store"])[0]
    return x, q, missing, meta, skipped, what, dx


def papers_settings(cfg: Any, ds: Any) -> dict[str, Any] | None:
    """What 'auto' re-ranking settings mean for `ds`: the papers' (`rerank.papers`) on the
    Revisited Oxford/Paris benchmarks; None elsewhere (chosen from the collection)."""
    from cbir_tf.data import revisited

    spec = revisited.DATASETS.get(ds.name)
    if getattr(ds, "folder_benchmark", False) or spec is None or spec.synthetic:
        return None
    return config_lib.block(cfg, "rerank")["papers"]


def _truncation(results: Mapping[str, Any], cfg: Any) -> int:
    """Items diffused per query with distractors: the setting used, else the eval default."""
    for res in results.values():
        d = res.get("info", {}).get("settings", {}).get("diffusion")
        if d and int(d["truncate"]):
            return int(d["truncate"])
    return int(cfg.eval.get("distractor_truncate", 0))


def benchmark_title(cfg: Any, b: LoadedBenchmark, results: Mapping[str, Any]) -> str:
    """'rparis6k+r1m (6322 images + 1001001 distractors, 70 queries): <descriptors>...; the
    re-ranking settings (which were chosen automatically)'."""
    ds, dset, dx, what = b.ds, b.dset, b.distractors, b.what
    truncate = _truncation(results, cfg)
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
    settings = report.settings_text(results)
    if settings:
        title += f"; {settings}"
    if getattr(ds, "ok_lists", 0):
        title += f"; {ds.ok_lists} queries with one 'ok' list (Easy = Medium; Hard: none)"
    return title


@dataclasses.dataclass
class LoadedBenchmark:
    """A benchmark and its descriptors, as `run_benchmark` (and --tune, --compare) use them.

    Attributes:
      ds, dset: the benchmark and its distractor set (or None).
      name: '<dataset>' or '<dataset>+<distractors>'.
      database, queries: float32 `[N', D]` (present images, ground-truth order), `[Q, D]`.
      missing: ground-truth ids of database images without a descriptor.
      meta, skipped, what: the descriptors' metadata, unreadable images, and how they were
        made in words (the table's title).
      distractors: the distractors' descriptors `[M, D]` (memory-mapped) or None.
    """

    ds: Any
    dset: Any
    name: str
    database: np.ndarray
    queries: np.ndarray
    missing: np.ndarray
    meta: dict[str, Any]
    skipped: dict[str, Any]
    what: str
    distractors: Any


def load_benchmark(
    cfg: Any,
    model_path: str | None = None,
    descriptors: str | None = None,
    download: bool = True,
    progress: bool = True,
) -> LoadedBenchmark:
    """The config's benchmark and its descriptors (extracted, or reused from their stores)."""
    ds, dset = open_inputs(cfg, descriptors, download, progress)
    name = ds.name + (f"+{dset.title}" if dset is not None else "")
    x, q, missing, meta, skipped, what, dx = _descriptors(
        cfg, ds, dset, descriptors, model_path, download, progress
    )
    if len(missing):
        log.warning(
            "%d of %d database images have no descriptor and count as never retrieved (first: %s)",
            len(missing),
            ds.num_images,
            [ds.imlist[i] for i in missing[:3]],
        )
    return LoadedBenchmark(ds, dset, name, x, q, missing, meta, skipped, what, dx)


def run_benchmark(
    cfg: Any,
    *,
    model_path: str | None = None,
    descriptors: str | None = None,
    out_dir: str | None = None,
    download: bool = True,
    progress: bool = True,
    echo: bool = True,
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
      echo: print the table (a comparison prints its own).

    Returns:
      {'results': per-method metrics, 'table': the printed table, 'files': written paths}.

    Raises:
      cbir_tf.config.ConfigError: a field configs/default.py lacks, or of another type.
    """
    config_lib.check_config(cfg)
    t0 = time.perf_counter()
    b = load_benchmark(cfg, model_path, descriptors, download, progress)
    out_dir = out_dir or os.path.join(cfg.workdir, "eval", b.name)
    kappas = tuple(int(k) for k in cfg.eval.kappas)
    results, rankings = methods.evaluate_methods(
        b.queries, b.database, b.ds.gnd, methods=tuple(cfg.rerank.methods),
        rerank_cfg=cfg.rerank.to_dict(), kappas=kappas, original_gnd=b.ds.original_gnd,
        original_queries=getattr(b.ds, "original_queries", None), missing=b.missing,
        distractors=b.distractors, distractor_truncate=int(cfg.eval.get("distractor_truncate", 0)),
        search_cfg=cfg.get("search"), papers=papers_settings(cfg, b.ds),
    )  # fmt: skip
    title = benchmark_title(cfg, b, results)
    table = report.format_table(results, kappas, title=title)
    if echo:
        print(table, flush=True)
    extra = {
        "dataset": b.name,
        "descriptors": b.meta,
        "missing_database_images": [b.ds.imlist[i] for i in b.missing],
        "skipped": b.skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": cfg.to_dict(),
        "report": "report.html",
    }
    files = report.write_results(out_dir, results, kappas, extra=extra)
    files.update(write_visual_report(out_dir, b, results, rankings, cfg, title, files))
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
    if str(meta["weights"]).lower() in ("imagenet", "pretrained"):
        from cbir_tf.describe import catalog

        # A transformer's pretrained weights are its KerasHub preset, not ImageNet's.
        if catalog.is_transformer(meta["backbone"]):
            weights = f"KerasHub preset {catalog.get_spec(meta['backbone']).preset}"
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


def write_visual_report(
    out_dir: str,
    b: LoadedBenchmark,
    results: Mapping[str, Any],
    rankings: Mapping[str, np.ndarray],
    cfg: Any,
    title: str,
    files: Mapping[str, str],
) -> dict[str, str]:
    """Writes precision-recall plots, per-query result grids and the HTML report.

    Grids need the images; with precomputed descriptors and no images on disk only the plots
    and the table go into the report. Distractors (ids after the database's) are named and
    read by their relative paths, without a list of a million paths.
    """
    from cbir_tf.evaluate import pages as html_pages
    from cbir_tf.evaluate import plots as visualize

    ds, dset = b.ds, b.dset
    query_paths = ds.query_paths()
    have_images = bool(query_paths) and all(os.path.exists(p) for p in query_paths[:1])
    have_images = have_images and (dset is None or os.path.isdir(dset.root))
    names, paths = list(ds.imlist), ds.image_paths()
    if dset is not None:
        from cbir_tf.evaluate.distractors import Joined

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
    described = report_meta(b.meta, ds)
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
