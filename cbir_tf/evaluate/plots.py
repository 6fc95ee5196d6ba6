"""Pictures of retrieval results: result grids (PNG) and precision-recall curves.

Everything here is numpy + PIL + matplotlib with the non-interactive Agg backend, so it runs on
headless machines and never imports TensorFlow. Precision-recall curves follow the benchmark's
rules: ignored ("junk") images are removed from a ranking before positions are counted, exactly as
for the trapezoidal AP of `cbir_tf.evaluate.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ImageLike = str | os.PathLike | Image.Image | np.ndarray

LABEL_COLORS = {"positive": "#2ca02c", "negative": "#d62728", "ignored": "#9e9e9e"}
PROTOCOLS = ("easy", "medium", "hard")
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


def _pyplot():
    # Agg is selected on the Figure itself (not with matplotlib.use) so that importing this module
    # never changes the backend of a user's interactive session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def load_thumbnail(image: ImageLike, size: int = 256) -> np.ndarray:
    """Loads an image and shrinks it so that its longest side is at most `size`.

    Args:
      image: a file path, a PIL image, or an array [H, W], [H, W, 1|3|4] (uint8, or float in
        0..255).
      size: longest side of the result in pixels (images are never enlarged).

    Returns:
      uint8 [h, w, 3] RGB, EXIF orientation applied for files.
    """
    if isinstance(image, np.ndarray):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    elif isinstance(image, Image.Image):
        img = image
    else:
        img = Image.open(os.fspath(image))
        # JPEG draft mode decodes at a reduced scale directly: thumbnails of 20-megapixel photos
        # then cost a fraction of a full decode.
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode not in ("RGB",):
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(img, dtype=np.float64)
            top = a.max() if a.size and a.max() > 0 else 1.0
            img = Image.fromarray((a * (255.0 / top)).astype(np.uint8)).convert("RGB")
        else:
            img = img.convert("RGB")
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def result_grid(
    query_image: ImageLike,
    result_images: Sequence[ImageLike],
    scores: Sequence[float] | np.ndarray | None,
    labels: Sequence[str | None] | None = None,
    out_path: str | os.PathLike | None = None,
    *,
    titles: Sequence[str] | None = None,
    query_title: str = "query",
    columns: int = 5,
    thumb_size: int = 256,
    dpi: int = 100,
) -> str:
    """Draws the query beside its ranked results, each with its rank and score, as a PNG.

    Args:
      query_image: the query (path, PIL image or uint8 array [H, W, 3]).
      result_images: the K retrieved images, best first (same kinds as `query_image`).
      scores: float [K] similarity of each result, or None (captions show ranks only).
      labels: optional [K] ground-truth label per result: 'positive' (green border), 'negative'
        (red), 'ignored' (grey) or None (no border).
      out_path: the PNG to write (atomically); required.
      titles: optional [K] short captions (e.g. image ids) printed under rank and score.
      query_title: caption of the query.
      columns: results per row; the query takes the first column of the first row.
      thumb_size: longest side of each thumbnail in pixels.
      dpi: resolution of the PNG.

    Returns:
      `out_path` as a string.

    Raises:
      ValueError: lengths of `result_images`, `scores`, `labels`, `titles` differ, or an unknown
        label.
    """
    if out_path is None:
        raise ValueError("result_grid needs out_path (the PNG file to write)")
    k = len(result_images)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores is not None and scores.shape[0] != k:
        raise ValueError(f"{k} result images but {scores.shape[0]} scores")
    if labels is not None and len(labels) != k:
        raise ValueError(f"{k} result images but {len(labels)} labels")
    if titles is not None and len(titles) != k:
        raise ValueError(f"{k} result images but {len(titles)} titles")
    for lab in labels or ():
        if lab is not None and lab not in LABEL_COLORS:
            raise ValueError(f"unknown label {lab!r}; valid: {sorted(LABEL_COLORS)} or None")

    Figure, FigureCanvasAgg = _pyplot()
    columns = max(1, int(columns))
    rows = max(1, -(-k // columns))
    cell = 2.2
    fig = Figure(figsize=(cell * (columns + 1), cell * rows + 0.3), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, columns + 1, wspace=0.08, hspace=0.35)

    ax = fig.add_subplot(grid[0, 0])
    # Long file names would run into the first result's caption: keep their tail, as below.
    query_caption = _shorten(str(query_title), 24) if query_title else query_title
    _show(ax, load_thumbnail(query_image, thumb_size), "#1f77b4", query_caption, bold=True)
    for i in range(k):
        r, c = divmod(i, columns)
        ax = fig.add_subplot(grid[r, c + 1])
        lab = labels[i] if labels is not None else None
        caption = f"#{i + 1}" if scores is None else f"#{i + 1}  {scores[i]:.3f}"
        if titles is not None:
            caption += "\n" + _shorten(str(titles[i]), 24)
        try:
            thumb = load_thumbnail(result_images[i], thumb_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # One unreadable result must not hide the others: draw an empty cell saying why.
            thumb = None
            caption += f"\n(unreadable: {type(e).__name__})"
        _show(ax, thumb, LABEL_COLORS.get(lab) if lab else None, caption)
    for r in range(1, rows):
        fig.add_subplot(grid[r, 0]).axis("off")

    out_path = os.fspath(out_path)
    from cbir_tf.fileio import atomic_open

    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight", facecolor="white")
    return out_path


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def _show(ax, thumb: np.ndarray | None, color: str | None, caption: str, bold: bool = False):
    if thumb is not None:
        ax.imshow(thumb)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_edgecolor(color)
            spine.set_linewidth(4)
    ax.set_title(caption, fontsize=8, fontweight="bold" if bold else "normal")


def precision_recall(
    ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each positive of one ranking, ignored images removed first.

    Args:
      ranking: int [N] database indices, best first.
      positives: int [P] indices of the relevant images.
      junk: int [J] indices to ignore (removed from the ranking before counting positions).

    Returns:
      (recall float64 [P'], precision float64 [P']) at the rank of each positive found, in rank
      order (P' = P when the ranking holds every positive); empty arrays when P == 0.
    """
    ranking = np.asarray(ranking).reshape(-1)
    positives = np.asarray(positives, dtype=np.int64).reshape(-1)
    if positives.size == 0:
        return np.zeros(0), np.zeros(0)
    if junk is not None and np.asarray(junk).size:
        ranking = ranking[~np.isin(ranking, np.asarray(junk, dtype=np.int64))]
    hit_pos = np.flatnonzero(np.isin(ranking, positives))
    found = np.arange(1, hit_pos.size + 1, dtype=np.float64)
    return found / positives.size, found / (hit_pos + 1.0)


def interpolated_precision(
    recall: np.ndarray, precision: np.ndarray, levels: np.ndarray = RECALL_LEVELS
) -> np.ndarray:
    """Interpolated precision max{precision at recall >= r} at each recall level (0 beyond).

    Args:
      recall: float [P] recall at each positive, non-decreasing.
      precision: float [P] precision at each positive.
      levels: float [L] recall levels in [0, 1].

    Returns:
      float64 [L].
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    if recall.size == 0:
        return np.zeros_like(levels)
    # Running maximum from the right gives, at each positive, the best precision at any
    # recall at least as high.
    best_from = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, levels - 1e-12, side="left")
    out = np.zeros_like(levels)
    inside = idx < recall.size
    out[inside] = best_from[idx[inside]]
    return out


def _pr_from_positions(ranks, q: int, ok: np.ndarray, junk: np.ndarray):
    """`precision_recall` of query q from the positions a `PartialRanking` knows."""
    pos = np.unique(ranks.positions_of(np.full(ok.size, q), ok))
    jpos = np.sort(ranks.positions_of(np.full(junk.size, q), junk))
    pos = pos[~np.isin(pos, jpos)] - np.searchsorted(jpos, pos[~np.isin(pos, jpos)])
    found = np.arange(1, pos.size + 1, dtype=np.float64)
    return found / ok.size, found / (pos + 1.0)


def mean_pr_curve(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], levels: np.ndarray = RECALL_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision-recall curve over queries that have positives.

    Args:
      ranks: int [Q, N] database indices per query, best first.
      gnd: Q dicts {'ok': positives, 'junk': ignored} (as `metrics.revisited_gnd` returns).
      levels: float [L] recall levels.

    Returns:
      (recall levels float64 [L], mean precision float64 [L]); precision is all NaN when no
      query has a positive.
    """
    partial = hasattr(ranks, "positions_of")  # a bounded.PartialRanking (distractors)
    ranks = ranks if partial else np.asarray(ranks)
    if len(ranks.shape) != 2 or ranks.shape[0] != len(gnd):
        raise ValueError(f"ranks must be [Q, N] with Q = {len(gnd)} queries; got {ranks.shape}")
    curves = []
    for q, g in enumerate(gnd):
        ok = np.asarray(g.get("ok", ()), dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(g.get("junk", ()), dtype=np.int64)
        if partial:
            rec, prec = _pr_from_positions(ranks, q, ok, junk)
        else:
            rec, prec = precision_recall(ranks[q], ok, junk)
        curves.append(interpolated_precision(rec, prec, levels))
    levels = np.asarray(levels, dtype=np.float64)
    if not curves:
        return levels, np.full_like(levels, np.nan)
    return levels, np.mean(curves, axis=0)


def revisited_pr_curves(
    ranks: np.ndarray, gnd_raw: Sequence[Mapping[str, Any]], levels: np.ndarray = RECALL_LEVELS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean precision-recall curves of the Easy, Medium and Hard protocols.

    Args:
      ranks: int [Q, N] database indices per query, best first.
      gnd_raw: Q dicts with 'easy', 'hard', 'junk' (the benchmark's ground truth).
      levels: float [L] recall levels.

    Returns:
      {protocol: (recall float64 [L], precision float64 [L])}.
    """
    from cbir_tf.evaluate import metrics

    return {p: mean_pr_curve(ranks, metrics.revisited_gnd(gnd_raw, p), levels) for p in PROTOCOLS}


def pr_curve_plot(
    curves: Mapping[str, Any],
    out_path: str | os.PathLike,
    *,
    title: str = "",
    dpi: int = 100,
) -> str:
    """Plots precision-recall curves, one panel per protocol, one line per method, as a PNG.

    Args:
      curves: either {protocol: {method: (recall [L], precision [L])}} (one panel per protocol)
        or {method: (recall [L], precision [L])} (a single panel).
      out_path: the PNG to write (atomically).
      title: figure title.
      dpi: resolution of the PNG.

    Returns:
      `out_path` as a string.
    """
    fig = pr_curve_figure(curves, title=title, dpi=dpi)
    out_path = os.fspath(out_path)
    from cbir_tf.fileio import atomic_open

    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, format="png", facecolor="white")
    return out_path


def pr_curve_figure(curves: Mapping[str, Any], *, title: str = "", dpi: int = 100) -> Any:
    """The matplotlib Figure `pr_curve_plot` saves (same arguments).

    A panel whose curves are all NaN (no query has a positive under that protocol, e.g. Hard
    for a ground truth without hard images) says so in words instead of drawing empty axes.
    """
    panels: dict[str, Mapping[str, Any]]
    if curves and all(isinstance(v, Mapping) for v in curves.values()):
        panels = dict(curves)
    else:
        panels = {"": curves}
    Figure, FigureCanvasAgg = _pyplot()
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, panels.items(), strict=False):
        name = str(panel).capitalize() if panel in PROTOCOLS else str(panel)
        if panel:
            ax.set_title(name)
        if not any(np.isfinite(np.asarray(prec, dtype=float)).any() for _, prec in lines.values()):
            under = f" {name}" if panel else ""
            ax.text(0.5, 0.5, f"no query has{under} positives:\nnothing to plot", ha="center",
                    va="center", transform=ax.transAxes, fontsize=11, color="#555555")  # fmt: skip
            ax.set_axis_off()
            continue
        for method, (rec, prec) in lines.items():
            ax.plot(np.asarray(rec), np.asarray(prec), label=str(method), linewidth=1.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def result_labels(retrieved: Sequence[int] | np.ndarray, gnd_query: Mapping[str, Any]) -> list[str]:
    """Labels retrieved database indices against one query's ground truth.

    Args:
      retrieved: int [K] database indices.
      gnd_query: {'ok': positives, 'junk': ignored}.

    Returns:
      [K] of 'positive' | 'ignored' | 'negative'.
    """
    ok = set(np.asarray(gnd_query.get("ok", ()), dtype=np.int64).tolist())
    junk = set(np.asarray(gnd_query.get("junk", ()), dtype=np.int64).tolist())
    return [
        "positive" if i in ok else "ignored" if i in junk else "negative"
        for i in np.asarray(retrieved, dtype=np.int64).tolist()
    ]


def evaluation_figures(
    out_dir: str | os.PathLike,
    rankings: Mapping[str, np.ndarray],
    gnd_raw: Sequence[Mapping[str, Any]],
    query_images: Sequence[ImageLike],
    database_images: Sequence[ImageLike],
    *,
    num_queries: int = 5,
    top: int = 10,
    protocol: str = "medium",
    scores: Mapping[str, np.ndarray] | None = None,
    query_names: Sequence[str] | None = None,
    database_names: Sequence[str] | None = None,
    query_bboxes: Sequence[Sequence[float] | None] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Writes the PR-curve plots and the per-query result grids of one benchmark run.

    The output plugs into `cbir_tf.evaluate.pages.evaluation_report(out_dir, results, pr_plots=...,
    grids=...)`.

    Args:
      out_dir: folder for the PNG files (created if missing).
      rankings: {method: int [Q, N] database indices per query, best first}.
      gnd_raw: Q dicts with 'easy', 'hard', 'junk'.
      query_images: [Q] query images (paths, or arrays already cropped to the query box).
      database_images: [N] database images (paths; only the top results are read).
      num_queries: grids for the first `num_queries` queries (per method).
      top: results per grid.
      protocol: whose positives/ignored colour the grid borders.
      scores: optional {method: float [Q, N] or [Q, >= top] scores aligned with the rankings};
        without it grids show ranks only.
      query_names: optional [Q] captions of the queries.
      database_names: optional [N] captions of database images.
      query_bboxes: optional [Q] crop boxes (x1, y1, x2, y2) of query files, in their stored
        pixel frame (the benchmark's `query_bboxes()`): grids then show the cropped query.

    Returns:
      {'pr_plots': {'all': path}, 'grids': [{'title', 'path', 'method', 'query'}]}.
    """
    from cbir_tf.evaluate import metrics

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    per_protocol: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {p: {} for p in PROTOCOLS}
    for method, ranks in rankings.items():
        for p, curve in revisited_pr_curves(ranks, gnd_raw).items():
            per_protocol[p][method] = curve
    pr_path = pr_curve_plot(per_protocol, os.path.join(out_dir, "pr_curves.png"))

    gnd = metrics.revisited_gnd(gnd_raw, protocol)
    grids = []
    nq = min(int(num_queries), len(query_images))
    for m_i, (method, ranks) in enumerate(rankings.items()):
        ranks = ranks.top if hasattr(ranks, "top") else np.asarray(ranks)
        for q in range(nq):
            ids = ranks[q, :top]
            sc = None
            if scores is not None and method in scores:
                sc = np.asarray(scores[method])[q, : len(ids)]
            qname = query_names[q] if query_names is not None else f"query {q}"
            names = [database_names[i] for i in ids] if database_names is not None else None
            path = os.path.join(out_dir, f"grid_m{m_i}_q{q:04d}.png")
            query = query_images[q]
            if query_bboxes is not None and query_bboxes[q] is not None:
                if not isinstance(query, np.ndarray | Image.Image):
                    from cbir_tf.data.decode import load_image

                    query = load_image(query, bbox=query_bboxes[q])
            result_grid(
                query,
                [database_images[i] for i in ids],
                sc,
                labels=result_labels(ids, gnd[q]),
                out_path=path,
                titles=names,
                query_title=str(qname),
            )
            grids.append(
                {"title": f"{method}: {qname}", "path": path, "method": method, "query": qname}
            )
    return {"pr_plots": {"all": pr_path}, "grids": grids}


def comparison_chart(
    groups: Sequence[str],
    methods: Sequence[str],
    values: Mapping[str, np.ndarray],
    out_path: str | os.PathLike,
    *,
    title: str = "",
    dpi: int = 100,
) -> str:
    """Grouped bars, one panel per metric: a group per combination, a bar per method.

    Args:
      groups: the combinations' names (x axis), e.g. 'mobilenet, gem'.
      methods: the bars of each group (legend).
      values: {panel title ('mAP M', 'mAP H'): float `[len(groups), len(methods)]` in %, NaN
        for a failed combination (no bar)}.
      out_path: the PNG to write (atomically).
      title: figure title.
      dpi: resolution of the PNG.

    Returns:
      `out_path` as a string.
    """
    Figure, FigureCanvasAgg = _pyplot()
    width = max(6.0, 0.9 + len(groups) * (0.35 + 0.16 * len(methods)))
    fig = Figure(figsize=(width, 3.2 * max(1, len(values)) + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(values)), 1, squeeze=False)[:, 0]
    x = np.arange(len(groups), dtype=np.float64)
    bar = 0.8 / max(1, len(methods))
    for ax, (panel, v) in zip(axes, values.items(), strict=False):
        v = np.asarray(v, np.float64).reshape(len(groups), len(methods))
        for j, method in enumerate(methods):
            ax.bar(x - 0.4 + bar * (j + 0.5), np.nan_to_num(v[:, j]), bar, label=str(method))
        for i in np.flatnonzero(np.isnan(v).all(axis=1)):
            ax.text(x[i], 1.0, "failed", ha="center", va="bottom", fontsize=8, color="#d62728")
        ax.set_xticks(x)
        ax.set_xticklabels([str(g) for g in groups], fontsize=8)
        ax.set_ylabel(f"{panel} (%)")
        top = np.nanmax(v) if np.isfinite(v).any() else 100.0
        ax.set_ylim(0, min(100.0, top * 1.15 + 1.0))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(str(panel), fontsize=10)
    axes[0].legend(fontsize=8, ncol=min(len(methods), 6), loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_path = os.fspath(out_path)
    from cbir_tf.fileio import atomic_open

    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, format="png", facecolor="white")
    return out_path
