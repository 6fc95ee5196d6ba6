"""The benchmark run: descriptors → search → re-ranking → Revisited Oxford/Paris metrics.

Each stage is a plain function over arrays so that it can run alone: `evaluate_methods` needs
only query and database descriptors and the ground truth; `benchmark_descriptors` produces
those descriptors (extracting them, or reusing a finished store); `run_benchmark` wires both
to a config and writes the report. `evaluate.py` only parses flags and calls `run_benchmark`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf import metrics, search
from cbir_tf.rerank import diffusion as diffusion_lib
from cbir_tf.rerank import query_expansion

log = logging.getLogger(__name__)

METHODS = ("plain", "aqe", "diffusion", "aqe+diffusion")

# The literature learns whitening on the other landmark dataset (Radenović et al.), so that
# nothing is learned on the test images.
_OTHER_DATASET = {"rparis6k": "roxford5k", "roxford5k": "rparis6k"}


# --------------------------------------------------------------------------------------------
# Ranking and metrics (numpy only)
# --------------------------------------------------------------------------------------------


def _ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    # Stable sort: equal scores keep database order, as `search.rank_all` breaks ties.
    return np.argsort(-scores, axis=1, kind="stable").astype(np.int64)


def rank_method(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    rerank_cfg: Mapping[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Full rankings of `database` for `queries` under one retrieval method.

    Args:
      method: 'plain', 'aqe', 'diffusion' or 'aqe+diffusion' (α-QE on the queries first).
      queries: float32 [Q, D], L2-normalised.
      database: float32 [N, D], L2-normalised.
      rerank_cfg: the config's `rerank` block (fields `qe.n`, `qe.alpha`, `diffusion.*`).

    Returns:
      (ranks int64 [Q, N] best first, info dict: timings and, for diffusion, convergence).
    """
    parts = method.split("+")
    unknown = [p for p in parts if p not in ("plain", "aqe", "diffusion")]
    if unknown or not parts:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    q = queries
    if "aqe" in parts:
        qe = rerank_cfg["qe"]
        q = query_expansion.alpha_query_expansion(
            q, database, n=int(qe["n"]), alpha=float(qe["alpha"])
        )
    if "diffusion" in parts:
        d = rerank_cfg["diffusion"]
        scores, dinfo = diffusion_lib.diffusion_scores(
            q,
            database,
            k=int(d["k"]),
            kq=int(d["kq"]),
            gamma=float(d["gamma"]),
            alpha=float(d["alpha"]),
            max_iter=int(d["max_iter"]),
            tol=float(d["tol"]),
            truncate=int(d["truncate"]) or None,
            return_info=True,
        )
        ranks = _ranks_from_scores(scores)
        info["diffusion"] = _diffusion_info(dinfo)
    else:
        ranks, _ = search.rank_all(q, database)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return ranks, info


def _diffusion_info(dinfo: Any) -> dict[str, Any]:
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


def evaluate_methods(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str] = METHODS,
    rerank_cfg: Mapping[str, Any],
    kappas: Sequence[int] = (1, 5, 10),
    original_gnd: Sequence[Mapping[str, Any]] | None = None,
    original_queries: Sequence[int] | None = None,
    missing: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates every retrieval method on one benchmark.

    Args:
      queries: float32 [Q, D] query descriptors, row i for query i of `gnd`.
      database: float32 [N, D] database descriptors, row j for image j of the ground truth.
      gnd: revisited ground truth (list of Q dicts).
      methods: names accepted by `rank_method`.
      rerank_cfg: the config's `rerank` block.
      kappas: the k of mP@k.
      original_gnd, original_queries: see `evaluate_rankings`.
      missing: ground-truth ids of database images without a descriptor (see `align_rows`);
        `database` then holds only the present ones, in ground-truth order.

    Returns:
      (results {method: {'revisited', 'original', 'info'}}, rankings {method: int [Q, N]}).
    """
    if len(queries) != len(gnd):
        raise ValueError(
            f"{len(queries)} query descriptors for {len(gnd)} queries in the ground truth"
        )
    search.validate_descriptors(queries, "queries")
    search.validate_descriptors(database, "database")
    results: dict[str, Any] = {}
    rankings: dict[str, np.ndarray] = {}
    for method in methods:
        ranks, info = rank_method(method, queries, database, rerank_cfg)
        if missing is not None and len(missing):
            ranks = rankings_with_missing(ranks, missing, len(database) + len(missing))
        res = evaluate_rankings(ranks, gnd, kappas, original_gnd, original_queries)
        res["info"] = info
        results[method] = res
        rankings[method] = ranks
        log.info("%s: mAP M %.2f (%.1f s)", method, 100 * res["revisited"]["medium"]["map"],
                 info["seconds"])
    return results, rankings


# --------------------------------------------------------------------------------------------
# Precomputed descriptors
# --------------------------------------------------------------------------------------------


def load_mat_descriptors(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Loads revisitop-style `.mat` descriptors: `X` database and `Q` queries, both [D, N].

    Args:
      path: a MATLAB file (v5 via scipy, or v7.3/HDF5 via h5py).

    Returns:
      (database float32 [N, D], queries float32 [Q, D]), converted to the project's row layout.
    """
    path = os.fspath(path)
    try:
        import scipy.io

        data = scipy.io.loadmat(path)
        x, q = data.get("X"), data.get("Q")
    except NotImplementedError:  # v7.3 files are HDF5
        import h5py

        with h5py.File(path, "r") as f:
            # MATLAB writes column-major arrays: h5py sees them transposed, i.e. already [N, D].
            x = np.asarray(f["X"]).T if "X" in f else None
            q = np.asarray(f["Q"]).T if "Q" in f else None
    if x is None or q is None:
        raise ValueError(f"{path}: a descriptor .mat file needs variables 'X' and 'Q' ([D, N])")
    x, q = np.asarray(x, np.float32), np.asarray(q, np.float32)
    if x.ndim != 2 or q.ndim != 2 or x.shape[0] != q.shape[0]:
        raise ValueError(
            f"{path}: 'X' {x.shape} and 'Q' {q.shape} must be [D, N] and [D, Q] with the same D"
        )
    return np.ascontiguousarray(x.T), np.ascontiguousarray(q.T)


def align_rows(
    descriptors: np.ndarray, ids: Sequence[str], expected_ids: Sequence[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reorders store rows to the ground truth's image order.

    Images that could not be read were skipped at extraction. A missing database image is
    ranked after every present one for every method (`rankings_with_missing`), i.e. it counts
    as never retrieved: the honest reading; the caller reports how many. A missing query is
    fatal, since its AP cannot be computed.

    Args:
      descriptors: float32 [M, D] rows of a store.
      ids: the store's M image ids.
      expected_ids: the ground truth's image names, in its order.
      what: 'database' or 'queries' (for the messages).

    Returns:
      (float32 [P, D] the present rows in ground-truth order, int64 [len(expected) - P] the
      ground-truth indices of the missing images).
    """
    pos = {name: i for i, name in enumerate(ids)}
    rows = np.array([pos.get(name, -1) for name in expected_ids], dtype=np.int64)
    missing = np.flatnonzero(rows < 0)
    if len(missing) and what == "queries":
        names = [expected_ids[i] for i in missing[:5]]
        raise ValueError(
            f"{len(missing)} query images have no descriptor (first: {names}); every query of "
            "the benchmark is needed: check the skipped-images summary of the extraction and "
            "fix or re-download those files"
        )
    return np.asarray(descriptors)[rows[rows >= 0]].astype(np.float32, copy=False), missing


def rankings_with_missing(ranks: np.ndarray, missing: np.ndarray, n_total: int) -> np.ndarray:
    """Maps rankings over the present database rows back to all `n_total` ids, missing last.

    Args:
      ranks: int [Q, P] rankings over the present rows (0..P-1).
      missing: int [n_total - P] ground-truth indices with no descriptor.
      n_total: number of database images in the ground truth.

    Returns:
      int64 [Q, n_total] rankings in ground-truth ids.
    """
    if len(missing) == 0:
        return ranks
    present = np.setdiff1d(np.arange(n_total), missing)
    tail = np.broadcast_to(np.asarray(missing, np.int64), (len(ranks), len(missing)))
    return np.concatenate([present[ranks], tail], axis=1)
