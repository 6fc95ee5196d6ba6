"""One retrieval method's rankings of a benchmark, and their Revisited Oxford/Paris metrics.

`rank_method` ranks the whole database for every query under one method of
`cbir_tf.rerank.pipeline.METHODS`; `evaluate_rankings` scores rankings with the revisited
protocols (Easy, Medium, Hard) and the original one. Both are plain functions over arrays, used by
the in-memory evaluation (`cbir_tf.evaluate.methods`) and the one with distractors
(`cbir_tf.evaluate.distractors`) alike. numpy only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.evaluate import metrics
from cbir_tf.rerank import pipeline

log = logging.getLogger(__name__)


def rank_method(
    method: str,
    queries: np.ndarray,
    database: np.ndarray | pipeline.Database,
    rerank_cfg: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Full rankings of `database` for `queries` under one retrieval method.

    Args:
      method: a name of `pipeline.METHODS`, 'plain' for no re-ranking (e.g. 'aqe+diffusion').
      queries: float32 [Q, D], L2-normalised.
      database: float32 [N, D], L2-normalised (or a `pipeline.Database`, reused across methods).
      rerank_cfg: the config's `rerank` block (or `pipeline.RerankSettings`).

    Returns:
      (ranks int64 [Q, N] best first, info dict: timings and, for diffusion, convergence).
    """
    pipeline.check_method(method, "method", none_word="plain")
    settings = pipeline.RerankSettings.from_config(rerank_cfg)
    t0 = time.perf_counter()
    ranking = pipeline.rerank(method, queries, database, settings)
    info: dict[str, Any] = {}
    if ranking.cg is not None:
        info["diffusion"] = diffusion_info(ranking.cg)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    retrieved = np.isfinite(ranking.scores).sum(axis=1)
    if (retrieved < ranking.ids.shape[1]).any():  # an approximate index missed rows
        info["retrieved"] = retrieved
    return ranking.ids, info


def not_retrieved_last(
    ranks: np.ndarray, retrieved: np.ndarray, targets: Sequence[np.ndarray]
) -> np.ndarray:
    """Rankings `[Q, N]` whose targets (ground-truth ids) past each query's `retrieved` head
    move to the end: an approximate search never found them (rows it missed come in row order,
    which must not favour the ground truth's images)."""
    out = np.array(ranks, np.int64)
    for q, (c, t) in enumerate(zip(retrieved, targets, strict=True)):
        tail = out[q, int(c) :]
        late = np.isin(tail, t)
        out[q, int(c) :] = np.concatenate([tail[~late], tail[late]])
    return out


def diffusion_info(dinfo: Any) -> dict[str, Any]:
    """Summarises the solver report so that non-convergence shows in the results."""
    if dataclasses.is_dataclass(dinfo):
        dinfo = dataclasses.asdict(dinfo)
    elif not isinstance(dinfo, Mapping):
        dinfo = dict(vars(dinfo))
    out: dict[str, Any] = {}
    for key, value in dinfo.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            out[key] = arr.item()
        elif arr.dtype == bool:
            out[key] = {"all": bool(arr.all()), "count_false": int((~arr).sum())}
        elif np.issubdtype(arr.dtype, np.number) and arr.size:
            out[key] = {"max": float(arr.max()), "mean": float(arr.mean())}
    return out


def evaluate_rankings(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int],
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Revisited E/M/H metrics, and the original protocol when its ground truth is given.

    Args:
      ranks: int [Q, N] rankings of every query of the revisited ground truth.
      gnd: the revisited ground truth, one dict (easy/hard/junk) per query.
      kappas: the k of mP@k.
      original_gnd: the original protocol's ground truth (ok/junk per query) or None.
      original_queries: rows of `ranks` that `original_gnd` covers, in its order
        (None: all rows, in order).

    Returns:
      {'revisited': {protocol: metrics}, 'original': metrics or None}.
    """
    out: dict[str, Any] = {"revisited": metrics.evaluate_revisited(ranks, gnd, kappas=kappas)}
    out["original"] = None
    if original_gnd is not None:
        rows = np.arange(len(ranks)) if original_queries is None else np.asarray(original_queries)
        mp, aps, mpr, prs = metrics.compute_map(
            ranks[rows], metrics.original_gnd(original_gnd), kappas=kappas
        )
        out["original"] = {"map": mp, "aps": aps, "mpr": mpr, "prs": prs}
    return out


def warn_unless_unit_norm(x: np.ndarray, name: str) -> None:
    """Logs a warning when rows of `x` [N, D] are not unit vectors (what re-ranking assumes)."""
    # Scores, query expansion weights and diffusion affinities all assume unit vectors; rows of
    # another length (e.g. a random network whose activations vanish under the L2 eps) give
    # numbers that mean little, which the user must hear about.
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        log.warning(
            "%d of %d %s descriptors are not L2-normalised (norms %.3g to %.3g): scores and "
            "re-ranking assume unit vectors (random weights give vanishing activations)",
            int(off.sum()),
            len(norms),
            name,
            norms.min(),
            norms.max(),
        )
