"""Descriptor store on disk: resumable, atomic, locked writing and memory-mapped reading.

A store is one folder::

    descriptors.npy   float32 [N, D], C order, memory-mappable (loaded with allow_pickle=False)
    ids.txt           N lines, UTF-8: the id of row i on line i
    meta.json         how the descriptors were made (backbone, weights, pooling, whitening, scales,
                      image_size, versions, created, num_images, dim, ... plus the caller's fields)
    skipped.json      [{"id": ..., "reason": ...}] images that could not be read, in input order
    COMPLETE          written last; a folder without it is never loaded as a finished store

While an extraction runs, finished work lives in ``parts/``: ``run.json`` (the run's metadata and
a fingerprint of its image list, written before any chunk) and numbered chunks ``00000.npz``,
``00001.npz``, ... each written atomically every ``flush_every`` images and holding
``descriptors`` float32 [n, D], ``ids`` (fixed-width unicode, never pickled objects), the skipped
ids and reasons, and a sha256 of all of them. A run killed at any moment (SIGKILL, power loss, a
full disk) loses at most the images after the last chunk; running the same extraction again
reads the chunks, skips what is done, and finishes. ``finalize`` writes the files above in the
order listed (each atomically), then ``COMPLETE``, then removes ``parts/``.

A folder lock (``cbir_tf.io.folder_lock``) refuses a second process writing the same store.

This module is numpy-only: reading a store never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cbir_tf.io import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    json_safe,
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


def _check_finite(vectors: np.ndarray, ids: Sequence[str]) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        names = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise NonFiniteDescriptorError(
            f"{int(bad.sum())} descriptor(s) hold NaN or Inf, first: {', '.join(names)}"
        )


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


def _read_chunk(path: str) -> dict[str, Any]:
    """Reads and verifies one chunk. Raises StoreCorruptError when it does not check out."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
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
        desc = np.load(desc_path, allow_pickle=False, mmap_mode="r" if mmap else None)
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

    def writer(
        self, ids: Sequence[str], meta: dict[str, Any], flush_every: int = 64
    ) -> StoreWriter:
        """A `StoreWriter` for the images `ids` (see `StoreWriter`)."""
        return StoreWriter(self, ids, meta, flush_every=flush_every)


def load_store(path: str | os.PathLike, mmap: bool = True):
    """Loads a finished store: (descriptors float32 [N, D], ids list[str], meta dict).

    Raises `StoreIncompleteError` (saying how to resume) when the extraction was interrupted.
    """
    return DescriptorStore(path).load(mmap=mmap)


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
        self, store: DescriptorStore, ids: Sequence[str], meta: dict[str, Any], flush_every=64
    ):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.store = store
        self.ids = _validate_ids(ids)
        self._position = {i: k for k, i in enumerate(self.ids)}
        self.meta = _normalize(dict(meta))
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
        chunks = self.store._chunk_files()
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
            self._next_chunk = max(self._next_chunk, int(_CHUNK_RE.match(name).group(1)) + 1)
            try:
                chunk = _read_chunk(chunk_path)
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
        diffs = _meta_differences(stored.get("meta", {}), self.meta, _VOLATILE_FIELDS)
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
        diffs = _meta_differences(stored_meta, self.meta, _VOLATILE_FIELDS)
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
            raise self._write_error(e, f"chunk {path}") from e
        self._next_chunk += 1
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._pending_desc, self._pending_ids, self._pending_skipped = [], [], []

    def _write_error(self, e: OSError, what: str) -> StoreWriteError:
        kind = "the disk is full" if e.errno == errno.ENOSPC else f"the write failed ({e})"
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
        chunk_paths = [os.path.join(parts, n) for n in self.store._chunk_files()]
        # Rows go into the input order, whatever order the chunks were written in.
        described: set[str] = set()
        skipped: dict[str, str] = {}
        for p in chunk_paths:
            chunk = _read_chunk(p)
            described.update(chunk["ids"])
            skipped.update(dict(chunk["skipped"]))
        kept = [i for i in self.ids if i in described]
        if len(kept) + len(skipped) != len(self.ids):
            raise StoreCorruptError(f"{parts}: chunks do not cover the image list exactly")
        row_of = {i: row for row, i in enumerate(kept)}
        meta = dict(self.meta)
        meta.update(_normalize(extra_meta or {}))
        try:
            write_store(
                self.store.path,
                kept,
                _chunk_blocks(chunk_paths, row_of),
                dim=self.dim or 0,
                skipped=[(i, skipped[i]) for i in self.ids if i in skipped],
                meta=meta,
            )
        except OSError as e:
            raise self._write_error(e, "the final store files") from e
        shutil.rmtree(parts, ignore_errors=True)
        self.already_complete = True
        return self.store

    def finish(self) -> tuple[np.ndarray, list[str], list[tuple[str, str]], dict[str, Any]]:
        """Finalizes and loads the store: (descriptors [N, D] memory-mapped, ids, skipped, meta).

        With `add`, `skip` and `done` this is the sink protocol of `cbir_tf.descriptors.extract`.
        """
        store = self.finalize()
        descriptors, ids, meta = store.load(mmap=True)
        return descriptors, ids, store.skipped(), meta


def _chunk_blocks(chunk_paths: Sequence[str], row_of: dict[str, int]):
    """(first row, float32 [b, D]) runs of consecutive rows, one chunk in memory at a time."""
    for p in chunk_paths:
        chunk = _read_chunk(p)
        desc = chunk["descriptors"]
        rows = np.array([row_of[i] for i in chunk["ids"]], dtype=np.int64)
        # Contiguous runs of rows are written in one call.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            if len(run):
                yield int(rows[run[0]]), desc[run[0] : run[-1] + 1]


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


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def shard_range(num_items: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of `num_items` that shard `shard_index` handles.

    Shards are contiguous and in order (sizes differ by at most one), so concatenating the
    shards 0..num_shards-1 gives back the original order.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards), got shard_index={shard_index}, "
            f"num_shards={num_shards}"
        )
    return num_items * shard_index // num_shards, num_items * (shard_index + 1) // num_shards


def _check_shard_set(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
    """Refuses anything but exactly the shards 0..S-1 of one split, naming what is wrong.

    Args:
      paths: the shard folders, in the order of `metas` (sorted by shard_index).
      metas: their meta.json contents, each with `shard_index` and `num_shards`.

    Raises:
      StoreMismatchError: mixed splits, a shard given twice, or missing shards.
    """
    num = sorted({m.get("num_shards") for m in metas}, key=str)
    if len(num) > 1:
        parts = ", ".join(f"{p}: {m.get('num_shards')}" for p, m in zip(paths, metas, strict=True))
        raise StoreMismatchError(
            f"the shards come from different splits (num_shards {parts}); merge the shards of "
            "one run"
        )
    total = num[0]
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise StoreMismatchError(f"the shards record no valid num_shards ({total!r})")
    indices = [m["shard_index"] for m in metas]
    for i in sorted(set(indices)):
        if indices.count(i) > 1:
            twice = [p for p, j in zip(paths, indices, strict=True) if j == i]
            raise StoreMismatchError(f"shard {i} is given more than once: {', '.join(twice)}")
    outside = [i for i in indices if not (isinstance(i, int) and 0 <= i < total)]
    if outside:
        raise StoreMismatchError(f"shard indices {outside} are not in 0..{total - 1} of {total}")
    missing = [i for i in range(total) if i not in indices]
    if missing:
        which = "shard " + str(missing[0]) if len(missing) == 1 else f"shards {missing}"
        raise StoreMismatchError(
            f"{which} of {total} missing: got shards {indices} ({', '.join(paths)}); merge all "
            f"{total} shards of the run"
        )


def shard_meta(num_items: int, shard_index: int, num_shards: int) -> dict[str, int]:
    """The `SHARD_FIELDS` a shard records in its meta.json (checked and ordered by a merge).

    Args:
      num_items: images of the whole collection.
      shard_index: this shard (see `shard_range`).
      num_shards: how many shards the collection is split into.
    """
    lo, hi = shard_range(num_items, shard_index, num_shards)
    return {
        "shard_index": int(shard_index),
        "num_shards": int(num_shards),
        "shard_start": lo,
        "shard_stop": hi,
        "total_images": int(num_items),
    }


def merge_shards(
    shard_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False
) -> DescriptorStore:
    """Joins complete shard stores into one store, in shard order.

    The shards must all be complete, agree on every metadata field except the shard fields
    (`SHARD_FIELDS`) and per-run ones (created, versions, counts), hold no id twice, and — when
    they record shard fields — be exactly the shards 0..S-1 of one split, contiguous and
    covering the whole collection. They are joined in `shard_index` order (the given order when
    the shards record none), which is the original image order (see `shard_range`).

    Args:
      shard_dirs: the shard store folders.
      out: the merged store folder (must not hold a complete store unless `overwrite`).
      overwrite: replace a complete store at `out`.

    Returns:
      The merged store.

    Raises:
      StoreIncompleteError, StoreMismatchError, ValueError, FileExistsError: as described.
    """
    if not shard_dirs:
        raise ValueError("merge_shards needs at least one shard")
    stores = [DescriptorStore(p) for p in shard_dirs]
    loaded = [(s, *s.load(mmap=True)) for s in stores]
    if all("shard_index" in m for _, _, _, m in loaded):
        loaded.sort(key=lambda t: t[3]["shard_index"])
        _check_split([s.path for s, _, _, _ in loaded], [m for _, _, _, m in loaded])
    _check_same_settings(loaded)
    all_ids = [i for _, _, ids, _ in loaded for i in ids]
    skipped = [sk for s, _, _, _ in loaded for sk in s.skipped()]
    seen: set[str] = set()
    for i in all_ids + [i for i, _ in skipped]:
        if i in seen:
            raise StoreMismatchError(f"image id {i!r} appears in more than one shard")
        seen.add(i)
    out_store = DescriptorStore(out)
    out_path = out_store.path
    if os.path.abspath(out_path) in {os.path.abspath(s.path) for s in stores}:
        raise ValueError("the merged store must go to a folder other than the shards'")
    metas = [m for _, _, _, m in loaded]
    meta = dict(metas[0])
    meta.update(shard_meta(metas[-1].get("total_images", len(all_ids) + len(skipped)), 0, 1))
    meta["merged_from"] = [os.path.abspath(s.path) for s, _, _, _ in loaded]
    with folder_lock(out_path, what="the merged store"):
        if out_store.is_complete and not overwrite:
            raise FileExistsError(f"{out_path} already holds a complete store")
        try:
            write_store(
                out_path,
                all_ids,
                stacked_blocks(desc for _, desc, _, _ in loaded),
                dim=max(int(m.get("dim") or 0) for m in metas),
                skipped=skipped,
                meta=meta,
            )
        except OSError as e:
            raise StoreWriteError(
                e.errno, f"could not write the merged store {out_path}: {e}"
            ) from e
    return out_store


def _check_split(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
    """Refuses shards (sorted by shard_index) that are not one contiguous, whole split."""
    _check_shard_set(paths, metas)
    for prev, cur in zip(metas, metas[1:], strict=False):
        if prev.get("shard_stop") != cur.get("shard_start"):
            raise StoreMismatchError(
                f"shards {prev['shard_index']} and {cur['shard_index']} are not contiguous"
            )
    first, last = metas[0], metas[-1]
    if first.get("shard_start", 0) != 0 or last.get("shard_stop") != last.get(
        "total_images", last.get("shard_stop")
    ):
        raise StoreMismatchError("the shards do not cover the whole collection")


def _check_same_settings(loaded: Sequence[tuple[DescriptorStore, Any, Any, dict]]) -> None:
    """Refuses shards whose descriptors were made with other settings than the first's."""
    ignore = set(SHARD_FIELDS) | set(_VOLATILE_FIELDS)
    first_store, first_meta = loaded[0][0], loaded[0][3]
    for s, _, _, m in loaded[1:]:
        diffs = _meta_differences(first_meta, m, ignore)
        if diffs:
            raise StoreMismatchError(
                f"shard {s.path} was made with other settings than {first_store.path}: "
                + "; ".join(diffs)
            )
        # A shard whose images were all skipped has no dimension to compare.
        a, b = dict(first_meta), dict(m)
        if not a.get("num_images") or not b.get("num_images"):
            a.pop("dim", None), b.pop("dim", None)
        check_compatible(a, b, first_store.path, s.path)
