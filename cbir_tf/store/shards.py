"""Shards of a collection, extracted apart, merged back into one store.

`cbir_tf.data.image_list.shard_range` splits N images into S contiguous, ordered slices; each
shard's store records where it sits (`shard_meta`: the `SHARD_FIELDS` of its meta.json), so that
`merge_shards` can refuse anything but exactly the shards 0..S-1 of one split made with one
model, and join them in the original image order through `cbir_tf.store.files.write_store`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from cbir_tf.data.image_list import SHARD_FIELDS, shard_meta
from cbir_tf.fileio import folder_lock, require_space
from cbir_tf.store.files import (
    STORE_FILES,
    DescriptorStore,
    StoreMismatchError,
    stacked_blocks,
    store_bytes,
    write_error,
    write_store,
)
from cbir_tf.store.meta import VOLATILE_FIELDS, check_compatible, meta_differences


def _check_shard_set(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
    """Refuses anything but exactly the shards 0..S-1 of one split, naming what is wrong.

    Args:
      paths: the shard folders, in the order of `metas` (sorted by shard_index).
      metas: their meta.json contents, each with `shard_index` and `num_shards`.

    Raises:
      StoreMismatchError: mixed splits, a shard given twice, or missing shards.
    """
    num = sorted({m.get("num_shards") for m in metas}, key=str)
    if len(num) > 1:
        parts = ", ".join(f"{p}: {m.get('num_shards')}" for p, m in zip(paths, metas, strict=True))
        raise StoreMismatchError(
            f"the shards come from different splits (num_shards {parts}); merge the shards of "
            "one run"
        )
    total = num[0]
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise StoreMismatchError(f"the shards record no valid num_shards ({total!r})")
    indices = [m["shard_index"] for m in metas]
    for i in sorted(set(indices)):
        if indices.count(i) > 1:
            twice = [p for p, j in zip(paths, indices, strict=True) if j == i]
            raise StoreMismatchError(f"shard {i} is given more than once: {', '.join(twice)}")
    outside = [i for i in indices if not (isinstance(i, int) and 0 <= i < total)]
    if outside:
        raise StoreMismatchError(f"shard indices {outside} are not in 0..{total - 1} of {total}")
    missing = [i for i in range(total) if i not in indices]
    if missing:
        which = "shard " + str(missing[0]) if len(missing) == 1 else f"shards {missing}"
        raise StoreMismatchError(
            f"{which} of {total} missing: got shards {indices} ({', '.join(paths)}); merge all "
            f"{total} shards of the run"
        )


def merge_shards(
    shard_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    overwrite: bool = False,
    *,
    files: dict[str, Any] | None = None,
    commit: int | None = None,
) -> DescriptorStore:
    """Joins complete shard stores into one store, in shard order.

    The shards must all be complete, agree on every metadata field except the shard fields
    (`SHARD_FIELDS`) and per-run ones (created, versions, counts), hold no id twice, and — when
    they record shard fields — be exactly the shards 0..S-1 of one split, contiguous and
    covering the whole collection. They are joined in `shard_index` order (the given order when
    the shards record none), which is the original image order (see `shard_range`).

    Args:
      shard_dirs: the shard store folders.
      out: the merged store folder (must not hold a complete store unless `overwrite`).
      overwrite: replace a complete store at `out`.
      files: other JSON files written with the store (`write_store`'s; an index manifest).
      commit: the merged store's commit number (default: the folder's next).

    Returns:
      The merged store.

    Raises:
      StoreIncompleteError, StoreMismatchError, ValueError, FileExistsError: as described.
      StoreWriteError: a write failed (disk full: the path and the space needed).
    """
    if not shard_dirs:
        raise ValueError("merge_shards needs at least one shard")
    stores = [DescriptorStore(p) for p in shard_dirs]
    loaded = [(s, *s.load(mmap=True)) for s in stores]
    if all("shard_index" in m for _, _, _, m in loaded):
        loaded.sort(key=lambda t: t[3]["shard_index"])
        _check_split([s.path for s, _, _, _ in loaded], [m for _, _, _, m in loaded])
    _check_same_settings(loaded)
    all_ids = [i for _, _, ids, _ in loaded for i in ids]
    skipped = [sk for s, _, _, _ in loaded for sk in s.skipped()]
    seen: set[str] = set()
    for i in all_ids + [i for i, _ in skipped]:
        if i in seen:
            raise StoreMismatchError(f"image id {i!r} appears in more than one shard")
        seen.add(i)
    out_store = DescriptorStore(out)
    out_path = out_store.path
    if os.path.abspath(out_path) in {os.path.abspath(s.path) for s in stores}:
        raise ValueError("the merged store must go to a folder other than the shards'")
    metas = [m for _, _, _, m in loaded]
    meta = dict(metas[0])
    meta.update(shard_meta(metas[-1].get("total_images", len(all_ids) + len(skipped)), 0, 1))
    meta["merged_from"] = [os.path.abspath(s.path) for s, _, _, _ in loaded]
    dim = max(int(m.get("dim") or 0) for m in metas)
    needed = store_bytes(len(all_ids), dim, all_ids)
    with folder_lock(out_path, what="the merged store"):
        if out_store.is_complete and not overwrite:
            raise FileExistsError(f"{out_path} already holds a complete store")
        require_space(out_path, needed, "the merged store")
        try:
            write_store(
                out_path,
                all_ids,
                stacked_blocks(desc for _, desc, _, _ in loaded),
                dim=dim,
                skipped=skipped,
                meta=meta,
                files=files,
                commit=commit,
            )
        except OSError as e:
            # Nothing half-written stays behind: the merge is run again once space is freed.
            _drop_partial(out_path)
            raise write_error(e, out_path, needed, "the merged store") from e
    return out_store


def _drop_partial(path: str) -> None:
    """Removes the store files an interrupted merge wrote (there is no COMPLETE marker)."""
    for name in STORE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))


def _check_split(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
    """Refuses shards (sorted by shard_index) that are not one contiguous, whole split."""
    _check_shard_set(paths, metas)
    for prev, cur in zip(metas, metas[1:], strict=False):
        if prev.get("shard_stop") != cur.get("shard_start"):
            raise StoreMismatchError(
                f"shards {prev['shard_index']} and {cur['shard_index']} are not contiguous"
            )
    first, last = metas[0], metas[-1]
    if first.get("shard_start", 0) != 0 or last.get("shard_stop") != last.get(
        "total_images", last.get("shard_stop")
    ):
        raise StoreMismatchError("the shards do not cover the whole collection")


def _check_same_settings(loaded: Sequence[tuple[DescriptorStore, Any, Any, dict]]) -> None:
    """Refuses shards whose descriptors were made with other settings than the first's."""
    ignore = set(SHARD_FIELDS) | set(VOLATILE_FIELDS)
    first_store, first_meta = loaded[0][0], loaded[0][3]
    for s, _, _, m in loaded[1:]:
        diffs = meta_differences(first_meta, m, ignore)
        if diffs:
            raise StoreMismatchError(
                f"shard {s.path} was made with other settings than {first_store.path}: "
                + "; ".join(diffs)
            )
        # A shard whose images were all skipped has no dimension to compare.
        a, b = dict(first_meta), dict(m)
        if not a.get("num_images") or not b.get("num_images"):
            a.pop("dim", None), b.pop("dim", None)
        check_compatible(a, b, first_store.path, s.path)
