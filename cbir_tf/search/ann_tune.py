"""Tuning an approximate index for cost: the fewest lists probed that reach a recall target.

The recall of each held-out query is measured at every `nprobe` tried (`per_query_recall`).
Queries far from every list centroid (odd rows: their neighbours are near-ties spread over many
lists) need many more lists than the others, so `choose` may split them off: queries whose
similarity to their nearest centroid is below a threshold probe `nprobe_far` lists, the others
`nprobe`. It picks the split and the two values with the fewest lists probed per query on
average whose recall reaches the target; when no setting does, the cheapest within `margin` of
the best recall any setting reaches, and it says that the target is missed.

numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Shares of the queries (farthest from every centroid first) the split may put apart.
FAR_SHARES = tuple(i / 100 for i in range(0, 31))
REPORT_FAR_SHARE = 0.1  # the recall of this share of the farthest queries is reported


def per_query_recall(
    approx_ids: np.ndarray, exact_ids: np.ndarray, self_ids: np.ndarray, k: int
) -> np.ndarray:
    """Share of each query's exact top-k found in its approximate top-k (its own row excluded).

    Args:
      approx_ids, exact_ids: int `[Q, >= k+1]` best first.
      self_ids: int `[Q]` the query's own row, dropped from both lists.
      k: list length compared.

    Returns:
      float64 `[Q]`.
    """
    out = np.empty(len(self_ids))
    for q, (a, e, s) in enumerate(zip(approx_ids, exact_ids, self_ids, strict=True)):
        out[q] = len(set(a[a != s][:k].tolist()) & set(e[e != s][:k].tolist())) / k
    return out


def choose(
    recall: np.ndarray,
    nprobes: np.ndarray,
    nearest: np.ndarray,
    *,
    target: float,
    margin: float,
    shares: tuple[float, ...] = FAR_SHARES,
) -> dict[str, Any]:
    """The cheapest setting (fewest lists probed per query) that reaches `target`.

    Args:
      recall: float `[Q, P]` recall of each tune query at each `nprobes` value.
      nprobes: int `[P]` ascending.
      nearest: float `[Q]` each query's similarity to its nearest list centroid.
      target: recall wanted (mean over the queries).
      margin: when no setting reaches the target, the cheapest within `margin` of the best.
      shares: shares of the farthest queries a split may put apart (0: no split).

    Returns:
      {'nprobe', 'nprobe_far', 'far_below' (similarity threshold; None: no split),
      'far_share', 'recall', 'recall_far' (the `REPORT_FAR_SHARE` farthest queries),
      'best_recall', 'lists_per_query', 'target_met'}.
    """
    recall = np.asarray(recall, np.float64)
    nprobes = np.asarray(nprobes, np.int64)
    n_q = recall.shape[0]
    order = np.argsort(nearest, kind="stable")  # farthest first
    prefix = np.vstack([np.zeros(recall.shape[1]), np.cumsum(recall[order], axis=0)])
    near_i, far_j = np.triu_indices(len(nprobes))  # far queries probe at least as many lists
    rows = []
    for f in sorted({int(round(s * n_q)) for s in shares}):
        total = (prefix[n_q, near_i] - prefix[f, near_i] + prefix[f, far_j]) / n_q
        cost = ((n_q - f) * nprobes[near_i] + f * nprobes[far_j]) / n_q
        rows.append(np.stack([total, cost, near_i, far_j, np.full(len(near_i), f)], axis=1))
    table = np.concatenate(rows)
    best = float(table[:, 0].max())
    met = best >= target
    ok = table[table[:, 0] >= (target if met else best - margin)]
    # Fewest lists; then the higher recall; then the smaller split.
    total, cost, i, j, f = ok[np.lexsort((ok[:, 4], -ok[:, 0], ok[:, 1]))[0]]
    i, j, f = int(i), int(j), int(f)
    if j == i:
        f = 0
    sims = np.asarray(nearest, np.float64)[order]
    far_below = None if f == 0 else float((sims[f - 1] + sims[f]) / 2) if f < n_q else np.inf
    chosen = np.where(np.arange(n_q) < f, recall[order, j], recall[order, i])
    n_far = max(1, int(round(REPORT_FAR_SHARE * n_q)))
    return {
        "nprobe": int(nprobes[i]),
        "nprobe_far": int(nprobes[j]),
        "far_below": far_below,
        "far_share": round(f / n_q, 4),
        "recall": round(float(total), 4),
        "recall_far": round(float(chosen[:n_far].mean()), 4),
        "best_recall": round(best, 4),
        "lists_per_query": round(float(cost), 2),
        "target_met": bool(met),
    }
