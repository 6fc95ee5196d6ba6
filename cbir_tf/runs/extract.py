"""What `extract.py` runs: a config in, a benchmark's stores or an own collection's index out.

  * `extract_dataset`: a benchmark's database and query descriptors (`extract.py --dataset`);
  * `extract_folder` / `build_index`: an own image folder as an index (`extract.py --images`),
    shard by shard if asked; `merge`: joins shard stores or index shards (`--merge`);
  * `verify`: checks an index or store folder against its checksums (`--verify --out=DIR`);
  * `descriptor_spec`, `whitening_spec`, `extract_function`: the config's blocks as the
    arguments of `cbir_tf.evaluate.benchmark` and of the extraction's runner.

This is the run layer: it reads the config; the work itself lives in
`cbir_tf.evaluate.benchmark` (a benchmark's model and stores), `cbir_tf.retriever` (an index) and
`cbir_tf.store` (stores, shards, index folders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cbir_tf import config as config_lib
from cbir_tf import quiet
from cbir_tf.data.image_list import shard_meta
from cbir_tf.retriever import Retriever
from cbir_tf.search import ann as ann_lib
from cbir_tf.store import shards as shards_lib
from cbir_tf.store.collection import no_images_message
from cbir_tf.store.index_folder import merge_indexes

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


def descriptor_spec(cfg: Any, model_path: str | None = None) -> Any:
    """How the config describes images (`cbir_tf.evaluate.benchmark.DescriptorSpec`)."""
    from cbir_tf.evaluate.benchmark import DescriptorSpec

    data = config_lib.block(cfg, "data")
    return DescriptorSpec(
        model=config_lib.block(cfg, "model"),
        image_size=int(data["image_size"]),
        scales=tuple(float(s) for s in data["scales"]),
        ms_power=float(data["ms_power"]),
        model_path=os.fspath(model_path) if model_path else None,
    )


def whitening_spec(cfg: Any) -> Any:
    """The config's `whitening` block (`cbir_tf.evaluate.benchmark.WhiteningSpec`)."""
    from cbir_tf.evaluate.benchmark import WhiteningSpec

    return WhiteningSpec(**config_lib.block(cfg, "whitening"))


def extract_dataset(
    cfg: Any, *, model_path: str | None = None, download: bool = True, progress: bool = True
) -> tuple[Any, Any]:
    """Extracts database and cropped-query descriptors of the config's benchmark.

    Returns:
      (database ExtractionResult, query ExtractionResult).

    Raises:
      cbir_tf.config.ConfigError: a field configs/default.py lacks, or of another type.
    """
    config_lib.check_config(cfg)
    from cbir_tf.data import distractors, prepare
    from cbir_tf.evaluate import benchmark

    ds = prepare.open_benchmark(
        cfg.data.dataset, cfg.data.data_root, download=download, progress=progress
    )
    dset = distractors.open_distractors(
        cfg.data.get("distractors", ""), cfg.data.data_root, download=download, progress=progress
    )
    db, qr, meta = benchmark.extract_benchmark(
        ds, descriptor_spec(cfg, model_path), whitening_spec(cfg),
        data_root=cfg.data.data_root, workdir=cfg.workdir, out=cfg.extract.out,
        flush_every=int(cfg.extract.flush_every), download=download, progress=progress,
        shard_index=int(cfg.extract.shard_index), num_shards=int(cfg.extract.num_shards),
        distractors=dset, extract_fn=extract_function(cfg.extract),
    )  # fmt: skip
    print(_summary(f"{ds.name} database", db, os.path.join(meta["store"], "db")))
    print(_summary(f"{ds.name} queries", qr, os.path.join(meta["store"], "queries")))
    if dset is not None:
        d = meta["distractors"]
        print(
            f"{dset.title} distractors: {d['images']} descriptors in {d['store']}"
            + (f" ({d['skipped']} images skipped, see skipped.json)" if d["skipped"] else "")
        )
    return db, qr


def extract_folder(
    cfg: Any,
    images: str,
    out: str | None,
    *,
    model_path: str | None = None,
    progress: bool = True,
) -> Any:
    """Indexes a folder of images (recursively) into `out`, resuming an interrupted run.

    Returns:
      The `cbir_tf.retriever.Retriever` holding the index.
    """
    if not out:
        raise ValueError("--out is needed with --images: the folder to write the index into")
    return build_index(
        cfg,
        images,
        out,
        model_path=model_path,
        shard_index=int(cfg.extract.shard_index),
        num_shards=int(cfg.extract.num_shards),
        progress=progress,
    )


def merge(shards: Sequence[str], out: str | None) -> None:
    """Joins shard stores (or benchmark shard folders holding db/ and queries/) into `out`."""
    if not out:
        raise ValueError("--out is needed with --merge: the folder of the merged store")
    if all(os.path.exists(os.path.join(s, "manifest.json")) for s in shards):
        merge_indexes(list(shards), out)
    elif all(os.path.isdir(os.path.join(s, "db")) for s in shards):
        # A benchmark's shards (extract.py --out=partI): distractors too when extracted.
        extra = ("distractors",) if os.path.isdir(os.path.join(shards[0], "distractors")) else ()
        for part in ("db", "queries", *extra):
            parts = [os.path.join(s, part) for s in shards]
            shards_lib.merge_shards(parts, os.path.join(out, part))
            log.info("merged %d %s shards into %s", len(shards), part, os.path.join(out, part))
    else:
        shards_lib.merge_shards(list(shards), out)
        log.info("merged %d shards into %s", len(shards), out)
    print(f"merged {len(shards)} shards into {out}")


def verify(out: str | None) -> bool:
    """What `extract.py --verify --out=DIR` runs: checks every file of the index or store
    folder (and the stores below it) against its commit's checksums, printing one line per
    damaged file and a summary.

    Returns:
      Whether no file is damaged.
    """
    from cbir_tf.store.verify import verify_folder

    if not out:
        raise ValueError("--out is needed with --verify: the index or store folder to check")
    report = verify_folder(out)
    for line in report.notes:
        print(f"note: {line}")
    for line in report.damaged:
        print(f"damaged: {line}")
    print(report.summary(os.path.abspath(out)))
    return not report.damaged


def build_index(
    config: Any,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    extract_fn: Any = None,
) -> Retriever:
    """Indexes an image folder into `out` (what `extract.py --images=DIR --out=DIR` runs).

    Resumable: run it again after an interruption, or after adding images, and only new or
    changed files are described. With `num_shards` > 1 this call indexes the contiguous slice
    `shard_index` of the sorted file list (`cbir_tf.data.image_list.shard_range`) into its own
    `out`; `merge_indexes` joins the shard folders.

    Args:
      config: full config (model, data, extract, search, rerank blocks).
      images: the image folder (its sub-folders included); the collection root.
      out: the index folder.
      model_path: a `.keras` descriptor model to use instead of the config's model (it
        describes images at `data.image_size`).
      shard_index: which shard this call builds.
      num_shards: how many shards the collection is split into.
      progress: show progress.
      extract_fn: what describes the images (see `extract_function`); default: the one the
        config's `extract.runner` names.

    Returns:
      The Retriever, attached to `out`.
    """
    from cbir_tf.data.folder import list_images, read_image_list

    cfg = config_lib.as_dict(config)
    from cbir_tf.store.collection import absolute_path

    images = absolute_path(images)  # local, or a URL (gs://...) read through tf.io.gfile
    # Checked before a model is built or `out` created: a wrong folder fails at once.
    listed = read_image_list(images) if _is_list_file(images) else None
    if listed is None:
        rel = list_images(images, recursive=True)  # FileNotFoundError / NotADirectoryError
        if not rel:
            raise ValueError(no_images_message(images, recursive=True))
        paths = [f"{images}/{p}" if "://" in images else os.path.join(images, *p.split("/"))
                 for p in rel]  # fmt: skip
    else:
        # The root (ids are relative to it): the listed files' common folder, the same for
        # every shard of the list.
        paths, images = listed, _common_folder(listed)
    r = Retriever.from_config(config, model_path=model_path, directory=out, root=images)
    r.extract_fn = extract_fn or extract_function(cfg.get("extract", {}))
    if int(num_shards) <= 1:
        r.index(images if listed is None else paths, progress=progress)
        # Past the size threshold, an index without a usable approximate index gets one (e.g.
        # one built before they existed, a damaged one, or one of an earlier format);
        # `index` keeps it up to date afterwards.
        wanted = len(r) >= r.ann_settings.min_rows or ann_lib.exists(r.directory)
        if wanted and r.backend != "exact":
            current = r.approximate_index()
            if current is None or current.outdated:
                if current is not None:
                    log.warning(
                        "%s was saved by an earlier version (format 1: candidates re-scored from "
                        "the float store); rebuilding it within search.ann.bytes_per_vector=%g",
                        os.path.join(r.directory, ann_lib.INDEX_FILE),
                        r.ann_settings.bytes_per_vector,
                    )
                r.rebuild_ann()
        return r
    shard = shard_meta(len(paths), int(shard_index), int(num_shards))
    # Recorded in meta.json so that `shards.merge_shards` can check and order the shards.
    r.descriptor_meta.update(shard)
    r.index(paths[shard["shard_start"] : shard["shard_stop"]], progress=progress)
    return r


def _common_folder(paths: Sequence[str]) -> str:
    """The deepest folder holding every path (URLs compared part by part)."""
    if not any("://" in p for p in paths):
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    common = paths[0].rsplit("/", 1)[0].split("/")
    for p in paths[1:]:
        parts = p.rsplit("/", 1)[0].split("/")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def _is_list_file(images: str) -> bool:
    """Whether `--images` names a text file listing image paths (not a folder, not an image)."""
    from cbir_tf.store.collection import path_exists, path_isdir

    name = images.lower()
    listed = name.endswith((".txt", ".lst", ".list"))
    return listed and path_exists(images) and not path_isdir(images)


def extract_function(extract_cfg: Mapping[str, Any]) -> Any:
    """What describes images for the config's `extract.runner`: None = `descriptors.extract`.

    'beam' gives `cbir_tf.beam.extract.BeamExtractor.extract` (same arguments and result), set
    up from `extract.beam_options` and the other `extract.beam_*` fields.

    Raises:
      ValueError: an unknown runner.
    """
    block = config_lib.block({"extract": extract_cfg}, "extract")
    runner = str(block["runner"])
    if runner == "local":
        return None
    if runner == "beam":
        verbose = log.isEnabledFor(logging.DEBUG)
        try:  # imports apache_beam, which logs about absent Google Cloud clients: only when asked
            with quiet.filtered_stderr(quiet.BEAM_NOISE, enabled=not verbose):
                from cbir_tf.beam.extract import BeamExtractor
        except ImportError as e:
            raise ValueError(
                f"extract.runner='beam' needs Apache Beam ({e}): pip install 'cbir-tf[beam]'"
            ) from e

        return BeamExtractor(
            block["beam_options"],
            shard_images=block["beam_shard_images"],
            attempts=block["beam_attempts"],
            num_workers=block["beam_workers"],
            shard_dir=block["beam_shard_dir"],
        ).extract
    raise ValueError(f"unknown extract.runner {runner!r}; valid runners: 'local', 'beam'")
