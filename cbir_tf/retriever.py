"""Search your own photos: index a folder, query it with an image, get ranked ids, paths, scores.

    from cbir_tf import Retriever
    r = Retriever.from_config(config, directory="my_index")   # or Retriever.from_model("m.keras")
    r.index("~/Pictures")             # incremental: files already indexed and unchanged are skipped
    for hit in r.search("query.jpg", k=10, rerank="aqe"):
        print(hit.rank, hit.score, hit.path)

An index folder is a descriptor store plus a manifest (`cbir_tf.store.index_folder`); `extract.py
--images=DIR --out=DIR` (`cbir_tf.runs.extract.build_index`) and this API build the same folders.
In memory, new descriptors are joined to the matrix. Attached to a folder, new images are first
extracted into `<index>/pending/` (a store written chunk by chunk, resumable after a kill: the
work list is saved before it starts), then joined with the kept rows into the new
descriptors.npy block by block, so memory never holds more than the memory-mapped matrix and
one block; the store and the manifest are committed together through the store's journal.

Image ids are paths relative to the collection root ('/' separators, '../' for images outside
it). The root is the first folder indexed (or the common folder of the first image files);
indexes written by earlier versions may hold absolute ids, which keep working.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.config import default
from cbir_tf.data.image_list import SHARD_FIELDS
from cbir_tf.fileio import folder_lock
from cbir_tf.rerank import auto, pipeline
from cbir_tf.search import ann as ann_lib
from cbir_tf.search.ann import AnnSettings
from cbir_tf.store import files as store_lib
from cbir_tf.store import index_folder
from cbir_tf.store.collection import Collection
from cbir_tf.store.meta import check_compatible, normalize
from cbir_tf.store.writer import StoreSink

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One retrieved image.

    Attributes:
      rank: 1 for the best match.
      id: the image id in the index.
      path: the image file (None when unknown).
      score: similarity (cosine for plain and α-QE search; the diffusion score otherwise).
    """

    rank: int
    id: str
    path: str | None
    score: float


def format_results(results: Sequence[SearchResult], title: str = "") -> str:
    """A fixed-width text table (rank, score, image id) of one query's results."""
    width = max([len("rank")] + [len(str(r.rank)) for r in results])
    lines = [title] if title else []
    lines.append(f"{'rank':>{width}}  {'score':>8}  image id")
    lines += [f"{r.rank:>{width}}  {r.score:>8.4f}  {r.id}" for r in results]
    return "\n".join(lines) + "\n"


class Retriever:
    """An image index and the model that describes its images.

    Build one with `from_config`, `from_model` or `load`. With a `directory`, the index lives in
    that folder and `index` / `remove` update it on disk as they go (resumable); without, it lives
    in memory until `save`.

    Args:
      model: a Keras model mapping raw RGB float32 [B, H, W, 3] (0..255) to L2-normalised
        descriptors [B, D] (as `models.build_descriptor_model` makes).
      model_ref: how to rebuild the model: {'kind': 'config', 'config': {...}} (the config's
        `model` block), {'kind': 'keras', 'path': ...}, or {'kind': 'inline'}. Models that a
        reference cannot reproduce (random weights, learned whitening, inline) or that rest on
        a file outside the index (a weights file, a `.keras` model) are saved as `model.keras`
        in the index folder, so that the folder can be moved or copied as one.
      image_size: longest image side fed to the model, pixels.
      scales: multi-scale factors (descriptors are combined as `descriptors.extract` does).
      ms_power: power of the generalised mean combining scales.
      directory: the index folder (opened if it holds an index, else created on first write).
      root: collection root: image ids are paths relative to it.
      rerank: the config's `rerank` block, {'qe': {'n', 'alpha'}, 'dba': {'n', 'alpha'},
        'diffusion': {...}} (missing fields: those of configs/default.py).
      backend: 'auto' (the folder's approximate index when it has one, `cbir_tf.search.ann`; else
        exact), 'exact' (always exact), 'ann' or 'faiss' nearest-neighbour search.
      ann: the config's `search.ann` block (when an approximate index is built; thresholds).
      block_size: database rows per block of exact search.
      flush_every: images per checkpoint of a running extraction.
      descriptor_meta: fields recorded in the store's meta.json (backbone, pooling, ...).
      prefer_saved_model: when `directory` holds an index with its own saved model, use that
        model instead of `model` (for models that cannot be rebuilt identically, e.g. random
        weights: the saved one described the stored images).

    Attributes:
      extract_fn: what describes new images: None = `cbir_tf.describe.extract.extract`, or a
        function with its arguments and result (`cbir_tf.beam.extract.BeamExtractor.extract`).
    """

    extract_fn: Any = None

    def __init__(
        self,
        model: Any,
        *,
        model_ref: Mapping[str, Any] | None = None,
        image_size: int = default("data.image_size"),
        scales: Sequence[float] = default("data.scales"),
        ms_power: float = default("data.ms_power"),
        directory: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        rerank: Mapping[str, Any] | None = None,
        backend: str = default("search.backend"),
        ann: Mapping[str, Any] | None = None,
        block_size: int = default("search.block_size"),
        flush_every: int = default("extract.flush_every"),
        descriptor_meta: Mapping[str, Any] | None = None,
        prefer_saved_model: bool = False,
    ):
        self.model = model
        self.prefer_saved_model = bool(prefer_saved_model)
        self.model_ref = dict(model_ref or {"kind": "inline"})
        self.image_size = int(image_size)
        self.scales = tuple(float(s) for s in scales)
        self.ms_power = float(ms_power)
        self.collection = Collection(root)
        # A plain dict (saved in the manifest; fields may be changed between searches).
        self.rerank_settings = pipeline.RerankSettings.from_config(rerank).to_dict()
        self.backend = backend
        self.ann_settings = AnnSettings.from_config(ann)
        self.block_size = int(block_size)
        self.flush_every = int(flush_every)
        self.descriptor_meta = normalize(dict(descriptor_meta or {}))
        self.directory = os.path.abspath(os.fspath(directory)) if directory else None
        self._descriptors = np.zeros((0, 0), np.float32)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._database: pipeline.Database | None = None  # search structures, built on first use
        self._ann: ann_lib.AnnIndex | None = None
        self._rerank_auto: dict[str, Any] | None = None  # what 'auto' settings resolve to
        if self.directory:
            index_folder.refuse_plain_store(self.directory)
            saved_model = os.path.join(self.directory, index_folder.MODEL_FILE)
            if self.prefer_saved_model and os.path.isfile(saved_model):
                # A model rebuilt with random weights would not match the stored (or pending)
                # descriptors: the model saved in the folder is the one that described them.
                from cbir_tf.describe import models

                log.info("using the model saved with the index %s", self.directory)
                self.model = models.load_descriptor_model(saved_model)
            if index_folder.is_index(self.directory):
                self._open(self.directory)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        model_path: str | os.PathLike | None = None,
        whitening: Any = None,
        directory: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
    ) -> Retriever:
        """Builds the model a config describes (`config.model`, `config.data`, ...).

        Args:
          config: a full config (ml_collections.ConfigDict or nested dict) with `model` and
            `data` blocks, optionally `search`, `rerank`, `extract`.
          model_path: a saved `.keras` descriptor model used instead of `config.model` (see
            `from_model`; described at `data.image_size`).
          whitening: an optional `cbir_tf.describe.whitening.Whitening` built into the model.
          directory: index folder (see the class docstring).
          root: collection root.

        Returns:
          A Retriever with an empty index (or the index already in `directory`).
        """
        from cbir_tf.describe import backbones, models

        cfg = config_lib.as_dict(config)
        data, search_cfg = config_lib.block(cfg, "data"), config_lib.block(cfg, "search")
        settings = {
            "scales": tuple(data["scales"]),
            "ms_power": float(data["ms_power"]),
            "directory": directory,
            "root": root,
            "rerank": cfg.get("rerank"),
            "backend": str(search_cfg["backend"]),
            "ann": search_cfg["ann"],
            "block_size": int(search_cfg["block_size"]),
            "flush_every": int(config_lib.block(cfg, "extract")["flush_every"]),
        }
        if model_path:
            return cls.from_model(model_path, image_size=int(data["image_size"]), **settings)
        model_cfg = config_lib.block(cfg, "model")
        weights, _ = backbones.resolve_weights(
            model_cfg["backbone"], model_cfg["alpha"], model_cfg["weights"],
            model_cfg["weights_fallback"],
        )  # fmt: skip
        weights = str(weights)
        weights_file = weights.lower() not in ("imagenet", "none", "")
        if weights_file and os.path.exists(weights):
            weights = os.path.abspath(weights)
        model_cfg.update(weights=weights, weights_fallback="")
        model = models.build_descriptor_model(**model_cfg, whitening=whitening)
        # Random weights or a learned whitening cannot be rebuilt from the config alone, and a
        # weights file may move or be missing where the index is copied to: all three are saved
        # as the index's model.keras, so that the folder alone describes new queries.
        reproducible = whitening is None and weights.lower() != "none" and not weights_file
        ref = {"kind": "config", "config": model_cfg, "reproducible": reproducible}
        meta = {k: model_cfg[k] for k in ("backbone", "alpha", "weights", "pooling")}
        meta.update(
            gem_p=model_cfg["gem_p"],
            rmac_levels=model_cfg["rmac_levels"],
            whitening=_whitening_meta(whitening),
        )
        return cls(
            model,
            model_ref=ref,
            image_size=int(data["image_size"]),
            descriptor_meta=meta,
            prefer_saved_model=not reproducible,
            **settings,
        )

    @classmethod
    def from_model(
        cls,
        path: str | os.PathLike,
        *,
        image_size: int | None = None,
        scales: Sequence[float] = default("data.scales"),
        ms_power: float = default("data.ms_power"),
        directory: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Retriever:
        """Uses a saved descriptor model (`.keras`, e.g. written by train.py).

        The model is saved into the index folder (its `model.keras`), so that the index keeps
        working when the original file moves.

        Args:
          path: the `.keras` file (loaded with safe_mode=True).
          image_size: longest image side fed to the model; None: the size the model was
            trained and validated at, else the default config's (see
            `cbir_tf.describe.models.image_size_for_model`).
          scales, ms_power, directory, root: see the class docstring.
          **kwargs: other constructor arguments (rerank, backend, block_size, flush_every).
        """
        from cbir_tf.describe import models

        path = os.path.abspath(os.fspath(path))
        model = models.load_descriptor_model(path)
        image_size = models.image_size_for_model(path, image_size)
        ref = {"kind": "keras", "path": path, "reproducible": False}
        meta = {"backbone": None, "weights": path, "pooling": None, "whitening": None}
        return cls(
            model,
            model_ref=ref,
            image_size=image_size,
            scales=scales,
            ms_power=ms_power,
            directory=directory,
            root=root,
            descriptor_meta=meta,
            **kwargs,
        )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        model: Any = None,
        root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Retriever:
        """Opens an index folder written by `save`, by an attached Retriever or by extract.py.

        Later `index` / `remove` calls update the folder in place.

        Args:
          directory: the index folder.
          model: a model to use instead of the one the manifest names (a Keras model or a
            `.keras` path), e.g. when the original file moved.
          root: the collection root, when the images moved since indexing.
          **kwargs: constructor arguments overriding the defaults (backend, ...) or the
            re-ranking settings saved with the index (rerank).

        Raises:
          FileNotFoundError: not an index folder (no manifest.json).
          cbir_tf.store.files.StoreIncompleteError: the store was never finished.
        """
        directory = os.path.abspath(os.fspath(directory))
        index_folder.recover(directory)
        manifest = index_folder.read_manifest(directory)
        ref = dict(manifest["model"])
        if model is None:
            model = index_folder.load_model(directory, ref)
        elif isinstance(model, (str, os.PathLike)):
            from cbir_tf.describe import models

            path = os.path.abspath(os.fspath(model))
            model = models.load_descriptor_model(path)
            ref = {"kind": "keras", "path": path, "reproducible": True}
        meta = store_lib.DescriptorStore(directory).meta()
        # The re-ranking settings the index was built with (indexes before them: the defaults).
        kwargs.setdefault("rerank", manifest.get("rerank"))
        return cls(
            model,
            model_ref=ref,
            image_size=manifest["image_size"],
            scales=manifest["scales"],
            ms_power=manifest["ms_power"],
            directory=directory,
            root=root or manifest.get("root"),
            descriptor_meta=manifest.get("descriptor_meta", _descriptor_fields(meta)),
            **kwargs,
        )

    # -- the index ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Ids of the indexed images, in row order."""
        return list(self._ids)

    @property
    def descriptors(self) -> np.ndarray:
        """float32 [N, D] descriptors (memory-mapped for an index on disk), row i for ids[i]."""
        return self._descriptors

    @property
    def root(self) -> str | None:
        """The collection root: image ids are paths relative to it."""
        return self.collection.root

    @property
    def failed(self) -> dict[str, str]:
        """{id: reason} of images that could not be read (retried only once they change)."""
        return {i: f["reason"] for i, f in self.collection.failed.items()}

    def path_of(self, image_id: str) -> str | None:
        """The file of an indexed image (None when unknown)."""
        return self.collection.path_of(image_id)

    def id_of(self, path: str | os.PathLike) -> str:
        """The id an image file gets (or has) in this index (see `cbir_tf.store.collection`)."""
        return self.collection.id_of(path, self._row)

    def _set_ids(self, ids: list[str]) -> None:
        self._ids = list(ids)
        self._row = {i: r for r, i in enumerate(self._ids)}
        # Rows changed: search structures built on the old matrix are stale.
        self._database = None
        self._ann = None
        self._rerank_auto = None

    def _open(self, directory: str) -> None:
        index_folder.recover(directory)
        manifest = index_folder.read_manifest(directory)
        desc, ids, meta = store_lib.load_store(directory, mmap=True)
        # An index made with other settings must not be extended with these descriptors.
        check_compatible(
            meta, {**self._store_meta(), "dim": meta.get("dim")}, directory, "this retriever"
        )
        self._descriptors = desc
        self._set_ids(ids)
        self.collection = Collection(self.root or manifest.get("root"), manifest)
        if auto.entry_matches(manifest.get("rerank_auto"), self._ids):
            self._rerank_auto = manifest["rerank_auto"]

    # -- search ------------------------------------------------------------------------------

    def describe(
        self, queries: Sequence[Any], bboxes: Sequence[Sequence[float] | None] | None = None
    ) -> np.ndarray:
        """float32 [Q, D] descriptors of query images, computed as the indexed images' were.

        Queries are paths, PIL images or arrays, optionally cropped to `bboxes` (see
        `cbir_tf.describe.queries.describe_queries`).
        """
        from cbir_tf.describe.queries import describe_queries

        return describe_queries(
            self.model,
            queries,
            bboxes,
            image_size=self.image_size,
            scales=self.scales,
            ms_power=self.ms_power,
        )

    def search(
        self,
        query: Any,
        k: int = 10,
        rerank: str = "none",
        *,
        bbox: Sequence[float] | None = None,
    ) -> list[SearchResult]:
        """The `k` indexed images most similar to one query.

        Args:
          query: a path, a PIL image, or a uint8 array [H, W, 3].
          k: results wanted, >= 1 (the whole index when it holds fewer images).
          rerank: a method of `pipeline.METHODS`: 'none', 'aqe' (α-query expansion),
            'diffusion', 'aqe+diffusion', 'dba' (database-side augmentation) or 'aqe+dba'.
          bbox: optional crop box (x1, y1, x2, y2) of the query, pixels.

        Returns:
          Results best first.
        """
        return self.search_batch([query], k, rerank, bboxes=[bbox])[0]

    def search_batch(
        self,
        queries: Sequence[Any],
        k: int = 10,
        rerank: str = "none",
        *,
        bboxes: Sequence[Sequence[float] | None] | None = None,
    ) -> list[list[SearchResult]]:
        """`search` for several queries at once (one batched extraction and search).

        Returns:
          One ranked list per query.
        """
        check_k(k)  # before the costly description of the queries
        if not len(queries):
            return []
        self._require_nonempty()
        q = self.describe(queries, bboxes)
        scores, rows = self.search_descriptors(q, k, rerank)
        return [self._results(scores[i], rows[i]) for i in range(len(queries))]

    def search_descriptors(
        self, queries: np.ndarray, k: int = 10, rerank: str = "none"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest indexed rows of query descriptors.

        Args:
          queries: float32 [Q, D] L2-normalised.
          k: results per query (clamped to the index size).
          rerank: see `search`.

        Returns:
          (scores float32 [Q, k'], rows int64 [Q, k']) best first, k' = min(k, N); rows index
          `ids` / `descriptors`.
        """
        method = pipeline.check_method(rerank, "rerank")
        self._require_nonempty()
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        database = self._descriptors
        if queries.shape[1] != database.shape[1]:
            raise ValueError(
                f"queries have {queries.shape[1]} dimensions, the index {database.shape[1]}"
            )
        k = min(check_k(k), database.shape[0])
        ranking = pipeline.rerank(
            method, queries, self._search_database(), self.resolved_rerank(), k=k
        )
        return np.asarray(ranking.scores, np.float32), np.asarray(ranking.ids, np.int64)

    def _search_database(self) -> pipeline.Database:
        if self._database is None:
            # Validated (and, for faiss, built) once per state of the index, not per query;
            # it also keeps the DBA vectors and diffusion graphs for later queries.
            self._database = pipeline.Database(
                self._descriptors, backend=self.backend, block_size=self.block_size,
                ann=self.approximate_index(), ann_settings=self.ann_settings,
            )  # fmt: skip
        return self._database

    def resolved_rerank(self) -> pipeline.RerankSettings:
        """The re-ranking settings searches use: `rerank_settings`, its 'auto' fields resolved
        for this collection (`rerank_auto`)."""
        settings = pipeline.RerankSettings.from_config(self.rerank_settings)
        if not settings.auto_fields():
            return settings
        return settings.resolved(self.rerank_auto()["values"])

    def rerank_auto(self) -> dict[str, Any]:
        """What 'auto' re-ranking settings resolve to for the indexed collection
        (`cbir_tf.rerank.auto.collection_entry`): the one the index folder saved for these
        rows, else counted once (and saved with the folder's next write)."""
        self._require_nonempty()
        if self._rerank_auto is None:
            self._rerank_auto = auto.collection_entry(
                self._descriptors, self._ids, index=self._search_database().index,
                graph_min_rows=self.ann_settings.graph_min_rows,
            )  # fmt: skip
        return self._rerank_auto

    def _save_rerank_auto(self, directory: str) -> None:
        """Keeps the folder's `rerank_auto` in step with its rows (the caller holds the lock):
        counted now, once per change of the collection, so that searches need not count."""
        needed = bool(pipeline.RerankSettings.from_config(self.rerank_settings).auto_fields())
        entry = self.rerank_auto() if needed and len(self._ids) else None
        index_folder.update_manifest(directory, {"rerank_auto": entry})

    def approximate_index(self) -> ann_lib.AnnIndex | None:
        """The folder's saved approximate index (memory-mapped), when searches use it.

        None with backend 'exact', without a folder, or when the folder holds none; an index
        that fails its checks (checksum, model, rows) is refused with a warning (exact search
        is used) until `rebuild_ann` or the next `index` call rebuilds it.
        """
        if self.backend not in ("auto", "ann"):
            return None
        if self._ann is not None or not self.directory:
            return self._ann
        if not ann_lib.exists(self.directory) or not len(self._ids):
            return None
        if self._ann is None:
            try:
                meta = store_lib.DescriptorStore(self.directory).meta()
                self._ann = ann_lib.load(self.directory, self._descriptors, meta)
            except ann_lib.AnnIndexError as err:
                log.warning("not using the approximate index: %s", err)
                return None
            log.info("%s", self._ann.describe())
        return self._ann

    def _results(self, scores: np.ndarray, rows: np.ndarray) -> list[SearchResult]:
        out = []
        for rank, (s, r) in enumerate(zip(scores, rows, strict=True), start=1):
            if r < 0:  # an approximate faiss index found fewer than k neighbours
                break
            image_id = self._ids[int(r)]
            out.append(SearchResult(rank, image_id, self.path_of(image_id), float(s)))
        return out

    def _require_nonempty(self) -> None:
        if not self._ids:
            raise ValueError("the index is empty: index some images first")

    # -- updates ---------------------------------------------------------------------------

    def index(
        self,
        paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        ids: Sequence[str] | None = None,
        recursive: bool = True,
        prune: bool = False,
        progress: bool = True,
    ) -> dict[str, int]:
        """Adds images to the index; files already indexed and unchanged are skipped.

        A changed file (other size or modification time) is described again and its row
        replaced. Unreadable images are recorded in `failed` and retried once they change.

        Args:
          paths_or_folder: a folder (scanned with `cbir_tf.data.folder.list_images`; the first
            folder indexed becomes the collection root when none is set) or image paths.
          ids: explicit ids for a list of paths (default: derived from the paths).
          recursive: scan sub-folders of a folder.
          prune: for a folder, also drop indexed images under it whose file no longer exists.
          progress: show a progress bar while extracting.

        Returns:
          Counts {'added', 'updated', 'unchanged', 'failed', 'removed', 'total'}.

        Raises:
          FileNotFoundError: a single path that does not exist.
          ValueError: a folder holding no image file (unless `prune`).
        """
        if self.directory:
            with folder_lock(self.directory, what="this index"):
                self._refresh()
                self._resume_pending(progress)
                return self._index(paths_or_folder, ids, recursive, prune, progress)
        return self._index(paths_or_folder, ids, recursive, prune, progress)

    def remove(self, ids_or_paths: Iterable[str | os.PathLike]) -> list[str]:
        """Drops images from the index (by id, or by file path).

        Args:
          ids_or_paths: ids or paths of indexed images.

        Returns:
          The ids removed.

        Raises:
          KeyError: naming the entries that are not in the index (nothing is removed then).
        """
        wanted, unknown = [], []
        for x in ids_or_paths:
            x = os.fspath(x)
            if x in self._row or x in self.collection.failed:
                wanted.append(x)
            elif self.id_of(x) in self._row or self.id_of(x) in self.collection.failed:
                wanted.append(self.id_of(x))
            else:
                unknown.append(x)
        if unknown:
            raise KeyError(f"not in the index: {', '.join(map(repr, unknown[:5]))}")
        if not wanted:
            return []
        if self.directory:
            with folder_lock(self.directory, what="this index"):
                self._refresh()
                self._extract_and_commit([], {}, {}, set(wanted), progress=False)
        else:
            self._extract_and_commit([], {}, {}, set(wanted), progress=False)
        return sorted(set(wanted))

    def rebuild_ann(self, kind: str | None = None):
        """Builds (or rebuilds) the approximate index of the images indexed, saved in the folder.

        Args:
          kind: 'flat' or 'ivfpq' (None: `search.ann.kind`, by default chosen by size).

        Returns:
          The `cbir_tf.search.ann.AnnIndex` (searches use it with backend 'auto' or 'ann').
        """
        if not len(self._ids):
            raise ValueError("the index is empty: index some images first")
        if not self.directory:
            return self._build_ann(kind)
        with folder_lock(self.directory, what="this index"):
            self._refresh()
            return self._build_ann(kind)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes the index to a folder (a descriptor store plus manifest.json).

        The retriever stays where it was (in memory, or attached to its own folder).

        Args:
          directory: the folder; an index already there is replaced.

        Returns:
          The folder's absolute path.
        """
        directory = os.path.abspath(os.fspath(directory))
        if self.directory == directory:
            return directory
        index_folder.refuse_plain_store(directory)
        dim = int(self._descriptors.shape[1]) if self._descriptors.ndim == 2 else 0
        os.makedirs(directory, exist_ok=True)
        with folder_lock(directory, what="this index"):
            index_folder.recover(directory)
            index_folder.clear_pending(directory)
            rows = np.arange(len(self._ids), dtype=np.int64)
            self._write_index(directory, self._descriptors, rows, None, self._ids, dim)
            # The approximate index describes the same rows: its files are copied (one opened
            # memory-mapped cannot be serialised again), or an in-memory one is saved.
            if self.directory and ann_lib.exists(self.directory):
                ann_lib.copy_files(self.directory, directory)
            elif self._ann is not None:
                ann_lib.save(self._ann, directory, store_lib.DescriptorStore(directory).meta())
            self._save_rerank_auto(directory)
        return directory

    # -- updating the folder -----------------------------------------------------------------

    def _store_meta(self) -> dict[str, Any]:
        meta = dict(self.descriptor_meta)
        meta.update(
            {"image_size": self.image_size, "scales": list(self.scales), "ms_power": self.ms_power}
        )
        return meta

    def _refresh(self) -> None:
        """Re-reads the folder (under its lock): another process may have updated it."""
        index_folder.recover(self.directory)
        if index_folder.is_index(self.directory):
            self._open(self.directory)

    def _index(self, paths_or_folder, ids, recursive, prune, progress) -> dict[str, int]:
        files, file_ids, folder = self.collection.resolve(
            paths_or_folder, ids, recursive, prune, self._row
        )
        todo_ids, new_paths, stats, seen = self.collection.changes(files, file_ids, self._row)
        remove = set()
        if prune and folder is not None:
            remove = self.collection.vanished(folder, file_ids, self._ids)
        before = set(self._row)
        if todo_ids or remove:
            self._extract_and_commit(todo_ids, new_paths, stats, remove, progress)
        counts = {"added": 0, "updated": 0, **seen, "removed": len(remove)}
        for i in todo_ids:
            if i in self._row:
                counts["updated" if i in before else "added"] += 1
            else:
                counts["failed"] += 1
        counts["total"] = len(self._ids)
        log.info(
            "index%s: %d added, %d updated, %d unchanged, %d unreadable, %d removed; %d images",
            f" {self.directory}" if self.directory else "", counts["added"], counts["updated"],
            counts["unchanged"], counts["failed"], counts["removed"], counts["total"],
        )  # fmt: skip
        return counts

    # -- extraction and commit ---------------------------------------------------------------

    def _extract_and_commit(self, new_ids, new_paths, stats, remove, progress) -> int:
        """Describes `new_ids`, drops `remove`, and commits (to disk when attached).

        Returns:
          The number of new images that could not be read.
        """
        if not self.directory:
            result = self._extract(new_ids, [new_paths[i] for i in new_ids], None, progress)
            return self._apply(result, new_paths, stats, remove)
        # A model no reference can rebuild is saved before any descriptor it makes, so that a
        # resumed run continues with the same model.
        self._model_ref_for(self.directory)
        pending = {
            "ids": list(new_ids),
            "paths": [new_paths[i] for i in new_ids],
            "stats": [stats[i] for i in new_ids],
            "remove": sorted(remove),
        }
        index_folder.save_pending(self.directory, pending)
        return self._run_pending(pending, progress)

    def _resume_pending(self, progress: bool) -> None:
        pending = index_folder.read_pending(self.directory)
        if pending is None:
            return
        log.info("resuming the interrupted indexing of %d images", len(pending["ids"]))
        self._run_pending(pending, progress)

    def _run_pending(self, pending: Mapping[str, Any], progress: bool) -> int:
        new_ids = list(pending["ids"])
        new_paths = dict(zip(new_ids, pending["paths"], strict=True))
        stats = dict(zip(new_ids, pending["stats"], strict=True))
        staging = os.path.join(self.directory, index_folder.PENDING_DIR)
        result = None
        if new_ids:
            result = self._extract(new_ids, pending["paths"], staging, progress)
        failed = self._apply(result, new_paths, stats, set(pending["remove"]))
        index_folder.clear_pending(self.directory)
        return failed

    def _extract(self, ids, paths, store_dir, progress):
        """(descriptors float32 [n, D], ids, skipped [(id, reason)]) of new images."""
        from cbir_tf.describe.extract import extract

        if not ids:
            return None
        res = (self.extract_fn or extract)(
            self.model,
            list(paths),
            ids=list(ids),
            image_size=self.image_size,
            scales=self.scales,
            ms_power=self.ms_power,
            sink=None if store_dir is None else StoreSink(store_dir, self.flush_every),
            meta=self._store_meta(),
            progress=progress,
        )
        return res.descriptors, list(res.ids), list(res.skipped)

    def _apply(self, result, new_paths, stats, remove) -> int:
        """Merges extracted rows into the index: in memory, or on disk when attached.

        Returns:
          The number of new images that could not be read.
        """
        new_desc, got_ids, skipped = result if result is not None else (None, [], [])
        # Rows of re-described files (changed, or now unreadable) and removed ones are dropped.
        drop = set(remove) | (set(new_paths) & set(self._row))
        keep_rows = np.asarray(
            [r for r, i in enumerate(self._ids) if i not in drop], dtype=np.int64
        )
        ids = [self._ids[r] for r in keep_rows] + list(got_ids)
        self.collection.record(got_ids, skipped, new_paths, stats, drop, remove)
        dim = self._dim(new_desc)
        if self.directory:
            old_rows = len(self._ids)
            appended = np.array_equal(keep_rows, np.arange(old_rows))
            self._write_index(self.directory, self._descriptors, keep_rows, new_desc, ids, dim)
            self._descriptors, stored_ids, _ = store_lib.load_store(self.directory, mmap=True)
            self._set_ids(stored_ids)
            self._follow_ann(old_rows if appended else None)
            self._save_rerank_auto(self.directory)
        else:
            parts = []
            if len(keep_rows):
                parts.append(np.asarray(self._descriptors[keep_rows], dtype=np.float32))
            if new_desc is not None and len(got_ids):
                parts.append(np.asarray(new_desc, dtype=np.float32))
            self._descriptors = (
                np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)
            )
            self._set_ids(ids)
        return len(skipped)

    def _dim(self, new_desc) -> int:
        if new_desc is not None and np.ndim(new_desc) == 2 and np.shape(new_desc)[0]:
            d = int(np.shape(new_desc)[1])
            if self._descriptors.shape[0] and self._descriptors.shape[1] != d:
                raise ValueError(
                    f"new descriptors have {d} dimensions, the index {self._descriptors.shape[1]}"
                )
            return d
        return int(self._descriptors.shape[1]) if self._descriptors.ndim == 2 else 0

    def _manifest(self, ids: Sequence[str], model_ref: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": index_folder.FORMAT,
            "version": index_folder.FORMAT_VERSION,
            "root": self.root,
            "model": dict(model_ref),
            "image_size": self.image_size,
            "scales": list(self.scales),
            "ms_power": self.ms_power,
            "descriptor_meta": self.descriptor_meta,
            "rerank": self.rerank_settings,
            **self.collection.manifest_entries(ids),
        }

    def _write_index(self, directory, old, keep_rows, new_desc, ids, dim) -> None:
        """Writes rows `old[keep_rows]` then `new_desc` as the index in `directory` (journalled)."""
        index_folder.write_index(
            directory,
            ids,
            [(old, keep_rows)] + ([new_desc] if new_desc is not None else []),
            dim=dim,
            skipped=list(self.failed.items()),
            meta=self._store_meta(),
            manifest=self._manifest(ids, self._model_ref_for(directory)),
            block_rows=self.block_size,
        )

    def _model_ref_for(self, directory: str) -> dict[str, Any]:
        """The manifest's model entry; saves model.keras when no reference can rebuild it."""
        ref = dict(self.model_ref)
        ref.pop("file", None)
        if ref.get("reproducible") and ref.get("kind") != "inline":
            return ref
        path = os.path.join(directory, index_folder.MODEL_FILE)
        if not (self.directory == directory and os.path.isfile(path)):
            from cbir_tf.describe import models

            models.save_descriptor_model(self.model, path, {"image_size": self.image_size})
        ref["file"] = index_folder.MODEL_FILE
        return ref

    def _follow_ann(self, previous_rows: int | None) -> None:
        """Keeps the folder's approximate index in step with the rows just written."""
        meta = store_lib.DescriptorStore(self.directory).meta()
        self._ann = ann_lib.follow_rows(
            self.directory, self._descriptors, meta, self.ann_settings,
            previous_rows=previous_rows, backend=self.backend, block_size=self.block_size,
        )  # fmt: skip

    def _build_ann(self, kind: str | None) -> ann_lib.AnnIndex:
        meta = store_lib.DescriptorStore(self.directory).meta() if self.directory else None
        self._ann = ann_lib.build_and_save(
            self.directory, self._descriptors, meta, self.ann_settings,
            kind=kind, block_size=self.block_size,
        )  # fmt: skip
        self._database = None
        return self._ann


# -- helpers ---------------------------------------------------------------------------------


def check_k(k: Any) -> int:
    """`k` as an int; a ValueError unless it is a whole number >= 1.

    A k larger than the index is fine (the whole index is returned); zero or negative k has no
    meaning and would otherwise be clamped silently to one result.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise ValueError(f"k (results per query) must be a whole number >= 1, got {k!r}")
    return int(k)


def _whitening_meta(whitening: Any) -> Any:
    if whitening is None:
        return None
    info = getattr(whitening, "info", None)
    proj = getattr(whitening, "projection", None)
    desc = {"kind": "pca", "shape": list(np.shape(proj)) if proj is not None else None}
    if isinstance(info, Mapping):
        desc.update({k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))})
    return desc


def _descriptor_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    skip = {"num_images", "num_skipped", "dim", "versions", "created", "index"}
    skip |= set(SHARD_FIELDS) | {"merged_from", "image_size", "scales", "ms_power"}
    return {k: v for k, v in meta.items() if k not in skip}
