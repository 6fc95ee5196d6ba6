"""A benchmark's descriptors: the model a config describes, its whitening, its stores.

Used by `extract.py --dataset` (through `cbir_tf.runs`) and by `evaluate.py` (through
`cbir_tf.evaluation.run_benchmark`) alike, so both find the same stores:

  * `model_key` / `model_meta`: a file-name-safe key and the metadata of everything that
    changes the descriptors (stores are named by the first and checked against the second);
  * `learn_benchmark_whitening`: PCA-whitening learned (or reused) on the other landmark
    dataset, on global or R-MAC regional vectors;
  * `extract_benchmark`: builds the model (or loads a saved one, at the size it was trained at)
    and extracts database and cropped-query descriptors into resumable stores.

TensorFlow is imported only inside the functions that run a model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The literature learns whitening on the other landmark dataset (Radenović et al.), so that
# nothing is learned on the test images.
_OTHER_DATASET = {"rparis6k": "roxford5k", "roxford5k": "rparis6k"}


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


def whitening_dataset(dataset: str, cfg_whitening: Any, folder: bool = False) -> str | None:
    """Which images to learn whitening on: by default the other landmark dataset.

    `whitening.dataset` may name a benchmark, a folder (an own benchmark's database images, or
    any images under it) or 'none'; 'auto' is the other landmark dataset, and none for an own
    benchmark folder (`folder`), which has no other dataset to learn on.

    Returns:
      A dataset name, an absolute folder path, or None (no whitening).
    """
    from cbir_tf.data import prepare, revisited

    if cfg_whitening.kind == "none":
        return None
    if cfg_whitening.kind != "pca":
        raise ValueError(f"unknown whitening kind {cfg_whitening.kind!r}; valid: pca, none")
    value = str(cfg_whitening.dataset).strip()
    if value.lower() == "none":
        return None
    if value == "auto":
        return None if folder else _OTHER_DATASET.get(dataset, dataset)
    if prepare.is_folder_benchmark(value):
        return os.path.abspath(os.path.expanduser(value))
    return revisited.resolve_dataset_name(value)


def _source_tag(name: str) -> str:
    """A file-name-safe tag of a whitening source: the dataset name, or folder name + hash."""
    if not os.path.isabs(name):
        return name
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(name))
    return f"folder-{base}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _whitening_images(
    name: str, cfg: Any, download: bool, progress: bool
) -> tuple[list[str], list[str]]:
    """(paths, ids) whitening is learned on: a benchmark's database, or a folder's images."""
    from cbir_tf.data import prepare
    from cbir_tf.data.folder import list_images

    if os.path.isabs(name) and not os.path.isdir(os.path.join(name, "jpg")):
        rel = list_images(name, recursive=True)
        return [os.path.join(name, *p.split("/")) for p in rel], rel
    ds = prepare.open_benchmark(name, cfg.data.data_root, download=download, progress=progress)
    return ds.image_paths(), list(ds.imlist)


def learn_benchmark_whitening(
    cfg: Any,
    dataset: str,
    *,
    workdir: str,
    download: bool = True,
    progress: bool = True,
    folder: bool = False,
) -> Any | None:
    """Learns (or loads the cached) PCA-whitening for `dataset` from another image set.

    With R-MAC and `whitening.regional`, whitening is learned on the regional vectors and
    applied to them before aggregation (Tolias et al.); otherwise on the global descriptors.

    Returns:
      A `cbir_tf.whitening.Whitening`, or None when `whitening.kind` is 'none'.
    """
    from cbir_tf import descriptors, whitening

    train_name = whitening_dataset(dataset, cfg.whitening, folder=folder)
    if train_name is None:
        return None
    regional = bool(cfg.whitening.regional) and cfg.model.pooling == "rmac"
    key = f"{model_key(cfg)}-{'regional' if regional else 'global'}-on-{_source_tag(train_name)}"
    key += f"-d{cfg.whitening.dim}-sh{cfg.whitening.shrinkage:g}"
    path = os.path.join(workdir, "whitening", key + ".npz")
    if os.path.exists(path):
        log.info("whitening: reusing %s", path)
        return whitening.Whitening.load(path)

    log.info(
        "whitening: learning on %s (%s vectors)", train_name, "regional" if regional else "global"
    )
    paths, ids = _whitening_images(train_name, cfg, download, progress)
    if regional:
        model = build_model(cfg, whitening=None, output="regions")
        vectors = region_vectors(model, paths, cfg.data.image_size, progress=progress)
    else:
        model = build_model(cfg, whitening=None)
        store = os.path.join(
            workdir, "descriptors", _source_tag(train_name), model_key(cfg) + "-raw", "db"
        )
        res = descriptors.extract(
            model,
            paths,
            ids=ids,
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


def build_model(cfg: Any, whitening: Any | None, output: str = "descriptor") -> Any:
    """The descriptor model of `cfg.model` with `whitening` built in (output: see `models`)."""
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
    extract_fn: Any = None,
) -> tuple[Any, Any]:
    """Extracts (or reuses) database and cropped-query descriptors of a benchmark.

    `extract_fn` describes the images (default `descriptors.extract`; see
    `cbir_tf.runs.extract_function`).

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
    extract = extract_fn or descriptors.extract
    db = extract(
        model,
        ds.image_paths(),
        ids=list(ds.imlist),
        store_dir=os.path.join(store_root, "db"),
        meta=dict(meta, split="database", dataset=ds.name),
        **common,
    )
    queries = extract(
        model,
        ds.query_paths(),
        ids=list(ds.qimlist),
        bboxes=ds.query_bboxes(),
        store_dir=os.path.join(store_root, "queries"),
        meta=dict(meta, split="queries", dataset=ds.name),
        **common,
    )
    return db, queries


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
    distractors: Any = None,
    extract_fn: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Learns or loads whitening, builds the model, and extracts a benchmark's descriptors.

    The stores go to `cfg.extract.out` or `<workdir>/descriptors/<dataset>/<model key>/` (with
    `db/` and `queries/`), and are reused when complete, resumed when interrupted. A saved
    model describes images at the size it was trained at unless `image_size_explicit` (see
    `with_model_image_size`). With `distractors` (a `data.distractors.DistractorSet`), their
    descriptors go to a store of their own, named by the same key, reused by every benchmark
    whose descriptors are made the same way (`distractor_store`). `extract_fn`: see
    `benchmark_descriptors`.

    Returns:
      (database ExtractionResult, query ExtractionResult, descriptor metadata; with
      distractors, 'distractors': {'store', 'images', 'skipped', ...}).
    """
    from cbir_tf import models

    cfg = with_model_image_size(cfg, model_path, image_size_explicit)
    w = None
    fallback = None
    folder = bool(getattr(ds, "folder_benchmark", False))
    if model_path is None:
        fallback = use_fallback_weights(cfg)
        w = learn_benchmark_whitening(
            cfg, ds.name, workdir=cfg.workdir, download=download, progress=progress, folder=folder
        )
        model = build_model(cfg, w)
    else:
        model = models.load_descriptor_model(model_path)
    meta = model_meta(cfg, model_path, w)
    key = model_key(cfg, model_path) + ("" if w is None else "-" + _whitening_tag(meta))
    name = _source_tag(ds.root) if folder else ds.name
    store_root = cfg.extract.out or os.path.join(cfg.workdir, "descriptors", name, key)
    extra: dict[str, Any] = {}
    if folder and w is None and model_path is None and cfg.whitening.dataset == "auto":
        extra["whitening_note"] = "whitening.dataset=auto: none for a benchmark folder"
    db, qr = benchmark_descriptors(
        cfg,
        ds,
        model,
        meta,
        store_root,
        progress=progress,
        shard_index=shard_index,
        num_shards=num_shards,
        extract_fn=extract_fn,
    )
    if distractors is not None:
        extra["distractors"] = distractor_descriptors(
            cfg, distractors, model, meta, distractor_store(cfg, distractors, key),
            progress=progress, shard_index=shard_index, num_shards=num_shards,
            extract_fn=extract_fn,
        )  # fmt: skip
    # Where the stores are and how the network behaved, for the summary and the results file
    # (not part of the settings the stores are checked against).
    scale = _feature_scale(model, ds.image_paths()[:2], int(cfg.data.image_size))
    return (
        db,
        qr,
        dict(meta, store=store_root, weights_fallback=fallback, feature_scale=scale, **extra),
    )


def distractor_store(cfg: Any, distractors: Any, key: str) -> str:
    """`<extract.out>/distractors` (a shard's or a chosen folder), else the shared store
    `<workdir>/descriptors/<distractor set>/<model key>/db`."""
    if cfg.extract.out:
        return os.path.join(cfg.extract.out, "distractors")
    return os.path.join(cfg.workdir, "descriptors", distractors.name, key, "db")


def distractor_descriptors(
    cfg: Any,
    distractors: Any,
    model: Any,
    meta: Mapping[str, Any],
    store_dir: str,
    *,
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
    extract_fn: Any = None,
) -> dict[str, Any]:
    """Extracts (or reuses, or resumes) the distractors' descriptors into `store_dir`.

    `extract_fn`: see `benchmark_descriptors`.

    Returns:
      {'name', 'title', 'store', 'images' (described by this shard), 'skipped' (count),
      'skipped_examples'} for the summary and the results file.
    """
    from cbir_tf import descriptors

    res = (extract_fn or descriptors.extract)(
        model,
        distractors.paths(),
        ids=list(distractors.ids),
        image_size=int(cfg.data.image_size),
        scales=tuple(float(s) for s in cfg.data.scales),
        ms_power=float(cfg.data.ms_power),
        store_dir=store_dir,
        meta=dict(meta, split="distractors", dataset=distractors.name),
        progress=progress,
        shard_index=shard_index,
        num_shards=num_shards,
        flush_every=int(cfg.extract.flush_every),
    )
    return {
        "name": distractors.name,
        "title": distractors.title,
        "store": store_dir,
        "images": len(res.ids),
        "skipped": len(res.skipped),
        "skipped_examples": [list(s) for s in res.skipped[:20]],
    }


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


def _whitening_tag(meta: Mapping[str, Any]) -> str:
    w = meta["whitening"]
    on = _source_tag(str(w["learned_on"]))
    return f"w{'r' if w['regional'] else 'g'}-{on}-d{w['dim']}-sh{w['shrinkage']:g}"
