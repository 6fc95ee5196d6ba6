"""Every retrieval method of a benchmark: descriptors → search → re-ranking → metrics.

`evaluate_methods` needs only query and database descriptors and the ground truth: it ranks the
database under each method (`cbir_tf.evaluate.rankings`) and scores the rankings; with a million
distractors appended it goes through `cbir_tf.evaluate.distractors` (bounded memory, the same
metrics). `cbir_tf.evaluate.benchmark` produces the descriptors and `cbir_tf.runs.evaluate` wires
both to a config and writes the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import config
from cbir_tf.config import default
from cbir_tf.evaluate import bounded
from cbir_tf.evaluate import distractors as with_distractors
from cbir_tf.evaluate.precomputed import rankings_with_missing
from cbir_tf.evaluate.rankings import (
    evaluate_rankings,
    not_retrieved_last,
    rank_method,
    warn_unless_unit_norm,
)
from cbir_tf.rerank import pipeline
from cbir_tf.search import exact as search

log = logging.getLogger(__name__)

# The rows of the default table (configs/default.py); every method: `pipeline.METHODS`.
METHODS = tuple(default("rerank.methods"))


def evaluate_methods(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str] = METHODS,
    rerank_cfg: Any,
    kappas: Sequence[int] = (1, 5, 10),
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
    missing: np.ndarray | None = None,
    distractors: np.ndarray | None = None,
    distractor_truncate: int = 1000,
    search_cfg: Any = None,
    papers: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluates every retrieval method on one benchmark.

    Args:
      queries: float32 [Q, D] query descriptors, row i for query i of `gnd`.
      database: float32 [N, D] database descriptors, row j for image j of the ground truth.
      gnd: revisited ground truth (list of Q dicts).
      methods: names accepted by `rank_method` (table rows and result keys, as given).
      rerank_cfg: the config's `rerank` block (or `pipeline.RerankSettings`).
      kappas: the k of mP@k.
      original_gnd, original_queries: see `evaluate_rankings`.
      missing: ground-truth ids of database images without a descriptor (see `align_rows`);
        `database` then holds only the present ones, in ground-truth order.
      distractors: float32 [M, D] (memory-mapped) appended after the database: ids N.. N+M-1.
        Rankings are then `bounded.PartialRanking`s (bounded memory; same metrics), and
        diffusion is truncated to each query's top n: rerank.diffusion.truncate, or
        `distractor_truncate` when that is 0.
      search_cfg: the config's `search` block (backend 'ann' ranks with an approximate index
        built over `database` and the distractors, `cbir_tf.search.ann`); None: the defaults.
      papers: what 'auto' settings mean here (the config's `rerank.papers`, for the Revisited
        benchmarks); None: chosen from `database` (`cbir_tf.rerank.auto`; with distractors,
        from the benchmark's own database).

    Returns:
      (results {method: {'revisited', 'original', 'info'}}, rankings {method: int [Q, N]});
      each info holds the settings the method used ('settings') and, when some were 'auto',
      how they were chosen ('auto': `resolve_settings`'s note).
    """
    if len(queries) != len(gnd):
        raise ValueError(
            f"{len(queries)} query descriptors for {len(gnd)} queries in the ground truth"
        )
    for method in methods:  # every name checked before the first (costly) one runs
        pipeline.check_method(method, "method", none_word="plain")
    settings = pipeline.RerankSettings.from_config(rerank_cfg)
    search.validate_descriptors(queries, "queries")
    sc = config.block({"search": config.as_dict(search_cfg)}, "search")
    if distractors is not None:
        settings, note = resolve_settings(settings, pipeline.Database(database), papers)
        results, rankings = with_distractors.evaluate(
            queries, database, distractors, gnd, methods, settings, kappas,
            original_gnd, original_queries,
            np.zeros(0, np.int64) if missing is None else np.asarray(missing, np.int64),
            settings.diffusion.truncate or int(distractor_truncate),
            sc["ann"] if sc["backend"] == "ann" else None,
        )  # fmt: skip
        _record_settings(results, settings, note)
        return results, rankings
    # Validated once; DBA and the diffusion graph are built once for all the methods.
    db = pipeline.Database(
        database, backend=sc["backend"], block_size=int(sc["block_size"]), ann_settings=sc["ann"]
    )
    settings, note = resolve_settings(settings, db, papers)
    ann = getattr(db.index, "ann", None)
    if ann is not None:  # the table must say that rankings come from an approximate index
        log.info("ranking with the %s", ann.describe())
    warn_unless_unit_norm(queries, "queries")
    warn_unless_unit_norm(database, "database")
    results: dict[str, Any] = {}
    rankings: dict[str, np.ndarray] = {}
    target_rows = None  # the ground truth's rows, for an approximate index's misses
    for method in methods:
        ranks, info = rank_method(method, queries, db, settings)
        if "retrieved" in info:
            if target_rows is None:
                targets, row_of = bounded.ground_truth_rows(
                    gnd, original_gnd, original_queries, missing, len(database)
                )
                target_rows = [row_of[t][row_of[t] >= 0] for t in targets]
            ranks = not_retrieved_last(ranks, info.pop("retrieved"), target_rows)
        if missing is not None and len(missing):
            ranks = rankings_with_missing(ranks, missing, len(database) + len(missing))
        res = evaluate_rankings(ranks, gnd, kappas, original_gnd, original_queries)
        res["info"] = info if ann is None else {**info, "search": ann.describe()}
        results[method] = res
        rankings[method] = ranks
        log.info(
            "%s: mAP M %.2f (%.1f s)",
            method,
            100 * res["revisited"]["medium"]["map"],
            info["seconds"],
        )
    _record_settings(results, settings, note)
    return results, rankings


def resolve_settings(
    settings: pipeline.RerankSettings, db: pipeline.Database, papers: Any = None
) -> tuple[pipeline.RerankSettings, dict[str, Any] | None]:
    """`settings` without 'auto' fields, and how they were chosen.

    Args:
      settings: the settings, some fields possibly AUTO.
      db: the database the methods rank (its `auto` values, when `papers` is None).
      papers: {'qe': {'n'}, 'dba': {'n'}, 'diffusion': {'k', 'kq', 'truncate'}} ('auto' on the
        Revisited benchmarks), or None.

    Returns:
      (resolved settings, None when nothing was 'auto', else {'fields': the dotted names,
      'source': 'papers' | 'collection', and for the collection its 'stats'}).
    """
    fields = settings.auto_fields()
    if not fields:
        return settings, None
    if papers is not None:
        return settings.resolved(config.as_dict(papers)), {"fields": fields, "source": "papers"}
    resolved = db.resolve(settings)
    return resolved, {"fields": fields, "source": "collection", "stats": db.auto_stats()}


def _record_settings(
    results: dict[str, Any], settings: pipeline.RerankSettings, note: dict[str, Any] | None
) -> None:
    for method, res in results.items():
        info = res.setdefault("info", {})
        info["settings"] = pipeline.method_settings(method, settings)
        if note is not None:
            info["auto"] = note
