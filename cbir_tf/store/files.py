"""Descriptor store on disk: its files, their one writer, committed states, and reading them.

A store is one folder::

    descriptors.npy   float32 [N, D], C order, memory-mappable (loaded with allow_pickle=False)
    ids.txt           N lines, UTF-8: the id of row i on line i
    meta.json         how the descriptors were made (backbone, weights, pooling, whitening, scales,
                      image_size, versions, created, num_images, dim, ... plus the caller's fields)
    skipped.json      [{"id": ..., "reason": ...}] images that could not be read, in input order
    COMPLETE          written last: the commit number, and the size and SHA-256 of every file of
                      the state; a folder without it is never loaded as a finished store

`write_store` is the one writer of these files, for every way a store is finished: a resumable
extraction (`cbir_tf.store.writer.StoreWriter`, whose chunks wait in ``parts/`` until then), a
merge of shards (`cbir_tf.store.shards.merge_shards`) and an image index (`cbir_tf.retriever`).
It writes them in the order listed, each atomically, ``COMPLETE`` last.

Committed states (a folder that is read while it is rewritten: an image index). The writer,
holding the folder's lock, builds the whole next state in ``staged/`` (`stage_folder`, then
`write_store` and any other files, then `seal`), lists it in the ``COMMIT`` journal and renames
it into place (`commit_staged`): ``COMPLETE`` is removed first and put back last, so the folder
reads as finished only when every file is of one state. A reader (`read_committed`) takes the
marker's identity (inode, time, bytes) before and after opening the files: equal, with no
journal either time, means every file it opened belongs to that one state (no rename of a file
happens while a marker stands); otherwise it opens them again, waiting at most `wait` seconds
for a commit in progress. Opened files stay valid after later renames (the old inodes live while
mapped), so a reader keeps its state for as long as it holds it. This was chosen over versioned
file names or a pointer to a generation folder because the folder's layout stays the one every
tool and earlier version reads, and over a read lock because readers need no write access and
cannot delay a writer.

Only a process holding the writer's lock (`cbir_tf.fileio.folder_lock`) finishes or discards a
commit (`recover`): a reader never deletes another process's files. A reader that finds the
journal of a writer that died (the lock is free) takes the lock itself before completing it.

This module is numpy-only: reading a store never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from cbir_tf.config import default
from cbir_tf.describe.extract import library_versions
from cbir_tf.fileio import (
    FileDamagedError,
    LockError,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    disk_full_message,
    file_sha256,
    folder_lock,
    fsync_dir,
    json_bytes,
    load_npy,
    lock_holder,
    read_json,
)
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
STAGED_DIR = "staged"  # the next state of a folder read while it is rewritten (`commit_staged`)
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


class StoreBusyError(StoreError):
    """A commit in progress did not finish within the time a reader waits for it."""


T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# The marker: the commit number and what each file of the state must be
# --------------------------------------------------------------------------------------------


def file_record(path: str) -> dict[str, Any]:
    """What COMPLETE records of a file: {'bytes': size, 'sha256': hex digest}."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's COMPLETE marker, or None when there is none.

    Raises:
      StoreCorruptError: the marker is damaged (truncated, not a JSON object); names the file.
    """
    path = os.path.join(os.fspath(directory), COMPLETE_FILE)
    try:
        return read_json(path, dict, "the store's COMPLETE marker")
    except FileNotFoundError:
        return None
    except FileDamagedError as e:
        raise StoreCorruptError(str(e)) from None


def committed_id(directory: str | os.PathLike) -> int | None:
    """The commit number of the folder's finished state (0: written before commits were
    numbered), or None when it has none or its marker cannot be read."""
    try:
        marker = read_marker(directory)
        return None if marker is None else int(marker.get("commit") or 0)
    except (StoreError, OSError, TypeError, ValueError):
        return None


def next_commit(directory: str | os.PathLike) -> int:
    """The number the folder's next commit gets: its current one plus one."""
    return (committed_id(directory) or 0) + 1


_UNCHECKED: set[str] = set()  # folders already reported as written before checksums


def check_recorded(
    directory: str | os.PathLike, marker: dict[str, Any], names: Iterable[str], full: bool = False
) -> None:
    """Checks files of a state against what its marker recorded at its commit.

    Args:
      directory: the folder.
      marker: its COMPLETE marker.
      names: the files to check (those the marker does not record are skipped).
      full: compare SHA-256 checksums too (reads every byte); else sizes only.

    Raises:
      StoreCorruptError: naming the first file that is missing or differs, and what to do.
    """
    directory = os.fspath(directory)
    files = marker.get("files")
    if not isinstance(files, dict):
        if directory not in _UNCHECKED:
            _UNCHECKED.add(directory)
            logger.info(
                "%s was written before checksums were recorded: only sizes and headers are "
                "checked until its next update", directory,
            )  # fmt: skip
        return
    for name in names:
        record = files.get(name)
        if not isinstance(record, dict):
            continue
        path = os.path.join(directory, name)
        problem = recorded_problem(path, record, full)
        if problem:
            raise StoreCorruptError(problem)


def recorded_problem(path: str, record: dict[str, Any], full: bool) -> str | None:
    """One line saying how the file at `path` differs from its record, or None when it agrees."""
    fix = "copy the folder again or rebuild it"
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path} is missing ({record.get('bytes')} bytes were committed); {fix}"
    if size != record.get("bytes"):
        return (
            f"{path} has {size} bytes, {record.get('bytes')} were committed: truncated or "
            f"altered; {fix}"
        )
    if full and file_sha256(path) != record.get("sha256"):
        return (
            f"{path} does not match the SHA-256 recorded at its commit: its bytes changed on "
            f"disk; {fix}"
        )
    return None


# --------------------------------------------------------------------------------------------
# Reading one committed state
# --------------------------------------------------------------------------------------------


def _marker_token(directory: str) -> tuple[int, int, bytes] | None:
    """(inode, modification time, bytes) of COMPLETE: which state stands now; None if none."""
    try:
        fd = os.open(os.path.join(directory, COMPLETE_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
        return st.st_ino, st.st_mtime_ns, data
    finally:
        os.close(fd)


def _journal(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, COMMIT_FILE))


def read_committed(
    directory: str | os.PathLike,
    read: Callable[[dict[str, Any]], T],
    *,
    wait: float = default("search.commit_wait"),
) -> T:
    """Runs `read(marker)` on one committed state of a folder (see the module docstring).

    Args:
      directory: the store or index folder.
      read: opens what the caller needs from the folder, given its COMPLETE marker; it is
        run again when a commit replaced files meanwhile.
      wait: seconds to wait for a commit in progress before giving up.

    Returns:
      What `read` returned for a state that stood, unchanged, while it ran.

    Raises:
      FileNotFoundError: no such folder.
      StoreIncompleteError: the folder holds no finished state (saying how to finish it).
      StoreBusyError: a commit in progress lasted more than `wait` seconds.
      Whatever `read` raised on a state that stood while it ran (a damaged file).
    """
    directory = os.fspath(directory)
    deadline = time.monotonic() + float(wait)
    pause = 0.005
    while True:
        token = None if _journal(directory) else _marker_token(directory)
        if token is not None:
            try:
                result, error = read(_parse_marker(directory, token[2])), None
            except (StoreError, OSError, ValueError) as e:
                result, error = None, e
            if not _journal(directory) and _marker_token(directory) == token:
                if error is not None:
                    raise error
                return result
        elif _journal(directory):
            _finish_abandoned_commit(directory)
        elif _marker_token(directory) is None:
            DescriptorStore(directory).require_complete()
        if time.monotonic() > deadline:
            holder = lock_holder(directory)
            raise StoreBusyError(
                f"{directory} is being updated"
                + (f" (process {holder} is committing a new state)" if holder else "")
                + f" and the commit did not finish within {wait:g} s; try again"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def _parse_marker(directory: str, data: bytes) -> dict[str, Any]:
    import json

    try:
        marker = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreCorruptError(
            f"{os.path.join(directory, COMPLETE_FILE)} (the store's COMPLETE marker) is damaged "
            f"({len(data)} bytes, not valid JSON: {' '.join(str(e).split())}); restore it from "
            "a copy or rebuild the folder"
        ) from None
    if not isinstance(marker, dict):
        raise StoreCorruptError(
            f"{os.path.join(directory, COMPLETE_FILE)} (the store's COMPLETE marker) is damaged: "
            f"it holds a JSON {type(marker).__name__}, not an object; rebuild the folder"
        )
    return marker


def _finish_abandoned_commit(directory: str) -> None:
    """Completes the journalled commit of a writer that died, once holding its lock.

    While the writer lives (its lock is held) nothing is done: the caller waits for it.
    """
    if lock_holder(directory) is not None:
        return
    try:
        with folder_lock(directory, what="this index"):
            if _journal(directory):
                logger.warning(
                    "completing the update of %s that its writer left in the middle of its "
                    "commit", directory,
                )  # fmt: skip
                finish_commit(directory)
    except LockError:
        return  # another process took the lock: it finishes the commit, or is the writer
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreIncompleteError(
                f"{directory}: an update stopped in the middle of its commit, and this process "
                f"cannot complete it ({e.strerror}); run the update again with write access"
            ) from None
        raise


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

    def require_complete(self) -> None:
        """Raises, saying how to finish it, unless the store holds a finished state.

        Raises:
          FileNotFoundError: no such folder.
          StoreIncompleteError: no COMPLETE marker.
        """
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"descriptor store {self.path} does not exist")
        if self.is_complete:
            return
        holder = lock_holder(self.path)
        running = f" (process {holder} is writing it now)" if holder else ""
        status = self.status()
        if status["chunks"]:
            raise StoreIncompleteError(
                f"descriptor store {self.path} is incomplete{running}: its extraction was "
                f"interrupted after {status['images_done']} images ({status['chunks']} saved "
                f"chunks in {self._file(PARTS_DIR)}). Run the same extraction command again "
                "with the same output folder to resume it; finished images are not recomputed."
            )
        raise StoreIncompleteError(
            f"{self.path} is not a finished descriptor store (no {COMPLETE_FILE} marker)"
            f"{running}: its extraction was interrupted before saving anything or is still "
            "running. Run the extraction again with this output folder to (re)start it."
        )

    def meta(self) -> dict[str, Any]:
        """The store's meta.json (requires a complete store)."""
        self.require_complete()
        return _read_store_json(self._file(META_FILE), dict, "the store's metadata")

    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of every image the extraction skipped, in input order."""
        self.require_complete()
        entries = _read_store_json(self._file(SKIPPED_FILE), list, "the skipped images")
        try:
            return [(d["id"], d["reason"]) for d in entries]
        except (TypeError, KeyError):
            raise StoreCorruptError(
                f"{self._file(SKIPPED_FILE)} is damaged: its entries are not "
                '{"id": ..., "reason": ...} objects; rebuild the store'
            ) from None

    def load(
        self,
        mmap: bool = True,
        *,
        full_check: bool = False,
        wait: float = default("search.commit_wait"),
    ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        """Loads the store's committed state (see `read_committed`).

        Args:
          mmap: memory-map descriptors.npy read-only instead of reading it into memory.
          full_check: compare every file's SHA-256 with its commit's (reads every byte); the
            sizes and the descriptors' header are always checked.
          wait: seconds to wait for a commit in progress.

        Returns:
          (descriptors float32 [N, D], ids list of N str, meta dict).

        Raises:
          StoreIncompleteError: no COMPLETE marker (interrupted extraction; message says how to
            resume).
          StoreCorruptError: a file is missing, damaged or disagrees with the marker (named).
        """
        return read_committed(
            self.path, lambda marker: self.load_committed(marker, mmap, full_check), wait=wait
        )

    def load_committed(
        self, marker: dict[str, Any], mmap: bool = True, full_check: bool = False
    ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        """Loads the files `marker` (this folder's COMPLETE, just read) describes.

        Only for `read_committed`'s `read`, which makes sure the files were of that state.
        """
        check_recorded(self.path, marker, STORE_FILES[:-1], full=full_check)
        meta = _read_store_json(self._file(META_FILE), dict, "the store's metadata")
        desc_path = self._file(DESCRIPTORS_FILE)
        size = os.path.getsize(desc_path)
        if size != marker.get("descriptors_bytes"):
            raise StoreCorruptError(
                f"{desc_path} has {size} bytes, {marker.get('descriptors_bytes')} were written; "
                "the store was damaged after extraction. Extract it again."
            )
        try:
            desc = load_npy(desc_path, mmap=mmap)
        except ValueError as e:
            raise StoreCorruptError(f"{desc_path} is damaged (its header: {e})") from None
        with open(self._file(IDS_FILE), "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreCorruptError(f"{self._file(IDS_FILE)} is damaged (not UTF-8)") from None
        ids = text.split("\n")[:-1] if text else []
        n, d = marker.get("num_images"), marker.get("dim")
        if desc.dtype != np.float32 or desc.ndim != 2 or desc.shape != (n, d):
            raise StoreCorruptError(
                f"{desc_path}: {desc.dtype} {desc.shape}, expected float32 {(n, d)}"
            )
        if len(ids) != n or ids_fingerprint(ids) != marker.get("ids_sha256"):
            raise StoreCorruptError(f"{self._file(IDS_FILE)} does not match the store's marker")
        if meta.get("num_images") != n or meta.get("dim") != d:
            raise StoreCorruptError(f"{self._file(META_FILE)} disagrees with {desc_path}")
        return desc, ids, meta


def _read_store_json(path: str, kind: type, what: str) -> Any:
    try:
        return read_json(path, kind, what)
    except FileDamagedError as e:
        raise StoreCorruptError(str(e)) from None


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


def store_bytes(num_images: int, dim: int, ids: Sequence[str] = ()) -> int:
    """About how many bytes a finished store of `num_images` rows of `dim` takes on disk."""
    return 4 * int(num_images) * int(dim) + sum(len(i) + 1 for i in ids) + 64 * 1024


def write_store(
    directory: str | os.PathLike,
    ids: Sequence[str],
    blocks: Iterable[tuple[int, np.ndarray]],
    *,
    dim: int,
    skipped: Sequence[tuple[str, str]],
    meta: dict[str, Any],
    files: dict[str, Any] | None = None,
    commit: int | None = None,
) -> dict[str, Any]:
    """Writes a finished store: descriptors.npy, ids.txt, skipped.json, meta.json, COMPLETE.

    Each file is written atomically, COMPLETE last (an existing one is removed first), so a
    folder is never read as finished while it is rewritten. COMPLETE records the commit number
    and every file's size and SHA-256. A folder read while it is rewritten (an index) is
    written in its `stage_folder` instead, then committed with `commit_staged`.

    Args:
      directory: the store folder (the caller holds its lock).
      ids: N row ids, in row order.
      blocks: (first row, float32 [b, D]) pairs covering rows 0..N-1 (see `stacked_blocks`).
      dim: D.
      skipped: (id, reason) of the images that could not be read.
      meta: how the descriptors were made; counts, `dim`, `created` (and `versions` when
        absent) are added.
      files: other JSON files written with the store, by name (an index's manifest.json).
      commit: the commit number (default: the folder's current one plus one).

    Returns:
      The COMPLETE marker written.

    Raises:
      OSError: a write failed (e.g. disk full); the folder is left without COMPLETE.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    commit = next_commit(directory) if commit is None else int(commit)
    n, d = len(ids), int(dim)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, COMPLETE_FILE))
    desc_path = os.path.join(directory, DESCRIPTORS_FILE)
    records = {DESCRIPTORS_FILE: _write_descriptors(desc_path, n, d, blocks)}
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
    contents: dict[str, bytes] = {
        IDS_FILE: "".join(i + "\n" for i in ids).encode("utf-8"),
        SKIPPED_FILE: json_bytes([{"id": i, "reason": r} for i, r in skipped]),
        META_FILE: json_bytes(meta),
        **{name: json_bytes(value) for name, value in (files or {}).items()},
    }
    for name, data in contents.items():
        atomic_write_bytes(os.path.join(directory, name), data)
        records[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker = {
        "num_images": n,
        "dim": d,
        "descriptors_bytes": records[DESCRIPTORS_FILE]["bytes"],
        "ids_sha256": ids_fingerprint(ids),
        "commit": commit,
        "checksum": "sha256",
        "files": records,
    }
    atomic_write_json(os.path.join(directory, COMPLETE_FILE), marker)
    return marker


def _write_descriptors(path: str, n: int, d: int, blocks) -> dict[str, Any]:
    """Writes float32 [n, d] as .npy from (first row, block) pairs; returns its record.

    Blocks arriving in row order are hashed as they are written; otherwise the file is read
    back once to hash it.
    """
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
    )
    digest = hashlib.sha256(head.getvalue())
    next_row, in_order = 0, True
    with atomic_open(path, "wb") as f:
        f.write(head.getvalue())
        offset = f.tell()
        row_bytes = 4 * d
        f.truncate(offset + n * row_bytes)
        for row, block in blocks:
            data = np.ascontiguousarray(block, dtype="<f4")
            f.seek(offset + int(row) * row_bytes)
            f.write(memoryview(data).cast("B"))
            if in_order and int(row) == next_row:
                digest.update(memoryview(data).cast("B"))
                next_row += data.shape[0]
            else:
                in_order = False
        f.seek(0, os.SEEK_END)
        size = f.tell()
    if in_order and next_row == n:
        return {"bytes": size, "sha256": digest.hexdigest()}
    return {"bytes": size, "sha256": file_sha256(path)}


# --------------------------------------------------------------------------------------------
# Committing a staged state (the caller holds the folder's lock)
# --------------------------------------------------------------------------------------------


def stage_folder(directory: str | os.PathLike) -> str:
    """A fresh, empty `staged/` folder in `directory`, where its next state is built."""
    staged = os.path.join(os.fspath(directory), STAGED_DIR)
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    return staged


def link_into(directory: str | os.PathLike, staged: str, names: Iterable[str]) -> None:
    """Puts the folder's current files `names` (those that exist) into `staged`, unchanged.

    Hard links cost nothing and are safe: every write replaces a file by renaming a new one
    over it, never rewrites it in place. A filesystem without hard links gets copies.
    """
    for name in names:
        src = os.path.join(os.fspath(directory), name)
        if not os.path.isfile(src):
            continue
        dst = os.path.join(staged, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def seal(staged: str, *, commit: int, changed: Iterable[str] = ()) -> dict[str, Any]:
    """Rewrites the staged state's COMPLETE: its commit number and the record of every file.

    Files the marker already records keep their record unless named in `changed` (the rest
    are hashed now).

    Returns:
      The marker written.
    """
    marker = read_marker(staged)
    if marker is None:
        raise StoreIncompleteError(f"{staged} holds no finished store to commit")
    files = dict(marker.get("files") or {})
    changed = set(changed)
    present = sorted(
        n
        for n in os.listdir(staged)
        if n != COMPLETE_FILE and not n.startswith(".") and os.path.isfile(os.path.join(staged, n))
    )
    for name in present:
        if name in changed or name not in files:
            files[name] = file_record(os.path.join(staged, name))
    marker.update(commit=int(commit), checksum="sha256", files={n: files[n] for n in present})
    atomic_write_json(os.path.join(staged, COMPLETE_FILE), marker)
    return marker


def commit_staged(directory: str | os.PathLike, remove: Iterable[str] = ()) -> None:
    """Replaces the folder's state by the sealed one in `staged/`, through the journal.

    Files of the old state that the new one lacks (the old marker's files, and `remove`) are
    deleted. A crash leaves the old state or, once `recover` ran, the new one.
    """
    directory = os.fspath(directory)
    staged = os.path.join(directory, STAGED_DIR)
    names = sorted(n for n in os.listdir(staged) if n != COMPLETE_FILE and not n.startswith("."))
    try:
        old = (read_marker(directory) or {}).get("files") or {}
    except StoreError:
        old = {}
    gone = sorted((set(old) | set(remove)) - set(names) - {COMPLETE_FILE})
    journal = {"staged": STAGED_DIR, "files": [*names, COMPLETE_FILE], "remove": gone}
    atomic_write_json(os.path.join(directory, COMMIT_FILE), journal)
    finish_commit(directory)


def finish_commit(directory: str | os.PathLike) -> None:
    """Moves every file the journal lists into place, COMPLETE last, then drops the journal.

    Idempotent: a commit cut short at any point is completed by running it again.
    """
    directory = os.fspath(directory)
    journal_path = os.path.join(directory, COMMIT_FILE)
    try:
        journal = read_json(journal_path, dict, "the journal of an update")
    except FileDamagedError as e:
        journal = _journal_from_staged(directory, e)
    staged = journal.get("staged")

    def source(name: str) -> str:
        # Journals of earlier versions staged `<name>.new` beside the files.
        return (
            os.path.join(directory, staged, name)
            if staged
            else os.path.join(directory, name + ".new")
        )

    names = [n for n in journal["files"] if n != COMPLETE_FILE] + [COMPLETE_FILE]
    # Without COMPLETE the folder reads as being committed, never as a mix of two states.
    if os.path.isfile(source(COMPLETE_FILE)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, COMPLETE_FILE))
        fsync_dir(directory)
    for name in names:
        if name == COMPLETE_FILE:
            for gone in journal.get("remove", []):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, gone))
        src, dst = source(name), os.path.join(directory, name)
        if not os.path.exists(src):
            continue
        if os.path.exists(dst) and os.path.samefile(src, dst):
            os.unlink(src)  # a file the state kept (a hard link of the same file)
        else:
            os.replace(src, dst)
    fsync_dir(directory)
    os.unlink(journal_path)
    fsync_dir(directory)
    if staged:
        shutil.rmtree(os.path.join(directory, staged), ignore_errors=True)


def _journal_from_staged(directory: str, error: Exception) -> dict[str, Any]:
    """The journal of a commit whose COMMIT file is damaged: what is left in staged/ moves in
    (files not yet moved are still there; only the list of files to delete is lost)."""
    staged = os.path.join(directory, STAGED_DIR)
    if not os.path.isdir(staged):
        raise StoreCorruptError(f"{error}; no {STAGED_DIR}/ folder is left to complete it")
    logger.warning("%s; completing the commit from %s", str(error).split(";")[0], staged)
    names = sorted(n for n in os.listdir(staged) if n != COMPLETE_FILE and not n.startswith("."))
    return {"staged": STAGED_DIR, "files": [*names, COMPLETE_FILE], "remove": []}


def recover(directory: str | os.PathLike, other_files: Sequence[str] = ()) -> bool:
    """Completes a journalled commit cut short, or discards one that never reached its journal.

    Only a process holding the folder's lock may call it: it deletes and renames the files of
    a commit in progress.

    Args:
      directory: the store folder (the caller holds its lock).
      other_files: names of the `files` that `write_store` wrote besides the store's own.

    Returns:
      Whether an interrupted commit was completed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return False
    if _journal(directory):
        logger.warning("completing an interrupted update of %s", directory)
        finish_commit(directory)
        return True
    shutil.rmtree(os.path.join(directory, STAGED_DIR), ignore_errors=True)
    for name in (*STORE_FILES, *other_files):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name + ".new"))
    return False


def write_error(error: OSError, path: str, needed: int | None, what: str) -> StoreWriteError:
    """The one-line StoreWriteError for a failed write of `path` (disk full: space needed)."""
    if error.errno == errno.ENOSPC:
        return StoreWriteError(errno.ENOSPC, disk_full_message(path, needed, what))
    return StoreWriteError(error.errno, f"could not write {path} ({what}): {error}")
