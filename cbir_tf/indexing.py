"""Adding, replacing and removing the images of a `Retriever`'s index, and saving it.

In memory, new descriptors are joined to the matrix. Attached to a folder, new images are first
extracted into `<index>/pending/` (a store written chunk by chunk by
`cbir_tf.descriptors.extract`, resumable after a kill: the work list is saved before it starts),
then joined with the kept rows into the new descriptors.npy block by block, so memory never holds
more than the memory-mapped matrix and one block; `cbir_tf.store.write_store` commits the store
and the manifest together through its journal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import index_folder
from cbir_tf import store as store_lib
from cbir_tf.fileio import folder_lock

log = logging.getLogger(__name__)


class IndexUpdates:
    """The writing half of `cbir_tf.retriever.Retriever` (a base class it inherits).

    The host class holds the index's state: `model`, `model_ref`, `image_size`, `scales`,
    `ms_power`, `descriptor_meta`, `rerank_settings`, `block_size`, `flush_every`, `directory`,
    `collection`, `_descriptors`, `_ids`, `_row`, and provides `_open(directory)` (read an index
    folder) and `_set_ids(ids)` (new row order).

    Attributes:
      extract_fn: what describes new images: None = `cbir_tf.descriptors.extract`, or a
        function with its arguments and result (`cbir_tf.beam_extract.BeamExtractor.extract`).
    """

    extract_fn: Any = None

    def _store_meta(self) -> dict[str, Any]:
        meta = dict(self.descriptor_meta)
        meta.update(
            {"image_size": self.image_size, "scales": list(self.scales), "ms_power": self.ms_power}
        )
        return meta

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
        from cbir_tf import descriptors

        if not ids:
            return None
        res = (self.extract_fn or descriptors.extract)(
            self.model,
            list(paths),
            ids=list(ids),
            image_size=self.image_size,
            scales=self.scales,
            ms_power=self.ms_power,
            store_dir=store_dir,
            meta=self._store_meta(),
            flush_every=self.flush_every,
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
            self._update_ann(old_rows if appended else None)
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
        """Writes rows `old[keep_rows]` then `new_desc` as the index in `directory` (journalled).

        Memory holds one block of rows; a crash leaves the old index or the new one
        (`cbir_tf.store.write_store` with its journal).
        """
        sources = [(old, keep_rows)] + ([new_desc] if new_desc is not None else [])
        store_lib.write_store(
            directory,
            ids,
            store_lib.stacked_blocks(sources, self.block_size),
            dim=dim,
            skipped=list(self.failed.items()),
            meta=self._store_meta(),
            files={index_folder.MANIFEST_FILE: self._manifest(ids, self._model_ref_for(directory))},
            journal=True,
        )

    def _model_ref_for(self, directory: str) -> dict[str, Any]:
        """The manifest's model entry; saves model.keras when no reference can rebuild it."""
        ref = dict(self.model_ref)
        ref.pop("file", None)
        if ref.get("reproducible") and ref.get("kind") != "inline":
            return ref
        path = os.path.join(directory, index_folder.MODEL_FILE)
        if not (self.directory == directory and os.path.isfile(path)):
            from cbir_tf import models

            models.save_descriptor_model(self.model, path, {"image_size": self.image_size})
        ref["file"] = index_folder.MODEL_FILE
        return ref

    # -- the approximate index ---------------------------------------------------------------

    def _update_ann(self, previous_rows: int | None) -> None:
        """Keeps the folder's approximate index in step with its rows (`cbir_tf.ann`).

        Rows only appended: they are added to the saved index (no retraining; a rebuild is
        proposed once they make the quantiser stale). Rows removed or replaced: rebuilt. No
        index yet: built once the collection reaches `search.ann.min_rows` (not with backend
        'exact').
        """
        from cbir_tf import ann

        have = ann.exists(self.directory)
        n = len(self._ids)
        if not have and (n < self.ann_settings.min_rows or self.backend == "exact"):
            return
        if n == 0:
            ann.remove(self.directory)
            return
        if have and previous_rows is not None:
            meta = store_lib.DescriptorStore(self.directory).meta()
            try:
                self._ann = ann.add_rows(
                    self.directory, self._descriptors, meta, self.ann_settings,
                    previous_rows=previous_rows, block_size=self.block_size,
                )  # fmt: skip
                return
            except ann.AnnIndexError as err:
                log.warning("rebuilding the approximate index: %s", err)
        elif have:
            log.info("rows were removed or replaced: rebuilding the approximate index")
        self._build_ann(None)

    def _build_ann(self, kind: str | None):
        from cbir_tf import ann

        settings, rows = self.ann_settings, self._descriptors
        index = ann.build(rows, settings, block_size=self.block_size, kind=kind)
        if self.directory:
            ann.save(index, self.directory, store_lib.DescriptorStore(self.directory).meta())
        self._ann = index
        self._database = None
        return index

    def rebuild_ann(self, kind: str | None = None):
        """Builds (or rebuilds) the approximate index of the images indexed, saved in the folder.

        Args:
          kind: 'flat' or 'ivfpq' (None: `search.ann.kind`, by default chosen by size).

        Returns:
          The `cbir_tf.ann.AnnIndex` (searches use it with backend 'auto' or 'ann').
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
            from cbir_tf import ann

            # The approximate index describes the same rows: its files are copied (one opened
            # memory-mapped cannot be serialised again), or an in-memory one is saved.
            if self.directory and ann.exists(self.directory):
                ann.copy_files(self.directory, directory)
            elif self._ann is not None:
                ann.save(self._ann, directory, store_lib.DescriptorStore(directory).meta())
        return directory
