"""An image index on disk: a descriptor store plus its manifest, its model and a pending batch.

An index folder IS a descriptor store (`cbir_tf.store`: descriptors.npy, ids.txt, meta.json,
skipped.json, COMPLETE), so every tool that reads stores reads indexes, plus:

    manifest.json   the collection root, how to rebuild the model (its config, or a `.keras`
                    file), and what is known about each indexed file (size and modification
                    time, to notice changes; unreadable files and why)
    model.keras     the model, when no reference can rebuild it (random weights, a learned
                    whitening, a weights file or `.keras` model outside the folder)
    pending.json    while indexing: the batch being added (ids, paths, stats, removals), saved
    pending/        before its extraction, which streams into the store `pending/` (resumable)

The store and the manifest are replaced together through `cbir_tf.store.write_store`'s journal
(`COMMIT`): a run killed during the renames is completed by the next open (`recover`); killed
before, the old index stays and the pending extraction resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from cbir_tf import store as store_lib
from cbir_tf.fileio import atomic_write_json

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


def load_model(directory: str, ref: Mapping[str, Any]) -> Any:
    """The model a manifest's `model` entry names: the folder's model.keras, a file, a config."""
    from cbir_tf import models

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
        return models.model_from_config(dict(ref["config"]))
    raise ValueError(f"the index names no usable model ({dict(ref)}); pass model=...")


def recover(directory: str) -> None:
    """Completes an index update cut short (see `cbir_tf.store.recover`)."""
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
