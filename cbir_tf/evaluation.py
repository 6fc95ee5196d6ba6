"""The benchmark run: descriptors → search → re-ranking → Revisited Oxford/Paris metrics.

Each stage is a plain function over arrays so that it can run alone: `evaluate_methods` needs
only query and database descriptors and the ground truth; `benchmark_descriptors` produces
those descriptors (extracting them, or reusing a finished store); `run_benchmark` wires both
to a config and writes the report. `evaluate.py` only parses flags and calls `run_benchmark`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import metrics, report, search
from cbir_tf.configs import default as default_config
from cbir_tf.rerank import pipeline

log = logging.getLogger(__name__)

# The rows of the default table (configs/default.py); every method: `pipeline.METHODS`.
METHODS = tuple(default_config.get_config().rerank.methods)

# The literature learns whitening on the other landmark dataset (Radenović et al.), so that
# nothing is learned on the test images.
_OTHER_DATASET = {"rparis6k": "roxford5k", "roxford5k": "rparis6k"}


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
    db = pipeline.Database(database)
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
# Descriptors of a benchmark (TensorFlow is imported only here)
# --------------------------------------------------------------------------------------------


def model_key(cfg: Any, model_path: str | None = None) -> str:
    """A short, file-name-safe name of everything that changes the descriptors."""
    m, d = cfg.model, cfg.data
    if model_path:
        # Fine-tuned models are all called model.keras: the content tells them apart.
        stem = os.path.splitext(os.path.basename(model_path))[0]
        base = f"{stem}-{model_sha256(model_path)[:12]}"
    else:
        weights = str(m.weights)
        if weights not in ("imagenet", "none"):
            weights = os.path.splitext(os.path.basename(weights))[0]
        alpha = f"a{m.alpha:g}" if m.backbone.startswith("mobilenet") else ""
        pool = m.pooling + (f"{m.gem_p:g}" if m.pooling == "gem" else "")
        base = f"{m.backbone}{alpha}-{weights}-{pool}"
    scales = "_".join(f"{s:.3g}" for s in d.scales)
    return f"{base}-{d.image_size}px-s{scales}"


def model_meta(cfg: Any, model_path: str | None, whitening: Any | None) -> dict[str, Any]:
    """The descriptor metadata recorded in stores and results (compared before mixing)."""
    m, d = cfg.model, cfg.data
    meta = {
        "backbone": m.backbone,
        "alpha": float(m.alpha),
        "weights": os.path.abspath(model_path) if model_path else _weights_name(str(m.weights)),
        "pooling": m.pooling,
        "gem_p": float(m.gem_p),
        "rmac_levels": int(m.rmac_levels),
        "image_size": int(d.image_size),
        "scales": [float(s) for s in d.scales],
        "ms_power": float(d.ms_power),
        "whitening": None,
    }
    if model_path:
        meta.update(_saved_model_info(model_path))
        meta["model_sha256"] = model_sha256(model_path)
    if whitening is not None:
        info = dict(whitening.info)
        meta["whitening"] = {
            "learned_on": info.get("learned_on"),
            "regional": bool(info.get("regional", False)),
            "dim": int(whitening.projection.shape[1]),
            "shrinkage": float(info.get("shrinkage", 0.0)),
        }
    return meta


def model_sha256(path: str) -> str:
    """sha256 of a model file, computed once per file version (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _saved_model_info(model_path: str) -> dict[str, Any]:
    """What a saved model is made of: the info train.py stores in it (or its `model.json`)."""
    from cbir_tf import models

    info = models.saved_model_info(model_path)
    return {
        "backbone": info.get("backbone", "saved-model"),
        "alpha": float(info.get("alpha", 1.0)),
        "pooling": info.get("pooling", "saved-model"),
        "fine_tuning": info.get("recipe"),
    }


def with_model_image_size(cfg: Any, model_path: str | None, explicit: bool = False) -> Any:
    """The config to extract with a saved model: at the resolution it was trained at.

    A fine-tuned model is trained and validated at `train.image_size` (224 px by default);
    describing images at another size (the benchmark default of 1024 px) can make it worse
    than the model it started from. The model carries that size (`models.saved_model_info`).

    Args:
      cfg: the run's config.
      model_path: the `.keras` model, or None (the config's own model: `cfg` unchanged).
      explicit: the user set `data.image_size` (e.g. `--config.data.image_size=1024`): it is
        kept, with a warning when it differs from the trained size.

    Returns:
      `cfg`, or a copy with `data.image_size` set to the model's trained size.
    """
    if not model_path:
        return cfg
    from cbir_tf import models

    trained = models.saved_model_info(model_path).get("image_size")
    asked = int(cfg.data.image_size)
    if not trained or int(trained) == asked:
        return cfg
    if explicit:
        log.warning(
            "describing images at %d px as asked, not at the %d px %s was trained and "
            "validated at",
            asked, int(trained), model_path,
        )  # fmt: skip
        return cfg
    log.info(
        "describing images at %d px, the size %s was trained and validated at "
        "(--config.data.image_size=N overrides it)",
        int(trained), model_path,
    )  # fmt: skip
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.data.image_size = int(trained)
    return cfg


def _weights_name(weights: str) -> str:
    # A weights file is named by its absolute path so that a resumed run given a relative path
    # (or the other way round) is recognised as the same extraction.
    return weights if weights.lower() in ("imagenet", "none") else os.path.abspath(weights)


def whitening_dataset(dataset: str, cfg_whitening: Any) -> str | None:
    """Which benchmark to learn whitening on: by default the other landmark dataset."""
    from cbir_tf.data import revisited

    if cfg_whitening.kind == "none":
        return None
    if cfg_whitening.kind != "pca":
        raise ValueError(f"unknown whitening kind {cfg_whitening.kind!r}; valid: pca, none")
    if cfg_whitening.dataset == "auto":
        return _OTHER_DATASET.get(dataset, dataset)
    return revisited.resolve_dataset_name(cfg_whitening.dataset)


def learn_benchmark_whitening(
    cfg: Any, dataset: str, *, workdir: str, download: bool = True, progress: bool = True
) -> Any | None:
    """Learns (or loads the cached) PCA-whitening for `dataset` from another image set.

    With R-MAC and `whitening.regional`, whitening is learned on the regional vectors and
    applied to them before aggregation (Tolias et al.); otherwise on the global descriptors.

    Returns:
      A `cbir_tf.whitening.Whitening`, or None when `whitening.kind` is 'none'.
    """
    from cbir_tf import descriptors, whitening
    from cbir_tf.data import prepare

    train_name = whitening_dataset(dataset, cfg.whitening)
    if train_name is None:
        return None
    regional = bool(cfg.whitening.regional) and cfg.model.pooling == "rmac"
    key = f"{model_key(cfg)}-{'regional' if regional else 'global'}-on-{train_name}"
    key += f"-d{cfg.whitening.dim}-sh{cfg.whitening.shrinkage:g}"
    path = os.path.join(workdir, "whitening", key + ".npz")
    if os.path.exists(path):
        log.info("whitening: reusing %s", path)
        return whitening.Whitening.load(path)

    log.info(
        "whitening: learning on %s (%s vectors)", train_name, "regional" if regional else "global"
    )
    ds = prepare.prepare_dataset(
        train_name, cfg.data.data_root, download=download, progress=progress
    )
    if regional:
        model = _build_model(cfg, whitening=None, output="regions")
        vectors = region_vectors(model, ds.image_paths(), cfg.data.image_size, progress=progress)
    else:
        model = _build_model(cfg, whitening=None)
        store = os.path.join(workdir, "descriptors", train_name, model_key(cfg) + "-raw", "db")
        res = descriptors.extract(
            model,
            ds.image_paths(),
            ids=list(ds.imlist),
            image_size=cfg.data.image_size,
            scales=tuple(cfg.data.scales),
            ms_power=cfg.data.ms_power,
            store_dir=store,
            meta=model_meta(cfg, None, None),
            progress=progress,
        )
        vectors = np.asarray(res.descriptors)
    # Regional whitening is learned on L2-normalised regions, the distribution it is applied to.
    learn = whitening.learn_regional_whitening if regional else whitening.learn_pca_whitening
    w = learn(vectors, dim=int(cfg.whitening.dim), shrinkage=float(cfg.whitening.shrinkage))
    w.info.update(
        learned_on=train_name,
        regional=regional,
        shrinkage=float(cfg.whitening.shrinkage),
        backbone=cfg.model.backbone,
        pooling=cfg.model.pooling,
        num_vectors=int(len(vectors)),
    )
    w.save(path)
    return w


def _build_model(cfg: Any, whitening: Any | None, output: str = "descriptor") -> Any:
    from cbir_tf import models

    m = cfg.model
    return models.build_descriptor_model(
        backbone=m.backbone,
        weights=m.weights,
        alpha=float(m.alpha),
        pooling=m.pooling,
        gem_p=float(m.gem_p),
        rmac_levels=int(m.rmac_levels),
        whitening=whitening,
        regional_whitening=bool(whitening is not None and whitening.info.get("regional")),
        output=output,
    )


def region_vectors(
    model: Any, paths: Sequence[str], image_size: int, progress: bool = True
) -> np.ndarray:
    """All R-MAC regional vectors of a set of images, for learning regional whitening.

    Args:
      model: a descriptor model built with output='regions' ([1, R, C] per image).
      paths: image files.
      image_size: longest side in pixels.

    Returns:
      float32 [sum of R over images, C].
    """
    import tensorflow as tf
    from tqdm import tqdm

    from cbir_tf.data import pipeline

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)])
    def forward(x):
        return model(x, training=False)

    chunks, skipped = [], 0
    dataset = pipeline.image_dataset(list(paths), image_size)
    for item in tqdm(
        dataset.as_numpy_iterator(),
        total=len(paths),
        disable=not progress,
        desc="regions",
        unit="img",
    ):
        if item["error"]:
            skipped += 1
            continue
        out = forward(tf.convert_to_tensor(item["image"][None], tf.float32)).numpy()
        chunks.append(out.reshape(-1, out.shape[-1]))
    if skipped:
        log.warning("whitening: %d unreadable images skipped", skipped)
    if not chunks:
        raise ValueError("no readable image to learn whitening from")
    return np.concatenate(chunks).astype(np.float32)


def benchmark_descriptors(
    cfg: Any,
    ds: Any,
    model: Any,
    meta: Mapping[str, Any],
    store_root: str,
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
) -> tuple[Any, Any]:
    """Extracts (or reuses) database and cropped-query descriptors of a benchmark.

    Returns:
      (database ExtractionResult, query ExtractionResult); the stores are
      `<store_root>/db` and `<store_root>/queries`.
    """
    from cbir_tf import descriptors

    common = dict(
        image_size=int(cfg.data.image_size),
        scales=tuple(float(s) for s in cfg.data.scales),
        ms_power=float(cfg.data.ms_power),
        progress=progress,
        shard_index=shard_index,
        num_shards=num_shards,
        flush_every=int(cfg.extract.flush_every),
    )
    db = descriptors.extract(
        model,
        ds.image_paths(),
        ids=list(ds.imlist),
        store_dir=os.path.join(store_root, "db"),
        meta=dict(meta, split="database", dataset=ds.name),
        **common,
    )
    queries = descriptors.extract(
        model,
        ds.query_paths(),
        ids=list(ds.qimlist),
        bboxes=ds.query_bboxes(),
        store_dir=os.path.join(store_root, "queries"),
        meta=dict(meta, split="queries", dataset=ds.name),
        **common,
    )
    return db, queries


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


def extract_benchmark(
    cfg: Any,
    ds: Any,
    *,
    model_path: str | None = None,
    download: bool = True,
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
    image_size_explicit: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Learns or loads whitening, builds the model, and extracts a benchmark's descriptors.

    The stores go to `cfg.extract.out` or `<workdir>/descriptors/<dataset>/<model key>/` (with
    `db/` and `queries/`), and are reused when complete, resumed when interrupted. A saved
    model describes images at the size it was trained at unless `image_size_explicit` (see
    `with_model_image_size`).

    Returns:
      (database ExtractionResult, query ExtractionResult, descriptor metadata).
    """
    from cbir_tf import models

    cfg = with_model_image_size(cfg, model_path, image_size_explicit)
    w = None
    fallback = None
    if model_path is None:
        fallback = use_fallback_weights(cfg)
        w = learn_benchmark_whitening(
            cfg, ds.name, workdir=cfg.workdir, download=download, progress=progress
        )
        model = _build_model(cfg, w)
    else:
        model = models.load_descriptor_model(model_path)
    meta = model_meta(cfg, model_path, w)
    key = model_key(cfg, model_path) + ("" if w is None else "-" + _whitening_tag(meta))
    store_root = cfg.extract.out or os.path.join(cfg.workdir, "descriptors", ds.name, key)
    db, qr = benchmark_descriptors(
        cfg,
        ds,
        model,
        meta,
        store_root,
        progress=progress,
        shard_index=shard_index,
        num_shards=num_shards,
    )
    # Where the stores are and how the network behaved, for the summary and the results file
    # (not part of the settings the stores are checked against).
    scale = _feature_scale(model, ds.image_paths()[:2], int(cfg.data.image_size))
    return db, qr, dict(meta, store=store_root, weights_fallback=fallback, feature_scale=scale)


def use_fallback_weights(cfg: Any) -> str | None:
    """Switches `cfg.model.weights` to `cfg.model.weights_fallback` when ImageNet weights cannot be
    had (offline); the demo runs everywhere this way, and says so.

    Returns:
      Why the fallback was taken (for the table title), or None when it was not.
    """
    from cbir_tf import backbones

    m = cfg.model
    fallback = str(m.get("weights_fallback", "") or "")
    if str(m.weights).lower() != "imagenet" or not fallback:
        return None
    try:
        backbones.fetch_imagenet_weights(m.backbone, float(m.alpha))
        return None
    except backbones.WeightsUnavailableError as e:
        log.warning("ImageNet weights unavailable, using weights=%r instead: %s", fallback,
                    str(e).splitlines()[0])  # fmt: skip
        m.weights = fallback
        return "ImageNet weights could not be downloaded"


def _feature_scale(model: Any, paths: Sequence[str], image_size: int) -> float | None:
    """`models.feature_scale` over the first readable images of `paths`."""
    from cbir_tf import models
    from cbir_tf.data import pipeline

    images = [
        item["image"]
        for item in pipeline.image_dataset(list(paths), image_size).as_numpy_iterator()
        if not item["error"]
    ]
    return models.feature_scale(model, images)


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
        db, qr, meta = extract_benchmark(
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


def _whitening_tag(meta: Mapping[str, Any]) -> str:
    w = meta["whitening"]
    return f"w{'r' if w['regional'] else 'g'}-{w['learned_on']}-d{w['dim']}-sh{w['shrinkage']:g}"


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
    from cbir_tf import html, visualize

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
    page = html.evaluation_report(
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
