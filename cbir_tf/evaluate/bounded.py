"""Rankings over a database of a million images in bounded memory (numpy).

The benchmark with distractors (`evaluate.py --distractors=r1m`) ranks some 10^6 images for
each query. A full ranking `[Q, N]` (and its float scores) would cost gigabytes per method, and
the metrics need far less: the Revisited Oxford/Paris mAP and mP@k depend only on the positions
of each query's positives and ignored (junk) images in its ranking (`cbir_tf.evaluate.metrics`).
So a method here yields a `PartialRanking`: the first `top` ids of each full ranking (for the result
grids and the methods that re-rank the top) and the exact position of every ground-truth id in
the full ranking, computed in one blocked pass over the database without sorting it:

  position of j = #{i : s_i > s_j} + #{i : s_i = s_j, i < j}

which is where a stable descending sort (ties by lower id, the rule of `cbir_tf.search.exact`) puts
it. The scores come from the same blocked float32 products as `search.rank_all`, so the
positions, and the metrics computed from them, equal those of the full ranking to the last bit
(tests/test_distractors.py checks it).

Methods: plain inner products; α-QE (its neighbours from the plain pass, then a second pass
with the expanded queries); truncated diffusion (each query's top n diffused, the rest in the
order of the search it started from, exactly as `diffusion.diffusion_scores(truncate=n)`
orders them). Database-side augmentation and diffusion on the full graph need the kNN graph of
all N images (O(N²) exactly) and are refused at this scale.

Memory: the database is read block by block (memory-mapped stores are never loaded whole);
beyond it, `[Q, block]` float32 scores and their sort, `[Q, top]` ids, and the positions.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.rerank import diffusion, pipeline, query_expansion
from cbir_tf.search import exact as search

__all__ = ["PartialRanking", "Rows", "rank_methods", "scan", "target_ids"]

log = logging.getLogger(__name__)


class Rows:
    """Row arrays `[N_i, D]` (in memory or memory-mapped) read as one `[sum N_i, D]` matrix.

    Supports what the searches and expansions read: `shape`, `dtype`, `ndim`, `len`, a slice
    of rows and a gather of rows by an int array (both returned as float32 arrays).
    """

    def __init__(self, *parts: np.ndarray):
        self.parts = [p for p in parts if p is not None and len(p)]
        if not self.parts:
            raise ValueError("no database rows: nothing to rank")
        dims = {int(p.shape[1]) for p in self.parts}
        if len(dims) != 1:
            raise ValueError(
                f"database parts have dimensions {sorted(dims)}: the dataset's and the "
                "distractors' descriptors must come from the same model and whitening"
            )
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), dims.pop())
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("Rows supports contiguous slices only")
            # One output array filled part by part: no second copy of a block spanning parts.
            out = np.empty((max(stop - start, 0), self.shape[1]), np.float32)
            for part, off in zip(self.parts, self.offsets[:-1], strict=True):
                lo, hi = max(start - off, 0), min(stop - off, len(part))
                if lo < hi:
                    _read_rows(part, lo, hi, out[off + lo - start : off + hi - start])
            return out
        idx = np.asarray(key, dtype=np.int64)
        flat = idx.reshape(-1)
        out = np.empty((flat.size, self.shape[1]), np.float32)
        for part, off in zip(self.parts, self.offsets[:-1], strict=True):
            inside = (flat >= off) & (flat < off + len(part))
            if inside.any():
                out[inside] = _gather_rows(part, flat[inside] - off)
        return out.reshape(*idx.shape, self.shape[1])


def _is_mapped_file(part: np.ndarray) -> bool:
    return (
        isinstance(part, np.memmap)
        and isinstance(part.base, mmap.mmap)
        and bool(part.filename)
        and part.flags.c_contiguous
    )


def _gather_rows(part: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 rows of `part` by index (read from the file for a memory-mapped store)."""
    if not _is_mapped_file(part):
        return np.asarray(part[rows], np.float32)
    row_bytes = part.shape[1] * part.itemsize
    out = np.empty((len(rows), part.shape[1]), part.dtype)
    fd = os.open(part.filename, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(fd, row_bytes, part.offset + r * row_bytes), part.dtype)
    finally:
        os.close(fd)
    return out.astype(np.float32, copy=False)


def _read_rows(part: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """Rows lo..hi-1 into `out` (float32). A memory-mapped store is read with plain file reads:
    pages touched through the map would stay in the process (its RSS would grow to the whole
    file), while a read leaves them in the page cache only."""
    if _is_mapped_file(part) and part.dtype == np.float32:
        row_bytes = part.shape[1] * part.itemsize
        view = memoryview(out.reshape(-1)).cast("B")
        with open(part.filename, "rb", buffering=0) as f:
            f.seek(part.offset + lo * row_bytes)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{part.filename}: ended before row {hi}")
                done += n
        return
    out[...] = np.asarray(part[lo:hi], np.float32)


@dataclasses.dataclass
class PartialRanking:
    """What the metrics need of a full ranking `[Q, N]`, in `O(Q * (top + targets))` memory.

    Attributes:
      top: int64 `[Q, K]` the first K ids of each full ranking, best first.
      top_scores: float `[Q, K]` their scores (the method's own: inner products or diffusion).
      ids: per query, int64 sorted distinct ids whose positions are known (the targets).
      positions: per query, int64 0-based positions of those ids in the full ranking.
      num_images: N, the length of every full ranking.
    """

    top: np.ndarray
    top_scores: np.ndarray
    ids: list[np.ndarray]
    positions: list[np.ndarray]
    num_images: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.ids), int(self.num_images))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: Any) -> PartialRanking:
        """The rankings of a subset of the queries (`ranks[rows]`, as on a `[Q, N]` array)."""
        rows = np.arange(len(self.ids))[rows].reshape(-1)
        return PartialRanking(
            self.top[rows], self.top_scores[rows], [self.ids[r] for r in rows],
            [self.positions[r] for r in rows], self.num_images,
        )  # fmt: skip

    def positions_of(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """int64 positions of (query row, id) pairs; ValueError for an id not tracked."""
        rows, ids = np.asarray(rows, np.int64), np.asarray(ids, np.int64)
        n = max(int(self.num_images), 1)
        lengths = [len(a) for a in self.ids]
        known = np.concatenate(
            [q * n + a for q, a in enumerate(self.ids)] or [np.zeros(0, np.int64)]
        )
        pos = np.concatenate(self.positions or [np.zeros(0, np.int64)])
        keys = rows * n + ids
        at = np.minimum(np.searchsorted(known, keys), max(sum(lengths) - 1, 0))
        if keys.size and (known.size == 0 or not np.array_equal(known[at], keys)):
            bad = keys[known[at] != keys] if known.size else keys
            raise ValueError(
                f"the partial ranking does not track id {int(bad[0] % n)} of query "
                f"{int(bad[0] // n)}: rank with every ground-truth id among the targets"
            )
        return pos[at] if keys.size else np.zeros(0, np.int64)

    def tagged_positions(self, flat_lists: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The sorted tagged keys `metrics._ranked_positions` computes from a full ranking."""
        stride = max(int(self.num_images), 1)
        keys = []
        for tag, (rows, ids) in enumerate(flat_lists):
            keys.append((rows * stride + self.positions_of(rows, ids)) * 2 + tag)
        tagged = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        return tagged.astype(np.int64, copy=False)


def target_ids(*gnds: Sequence[Mapping[str, Any]] | None, num_queries: int) -> list[np.ndarray]:
    """Per query, the sorted distinct ids of every list of the given ground truths.

    Args:
      gnds: per-query dicts (lists under any key but 'bbx': easy/hard/junk, ok/junk); None
        skipped. A ground truth covering a subset of the queries is given as
        (gnd, query rows) pairs instead.
      num_queries: Q.

    Returns:
      Q int64 arrays.
    """
    out: list[list[np.ndarray]] = [[] for _ in range(num_queries)]
    for item in gnds:
        if item is None:
            continue
        gnd, rows = item if isinstance(item, tuple) else (item, range(num_queries))
        for q, g in zip(rows, gnd, strict=True):
            for key, ids in g.items():
                if key != "bbx" and ids is not None:
                    out[int(q)].append(np.asarray(ids, np.int64).reshape(-1))
    return [np.unique(np.concatenate(a)) if a else np.zeros(0, np.int64) for a in out]


def ground_truth_rows(
    gnd: Sequence[Mapping[str, Any]],
    original_gnd: Sequence[Mapping[str, Any]] | None,
    original_queries: Sequence[int] | None,
    missing: np.ndarray | None,
    num_rows: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The ids whose positions the metrics need, and where they are among the database rows.

    Args:
      gnd: the revisited ground truth, one dict per query.
      original_gnd, original_queries: the original protocol's, and the queries it covers
        (None: all), or None.
      missing: sorted ground-truth ids without a descriptor (no database row), or None.
      num_rows: database rows (the present images, in ground-truth order).

    Returns:
      (targets: per query the sorted ids of every list (`target_ids`), row_of: int64
      `[num_rows + len(missing)]` the row of each ground-truth id, -1 for a missing image).
    """
    orig = None
    if original_gnd is not None:
        orig = (original_gnd, range(len(gnd)) if original_queries is None else original_queries)
    missing = np.zeros(0, np.int64) if missing is None else np.asarray(missing, np.int64)
    row_of = np.full(num_rows + len(missing), -1, np.int64)
    row_of[np.setdiff1d(np.arange(len(row_of)), missing)] = np.arange(num_rows)
    return target_ids(gnd, orig, num_queries=len(gnd)), row_of


def _count_before(
    sims: np.ndarray, start: int, t_rows: np.ndarray, t_ids: np.ndarray, t_score: np.ndarray
) -> np.ndarray:
    """For each target (row, id, score): items of this block ranked before it."""
    out = np.zeros(t_ids.size, np.int64)
    if t_ids.size == 0:
        return out
    ordered = np.sort(sims, axis=1)
    bounds = np.searchsorted(t_rows, np.arange(sims.shape[0] + 1))
    width = sims.shape[1]
    for q in range(sims.shape[0]):
        sel = slice(bounds[q], bounds[q + 1])
        t = t_score[sel]
        hi = np.searchsorted(ordered[q], t, side="right")
        lo = np.searchsorted(ordered[q], t, side="left")
        out[sel] = width - hi
        own = (t_ids[sel] >= start) & (t_ids[sel] < start + width)
        # Equal scores count when the id is lower; a target meets itself in its own block.
        for j in np.flatnonzero(hi - lo > own):
            jid = t_ids[sel][j]
            lower = min(max(int(jid) - start, 0), width)
            out[bounds[q] + j] += int(np.count_nonzero(sims[q, :lower] == t[j]))
    return out


def scan(
    queries: np.ndarray,
    database: Rows | np.ndarray,
    targets: Sequence[np.ndarray],
    top: int,
    *,
    block_size: int = default("search.block_size"),
) -> PartialRanking:
    """The plain inner-product ranking of `database`, kept to its top and the targets.

    One pass over the database in blocks of `block_size` rows (the blocks that hold targets
    first, so their scores are known before the others are counted).

    Args:
      queries: float32 `[Q, D]` L2-normalised.
      database: `Rows` or float array `[N, D]`.
      targets: Q int64 arrays of ids in [0, N) whose positions are wanted.
      top: ids kept at the head of each ranking (clipped to N).
      block_size: database rows per block (the same as `search.rank_all`'s gives the same
        scores to the last bit).

    Returns:
      A `PartialRanking` (top scores float32).
    """
    n = database.shape[0]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(top), n)
    t_rows = np.repeat(np.arange(len(targets)), [len(t) for t in targets]).astype(np.int64)
    t_ids = np.concatenate(list(targets) or [np.zeros(0, np.int64)]).astype(np.int64)
    if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= n):
        raise ValueError(f"target ids must lie in [0, {n}), found {t_ids.min()}..{t_ids.max()}")
    blocks = range(0, n, block_size)
    first = sorted({int(b) * block_size for b in np.unique(t_ids // block_size)})
    order = first + sorted(set(blocks) - set(first))
    t_score = np.zeros(t_ids.size, np.float32)
    before = np.zeros(t_ids.size, np.int64)
    best_s = np.empty((q.shape[0], 0), np.float32)
    best_i = np.empty((q.shape[0], 0), np.int64)
    held: list[tuple[int, np.ndarray]] = []
    off_norm = 0
    for b, start in enumerate(order):
        block = np.ascontiguousarray(database[start : start + block_size], dtype=np.float32)
        sims = q @ block.T
        if not np.isfinite(sims).all():
            bad = start + np.flatnonzero(~np.isfinite(block).all(axis=1))
            raise ValueError(f"database rows {bad[:10].tolist()} hold NaN or Inf values")
        off_norm += int(np.count_nonzero(np.abs(np.einsum("nd,nd->n", block, block) - 1) > 2e-3))
        cols = search.top_k_indices(sims, k)
        best_s = np.concatenate([best_s, np.take_along_axis(sims, cols, axis=1)], axis=1)
        best_i = np.concatenate([best_i, cols.astype(np.int64) + start], axis=1)
        if best_s.shape[1] > k:
            best_s, best_i = search.sort_by_score(best_s, best_i, k)
        if b < len(first):
            inside = (t_ids >= start) & (t_ids < start + block.shape[0])
            t_score[inside] = sims[t_rows[inside], t_ids[inside] - start]
            held.append((start, sims))  # counted once every target's score is known
            if b == len(first) - 1:
                for s0, s in held:
                    before += _count_before(s, s0, t_rows, t_ids, t_score)
                held = []
        else:
            before += _count_before(sims, start, t_rows, t_ids, t_score)
        del block  # freed before the next block is read: one block in memory at a time
    if off_norm:
        log.warning("%d of %d database rows are not L2-normalised", off_norm, n)
    best_s, best_i = search.sort_by_score(best_s, best_i, k)
    bounds = np.searchsorted(t_rows, np.arange(len(targets) + 1))
    return PartialRanking(
        top=best_i,
        top_scores=best_s,
        ids=[t_ids[bounds[i] : bounds[i + 1]] for i in range(len(targets))],
        positions=[before[bounds[i] : bounds[i + 1]] for i in range(len(targets))],
        num_images=n,
    )


def ann_scan(index: Any, queries: np.ndarray, targets: Sequence[np.ndarray], top: int):
    """The ranking an approximate index gives, kept to its top and the targets.

    First the index's `top` best candidates (its scores, best first), then the rows it did not
    return: the non-target ones by id, and the targets it missed last of all, as never
    retrieved (placing them by id would favour the database images, numbered before the
    distractors).

    Args:
      index: a `cbir_tf.search.ann.AnnIndex` over the database.
      queries: float32 `[Q, D]` L2-normalised.
      targets: Q int64 arrays of distinct ids whose positions are wanted.
      top: candidates asked of the index (clipped to N).

    Returns:
      A `PartialRanking`.
    """
    n = int(index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), min(int(top), n))
    positions = []
    for q, t in enumerate(targets):
        t = np.asarray(t, np.int64)
        found = ids[q][ids[q] >= 0]
        missed = np.sort(t[~np.isin(t, found)])
        if len(found) < ids.shape[1]:  # fewer candidates than asked: missed non-targets by id
            m = ids.shape[1] - len(found)
            taken = np.concatenate([found, missed])
            ids[q, len(found) :] = np.setdiff1d(np.arange(len(taken) + m), taken)[:m]
            scores[q, len(found) :] = -np.inf
        where = {int(i): p for p, i in enumerate(found)}
        last = {int(i): n - len(missed) + r for r, i in enumerate(missed)}
        positions.append(np.array([where.get(int(i), last.get(int(i))) for i in t], np.int64))
    return PartialRanking(ids, scores, [np.asarray(t, np.int64) for t in targets], positions, n)


class _Precomputed:
    """A `SearchIndex` stand-in that answers with a scan's top (same order, same ties)."""

    def __init__(self, database: Rows | np.ndarray, ranking: PartialRanking):
        self.database, self.ranking = database, ranking
        self.ntotal, self.dim = int(database.shape[0]), int(database.shape[1])
        self.backend, self.block_size = "exact", default("search.block_size")

    def search(self, queries: np.ndarray, k: int, *, validate: bool = True):
        del validate
        if k > self.ranking.top.shape[1]:
            raise ValueError(
                f"{k} neighbours asked of a scan that kept {self.ranking.top.shape[1]}"
            )
        return self.ranking.top_scores[:, :k], self.ranking.top[:, :k]


def _diffused(
    base: PartialRanking,
    queries: np.ndarray,
    database: Rows | np.ndarray,
    settings: pipeline.Diffusion,
    truncate: int,
    block_size: int,
) -> tuple[PartialRanking, Any]:
    """Truncated diffusion of each query's top `truncate` of `base`; the rest keeps its order."""
    index = _Precomputed(database, base)
    scores, ids, info = diffusion.truncated_diffusion(
        queries, database, truncate, k=settings.k, kq=settings.kq, gamma=settings.gamma,
        alpha=settings.alpha, max_iter=settings.max_iter, tol=settings.tol,
        block_size=block_size, index=index, validate=False,
    )  # fmt: skip
    # Ties by lower id, as the full path's stable sort of the dense scores orders them.
    order = np.lexsort((ids, -scores), axis=-1)
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    positions = []
    for q, (t, pos) in enumerate(zip(base.ids, base.positions, strict=True)):
        # Every diffused item precedes the rest, which keep their order: an item outside the
        # diffused top n keeps its position (the n diffused were the n before it).
        where = np.argsort(ids[q], kind="stable")
        at = np.minimum(np.searchsorted(ids[q][where], t), ids.shape[1] - 1)
        hit = ids[q][where][at] == t
        positions.append(np.where(hit, where[at], pos))
    k = base.top.shape[1]
    if k > ids.shape[1]:  # the head beyond the diffused items: the base order, minus them
        rest = [r[~np.isin(r, d)][: k - ids.shape[1]] for r, d in zip(base.top, ids, strict=True)]
        ids = np.concatenate([ids, np.stack(rest)], axis=1)
        scores = np.concatenate([scores, np.full((len(ids), k - scores.shape[1]), -np.inf)], 1)
    top = ids[:, :k]
    return PartialRanking(top, scores[:, :k], base.ids, positions, base.num_images), info


def check_methods(methods: Sequence[str], truncate: int) -> None:
    """Refuses the methods that need the kNN graph of the whole database at this scale."""
    for method in methods:
        steps = pipeline.check_method(method, "method", none_word="plain").split("+")
        if "dba" in steps:
            raise ValueError(
                f"method {method!r} needs the nearest neighbours of every one of the database's "
                "images (O(N²) with distractors); drop it from rerank.methods for this setting"
            )
        if "diffusion" in steps and truncate < 1:
            raise ValueError(
                f"method {method!r} on the full graph of the database with distractors is "
                "O(N²); set rerank.diffusion.truncate or eval.distractor_truncate above 0"
            )


def rank_methods(
    methods: Sequence[str],
    queries: np.ndarray,
    database: Rows | np.ndarray,
    settings: pipeline.RerankSettings,
    targets: Sequence[np.ndarray],
    *,
    top: int = 100,
    truncate: int = 1000,
    block_size: int = default("search.block_size"),
    index: Any = None,
) -> dict[str, tuple[PartialRanking, dict[str, Any]]]:
    """Partial rankings of every method: two passes over the database at most.

    Args:
      methods: names of `pipeline.METHODS` ('plain' for none) without DBA.
      queries: float32 `[Q, D]` L2-normalised.
      database: `Rows` or `[N, D]` float array (memory-mapped parts are read in blocks).
      settings: the re-ranking settings (diffusion's truncate is replaced by `truncate`).
      targets: Q int64 arrays, the ids whose positions the metrics need.
      top: head of each ranking kept (grids, and the neighbours α-QE needs).
      truncate: items diffused per query.
      block_size: database rows per block.
      index: an approximate index (`cbir_tf.search.ann.AnnIndex`) over `database` that ranks instead
        of the exact scans (see `ann_scan`); None: exact.

    Returns:
      {method: (PartialRanking, info: seconds, diffusion convergence)}.
    """
    check_methods(methods, truncate)
    steps = {m: pipeline.check_method(m, "method", none_word="plain").split("+") for m in methods}
    diffuse = any("diffusion" in s for s in steps.values())
    k = max(int(top), settings.qe.n, truncate if diffuse else 0)
    t0 = time.perf_counter()

    def ranked(qs: np.ndarray) -> PartialRanking:
        if index is not None:
            return ann_scan(index, qs, targets, k)
        return scan(qs, database, targets, k, block_size=block_size)

    plain = ranked(queries)
    times = {"plain": time.perf_counter() - t0}
    expanded, aqe = None, None
    if any("aqe" in s for s in steps.values()):
        t0 = time.perf_counter()
        expanded = query_expansion.alpha_query_expansion(
            queries, database, settings.qe.n, settings.qe.alpha,
            index=_Precomputed(database, plain),
        )  # fmt: skip
        aqe = ranked(expanded)
        times["aqe"] = time.perf_counter() - t0
    out = {}
    for method, s in steps.items():
        t0 = time.perf_counter()
        base, qs = (aqe, expanded) if "aqe" in s else (plain, queries)
        info: dict[str, Any] = {}
        ranking = base
        if "diffusion" in s:
            ranking, cg = _diffused(base, qs, database, settings.diffusion, truncate, block_size)
            info["diffusion"] = cg
        info["seconds"] = round(
            time.perf_counter() - t0 + times["aqe" if "aqe" in s else "plain"], 3
        )
        ranking = dataclasses.replace(
            ranking, top=ranking.top[:, :top], top_scores=ranking.top_scores[:, :top]
        )
        out[method] = (ranking, info)
    return out
