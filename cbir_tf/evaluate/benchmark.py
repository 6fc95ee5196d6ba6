"""A benchmark's descriptors: the model that makes them, its whitening, their stores.

Used by `extract.py --dataset` and `evaluate.py` (through `cbir_tf.runs`) alike, so both find
the same stores:

  * `DescriptorSpec`: everything that changes the descriptors (the model block, or a saved
    model, and the extraction settings), with the file-name-safe key the stores are named by
    (`key`) and the metadata they are checked against (`meta`);
  * `learn_benchmark_whitening`: PCA-whitening learned (or reused) on the other landmark
    dataset, on global or R-MAC regional vectors;
  * `extract_benchmark`: builds the model (or loads a saved one) and extracts database and
    cropped-query descriptors into resumable stores, and the distractors' into their own.

TensorFlow is imported only inside the functions that run a model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default

log = logging.getLogger(__name__)

# The literature learns whitening on the other landmark dataset (Radenović et al.), so that
# nothing is learned on the test images.
_OTHER_DATASET = {"rparis6k": "roxford5k", "roxford5k": "rparis6k"}


@dataclasses.dataclass(frozen=True)
class DescriptorSpec:
    """How a benchmark's images are described: everything that changes their descriptors.

    Attributes:
      model: `build_descriptor_model`'s keyword arguments (a config's `model` block); pooling
        'auto' is replaced by the backbone's recipe.
      image_size: longest image side, pixels (for a saved model: the size resolved by
        `cbir_tf.describe.models.image_size_for_model`).
      scales: multi-scale factors.
      ms_power: power of the generalised mean combining the scales.
      model_path: a saved `.keras` descriptor model used instead of `model`.
    """

    model: Mapping[str, Any]
    image_size: int = default("data.image_size")
    scales: tuple[float, ...] = tuple(default("data.scales"))
    ms_power: float = default("data.ms_power")
    model_path: str | None = None

    def __post_init__(self):
        # 'auto' (the default pooling) stands for the backbone's recipe: the cache key, the
        # metadata and the model all name the pooling that is computed, as before 'auto' existed.
        if str(self.model.get("pooling", "")).lower() == "auto" and "backbone" in self.model:
            from cbir_tf.describe import catalog

            object.__setattr__(self, "model", catalog.with_pooling(self.model))

    def extraction(self) -> dict[str, Any]:
        """`cbir_tf.describe.extract.extract`'s settings: image_size, scales, ms_power."""
        scales = tuple(float(s) for s in self.scales)
        return {"image_size": int(self.image_size), "scales": scales, "ms_power": self.ms_power}

    def key(self) -> str:
        """A short, file-name-safe name of everything that changes the descriptors."""
        m = self.model
        if self.model_path:
            # Fine-tuned models are all called model.keras: the content tells them apart.
            stem = os.path.splitext(os.path.basename(self.model_path))[0]
            base = f"{stem}-{model_sha256(self.model_path)[:12]}"
        else:
            weights = str(m["weights"])
            if weights not in ("imagenet", "none"):
                weights = os.path.splitext(os.path.basename(weights))[0]
            alpha = f"a{m['alpha']:g}" if m["backbone"].startswith("mobilenet") else ""
            pool = m["pooling"] + (f"{m['gem_p']:g}" if m["pooling"] == "gem" else "")
            base = f"{m['backbone']}{alpha}-{weights}-{pool}"
        scales = "_".join(f"{s:.3g}" for s in self.scales)
        return f"{base}-{self.image_size}px-s{scales}"

    def meta(self, whitening: Any | None = None) -> dict[str, Any]:
        """The descriptor metadata recorded in stores and results (compared before mixing)."""
        m = self.model
        meta = {
            "backbone": m["backbone"],
            "alpha": float(m["alpha"]),
            "weights": _weights_name(str(m["weights"])),
            "pooling": m["pooling"],
            "gem_p": float(m["gem_p"]),
            "rmac_levels": int(m["rmac_levels"]),
            "image_size": int(self.image_size),
            "scales": [float(s) for s in self.scales],
            "ms_power": float(self.ms_power),
            "whitening": None,
        }
        if self.model_path:
            meta.update(_saved_model_info(self.model_path))
            meta["weights"] = os.path.abspath(self.model_path)
            meta["model_sha256"] = model_sha256(self.model_path)
        if whitening is not None:
            info = dict(whitening.info)
            meta["whitening"] = {
                "learned_on": info.get("learned_on"),
                "regional": bool(info.get("regional", False)),
                "dim": int(whitening.projection.shape[1]),
                "shrinkage": float(info.get("shrinkage", 0.0)),
            }
        return meta

    def build(self, whitening: Any | None = None, output: str = "descriptor") -> Any:
        """The model: `build_descriptor_model(**model)` with `whitening`, or the saved model."""
        from cbir_tf.describe import models

        if self.model_path:
            return models.load_descriptor_model(self.model_path)
        regional = bool(whitening is not None and whitening.info.get("regional"))
        return models.build_descriptor_model(
            **self.model, whitening=whitening, regional_whitening=regional, output=output
        )

    def with_available_weights(self) -> tuple[DescriptorSpec, str | None]:
        """This spec with `model.weights_fallback` in place of ImageNet weights when those
        cannot be had (offline), and why (None when nothing changed)."""
        from cbir_tf.describe import catalog

        if self.model_path:
            return self, None
        m = self.model
        weights, why = catalog.resolve_weights(
            m["backbone"], m["alpha"], m["weights"], m.get("weights_fallback", "")
        )
        if why is None:
            return self, None
        return dataclasses.replace(self, model={**m, "weights": weights}), why


@dataclasses.dataclass(frozen=True)
class WhiteningSpec:
    """What whitening a benchmark's descriptors get (a config's `whitening` block).

    Attributes:
      kind: 'pca' or 'none'.
      dataset: the images it is learned on: 'auto' (the other landmark dataset; none for a
        benchmark folder), a benchmark name, a folder, or 'none'.
      dim: output dimension (0 = all).
      shrinkage: eigenvalue shrinkage in [0, 1].
      regional: with R-MAC, whiten the region vectors (the classic way).
    """

    kind: str = default("whitening.kind")
    dataset: str = default("whitening.dataset")
    dim: int = default("whitening.dim")
    shrinkage: float = default("whitening.shrinkage")
    regional: bool = default("whitening.regional")


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
    from cbir_tf.describe import models

    info = models.saved_model_info(model_path)
    return {
        "backbone": info.get("backbone", "saved-model"),
        "alpha": float(info.get("alpha", 1.0)),
        "pooling": info.get("pooling", "saved-model"),
        "fine_tuning": info.get("recipe"),
    }


def _weights_name(weights: str) -> str:
    # A weights file (or checkpoint folder) is named by its absolute path so that a resumed run
    # given a relative path (or the other way round) is recognised as the same extraction;
    # keywords and KerasHub handles (hf://...) are names, not paths.
    if weights.lower() in ("imagenet", "none", "pretrained") or "://" in weights:
        return weights
    return os.path.abspath(weights)


def whitening_dataset(dataset: str, spec: WhiteningSpec, folder: bool = False) -> str | None:
    """Which images to learn whitening on: by default the other landmark dataset.

    Returns:
      A dataset name, an absolute folder path, or None (no whitening).
    """
    from cbir_tf.data import prepare, revisited

    if spec.kind == "none":
        return None
    if spec.kind != "pca":
        raise ValueError(f"unknown whitening kind {spec.kind!r}; valid: pca, none")
    value = str(spec.dataset).strip()
    if value.lower() == "none":
        return None
    if value == "auto":
        return None if folder else _OTHER_DATASET.get(dataset, dataset)
    if prepare.is_folder_benchmark(value):
        return os.path.abspath(os.path.expanduser(value))
    return revisited.resolve_dataset_name(value)


def source_tag(name: str) -> str:
    """A file-name-safe tag of an image source: the dataset name, or folder name + hash."""
    if not os.path.isabs(name):
        return name
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(name))
    return f"folder-{base}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _whitening_images(
    name: str, data_root: str, download: bool, progress: bool
) -> tuple[list[str], list[str]]:
    """(paths, ids) whitening is learned on: a benchmark's database, or a folder's images."""
    from cbir_tf.data import prepare
    from cbir_tf.data.folder import list_images

    if os.path.isabs(name) and not os.path.isdir(os.path.join(name, "jpg")):
        rel = list_images(name, recursive=True)
        return [os.path.join(name, *p.split("/")) for p in rel], rel
    ds = prepare.open_benchmark(name, data_root, download=download, progress=progress)
    return ds.image_paths(), list(ds.imlist)


def learn_benchmark_whitening(
    spec: DescriptorSpec,
    whitening: WhiteningSpec,
    dataset: str,
    *,
    data_root: str,
    workdir: str,
    download: bool = True,
    progress: bool = True,
    folder: bool = False,
) -> Any | None:
    """Learns (or loads the cached) PCA-whitening for `dataset` from another image set.

    With R-MAC and `whitening.regional`, whitening is learned on the regional vectors and
    applied to them before aggregation (Tolias et al.); otherwise on the global descriptors.

    Args:
      spec: how descriptors are made (without whitening).
      whitening: what whitening to learn.
      dataset: the benchmark the whitening is for.
      data_root: where benchmarks live (`<data_root>/datasets/<name>/`).
      workdir: the cache folder (`<workdir>/whitening/`, `<workdir>/descriptors/`).
      download, progress: as `prepare.open_benchmark`.
      folder: `dataset` is a benchmark folder (no other landmark dataset to learn on).

    Returns:
      A `cbir_tf.describe.whitening.Whitening`, or None when `whitening.kind` is 'none'.
    """
    from cbir_tf.describe import whitening as whitening_lib
    from cbir_tf.describe.extract import extract
    from cbir_tf.store.writer import StoreSink

    train_name = whitening_dataset(dataset, whitening, folder=folder)
    if train_name is None:
        return None
    regional = bool(whitening.regional) and spec.model["pooling"] == "rmac"
    key = f"{spec.key()}-{'regional' if regional else 'global'}-on-{source_tag(train_name)}"
    key += f"-d{whitening.dim}-sh{whitening.shrinkage:g}"
    path = os.path.join(workdir, "whitening", key + ".npz")
    if os.path.exists(path):
        log.info("whitening: reusing %s", path)
        return whitening_lib.Whitening.load(path)

    log.info(
        "whitening: learning on %s (%s vectors)", train_name, "regional" if regional else "global"
    )
    paths, ids = _whitening_images(train_name, data_root, download, progress)
    if regional:
        model = spec.build(output="regions")
        vectors = region_vectors(model, paths, spec.image_size, progress=progress)
    else:
        store = os.path.join(
            workdir, "descriptors", source_tag(train_name), spec.key() + "-raw", "db"
        )
        res = extract(
            spec.build(), paths, ids=ids, sink=StoreSink(store), meta=spec.meta(),
            progress=progress, **spec.extraction(),
        )  # fmt: skip
        vectors = np.asarray(res.descriptors)
    # Regional whitening is learned on L2-normalised regions, the distribution it is applied to.
    learn = (
        whitening_lib.learn_regional_whitening if regional else whitening_lib.learn_pca_whitening
    )
    w = learn(vectors, dim=int(whitening.dim), shrinkage=float(whitening.shrinkage))
    w.info.update(
        learned_on=train_name,
        regional=regional,
        shrinkage=float(whitening.shrinkage),
        backbone=spec.model["backbone"],
        pooling=spec.model["pooling"],
        num_vectors=int(len(vectors)),
    )
    w.save(path)
    return w


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

    from cbir_tf.data import pipeline
    from cbir_tf.progressbar import progress_bar

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)])
    def forward(x):
        return model(x, training=False)

    chunks, skipped = [], 0
    dataset = pipeline.image_dataset(list(paths), image_size)
    for item in progress_bar(
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


def describe_images(
    extract_fn: Callable[..., Any] | None,
    model: Any,
    paths: Sequence[str],
    *,
    ids: Sequence[str],
    store_dir: str,
    flush_every: int,
    **kwargs: Any,
) -> Any:
    """`extract_fn` (default: `cbir_tf.describe.extract.extract`) into the store `store_dir`.

    `extract_fn` is the extraction's runner: the local per-image loop, or
    `cbir_tf.beam.extract.BeamExtractor.extract` (same arguments, same result).
    """
    from cbir_tf.describe.extract import extract
    from cbir_tf.store.writer import StoreSink

    sink = StoreSink(store_dir, flush_every=flush_every)
    return (extract_fn or extract)(model, list(paths), ids=list(ids), sink=sink, **kwargs)


def benchmark_descriptors(
    ds: Any,
    model: Any,
    spec: DescriptorSpec,
    meta: Mapping[str, Any],
    store_root: str,
    *,
    flush_every: int = default("extract.flush_every"),
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
    extract_fn: Any = None,
) -> tuple[Any, Any]:
    """Extracts (or reuses) database and cropped-query descriptors of a benchmark.

    Returns:
      (database ExtractionResult, query ExtractionResult); the stores are
      `<store_root>/db` and `<store_root>/queries`.
    """
    common = dict(
        **spec.extraction(), progress=progress, shard_index=shard_index, num_shards=num_shards,
        flush_every=flush_every,
    )  # fmt: skip
    db = describe_images(
        extract_fn, model, ds.image_paths(), ids=ds.imlist,
        store_dir=os.path.join(store_root, "db"),
        meta=dict(meta, split="database", dataset=ds.name), **common,
    )  # fmt: skip
    queries = describe_images(
        extract_fn, model, ds.query_paths(), ids=ds.qimlist, bboxes=ds.query_bboxes(),
        store_dir=os.path.join(store_root, "queries"),
        meta=dict(meta, split="queries", dataset=ds.name), **common,
    )  # fmt: skip
    return db, queries


def extract_benchmark(
    ds: Any,
    spec: DescriptorSpec,
    whitening: WhiteningSpec,
    *,
    data_root: str,
    workdir: str,
    out: str = "",
    flush_every: int = default("extract.flush_every"),
    download: bool = True,
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
    distractors: Any = None,
    extract_fn: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Learns or loads whitening, builds the model, and extracts a benchmark's descriptors.

    Args:
      ds: the benchmark (`cbir_tf.data.revisited.BenchmarkDataset`).
      spec: how descriptors are made; ImageNet weights fall back to `weights_fallback` when
        they cannot be downloaded (the meta says so).
      whitening: the whitening to learn (a saved model is used as it is).
      data_root: where benchmarks live.
      workdir: the cache folder (whitening, descriptors).
      out: the stores' folder ('' = `<workdir>/descriptors/<dataset>/<spec key>/`), holding
        `db/` and `queries/` (reused when complete, resumed when interrupted).
      flush_every: images per saved chunk.
      download, progress: as `prepare.open_benchmark`.
      shard_index, num_shards: the shard of each image list this call extracts.
      distractors: a `cbir_tf.data.distractors.DistractorSet`, whose descriptors go to a store
        of their own named by the same key, reused by every benchmark whose descriptors are
        made the same way (`distractor_store`).
      extract_fn: the extraction's runner (see `describe_images`).

    Returns:
      (database ExtractionResult, query ExtractionResult, descriptor metadata; with
      distractors, 'distractors': {'store', 'images', 'skipped', ...}).
    """
    spec, fallback = spec.with_available_weights()
    folder = bool(getattr(ds, "folder_benchmark", False))
    w = None
    if spec.model_path is None:
        w = learn_benchmark_whitening(
            spec, whitening, ds.name, data_root=data_root, workdir=workdir, download=download,
            progress=progress, folder=folder,
        )  # fmt: skip
    model = spec.build(w)
    meta = spec.meta(w)
    key = spec.key() + ("" if w is None else "-" + _whitening_tag(meta))
    name = source_tag(ds.root) if folder else ds.name
    store_root = out or os.path.join(workdir, "descriptors", name, key)
    extra: dict[str, Any] = {}
    if folder and w is None and spec.model_path is None and whitening.dataset == "auto":
        extra["whitening_note"] = "whitening.dataset=auto: none for a benchmark folder"
    shard = {"shard_index": shard_index, "num_shards": num_shards, "extract_fn": extract_fn}
    db, qr = benchmark_descriptors(
        ds, model, spec, meta, store_root, flush_every=flush_every, progress=progress, **shard
    )
    if distractors is not None:
        extra["distractors"] = distractor_descriptors(
            distractors, model, spec, meta, distractor_store(out, workdir, distractors, key),
            flush_every=flush_every, progress=progress, **shard,
        )  # fmt: skip
    # Where the stores are and how the network behaved, for the summary and the results file
    # (not part of the settings the stores are checked against).
    scale = _feature_scale(model, ds.image_paths()[:2], int(spec.image_size))
    return (
        db,
        qr,
        dict(meta, store=store_root, weights_fallback=fallback, feature_scale=scale, **extra),
    )


def distractor_store(out: str, workdir: str, distractors: Any, key: str) -> str:
    """`<out>/distractors` (a shard's or a chosen folder), else the shared store
    `<workdir>/descriptors/<distractor set>/<model key>/db`."""
    if out:
        return os.path.join(out, "distractors")
    return os.path.join(workdir, "descriptors", distractors.name, key, "db")


def distractor_descriptors(
    distractors: Any,
    model: Any,
    spec: DescriptorSpec,
    meta: Mapping[str, Any],
    store_dir: str,
    *,
    flush_every: int = default("extract.flush_every"),
    progress: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
    extract_fn: Any = None,
) -> dict[str, Any]:
    """Extracts (or reuses, or resumes) the distractors' descriptors into `store_dir`.

    Returns:
      {'name', 'title', 'store', 'images' (described by this shard), 'skipped' (count),
      'skipped_examples'} for the summary and the results file.
    """
    res = describe_images(
        extract_fn, model, distractors.paths(), ids=distractors.ids, store_dir=store_dir,
        flush_every=flush_every, meta=dict(meta, split="distractors", dataset=distractors.name),
        progress=progress, shard_index=shard_index, num_shards=num_shards, **spec.extraction(),
    )  # fmt: skip
    return {
        "name": distractors.name,
        "title": distractors.title,
        "store": store_dir,
        "images": len(res.ids),
        "skipped": len(res.skipped),
        "skipped_examples": [list(s) for s in res.skipped[:20]],
    }


def _feature_scale(model: Any, paths: Sequence[str], image_size: int) -> float | None:
    """`models.feature_scale` over the first readable images of `paths`."""
    from cbir_tf.data import pipeline
    from cbir_tf.describe import models

    images = [
        item["image"]
        for item in pipeline.image_dataset(list(paths), image_size).as_numpy_iterator()
        if not item["error"]
    ]
    return models.feature_scale(model, images)


def _whitening_tag(meta: Mapping[str, Any]) -> str:
    w = meta["whitening"]
    on = source_tag(str(w["learned_on"]))
    return f"w{'r' if w['regional'] else 'g'}-{on}-d{w['dim']}-sh{w['shrinkage']:g}"
