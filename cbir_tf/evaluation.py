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

from cbir_tf import benchmark, config, metrics, report, search
from cbir_tf.configs import default as default_config
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
    return ranking.ids, info


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
    search_cfg: Any = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
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
      search_cfg: the config's `search` block (backend 'ann' ranks with an approximate index
        built over `database`, `cbir_tf.ann`); None: the defaults.

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
    # Validated once; DBA and the diffusion graph are built once for all the methods.
    sc = config.block({"search": config.as_dict(search_cfg)}, "search")
    db = pipeline.Database(
        database, backend=sc["backend"], block_size=int(sc["block_size"]), ann_settings=sc["ann"]
    )
    _warn_unless_unit_norm(queries, "queries")
    _warn_unless_unit_norm(database, "database")
    results: dict[str, Any] = {}
    rankings: dict[str, np.ndarray] = {}
    for method in methods:
        ranks, info = rank_method(method, queries, db, settings)
        if missing is not None and len(missing):
            ranks = rankings_with_missing(ranks, missing, len(database) + len(missing))
        res = evaluate_rankings(ranks, gnd, kappas, original_gnd, original_queries)
        res["info"] = info
        results[method] = res
        rankings[method] = ranks
        log.info(
            "%s: mAP M %.2f (%.1f s)",
            method,
            100 * res["revisited"]["medium"]["map"],
            info["seconds"],
        )
    return results, rankings


# --------------------------------------------------------------------------------------------
# Precomputed descriptors
# --------------------------------------------------------------------------------------------


def load_mat_descriptors(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Loads revisitop-style `.mat` descriptors: `X` database and `Q` queries, both [D, N].

    Args:
      path: a MATLAB file (v5 via scipy, or v7.3/HDF5 via h5py).

    Returns:
      (database float32 [N, D], queries float32 [Q, D]), converted to the project's row layout.
    """
    path = os.fspath(path)
    try:
        import scipy.io

        data = scipy.io.loadmat(path)
        x, q = data.get("X"), data.get("Q")
    except NotImplementedError:  # v7.3 files are HDF5
        import h5py

        with h5py.File(path, "r") as f:
            # MATLAB writes column-major arrays: h5py sees them transposed, i.e. already [N, D].
            x = np.asarray(f["X"]).T if "X" in f else None
            q = np.asarray(f["Q"]).T if "Q" in f else None
    if x is None or q is None:
        raise ValueError(f"{path}: a descriptor .mat file needs variables 'X' and 'Q' ([D, N])")
    x, q = np.asarray(x, np.float32), np.asarray(q, np.float32)
    if x.ndim != 2 or q.ndim != 2 or x.shape[0] != q.shape[0]:
        raise ValueError(
            f"{path}: 'X' {x.shape} and 'Q' {q.shape} must be [D, N] and [D, Q] with the same D"
        )
    return np.ascontiguousarray(x.T), np.ascontiguousarray(q.T)


def align_rows(
    descriptors: np.ndarray, ids: Sequence[str], expected_ids: Sequence[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reorders store rows to the ground truth's image order.

    Images that could not be read were skipped at extraction. A missing database image is
    ranked after every present one for every method (`rankings_with_missing`), i.e. it counts
    as never retrieved: the honest reading; the caller reports how many. A missing query is
    fatal, since its AP cannot be computed.

    Args:
      descriptors: float32 [M, D] rows of a store.
      ids: the store's M image ids.
      expected_ids: the ground truth's image names, in its order.
      what: 'database' or 'queries' (for the messages).

    Returns:
      (float32 [P, D] the present rows in ground-truth order, int64 [len(expected) - P] the
      ground-truth indices of the missing images).
    """
    pos = {name: i for i, name in enumerate(ids)}
    rows = np.array([pos.get(name, -1) for name in expected_ids], dtype=np.int64)
    missing = np.flatnonzero(rows < 0)
    if len(missing) and what == "queries":
        names = [expected_ids[i] for i in missing[:5]]
        raise ValueError(
            f"{len(missing)} query images have no descriptor (first: {names}); every query of "
            "the benchmark is needed: check the skipped-images summary of the extraction and "
            "fix or re-download those files"
        )
    return np.asarray(descriptors)[rows[rows >= 0]].astype(np.float32, copy=False), missing


def rankings_with_missing(ranks: np.ndarray, missing: np.ndarray, n_total: int) -> np.ndarray:
    """Maps rankings over the present database rows back to all `n_total` ids, missing last.

    Args:
      ranks: int [Q, P] rankings over the present rows (0..P-1).
      missing: int [n_total - P] ground-truth indices with no descriptor.
      n_total: number of database images in the ground truth.

    Returns:
      int64 [Q, n_total] rankings in ground-truth ids.
    """
    if len(missing) == 0:
        return ranks
    present = np.setdiff1d(np.arange(n_total), missing)
    tail = np.broadcast_to(np.asarray(missing, np.int64), (len(ranks), len(missing)))
    return np.concatenate([present[ranks], tail], axis=1)


# --------------------------------------------------------------------------------------------
# Precomputed descriptors
# --------------------------------------------------------------------------------------------


def load_precomputed(
    path: str, ds: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Loads precomputed descriptors: a `.mat` file or a folder with `db/` and `queries/` stores.

    Returns:
      (database [P, D], queries [Q, D], missing database ids, meta).
    """
    from cbir_tf import store

    if path.endswith(".mat"):
        x, q = load_mat_descriptors(path)
        if len(x) != ds.num_images or len(q) != ds.num_queries:
            raise ValueError(
                f"{path}: {len(x)} database and {len(q)} query descriptors, but {ds.name} has "
                f"{ds.num_images} database images and {ds.num_queries} queries"
            )
        return x, q, np.zeros(0, np.int64), {"source": os.path.abspath(path), "format": "mat"}
    db_dir, q_dir = os.path.join(path, "db"), os.path.join(path, "queries")
    if not (os.path.isdir(db_dir) and os.path.isdir(q_dir)):
        raise FileNotFoundError(
            f"{path}: expected a descriptor folder with db/ and queries/ stores (as written by "
            "extract.py --dataset=...) or a .mat file"
        )
    x, x_ids, x_meta = store.load_store(db_dir)
    q, q_ids, q_meta = store.load_store(q_dir)
    store.check_compatible(x_meta, q_meta)
    x, missing = align_rows(x, x_ids, list(ds.imlist), "database")
    q, _ = align_rows(q, q_ids, list(ds.qimlist), "queries")
    return x, q, missing, dict(x_meta, source=os.path.abspath(path), format="store")


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
      cfg: a config as in `configs/default.py`.
      model_path: a saved `.keras` descriptor model to use instead of `cfg.model`.
      descriptors: precomputed descriptors (store folder or `.mat`); skips extraction.
      out_dir: where results go (default `<workdir>/eval/<dataset>`).
      download: fetch missing benchmark files.
      progress: show progress bars.
      image_size_explicit: the user set `data.image_size`; it then wins over the size a saved
        model was trained at.

    Returns:
      {'results': per-method metrics, 'table': the printed table, 'files': written paths}.
    """
    from cbir_tf.data import prepare, revisited

    name = revisited.resolve_dataset_name(cfg.data.dataset)
    workdir = cfg.workdir
    out_dir = out_dir or os.path.join(workdir, "eval", name)
    t0 = time.perf_counter()
    ds = prepare.prepare_dataset(
        name,
        cfg.data.data_root,
        download=download,
        progress=progress,
        **({"images": False} if descriptors else {}),
    )
    skipped: dict[str, Any] = {}
    if descriptors:
        x, q, missing, meta = load_precomputed(descriptors, ds)
        what = f"descriptors from {descriptors}"
    else:
        db, qr, meta = benchmark.extract_benchmark(
            cfg,
            ds,
            model_path=model_path,
            download=download,
            progress=progress,
            image_size_explicit=image_size_explicit,
        )
        skipped = {"database": list(map(list, db.skipped)), "queries": list(map(list, qr.skipped))}
        x, missing = align_rows(db.descriptors, db.ids, list(ds.imlist), "database")
        q, _ = align_rows(qr.descriptors, qr.ids, list(ds.qimlist), "queries")
        what = _describe(meta)
    if len(missing):
        log.warning(
            "%d of %d database images have no descriptor and count as never retrieved (first: %s)",
            len(missing),
            ds.num_images,
            [ds.imlist[i] for i in missing[:3]],
        )

    kappas = tuple(int(k) for k in cfg.eval.kappas)
    results, rankings = evaluate_methods(
        q,
        x,
        ds.gnd,
        methods=tuple(cfg.rerank.methods),
        rerank_cfg=cfg.rerank.to_dict(),
        kappas=kappas,
        original_gnd=ds.original_gnd,
        original_queries=getattr(ds, "original_queries", None),
        missing=missing,
        search_cfg=cfg.get("search"),
    )
    title = f"{name} ({ds.num_images} images, {ds.num_queries} queries): {what}"
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
    files.update(_visual_report(out_dir, ds, results, rankings, cfg, title, files, meta))
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
) -> dict[str, str]:
    """Writes precision-recall plots, per-query result grids and the HTML report.

    Grids need the images; with precomputed descriptors and no images on disk only the plots
    and the table go into the report.
    """
    from cbir_tf import pages as html_pages
    from cbir_tf import visualize

    query_paths = ds.query_paths()
    have_images = bool(query_paths) and all(os.path.exists(p) for p in query_paths[:1])
    figures = visualize.evaluation_figures(
        out_dir,
        rankings,
        ds.gnd,
        query_paths,
        ds.image_paths(),
        num_queries=int(cfg.eval.num_visualize) if have_images else 0,
        top=int(cfg.eval.top_visualize),
        query_names=list(ds.qimlist),
        database_names=list(ds.imlist),
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
