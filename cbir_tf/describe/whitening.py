"""Learned PCA-whitening of descriptors (numpy).

Whitening is learned on descriptors (or regional vectors) of a separate image set, as in the
literature (learn on Oxford, apply to Paris and vice versa), then applied either here, with
`apply_whitening` / `apply_regional_whitening`, or inside a model as a
`cbir_tf.describe.layers.PCAWhitening` layer (`PCAWhitening.from_whitening(w)`); both give the
same numbers.

Learning follows cnnimageretrieval-pytorch's `pcawhitenlearn` (Jégou & Chum, ECCV 2012): centre,
covariance over N samples, eigendecomposition, eigenvectors ordered by decreasing eigenvalue and
scaled by eigenvalue^-1/2, so that the whitened training set has identity covariance. The
reference stores P [d, D] and applies P (x - m) to [D, N] columns; here the projection is its
transpose, [D, d], applied to rows: y = (x - mean) @ projection.

Two additions over the reference, both off or harmless by default:
  * `shrinkage` s in [0, 1] scales component i by eigenvalue_i^-(1 - s)/2 instead of ^-1/2:
    s = 0 is full whitening, s = 1 a plain PCA rotation, values between a partial whitening that
    boosts weak components less (the "power" whitening of Jégou & Chum).
  * eigenvalues below `eig_floor` times the largest are raised to that floor before the scaling,
    so a rank-deficient training set (N <= D, typical for regional whitening on few images)
    does not divide by ~0 and turn numerical noise into the dominant components.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbir_tf.fileio import atomic_save_npz, json_safe

_EPS = 1e-6  # added to norms, as the reference's l2n


@dataclasses.dataclass
class Whitening:
    """A learned whitening: y = (x - mean) @ projection.

    Attributes:
      mean: float32 [D], mean of the training vectors.
      projection: float32 [D, d], columns = eigenvectors (by decreasing eigenvalue) scaled by
        the whitening power of their eigenvalue.
      eigenvalues: float64 [d], covariance eigenvalues of the kept components (before flooring).
      info: JSON-serialisable facts about how it was learned (num_samples, input_dim, output_dim,
        shrinkage, eig_floor, num_floored, explained_variance, plus anything the caller adds,
        e.g. the training dataset's name).
    """

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float32)
        self.projection = np.asarray(self.projection, np.float32)
        self.eigenvalues = np.asarray(self.eigenvalues, np.float64)
        if self.mean.ndim != 1 or self.projection.ndim != 2:
            raise ValueError(
                f"mean must be [D] and projection [D, d]; got {self.mean.shape} and "
                f"{self.projection.shape}"
            )
        if self.projection.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"projection {self.projection.shape} does not match mean {self.mean.shape}"
            )
        if self.eigenvalues.shape != (self.projection.shape[1],):
            raise ValueError(
                f"eigenvalues {self.eigenvalues.shape} do not match projection "
                f"{self.projection.shape}"
            )
        self.info = dict(self.info)

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """{'mean', 'projection', 'eigenvalues' (numpy arrays), 'info' (dict)}."""
        return {
            "mean": self.mean,
            "projection": self.projection,
            "eigenvalues": self.eigenvalues,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Whitening:
        """Inverse of `to_dict` (arrays may be lists, e.g. after JSON)."""
        missing = {"mean", "projection", "eigenvalues"} - set(d)
        if missing:
            raise ValueError(f"whitening dict lacks {sorted(missing)}")
        return cls(
            mean=np.asarray(d["mean"]),
            projection=np.asarray(d["projection"]),
            eigenvalues=np.asarray(d["eigenvalues"]),
            info=dict(d.get("info") or {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes an `.npz` atomically (arrays plus `info` as a JSON string; never pickled)."""
        atomic_save_npz(
            path,
            mean=self.mean,
            projection=self.projection,
            eigenvalues=self.eigenvalues,
            info_json=np.array(json.dumps(json_safe(self.info))),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        """Reads a file written by `save` (allow_pickle=False).

        Raises:
          ValueError: the file lacks an array or the shapes are inconsistent.
        """
        with np.load(os.fspath(path), allow_pickle=False) as data:
            missing = {"mean", "projection", "eigenvalues"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a whitening file: it lacks {sorted(missing)}")
            info = json.loads(str(data["info_json"])) if "info_json" in data.files else {}
            return cls(
                mean=data["mean"],
                projection=data["projection"],
                eigenvalues=data["eigenvalues"],
                info=info,
            )


def _l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + _EPS)


def learn_pca_whitening(
    X: np.ndarray,
    dim: int = 0,
    shrinkage: float = 0.0,
    eig_floor: float = 1e-5,
    info: dict[str, Any] | None = None,
) -> Whitening:
    """Learns PCA-whitening from training vectors (reference `pcawhitenlearn`).

    With C the covariance (divided by N, as the reference) and C = V diag(lambda) V^T sorted by
    decreasing lambda, the projection's i-th column is v_i * max(lambda_i, f)^(-(1 - s) / 2) with
    f = eig_floor * lambda_1 and s = shrinkage. With s = 0 and no floored eigenvalue the whitened
    training vectors have identity covariance. Each eigenvector's sign is fixed (largest-magnitude
    component positive) so the result does not depend on the LAPACK build.

    Args:
      X: float [N, D] training vectors, e.g. L2-normalised descriptors of another dataset
        (N >= 2; N < D is allowed, see `eig_floor`).
      dim: number of output dimensions d (top components); 0 keeps all D.
      shrinkage: s in [0, 1]; 0 full whitening, 1 PCA rotation without scaling.
      eig_floor: relative floor for eigenvalues before the scaling. With N <= D at least D - N + 1
        eigenvalues are zero up to rounding (~1e-16 * lambda_1); whitening them would multiply
        numerical noise by ~1e8. The floor caps the boost of any direction at
        eig_floor^-(1-s)/2 (about 316x for 1e-5) relative to the strongest one. 0 disables it.
      info: extra facts to record (e.g. {'dataset': 'roxford5k'}).

    Returns:
      A Whitening with mean [D], projection [D, d] (float32) and the kept eigenvalues [d].

    Raises:
      ValueError: bad shapes, non-finite values, dim out of range, shrinkage outside [0, 1].
    """
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [N, D], got shape {X.shape}")
    n, d_in = X.shape
    if n < 2:
        raise ValueError(f"need at least 2 training vectors, got {n}")
    if not np.all(np.isfinite(X)):
        bad = np.flatnonzero(~np.all(np.isfinite(X), axis=1))
        raise ValueError(f"X has NaN/Inf in rows {bad[:10].tolist()} ({bad.size} rows)")
    dim = int(dim) or d_in
    if not 1 <= dim <= d_in:
        raise ValueError(f"dim must be in [0, {d_in}] (0 = all), got {dim}")
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if eig_floor < 0:
        raise ValueError(f"eig_floor must be >= 0, got {eig_floor}")

    mean = X.mean(axis=0)
    centred = X - mean
    cov = centred.T @ centred
    cov = (cov + cov.T) / (2.0 * n)  # symmetrise exactly, as the reference
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals = eigvals[order]
    eigvecs = eigvecs[:, order]
    signs = np.sign(eigvecs[np.argmax(np.abs(eigvecs), axis=0), np.arange(d_in)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)

    top = max(float(eigvals[0]), np.finfo(np.float64).tiny)
    floor = float(eig_floor) * top
    floored = np.maximum(eigvals, floor) if floor > 0 else eigvals
    if np.any(floored[:dim] <= 0):
        raise ValueError(
            "covariance has zero eigenvalues among the kept components (constant or duplicated "
            "training vectors?); set eig_floor > 0 or a smaller dim"
        )
    scale = floored[:dim] ** (-(1.0 - float(shrinkage)) / 2.0)
    projection = eigvecs[:, :dim] * scale[None, :]
    total = float(np.sum(np.maximum(eigvals, 0.0)))
    facts = {
        "method": "pca",
        "num_samples": int(n),
        "input_dim": int(d_in),
        "output_dim": int(dim),
        "shrinkage": float(shrinkage),
        "eig_floor": float(eig_floor),
        "num_floored": int(np.sum(eigvals[:dim] < floor)),
        "explained_variance": float(np.sum(np.maximum(eigvals[:dim], 0.0)) / total)
        if total > 0
        else 0.0,
    }
    facts.update(info or {})
    return Whitening(mean=mean, projection=projection, eigenvalues=eigvals[:dim], info=facts)


def learn_regional_whitening(
    regions: np.ndarray | Sequence[np.ndarray],
    dim: int = 0,
    shrinkage: float = 0.0,
    eig_floor: float = 1e-5,
    info: dict[str, Any] | None = None,
) -> Whitening:
    """Learns whitening on L2-normalised regional vectors (R-MAC, Tolias et al., ICLR 2016).

    Args:
      regions: raw region MACs (`RMAC(return_regions=True)` output): float [N, R, D], a flat
        [M, D] array of region vectors, or a sequence of [R_i, D] arrays (images of different
        sizes have different R). Each vector is L2-normalised before learning, as it is before
        the whitening in `apply_regional_whitening` and the model's layer chain; learning on
        raw vectors instead would centre and scale the wrong distribution.
      dim, shrinkage, eig_floor, info: as `learn_pca_whitening`.

    Returns:
      A Whitening for `apply_regional_whitening` or the regional PCAWhitening layer.
    """
    if isinstance(regions, np.ndarray):
        if regions.ndim not in (2, 3):
            raise ValueError(f"regions must be [N, R, D] or [M, D], got shape {regions.shape}")
        flat = regions.reshape(-1, regions.shape[-1])
    else:
        flat = np.concatenate([np.asarray(r).reshape(-1, np.shape(r)[-1]) for r in regions])
    facts = {"regional": True}
    facts.update(info or {})
    return learn_pca_whitening(
        _l2n(np.asarray(flat, np.float64)), dim, shrinkage, eig_floor, info=facts
    )


def apply_whitening(X: np.ndarray, w: Whitening, l2: bool = True) -> np.ndarray:
    """Whitens descriptors: (X - mean) @ projection, then L2-normalises (reference `whitenapply`).

    Args:
      X: float [N, D] descriptors (usually L2-normalised).
      w: the learned Whitening (D = w.input_dim).
      l2: L2-normalise the output rows (norm + 1e-6, as the reference).

    Returns:
      float32 [N, d].
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != w.input_dim:
        raise ValueError(f"X must be [N, {w.input_dim}], got shape {X.shape}")
    y = (X.astype(np.float64) - w.mean) @ w.projection.astype(np.float64)
    if l2:
        y = _l2n(y)
    return y.astype(np.float32)


def apply_regional_whitening(R: np.ndarray, w: Whitening) -> np.ndarray:
    """Classic regional whitening of R-MAC: L2 -> whiten -> L2 -> sum over regions -> L2.

    Args:
      R: float [N, R, D] raw region vectors (`RMAC(return_regions=True)` output).
      w: a Whitening learned on L2-normalised region vectors (`learn_regional_whitening`).

    Returns:
      float32 [N, d] L2-normalised descriptors, the same numbers as the layer chain
      L2Normalization -> PCAWhitening -> L2Normalization -> SumRegions -> L2Normalization.
    """
    R = np.asarray(R)
    if R.ndim != 3 or R.shape[2] != w.input_dim:
        raise ValueError(f"R must be [N, R, {w.input_dim}], got shape {R.shape}")
    y = (_l2n(R.astype(np.float64)) - w.mean) @ w.projection.astype(np.float64)
    return _l2n(_l2n(y).sum(axis=1)).astype(np.float32)
