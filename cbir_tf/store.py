"""Descriptor store on disk: the finished files, their one writer, and memory-mapped reading.

A store is one folder::

    descriptors.npy   float32 [N, D], C order, memory-mappable (loaded with allow_pickle=False)
    ids.txt           N lines, UTF-8: the id of row i on line i
    meta.json         how the descriptors were made (backbone, weights, pooling, whitening, scales,
                      image_size, versions, created, num_images, dim, ... plus the caller's fields)
    skipped.json      [{"id": ..., "reason": ...}] images that could not be read, in input order
    COMPLETE          written last; a folder without it is never loaded as a finished store

`write_store` is the one writer of these files, for every way a store is finished: a resumable
extraction (`cbir_tf.store_writer.StoreWriter`, whose chunks wait in ``parts/`` until then), a
merge of shards (`cbir_tf.shards.merge_shards`) and an image index rewritten in place
(`cbir_tf.retriever`, through the ``COMMIT`` journal: `finish_commit`, `recover`). It writes
them in the order listed, each atomically, ``COMPLETE`` last.

This module is numpy-only: reading a store never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cbir_tf.fileio import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    json_safe,
    load_npy,
)

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

_BLOCK_ROWS = 65536  # rows per block when copying descriptors (~256 MB at D = 1024)

_CHUNK_RE = re.compile(r"^(\d{5,})\.npz$")

# Fields that say how descriptors were computed: two stores can only be compared (queries against
# a database, shards merged) when these agree. Some only matter for one pooling or backbone.
COMPATIBILITY_FIELDS = (
    "backbone",
    "alpha",
    "weights",
    "pooling",
    "gem_p",
    "rmac_levels",
    "whitening",
    "image_size",
    "scales",
    "ms_power",
    "dim",
)

# Fields describing which part of a collection a shard holds; they differ between shards.
SHARD_FIELDS = ("shard_index", "num_shards", "shard_start", "shard_stop", "total_images")

# Fields that legitimately differ between an interrupted run and its resumption, or that are only
# known at the end of a run.
_VOLATILE_FIELDS = ("created", "versions", "num_images", "num_skipped", "dim", "merged_from")


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


class NonFiniteDescriptorError(ValueError):
    """A descriptor holds NaN or Inf; the message names the image."""


# --------------------------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------------------------


def _normalize(obj: Any) -> Any:
    """JSON-normalises `obj` (tuples -> lists, numpy -> Python) so that equality is meaningful.

    Anything else (e.g. a Whitening object) is recorded by its description, never pickled.
    """
    return json_safe(obj, default=repr)


def library_versions() -> dict[str, str | None]:
    """Versions of the packages that determine descriptor values (without importing them)."""
    from cbir_tf import __version__

    versions: dict[str, str | None] = {"cbir_tf": __version__}
    # TensorFlow ships under several distribution names (tensorflow-cpu, tf-nightly, ...).
    candidates = {
        "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos"),
        "keras": ("keras",),
        "numpy": ("numpy",),
    }
    for package, distributions in candidates.items():
        versions[package] = None
        module = sys.modules.get(package)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            versions[package] = module.__version__
            continue
        for dist in distributions:
            try:
                versions[package] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _relevant(field: str, meta_a: dict, meta_b: dict) -> bool:
    """Whether `field` can change the descriptors given the rest of both metas."""
    if field == "gem_p":
        return meta_a.get("pooling") == "gem" or meta_b.get("pooling") == "gem"
    if field == "rmac_levels":
        return meta_a.get("pooling") == "rmac" or meta_b.get("pooling") == "rmac"
    if field == "alpha":
        return any(str(m.get("backbone", "")).startswith("mobilenet") for m in (meta_a, meta_b))
    if field == "ms_power":
        return any(len(_normalize(m.get("scales")) or [1.0]) > 1 for m in (meta_a, meta_b))
    return True


def check_compatible(
    meta_a: dict, meta_b: dict, what_a: str = "first", what_b: str = "second"
) -> None:
    """Refuses to compare descriptors computed differently.

    Compares `COMPATIBILITY_FIELDS` (backbone, alpha, weights, pooling, gem_p, rmac_levels,
    whitening, image_size, scales, ms_power, dim). `gem_p` counts only for GeM pooling,
    `rmac_levels` only for R-MAC, `alpha` only for MobileNet backbones and `ms_power` only for
    multi-scale extraction, since elsewhere they do not change the descriptors. A field absent
    from both metas is equal; absent from one only, it differs.

    Args:
      meta_a: metadata of one store (e.g. the queries').
      meta_b: metadata of the other (e.g. the database's).
      what_a: name of the first store in the message.
      what_b: name of the second store in the message.

    Raises:
      ValueError: naming every differing field with both values.
    """
    a, b = _normalize(dict(meta_a)), _normalize(dict(meta_b))
    differing = []
    for field in COMPATIBILITY_FIELDS:
        if not _relevant(field, a, b):
            continue
        va, vb = a.get(field), b.get(field)
        if va != vb:
            differing.append(f"{field} ({what_a}: {va!r}, {what_b}: {vb!r})")
    if differing:
        raise ValueError(
            "descriptors were computed differently and cannot be compared; differing fields: "
            + "; ".join(differing)
            + ". Extract both with the same model settings."
        )


def _meta_differences(stored: dict, new: dict, ignore: Iterable[str]) -> list[str]:
    ignore = set(ignore)
    stored, new = _normalize(stored), _normalize(new)
    keys = sorted((set(stored) | set(new)) - ignore)
    return [
        f"{k} (stored: {stored.get(k)!r}, now: {new.get(k)!r})"
        for k in keys
        if stored.get(k) != new.get(k)
    ]


def ids_fingerprint(ids: Sequence[str]) -> str:
    """sha256 of an ordered id list (one id per line, UTF-8)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _validate_ids(ids: Sequence[str]) -> list[str]:
    ids = [str(i) for i in ids]
    seen: set[str] = set()
    for i in ids:
        if not i or "\n" in i or "\r" in i:
            raise ValueError(f"image ids must be non-empty single-line strings, got {i!r}")
        if i in seen:
            raise ValueError(f"duplicate image id {i!r}: ids must be unique")
        seen.add(i)
    return ids


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

    def _chunk_files(self) -> list[str]:
        parts = self._file(PARTS_DIR)
        if not os.path.isdir(parts):
            return []
        return sorted(n for n in os.listdir(parts) if _CHUNK_RE.match(n))

    def status(self) -> dict[str, Any]:
        """A cheap summary: complete, number of chunks and of images they hold (done or skipped)."""
        chunks = self._chunk_files()
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

    def writer(self, ids: Sequence[str], meta: dict[str, Any], flush_every: int = 64) -> Any:
        """A `cbir_tf.store_writer.StoreWriter` for the images `ids` (resumable extraction)."""
        from cbir_tf.store_writer import StoreWriter

        return StoreWriter(self, ids, meta, flush_every=flush_every)


def load_store(path: str | os.PathLike, mmap: bool = True):
    """Loads a finished store: (descriptors float32 [N, D], ids list[str], meta dict).

    Raises `StoreIncompleteError` (saying how to resume) when the extraction was interrupted.
    """
    return DescriptorStore(path).load(mmap=mmap)


# --------------------------------------------------------------------------------------------
# Writing a finished store (the one writer: StoreWriter.finalize, merge_shards, indexes)
# --------------------------------------------------------------------------------------------


def stacked_blocks(sources: Iterable[Any], block_rows: int = _BLOCK_ROWS):
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


# Names that lived here before the resumable writer and the shards got their own modules; still
# importable from here, loaded on first use (both modules import this one).
_MOVED = {
    "StoreWriter": "cbir_tf.store_writer",
    "merge_shards": "cbir_tf.shards",
    "shard_meta": "cbir_tf.shards",
    "shard_range": "cbir_tf.shards",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
