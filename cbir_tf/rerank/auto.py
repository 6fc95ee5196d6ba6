"""The `auto` re-ranking settings: chosen from the collection's own similarity graph (numpy).

α-QE, DBA and diffusion help when images come in groups (several views of one object or place,
the case they were designed for) and hurt when every image's neighbours are merely similar ones
(a class-level collection, a handful of photos): diffusion then spreads a query's score along
chains of look-alikes. What tells the two apart is how many neighbours each image has *above
the collection's own noise level*.

The noise level of an image is the tail of its similarities: between ranks `r1` and `r2`
(10 to 50; fewer in a collection of 100 images or fewer) the r-th largest similarity of an
image falls with log r, as the order statistics of a smooth distribution do
(s_r ≈ a - b log r, fitted per image by least squares). A neighbour above that line,
extrapolated to ranks 1 .. r1 - 1, by more than one unit of its slope b (about the similarity
gained from rank 2r to rank r) stands out from the noise: it is *significant*.
`collection_stats` counts the significant neighbours of a fixed sample of database images
(deterministic: the same collection gives the same numbers), and `auto_values` turns the
counts into settings:

- the collection has groups when at least `GROUPS_SHARE` of its images have a significant
  neighbour, and it has more than 100 images (fewer give too short a tail to fit the noise on,
  and a graph that links a large part of the collection): then diffusion runs on a mutual kNN
  graph of k = N / 40 neighbours (10 to 50), each query seeded by kq = 1 + the typical number
  of significant neighbours (the median over images that have some, at least 1), and α-QE
  adds the one nearest image (n = 1);
- without groups, α-QE is off (n = 0) and diffusion has no graph (k = 1): both return the
  plain ranking, which is what they are measured to be worth there;
- DBA averages each image with its 5 nearest (n = 5) in both cases (its mAP M was at or
  above plain's on every collection measured);
- truncation: the full graph below `graph_min_rows` images, each query's top `truncate_rows`
  from there (`search.ann.graph_min_rows`, `eval.distractor_truncate`).

The measurements behind the thresholds are in README ("Re-ranking: the auto settings") and
`benchmarks/results/rerank_auto_2cores.md`; `evaluate.py --tune` chooses settings for a
benchmark of your own instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.search.index import SearchIndex

__all__ = [
    "AUTO",
    "GROUPS_SHARE",
    "auto_values",
    "collection_entry",
    "collection_stats",
    "entry_matches",
    "noise_ranks",
]

AUTO = "auto"
# Share of images with a significant neighbour from which a collection counts as grouped:
# measured 0.29-0.35 on the instance-level benchmarks, 0-0.12 on the class-level ones.
GROUPS_SHARE = 0.2
# Collections of at most this many images never count as grouped (see the module docstring).
MIN_GROUPED_IMAGES = 100
SAMPLE = 2000  # images whose neighbours are counted (all of a smaller collection)
SEED = 0
DBA_N = 5


def noise_ranks(num_images: int) -> tuple[int, int] | None:
    """(r1, r2): the ranks whose similarities fit the noise line; None when too few images."""
    r2 = min(50, (num_images - 1) // 2)
    r1 = max(2, min(10, r2 // 3))
    return (r1, r2) if r2 - r1 >= 3 else None


def significant_counts(sims: np.ndarray, r1: int, r2: int) -> np.ndarray:
    """Significant neighbours of each image: above its noise line by more than its slope.

    Args:
      sims: float `[S, >= r2]` each image's similarities to its nearest others, descending
        (itself excluded).
      r1, r2: the ranks (1-based) the noise line s_r = a - b log r is fitted on.

    Returns:
      int64 `[S]`: how many of ranks 1 .. r1 - 1 lie above the line by more than b.
    """
    s = np.asarray(sims, np.float64)
    log_r = np.log(np.arange(1, r2 + 1, dtype=np.float64))
    x = log_r[r1 - 1 : r2]
    y = s[:, r1 - 1 : r2]
    xc = x - x.mean()
    slope = (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)  # -b per image
    b = np.maximum(-slope, 1e-12)
    a = y.mean(axis=1) + b * x.mean()
    line = a[:, None] - b[:, None] * log_r[None, : r1 - 1]
    return ((s[:, : r1 - 1] - line) > b[:, None]).sum(axis=1).astype(np.int64)


def collection_stats(
    database: np.ndarray,
    *,
    index: SearchIndex | None = None,
    sample: int = SAMPLE,
    seed: int = SEED,
    block_size: int = default("search.block_size"),
) -> dict[str, Any]:
    """What `auto_values` needs to know about a collection: its size and significant neighbours.

    Args:
      database: float `[N, D]` L2-normalised (memory maps are read in blocks).
      index: a prepared `SearchIndex` over `database` (reused; its backend searches).
      sample: images whose neighbours are counted (a fixed random subset; all when N is less).
      seed: of that subset.
      block_size: database rows per search block (without `index`).

    Returns:
      {'images': N, 'sampled', 'share' (of sampled images with a significant neighbour),
      'typical' (median count over those that have one; 0 when none), 'noise_ranks': [r1, r2]
      or None} (plain JSON types).
    """
    if index is None:
        index = SearchIndex(database, block_size=block_size, validate=False)
    n = int(index.ntotal)
    ranks = noise_ranks(n)
    out: dict[str, Any] = {"images": n, "sampled": 0, "share": 0.0, "typical": 0}
    out["noise_ranks"] = list(ranks) if ranks else None
    if ranks is None:
        return out
    rows = np.arange(n)
    if n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    queries = np.asarray(index.database[rows], np.float32)
    sims, ids = index.search(queries, ranks[1] + 1, validate=False)
    # Each image's list without itself (an exact duplicate elsewhere stays a neighbour).
    is_self = ids == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), ranks[1])
    keep = np.ones(ids.shape, bool)
    keep[np.arange(len(rows)), drop] = False
    sims = sims[keep].reshape(len(rows), ranks[1])
    # An approximate index may return short lists (padded with -inf): those images are left out.
    sims = sims[np.isfinite(sims).all(axis=1)]
    if not len(sims):
        return out
    counts = significant_counts(sims, *ranks)
    some = counts[counts > 0]
    out.update(
        sampled=int(len(sims)),
        share=round(float((counts > 0).mean()), 4),
        typical=int(np.median(some)) if some.size else 0,
    )
    return out


def auto_values(
    stats: dict[str, Any],
    *,
    graph_min_rows: int = default("search.ann.graph_min_rows"),
    truncate_rows: int = default("eval.distractor_truncate"),
) -> dict[str, dict[str, int]]:
    """The settings `auto` stands for, from `collection_stats`.

    Args:
      stats: `collection_stats`'s result.
      graph_min_rows: from this many images, diffusion is truncated ...
      truncate_rows: ... to each query's top `truncate_rows` images.

    Returns:
      {'qe': {'n'}, 'dba': {'n'}, 'diffusion': {'k', 'kq', 'truncate'}}.
    """
    n = int(stats["images"])
    grouped = n > MIN_GROUPED_IMAGES and float(stats["share"]) >= GROUPS_SHARE
    truncate = int(truncate_rows) if n >= int(graph_min_rows) else 0
    if grouped:
        diffusion = {"k": int(np.clip(n // 40, 10, 50)), "kq": 1 + max(1, int(stats["typical"]))}
        qe = 1
    else:
        diffusion = {"k": 1, "kq": 1}
        qe = 0
    return {
        "qe": {"n": qe},
        "dba": {"n": min(DBA_N, max(0, n - 1))},
        "diffusion": {**diffusion, "truncate": truncate},
    }


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a collection's ids in row order (what an index's saved entry is valid for)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode("utf-8") + b"\n")
    return h.hexdigest()


def collection_entry(
    database: np.ndarray,
    ids: Sequence[str],
    *,
    index: SearchIndex | None = None,
    graph_min_rows: int = default("search.ann.graph_min_rows"),
) -> dict[str, Any]:
    """What an index folder's manifest keeps (`rerank_auto`): the collection's stats and the
    values 'auto' resolved to, for the rows `ids` (so that searches do not change until the
    collection does).

    Returns:
      {'images', 'ids_sha256', 'stats': `collection_stats`, 'values': `auto_values`}.
    """
    stats = collection_stats(database, index=index)
    return {
        "images": len(ids),
        "ids_sha256": ids_digest(ids),
        "stats": stats,
        "values": auto_values(stats, graph_min_rows=graph_min_rows),
    }


def entry_matches(entry: Mapping[str, Any] | None, ids: Sequence[str]) -> bool:
    """Whether a saved `collection_entry` describes the collection of rows `ids`."""
    if not entry or int(entry.get("images", -1)) != len(ids):
        return False
    return entry.get("ids_sha256") == ids_digest(ids)
