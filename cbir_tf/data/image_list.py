"""An image list as the toolkit stores it: unique single-line ids, cut into contiguous shards.

Ids are written one per line (a store's ids.txt), so they must be non-empty, hold no line break
and be unique. A collection is split into S contiguous, ordered shards (`shard_range`), so that
concatenating shards 0..S-1 gives back the original order; each shard records where it sits
(`shard_meta`, the `SHARD_FIELDS` of its meta.json) so that a merge can check and order them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# Fields describing which part of a collection a shard holds; they differ between shards.
SHARD_FIELDS = ("shard_index", "num_shards", "shard_start", "shard_stop", "total_images")


def id_problem(image_id: str) -> str | None:
    """Why `image_id` (a file's relative path) cannot be an image id, or None when it can.

    Ids are stored one per line of UTF-8 text (ids.txt), so a line break or a file name that is
    not UTF-8 (Python keeps its undecodable bytes as lone surrogates) cannot be one.
    """
    if not image_id:
        return "the id is empty"
    if "\n" in image_id or "\r" in image_id:
        return "its file name holds a line break; rename the file to index it"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "its file name is not valid UTF-8; rename the file to index it"
    return None


def printable_id(name: str) -> str:
    """A file name as one printable line: undecodable bytes as \\xNN, line breaks and other
    control characters escaped (\\n, \\r, \\t, \\xNN), everything else as it is."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def validate_ids(ids: Sequence[str]) -> list[str]:
    """The ids as strings; a ValueError naming the first empty, multi-line, non-UTF-8 or repeated
    one."""
    ids = [str(i) for i in ids]
    seen: set[str] = set()
    for i in ids:
        if id_problem(i):
            raise ValueError(
                f"image ids must be non-empty single-line UTF-8 strings, got {printable_id(i)!r}"
            )
        if i in seen:
            raise ValueError(f"duplicate image id {i!r}: ids must be unique")
        seen.add(i)
    return ids


def shard_range(num_items: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of `num_items` that shard `shard_index` handles.

    Shards are contiguous and in order (sizes differ by at most one), so concatenating the
    shards 0..num_shards-1 gives back the original order.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards), got shard_index={shard_index}, "
            f"num_shards={num_shards}"
        )
    return num_items * shard_index // num_shards, num_items * (shard_index + 1) // num_shards


def shard_meta(num_items: int, shard_index: int, num_shards: int) -> dict[str, int]:
    """The `SHARD_FIELDS` a shard records in its meta.json (checked and ordered by a merge).

    Args:
      num_items: images of the whole collection.
      shard_index: this shard (see `shard_range`).
      num_shards: how many shards the collection is split into.
    """
    lo, hi = shard_range(num_items, shard_index, num_shards)
    return {
        "shard_index": int(shard_index),
        "num_shards": int(num_shards),
        "shard_start": lo,
        "shard_stop": hi,
        "total_images": int(num_items),
    }
