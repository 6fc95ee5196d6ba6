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
import errno
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import config as config_lib
from cbir_tf.config import default
from cbir_tf.data.image_list import SHARD_FIELDS
from cbir_tf.fileio import folder_lock, require_space
from cbir_tf.rerank import auto, pipeline
from cbir_tf.search import ann as ann_lib
from cbir_tf.search.ann import AnnSettings
from cbir_tf.search.index import SearchIndex
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
      scales: multi-scale factors (descriptors combined as `cbir_tf.describe.extract` does).
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
        self._state: index_folder.IndexState | None = None  # the committed state read
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

        Raises:
          cbir_tf.config.ConfigError: a field configs/default.py lacks, or of another type.
        """
        from cbir_tf.describe import catalog, models

        config_lib.check_config(config)
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
        model_cfg = catalog.with_pooling(config_lib.block(cfg, "model"))
        weights, _ = catalog.resolve_weights(
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
        full_check: bool = False,
        **kwargs: Any,
    ) -> Retriever:
        """Opens an index folder written by `save`, by an attached Retriever or by extract.py.

        It reads one committed state, whole: during a commit by another process it waits for
        the commit (at most `search.commit_wait` seconds) and never writes to the folder.
        Sizes and headers are checked; `full_check` compares every file with its SHA-256.
        Later `index` / `remove` calls update the folder in place.

        Args:
          directory: the index folder.
          model: a model to use instead of the one the manifest names (a Keras model or a
            `.keras` path), e.g. when the original file moved.
          root: the collection root, when the images moved since indexing.
          full_check: verify every file's checksum (reads every byte).
          **kwargs: constructor arguments overriding the defaults (backend, ...) or the
            re-ranking settings saved with the index (rerank).

        Raises:
          FileNotFoundError: not an index folder (no manifest.json).
          cbir_tf.store.files.StoreIncompleteError: the store was never finished.
          cbir_tf.store.files.StoreCorruptError, cbir_tf.fileio.FileDamagedError: a damaged
            file (named).
        """
        directory = os.path.abspath(os.fspath(directory))
        backend = kwargs.get("backend", default("search.backend"))
        state = index_folder.open_index(
            directory, extra=_ann_opener(directory, backend), full_check=full_check
        )
        manifest = state.manifest
        ref = dict(manifest["model"])
        if model is None:
            model = index_folder.load_model(directory, ref)
        elif isinstance(model, (str, os.PathLike)):
            from cbir_tf.describe import models

            path = os.path.abspath(os.fspath(model))
            model = models.load_descriptor_model(path)
            ref = {"kind": "keras", "path": path, "reproducible": True}
        # The re-ranking settings the index was built with (indexes before them: the defaults).
        kwargs.setdefault("rerank", manifest.get("rerank"))
        retriever = cls(
            model,
            model_ref=ref,
            image_size=manifest["image_size"],
            scales=manifest["scales"],
            ms_power=manifest["ms_power"],
            root=root or manifest.get("root"),
            descriptor_meta=manifest.get("descriptor_meta", _descriptor_fields(state.meta)),
            **kwargs,
        )
        retriever.directory = directory
        retriever._attach(state)
        return retriever

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
    def commit(self) -> int | None:
        """The commit number of the index folder's state this retriever reads (None in memory;
        0 for an index written before commits were numbered)."""
        return self._state.commit if self._state is not None else None

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

    def row_of(self, image_id: str) -> int | None:
        """The row of an indexed image (None when it is not indexed)."""
        return self._row.get(image_id)

    def _open(self, directory: str) -> None:
        """Reads the folder's committed state (waiting for a commit in progress)."""
        self._attach(index_folder.open_index(directory, extra=_ann_opener(directory, self.backend)))

    def _attach(self, state: index_folder.IndexState) -> None:
        """Takes an opened state of the folder as the retriever's index."""
        # An index made with other settings must not be extended with these descriptors.
        check_compatible(
            state.meta,
            {**self._store_meta(), "dim": state.meta.get("dim")},
            state.directory,
            "this retriever",
        )
        self._descriptors = state.descriptors
        self._set_ids(state.ids)
        self.collection = Collection(self.root or state.manifest.get("root"), state.manifest)
        self._state = state
        ann, error = state.extra or (None, None)
        if error:
            log.warning("not using the approximate index, searching exactly: %s", error)
        elif ann is not None:
            log.info("%s", ann.describe())
        self._ann = ann
        if auto.entry_matches(state.manifest.get("rerank_auto"), self._ids):
            self._rerank_auto = state.manifest["rerank_auto"]

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

    def search_index(self, rerank: str = "none") -> SearchIndex:
        """The index that finds the candidates of `rerank`'s searches, as searches use it.

        Exact search, the folder's approximate index, or one built in memory (the DBA-augmented
        database's, for 'dba' methods); built now if no search has built it yet. Its
        `summary()` says which, with nprobe and measured recall (what the service reports).
        """
        method = pipeline.check_method(rerank, "rerank")
        self._require_nonempty()
        return self._search_database().index_for(method, self.resolved_rerank())

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

    def _stage_rerank_auto(self, staged: str, descriptors, ids, ann) -> None:
        """Counts what 'auto' re-ranking settings mean for the rows of a staged state, into its
        manifest (`rerank_auto`): once per change of the collection, so that searches need not
        count, and sealed with the rest of the state."""
        entry = None
        if pipeline.RerankSettings.from_config(self.rerank_settings).auto_fields() and len(ids):
            index = SearchIndex(
                descriptors, backend="auto", ann=ann, block_size=self.block_size, validate=False
            )
            entry = auto.collection_entry(
                descriptors, ids, index=index, graph_min_rows=self.ann_settings.graph_min_rows
            )
        index_folder.update_manifest(staged, {"rerank_auto": entry})

    def approximate_index(self) -> ann_lib.AnnIndex | None:
        """The folder's saved approximate index (memory-mapped), when searches use it.

        None with backend 'exact', without a folder, or when the folder holds none; an index
        that fails its checks (checksum, model, rows) is refused with a warning (exact search
        is used) until `rebuild_ann` or the next `index` call rebuilds it. It is opened with
        the folder's state (`load`), so it always describes the rows searched.
        """
        if self.backend not in ("auto", "ann"):
            return None
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
          Counts {'added', 'updated', 'unchanged', 'failed', 'removed', 'resumed', 'total'}.
          An interrupted run's images, finished first, count as what they were to it (added,
          updated, failed); 'resumed' counts those it had described before it stopped.

        Raises:
          FileNotFoundError: a single path that does not exist.
          ValueError: a folder holding no image file (unless `prune`).
        """
        if self.directory:
            with folder_lock(self.directory, what="this index"):
                try:
                    self._refresh()
                    resumed = self._resume_pending(progress)
                    return self._index(paths_or_folder, ids, recursive, prune, progress, resumed)
                except OSError as e:
                    _raise_if_disk_full(e, self.directory, None, "the index's files")
                    raise
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
                try:
                    self._refresh()
                    self._extract_and_commit([], {}, {}, set(wanted), progress=False)
                except OSError as e:
                    _raise_if_disk_full(e, self.directory, None, "the index's files")
                    raise
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
            commit_id = store_lib.next_commit(self.directory)
            staged = index_folder.begin_commit(self.directory)
            try:
                index_folder.restage(self.directory, staged, commit_id)
                meta = store_lib.DescriptorStore(staged).meta()
                ann_lib.build_and_save(
                    staged, self._descriptors, meta, self.ann_settings,
                    kind=kind, block_size=self.block_size,
                )  # fmt: skip
                index_folder.commit_state(self.directory, commit_id, ANN_FILES, ANN_FILES)
            except OSError as e:
                index_folder.abandon_commit(self.directory)
                needed = _ann_bytes(len(self), self.ann_settings)
                _raise_if_disk_full(e, staged, needed, "the index's next state")
                raise
            self._open(self.directory)
            return self._ann

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

        def copy_ann(staged: str, descriptors: np.ndarray, meta: dict[str, Any]):
            # The approximate index describes the same rows: the files of the state this
            # retriever read are linked (one opened memory-mapped cannot be serialised again),
            # or an in-memory one is saved.
            if self.directory and self._ann is not None:
                if store_lib.committed_id(self.directory) == self.commit:
                    store_lib.link_into(self.directory, staged, ANN_FILES)
                    return self._ann
                else:
                    log.warning(
                        "%s changed since it was opened: its approximate index is not saved "
                        "with the copy (Retriever.rebuild_ann() builds one)", self.directory,
                    )  # fmt: skip
            elif self._ann is not None:
                ann_lib.save(self._ann, staged, meta)
                return self._ann
            return None

        with folder_lock(directory, what="this index"):
            index_folder.recover(directory)
            index_folder.clear_pending(directory)
            rows = np.arange(len(self._ids), dtype=np.int64)
            self._commit_to(directory, rows, None, self._ids, dim, copy_ann)
        return directory

    # -- updating the folder -----------------------------------------------------------------

    def _store_meta(self) -> dict[str, Any]:
        meta = dict(self.descriptor_meta)
        meta.update(
            {"image_size": self.image_size, "scales": list(self.scales), "ms_power": self.ms_power}
        )
        return meta

    def _refresh(self) -> None:
        """Re-reads the folder (under its lock, after completing or dropping an unfinished
        commit): another process may have updated it."""
        index_folder.recover(self.directory)
        if index_folder.is_index(self.directory):
            self._open(self.directory)

    def _index(self, paths_or_folder, ids, recursive, prune, progress, resumed=None):
        files, file_ids, folder, unusable = self.collection.resolve(
            paths_or_folder, ids, recursive, prune, self._row
        )
        todo_ids, new_paths, stats, seen = self.collection.changes(files, file_ids, self._row)
        new_unusable = self.collection.record_unusable(unusable)
        if new_unusable:
            log.warning(
                "skipping %d files whose names cannot be image ids (listed in skipped.json): %s",
                new_unusable, "; ".join(f"{i}: {r}" for i, r in list(unusable.items())[:3]),
            )  # fmt: skip
        seen["failed"] += new_unusable
        seen["unchanged"] += len(unusable) - new_unusable
        remove = set()
        if prune and folder is not None:
            remove = self.collection.vanished(folder, [*file_ids, *unusable], self._ids)
        before = set(self._row)
        if todo_ids or remove or new_unusable:
            self._extract_and_commit(todo_ids, new_paths, stats, remove, progress)
        counts = {"added": 0, "updated": 0, **seen, "removed": len(remove), "resumed": 0}
        for i in todo_ids:
            if i in self._row:
                counts["updated" if i in before else "added"] += 1
            else:
                counts["failed"] += 1
        if resumed:
            # The interrupted run's batch, finished before this call looked at the files: its
            # images are new to the user, not 'unchanged' (they were unchanged only since).
            for key in ("added", "updated", "failed"):
                counts[key] += len(resumed[key])
                counts["unchanged"] -= len(resumed[key] & set(file_ids))
            counts["removed"] += resumed["removed"]
            counts["resumed"] = resumed["resumed"]
        counts["total"] = len(self._ids)
        log.info("index%s: %s", f" {self.directory}" if self.directory else "", summary(counts))
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
        self._check_ann_plan(len(set(self._ids) - set(remove) - set(new_ids)) + len(new_ids))
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
        return self._run_pending(pending, progress)[0]

    def _resume_pending(self, progress: bool) -> dict[str, Any] | None:
        """Finishes the batch an interrupted run left, keeping what it had described.

        Returns:
          None without one; else {'added', 'updated', 'failed': sets of ids, 'removed': how
          many ids it dropped, 'resumed': how many images it had described before it stopped}.
        """
        pending = index_folder.read_pending(self.directory)
        if pending is None:
            return None
        changed = self.collection.pending_changes(pending)
        if changed:
            # Its files were renamed, changed or removed since: resuming would describe what
            # is no longer there (or fail for ever); the scan that follows finds them anew.
            log.warning(
                "the interrupted indexing of %d images no longer matches the folder (%d "
                "files changed or gone, e.g. %s): starting it afresh",
                len(pending["ids"]), len(changed), changed[0],
            )  # fmt: skip
            index_folder.clear_pending(self.directory)
            return None
        log.info("resuming the interrupted indexing of %d images", len(pending["ids"]))
        before = set(self._row)
        # A batch whose commit completed when the folder was opened (only its journal was left)
        # changes nothing now: its images are indexed with these very files' stats already.
        done = {
            i for i, stat in zip(pending["ids"], pending["stats"], strict=True)
            if self.collection.stats.get(i) == list(stat)
            or (self.collection.failed.get(i) or {}).get("stat") == list(stat)
        }  # fmt: skip
        _, resumed = self._run_pending(pending, progress)
        ids = set(pending["ids"]) - done
        if not ids and not pending["remove"]:
            return None
        return {
            "added": {i for i in ids if i in self._row and i not in before},
            "updated": {i for i in ids if i in self._row and i in before},
            "failed": {i for i in ids if i not in self._row},
            "removed": len(set(pending["remove"]) & before),
            "resumed": resumed,
        }

    def _run_pending(self, pending: Mapping[str, Any], progress: bool) -> tuple[int, int]:
        """Describes and commits a saved batch; (images unreadable, images found done)."""
        new_ids = list(pending["ids"])
        new_paths = dict(zip(new_ids, pending["paths"], strict=True))
        stats = dict(zip(new_ids, pending["stats"], strict=True))
        staging = os.path.join(self.directory, index_folder.PENDING_DIR)
        result = None
        if new_ids:
            result = self._extract(new_ids, pending["paths"], staging, progress)
        failed = self._apply(result, new_paths, stats, set(pending["remove"]))
        index_folder.clear_pending(self.directory)
        return failed, result[3] if result is not None else 0

    def _extract(self, ids, paths, store_dir, progress):
        """(descriptors float32 [n, D], ids, skipped [(id, reason)], images found done in
        `store_dir`) of new images."""
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
        return res.descriptors, list(res.ids), list(res.skipped), res.num_resumed

    def _apply(self, result, new_paths, stats, remove) -> int:
        """Merges extracted rows into the index: in memory, or on disk when attached.

        Returns:
          The number of new images that could not be read.
        """
        new_desc, got_ids, skipped = result[:3] if result is not None else (None, [], [])
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
            previous = old_rows if appended else None

            def follow_ann(staged: str, descriptors: np.ndarray, meta: dict[str, Any]):
                # The approximate index of the staged rows: the current one's files are staged,
                # then followed (rows appended: added, else rebuilt) or built once due.
                store_lib.link_into(self.directory, staged, ANN_FILES)
                return ann_lib.follow_rows(
                    staged, descriptors, meta, self.ann_settings, previous_rows=previous,
                    backend=self.backend, block_size=self.block_size,
                )  # fmt: skip

            self._commit_to(self.directory, keep_rows, new_desc, ids, dim, follow_ann)
            self._open(self.directory)
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

    def _commit_to(self, directory, keep_rows, new_desc, ids, dim, stage_ann) -> None:
        """Commits rows `self._descriptors[keep_rows]` then `new_desc` as the next state of the
        index in `directory` (the caller holds its lock).

        The whole state (store, manifest, model, approximate index: `stage_ann(staged,
        descriptors, meta)` writes it and returns it, or None; what 'auto' re-ranking settings
        mean for the rows) is written into the folder's staged/ first: a failure there (a full
        disk) leaves the committed state untouched, serving and loadable.
        """
        commit_id = store_lib.next_commit(directory)
        needed = store_lib.store_bytes(len(ids), dim, ids) + 512 * (len(ids) + 1)
        if self._ann is not None or len(ids) >= self.ann_settings.min_rows:
            needed += _ann_bytes(len(ids), self.ann_settings)
        staged = os.path.join(directory, store_lib.STAGED_DIR)
        try:
            require_space(directory, needed, f"the next state of the index {directory}")
            staged = index_folder.begin_commit(directory)
            index_folder.write_index(
                staged,
                ids,
                [(self._descriptors, keep_rows)] + ([new_desc] if new_desc is not None else []),
                dim=dim,
                skipped=list(self.failed.items()),
                meta=self._store_meta(),
                manifest=self._manifest(ids, self._model_ref_for(directory, staged)),
                block_rows=self.block_size,
                commit_id=commit_id,
            )
            descriptors, _, meta = store_lib.load_store(staged, mmap=True)
            ann = stage_ann(staged, descriptors, meta)
            self._stage_rerank_auto(staged, descriptors, ids, ann)
            del descriptors, ann
            index_folder.commit_state(directory, commit_id, ANN_FILES, ANN_FILES)
        except OSError as e:
            index_folder.abandon_commit(directory)
            _raise_if_disk_full(e, staged, needed, "the index's next state")
            raise

    def _model_ref_for(self, directory: str, staged: str | None = None) -> dict[str, Any]:
        """The manifest's model entry; saves model.keras when no reference can rebuild it.

        Args:
          directory: the index folder.
          staged: its staged state, which gets the model file too (when one is needed).
        """
        ref = dict(self.model_ref)
        ref.pop("file", None)
        if ref.get("reproducible") and ref.get("kind") != "inline":
            return ref
        path = os.path.join(directory, index_folder.MODEL_FILE)
        if self.directory == directory and os.path.isfile(path):
            if staged:
                store_lib.link_into(directory, staged, [index_folder.MODEL_FILE])
        else:
            from cbir_tf.describe import models

            target = os.path.join(staged, index_folder.MODEL_FILE) if staged else path
            models.save_descriptor_model(self.model, target, {"image_size": self.image_size})
        ref["file"] = index_folder.MODEL_FILE
        return ref

    def _check_ann_plan(self, rows: int) -> None:
        """Refuses, before anything is written, an approximate index the update could not build
        (`search.ann.kind='ivfpq'` beyond its budget): one line saying what would fit."""
        dim = int(self._descriptors.shape[1]) if self._descriptors.ndim == 2 else 0
        if not dim:  # the first images: the model's output says
            dim = int((getattr(self.model, "output_shape", None) or (0,))[-1] or 0)
        have = ann_lib.exists(self.directory)
        ann_lib.check_plan(rows, dim, self.ann_settings, backend=self.backend, have=have)

    def _build_ann(self, kind: str | None) -> ann_lib.AnnIndex:
        """The approximate index of an index in memory (a folder's is committed with it)."""
        self._ann = ann_lib.build_and_save(
            None, self._descriptors, None, self.ann_settings, kind=kind, block_size=self.block_size
        )
        self._database = None
        return self._ann


# -- helpers ---------------------------------------------------------------------------------

# The approximate index's files: files of the index's committed state like the store's.
ANN_FILES = (ann_lib.INDEX_FILE, ann_lib.META_FILE)


def _ann_opener(directory: str, backend: str):
    """What `index_folder.open_index` runs to open the state's approximate index: (index or
    None, why it is not used or None); None when searches never use one (backend 'exact')."""
    if backend not in ("auto", "ann"):
        return None

    def open_ann(descriptors: np.ndarray, meta: dict[str, Any]):
        if not len(descriptors) or not ann_lib.exists(directory):
            return None, None
        try:
            return ann_lib.load(directory, descriptors, meta), None
        except (ann_lib.AnnIndexError, OSError, ValueError, KeyError) as err:
            return None, " ".join(str(err).split())

    return open_ann


def _ann_bytes(rows: int, settings: AnnSettings) -> int:
    """About the bytes the approximate index of `rows` rows takes on disk."""
    return int(rows) * int(settings.bytes_per_vector) + (1 << 20)


def _raise_if_disk_full(error: OSError, where: str, needed: int | None, what: str) -> None:
    """Raises a full disk as one line naming the file and the space needed (a StoreWriteError);
    returns for any other error, which the caller re-raises as it is.

    Args:
      error: the error raised.
      where: the file or folder written, when the error does not name one.
      needed: about how many bytes the write needed (None: unknown).
      what: what was written, for the message.
    """
    if error.errno != errno.ENOSPC or isinstance(error, store_lib.StoreWriteError):
        return
    if error.filename is None and str(error.strerror).startswith("not enough space"):
        raise store_lib.StoreWriteError(errno.ENOSPC, error.strerror) from error
    path = os.fspath(error.filename or where)
    raise store_lib.write_error(error, path, needed, what) from error


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


def summary(counts: Mapping[str, int]) -> str:
    """`Retriever.index`'s counts as a line: '372 added (128 resumed from the interrupted run),
    0 updated, 0 unchanged, 0 unreadable, 0 removed; 372 images'."""
    added = f"{counts['added']} added"
    if counts.get("resumed"):
        added += f" ({counts['resumed']} resumed from the interrupted run)"
    return (
        f"{added}, {counts['updated']} updated, {counts['unchanged']} unchanged, "
        f"{counts['failed']} unreadable, {counts['removed']} removed; {counts['total']} images"
    )
