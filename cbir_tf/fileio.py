"""Atomic file writes, checked JSON reads, free space, and an inter-process lock.

Every file the toolkit writes goes through here: the content is written to a temporary name
in the same folder, flushed to disk, then renamed over the target. A run killed at any point
leaves either the old file or the new one, never a half-written file that looks whole. Files
read back (`read_json`) name themselves when damaged; a write that would not fit says how much
space it needs (`require_space`, `disk_full_message`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (e.g. 0o022), read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only portable read is a set-and-restore, kept as short as possible.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a plain `open(path, 'w')` would give a new file: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def fsync_dir(path: str) -> None:
    """Flushes a folder's entries (renames, unlinks) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Opens a temporary file that replaces `path` only when the block exits without error.

    Args:
      path: final file name.
      mode: 'wb' or 'w' (text, UTF-8).

    Yields:
      A file object; on an exception the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; the result must get the user's usual permissions
        # (reports, indexes and stores are shared and served like any other file).
        os.fchmod(fd, new_file_mode())
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 `text` to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def json_bytes(obj: Any) -> bytes:
    """`obj` as the indented UTF-8 JSON text `atomic_write_json` writes (NaN written as null)."""
    return (json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically (NaN written as null)."""
    atomic_write_bytes(path, json_bytes(obj))


class FileDamagedError(ValueError):
    """A file the toolkit wrote cannot be read back as what it must hold (truncated, altered)."""


def read_json(path: str | os.PathLike, kind: type = dict, what: str = "") -> Any:
    """Reads a JSON file the toolkit wrote, naming it in one line when it is damaged.

    Args:
      path: the file.
      kind: the type the top-level value must have (dict, list).
      what: what the file is, for the message (e.g. 'the index manifest').

    Raises:
      FileNotFoundError: no such file.
      FileDamagedError: not valid JSON (truncated), or not a `kind`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    label = f"{path} ({what})" if what else path
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split())
        raise FileDamagedError(
            f"{label} is damaged ({len(data)} bytes, not valid JSON: {reason}); restore it from "
            "a copy or rebuild the folder"
        ) from None
    if not isinstance(value, kind):
        raise FileDamagedError(
            f"{label} is damaged: it holds a JSON {type(value).__name__}, not a JSON "
            f"{'object' if kind is dict else kind.__name__}; restore it from a copy or rebuild "
            "the folder"
        )
    return value


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """The SHA-256 (hex) of a file, read in blocks of `block` bytes."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged write may still use on the filesystem of `path` (None: unknown)."""
    path = os.fspath(path)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or ".")
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def human_bytes(nbytes: int) -> str:
    """A size for a message: '840 B', '12.5 KB', '3.4 MB', '1.2 GB' (powers of 1024)."""
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def disk_full_message(path: str | os.PathLike, needed: int | None, what: str = "") -> str:
    """One line for a write that found its disk full: the path, the space needed and free."""
    free = free_bytes(os.path.dirname(os.path.abspath(os.fspath(path))))
    need = f"about {human_bytes(needed)} needed" if needed else "more space needed"
    have = f", {human_bytes(free)} free" if free is not None else ""
    return (
        f"the disk is full writing {os.fspath(path)}{' (' + what + ')' if what else ''}: "
        f"{need}{have}; free some space and run the same command again"
    )


def require_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuses, before anything is written, a write of `needed` bytes that cannot fit.

    Raises:
      OSError: ENOSPC, with a one-line message naming `path`, the space needed and free.
    """
    free = free_bytes(path)
    if free is not None and needed > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough space for {what} in {os.fspath(path)}: about {human_bytes(needed)} "
            f"needed, {human_bytes(free)} free; free some space and run the same command again",
        )


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Saves named arrays as `.npz` atomically (never pickled)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Loads a `.npy` file without ever unpickling; `mmap=True` memory-maps it read-only."""
    return np.load(os.fspath(path), allow_pickle=False, mmap_mode="r" if mmap else None)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads every array of a `.npz` file without ever unpickling."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def json_safe(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON values: numpy arrays/scalars to Python, tuples to lists, paths to
    strings, NaN/Inf to None (strict JSON has neither).

    Args:
      obj: nested dicts / lists / tuples of values.
      default: applied to any other object (e.g. `repr`); None leaves it as it is.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, default) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), default)
    if isinstance(obj, np.generic):
        return json_safe(obj.item(), default)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)) or default is None:
        return obj
    return default(obj)


class LockError(RuntimeError):
    """Raised when another process holds the lock of a folder."""


LOCK_FILE = ".lock"


def lock_holder(folder: str | os.PathLike) -> int | None:
    """Whether a process holds `folder_lock(folder)` now: its pid (0 if unknown), else None.

    Probes without waiting and without creating anything (works on read-only folders); the
    probe holds the lock shared for an instant, which `folder_lock` tolerates.
    """
    lock_path = os.path.join(os.fspath(folder), LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never locked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "this folder") -> Iterator[None]:
    """Holds an exclusive, non-blocking lock on `folder` for the duration of the block.

    Two processes writing the same store would corrupt it; the second one is refused at once
    with a message naming the folder. The lock is released by the OS if the holder dies, and
    the `.lock` file it leaves is taken over by the next writer; a holder that leaves the block
    (normally or with an error) deletes the file, so that a finished folder holds none.

    Deleting a lock file is safe only because every taker checks, once it holds the lock, that
    the file it locked is still the one at `.lock`: a process that opened the file before the
    holder deleted it would otherwise lock a file nobody else can see, beside a new one.

    Raises:
      LockError: another process holds the lock.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    lock_path = os.path.join(folder, LOCK_FILE)
    fd = _take_lock(lock_path, folder, what)
    try:
        # The holder's pid only informs `lock_holder`: a full disk (the lock file is new, so
        # writing it needs a block) must not stop the writer, which reports the disk itself.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        # Deleted while still held: no other process can lock this file after this point.
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_path):
                os.unlink(lock_path)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _take_lock(lock_path: str, folder: str, what: str) -> int:
    """An open descriptor of `lock_path`, exclusively locked; LockError if another holds it."""
    # A reader probing the lock (`lock_holder`) holds it shared for microseconds: a writer
    # arriving in that instant waits for it instead of failing.
    deadline = time.monotonic() + 0.5
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() > deadline:
                raise LockError(
                    f"{folder} is being written by another process (lock file {lock_path}); "
                    f"wait for it to finish, or write {what} to another folder."
                ) from None
            time.sleep(0.02)
            continue
        if _same_file(fd, lock_path):
            return fd
        # The holder deleted the file between our open and our lock: lock the new one.
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
