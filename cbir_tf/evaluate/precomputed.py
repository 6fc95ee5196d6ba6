"""Descriptors computed elsewhere, for `evaluate.py --descriptors`: a revisitop `.mat` file or a
folder of stores (`db/`, `queries/`) written by `extract.py --dataset`, aligned to the ground
truth's order (numpy).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


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


def load_precomputed(
    path: str, ds: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Loads precomputed descriptors: a `.mat` file or a folder with `db/` and `queries/` stores.

    Returns:
      (database [P, D], queries [Q, D], missing database ids, meta).
    """
    from cbir_tf.store import files as store
    from cbir_tf.store.meta import check_compatible

    if path.endswith(".mat"):
        x, q = load_mat_descriptors(path)
        if len(x) != ds.num_images or len(q) != ds.num_queries:
            raise ValueError(
                f"{path}: {len(x)} database and {len(q)} query descriptors, but {ds.name} has "
                f"{ds.num_images} database images and {ds.num_queries} queries"
            )
        return x, q, np.zeros(0, np.int64), {"source": os.path.abspath(path), "format": "mat"}
    db_dir, q_dir = os.path.join(path, "db"), os.path.join(path, "queries")
    if not (os.path.isdir(db_dir) and os.path.isdir(q_dir)):
        raise FileNotFoundError(
            f"{path}: expected a descriptor folder with db/ and queries/ stores (as written by "
            "extract.py --dataset=...) or a .mat file"
        )
    x, x_ids, x_meta = store.load_store(db_dir)
    q, q_ids, q_meta = store.load_store(q_dir)
    check_compatible(x_meta, q_meta)
    x, missing = align_rows(x, x_ids, list(ds.imlist), "database")
    q, _ = align_rows(q, q_ids, list(ds.qimlist), "queries")
    return x, q, missing, dict(x_meta, source=os.path.abspath(path), format="store")
