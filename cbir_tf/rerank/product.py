"""Y = S @ P for a sparse S and a dense P of many columns: cache-blocked, multi-threaded.

The product behind diffusion's CG iterations (`diffusion.DiffusionOperator`): S is read once per
product for all columns of P, in column blocks whose slice of P stays in cache, over row ranges
run in the solver's thread pool (`cg.thread_pool`).

The kernel is scipy's own `csr_matvecs` (behind `csr_matrix @ dense`), which adds into a given
output; it is private, so the public product (a temporary per block, then an add) is the
fallback.
Kept because measured faster: 1.2-1.4x per product (benchmarks/sparse_kernel.py, 2 cores).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cbir_tf.rerank import cg

__all__ = ["BlockedSparseProduct"]

try:
    # Private, but unchanged for a decade; the public product is the fallback.
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover
    _csr_matvecs = None


class BlockedSparseProduct:
    """Y = S @ P for a sparse S and a dense, many-column P: cache-blocked and multi-threaded.

    scipy multiplies a CSR matrix by a dense [N, Q] array row by row, reading for every
    non-zero S[i, j] the whole row P[j] (Q values) at a random place. Once P outgrows the CPU
    cache (N = 100 000, Q = 70: 56 MB) each of those reads misses and the product becomes
    slower than Q separate matrix-vector products. Splitting S into column blocks whose slice of
    P fits in `cache_bytes` keeps those reads in cache, while S is still read once per product
    for all columns; each block costs one more pass over Y. Rows are also split into `threads`
    ranges of equal non-zero counts, run in parallel (scipy's kernels release the GIL), each
    writing its own rows of Y.

    Args:
      matrix: sparse S `[N, M]` (made CSR).
      cache_bytes: bytes of P per column block; default by P's size (see `_SMALL_P`).
      threads: row ranges run in parallel; default `cg.num_threads()`.
    """

    _MIN_WORK = 1 << 21  # multiply-adds per row range (tuned on 2 and 16 cores)
    # Default bytes of P per column block. A P larger than `_SMALL_P` gets slices that fit a
    # share of the last-level cache: the memory reads they save outweigh the extra passes over
    # Y. A smaller P, in the last-level cache anyway, gets slices that fit a core's L2, and the
    # extra passes over Y stay in the last-level cache (figures:
    # benchmarks/results/diffusion_design.md).
    _LLC_BLOCK = 6 << 20
    _L2_BLOCK = 1 << 20
    _SMALL_P = 8 << 20

    def __init__(
        self, matrix: sp.spmatrix, cache_bytes: int | None = None, threads: int | None = None
    ):
        self.matrix = sp.csr_matrix(matrix)
        self.cache_bytes = None if cache_bytes is None else int(cache_bytes)
        self.threads = max(1, int(threads if threads is not None else cg.num_threads()))
        self._parts: list[tuple[int, int, list[tuple[int, int, sp.csr_matrix]]]] | None = None

    def _block_bytes(self, q: int) -> int:
        if self.cache_bytes is not None:
            return self.cache_bytes
        small = 8 * self.matrix.shape[1] * q <= self._SMALL_P
        return self._L2_BLOCK if small else self._LLC_BLOCK

    def _split(self, block_cols: int, q: int) -> list:
        n_rows, n_cols = self.matrix.shape
        indptr = self.matrix.indptr
        # Row ranges with about the same number of non-zeros each, at least _MIN_WORK
        # multiply-adds per range: smaller ones cost more in scheduling and GIL hand-offs
        # than they save.
        count = max(1, min(self.threads, self.matrix.nnz * q // self._MIN_WORK))
        targets = np.linspace(0, indptr[-1], count + 1)[1:-1]
        bounds = np.unique(np.concatenate([[0], np.searchsorted(indptr, targets), [n_rows]]))
        parts = []
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
            rows = self.matrix[r0:r1]
            blocks = [
                (c0, min(n_cols, c0 + block_cols), rows[:, c0 : c0 + block_cols].tocsr())
                for c0 in range(0, n_cols, block_cols)
            ]
            parts.append((int(r0), int(r1), blocks))
        return parts

    def __call__(
        self,
        p: np.ndarray,
        out: np.ndarray | None = None,
        *,
        scale: float = 1.0,
        shift: float = 0.0,
        col_dots: bool = False,
    ):
        """(shift I + scale S) p for p `[N, q]`, the terms added row range by row range.

        Args:
          p: float `[N, q]`.
          out: C-contiguous float64 `[N, q]` to write into (must not be p); default a new one.
          scale: factor of S p.
          shift: factor of p (1 with scale = -alpha gives the diffusion operator I - alpha S).
          col_dots: also return the column dot products of p and the result (CG's p'Mp),
            summed while each range of rows is in cache.

        Returns:
          `out`, float64 `[N, q]`; with col_dots, `(out, dots)` with dots float64 `[q]`.
        """
        p = np.ascontiguousarray(p, dtype=np.float64)
        n_rows, n_cols = self.matrix.shape
        q = p.shape[1]
        if out is None:
            out = np.empty((n_rows, q))
        elif out.shape != (n_rows, q) or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous float64 array of shape {(n_rows, q)}, got "
                f"{out.dtype} {out.shape}"
            )
        if q <= 1 or self.matrix.nnz * q < 1 << 16:
            np.copyto(out, self.matrix @ p)  # too small for blocking or threads to pay
            _affine(out, p, scale, shift)
            return (out, cg.column_dots(p, out)) if col_dots else out
        if self._parts is None:
            # Built once, for the widest P (the first call); narrower P only fit better.
            self._parts = self._split(max(1024, self._block_bytes(q) // (8 * q)), q)

        def run(part) -> np.ndarray | None:
            r0, r1, blocks = part
            rows = out[r0:r1]
            rows[...] = 0.0
            for c0, c1, block in blocks:
                pb = p[c0:c1]
                if _csr_matvecs is not None:
                    # Adds into `rows` in place: no [rows, Q] temporary per block.
                    _csr_matvecs(
                        r1 - r0, c1 - c0, q, block.indptr, block.indices, block.data,
                        pb.ravel(), rows.ravel(),
                    )  # fmt: skip
                else:
                    rows += block @ pb
            if scale == 1.0 and shift == 0.0 and not col_dots:
                return None
            dots = np.zeros(q) if col_dots else None
            for c in cg.row_chunks(slice(r0, r1), q):  # both steps while a chunk is in cache
                _affine(out[c], p[c], scale, shift)
                if col_dots:
                    dots += cg.column_dots(p[c], out[c])
            return dots

        if len(self._parts) == 1:
            dots = [run(self._parts[0])]
        else:
            dots = list(cg.thread_pool().map(run, self._parts))
        return (out, sum(dots[1:], dots[0])) if col_dots else out


def _affine(sp_rows: np.ndarray, p_rows: np.ndarray, scale: float, shift: float) -> None:
    """sp_rows <- shift p_rows + scale sp_rows, in place."""
    if scale != 1.0:
        sp_rows *= scale
    if shift != 0.0:
        if shift == 1.0:
            sp_rows += p_rows
        else:
            sp_rows += shift * p_rows
