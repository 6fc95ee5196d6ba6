"""Re-ranking written again from the papers, independently of `cbir_tf.rerank`, for the tests.

Dense float64 numpy, a few lines per method, no shared code with the library: the tests compare
every ranking the toolkit reports (evaluation, `Retriever`, `search.py`) with these.

- α-QE (Radenović, Tolias, Chum, TPAMI 2018):
  q' = normalise(q + sum_{j in top n} max(s_j, 0)^α x_j).
- DBA (database-side augmentation; Arandjelović & Zisserman, CVPR 2012, α-weighted as in
  Radenović et al.): each database vector x_i' = normalise(x_i + sum_{j in top n, j != i}
  max(s_ij, 0)^α x_j); queries are then searched (and expanded) against the augmented database.
- Diffusion (Iscen et al., CVPR 2017): mutual kNN graph over the database (each node's k nearest,
  itself included), weights max(s, 0)^γ, zero diagonal; S = D^-1/2 A D^-1/2; y = the query's kq
  nearest items with weights max(s, 0)^γ; f solves (I - α S) f = y; items ranked by f. Items
  the query's seeds never reach (f = 0: no path in the graph) cannot be told apart by f: they
  follow all the others in their plain order (scored min(reached f) - 2 + s / max|s|, as the
  toolkit reports them).
"""

import numpy as np


def ranks_from_scores(scores):
    """Best first; equal scores keep database order. int [Q, N]."""
    return np.argsort(-np.asarray(scores, np.float64), axis=1, kind="stable")


def plain_scores(queries, database):
    return np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T


def alpha_qe(queries, database, n, alpha):
    """float64 [Q, D] expanded, unit queries."""
    q, x = np.asarray(queries, np.float64), np.asarray(database, np.float64)
    sims = q @ x.T
    out = np.empty_like(q)
    for i in range(len(q)):
        top = ranks_from_scores(sims[i : i + 1])[0, :n]
        v = q[i] + (np.maximum(sims[i, top], 0.0)[:, None] ** alpha * x[top]).sum(axis=0)
        out[i] = v / np.linalg.norm(v)
    return out


def dba(database, n, alpha):
    """float64 [N, D] augmented, unit database vectors."""
    x = np.asarray(database, np.float64)
    sims = x @ x.T
    out = np.empty_like(x)
    for i in range(len(x)):
        top = [j for j in ranks_from_scores(sims[i : i + 1])[0] if j != i][:n]
        v = x[i] + (np.maximum(sims[i, top], 0.0)[:, None] ** alpha * x[top]).sum(axis=0)
        out[i] = v / np.linalg.norm(v)
    return out


def diffusion_scores(queries, database, k, kq, gamma, alpha):
    """float64 [Q, N] diffusion scores, solved exactly (dense)."""
    q, x = np.asarray(queries, np.float64), np.asarray(database, np.float64)
    n = len(x)
    sims = x @ x.T
    member = np.zeros((n, n), bool)
    member[np.arange(n)[:, None], ranks_from_scores(sims)[:, :k]] = True
    mutual = member & member.T
    np.fill_diagonal(mutual, False)
    a = np.where(mutual, np.maximum(sims, 0.0) ** gamma, 0.0)
    deg = a.sum(axis=1)
    d = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    s = d[:, None] * a * d[None, :]
    qs = q @ x.T
    y = np.zeros((n, len(q)))
    for j in range(len(q)):
        top = ranks_from_scores(qs[j : j + 1])[0, :kq]
        y[top, j] = np.maximum(qs[j, top], 0.0) ** gamma
    f = np.linalg.solve(np.eye(n) - alpha * s, y).T
    # Items the query's graph component never reaches score 0: exactly, as in a sparse solve.
    f[np.abs(f) < 1e-12 * np.abs(f).max()] = 0.0
    return f


def method_scores(method, queries, database, qe, diffusion, dba_settings=None):
    """Scores [Q, N] of 'plain', 'aqe', 'diffusion', 'aqe+diffusion', 'dba' or 'aqe+dba'
    (settings as dicts)."""
    if "dba" in method:
        database = dba(database, dba_settings["n"], dba_settings["alpha"])
    q = alpha_qe(queries, database, qe["n"], qe["alpha"]) if "aqe" in method else queries
    if "diffusion" in method:
        d = diffusion
        f = diffusion_scores(q, database, d["k"], d["kq"], d["gamma"], d["alpha"])
        s = plain_scores(q, database)
        lo = np.where(f > 0, f, np.inf).min(axis=1, keepdims=True)
        lo = np.where(np.isfinite(lo), lo, 0.0)
        return np.where(f > 0, f, lo - 2.0 + s / np.abs(s).max(axis=1, keepdims=True))
    return plain_scores(q, database)


def arcs(seed=0, groups=4, per=12, dim=8, noise=0.03, span=1.6):
    """Unit vectors along `groups` great-circle arcs, and one query near each arc's start.

    Neighbouring arcs come close, so plain search, α-QE and diffusion rank them differently.

    Returns:
      (database float32 [groups * per, dim], queries float32 [groups, dim]); database rows of
      arc g are g * per ... (g + 1) * per - 1.
    """
    rng = np.random.default_rng(seed)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    x, q = [], []
    for _ in range(groups):
        a = unit(rng.normal(size=dim))
        b = rng.normal(size=dim)
        b = unit(b - (b @ a) * a)
        t = np.linspace(0.0, span, per)
        points = np.cos(t)[:, None] * a + np.sin(t)[:, None] * b
        x.append(unit(points + noise * rng.normal(size=points.shape)))
        q.append(unit(a + noise * rng.normal(size=dim)))
    return np.concatenate(x).astype(np.float32), np.asarray(q, np.float32)
