"""Self-contained HTML pages: search results and evaluation reports, viewable offline.

Pages never reference anything on the network. Images are either small files written beside the
page and linked by relative paths (the default: the page and its `<stem>_files/` folder can be
moved or zipped together), or embedded as base64 `data:` URIs (`embed=True`: one file holds
everything). Every piece of text that comes from data (ids, paths, method names, metadata) is
HTML-escaped.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cbir_tf.fileio import atomic_write_text

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; width: 200px; text-align: center; font-size: 0.85em; }
figure img { max-width: 196px; max-height: 196px; border: 4px solid transparent; }
figure.query img { border-color: #1f77b4; }
figure.positive img { border-color: #2ca02c; } figure.negative img { border-color: #d62728; }
figure.ignored img { border-color: #9e9e9e; }
figcaption { word-break: break-all; }
figure.plot img, figure.wide img, div.wide img { max-width: 100%; max-height: none;
                                                 border: 0; }
.missing { display: inline-block; width: 192px; height: 120px; line-height: 120px;
           background: #eee; color: #777; }
.meta td { text-align: left; }
"""


_ASSET_NAME = re.compile(r"^\d{4,}_[A-Za-z0-9_-]*\.(jpg|jpeg|png|svg)$")


def esc(text: Any) -> str:
    """HTML-escapes `str(text)`, quotes included."""
    return html.escape(str(text), quote=True)


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def _href(target: str, page_dir: str) -> str:
    """A relative URL from `page_dir` to the file `target` (each path segment %-quoted)."""
    from urllib.parse import quote

    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
    return "/".join(quote(part) for part in rel.split(os.sep))


class _Assets:
    """Places the images of one page: thumbnails beside it, copies of plots, or data URIs."""

    def __init__(self, page_path: str, embed: bool, thumb_size: int):
        self.page_dir = os.path.dirname(os.path.abspath(page_path))
        stem = os.path.splitext(os.path.basename(page_path))[0]
        self.files_dir = os.path.join(self.page_dir, f"{stem}_files")
        self.embed = embed
        self.thumb_size = thumb_size
        self._count = 0
        # Thumbnails of an earlier page of the same name would linger unreferenced: remove
        # them (only files named as this class names them).
        if os.path.isdir(self.files_dir):
            for name in os.listdir(self.files_dir):
                if _ASSET_NAME.match(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.files_dir, name))

    def _new_name(self, hint: str, ext: str) -> str:
        self._count += 1
        base = "".join(c if c.isascii() and c.isalnum() or c in "-_" else "_" for c in hint)
        base = base[:40] or "img"
        return os.path.join(self.files_dir, f"{self._count:04d}_{base}{ext}")

    def thumbnail(self, image: Any, hint: str = "img") -> str | None:
        """URL of a JPEG thumbnail of `image` (path, PIL image or array); None if unreadable."""
        from cbir_tf.evaluate.plots import load_thumbnail

        try:
            thumb = load_thumbnail(image, self.thumb_size)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        buf = io.BytesIO()
        Image.fromarray(thumb).save(buf, format="JPEG", quality=85)
        return self._bytes(buf.getvalue(), "image/jpeg", hint, ".jpg")

    def file(self, path: str, hint: str = "img") -> str | None:
        """URL of an existing image file (PNG plots, grids); None if it does not exist."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            return None
        ext = os.path.splitext(path)[1].lower() or ".png"
        if self.embed:
            mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}.get(
                ext, "image/png"
            )
            with open(path, "rb") as f:
                return self._bytes(f.read(), mime, hint, ext)
        if _is_inside(path, self.page_dir):
            return _href(path, self.page_dir)
        # A file outside the page's folder is copied in, so that the folder is self-contained.
        os.makedirs(self.files_dir, exist_ok=True)
        dest = self._new_name(hint or os.path.basename(path), ext)
        shutil.copyfile(path, dest)
        return _href(dest, self.page_dir)

    def _bytes(self, data: bytes, mime: str, hint: str, ext: str) -> str:
        if self.embed:
            return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        os.makedirs(self.files_dir, exist_ok=True)
        dest = self._new_name(hint, ext)
        with open(dest, "wb") as f:
            f.write(data)
        return _href(dest, self.page_dir)


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return f'<span class="missing">{esc(alt)} (unreadable)</span>'
    return f'<img src="{esc(src)}" alt="{esc(alt)}">'


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(name)
    return getattr(result, name, None)


def search_page(
    out_path: str | os.PathLike,
    query: Any,
    results: Sequence[Any],
    *,
    title: str | None = None,
    query_name: str | None = None,
    labels: Sequence[str | None] | None = None,
    grid_png: str | os.PathLike | None = None,
    index_href: str | None = None,
    meta: Mapping[str, Any] | None = None,
    embed: bool = False,
    thumb_size: int = 256,
) -> str:
    """Writes an HTML page with the query and its ranked results as thumbnails with scores.

    Args:
      out_path: the `.html` file to write (atomically). Thumbnails go to `<stem>_files/` beside
        it unless `embed`.
      query: the query image (path, PIL image or uint8 array [H, W, 3]).
      results: ranked results, best first; each has `rank`, `id`, `path`, `score` (attributes,
        e.g. `retriever.SearchResult`, or dict keys).
      title: page title (default: 'Search results: <query name>').
      query_name: caption of the query (default: its file name).
      labels: optional [K] 'positive' | 'negative' | 'ignored' | None, coloured borders.
      grid_png: optional PNG result grid to show under the thumbnails.
      index_href: optional relative link back to an index page.
      meta: optional key/value pairs shown in a small table (index, model, k, rerank, ...).
      embed: embed every image as base64 instead of writing files beside the page.
      thumb_size: longest side of the thumbnails in pixels.

    Returns:
      `out_path` as a string.
    """
    out_path = os.fspath(out_path)
    assets = _Assets(out_path, embed, thumb_size)
    if query_name is None:
        query_name = (
            os.path.basename(os.fspath(query)) if isinstance(query, (str, os.PathLike)) else "query"
        )
    title = title or f"Search results: {query_name}"
    parts = []
    if index_href:
        parts.append(f'<p><a href="{esc(index_href)}">&larr; all queries</a></p>')
    if meta:
        parts.append(_meta_table(meta))
    cards = [
        '<figure class="query">'
        + _img(assets.thumbnail(query, "query"), "query")
        + f"<figcaption><b>query</b><br>{esc(query_name)}</figcaption></figure>"
    ]
    rows = []
    for i, r in enumerate(results):
        rank, rid, path, score = (_field(r, f) for f in ("rank", "id", "path", "score"))
        rank = i + 1 if rank is None else rank
        label = labels[i] if labels is not None else None
        cls = f' class="{esc(label)}"' if label else ""
        src = assets.thumbnail(path, f"r{rank}") if path is not None else None
        pic = _img(src, str(rid))
        if path is not None and os.path.exists(os.fspath(path)) and not embed:
            pic = f'<a href="{esc(_href(os.fspath(path), assets.page_dir))}">{pic}</a>'
        cards.append(
            f"<figure{cls}>{pic}<figcaption>#{esc(rank)} &middot; {float(score):.4f}"
            f"<br>{esc(rid)}</figcaption></figure>"
        )
        rows.append(
            f'<tr><td>{esc(rank)}</td><td>{float(score):.4f}</td><td class="name">{esc(rid)}</td>'
            + (f'<td class="name">{esc(label)}</td>' if labels is not None else "")
            + "</tr>"
        )
    parts.append('<div class="grid">' + "\n".join(cards) + "</div>")
    if grid_png is not None:
        src = assets.file(os.fspath(grid_png), "grid")
        if src is not None:
            parts.append(f'<h2>Result grid</h2><div class="wide">{_img(src, "result grid")}</div>')
    head = '<tr><th>rank</th><th>score</th><th class="name">image id</th>'
    head += '<th class="name">label</th></tr>' if labels is not None else "</tr>"
    parts.append(f"<h2>Ranking</h2><table>{head}{''.join(rows)}</table>")
    atomic_write_text(out_path, _page(title, "\n".join(parts)))
    return out_path


def index_page(
    out_path: str | os.PathLike,
    entries: Sequence[Mapping[str, Any]],
    *,
    title: str = "Search results",
    meta: Mapping[str, Any] | None = None,
    embed: bool = False,
    thumb_size: int = 160,
) -> str:
    """Writes a page linking to several result pages, one card per query.

    Args:
      out_path: the `.html` file to write (atomically).
      entries: one dict per query: 'title' (text), 'href' (path of its page; made relative to
        this page), optional 'image' (query image for a thumbnail), optional 'summary' (text).
      title: page title.
      meta: optional key/value pairs shown in a small table.
      embed: embed thumbnails as base64.
      thumb_size: longest side of the thumbnails.

    Returns:
      `out_path` as a string.
    """
    out_path = os.fspath(out_path)
    assets = _Assets(out_path, embed, thumb_size)
    parts = [_meta_table(meta)] if meta else []
    cards = []
    for i, e in enumerate(entries):
        href = _href(os.fspath(e["href"]), assets.page_dir)
        pic = ""
        if e.get("image") is not None:
            pic = _img(assets.thumbnail(e["image"], f"q{i}"), str(e["title"]))
        summary = f"<br>{esc(e['summary'])}" if e.get("summary") else ""
        cards.append(
            f'<figure><a href="{esc(href)}">{pic}</a><figcaption><a href="{esc(href)}">'
            f"{esc(e['title'])}</a>{summary}</figcaption></figure>"
        )
    parts.append('<div class="grid">' + "\n".join(cards) + "</div>")
    atomic_write_text(out_path, _page(title, "\n".join(parts)))
    return out_path


def _meta_table(meta: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr><th class="name">{esc(k)}</th><td class="name">{esc(_fmt_meta(v))}</td></tr>'
        for k, v in meta.items()
    )
    return f'<table class="meta">{rows}</table>'


def _fmt_meta(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and len(v) > 20:
        return f"[{len(v)} items]"
    return str(v)


def results_table_html(results: Mapping[str, Any], kappas: Sequence[int]) -> str:
    """The mAP / mP@k table of `results` (see `cbir_tf.evaluate.report`) as an HTML `<table>`.

    Args:
      results: {method: {'revisited': {protocol: {'map','aps','mpr','prs'}},
        'original': {...} | None}}, values as fractions.
      kappas: the k of the mP@k columns.

    Returns:
      HTML text; percentages with two decimals, '-' where a value is missing.
    """
    from cbir_tf.evaluate.report import table_rows

    rows = table_rows(results, kappas)
    if not rows:
        return "<p>(no results)</p>"
    headers = list(rows[0])
    head = "".join(
        f'<th class="name">{esc(h)}</th>' if h == "method" else f"<th>{esc(h)}</th>"
        for h in headers
    )
    body = []
    for r in rows:
        cells = []
        for h in headers:
            v = r[h]
            if h == "method":
                cells.append(f'<td class="name">{esc(v)}</td>')
            else:
                cells.append(f"<td>{'-' if v is None else f'{float(v):.2f}'}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="results"><tr>{head}</tr>{"".join(body)}</table>'


def evaluation_report(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    *,
    kappas: Sequence[int] = (1, 5, 10),
    pr_plots: Mapping[str, str | os.PathLike] | None = None,
    grids: Sequence[Mapping[str, Any] | str | os.PathLike] | None = None,
    meta: Mapping[str, Any] | None = None,
    links: Mapping[str, str | os.PathLike] | None = None,
    title: str = "Retrieval evaluation",
    filename: str = "report.html",
    embed: bool = False,
) -> str:
    """Writes the HTML report of one evaluation run: mAP table, PR curves, result grids.

    Typical use (in evaluate.py)::

        figs = visualize.evaluation_figures(out_dir, rankings, gnd_raw, query_paths, db_paths)
        files = report.write_results(out_dir, results, kappas, extra={"report": "report.html"})
        html.evaluation_report(out_dir, results, kappas=kappas, pr_plots=figs["pr_plots"],
                               grids=figs["grids"], meta={"dataset": ...},
                               links={"results (JSON)": files["json"]})

    Args:
      out_dir: folder of the report (created if missing); the page is `<out_dir>/<filename>`.
      results: {method: {'revisited': {'easy'|'medium'|'hard': {'map', 'aps', 'mpr', 'prs'}},
        'original': {'map', ...} | None}} with fractions, as `cbir_tf.evaluate.report` takes them.
      kappas: the k of the mP@k columns (the order of each `mpr`).
      pr_plots: {caption: PNG path} of precision-recall plots (e.g. from
        `visualize.pr_curve_plot`).
      grids: per-query result grids: PNG paths, or dicts {'path', optional 'title',
        'method'}; grouped by 'method' when given.
      meta: key/value pairs describing the run (dataset, backbone, pooling, image size, ...).
      links: {caption: path} of related files (results JSON/CSV), linked relatively.
      title: page title.
      filename: the page's file name inside `out_dir`.
      embed: embed every image as base64 (one file holds everything) instead of linking files
        (files outside `out_dir` are then copied into `<stem>_files/`).

    Returns:
      The path of the written HTML file.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, filename)
    assets = _Assets(out_path, embed, 256)
    parts = []
    if meta:
        parts.append("<h2>Run</h2>" + _meta_table(meta))
    if links:
        items = "".join(
            f'<li><a href="{esc(_href(os.fspath(p), out_dir))}">{esc(name)}</a></li>'
            for name, p in links.items()
        )
        parts.append(f"<ul>{items}</ul>")
    parts.append("<h2>Mean average precision (%)</h2>" + results_table_html(results, kappas))
    parts.append(_legend(kappas))
    if pr_plots:
        parts.append("<h2>Precision-recall curves</h2>")
        for caption, path in pr_plots.items():
            src = assets.file(os.fspath(path), f"pr_{caption}")
            parts.append(
                f'<figure class="plot" style="width:auto">{_img(src, f"PR curves {caption}")}'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    if grids:
        parts.append("<h2>Result grids</h2>")
        parts.append(
            '<p>Borders: <span style="color:#2ca02c">positive</span>, '
            '<span style="color:#d62728">negative</span>, '
            '<span style="color:#9e9e9e">ignored</span>.</p>'
        )
        current = None
        for i, g in enumerate(grids):
            g = {"path": g} if not isinstance(g, Mapping) else g
            method = g.get("method")
            if method is not None and method != current:
                parts.append(f"<h3>{esc(method)}</h3>")
                current = method
            caption = g.get("title") or os.path.basename(os.fspath(g["path"]))
            src = assets.file(os.fspath(g["path"]), f"grid{i}")
            parts.append(
                f'<figure class="wide" style="width:auto">{_img(src, str(caption))}'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    atomic_write_text(out_path, _page(title, "\n".join(parts)))
    return out_path


def comparison_section(
    rows: Sequence[Mapping[str, Any]],
    chart: str | None,
    assets: Any,
    notes: Sequence[str] = (),
) -> str:
    """The HTML section of a comparison: its table (one row per combination and method) and its
    grouped bar chart.

    Args:
      rows: [{<compared field>: label, ..., 'method', <metric>: % or None, ..., 'error'}].
      chart: the chart's PNG, or None.
      assets: the page's `_Assets` (embeds or links the chart).
      notes: lines under the table (each combination's re-ranking settings, say).
    """
    parts = ["<h2>Comparison</h2>"]
    if rows:
        heads = [h for h in rows[0] if h != "error"]
        head = "".join(f"<th>{esc(h)}</th>" for h in heads)
        body = []
        for r in rows:
            if r.get("error"):
                names = [h for h in heads if not h.startswith(("mAP", "mP@"))]
                cells = "".join(f'<td class="name">{esc(r.get(h, ""))}</td>' for h in names)
                span = len(heads) - len(names)
                cells += f'<td colspan="{span}" class="name">failed: {esc(r["error"])}</td>'
            else:
                cells = "".join(
                    f"<td>{'-' if r[h] is None else f'{float(r[h]):.2f}'}</td>"
                    if h.startswith(("mAP", "mP@"))
                    else f'<td class="name">{esc(r[h])}</td>'
                    for h in heads
                )
            body.append(f"<tr>{cells}</tr>")
        parts.append(f'<table class="results"><tr>{head}</tr>{"".join(body)}</table>')
    if notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if chart:
        src = assets.file(os.fspath(chart), "comparison")
        parts.append(
            f'<figure class="wide" style="width:auto">{_img(src, "comparison chart")}'
            "<figcaption>mAP per combination and method</figcaption></figure>"
        )
    return "\n".join(parts)


def comparison_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    chart: str | None = None,
    notes: Sequence[str] = (),
    links: Mapping[str, str | os.PathLike] | None = None,
    title: str = "Comparison",
    filename: str = "report.html",
) -> str:
    """Writes a self-contained page with the comparison section (chart embedded) and links to
    each combination's own report; returns its path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, filename)
    assets = _Assets(out_path, True, 256)
    parts = [comparison_section(rows, chart, assets, notes)]
    if links:
        items = "".join(
            f'<li><a href="{esc(_href(os.fspath(p), out_dir))}">{esc(name)}</a></li>'
            for name, p in links.items()
        )
        parts.append(f"<h2>Files</h2><ul>{items}</ul>")
    atomic_write_text(out_path, _page(title, "\n".join(parts)))
    return out_path


def _legend(kappas: Sequence[int]) -> str:
    ks = ", ".join(str(int(k)) for k in kappas)
    return (
        "<p>Revisited protocols: E(asy), M(edium), H(ard); mP@k = mean precision at k "
        f"(k = {esc(ks)}); ignored images are removed from each ranking before scoring.</p>"
    )


def write_search_report(
    out_dir: str | os.PathLike,
    searches: Sequence[tuple[Any, Sequence[Any]]],
    *,
    query_names: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    embed: bool = False,
    grids: bool = True,
    thumb_size: int = 256,
) -> dict[str, Any]:
    """Writes one HTML page and one PNG grid per query, plus an index page for several queries.

    Args:
      out_dir: folder to write into (created if missing).
      searches: [(query image or path, ranked results)] as `Retriever.search_batch` pairs them.
      query_names: optional [Q] names (default: file names, made unique).
      meta: key/value pairs shown on every page.
      embed: embed images as base64 instead of writing thumbnail files.
      grids: also write `<name>.png` result grids (and show them on the pages).
      thumb_size: longest side of thumbnails.

    Returns:
      {'pages': [html paths], 'grids': [png paths], 'index': index html path or None}.
    """
    from cbir_tf.evaluate.plots import result_grid

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if query_names is not None:
        names = [str(n) for n in query_names]
    else:
        names = [
            os.path.basename(os.fspath(q)) if isinstance(q, (str, os.PathLike)) else f"query{i}"
            for i, (q, _) in enumerate(searches)
        ]
    stems = _unique_stems(names)
    multi = len(searches) > 1
    pages, pngs, entries = [], [], []
    index_path = os.path.join(out_dir, "index.html") if multi else None
    for (query, results), name, stem in zip(searches, names, stems, strict=True):
        png = None
        if grids:
            png = result_grid(
                query,
                [_field(r, "path") for r in results],
                np.asarray([_field(r, "score") for r in results], dtype=np.float64),
                out_path=os.path.join(out_dir, f"{stem}.png"),
                titles=[str(_field(r, "id")) for r in results],
                query_title=str(name),
                thumb_size=thumb_size,
            )
            pngs.append(png)
        page = search_page(
            os.path.join(out_dir, f"{stem}.html"),
            query,
            results,
            query_name=str(name),
            grid_png=png,
            index_href="index.html" if multi else None,
            meta=meta,
            embed=embed,
            thumb_size=thumb_size,
        )
        pages.append(page)
        top = results[0] if len(results) else None
        summary = f"top: {_field(top, 'id')} ({float(_field(top, 'score')):.3f})" if top else ""
        entries.append({"title": str(name), "href": page, "image": query, "summary": summary})
    if multi:
        index_page(index_path, entries, title="Search results", meta=meta, embed=embed)
    return {"pages": pages, "grids": pngs, "index": index_path}


def _unique_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe stems of `names`; clashes (a.jpg and a.png, or one name in two folders)
    get a numeric suffix so that no page overwrites another."""
    stems, seen = [], set()
    for name in names:
        base = os.path.splitext(os.path.basename(str(name)))[0] or "query"
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
        if base.lower() == "index":
            base = "index_"  # the index page's own name
        stem, n = base, 1
        while stem.lower() in seen:
            stem = f"{base}_{n}"
            n += 1
        seen.add(stem.lower())
        stems.append(stem)
    return stems
