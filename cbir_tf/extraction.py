"""What `extract.py` runs: a benchmark's descriptors, an own folder's index, or a shard merge."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def _summary(label: str, result: Any, store_dir: str | None) -> str:
    lines = [
        f"{label}: {len(result.ids)} descriptors of dimension "
        f"{result.descriptors.shape[1] if len(result.ids) else 0}"
        + (f" in {store_dir}" if store_dir else "")
    ]
    if result.skipped:
        lines.append(f"  {len(result.skipped)} images skipped:")
        for image_id, reason in result.skipped[:20]:
            lines.append(f"    {image_id}: {reason}")
        if len(result.skipped) > 20:
            lines.append(f"    ... and {len(result.skipped) - 20} more (see skipped.json)")
    return "\n".join(lines)


def extract_dataset(
    cfg: Any,
    *,
    model_path: str | None = None,
    download: bool = True,
    progress: bool = True,
    image_size_explicit: bool = False,
) -> tuple[Any, Any]:
    """Extracts database and cropped-query descriptors of the config's benchmark.

    A saved model (`model_path`) describes images at the size it was trained at, unless
    `image_size_explicit` (the user set `data.image_size`).

    Returns:
      (database ExtractionResult, query ExtractionResult).
    """
    from cbir_tf import evaluation
    from cbir_tf.data import prepare, revisited

    ds = prepare.prepare_dataset(
        revisited.resolve_dataset_name(cfg.data.dataset),
        cfg.data.data_root,
        download=download,
        progress=progress,
    )
    db, qr, meta = evaluation.extract_benchmark(
        cfg,
        ds,
        model_path=model_path,
        download=download,
        progress=progress,
        shard_index=int(cfg.extract.shard_index),
        num_shards=int(cfg.extract.num_shards),
        image_size_explicit=image_size_explicit,
    )
    print(_summary(f"{ds.name} database", db, os.path.join(meta["store"], "db")))
    print(_summary(f"{ds.name} queries", qr, os.path.join(meta["store"], "queries")))
    return db, qr


def extract_folder(
    cfg: Any,
    images: str,
    out: str | None,
    *,
    model_path: str | None = None,
    download: bool = True,
    progress: bool = True,
    image_size_explicit: bool = False,
) -> Any:
    """Indexes a folder of images (recursively) into `out`, resuming an interrupted run.

    A saved model (`model_path`) describes images at the size it was trained at, unless
    `image_size_explicit` (the user set `data.image_size`).

    Returns:
      The `cbir_tf.retriever.Retriever` holding the index.
    """
    from cbir_tf import retriever

    if not out:
        raise ValueError("--out is needed with --images: the folder to write the index into")
    r = retriever.build_index(
        cfg,
        images,
        out,
        model_path=model_path,
        shard_index=int(cfg.extract.shard_index),
        num_shards=int(cfg.extract.num_shards),
        progress=progress,
        image_size_explicit=image_size_explicit,
    )
    return r


def merge(shards: Sequence[str], out: str | None) -> None:
    """Joins shard stores (or benchmark shard folders holding db/ and queries/) into `out`."""
    from cbir_tf import store

    if not out:
        raise ValueError("--out is needed with --merge: the folder of the merged store")
    if all(os.path.exists(os.path.join(s, "manifest.json")) for s in shards):
        from cbir_tf import retriever

        retriever.merge_indexes(list(shards), out)
    elif all(os.path.isdir(os.path.join(s, "db")) for s in shards):
        for part in ("db", "queries"):
            store.merge_shards([os.path.join(s, part) for s in shards], os.path.join(out, part))
            log.info("merged %d %s shards into %s", len(shards), part, os.path.join(out, part))
    else:
        store.merge_shards(list(shards), out)
        log.info("merged %d shards into %s", len(shards), out)
    print(f"merged {len(shards)} shards into {out}")
