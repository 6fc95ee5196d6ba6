"""The reference evaluation loop: a faithful port of revisitop's `python/evaluate.py`.

`compute_ap` / `compute_map` as the benchmark's authors wrote them, changed only to read rankings
as `[Q, N]` rows and to use `np.isin` (numpy 2 removed `np.in1d`). tests/test_metrics.py checks
`cbir_tf.evaluate.metrics` against it, and benchmarks/metrics_speed.py times both.
"""

from __future__ import annotations

import numpy as np


def reference_compute_ap(ranks, nres):
    """revisitop compute_ap: a Python loop over the positives' positions."""
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def reference_compute_map(ranks, gnd, kappas=()):
    """revisitop compute_map, reading ranks as [Q, N] (row i is query i's ranking)."""
    map_ = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.asarray(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i].get("junk", np.empty(0)))
        row = ranks[i]
        pos = np.arange(row.shape[0])[np.isin(row, qgnd)]
        junk = np.arange(row.shape[0])[np.isin(row, qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = reference_compute_ap(pos, len(qgnd))
        map_ = map_ + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map_ = map_ / (nq - nempty)
    pr = pr / (nq - nempty)
    return map_, aps, pr, prs
