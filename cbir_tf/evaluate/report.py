"""Result tables in the field's usual form, and their JSON / CSV files.

`results` everywhere in this module is the dictionary `methods.evaluate_methods` returns::

    {method: {"revisited": {"easy"|"medium"|"hard": {"map", "aps", "mpr", "prs"}},
              "original": {"map", "aps", "mpr", "prs"} or None}}

with every value a fraction (as `metrics.compute_map` returns them); tables and files show
percentages with two decimals, as papers of the field report them.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cbir_tf.fileio import atomic_write_json, atomic_write_text

PROTOCOLS = ("easy", "medium", "hard")
_SHORT = {"easy": "E", "medium": "M", "hard": "H"}


def _pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100.0 * float(x):.2f}"


def table_rows(results: Mapping[str, Any], kappas: Sequence[int]) -> list[dict[str, Any]]:
    """Flattens `results` into one row per method, values in % rounded to two decimals.

    Args:
      results: {method: {'revisited': {protocol: metrics}, 'original': metrics | None}}.
      kappas: the k of the mP@k columns, in the order of each metrics' `mpr`.

    Returns:
      A list of dicts with keys 'method', 'mAP E', 'mAP M', 'mAP H', 'mP@k E', ... and,
      when any method has it, 'mAP original'.
    """
    rows = []
    has_original = any(r.get("original") for r in results.values())
    for method, res in results.items():
        row: dict[str, Any] = {"method": method}
        rev = res.get("revisited") or {}
        for p in PROTOCOLS:
            row[f"mAP {_SHORT[p]}"] = _round_pct(rev[p]["map"]) if p in rev else None
        for j, k in enumerate(kappas):
            for p in PROTOCOLS:
                row[f"mP@{k} {_SHORT[p]}"] = _round_pct(rev[p]["mpr"][j]) if p in rev else None
        if has_original:
            orig = res.get("original")
            row["mAP original"] = _round_pct(orig["map"]) if orig else None
        rows.append(row)
    return rows


def _round_pct(x: float) -> float | None:
    x = float(x)
    return round(100.0 * x, 2) if np.isfinite(x) else None


_STEP_WORDS = {"qe": "α-QE", "dba": "DBA", "diffusion": "diffusion"}


def settings_text(results: Mapping[str, Any]) -> str:
    """The re-ranking settings the table's methods used, in words (for its title).

    Args:
      results: as `evaluation.evaluate_methods` returns them (each info's 'settings' and, when
        some were 'auto', 'auto').

    Returns:
      e.g. 're-ranking: α-QE n=1*, diffusion k=43* kq=3* (* auto: chosen from the collection,
      29% of its images with a neighbour above their noise level)'; '' without re-ranking.
    """
    blocks: dict[str, Any] = {}
    note = None
    for res in results.values():
        info = res.get("info") or {}
        blocks.update(info.get("settings") or {})
        note = note or info.get("auto")
    auto = set(note["fields"]) if note else set()
    parts = []
    for name, word in _STEP_WORDS.items():
        if name not in blocks:
            continue
        v = blocks[name]
        star = {f: "*" if f"{name}.{f}" in auto else "" for f in ("n", "k", "kq", "truncate")}.get
        if name != "diffusion":
            parts.append(f"{word} n={v['n']}{star('n')}" + (" (off)" if int(v["n"]) == 0 else ""))
            continue
        text = f"{word} k={v['k']}{star('k')} kq={v['kq']}{star('kq')}"
        if int(v["k"]) <= 1:
            text += " (off: no graph)"
        trunc = int(v["truncate"])
        text += f" truncated to {trunc}{star('truncate')}" if trunc else ""
        parts.append(text)
    if not parts:
        return ""
    out = "re-ranking: " + ", ".join(parts)
    if note and any("*" in p for p in parts):
        if note["source"] == "papers":
            out += " (* auto: the papers' settings)"
        else:
            share = float(note["stats"]["share"])
            out += (
                f" (* auto: chosen from the collection, {share:.0%} of its images with a "
                "neighbour above their noise level)"
            )
    return out


def format_table(results: Mapping[str, Any], kappas: Sequence[int], title: str = "") -> str:
    """Formats `results` as a fixed-width text table (mAP E/M/H, mP@k E/M/H, in %).

    Args:
      results: see the module docstring.
      kappas: the k of the mP@k columns.
      title: an optional first line (e.g. the dataset and the model).

    Returns:
      The table as a string, one method per line.
    """
    rows = table_rows(results, kappas)
    headers = ["method"] + [h for h in rows[0] if h != "method"] if rows else ["method"]
    width0 = max([len("method")] + [len(r["method"]) for r in rows])
    col_w = [max(len(h), 6) for h in headers[1:]]
    out = io.StringIO()
    if title:
        out.write(title + "\n")
    columns = list(zip(headers[1:], col_w, strict=True))
    head = "  ".join([f"{'method':<{width0}}"] + [f"{h:>{w}}" for h, w in columns])
    out.write(head + "\n")
    out.write("-" * len(head) + "\n")
    for r in rows:
        cells = [f"{r['method']:<{width0}}"]
        for h, w in columns:
            v = r[h]
            cells.append(f"{'-' if v is None else f'{v:.2f}':>{w}}")
        out.write("  ".join(cells) + "\n")
    return out.getvalue()


def write_results(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    kappas: Sequence[int],
    extra: Mapping[str, Any] | None = None,
    stem: str = "results",
) -> dict[str, str]:
    """Writes the table as `<stem>.json` (with per-query APs) and `<stem>.csv`, atomically.

    Args:
      out_dir: folder to write into (created if missing).
      results: see the module docstring.
      kappas: the k of the mP@k columns.
      extra: anything else to record in the JSON (dataset, model metadata, timings, ...).
      stem: file name without extension.

    Returns:
      {'json': path, 'csv': path}.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = table_rows(results, kappas)
    detail = {}
    for method, res in results.items():
        entry: dict[str, Any] = {"revisited": {}, "original": None}
        for p, m in (res.get("revisited") or {}).items():
            entry["revisited"][p] = _metrics_json(m, kappas)
        if res.get("original"):
            entry["original"] = _metrics_json(res["original"], kappas)
        for key in ("info",):
            if key in res:
                entry[key] = res[key]
        detail[method] = entry
    payload = {"kappas": list(map(int, kappas)), "table": rows, "methods": detail}
    if extra:
        payload.update(extra)
    json_path = os.path.join(os.fspath(out_dir), f"{stem}.json")
    csv_path = os.path.join(os.fspath(out_dir), f"{stem}.csv")
    atomic_write_json(json_path, payload)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return {"json": json_path, "csv": csv_path}


def _metrics_json(m: Mapping[str, Any], kappas: Sequence[int]) -> dict[str, Any]:
    return {
        "map": _round_pct(m["map"]),
        "mp@k": {str(k): _round_pct(v) for k, v in zip(kappas, np.asarray(m["mpr"]), strict=True)},
        "ap_per_query": [_round_pct(a) for a in np.asarray(m["aps"], dtype=float)],
    }
