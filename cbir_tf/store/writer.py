"""Resumable, locked writing of one descriptor store: chunks in ``parts/``, then `write_store`.

While an extraction runs, finished work lives in ``<store>/parts/``: ``run.json`` (the run's
metadata and a fingerprint of its image list, written before any chunk) and numbered chunks
``00000.npz``, ``00001.npz``, ... each written atomically every ``flush_every`` images and
holding ``descriptors`` float32 [n, D], ``ids`` (fixed-width unicode, never pickled objects),
the skipped ids and reasons, and a sha256 of all of them. A run killed at any moment (SIGKILL,
power loss, a full disk) loses at most the images after the last chunk; running the same
extraction again reads the chunks, skips what is done, and finishes. ``finalize`` hands the rows
to `cbir_tf.store.files.write_store` (the one writer of finished stores), then removes ``parts/``.

A folder lock (``cbir_tf.fileio.folder_lock``) refuses a second process writing the same store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.data.image_list import validate_ids
from cbir_tf.describe.extract import NonFiniteDescriptorError, library_versions
from cbir_tf.fileio import (
    atomic_open,
    atomic_write_json,
    folder_lock,
    free_bytes,
    human_bytes,
    load_npz,
    require_space,
)
from cbir_tf.store.files import (
    CHUNK_RE,
    PARTS_DIR,
    RUN_FILE,
    DescriptorStore,
    StoreCorruptError,
    StoreMismatchError,
    StoreWriteError,
    store_bytes,
    write_store,
)
from cbir_tf.store.meta import VOLATILE_FIELDS, ids_fingerprint, meta_differences, normalize

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------


def _unicode_array(values: Sequence[str]) -> np.ndarray:
    width = max([len(v) for v in values] + [1])
    return np.array(list(values), dtype=f"<U{width}")


def _chunk_digest(desc: np.ndarray, ids, skipped_ids, skipped_reasons) -> str:
    h = hashlib.sha256()
    h.update(str(desc.shape).encode())
    h.update(np.ascontiguousarray(desc, dtype="<f4").tobytes())
    for group in (ids, skipped_ids, skipped_reasons):
        h.update(b"\x00")
        for v in group:
            h.update(str(v).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def _write_chunk(path: str, desc: np.ndarray, ids, skipped_ids, skipped_reasons) -> None:
    arrays = {
        "descriptors": np.ascontiguousarray(desc, dtype=np.float32),
        "ids": _unicode_array(ids),
        "skipped_ids": _unicode_array(skipped_ids),
        "skipped_reasons": _unicode_array(skipped_reasons),
        "sha256": np.array(_chunk_digest(desc, ids, skipped_ids, skipped_reasons)),
    }
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def read_chunk(path: str) -> dict[str, Any]:
    """Reads and verifies one chunk. Raises StoreCorruptError when it does not check out."""
    try:
        arrays = load_npz(path)
    except Exception as e:  # zip/format errors of a damaged file
        raise StoreCorruptError(f"chunk {path} cannot be read: {e}") from e
    needed = {"descriptors", "ids", "skipped_ids", "skipped_reasons", "sha256"}
    if not needed <= set(arrays):
        raise StoreCorruptError(f"chunk {path} lacks {sorted(needed - set(arrays))}")
    desc = arrays["descriptors"]
    if desc.dtype != np.float32 or desc.ndim != 2:
        raise StoreCorruptError(f"chunk {path}: descriptors {desc.dtype} {desc.shape}")
    for key in ("ids", "skipped_ids", "skipped_reasons"):
        if arrays[key].dtype.kind != "U" or arrays[key].ndim != 1:
            raise StoreCorruptError(f"chunk {path}: {key} must be a 1-D unicode array")
    ids = arrays["ids"].tolist()
    skipped_ids = arrays["skipped_ids"].tolist()
    skipped_reasons = arrays["skipped_reasons"].tolist()
    if len(ids) != desc.shape[0] or len(skipped_ids) != len(skipped_reasons):
        raise StoreCorruptError(f"chunk {path}: array lengths disagree")
    if _chunk_digest(desc, ids, skipped_ids, skipped_reasons) != str(arrays["sha256"]):
        raise StoreCorruptError(f"chunk {path}: sha256 mismatch")
    return {
        "descriptors": desc,
        "ids": ids,
        "skipped": list(zip(skipped_ids, skipped_reasons, strict=True)),
    }


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


class StoreWriter:
    """Resumable, locked writer of one store. Use as a context manager.

    On entering: takes the folder lock (`LockError` if another process writes the store),
    removes leftover temporary files, and reads the finished chunks of an interrupted run of the
    same settings and image list (`StoreMismatchError` otherwise) so that `done` lists what need
    not be computed again. If the store is already complete for the same settings and ids,
    `already_complete` is True and nothing needs writing.

    `add` / `skip` record one image each; every `flush_every` recorded images a chunk is written
    atomically. `finalize` writes the finished store. Leaving the block with an exception
    flushes the images already recorded (best effort) so that they are not computed again.

    Args:
      store: the store.
      ids: all image ids this run must cover, in output row order (unique, single-line).
      meta: how descriptors are made (JSON-serialisable); a resumed run must pass equal meta.
      flush_every: images per chunk.
    """

    def __init__(
        self,
        store: DescriptorStore,
        ids: Sequence[str],
        meta: dict[str, Any],
        flush_every: int = default("extract.flush_every"),
    ):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.store = store
        self.ids = validate_ids(ids)
        self._position = {i: k for k, i in enumerate(self.ids)}
        self.meta = normalize(dict(meta))
        self.meta.setdefault("versions", library_versions())
        self.flush_every = int(flush_every)
        self.done: set[str] = set()
        self.num_resumed = 0
        self.already_complete = False
        self.dim: int | None = None
        self._stack: contextlib.ExitStack | None = None
        self._pending_desc: list[np.ndarray] = []
        self._pending_ids: list[str] = []
        self._pending_skipped: list[tuple[str, str]] = []
        self._next_chunk = 0

    @property
    def path(self) -> str:
        """The store's folder."""
        return self.store.path

    # -- context management -----------------------------------------------------------------

    def __enter__(self) -> StoreWriter:
        stack = contextlib.ExitStack()
        stack.enter_context(folder_lock(self.store.path, what="this descriptor store"))
        self._stack = stack
        try:
            self._open()
        except BaseException:
            stack.close()
            self._stack = None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
            elif not isinstance(exc, StoreWriteError):
                # Keep what is finished; a failure here must not hide the original error.
                try:
                    self.flush()
                except Exception as flush_error:
                    logger.warning("could not save the last finished images: %s", flush_error)
        finally:
            if self._stack is not None:
                self._stack.close()
                self._stack = None

    def _run_spec(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "num_ids": len(self.ids),
            "ids_sha256": ids_fingerprint(self.ids),
        }

    def _open(self) -> None:
        path = self.store.path
        parts = os.path.join(path, PARTS_DIR)
        # Temporary files of writes that never completed (atomic_open's dot-names).
        for folder in (path, parts):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".") and name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(folder, name))
        if self.store.is_complete:
            self._open_complete()
            return
        os.makedirs(parts, exist_ok=True)
        run_path = os.path.join(parts, RUN_FILE)
        chunks = self.store.chunk_files()
        if os.path.isfile(run_path):
            with open(run_path, encoding="utf-8") as f:
                stored = json.load(f)
            self._check_same_run(stored)
        elif chunks:
            raise StoreCorruptError(
                f"{parts} holds chunks but no {RUN_FILE}; it was not written by this toolkit. "
                "Remove the folder to start the extraction afresh."
            )
        else:
            try:
                atomic_write_json(run_path, self._run_spec())
            except OSError as e:
                raise self._write_error(e, run_path) from e
        for name in chunks:
            chunk_path = os.path.join(parts, name)
            self._next_chunk = max(self._next_chunk, int(CHUNK_RE.match(name).group(1)) + 1)
            try:
                chunk = read_chunk(chunk_path)
            except StoreCorruptError as e:
                # Atomic writes make this unlikely (a disk error); redo its images, keep evidence.
                logger.warning("%s; its images will be extracted again", e)
                os.replace(chunk_path, chunk_path + ".corrupt")
                continue
            for i in chunk["ids"] + [s for s, _ in chunk["skipped"]]:
                if i not in self._position:
                    raise StoreMismatchError(
                        f"{chunk_path} holds image {i!r}, which is not in this run's image list"
                    )
                self.done.add(i)
            if chunk["descriptors"].shape[0]:
                self._set_dim(chunk["descriptors"].shape[1], chunk_path)
        self.num_resumed = len(self.done)
        if self.num_resumed:
            logger.info(
                "resuming %s: %d of %d images already done", path, self.num_resumed, len(self.ids)
            )

    def _check_same_run(self, stored: dict[str, Any]) -> None:
        diffs = meta_differences(stored.get("meta", {}), self.meta, VOLATILE_FIELDS)
        if diffs:
            raise StoreMismatchError(
                f"{self.store.path} holds an interrupted extraction made with other settings; "
                f"differing fields: {'; '.join(diffs)}. Resume it with the same settings, or "
                "write to another folder (another --workdir or --out), or delete "
                f"{self.store.path} (descriptors of different settings are never mixed)."
            )
        old_v = stored.get("meta", {}).get("versions")
        if old_v and self.meta.get("versions") and old_v != self.meta.get("versions"):
            warnings.warn(
                f"resuming {self.store.path} with other library versions ({old_v} -> "
                f"{self.meta.get('versions')}); descriptors may differ slightly",
                stacklevel=3,
            )
        if stored.get("ids_sha256") != ids_fingerprint(self.ids) or stored.get("num_ids") != len(
            self.ids
        ):
            raise StoreMismatchError(
                f"{self.store.path} holds an interrupted extraction of another image list "
                f"({stored.get('num_ids')} images, now {len(self.ids)}). Resume it with the same "
                "images (and shard settings), or write to another folder."
            )

    def _open_complete(self) -> None:
        stored_meta = self.store.meta()
        diffs = meta_differences(stored_meta, self.meta, VOLATILE_FIELDS)
        if diffs:
            raise StoreMismatchError(
                f"{self.store.path} is a finished store made with other settings; differing "
                f"fields: {'; '.join(diffs)}. Write to another folder (another --workdir or "
                f"--out), or delete {self.store.path} to extract it again."
            )
        _, stored_ids, _ = self.store.load(mmap=True)
        covered = stored_ids + [i for i, _ in self.store.skipped()]
        if sorted(covered) != sorted(self.ids):
            raise StoreMismatchError(
                f"{self.store.path} is a finished store of another image list "
                f"({len(covered)} images, now {len(self.ids)}); write to another folder."
            )
        # A finished store's leftover chunks (killed between COMPLETE and clean-up).
        shutil.rmtree(os.path.join(self.store.path, PARTS_DIR), ignore_errors=True)
        self.done = set(self.ids)
        self.num_resumed = len(self.ids)
        self.already_complete = True

    # -- recording -------------------------------------------------------------------------

    def _set_dim(self, dim: int, where: str) -> None:
        if self.dim is None:
            self.dim = int(dim)
        elif self.dim != dim:
            raise StoreMismatchError(
                f"{where}: descriptor dimension {dim} differs from {self.dim} of earlier images"
            )

    def _check_id(self, image_id: str) -> None:
        if self._stack is None:
            raise RuntimeError("use the StoreWriter inside a `with` block")
        if self.already_complete:
            raise RuntimeError(f"{self.store.path} is already complete")
        if image_id not in self._position:
            raise KeyError(f"image id {image_id!r} is not in this run's image list")
        if image_id in self.done:
            raise ValueError(f"image {image_id!r} was already recorded")

    def add(self, image_id: str, descriptor: np.ndarray) -> None:
        """Records the descriptor (float [D]) of one image; NaN/Inf raise naming the image."""
        self._check_id(image_id)
        vec = np.asarray(descriptor, dtype=np.float32).reshape(-1)
        if not np.isfinite(vec).all():
            raise NonFiniteDescriptorError(f"the descriptor of image {image_id!r} holds NaN or Inf")
        self._set_dim(vec.shape[0], f"image {image_id!r}")
        self._pending_desc.append(vec)
        self._pending_ids.append(image_id)
        self.done.add(image_id)
        self._maybe_flush()

    def skip(self, image_id: str, reason: str) -> None:
        """Records that one image was skipped, and why."""
        self._check_id(image_id)
        self._pending_skipped.append((image_id, str(reason) or "unknown error"))
        self.done.add(image_id)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._pending_ids) + len(self._pending_skipped) >= self.flush_every:
            self.flush()

    @property
    def num_pending(self) -> int:
        """Images recorded but not yet written to a chunk."""
        return len(self._pending_ids) + len(self._pending_skipped)

    def flush(self) -> None:
        """Writes the recorded images as the next numbered chunk (atomic; no-op when empty).

        Raises:
          StoreWriteError: the write failed (e.g. disk full). No partial chunk is left; the
            images of the failed chunk are forgotten (they will be computed again on resume).
        """
        if not self.num_pending:
            return
        dim = self.dim or 0
        desc = np.stack(self._pending_desc) if self._pending_desc else np.zeros((0, dim), "f4")
        ids = list(self._pending_ids)
        skipped = list(self._pending_skipped)
        name = f"{self._next_chunk:05d}.npz"
        path = os.path.join(self.store.path, PARTS_DIR, name)
        try:
            _write_chunk(path, desc, ids, [s for s, _ in skipped], [r for _, r in skipped])
        except OSError as e:
            # The failed chunk's images are no longer "done": a resumed run computes them.
            self.done.difference_update(ids)
            self.done.difference_update(s for s, _ in skipped)
            self._clear_pending()
            needed = desc.nbytes + 16 * sum(len(i) + 1 for i in ids) + 4096
            raise self._write_error(e, f"chunk {path}", needed) from e
        self._next_chunk += 1
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._pending_desc, self._pending_ids, self._pending_skipped = [], [], []

    def _write_error(self, e: OSError, what: str, needed: int | None = None) -> StoreWriteError:
        if e.errno == errno.ENOSPC:
            free = free_bytes(self.store.path)
            parts = [f"about {human_bytes(needed)} needed"] if needed else []
            parts += [f"{human_bytes(free)} free"] if free is not None else []
            kind = "the disk is full" + (f" ({', '.join(parts)})" if parts else "")
        else:
            kind = f"the write failed ({e})"
        saved = len(self.done)
        return StoreWriteError(
            e.errno,
            f"could not write {what}: {kind}. The store {self.store.path} is consistent: "
            f"{saved} of {len(self.ids)} images are saved in finished chunks and will not be "
            "computed again. Free some space (or fix the error) and run the same extraction "
            "again to resume.",
        )

    # -- finishing -------------------------------------------------------------------------

    def finalize(self, extra_meta: dict[str, Any] | None = None) -> DescriptorStore:
        """Writes descriptors.npy, ids.txt, skipped.json, meta.json, COMPLETE; removes chunks.

        Every image of `ids` must be recorded (added or skipped). Descriptors are streamed
        chunk by chunk into place, so memory stays bounded by one chunk.

        Args:
          extra_meta: fields added to meta.json (e.g. timing figures).

        Returns:
          The store, now complete.

        Raises:
          ValueError: images are missing.
          StoreWriteError: a final file could not be written (the chunks are kept: resumable).
        """
        if self._stack is None:
            raise RuntimeError("use the StoreWriter inside a `with` block")
        if self.already_complete:
            return self.store
        self.flush()
        missing = [i for i in self.ids if i not in self.done]
        if missing:
            raise ValueError(
                f"cannot finalize {self.store.path}: {len(missing)} images not recorded, "
                f"first: {missing[:3]}"
            )
        parts = os.path.join(self.store.path, PARTS_DIR)
        chunk_paths = [os.path.join(parts, n) for n in self.store.chunk_files()]
        # Rows go into the input order, whatever order the chunks were written in.
        described: set[str] = set()
        skipped: dict[str, str] = {}
        for p in chunk_paths:
            chunk = read_chunk(p)
            described.update(chunk["ids"])
            skipped.update(dict(chunk["skipped"]))
        kept = [i for i in self.ids if i in described]
        if len(kept) + len(skipped) != len(self.ids):
            raise StoreCorruptError(f"{parts}: chunks do not cover the image list exactly")
        row_of = {i: row for row, i in enumerate(kept)}
        meta = dict(self.meta)
        meta.update(normalize(extra_meta or {}))
        needed = store_bytes(len(kept), self.dim or 0, kept)
        try:
            require_space(self.store.path, needed, "the finished store")
            write_store(
                self.store.path,
                kept,
                _chunk_blocks(chunk_paths, row_of),
                dim=self.dim or 0,
                skipped=[(i, skipped[i]) for i in self.ids if i in skipped],
                meta=meta,
            )
        except OSError as e:
            raise self._write_error(e, f"the final store files in {self.store.path}", needed) from e
        shutil.rmtree(parts, ignore_errors=True)
        self.already_complete = True
        return self.store

    def finish(self) -> tuple[np.ndarray, list[str], list[tuple[str, str]], dict[str, Any]]:
        """Finalizes and loads the store: (descriptors [N, D] memory-mapped, ids, skipped, meta).

        With `add`, `skip` and `done` this is the sink protocol of `cbir_tf.describe.extract`.
        """
        store = self.finalize()
        descriptors, ids, meta = store.load(mmap=True)
        return descriptors, ids, store.skipped(), meta


class StoreSink:
    """What `cbir_tf.describe.extract.extract` writes a store through: `sink=StoreSink(folder)`.

    Called with the run's ids and meta, it opens the store's `StoreWriter`, so that an
    extraction into a folder is locked, saved chunk by chunk and resumable.

    Args:
      path: the store folder (created when missing).
      flush_every: images per saved chunk.
    """

    def __init__(self, path: str | os.PathLike, flush_every: int = default("extract.flush_every")):
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = os.fspath(path)
        self.flush_every = int(flush_every)

    def __call__(self, ids: Sequence[str], meta: dict[str, Any]) -> StoreWriter:
        return StoreWriter(DescriptorStore(self.path), ids, meta, flush_every=self.flush_every)


def _chunk_blocks(chunk_paths: Sequence[str], row_of: dict[str, int]):
    """(first row, float32 [b, D]) runs of consecutive rows, one chunk in memory at a time."""
    for p in chunk_paths:
        chunk = read_chunk(p)
        desc = chunk["descriptors"]
        rows = np.array([row_of[i] for i in chunk["ids"]], dtype=np.int64)
        # Contiguous runs of rows are written in one call.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            if len(run):
                yield int(rows[run[0]]), desc[run[0] : run[-1] + 1]
