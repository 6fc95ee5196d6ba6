"""Finished stores copied to and from another filesystem (gs://, s3://, ram://), COMPLETE last.

Stores are never written in place on such filesystems: a store is written on local disk with
`cbir_tf.store.writer` (atomic renames, which object stores lack), then its files are copied
with the COMPLETE marker last (`upload_store`), so a partial copy is never taken for a finished
store (`is_complete_store` reads the marker). TensorFlow (tf.io.gfile) is imported only here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cbir_tf import remote
from cbir_tf.store.files import COMPLETE_FILE, STORE_FILES


def is_complete_store(url: str) -> bool:
    """Whether the store at `url` was copied whole (its COMPLETE marker is there)."""
    gfile = remote.gfile()
    return gfile.exists(remote.join(url, COMPLETE_FILE))


def _store_files(names: Iterable[str]) -> list[str]:
    """A finished store's file names, the COMPLETE marker last (chunks and locks left out)."""
    return [n for n in STORE_FILES if n != COMPLETE_FILE and n in names] + [COMPLETE_FILE]


def upload_store(local_dir: str, url: str) -> None:
    """Copies a finished local store to `url`, COMPLETE last.

    What was at `url` goes first, its COMPLETE marker before the rest: a copy over an older
    file is not atomic everywhere (ram:// keeps the old file's tail), and no reader may take
    the old marker for the new files.
    """
    gfile = remote.gfile()
    if gfile.exists(url):
        if gfile.exists(remote.join(url, COMPLETE_FILE)):
            gfile.remove(remote.join(url, COMPLETE_FILE))
        gfile.rmtree(url)
    gfile.makedirs(url)
    for name in _store_files(os.listdir(local_dir)):
        gfile.copy(os.path.join(local_dir, name), remote.join(url, name), overwrite=True)


def download_store(url: str, local_dir: str) -> None:
    """Copies a finished store at `url` into the local folder `local_dir`, COMPLETE last."""
    gfile = remote.gfile()
    os.makedirs(local_dir, exist_ok=True)
    for name in _store_files(gfile.listdir(url)):
        gfile.copy(remote.join(url, name), os.path.join(local_dir, name), overwrite=True)
