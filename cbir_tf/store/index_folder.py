"""An image index on disk: a descriptor store plus its manifest, its model and a pending batch.

An index folder IS a descriptor store (`cbir_tf.store.files`: descriptors.npy, ids.txt, meta.json,
skipped.json, COMPLETE), so every tool that reads stores reads indexes, plus:

    manifest.json   the collection root, how to rebuild the model (its config, or a `.keras`
                    file), and what is known about each indexed file (size and modification
                    time, to notice changes; unreadable files and why); the re-ranking settings
                    and, when some are 'auto', what they stand for for these rows
                    (`rerank_auto`, written into the staged state before it is sealed)
    model.keras     the model, when no reference can rebuild it (random weights, a learned
                    whitening, a weights file or `.keras` model outside the folder)
    pending.json    while indexing: the batch being added (ids, paths, stats, removals), saved
    pending/        before its extraction, which streams into the store `pending/` (resumable)
    staged/         while committing: the next state, whole (`cbir_tf.store.files.commit_staged`)

Every file of a state (the store, the manifest, the model, the approximate index) is written into
`staged/`, sealed in its COMPLETE marker (commit number, sizes, SHA-256) and moved into place
through the journal (`COMMIT`): a run killed during the renames is completed by the next
process that takes the folder's lock (`recover`); killed before, the old index stays and the
pending extraction resumes. Readers open one committed state (`open_index`) and never write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default, defaults
from cbir_tf.data.image_list import SHARD_FIELDS
from cbir_tf.fileio import FileDamagedError, atomic_write_json, read_json, require_space
from cbir_tf.store import files as store_lib
from cbir_tf.store.shards import merge_shards

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.keras"
PENDING_DIR = "pending"
PENDING_FILE = "pending.json"
FORMAT = "cbir_tf.index"
FORMAT_VERSION = 1


def is_index(directory: str) -> bool:
    """Whether `directory` holds an index (or the journal of one being written)."""
    return os.path.isfile(os.path.join(directory, MANIFEST_FILE)) or os.path.isfile(
        os.path.join(directory, store_lib.COMMIT_FILE)
    )


def refuse_plain_store(directory: str) -> None:
    """Refuses to turn a benchmark descriptor store (no manifest) into an index."""
    if is_index(directory) or not os.path.isdir(directory):
        return
    if any(
        os.path.exists(os.path.join(directory, n))
        for n in (store_lib.COMPLETE_FILE, store_lib.DESCRIPTORS_FILE, store_lib.PARTS_DIR)
    ):
        raise ValueError(
            f"{directory} holds a descriptor store that is not an image index (no "
            f"{MANIFEST_FILE}); write the index to another folder"
        )


def read_manifest(directory: str) -> dict[str, Any]:
    """The index's manifest.json; FileNotFoundError (saying how to build one) when absent."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} is not an image index (no {MANIFEST_FILE}); build one with "
            "`python extract.py --images=DIR --out=DIR` or Retriever.index(...).save(DIR)"
        )
    manifest = read_json(path, dict, "the index manifest")
    version = manifest.get("version", 0)
    if manifest.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise FileDamagedError(
            f"{path}: unsupported index format {manifest.get('format')!r} version "
            f"{version!r} (this toolkit reads {FORMAT} up to {FORMAT_VERSION})"
        )
    for key in ("model", "image_size", "scales", "ms_power"):
        if key not in manifest:
            raise FileDamagedError(f"{path} is damaged: it lacks {key!r}; rebuild the index")
    return manifest


@dataclasses.dataclass(frozen=True)
class IndexState:
    """One committed state of an index folder, opened whole (see `open_index`).

    Attributes:
      directory: the index folder.
      commit: its commit number (0: written before commits were numbered).
      manifest: manifest.json.
      descriptors: float32 [N, D], memory-mapped (valid after later commits replace the file).
      ids: the N row ids.
      meta: the store's meta.json.
      extra: what `open_index`'s `extra` returned for this state (the approximate index).
    """

    directory: str
    commit: int
    manifest: dict[str, Any]
    descriptors: np.ndarray
    ids: list[str]
    meta: dict[str, Any]
    extra: Any = None


def open_index(
    directory: str,
    *,
    extra: Callable[[np.ndarray, dict[str, Any]], Any] | None = None,
    full_check: bool = False,
    wait: float = default("search.commit_wait"),
) -> IndexState:
    """Opens the index folder's committed state: manifest, store and `extra`, all of one commit.

    A commit in progress is waited for (at most `wait` seconds); nothing is written, except by
    `cbir_tf.store.files.read_committed` completing the commit of a writer that died.

    Args:
      directory: the index folder.
      extra: opens more files of the state, given its descriptors and meta (run in the same
        window, so that they belong to the same commit).
      full_check: compare every file with its SHA-256 (reads every byte; sizes and headers are
        always checked).
      wait: seconds to wait for a commit in progress.

    Raises:
      FileNotFoundError: not an index folder.
      FileDamagedError, cbir_tf.store.files.StoreError: a damaged or unfinished index (named).
    """
    directory = os.path.abspath(os.fspath(directory))
    if not is_index(directory):
        read_manifest(directory)  # raises, saying how to build an index
    store = store_lib.DescriptorStore(directory)

    def read(marker: dict[str, Any]) -> IndexState:
        store_lib.check_recorded(directory, marker, (MANIFEST_FILE, MODEL_FILE), full=full_check)
        manifest = read_manifest(directory)
        desc, ids, meta = store.load_committed(marker, mmap=True, full_check=full_check)
        commit = int(marker.get("commit") or 0)
        if manifest.get("commit", commit) != commit:
            raise store_lib.StoreCorruptError(
                f"{os.path.join(directory, MANIFEST_FILE)} is of commit {manifest.get('commit')} "
                f"but the store of commit {commit}: the folder mixes two states; rebuild it"
            )
        more = extra(desc, meta) if extra is not None else None
        return IndexState(directory, commit, manifest, desc, ids, meta, more)

    return store_lib.read_committed(directory, read, wait=wait)


def update_manifest(directory: str, entries: Mapping[str, Any]) -> None:
    """Sets top-level entries of the manifest.json of an index's staged state (`begin_commit`;
    atomically, under the folder's lock): sealed with the state. An entry set to None is
    removed."""
    manifest = read_manifest(directory)
    for key, value in entries.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    atomic_write_json(os.path.join(directory, MANIFEST_FILE), manifest)


def load_model(directory: str, ref: Mapping[str, Any]) -> Any:
    """The model a manifest's `model` entry names: the folder's model.keras, a file, a config."""
    from cbir_tf.describe import models

    if ref.get("file"):
        return models.load_descriptor_model(os.path.join(directory, ref["file"]))
    if ref.get("kind") == "keras":
        if not os.path.isfile(ref["path"]):
            raise FileNotFoundError(
                f"the index's model {ref['path']} does not exist; pass model=... to "
                "Retriever.load (or --model to search.py)"
            )
        return models.load_descriptor_model(ref["path"])
    if ref.get("kind") == "config":
        # Fields an older manifest lacks take today's defaults.
        return models.build_descriptor_model(**{**defaults("model"), **dict(ref["config"])})
    raise ValueError(f"the index names no usable model ({dict(ref)}); pass model=...")


def begin_commit(directory: str) -> str:
    """The empty `staged/` folder the index's next state is written into (under the lock)."""
    return store_lib.stage_folder(directory)


def abandon_commit(directory: str) -> None:
    """Drops a staged state that will not be committed (a failed write): the old one stays.

    A state whose journal was written is left for `recover` to complete.
    """
    if not os.path.exists(os.path.join(directory, store_lib.COMMIT_FILE)):
        shutil.rmtree(os.path.join(directory, store_lib.STAGED_DIR), ignore_errors=True)


def restage(directory: str, staged: str, commit: int) -> None:
    """Stages the current state unchanged but for its commit number (before a change to some
    of its files, e.g. a rebuilt approximate index)."""
    marker = store_lib.read_marker(directory) or {}
    names = list(marker.get("files") or ()) or [
        *store_lib.STORE_FILES[:-1],
        MANIFEST_FILE,
        MODEL_FILE,
    ]
    store_lib.link_into(directory, staged, [*names, store_lib.COMPLETE_FILE])
    manifest = read_manifest(staged)
    manifest["commit"] = int(commit)
    atomic_write_json(os.path.join(staged, MANIFEST_FILE), manifest)


def commit_state(
    directory: str, commit_id: int, changed: Iterable[str] = (), remove: Iterable[str] = ()
) -> None:
    """Seals the staged state as commit `commit_id` and moves it into place (under the lock).

    Args:
      directory: the index folder.
      commit_id: the new state's commit number (`cbir_tf.store.files.next_commit`).
      changed: staged files written after its store (hashed again when sealing).
      remove: files of the current state to delete when the new one lacks them (besides those
        its marker lists).
    """
    staged = os.path.join(directory, store_lib.STAGED_DIR)
    store_lib.seal(staged, commit=commit_id, changed=[MANIFEST_FILE, *changed])
    store_lib.commit_staged(directory, remove=remove)


def write_index(
    staged: str,
    ids: Sequence[str],
    sources: Sequence[Any],
    *,
    dim: int,
    skipped: Sequence[tuple[str, str]],
    meta: Mapping[str, Any],
    manifest: Mapping[str, Any],
    block_rows: int,
    commit_id: int,
) -> None:
    """Writes an index's store and manifest into its staged folder (`begin_commit`), as the
    state of commit `commit_id`; `commit_state` then moves it into place.

    Args:
      staged: the index's staged folder.
      ids: the N row ids.
      sources: the rows, in order: arrays [n, D], or (array, row indices) pairs (see
        `cbir_tf.store.files.stacked_blocks`); memory holds one block of `block_rows` rows.
      dim: D.
      skipped: (id, reason) of the images that could not be read.
      meta: the store's meta.json.
      manifest: the index's manifest.json.
      block_rows: rows per block copied.
      commit_id: the commit number, recorded in the manifest and the marker.
    """
    store_lib.write_store(
        staged,
        ids,
        store_lib.stacked_blocks(sources, block_rows),
        dim=dim,
        skipped=list(skipped),
        meta=dict(meta),
        files={MANIFEST_FILE: {**dict(manifest), "commit": int(commit_id)}},
        commit=commit_id,
    )


def recover(directory: str) -> None:
    """Completes an index update cut short, or drops one never committed (under the lock; see
    `cbir_tf.store.files.recover`)."""
    store_lib.recover(directory, other_files=(MANIFEST_FILE,))


def save_pending(directory: str, pending: Mapping[str, Any]) -> None:
    """Saves the batch about to be extracted, so that a killed run resumes exactly this batch."""
    path = os.path.join(directory, PENDING_FILE)
    try:
        atomic_write_json(path, dict(pending))
    except OSError as e:
        raise store_lib.write_error(e, path, None, "the batch about to be indexed") from e


def read_pending(directory: str) -> dict[str, Any] | None:
    """The batch an interrupted run was indexing, or None (leftover staging is removed).

    A pending file that cannot be read as a batch (damaged, or of another version) is dropped
    with one warning: the images it named are found again by the next scan.
    """
    path = os.path.join(directory, PENDING_FILE)
    if not os.path.isfile(path):
        shutil.rmtree(os.path.join(directory, PENDING_DIR), ignore_errors=True)
        return None
    try:
        pending = read_json(path, dict, "the interrupted batch")
        lists = [pending[k] for k in ("ids", "paths", "stats", "remove")]
        if not all(isinstance(v, list) for v in lists) or len(set(map(len, lists[:3]))) > 1:
            raise FileDamagedError(f"{path} is damaged: its lists disagree")
    except (FileDamagedError, KeyError) as e:
        log.warning("%s; starting the indexing afresh", str(e).split("; ")[0])
        clear_pending(directory)
        return None
    return pending


def clear_pending(directory: str) -> None:
    """Drops the pending batch and its staging store (once committed, or replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, PENDING_FILE))
    shutil.rmtree(os.path.join(directory, PENDING_DIR), ignore_errors=True)


def merge_indexes(
    shard_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False
) -> str:
    """Joins index shards (from `build_index(..., num_shards=S)`) into one index folder.

    The descriptor stores are joined by `cbir_tf.store.shards.merge_shards` (which checks that they
    are the shards 0..S-1 of one collection, made with the same settings); the manifests are
    united (same root and model required).

    Args:
      shard_dirs: the shard index folders.
      out: the merged index folder.
      overwrite: replace an index already at `out`.

    Returns:
      `out` as an absolute path.

    Raises:
      ValueError: the shards index different collections or use different models.
    """
    out = os.path.abspath(os.fspath(out))
    manifests = [read_manifest(os.path.abspath(os.fspath(d))) for d in shard_dirs]
    first = manifests[0]
    for d, m in zip(shard_dirs, manifests, strict=True):
        for key in ("root", "image_size", "scales", "ms_power"):
            if m.get(key) != first.get(key):
                raise ValueError(
                    f"index shard {d} has {key}={m.get(key)!r}, the first shard "
                    f"{first.get(key)!r}: shards must index one collection with one model"
                )
        a = {k: v for k, v in m["model"].items() if k != "file"}
        b = {k: v for k, v in first["model"].items() if k != "file"}
        diffs = _differences(b, a, "model")
        if diffs:
            raise ValueError(
                f"index shard {d} uses another model than {shard_dirs[0]}: "
                + "; ".join(diffs)
                + "; merge the shards of one run (same settings and model)"
            )
    manifest = dict(first)
    for key in ("paths", "files", "failed"):
        manifest[key] = {}
        for m in manifests:
            manifest[key].update(m.get(key, {}))
    meta = dict(manifest.get("descriptor_meta", {}))
    for key in SHARD_FIELDS:
        meta.pop(key, None)
    manifest["descriptor_meta"] = meta
    commit_id = store_lib.next_commit(out)
    manifest["commit"] = commit_id
    manifest.pop("rerank_auto", None)  # counted on one shard's rows: not the merged index's
    model_file = first["model"].get("file")
    if model_file:
        source = os.path.join(os.fspath(shard_dirs[0]), model_file)
        os.makedirs(out, exist_ok=True)
        require_space(
            out, os.path.getsize(source), "the merged index's model"
        )  # the store: merge_shards
        try:
            shutil.copyfile(source, os.path.join(out, model_file))
        except OSError as e:
            raise store_lib.write_error(e, os.path.join(out, model_file), None, "its model") from e
    merge_shards(
        list(shard_dirs), out, overwrite=overwrite, files={MANIFEST_FILE: manifest},
        commit=commit_id,
    )  # fmt: skip
    if model_file:
        store_lib.seal(out, commit=commit_id, changed=[model_file])  # its checksum too
    return out


def _differences(a: Any, b: Any, where: str) -> list[str]:
    """'where.key (first: x, this: y)' for every leaf in which nested dicts `a`, `b` differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}")
        return out
    return [] if a == b else [f"{where} (first shard: {a!r}, this shard: {b!r})"]
