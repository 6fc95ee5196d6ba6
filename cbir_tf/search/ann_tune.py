"""Tuning an approximate index for cost: the cheapest search settings that reach a recall target.

A setting is the lists probed (`nprobe`) and the candidates re-scored per result (`refine`). The
recall of each held-out query is measured under every setting tried, with its cost (CPU time per
query, which other processes' load inflates far less than wall time). Queries far from every
list centroid (odd rows: their neighbours are near-ties spread over many lists, which the coarse
codes cannot order) need many more lists and candidates than the others, so `choose` may split
them off: queries whose similarity to their nearest centroid is below a threshold get a setting
of their own. It picks the split and the two settings with the lowest mean cost whose recall
reaches the target; when none does, the cheapest within `margin` of the best recall any reaches,
and it says that the target is missed.

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
    near_recall: np.ndarray,
    near_cost: np.ndarray,
    far_recall: np.ndarray,
    far_cost: np.ndarray,
    nearest: np.ndarray,
    *,
    target: float,
    margin: float,
    shares: tuple[float, ...] = FAR_SHARES,
) -> dict[str, Any]:
    """The cheapest settings (mean cost per query) whose mean recall reaches `target`.

    Args:
      near_recall: float `[Q, A]` recall of each tune query under each of the settings A that
        every query may use.
      near_cost: float `[A]` cost per query of each.
      far_recall: float `[F, B]` recall of the F queries farthest from every centroid (farthest
        first) under each of the settings B that queries put apart may use.
      far_cost: float `[B]` cost per query of each.
      nearest: float `[Q]` each query's similarity to its nearest list centroid.
      target: recall wanted (mean over the queries).
      margin: when no setting reaches the target, the cheapest within `margin` of the best.
      shares: shares of the farthest queries a split may put apart (0: no split), at most F / Q.

    Returns:
      {'near': index into A, 'far': index into B (None: no split), 'far_below' (similarity
      threshold; None: no split), 'far_share', 'recall', 'recall_far' (the `REPORT_FAR_SHARE`
      farthest queries), 'best_recall', 'cost', 'target_met'}.
    """
    near_recall = np.asarray(near_recall, np.float64)
    far_recall = np.asarray(far_recall, np.float64)
    n_q, n_far = near_recall.shape[0], far_recall.shape[0]
    order = np.argsort(nearest, kind="stable")  # farthest first
    near_prefix = np.vstack([np.zeros(near_recall.shape[1]), np.cumsum(near_recall[order], 0)])
    far_prefix = np.vstack([np.zeros(far_recall.shape[1]), np.cumsum(far_recall, 0)])
    grid = np.meshgrid(np.arange(near_recall.shape[1]), np.arange(far_recall.shape[1]))
    a, b = grid[0].ravel(), grid[1].ravel()  # every pair of settings
    rows = []
    for f in sorted({min(n_far, int(round(s * n_q))) for s in shares}):
        # Rounded: sums in another order must not tell equal recalls apart.
        total = np.round((near_prefix[n_q, a] - near_prefix[f, a] + far_prefix[f, b]) / n_q, 9)
        cost = ((n_q - f) * np.asarray(near_cost)[a] + f * np.asarray(far_cost)[b]) / n_q
        # Queries put apart get a setting that serves them at least as well, never one that
        # trades their recall for the others' (that would only game the mean).
        fair = far_prefix[f, b] >= near_prefix[f, a] - 1e-12
        rows.append(np.stack([total, cost, a, b, np.full(len(a), f)], axis=1)[fair])
    table = np.concatenate(rows)
    best = float(table[:, 0].max())
    met = best >= target
    ok = table[table[:, 0] >= (target if met else best - margin) - 1e-12]
    # The cheapest; then the higher recall; then the smaller split.
    total, cost, i, j, f = ok[np.lexsort((ok[:, 4], -ok[:, 0], ok[:, 1]))[0]]
    i, j, f = int(i), int(j), int(f)
    sims = np.asarray(nearest, np.float64)[order]
    far_below = None if f == 0 else float((sims[f - 1] + sims[f]) / 2) if f < n_q else 1.0
    chosen = near_recall[order, i]
    chosen[:f] = far_recall[:f, j]
    n_report = max(1, int(round(REPORT_FAR_SHARE * n_q)))
    return {
        "near": i,
        "far": None if f == 0 else j,
        "far_below": far_below,
        "far_share": round(f / n_q, 4),
        "recall": round(float(total), 4),
        "recall_far": round(float(chosen[:n_report].mean()), 4),
        "best_recall": round(best, 4),
        "cost": float(cost),
        "target_met": bool(met),
    }
