"""Which approximate index fits a memory budget, with every byte a fast query touches counted.

An approximate query touches, per row of the collection:

- the coarse codes it scans in the inverted lists it probes: fast-scan PQ, 4 bits per
  sub-quantiser (`PQ{M}x4fs`, M / 2 bytes), stored in blocks of 32 rows (a list's last block
  is padded);
- the row's id beside them (8 bytes);
- the codes its candidates are re-scored from: an 8-, 6- or 4-bit scalar quantiser (D, 3D/4 or
  D/2 bytes), read for `refine * k` candidates, at random, so they must sit in memory;
- a share of what every query reads whole: the list centroids and their HNSW links, the PQ
  codebooks, the quantiser's ranges.

`search.ann.bytes_per_vector` is the budget for that total. The float32 store (4 D bytes a row)
is not read by approximate queries, and is not counted: it stays on disk for exact search.

The choices, best first. Re-scoring codes first: their precision caps the recall, whatever the
lists probed (tuned end to end at 1M x 512: SQ8 0.975, SQ6 0.947, SQ4 0.847, none 0.626;
`benchmarks/results/ann_budget600_2cores.md`); then the longest coarse codes, which need fewer
candidates; then more lists. Without re-scoring codes the coarse codes rank alone.

numpy only.
"""

from __future__ import annotations

import math
from typing import Any

KINDS = ("auto", "flat", "ivfpq")
# Re-scoring codes, best first: (faiss factory name, bits per dimension).
RESCORING = (("SQ8", 8), ("SQ6", 6), ("SQ4", 4), ("", 0))
ID_BYTES = 8  # faiss inverted lists store one int64 id per row
BLOCK_ROWS = 32  # fast-scan codes are stored in blocks of 32 rows
HNSW_LINK_BYTES = 320  # per centroid: HNSW32 links (64 at level 0, int32) and levels
MIN_TRAIN_PER_LIST = 39  # faiss's minimum of training rows per centroid
MIN_LISTS = 16


def list_count(n: int) -> int:
    """Inverted lists for N rows: a power of two near 2 sqrt(N), with at least
    `MIN_TRAIN_PER_LIST` rows per list (never fewer than `MIN_LISTS`).

    faiss's guideline is 4 to 16 sqrt(N); training k-means costs O(nlist^2 D) with 32 rows per
    list, and at 1M x 512 on 2 cores 4096 lists took 4 minutes to train (2048: one), while the
    fast-scan lists cost little to scan either way.
    """
    nlist = 1 << max(4, int(round(math.log2(2 * math.sqrt(max(n, 1))))))
    while nlist > MIN_LISTS and nlist * MIN_TRAIN_PER_LIST > n:
        nlist //= 2
    return nlist


def bytes_per_vector(n: int, d: int, *, m: int, nlist: int, rescoring_bits: int) -> dict:
    """The memory an IVF index with these parameters takes, per row, by part (estimated).

    Args:
      n, d: rows and dimension.
      m: fast-scan PQ sub-quantisers (m / 2 bytes a row).
      nlist: inverted lists.
      rescoring_bits: bits per dimension of the re-scoring codes (0: none).

    Returns:
      {'index': codes, ids, padding and the shared structures, 'rescoring': the re-scoring
      codes and their ranges, 'total'} in bytes per row.
    """
    codes = m / 2 + ID_BYTES + nlist * (BLOCK_ROWS / 2) * (m / 2) / n
    shared = (nlist * (4 * d + HNSW_LINK_BYTES) + 16 * 4 * d) / n  # centroids, PQ codebooks
    rescoring = (d * rescoring_bits / 8 + 8 * d / n) if rescoring_bits else 0.0
    index = codes + shared
    return {"index": index, "rescoring": rescoring, "total": index + rescoring}


def coarse_code_options(d: int) -> list[int]:
    """Fast-scan PQ sub-quantiser counts for dimension D, longest codes first (2 to 32 dims
    each; one dimension each for an odd D)."""
    return [d // s for s in (2, 4, 8, 16, 32) if d % s == 0] or [d]


def plan(n: int, d: int, *, kind: str, min_rows: int, budget: float) -> dict[str, Any]:
    """The index for N rows of dimension D under a memory budget.

    Args:
      n, d: rows and dimension.
      kind: 'auto' (flat below `min_rows`, else the best IVF index that fits, else flat),
        'flat' or 'ivfpq' (an IVF index, or ValueError when none fits).
      min_rows: the size from which 'auto' builds an IVF index.
      budget: bytes per row, everything a query touches (see the module docstring).

    Returns:
      {'kind', 'factory', 'nlist', 'm', 'rescoring', 'estimate'} ('estimate': bytes per row by
      part), plus 'fallback' (one line saying why) when 'auto' chose 'flat' past `min_rows`.

    Raises:
      ValueError: kind 'ivfpq' and no IVF index fits (the message says what would fit).
    """
    if kind not in KINDS:
        raise ValueError(f"search.ann.kind {kind!r} unknown; valid: {KINDS}")
    flat = {"kind": "flat", "factory": "", "nlist": 0, "m": 0, "rescoring": "", "estimate": {}}
    if kind == "flat" or (kind == "auto" and n < min_rows):
        return flat
    why = why_no_ivf(n, d, budget)
    if why is None:
        return _best_fit(n, d, budget)
    if kind == "ivfpq":
        raise ValueError(why)
    return {**flat, "fallback": f"{why}; exact search ('flat') is used instead"}


def _best_fit(n: int, d: int, budget: float) -> dict[str, Any]:
    nlist = list_count(n)
    for name, bits in RESCORING:
        for m in coarse_code_options(d):
            for lists in dict.fromkeys((nlist, max(MIN_LISTS, nlist // 2))):
                size = bytes_per_vector(n, d, m=m, nlist=lists, rescoring_bits=bits)
                if size["total"] <= budget:
                    factory = f"IVF{lists}_HNSW32,PQ{m}x4fs" + (f",Refine({name})" if name else "")
                    estimate = {k: round(v, 1) for k, v in size.items()}
                    return {"kind": "ivfpq", "factory": factory, "nlist": lists, "m": m,
                            "rescoring": name, "estimate": estimate}  # fmt: skip
    raise AssertionError("why_no_ivf said an index fits")


def smallest_budget(n: int, d: int) -> float:
    """Bytes per row of the smallest IVF index at N x D (the shortest codes, no re-scoring)."""
    nlist = list_count(n)
    m = coarse_code_options(d)[-1]
    lists = max(MIN_LISTS, nlist // 2)
    return bytes_per_vector(n, d, m=m, nlist=lists, rescoring_bits=0)["total"]


def why_no_ivf(n: int, d: int, budget: float) -> str | None:
    """One line saying why no IVF index fits N x D rows in `budget` (None when one does)."""
    options = coarse_code_options(d)
    if n < MIN_LISTS * MIN_TRAIN_PER_LIST:
        return (
            f"{n} rows are too few for an approximate index (an inverted file needs at least "
            f"{MIN_LISTS * MIN_TRAIN_PER_LIST}: {MIN_LISTS} lists of {MIN_TRAIN_PER_LIST} "
            "training rows)"
        )
    need = smallest_budget(n, d)
    if need > budget:
        with_rescoring = bytes_per_vector(
            n, d, m=options[min(1, len(options) - 1)], nlist=list_count(n),
            rescoring_bits=8,
        )["total"]  # fmt: skip
        return (
            f"search.ann.bytes_per_vector={budget:g} leaves no room for an approximate index "
            f"of {n} x {d} rows: the smallest takes {math.ceil(need)} bytes a vector (codes, "
            f"ids and the shared centroids), and one with SQ8 re-scoring codes (recall@10 up "
            f"to ~0.99) {math.ceil(with_rescoring)}"
        )
    return None
