"""Checking an index or store folder byte for byte against what its commit recorded.

Every finished store records, in its COMPLETE marker, the size and SHA-256 of each file of its
committed state (the descriptors, ids, metadata, an index's manifest, model and approximate
index: `cbir_tf.store.files.write_store`, `seal`); each chunk of an unfinished extraction holds
the SHA-256 of its arrays (`cbir_tf.store.writer`). `verify_folder` reads them all back (what
`extract.py --verify --out=DIR` runs) and names every file that differs: a flipped bit, swapped
rows, a truncated or missing file, a folder copied without its last files. Folders written
before checksums were recorded get the checks their marker allows (sizes, the descriptors'
header, the ids' fingerprint) and a note saying so.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

from cbir_tf.store import files as store_lib
from cbir_tf.store.index_folder import MANIFEST_FILE, read_manifest
from cbir_tf.store.writer import read_chunk

# Folders of the toolkit's own bookkeeping inside a store folder: never stores themselves.
_NOT_STORES = {store_lib.PARTS_DIR, store_lib.STAGED_DIR}


@dataclasses.dataclass
class Report:
    """What `verify_folder` found.

    Attributes:
      damaged: one line per damaged file (the path first, then what is wrong).
      notes: one line per folder checked less fully (written before checksums).
      files: files read.
      bytes: bytes read.
      seconds: time taken.
    """

    damaged: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self, folder: str) -> str:
        mb = self.bytes / 2**20
        speed = f", {mb / self.seconds:.0f} MB/s" if self.seconds > 0 else ""
        verdict = f"{len(self.damaged)} damaged" if self.damaged else "no damage found"
        return (
            f"{folder}: {self.files} files checked ({mb:.1f} MB in {self.seconds:.1f} s"
            f"{speed}): {verdict}"
        )


def store_folders(folder: str, depth: int = 3) -> Iterator[str]:
    """The store folders at or under `folder` (a finished marker, or chunks of a running or
    interrupted extraction), `depth` levels deep at most."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if names & {store_lib.COMPLETE_FILE, store_lib.COMMIT_FILE, store_lib.PARTS_DIR}:
        yield folder
    if depth <= 0:
        return
    for name in sorted(names - _NOT_STORES):
        path = os.path.join(folder, name)
        if not name.startswith(".") and os.path.isdir(path) and not os.path.islink(path):
            yield from store_folders(path, depth - 1)


def verify_folder(folder: str | os.PathLike) -> Report:
    """Checks every file of every store under `folder` (an index, a store, an extraction's
    output folder) against its recorded size and SHA-256.

    Raises:
      FileNotFoundError: `folder` does not exist, or holds no store.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist")
    report = Report()
    start = time.perf_counter()
    found = list(store_folders(folder))
    if not found:
        raise FileNotFoundError(
            f"{folder} holds no index or descriptor store (no {store_lib.COMPLETE_FILE} marker "
            f"or {store_lib.PARTS_DIR}/ folder in it or below it)"
        )
    for path in found:
        if os.path.exists(os.path.join(path, store_lib.COMMIT_FILE)):
            report.damaged.append(
                f"{os.path.join(path, store_lib.COMMIT_FILE)}: an update stopped in the middle "
                "of its commit; opening the index (search.py, Retriever.load) or its next "
                "update completes it"
            )
        elif os.path.exists(os.path.join(path, store_lib.COMPLETE_FILE)):
            _verify_finished(path, report)
        _verify_chunks(path, report)
    report.seconds = time.perf_counter() - start
    return report


def _verify_finished(path: str, report: Report) -> None:
    try:
        marker = store_lib.read_marker(path)
    except store_lib.StoreError as e:
        report.damaged.append(str(e))
        return
    files = marker.get("files")
    if isinstance(files, dict):
        for name, record in sorted(files.items()):
            file_path = os.path.join(path, name)
            problem = store_lib.recorded_problem(file_path, record, full=True)
            report.files += 1
            report.bytes += os.path.getsize(file_path) if os.path.isfile(file_path) else 0
            if problem:
                report.damaged.append(problem)
    else:
        report.notes.append(
            f"{path} was written before checksums were recorded: sizes, the descriptors' header "
            "and the ids were checked; its next update records checksums"
        )
    if any(line.startswith(path + os.sep) for line in report.damaged):
        return  # the damaged file is named; what follows from it would repeat it
    try:
        store_lib.DescriptorStore(path).load_committed(marker, mmap=True)
        if os.path.exists(os.path.join(path, MANIFEST_FILE)):
            read_manifest(path)
    except (store_lib.StoreError, OSError, ValueError) as e:
        report.damaged.append(" ".join(str(e).split()))


def _verify_chunks(path: str, report: Report) -> None:
    parts = os.path.join(path, store_lib.PARTS_DIR)
    for name in store_lib.DescriptorStore(path).chunk_files():
        chunk = os.path.join(parts, name)
        report.files += 1
        report.bytes += os.path.getsize(chunk)
        try:
            read_chunk(chunk)
        except store_lib.StoreCorruptError as e:
            report.damaged.append(f"{chunk}: {str(e).removeprefix('chunk ' + chunk).strip(': ')}")
