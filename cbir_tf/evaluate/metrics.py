"""Retrieval metrics of the Revisited Oxford/Paris benchmark (numpy only).

Reproduces the reference evaluation of the revisitop project (Radenović et al., "Revisiting
Oxford and Paris: Large-Scale Image Retrieval Benchmarking", CVPR 2018), `python/evaluate.py`:

* Average precision is the area under the precision-recall curve by the trapezoidal rule, with
  the ignored ("junk") images removed from the ranking before positions are counted.
* A query without positives has AP and precision NaN and is left out of the means.
* Precision at kappa is computed, as in the reference, at `min(kappa, position of the last
  retrieved positive)` (positions 1-based, junk removed), so a query whose positives are all
  ranked before kappa is not penalised for the images after them.

Nothing loops over ranked positions in Python: each ranking is inverted (id -> position) by one
numpy scatter (or, for short top-k lists over a large database, matched by sorting), only the
positions of the ground-truth ids are gathered, and AP and precision are computed for all
queries at once on those positions. The sums run in the same order as the reference loop, so
the values are bit-identical to it, at over 20 times its speed (benchmarks/metrics_speed.py).

Conventions: rankings are `[Q, N]` integer arrays of 0-based database ids, best first (the
reference code uses `[N, Q]`; transpose at the boundary). A ranking need not list the whole
database: positives missing from it count as not retrieved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_KAPPAS",
    "PROTOCOLS",
    "compute_ap",
    "compute_map",
    "evaluate_revisited",
    "original_gnd",
    "revisited_gnd",
]

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)

# For each revisited protocol: which raw lists are positives and which are ignored.
_PROTOCOL_LISTS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _as_id_array(values: Any, what: str) -> np.ndarray:
    """Converts a list of database ids to a 1-D int64 array; rejects non-integers."""
    if type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 1:
        return values  # fast path: the protocol builders' output
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D list of ids, got shape {arr.shape}")
    # dtype.kind: 'i' signed, 'u' unsigned integers; bool ('b') and floats are refused.
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer database ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_kappas(kappas: Sequence[int]) -> np.ndarray:
    arr = np.asarray(kappas)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"kappas must be a 1-D list of positive integers, got {kappas!r}")
    if (arr < 1).any():
        raise ValueError(f"kappas must be positive integers, got {kappas!r}")
    return arr.astype(np.int64)


def _trapezoid_terms(order: np.ndarray, positions: np.ndarray, step: np.ndarray) -> np.ndarray:
    """AP contribution of each retrieved positive, operation for operation as the reference.

    Args:
        order: int [P], j: how many positives of the same query are ranked before this one.
        positions: int [P], 0-based position of the positive with junk removed.
        step: float64 [P], recall step 1 / (number of positives of its query).

    Returns:
        float64 [P]: (precision_0 + precision_1) * step / 2.
    """
    order_f = order.astype(np.float64)
    pos_f = positions.astype(np.float64)
    # Before the first position the curve starts at precision 1 (reference: rank == 0 -> 1).
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(positions == 0, 1.0, order_f / pos_f)
    precision_1 = (order_f + 1.0) / (pos_f + 1.0)
    return (precision_0 + precision_1) * step / 2.0


def compute_ap(ranks_of_positives: np.ndarray, num_positives: int) -> float:
    """Trapezoidal average precision of one query (revisitop `compute_ap`).

    Args:
        ranks_of_positives: int [P], sorted 0-based positions of the retrieved positives in the
            ranking, junk images already removed. P may be smaller than `num_positives` (the
            rest were not retrieved and add nothing).
        num_positives: total number of positives of the query (> 0).

    Returns:
        The average precision, a fraction in [0, 1].

    Raises:
        ValueError: `num_positives` is not positive, or the positions are not a strictly
            increasing 1-D list of non-negative integers no longer than `num_positives`.
    """
    positions = _as_id_array(ranks_of_positives, "ranks_of_positives")
    num_positives = int(num_positives)
    if num_positives < 1:
        raise ValueError(f"num_positives must be at least 1, got {num_positives}")
    if positions.size > num_positives:
        raise ValueError(
            f"{positions.size} positive positions given but num_positives is {num_positives}"
        )
    if positions.size and (positions[0] < 0 or (np.diff(positions) <= 0).any()):
        raise ValueError("ranks_of_positives must be strictly increasing non-negative positions")
    order = np.arange(positions.size)
    step = np.full(positions.size, 1.0 / num_positives)
    terms = _trapezoid_terms(order, positions, step)
    # cumsum accumulates left to right like the reference loop, so the value is bit-identical.
    return float(np.cumsum(terms)[-1]) if terms.size else 0.0


def _validate_ranks(ranks: Any, num_queries: int) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.ndim != 2:
        raise ValueError(
            f"ranks must be a 2-D array [num_queries, num_ranked], got shape {arr.shape}"
        )
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ranks must hold integer database ids, got dtype {arr.dtype}")
    if arr.shape[0] != num_queries:
        hint = ""
        if arr.shape[1] == num_queries:
            hint = " (it looks like [N, Q] as the reference code stores it: pass ranks.T)"
        raise ValueError(
            f"ranks has {arr.shape[0]} rows but the ground truth has {num_queries} queries{hint}"
        )
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        # Such ids would wrap round to negative indices when converted for indexing.
        raise ValueError("ranks holds ids beyond the int64 range")
    if arr.size and arr.min() < 0:
        bad = np.unique(np.nonzero(arr < 0)[0])
        raise ValueError(
            f"ranks must hold 0-based database ids >= 0; negative ids in rows {bad[:10].tolist()}"
        )
    return arr


def _gnd_arrays(gnd: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if isinstance(gnd, Mapping):
        raise ValueError(
            "gnd must be a list with one {'ok', 'junk'} dict per query; for a raw revisited "
            "ground truth use revisited_gnd() or original_gnd() first"
        )
    oks, junks = [], []
    for i, entry in enumerate(gnd):
        # `type(...) is dict` first: the abstract Mapping check is slow for thousands of calls.
        if not (type(entry) is dict or isinstance(entry, Mapping)) or "ok" not in entry:
            raise ValueError(f"gnd[{i}] must be a dict with an 'ok' list (and optionally 'junk')")
        oks.append(_as_id_array(entry["ok"], f"gnd[{i}]['ok']"))
        # The reference treats a missing junk list as empty.
        junks.append(_as_id_array(entry.get("junk", ()), f"gnd[{i}]['junk']"))
    return oks, junks


# Upper bound on the entries of the per-block work arrays (16 Mi entries of 2 to 8 bytes), so
# that memory stays bounded whatever the number of queries and the database size.
_BLOCK_ELEMENTS = 1 << 24
# Rankings at least this long are inverted one row at a time (see _locate_by_inverse).
_ROW_SCATTER_MIN = 256
# An inverse table costs O(database size) per query, sorting O(N log N): rankings shorter
# than database size / this ratio (top-k lists over a large database) are matched by sorting.
_INVERSE_MAX_RATIO = 16


def _flatten_lists(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(query index, id) int64 [P] pairs of per-query id lists, sorted by query."""
    lengths = np.fromiter((a.size for a in lists), dtype=np.int64, count=len(lists))
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    ids = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return rows, ids.astype(np.int64, copy=False)


def _repeated_rows_error(rows: np.ndarray) -> ValueError:
    bad = np.unique(rows)[:10].tolist()  # at most 10: the message stays readable
    return ValueError(f"each row of ranks must list distinct ids; rows {bad} repeat ids")


def _locate_by_inverse(
    block_ranks: np.ndarray, wanted: list[np.ndarray], table_size: int, first_row: int
) -> list[np.ndarray]:
    """Positions of ids in rankings, by inverting each ranking (id -> position).

    Args:
        block_ranks: intp [B, N] rankings, ids in [0, table_size).
        wanted: int64 [P] flat keys row * table_size + id to look up (rows of this block).
        table_size: number of distinct ids.
        first_row: index in the whole ranks array of the block's first row (for messages).

    Returns:
        For each array of `wanted`, int64 [P] positions in their rankings, -1 when absent.

    Raises:
        ValueError: a ranking lists an id twice (the message names the rows).
    """
    num_rows, num_ranked = block_ranks.shape
    # The narrowest dtype that holds every position and the -1 "not ranked" marker: the
    # scatter is bound by memory traffic.
    dtype = next(dt for dt in (np.int16, np.int32, np.int64) if num_ranked <= np.iinfo(dt).max)
    columns = np.arange(num_ranked, dtype=dtype)
    inverse = np.full((num_rows, table_size), -1, dtype=dtype)
    if num_ranked >= _ROW_SCATTER_MIN:
        # One scatter per ranking: no [B, N] index temporaries, which cost more in allocation
        # and page faults than the loop costs in Python overhead.
        for q in range(num_rows):
            inverse[q][block_ranks[q]] = columns
    else:
        # Short rankings: one flat scatter for the block, to avoid per-row overhead.
        offsets = np.arange(num_rows, dtype=np.intp)[:, None] * table_size
        inverse.reshape(-1)[(block_ranks + offsets).reshape(-1)] = np.tile(columns, num_rows)
    # A repeated id leaves fewer filled entries than ranked ones.
    if np.count_nonzero(inverse >= 0) != num_rows * num_ranked:
        distinct = np.count_nonzero(inverse >= 0, axis=1)
        raise _repeated_rows_error(np.nonzero(distinct != num_ranked)[0] + first_row)
    inverse_flat = inverse.reshape(-1)  # 1-D gathers are much cheaper than 2-D ones
    return [inverse_flat[keys].astype(np.int64) for keys in wanted]


def _locate_by_sort(
    block_ranks: np.ndarray, wanted: list[np.ndarray], table_size: int, first_row: int
) -> list[np.ndarray]:
    """Same as `_locate_by_inverse`, by sorting the ranked (row, id) keys instead."""
    num_rows, num_ranked = block_ranks.shape
    if num_rows * num_ranked == 0:
        return [np.full(keys.size, -1, dtype=np.int64) for keys in wanted]
    offsets = np.arange(num_rows, dtype=np.int64)[:, None] * table_size
    ranked_keys = (block_ranks + offsets).reshape(-1)
    order = np.argsort(ranked_keys)
    sorted_keys = ranked_keys[order]
    repeated = sorted_keys[1:] == sorted_keys[:-1]
    if repeated.any():
        raise _repeated_rows_error(sorted_keys[1:][repeated] // table_size + first_row)
    out = []
    for keys in wanted:
        at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
        hit = sorted_keys[at] == keys
        # order[at] is the flat index row * N + position of the match.
        out.append(np.where(hit, order[at] % num_ranked, -1).astype(np.int64))
    return out


def _ranked_positions(
    ranks: np.ndarray,
    flat_lists: Sequence[tuple[np.ndarray, np.ndarray]],
    table_size: int,
) -> np.ndarray:
    """Where each query's positive and junk ids sit in its ranking.

    Only the ground-truth ids are looked up, so the cost is one pass over `ranks` plus the
    size of the ground truth, whatever the number of positions. Queries are processed in
    blocks to bound memory. Also rejects rankings that list an id twice (that would count a
    positive twice).

    Args:
        ranks: int [Q, N] rankings, ids in [0, table_size).
        flat_lists: (query index, id) int64 [P] pairs sorted by query (`_flatten_lists`) of
            the positives, then of the junk images.
        table_size: number of distinct ids.

    Returns:
        int64 [M] sorted distinct tagged keys 2 * (q * max(N, 1) + position) + tag, tag 0 for a
        retrieved positive and 1 for a retrieved junk image. Sorted, a positive comes after
        every junk image ranked before it in its row and before a junk image at its own
        position (an id both positive and junk), as in the reference. An id listed twice in
        the ground truth is found once, as the reference's `in1d` finds it.
    """
    num_queries, num_ranked = ranks.shape
    stride = max(num_ranked, 1)
    if table_size <= _INVERSE_MAX_RATIO * stride:
        locate, per_query = _locate_by_inverse, max(table_size, 1)
    else:
        locate, per_query = _locate_by_sort, stride
    block = max(1, _BLOCK_ELEMENTS // per_query)
    starts = np.arange(0, num_queries + block, block)
    bounds = [np.searchsorted(rows, starts) for rows, _ in flat_lists]
    flat_index = [rows * table_size + ids for rows, ids in flat_lists]
    keys = []
    for b, q0 in enumerate(range(0, num_queries, block)):  # blocks of queries, not positions
        q1 = min(q0 + block, num_queries)
        # Fancy indexing converts indices to intp anyway; doing it once per block is much
        # faster than once per row for narrow dtypes (int16 rankings).
        block_ranks = ranks[q0:q1].astype(np.intp, copy=False)
        sels = [slice(bound[b], bound[b + 1]) for bound in bounds]
        wanted = [index[sel] - q0 * table_size for index, sel in zip(flat_index, sels, strict=True)]
        found = locate(block_ranks, wanted, table_size, q0)
        for tag, ((rows, _), sel, found_at) in enumerate(zip(flat_lists, sels, found, strict=True)):
            hit = found_at >= 0
            keys.append((rows[sel][hit] * stride + found_at[hit]) * 2 + tag)
    if not keys:
        return np.zeros(0, dtype=np.int64)
    tagged = np.sort(np.concatenate(keys))
    if tagged.size < 2:
        return tagged
    # Drop repeats (ids listed twice in one ground-truth list).
    keep = np.empty(tagged.size, dtype=np.bool_)
    keep[0] = True
    np.not_equal(tagged[1:], tagged[:-1], out=keep[1:])
    return tagged[keep]


def _table_size(
    ranks: np.ndarray,
    flat_lists: Sequence[tuple[np.ndarray, np.ndarray]],
    num_images: int | None,
) -> int:
    """Size of the id tables: every id of `ranks` and of the ground truth must fit in it.

    Raises:
        ValueError: a negative ground-truth id, or an id beyond `num_images` when given.
    """
    max_rank_id = int(ranks.max()) if ranks.size else -1
    gnd_ids = np.concatenate([ids for _, ids in flat_lists])
    max_gnd_id = int(gnd_ids.max()) if gnd_ids.size else -1
    min_gnd_id = int(gnd_ids.min()) if gnd_ids.size else 0
    if min_gnd_id < 0:
        raise ValueError(f"ground-truth ids must be >= 0, found {min_gnd_id}")
    if num_images is None:
        return max(max_rank_id, max_gnd_id) + 1
    num_images = int(num_images)
    if max_rank_id >= num_images:
        raise ValueError(f"ranks holds id {max_rank_id} but the database has {num_images} images")
    if max_gnd_id >= num_images:
        raise ValueError(
            f"the ground truth holds id {max_gnd_id} but the database has {num_images} images"
        )
    return num_images


def _positives_without_junk(
    tagged: np.ndarray, num_queries: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each retrieved positive's query, rank among its query's positives, and junk-free position.

    Args:
        tagged: int64 [M] sorted tagged keys of `_ranked_positions`.
        num_queries: Q.
        stride: max(N, 1), the row stride of the keys.

    Returns:
        (pos_query, order, positions, found, first):
            pos_query: int [P] query of each retrieved positive, sorted.
            order: int [P] positives of the same query ranked before it.
            positions: int64 [P] 0-based position in its ranking with junk removed.
            found: int [Q] retrieved positives per query.
            first: int [Q] index in [P] of each query's first positive.
    """
    is_junk = tagged & 1
    # Junk entries at or before each entry in merged order: for a positive, the junk of
    # earlier queries plus the junk ranked strictly before it in its own query.
    junk_upto = np.cumsum(is_junk)
    pos_index = np.flatnonzero(is_junk == 0)
    # Where each query's entries start in `tagged` (found by key, no per-entry division).
    query_start = np.searchsorted(tagged, np.arange(num_queries + 1, dtype=np.int64) * (2 * stride))
    junk_before_query = np.concatenate(([0], junk_upto))[query_start[:-1]]
    found = np.diff(np.searchsorted(pos_index, query_start))  # retrieved positives per query
    first = np.cumsum(found) - found
    pos_query = np.repeat(np.arange(num_queries), found)
    # 0-based positions with junk removed: raw position minus the junk before it in its query.
    base = np.repeat(np.arange(num_queries, dtype=np.int64) * stride - junk_before_query, found)
    positions = (tagged[pos_index] >> 1) - junk_upto[pos_index] - base
    order = np.arange(pos_index.size) - np.repeat(first, found)
    return pos_query, order, positions, found, first


def _average_precisions(
    num_pos: np.ndarray, pos_query: np.ndarray, order: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """float64 [Q] trapezoidal AP per query (NaN for a query without positives)."""
    with np.errstate(divide="ignore"):
        step = 1.0 / num_pos.astype(np.float64)
    terms = _trapezoid_terms(order, positions, step[pos_query])
    # bincount adds each query's terms left to right, exactly like the reference loop.
    aps = np.bincount(pos_query, weights=terms, minlength=num_pos.size).astype(np.float64)
    aps[num_pos == 0] = np.nan
    return aps


def _precisions_at(
    kappas: np.ndarray,
    num_pos: np.ndarray,
    pos_query: np.ndarray,
    positions: np.ndarray,
    found: np.ndarray,
    first: np.ndarray,
    num_ranked: int,
) -> np.ndarray:
    """float64 [Q, K] precision at each kappa, evaluated at min(kappa, last positive position).

    The positives at or before each cut (1-based) are counted by one search over the keys of
    the retrieved positives, sorted by query then position.
    """
    num_queries = num_pos.size
    has_found = found > 0
    last_position = np.zeros(num_queries, dtype=np.int64)
    last_position[has_found] = positions[first[has_found] + found[has_found] - 1] + 1
    cut = np.minimum(last_position[:, None], kappas[None, :])  # [Q, K]
    span = num_ranked + 2  # > any 1-based position or cut
    query_base = np.arange(num_queries, dtype=np.int64)[:, None] * span
    hits = np.searchsorted(pos_query * span + positions + 1, query_base + cut, side="right")
    hits = hits - first[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        prs = np.where(has_found[:, None], hits / np.maximum(cut, 1), 0.0)
    prs[num_pos == 0] = np.nan
    return prs


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    num_images: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and precision at kappas, as the revisitop reference `compute_map`.

    Junk images are removed from each ranking before positions are counted. A query with an
    empty 'ok' list gets AP and precision NaN and is left out of the means. A query whose
    positives are all missing from a (top-k) ranking gets AP 0 and precision 0 (the reference
    fails on that case; it only arises with truncated rankings).

    Args:
        ranks: int [Q, N] (any integer dtype), row q is the ranking for query q: 0-based
            database ids, best first. N may be less than the database size (top-k lists).
            Or a `cbir_tf.evaluate.bounded.PartialRanking` (the positions of the ground-truth ids).
        gnd: Q dicts with 'ok' (positive ids) and optionally 'junk' (ignored ids).
        kappas: positive integers, the cut-offs for precision at k.
        num_images: database size; when given, every id in `ranks` and `gnd` must be below it.
            When omitted, ids are only required to be non-negative.

    Returns:
        (map, aps, mpr, prs):
            map: float, mean AP over queries with positives (NaN when none has).
            aps: float64 [Q], AP per query (NaN without positives).
            mpr: float64 [K], mean precision at each kappa over queries with positives.
            prs: float64 [Q, K], precision at each kappa per query (NaN without positives).

    Raises:
        ValueError: malformed ranks, ground truth, kappas; ids out of range; a ranking that
            lists the same id twice.
    """
    oks, junks = _gnd_arrays(gnd)
    num_queries = len(oks)
    kappa_arr = _as_kappas(kappas)
    flat_lists = (_flatten_lists(oks), _flatten_lists(junks))
    if hasattr(ranks, "tagged_positions"):  # a `bounded.PartialRanking`: positions are known
        if len(ranks) != num_queries:
            raise ValueError(f"{len(ranks)} rankings for {num_queries} queries")
        num_ranked = int(ranks.num_images)
        _table_size(np.zeros((0, 0), np.int64), flat_lists, num_ranked)
        tagged = ranks.tagged_positions(flat_lists)
    else:
        ranks = _validate_ranks(ranks, num_queries)
        num_ranked = ranks.shape[1]
        table_size = _table_size(ranks, flat_lists, num_images)
        # Positions in the full rankings of every retrieved positive and junk image, merged
        # in one sorted array of tagged keys (see _ranked_positions).
        tagged = _ranked_positions(ranks, flat_lists, table_size)
    pos_query, order, positions, found, first = _positives_without_junk(
        tagged, num_queries, max(num_ranked, 1)
    )
    # len(ok) as in the reference (an id listed twice in 'ok' counts twice here).
    num_pos = np.bincount(flat_lists[0][0], minlength=num_queries)
    aps = _average_precisions(num_pos, pos_query, order, positions)
    prs = _precisions_at(kappa_arr, num_pos, pos_query, positions, found, first, num_ranked)

    valid = num_pos > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        return float("nan"), aps, np.full(kappa_arr.size, np.nan), prs
    # cumsum sums queries in order, as the reference's running total does.
    mean_ap = float(np.cumsum(aps[valid])[-1] / num_valid)
    if kappa_arr.size:
        mpr = np.cumsum(prs[valid], axis=0)[-1] / num_valid
    else:
        mpr = np.zeros(0, dtype=np.float64)
    return mean_ap, aps, mpr, prs


def _raw_entries(gnd_raw: Any) -> Sequence[Mapping[str, Any]]:
    """Accepts the per-query list, or the whole pickle dict holding it under 'gnd'."""
    if isinstance(gnd_raw, Mapping):
        if "gnd" not in gnd_raw:
            raise ValueError("ground-truth dict has no 'gnd' list of per-query dicts")
        gnd_raw = gnd_raw["gnd"]
    if isinstance(gnd_raw, (str, bytes)) or not isinstance(gnd_raw, Sequence):
        raise ValueError(f"ground truth must be a list of per-query dicts, got {type(gnd_raw)}")
    return gnd_raw


def _concat(entry: Mapping[str, Any], keys: Sequence[str], i: int) -> np.ndarray:
    parts = []
    for key in keys:
        if key not in entry:
            raise ValueError(f"ground truth of query {i} has no '{key}' list")
        parts.append(_as_id_array(entry[key], f"query {i} '{key}'"))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def revisited_gnd(gnd_raw: Any, protocol: str) -> list[dict[str, np.ndarray]]:
    """Positives and ignored images of one revisited protocol.

    Easy: positives = easy, ignored = junk + hard. Medium: positives = easy + hard, ignored =
    junk. Hard: positives = hard, ignored = junk + easy.

    Args:
        gnd_raw: list of per-query dicts with 'easy', 'hard', 'junk' id lists (as in
            gnd_r<name>.pkl), or the whole pickle dict holding that list under 'gnd'.
        protocol: 'easy', 'medium' or 'hard'.

    Returns:
        One dict per query with 'ok' and 'junk' int64 [*] arrays.

    Raises:
        ValueError: unknown protocol, or a query lacking one of the lists.
    """
    if protocol not in _PROTOCOL_LISTS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    ok_keys, junk_keys = _PROTOCOL_LISTS[protocol]
    entries = _raw_entries(gnd_raw)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"ground truth of query {i} is not a dict")
        out.append({"ok": _concat(entry, ok_keys, i), "junk": _concat(entry, junk_keys, i)})
    return out


def original_gnd(gnd_raw: Any) -> list[dict[str, np.ndarray]]:
    """Positives and ignored images of the original Oxford5k / Paris6k protocol.

    Positives are the 'good' and 'ok' images, 'junk' images are ignored. Accepts both the
    original annotation lists ('good', 'ok', 'junk') and the merged form of cirtorch's
    gnd_oxford5k.pkl / gnd_paris6k.pkl, where 'ok' already holds good + ok.

    Args:
        gnd_raw: list of per-query dicts, or the whole pickle dict holding it under 'gnd'.

    Returns:
        One dict per query with 'ok' and 'junk' int64 [*] arrays.

    Raises:
        ValueError: a query has neither 'good' nor 'ok'.
    """
    entries = _raw_entries(gnd_raw)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"ground truth of query {i} is not a dict")
        ok_keys = [key for key in ("good", "ok") if key in entry]
        if not ok_keys:
            raise ValueError(f"ground truth of query {i} has neither 'good' nor 'ok' list")
        junk = _concat(entry, ("junk",), i) if "junk" in entry else np.zeros(0, np.int64)
        out.append({"ok": _concat(entry, ok_keys, i), "junk": junk})
    return out


def evaluate_revisited(
    ranks: np.ndarray,
    gnd_raw: Any,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    num_images: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates rankings under the Easy, Medium and Hard revisited protocols.

    Args:
        ranks: int [Q, N] rankings (0-based database ids, best first).
        gnd_raw: list of per-query dicts with 'easy', 'hard', 'junk' (or the pickle dict).
        kappas: cut-offs for precision at k.
        num_images: database size, checked against every id when given.

    Returns:
        {'easy' | 'medium' | 'hard': {'map': float, 'aps': float64 [Q], 'mpr': float64 [K],
        'prs': float64 [Q, K]}}, all fractions (not %).
    """
    results = {}
    for protocol in PROTOCOLS:
        mean_ap, aps, mpr, prs = compute_map(
            ranks, revisited_gnd(gnd_raw, protocol), kappas, num_images=num_images
        )
        results[protocol] = {"map": mean_ap, "aps": aps, "mpr": mpr, "prs": prs}
    return results
