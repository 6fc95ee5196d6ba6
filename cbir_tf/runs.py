"""What the entry points run: extract a benchmark or a folder, build and merge indexes, search.

  * `extract_dataset`: a benchmark's database and query descriptors (`extract.py --dataset`);
  * `extract_folder` / `build_index`: an own image folder as an index (`extract.py --images`),
    shard by shard if asked; `merge` / `merge_indexes`: joins shard stores or index shards;
  * `run_search`: queries an index, prints the tables, writes HTML pages (`search.py`).

The scripts in `cbir_tf/commands/` parse flags and call one of these; `evaluate.py` calls
`cbir_tf.evaluation.run_benchmark`. The work itself lives in `cbir_tf.benchmark` (a benchmark's
model and stores), `cbir_tf.retriever` (an index) and `cbir_tf.store` (stores and shards).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cbir_tf import config as config_lib
from cbir_tf import index_folder
from cbir_tf import shards as shards_lib
from cbir_tf.collection import no_images_message
from cbir_tf.fileio import atomic_write_json
from cbir_tf.retriever import (
    Retriever,
    SearchResult,
    check_k,
    format_results,
)
from cbir_tf.store import SHARD_FIELDS

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
    from cbir_tf import benchmark
    from cbir_tf.data import distractors, prepare

    ds = prepare.open_benchmark(
        cfg.data.dataset, cfg.data.data_root, download=download, progress=progress
    )
    dset = distractors.open_distractors(
        cfg.data.get("distractors", ""), cfg.data.data_root, download=download, progress=progress
    )
    db, qr, meta = benchmark.extract_benchmark(
        cfg,
        ds,
        shard_index=int(cfg.extract.shard_index),
        num_shards=int(cfg.extract.num_shards),
        model_path=model_path,
        image_size_explicit=image_size_explicit,
        download=download,
        progress=progress,
        distractors=dset,
        extract_fn=extract_function(cfg.extract),
    )
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
    if not out:
        raise ValueError("--out is needed with --images: the folder to write the index into")
    r = build_index(
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


def build_index(
    config: Any,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    image_size_explicit: bool = False,
    extract_fn: Any = None,
) -> Retriever:
    """Indexes an image folder into `out` (what `extract.py --images=DIR --out=DIR` runs).

    Resumable: run it again after an interruption, or after adding images, and only new or
    changed files are described. With `num_shards` > 1 this call indexes the contiguous slice
    `shard_index` of the sorted file list (`cbir_tf.shards.shard_range`) into its own `out`;
    `merge_indexes` joins the shard folders.

    Args:
      config: full config (model, data, extract, search, rerank blocks).
      images: the image folder (its sub-folders included); the collection root.
      out: the index folder.
      model_path: a `.keras` descriptor model to use instead of the config's model.
      shard_index: which shard this call builds.
      num_shards: how many shards the collection is split into.
      progress: show progress.
      image_size_explicit: the user set `data.image_size`: a `model_path` model then describes
        images at that size instead of the size it was trained at.
      extract_fn: what describes the images (see `extract_function`); default: the one the
        config's `extract.runner` names.

    Returns:
      The Retriever, attached to `out`.
    """
    from cbir_tf.data.folder import list_images, read_image_list

    cfg = config_lib.as_dict(config)
    from cbir_tf.collection import absolute_path

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
    if model_path:
        data, search_cfg = config_lib.block(cfg, "data"), config_lib.block(cfg, "search")
        r = Retriever.from_model(
            model_path,
            image_size=int(data["image_size"]) if image_size_explicit else None,
            scales=tuple(data["scales"]),
            ms_power=float(data["ms_power"]),
            directory=out,
            root=images,
            rerank=cfg.get("rerank"),
            flush_every=int(config_lib.block(cfg, "extract")["flush_every"]),
            backend=str(search_cfg["backend"]),
            ann=search_cfg["ann"],
        )
    else:
        r = Retriever.from_config(config, directory=out, root=images)
    r.extract_fn = extract_fn or extract_function(cfg.get("extract", {}))
    if int(num_shards) <= 1:
        r.index(images if listed is None else paths, progress=progress)
        # Past the size threshold, an index without a usable approximate index gets one (e.g.
        # one built before they existed); `index` keeps it up to date afterwards.
        if len(r) >= r.ann_settings.min_rows and r.backend != "exact":
            if r.approximate_index() is None:
                r.rebuild_ann()
        return r
    shard = shards_lib.shard_meta(len(paths), int(shard_index), int(num_shards))
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
    from cbir_tf.collection import _exists, _isdir

    name = images.lower()
    return name.endswith((".txt", ".lst", ".list")) and _exists(images) and not _isdir(images)


def extract_function(extract_cfg: Mapping[str, Any]) -> Any:
    """What describes images for the config's `extract.runner`: None = `descriptors.extract`.

    'beam' gives `cbir_tf.beam_extract.BeamExtractor.extract` (same arguments and result), set
    up from `extract.beam_options` and the other `extract.beam_*` fields.

    Raises:
      ValueError: an unknown runner.
    """
    runner = str(extract_cfg.get("runner", "local"))
    if runner == "local":
        return None
    if runner == "beam":
        try:
            from cbir_tf import beam_extract  # imports apache_beam: only when asked for
        except ImportError as e:
            raise ValueError(
                f"extract.runner='beam' needs Apache Beam ({e}): pip install 'cbir-tf[beam]'"
            ) from e

        return beam_extract.BeamExtractor.from_config(extract_cfg).extract
    raise ValueError(f"unknown extract.runner {runner!r}; valid runners: 'local', 'beam'")


def merge_indexes(
    shard_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False
) -> str:
    """Joins index shards (from `build_index(..., num_shards=S)`) into one index folder.

    The descriptor stores are joined by `cbir_tf.shards.merge_shards` (which checks that they
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
    manifests = [index_folder.read_manifest(os.path.abspath(os.fspath(d))) for d in shard_dirs]
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
    shards_lib.merge_shards(list(shard_dirs), out, overwrite=overwrite)
    manifest = dict(first)
    for key in ("paths", "files", "failed"):
        manifest[key] = {}
        for m in manifests:
            manifest[key].update(m.get(key, {}))
    meta = dict(manifest.get("descriptor_meta", {}))
    for key in SHARD_FIELDS:
        meta.pop(key, None)
    manifest["descriptor_meta"] = meta
    model_file = first["model"].get("file")
    if model_file:
        shutil.copyfile(
            os.path.join(os.fspath(shard_dirs[0]), model_file), os.path.join(out, model_file)
        )
    atomic_write_json(os.path.join(out, index_folder.MANIFEST_FILE), manifest)
    return out


def _differences(a: Any, b: Any, where: str) -> list[str]:
    """'where.key (first: x, this: y)' for every leaf in which nested dicts `a`, `b` differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}")
        return out
    return [] if a == b else [f"{where} (first shard: {a!r}, this shard: {b!r})"]


def run_search(
    index_dir: str | os.PathLike,
    query: str | os.PathLike,
    *,
    k: int = 10,
    rerank: str = "none",
    out: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    recursive: bool = True,
    embed: bool = False,
    stream: Any = None,
    exact: bool = False,
) -> list[tuple[str, list[SearchResult]]]:
    """What `search.py` runs: searches an index, prints ranked tables, writes HTML and PNGs.

    Args:
      index_dir: an index folder (extract.py --images, or `Retriever.save`).
      query: an image file, or a folder of query images (one result page per image).
      k: results per query.
      rerank: a method of `pipeline.METHODS` ('none', 'aqe', 'diffusion', ...).
      out: folder for `<query>.html` pages, `<query>.png` grids (and `index.html` for several
        queries); None writes nothing.
      model: a `.keras` model replacing the one the index names.
      root: the collection root, when the images moved since indexing.
      recursive: scan sub-folders of a query folder.
      embed: embed images in the pages as base64.
      stream: where tables are printed (default sys.stdout).
      exact: exact search even when the index folder holds an approximate index.

    Returns:
      [(query path, results)] in query order.
    """
    from cbir_tf.data.folder import list_images

    check_k(k)
    stream = sys.stdout if stream is None else stream
    query = os.path.expanduser(os.fspath(query))
    if os.path.isdir(query):
        queries = [os.path.join(query, *p.split("/")) for p in list_images(query, recursive)]
        if not queries:
            raise ValueError(f"no images found in the query folder {query}")
    elif os.path.isfile(query):
        queries = [query]
    else:
        raise FileNotFoundError(f"query {query} does not exist")
    retriever = Retriever.load(
        index_dir, model=model, root=root, **({"backend": "exact"} if exact else {})
    )
    all_results = retriever.search_batch(queries, k=k, rerank=rerank)
    approximate = retriever.approximate_index()
    if approximate is not None:
        # How far the approximate index may differ from exact search, measured when built.
        stream.write(approximate.describe() + "\n\n")
    pairs = list(zip(queries, all_results, strict=True))
    for q, results in pairs:
        stream.write(format_results(results, title=f"query: {q}") + "\n")
    if out:
        from cbir_tf import pages as html_pages

        meta = {
            "index": os.path.abspath(os.fspath(index_dir)),
            "images indexed": len(retriever),
            "k": k,
            "rerank": rerank,
        }
        written = html_pages.write_search_report(out, pairs, meta=meta, embed=embed)
        main_page = written["index"] or written["pages"][0]
        stream.write(f"results page: {main_page}\n")
    return pairs
