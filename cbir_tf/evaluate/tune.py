"""Re-ranking settings chosen on a benchmark, cross-validated over its queries (`--tune`).

Every setting of a grid (re-ranking fields such as `qe.n`, `diffusion.k`; and descriptor
variants, e.g. whitening dimensions, each a set of descriptors computed once) is scored on every
query: one ranking per method and per value of the fields that method reads (α-QE's `n` does
not change the diffusion row), so a grid of a hundred settings costs a few hundred rankings of
descriptors already computed. The score of a setting on a set of queries is the mean, over the
table's methods, of their mAP under one protocol (Medium by default) on those queries.

The queries are split into folds (a fixed shuffle); each fold's rankings come from the setting
that scores best on the *other* folds (`choose`), so the table of `cross_validate` is honest:
no query is ranked with settings chosen by looking at its own ground truth. The settings to
keep are then chosen on all the queries (`TuneResult.best`).

numpy only, through `cbir_tf.rerank.pipeline` and `cbir_tf.evaluate.metrics`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.evaluate import metrics
from cbir_tf.evaluate.precomputed import rankings_with_missing
from cbir_tf.evaluate.rankings import evaluate_rankings
from cbir_tf.rerank import pipeline

__all__ = ["Variant", "TuneResult", "choose", "cross_validate", "folds_of", "parse_grid"]

log = logging.getLogger(__name__)

# The config blocks of the grid fields `--tune` can vary without describing images again.
RERANK_PREFIX = "rerank."


@dataclasses.dataclass
class Variant:
    """One set of descriptors of the benchmark (e.g. one whitening dimension).

    Attributes:
      label: {config field: value} that made it ({} for the only one).
      queries: float32 `[Q, D]`, row i for query i.
      database: float32 `[N, D]` (the present images, ground-truth order).
      missing: ground-truth ids of database images without a descriptor.
    """

    label: dict[str, Any]
    queries: np.ndarray
    database: np.ndarray
    missing: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def parse_grid(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """'field:v1,v2,...' strings (the `--compare` syntax) as {field: values}.

    Raises:
      ValueError: an item without ':' or values, or a field given twice (named).
    """
    grid: dict[str, tuple[str, ...]] = {}
    for item in items:
        field, sep, values = str(item).partition(":")
        field = field.strip()
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not field or not vals:
            raise ValueError(f"grid item {item!r}: expected FIELD:v1,v2,... (e.g. rerank.qe.n:1,2)")
        if field in grid:
            raise ValueError(f"grid field {field} is given twice")
        grid[field] = vals
    return grid


def folds_of(num_queries: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """The queries split into `folds` folds (sorted ids each) after a fixed shuffle.

    Raises:
      ValueError: fewer than 2 folds, or fewer than 2 queries in a fold (one line).
    """
    if folds < 2:
        raise ValueError(f"--tune needs at least 2 folds (tune.folds), got {folds}")
    if num_queries < 2 * folds:
        raise ValueError(
            f"--tune: {num_queries} queries cannot make {folds} folds of at least 2 queries; "
            f"lower tune.folds (--config.tune.folds={max(2, num_queries // 2)}) or add queries"
            if num_queries >= 4
            else f"--tune: {num_queries} queries cannot make 2 folds of at least 2 queries"
        )
    order = np.random.default_rng(seed).permutation(num_queries)
    return [np.sort(part) for part in np.array_split(order, folds)]


def _rerank_grid(grid: Mapping[str, Sequence[Any]]) -> dict[str, tuple[Any, ...]]:
    out = {}
    for field, values in grid.items():
        if not field.startswith(RERANK_PREFIX):
            raise ValueError(f"{field}: the re-ranking grid holds rerank.* fields only")
        block, _, name = field[len(RERANK_PREFIX) :].partition(".")
        if block not in ("qe", "dba", "diffusion") or not name:
            raise ValueError(f"{field}: not a field of rerank.qe, rerank.dba or rerank.diffusion")
        out[f"{block}.{name}"] = tuple(values)
    return out


def _method_fields(method: str, fields: Sequence[str]) -> list[str]:
    """The grid fields `method` reads (those of the blocks of its steps)."""
    steps = pipeline.check_method(method, "method", none_word="plain").split("+")
    blocks = {pipeline.STEP_BLOCKS[s] for s in steps if s in pipeline.STEP_BLOCKS}
    return [f for f in fields if f.split(".")[0] in blocks]


def _with(settings: pipeline.RerankSettings, values: Mapping[str, Any]) -> pipeline.RerankSettings:
    d = settings.to_dict()
    for field, value in values.items():
        block, name = field.split(".")
        d[block][name] = value
    return pipeline.RerankSettings.from_config(d)


def _grid_aps(
    variants, dbs, methods, base, fields, pgnd
) -> dict[tuple[int, str, tuple], np.ndarray]:
    """AP per query under one protocol, for each (variant, method, values of the grid fields
    the method reads): one ranking each."""
    aps = {}
    for v, (variant, db) in enumerate(zip(variants, dbs, strict=True)):
        for method in methods:
            mf = _method_fields(method, list(fields))
            for values in itertools.product(*(fields[f] for f in mf)):
                settings = _with(base, dict(zip(mf, values, strict=True)))
                ranks = _full_rankings(method, variant.queries, db, settings, variant)
                aps[(v, method, values)] = metrics.compute_map(ranks, pgnd, kappas=())[1]
    return aps


def _full_rankings(method, queries, db, settings, variant) -> np.ndarray:
    ranks = pipeline.rerank(method, queries, db, settings).ids
    if len(variant.missing):
        ranks = rankings_with_missing(
            ranks, variant.missing, db.index.ntotal + len(variant.missing)
        )
    return ranks


@dataclasses.dataclass
class TuneResult:
    """What `cross_validate` returns.

    Attributes:
      settings: every full setting of the grid, in order: {'variant': i, field: value, ...}.
      scores: float64 `[S, Q]`: each setting's score (mean AP over the methods) per query
        (NaN where a query has no positives under the protocol).
      folds: the folds' query ids.
      chosen: the setting index each fold's rows were ranked with (chosen on the others).
      best: the setting index chosen on all the queries (the one to keep).
      results: {method: metrics} of the cross-validated rankings (as `evaluate_methods`).
      rankings: {method: int `[Q, N]`} the cross-validated rankings.
      seconds: time spent ranking the grid.
    """

    settings: list[dict[str, Any]]
    scores: np.ndarray
    folds: list[np.ndarray]
    chosen: list[int]
    best: int
    results: dict[str, Any]
    rankings: dict[str, np.ndarray]
    seconds: float


def choose(scores: np.ndarray, queries: np.ndarray) -> int:
    """The setting with the best mean score over `queries` (the first of equal ones).

    Args:
      scores: `[S, Q]` per-setting, per-query scores (NaN: a query without positives).
      queries: the query ids it may look at.
    """
    sub = scores[:, np.asarray(queries, np.int64)]
    with np.errstate(invalid="ignore"):
        valid = ~np.isnan(sub)
        means = np.where(
            valid.any(axis=1), np.nansum(sub, axis=1) / np.maximum(valid.sum(1), 1), -np.inf
        )
    return int(np.argmax(means))


def cross_validate(
    variants: Sequence[Variant],
    gnd: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str],
    base: pipeline.RerankSettings,
    grid: Mapping[str, Sequence[Any]],
    folds: int = 5,
    seed: int = 0,
    protocol: str = "medium",
    kappas: Sequence[int] = (1, 5, 10),
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
    databases: Sequence[pipeline.Database] | None = None,
) -> TuneResult:
    """Scores every setting of the grid on every query, then cross-validates the choice.

    Args:
      variants: the descriptor sets to choose among (one at least).
      gnd: the revisited ground truth (Q entries).
      methods: the table's methods ('plain' included or not: it scores the variants).
      base: the settings the grid varies (every field resolved: no 'auto').
      grid: {'rerank.<block>.<field>': values}; values as the config takes them.
      folds, seed: the folds (`folds_of`).
      protocol: 'easy', 'medium' or 'hard': the mAP settings are chosen by.
      kappas, original_gnd, original_queries: as `evaluate_methods` (for the table).
      databases: a prepared `pipeline.Database` per variant (None: built here).

    Returns:
      A `TuneResult`.
    """
    if protocol not in metrics.PROTOCOLS:
        raise ValueError(f"tune.protocol {protocol!r}; valid: {', '.join(metrics.PROTOCOLS)}")
    fields = _rerank_grid(grid)
    parts = folds_of(len(gnd), folds, seed)
    for m in methods:
        pipeline.check_method(m, "method", none_word="plain")
    pgnd = metrics.revisited_gnd(gnd, protocol)
    dbs = list(databases) if databases else [pipeline.Database(v.database) for v in variants]
    t0 = time.perf_counter()
    # Hundreds of 20-iteration solves: their convergence notes would drown the table.
    quiet = logging.getLogger("cbir_tf.rerank.diffusion")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        aps = _grid_aps(variants, dbs, methods, base, fields, pgnd)
    finally:
        quiet.setLevel(level)
    seconds = time.perf_counter() - t0
    names = list(fields)
    settings_list, rows = [], []
    for v in range(len(variants)):
        for values in itertools.product(*(fields[f] for f in names)):
            choice = dict(zip(names, values, strict=True))
            per_method = [
                aps[(v, m, tuple(choice[f] for f in _method_fields(m, names)))] for m in methods
            ]
            settings_list.append({"variant": v, **choice})
            rows.append(np.mean(per_method, axis=0))
    scores = np.asarray(rows, np.float64)
    everything = np.arange(len(gnd))
    chosen = [choose(scores, np.setdiff1d(everything, part)) for part in parts]
    results, rankings = _cross_validated_table(
        variants, dbs, gnd, methods, base, settings_list, parts, chosen, kappas, original_gnd,
        original_queries,
    )  # fmt: skip
    log.info("tune: %d settings x %d queries ranked in %.1f s", len(rows), len(gnd), seconds)
    return TuneResult(
        settings_list, scores, parts, chosen, choose(scores, everything), results, rankings,
        round(seconds, 1),
    )  # fmt: skip


def _cross_validated_table(
    variants, dbs, gnd, methods, base, settings_list, parts, chosen, kappas, original_gnd,
    original_queries,
):  # fmt: skip
    """Each fold's rows ranked with its own chosen setting, then scored as one table."""
    rankings: dict[str, np.ndarray] = {}
    for part, c in zip(parts, chosen, strict=True):
        choice = dict(settings_list[c])
        v = choice.pop("variant")
        settings = _with(base, choice)
        for method in methods:
            ranks = _full_rankings(method, variants[v].queries[part], dbs[v], settings, variants[v])
            if method not in rankings:
                rankings[method] = np.empty((len(gnd), ranks.shape[1]), np.int64)
            rankings[method][part] = ranks
    results = {}
    for method in methods:
        res = evaluate_rankings(rankings[method], gnd, kappas, original_gnd, original_queries)
        res["info"] = {"folds": [settings_list[c] for c in chosen]}
        results[method] = res
    return results, rankings
