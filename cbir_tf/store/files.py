"""Descriptor store on disk: the finished files, their one writer, and memory-mapped reading.

A store is one folder::

    descriptors.npy   float32 [N, D], C order, memory-mappable (loaded with allow_pickle=False)
    ids.txt           N lines, UTF-8: the id of row i on line i
    meta.json         how the descriptors were made (backbone, weights, pooling, whitening, scales,
                      image_size, versions, created, num_images, dim, ... plus the caller's fields)
    skipped.json      [{"id": ..., "reason": ...}] images that could not be read, in input order
    COMPLETE          written last; a folder without it is never loaded as a finished store

`write_store` is the one writer of these files, for every way a store is finished: a resumable
extraction (`cbir_tf.store.writer.StoreWriter`, whose chunks wait in ``parts/`` until then), a
merge of shards (`cbir_tf.store.shards.merge_shards`) and an image index rewritten in place
(`cbir_tf.retriever`, through the ``COMMIT`` journal: `finish_commit`, `recover`). It writes
them in the order listed, each atomically, ``COMPLETE`` last.

This module is numpy-only: reading a store never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.describe.extract import library_versions
from cbir_tf.fileio import atomic_open, atomic_write_json, atomic_write_text, load_npy
from cbir_tf.store.meta import ids_fingerprint

logger = logging.getLogger(__name__)

DESCRIPTORS_FILE = "descriptors.npy"
IDS_FILE = "ids.txt"
META_FILE = "meta.json"
SKIPPED_FILE = "skipped.json"
COMPLETE_FILE = "COMPLETE"
PARTS_DIR = "parts"
RUN_FILE = "run.json"
COMMIT_FILE = "COMMIT"
# The files of a finished store, in the order they are written (COMPLETE last).
STORE_FILES = (DESCRIPTORS_FILE, IDS_FILE, SKIPPED_FILE, META_FILE, COMPLETE_FILE)

# The numbered chunks an unfinished extraction saves in parts/ (`cbir_tf.store.writer`).
CHUNK_RE = re.compile(r"^(\d{5,})\.npz$")


class StoreError(RuntimeError):
    """A store cannot be read or written as asked (base class of the errors below)."""


class StoreIncompleteError(StoreError):
    """The store has no COMPLETE marker: its extraction was interrupted or is still running."""


class StoreCorruptError(StoreError):
    """A store file does not match what the store says it holds."""


class StoreMismatchError(StoreError, ValueError):
    """The store was (partly) written by a run with other settings or another image list."""


class StoreWriteError(OSError):
    """Writing a chunk or the final files failed (e.g. disk full); finished chunks are kept."""


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class DescriptorStore:
    """A descriptor store folder (see the module docstring for its layout).

    Read side: `is_complete`, `load`, `meta`, `skipped`, `status`. Write side: `writer` returns
    a `StoreWriter` context manager that locks the folder, resumes finished chunks and finalizes.

    Args:
      path: the store folder (created by the writer when missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def is_complete(self) -> bool:
        """Whether a finished extraction wrote this store (the COMPLETE marker exists)."""
        return os.path.isfile(self._file(COMPLETE_FILE))

    def chunk_files(self) -> list[str]:
        """Names of the saved chunks of an unfinished extraction, in order (see `writer`)."""
        parts = self._file(PARTS_DIR)
        if not os.path.isdir(parts):
            return []
        return sorted(n for n in os.listdir(parts) if CHUNK_RE.match(n))

    def status(self) -> dict[str, Any]:
        """A cheap summary: complete, number of chunks and of images they hold (done or skipped)."""
        chunks = self.chunk_files()
        done = 0
        for name in chunks:
            with contextlib.suppress(Exception):
                with np.load(os.path.join(self._file(PARTS_DIR), name)) as data:
                    done += len(data["ids"]) + len(data["skipped_ids"])
        return {"complete": self.is_complete, "chunks": len(chunks), "images_done": done}

    def _require_complete(self) -> None:
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"descriptor store {self.path} does not exist")
        if self.is_complete:
            return
        status = self.status()
        if status["chunks"]:
            raise StoreIncompleteError(
                f"descriptor store {self.path} is incomplete: its extraction was interrupted "
                f"after {status['images_done']} images ({status['chunks']} saved chunks in "
                f"{self._file(PARTS_DIR)}). Run the same extraction command again with the "
                "same output folder to resume it; finished images are not recomputed."
            )
        raise StoreIncompleteError(
            f"{self.path} is not a finished descriptor store (no {COMPLETE_FILE} marker): its "
            "extraction was interrupted before saving anything or is still running. Run the "
            "extraction again with this output folder to (re)start it."
        )

    def meta(self) -> dict[str, Any]:
        """The store's meta.json (requires a complete store)."""
        self._require_complete()
        with open(self._file(META_FILE), encoding="utf-8") as f:
            return json.load(f)

    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of every image the extraction skipped, in input order."""
        self._require_complete()
        with open(self._file(SKIPPED_FILE), encoding="utf-8") as f:
            return [(d["id"], d["reason"]) for d in json.load(f)]

    def load(self, mmap: bool = True) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        """Loads a complete store.

        Args:
          mmap: memory-map descriptors.npy read-only instead of reading it into memory.

        Returns:
          (descriptors float32 [N, D], ids list of N str, meta dict).

        Raises:
          StoreIncompleteError: no COMPLETE marker (interrupted extraction; message says how to
            resume).
          StoreCorruptError: file sizes or counts disagree with the marker / metadata.
        """
        self._require_complete()
        with open(self._file(COMPLETE_FILE), encoding="utf-8") as f:
            marker = json.load(f)
        meta = self.meta()
        desc_path = self._file(DESCRIPTORS_FILE)
        size = os.path.getsize(desc_path)
        if size != marker.get("descriptors_bytes"):
            raise StoreCorruptError(
                f"{desc_path} has {size} bytes, {marker.get('descriptors_bytes')} were written; "
                "the store was damaged after extraction. Extract it again."
            )
        desc = load_npy(desc_path, mmap=mmap)
        with open(self._file(IDS_FILE), encoding="utf-8", newline="") as f:
            text = f.read()
        ids = text.split("\n")[:-1] if text else []
        n, d = marker["num_images"], marker["dim"]
        if desc.dtype != np.float32 or desc.ndim != 2 or desc.shape != (n, d):
            raise StoreCorruptError(
                f"{desc_path}: {desc.dtype} {desc.shape}, expected float32 {(n, d)}"
            )
        if len(ids) != n or ids_fingerprint(ids) != marker.get("ids_sha256"):
            raise StoreCorruptError(f"{self._file(IDS_FILE)} does not match the store's marker")
        if meta.get("num_images") != n or meta.get("dim") != d:
            raise StoreCorruptError(f"{self._file(META_FILE)} disagrees with {desc_path}")
        return desc, ids, meta


def load_store(path: str | os.PathLike, mmap: bool = True):
    """Loads a finished store: (descriptors float32 [N, D], ids list[str], meta dict).

    Raises `StoreIncompleteError` (saying how to resume) when the extraction was interrupted.
    """
    return DescriptorStore(path).load(mmap=mmap)


# --------------------------------------------------------------------------------------------
# Writing a finished store (the one writer: StoreWriter.finalize, merge_shards, indexes)
# --------------------------------------------------------------------------------------------


def stacked_blocks(sources: Iterable[Any], block_rows: int = default("search.block_size")):
    """(first row, float32 [b, D]) blocks of the row-wise concatenation of `sources`.

    Args:
      sources: arrays [n_i, D] (memory-mapped ones are read one block at a time), or
        (array, row indices) pairs whose selected rows are taken, in that order.
      block_rows: rows per block (bounds the memory a block takes).
    """
    row = 0
    for source in sources:
        array, rows = source if isinstance(source, tuple) else (source, None)
        n = len(rows) if rows is not None else np.shape(array)[0]
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            yield row + start, array[rows[start:stop]] if rows is not None else array[start:stop]
        row += n


def write_store(
    directory: str | os.PathLike,
    ids: Sequence[str],
    blocks: Iterable[tuple[int, np.ndarray]],
    *,
    dim: int,
    skipped: Sequence[tuple[str, str]],
    meta: dict[str, Any],
    files: dict[str, Any] | None = None,
    journal: bool = False,
) -> None:
    """Writes a finished store: descriptors.npy, ids.txt, skipped.json, meta.json, COMPLETE.

    Each file is written atomically, COMPLETE last (an existing one is removed first), so a
    folder is never read as finished while it is rewritten. With `journal`, every file is
    first written as `<name>.new`, then the `COMMIT` journal lists them, then they are renamed
    into place (`finish_commit`): a crash leaves the old store or, after `recover`, the new one.

    Args:
      directory: the store folder (the caller holds its lock).
      ids: N row ids, in row order.
      blocks: (first row, float32 [b, D]) pairs covering rows 0..N-1 (see `stacked_blocks`).
      dim: D.
      skipped: (id, reason) of the images that could not be read.
      meta: how the descriptors were made; counts, `dim`, `created` (and `versions` when
        absent) are added.
      files: other JSON files written with the store, by name (an index's manifest.json).
      journal: commit through the journal (for a store that replaces a live one).

    Raises:
      OSError: a write failed (e.g. disk full); the previous finished files stay complete
        with `journal`, else the folder is left without COMPLETE.
    """
    directory = os.fspath(directory)
    suffix = ".new" if journal else ""
    n, d = len(ids), int(dim)
    if not journal:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, COMPLETE_FILE))
    desc_path = os.path.join(directory, DESCRIPTORS_FILE + suffix)
    desc_bytes = _write_descriptors(desc_path, n, d, blocks)
    meta = dict(meta)
    meta.update(
        {
            "num_images": n,
            "num_skipped": len(skipped),
            "dim": d,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
    )
    meta.setdefault("versions", library_versions())
    contents: dict[str, Any] = {
        IDS_FILE: "".join(i + "\n" for i in ids),
        SKIPPED_FILE: [{"id": i, "reason": r} for i, r in skipped],
        META_FILE: meta,
        **(files or {}),
        COMPLETE_FILE: {
            "num_images": n,
            "dim": d,
            "descriptors_bytes": desc_bytes,
            "ids_sha256": ids_fingerprint(ids),
        },
    }
    for name, content in contents.items():
        path = os.path.join(directory, name + suffix)
        if isinstance(content, str):
            atomic_write_text(path, content)
        else:
            atomic_write_json(path, content)
    if journal:
        atomic_write_json(
            os.path.join(directory, COMMIT_FILE), {"files": [DESCRIPTORS_FILE, *contents]}
        )
        finish_commit(directory)


def _write_descriptors(path: str, n: int, d: int, blocks) -> int:
    """Writes float32 [n, d] as .npy from (first row, block) pairs; returns the file size."""
    with atomic_open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        row_bytes = 4 * d
        f.truncate(offset + n * row_bytes)
        for row, block in blocks:
            f.seek(offset + int(row) * row_bytes)
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        f.seek(0, os.SEEK_END)
        return f.tell()


def finish_commit(directory: str | os.PathLike) -> None:
    """Renames every `<name>.new` of the journal into place, COMPLETE last, then drops it."""
    directory = os.fspath(directory)
    journal = os.path.join(directory, COMMIT_FILE)
    with open(journal, encoding="utf-8") as f:
        names = json.load(f)["files"]
    names = [n for n in names if n != COMPLETE_FILE] + [COMPLETE_FILE]
    # Without COMPLETE the folder reads as unfinished, never as a mix of old and new files.
    if os.path.isfile(os.path.join(directory, COMPLETE_FILE + ".new")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, COMPLETE_FILE))
    for name in names:
        src = os.path.join(directory, name + ".new")
        if os.path.exists(src):
            os.replace(src, os.path.join(directory, name))
    os.unlink(journal)


def recover(directory: str | os.PathLike, other_files: Sequence[str] = ()) -> bool:
    """Completes a journalled commit cut short, or discards one that never reached its journal.

    Args:
      directory: the store folder (the caller holds its lock, or only reads).
      other_files: names of the `files` that `write_store` wrote besides the store's own.

    Returns:
      Whether an interrupted commit was completed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return False
    if os.path.isfile(os.path.join(directory, COMMIT_FILE)):
        logger.warning("completing an interrupted update of %s", directory)
        finish_commit(directory)
        return True
    for name in (*STORE_FILES, *other_files):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name + ".new"))
    return False
