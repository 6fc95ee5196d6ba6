"""Paths on other filesystems (gs://, s3://, hdfs://, ram://, ...), read through tf.io.gfile.

A path with a scheme (`<scheme>://...`) is not on the local disk: the Beam runner's workers on
Dataflow, Flink or Spark share no disk with the driver, so images and shard stores live on such
a filesystem. Local paths never come here (they keep the plain file API and its speed).
TensorFlow is imported only when a non-local path is used.

Stores are copied, never written in place, on those filesystems (`cbir_tf.store.copies`).
"""

from __future__ import annotations

import io
import os
import posixpath
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether `path` names a file on a filesystem other than the local disk (has a scheme)."""
    return path is not None and not isinstance(path, bytes) and bool(_SCHEME.match(os.fspath(path)))


def join(root: str, *parts: str) -> str:
    """`root`/parts with '/' separators (what every tf.io.gfile filesystem uses)."""
    return posixpath.join(root.rstrip("/"), *parts)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile, tf.errors


def gfile():
    """`tf.io.gfile`, the file API of every filesystem TensorFlow reads (imports TensorFlow)."""
    return _gfile()[0]


class RemoteFileError(OSError):
    """A non-local file that cannot be read; `reason` says why, in the local decoder's words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_image_file(path: str) -> io.BytesIO:
    """A non-local image file's bytes, checked as the decoder checks a local file.

    Raises:
      RemoteFileError: with the reason a local file would get ('file not found', 'is a folder,
        not an image file', 'empty file (0 bytes)', 'cannot read file: ...').
    """
    gfile, errors = _gfile()
    try:
        st = gfile.stat(path)
    except errors.NotFoundError:
        raise RemoteFileError("file not found") from None
    except errors.OpError as e:
        raise RemoteFileError(f"cannot read file: {e.message or type(e).__name__}") from None
    if st.is_directory:
        raise RemoteFileError("is a folder, not an image file")
    if st.length == 0:
        raise RemoteFileError("empty file (0 bytes)")
    try:
        with gfile.GFile(path, "rb") as f:
            return io.BytesIO(f.read())
    except errors.OpError as e:
        raise RemoteFileError(f"cannot read file: {e.message or type(e).__name__}") from None


def list_images(root: str, recursive: bool, exts: tuple[str, ...]) -> list[str]:
    """`cbir_tf.data.folder.list_images` for a non-local folder (same rules, same ids).

    Raises:
      FileNotFoundError / NotADirectoryError: `root` is missing or not a folder.
    """
    gfile, _ = _gfile()
    root = root.rstrip("/")
    if not gfile.exists(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not gfile.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is not a folder")
    found: list[str] = []
    for dirpath, _, filenames in gfile.walk(root):
        rel_dir = dirpath.rstrip("/")[len(root) :].strip("/")
        # gfile.walk has no pruning: hidden folders are skipped by their relative path.
        if any(part.startswith(".") for part in rel_dir.split("/") if part):
            continue
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            found.append(f"{rel_dir}/{name}" if rel_dir else name)
        if not recursive:
            break
    return sorted(found)


def remove_tree(url: str) -> None:
    """Removes the folder `url` and what it holds, if it exists."""
    gfile, _ = _gfile()
    if gfile.exists(url):
        gfile.rmtree(url)


def normpath(url: str) -> str:
    """`os.path.normpath` of a URL ('..' and '.' resolved), its `scheme://` kept."""
    scheme, rest = url.split("://", 1)
    rest = posixpath.normpath("/" + rest).lstrip("/") if rest else rest
    return f"{scheme}://{rest}"


def stat(url: str) -> tuple[int, int, bool]:
    """(size in bytes, modification time in ns, is a folder) of `url` (OSError if missing)."""
    gfile, errors = _gfile()
    try:
        st = gfile.stat(url)
    except errors.OpError as e:
        raise FileNotFoundError(2, e.message or "not found", url) from None
    return int(st.length), int(st.mtime_nsec), bool(st.is_directory)


def isdir(url: str) -> bool:
    """Whether `url` is a folder."""
    gfile, _ = _gfile()
    return bool(gfile.isdir(url))


def exists(url: str) -> bool:
    """Whether `url` exists."""
    gfile, _ = _gfile()
    return bool(gfile.exists(url))
