"""Evaluation with distractors appended to the database (`evaluate.py --distractors=...`).

The distractors' descriptors (a memory-mapped store of up to a million rows) follow the present
database rows in one `bounded.Rows`; the ground-truth ids keep their meaning (the database's
images first, as the revisitop code appends distractors), and images without a descriptor rank
last, as in `precomputed.rankings_with_missing`. Every method is ranked by `bounded.rank_methods`
(bounded memory), and its `PartialRanking` goes through the same metrics as a full ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.evaluate import bounded
from cbir_tf.evaluate.rankings import diffusion_info, evaluate_rankings
from cbir_tf.rerank import pipeline

__all__ = ["Joined", "evaluate"]

log = logging.getLogger(__name__)


def evaluate(
    queries: np.ndarray,
    database: np.ndarray,
    distractors: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    settings: pipeline.RerankSettings,
    kappas: Sequence[int],
    original_gnd: Sequence[Mapping[str, Any]] | None,
    original_queries: Sequence[int] | None,
    missing: np.ndarray,
    truncate: int,
    ann_settings: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`methods.evaluate_methods` over the database and its distractors, in bounded memory.

    `ann_settings` (the config's `search.ann` block): rank with an approximate index built over
    the database and distractors (`bounded.ann_scan`), to measure what it costs in mAP.

    Returns:
      (results {method: {'revisited', 'original', 'info'}}, rankings {method: PartialRanking}
      in ground-truth ids: the database's, then the distractors' N.. N+M-1, missing last).
    """
    rows = bounded.Rows(database, distractors)
    targets, row_of = bounded.ground_truth_rows(
        gnd, original_gnd, original_queries, missing, len(database)
    )
    present = np.flatnonzero(row_of >= 0)
    top = max(int(k) for k in (*kappas, 100))
    index, search_text = None, None
    if ann_settings is not None:
        from cbir_tf.search import ann

        index = ann.build(rows, ann.AnnSettings.from_config(ann_settings))
        search_text = f"{index.describe()}; ground truth it did not return ranked last"
        log.info("ranking with the %s", search_text)
    ranked = bounded.rank_methods(
        methods, queries, rows, settings, [row_of[t][row_of[t] >= 0] for t in targets],
        top=top, truncate=truncate, block_size=default("search.block_size"), index=index,
    )  # fmt: skip
    results: dict[str, Any] = {}
    rankings: dict[str, Any] = {}
    for method, (ranking, info) in ranked.items():
        ranking = _ground_truth_ids(ranking, targets, row_of, present, missing)
        res = evaluate_rankings(ranking, gnd, kappas, original_gnd, original_queries)
        if info.get("diffusion") is not None:
            info["diffusion"] = diffusion_info(info["diffusion"])
        res["info"] = info if search_text is None else {**info, "search": search_text}
        results[method], rankings[method] = res, ranking
        log.info("%s: mAP M %.2f (%.1f s)", method, 100 * res["revisited"]["medium"]["map"],
                 info["seconds"])  # fmt: skip
    return results, rankings


def _ground_truth_ids(ranking: Any, targets, row_of, present, missing) -> Any:
    """A partial ranking over (present rows, distractors) in ground-truth ids, missing last."""

    n_rows, n_db = ranking.num_images, len(row_of)

    def to_id(r: np.ndarray) -> np.ndarray:  # rows: present images, then the distractors
        inside = present[np.clip(r, 0, max(len(present) - 1, 0))] if len(present) else r
        return np.where(r < len(present), inside, r - len(present) + n_db)

    positions = []
    for t, pos in zip(targets, ranking.positions, strict=True):
        rows = row_of[t]
        out = np.empty(len(t), np.int64)
        out[rows >= 0] = pos  # row order = id order among the present images
        out[rows < 0] = n_rows + np.searchsorted(missing, t[rows < 0])
        positions.append(out)
    return bounded.PartialRanking(
        to_id(ranking.top), ranking.top_scores, list(targets), positions, n_rows + len(missing)
    )


class Joined:
    """A list followed by the items `after(i)` (i = 0, 1, ...), read by index only."""

    def __init__(self, head: Sequence[Any], after: Any):
        self.head, self.after = head, after

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        return self.head[i] if i < len(self.head) else self.after(i - len(self.head))
