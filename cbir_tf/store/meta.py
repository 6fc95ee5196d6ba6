"""What a store's meta.json records, and when two stores' descriptors may be compared or joined.

Every store keeps how its descriptors were made (backbone, weights, pooling, whitening, scales,
image size, ...). Queries are searched against a database, and shards merged, only when those
fields agree (`check_compatible`); a resumed run must bring the same meta as the run it resumes
(`meta_differences`, ignoring the `VOLATILE_FIELDS`). Values are compared as JSON (`normalize`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from cbir_tf.fileio import json_safe

# Fields that say how descriptors were computed: two stores can only be compared (queries against
# a database, shards merged) when these agree. Some only matter for one pooling or backbone.
COMPATIBILITY_FIELDS = (
    "backbone",
    "alpha",
    "weights",
    "pooling",
    "gem_p",
    "rmac_levels",
    "whitening",
    "image_size",
    "scales",
    "ms_power",
    "dim",
)

# Fields that legitimately differ between an interrupted run and its resumption, or that are only
# known at the end of a run.
VOLATILE_FIELDS = ("created", "versions", "num_images", "num_skipped", "dim", "merged_from")


def normalize(obj: Any) -> Any:
    """JSON-normalises `obj` (tuples -> lists, numpy -> Python) so that equality is meaningful.

    Anything else (e.g. a Whitening object) is recorded by its description, never pickled.
    """
    return json_safe(obj, default=repr)


def _relevant(field: str, meta_a: dict, meta_b: dict) -> bool:
    """Whether `field` can change the descriptors given the rest of both metas."""
    if field == "gem_p":
        return meta_a.get("pooling") == "gem" or meta_b.get("pooling") == "gem"
    if field == "rmac_levels":
        return meta_a.get("pooling") == "rmac" or meta_b.get("pooling") == "rmac"
    if field == "alpha":
        return any(str(m.get("backbone", "")).startswith("mobilenet") for m in (meta_a, meta_b))
    if field == "ms_power":
        return any(len(normalize(m.get("scales")) or [1.0]) > 1 for m in (meta_a, meta_b))
    return True


def check_compatible(
    meta_a: dict, meta_b: dict, what_a: str = "first", what_b: str = "second"
) -> None:
    """Refuses to compare descriptors computed differently.

    Compares `COMPATIBILITY_FIELDS` (backbone, alpha, weights, pooling, gem_p, rmac_levels,
    whitening, image_size, scales, ms_power, dim). `gem_p` counts only for GeM pooling,
    `rmac_levels` only for R-MAC, `alpha` only for MobileNet backbones and `ms_power` only for
    multi-scale extraction, since elsewhere they do not change the descriptors. A field absent
    from both metas is equal; absent from one only, it differs.

    Args:
      meta_a: metadata of one store (e.g. the queries').
      meta_b: metadata of the other (e.g. the database's).
      what_a: name of the first store in the message.
      what_b: name of the second store in the message.

    Raises:
      ValueError: naming every differing field with both values.
    """
    a, b = normalize(dict(meta_a)), normalize(dict(meta_b))
    differing = []
    for field in COMPATIBILITY_FIELDS:
        if not _relevant(field, a, b):
            continue
        va, vb = a.get(field), b.get(field)
        if va != vb:
            differing.append(f"{field} ({what_a}: {va!r}, {what_b}: {vb!r})")
    if differing:
        raise ValueError(
            "descriptors were computed differently and cannot be compared; differing fields: "
            + "; ".join(differing)
            + ". Extract both with the same model settings."
        )


def meta_differences(stored: dict, new: dict, ignore: Iterable[str]) -> list[str]:
    """'field (stored: x, now: y)' for every field but `ignore` in which two metas differ."""
    ignore = set(ignore)
    stored, new = normalize(stored), normalize(new)
    keys = sorted((set(stored) | set(new)) - ignore)
    return [
        f"{k} (stored: {stored.get(k)!r}, now: {new.get(k)!r})"
        for k in keys
        if stored.get(k) != new.get(k)
    ]


def ids_fingerprint(ids: Sequence[str]) -> str:
    """sha256 of an ordered id list (one id per line, UTF-8)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
