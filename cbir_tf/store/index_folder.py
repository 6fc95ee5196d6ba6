"""An image index on disk: a descriptor store plus its manifest, its model and a pending batch.

An index folder IS a descriptor store (`cbir_tf.store.files`: descriptors.npy, ids.txt, meta.json,
skipped.json, COMPLETE), so every tool that reads stores reads indexes, plus:

    manifest.json   the collection root, how to rebuild the model (its config, or a `.keras`
                    file), and what is known about each indexed file (size and modification
                    time, to notice changes; unreadable files and why); the re-ranking settings
                    and, when some are 'auto', what they stand for for these rows
                    (`rerank_auto`, updated after the store by `update_manifest`)
    model.keras     the model, when no reference can rebuild it (random weights, a learned
                    whitening, a weights file or `.keras` model outside the folder)
    pending.json    while indexing: the batch being added (ids, paths, stats, removals), saved
    pending/        before its extraction, which streams into the store `pending/` (resumable)

The store and the manifest are replaced together through `cbir_tf.store.files.write_store`'s journal
(`COMMIT`): a run killed during the renames is completed by the next open (`recover`); killed
before, the old index stays and the pending extraction resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from cbir_tf.config import defaults
from cbir_tf.data.image_list import SHARD_FIELDS
from cbir_tf.fileio import atomic_write_json
from cbir_tf.store import files as store_lib
from cbir_tf.store.shards import merge_shards

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
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported index format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} (this toolkit reads {FORMAT} up to {FORMAT_VERSION})"
        )
    return manifest


def update_manifest(directory: str, entries: Mapping[str, Any]) -> None:
    """Sets top-level entries of an index's manifest.json (atomically; the caller holds the
    folder's lock). An entry set to None is removed."""
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


def write_index(
    directory: str,
    ids: Sequence[str],
    sources: Sequence[Any],
    *,
    dim: int,
    skipped: Sequence[tuple[str, str]],
    meta: Mapping[str, Any],
    manifest: Mapping[str, Any],
    block_rows: int,
) -> None:
    """Writes an index's store and manifest together, through the journal (the caller holds the
    folder's lock): a crash leaves the old index or, after `recover`, the new one.

    Args:
      directory: the index folder.
      ids: the N row ids.
      sources: the rows, in order: arrays [n, D], or (array, row indices) pairs (see
        `cbir_tf.store.files.stacked_blocks`); memory holds one block of `block_rows` rows.
      dim: D.
      skipped: (id, reason) of the images that could not be read.
      meta: the store's meta.json.
      manifest: the index's manifest.json.
      block_rows: rows per block copied.
    """
    store_lib.write_store(
        directory,
        ids,
        store_lib.stacked_blocks(sources, block_rows),
        dim=dim,
        skipped=list(skipped),
        meta=dict(meta),
        files={MANIFEST_FILE: dict(manifest)},
        journal=True,
    )


def recover(directory: str) -> None:
    """Completes an index update cut short (see `cbir_tf.store.files.recover`)."""
    store_lib.recover(directory, other_files=(MANIFEST_FILE,))


def save_pending(directory: str, pending: Mapping[str, Any]) -> None:
    """Saves the batch about to be extracted, so that a killed run resumes exactly this batch."""
    atomic_write_json(os.path.join(directory, PENDING_FILE), dict(pending))


def read_pending(directory: str) -> dict[str, Any] | None:
    """The batch an interrupted run was indexing, or None (leftover staging is removed)."""
    path = os.path.join(directory, PENDING_FILE)
    if not os.path.isfile(path):
        shutil.rmtree(os.path.join(directory, PENDING_DIR), ignore_errors=True)
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
    merge_shards(list(shard_dirs), out, overwrite=overwrite)
    manifest = dict(first)
    for key in ("paths", "files", "failed"):
        manifest[key] = {}
        for m in manifests:
            manifest[key].update(m.get(key, {}))
    meta = dict(manifest.get("descriptor_meta", {}))
    for key in SHARD_FIELDS:
        meta.pop(key, None)
    manifest["descriptor_meta"] = meta
    manifest.pop("rerank_auto", None)  # counted on one shard's rows: not the merged index's
    model_file = first["model"].get("file")
    if model_file:
        shutil.copyfile(
            os.path.join(os.fspath(shard_dirs[0]), model_file), os.path.join(out, model_file)
        )
    atomic_write_json(os.path.join(out, MANIFEST_FILE), manifest)
    return out


def _differences(a: Any, b: Any, where: str) -> list[str]:
    """'where.key (first: x, this: y)' for every leaf in which nested dicts `a`, `b` differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}")
        return out
    return [] if a == b else [f"{where} (first shard: {a!r}, this shard: {b!r})"]
