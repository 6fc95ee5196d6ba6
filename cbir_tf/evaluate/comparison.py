"""A comparison of configurations (`evaluate.py --compare`): its combinations, table and CSV.

`--compare=FIELD:v1,v2,...` names any config field and its values; several `--compare` flags
make every combination of their values. A value may set more fields with it, in brackets:
`model.backbone:mobilenet[model.alpha=0.25;model.weights=w.h5],vgg16` (a backbone's width and
weights file follow it). `combinations` expands the flags; each combination is one evaluation
(`cbir_tf.runs.compare`), and its results (every method of `rerank.methods`) become rows of one
table (`format_table`) and lines of a tidy CSV (`write_csv`: one line per combination, method
and metric, for pandas). A combination that failed keeps its row, with the error.

Standard library and numpy only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cbir_tf.fileio import atomic_write_text

__all__ = [
    "Combination",
    "combinations",
    "format_table",
    "parse_compare",
    "tidy_rows",
    "wide_rows",
    "write_csv",
]

_ITEM = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*$")


@dataclasses.dataclass(frozen=True)
class Value:
    """One value of a compared field: its label, and every field it sets (itself first)."""

    label: str
    fields: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Combination:
    """One combination of the compared values.

    Attributes:
      labels: {compared field: value label}, in the order of the flags.
      fields: {config field: value} to set (the compared fields and what their values bring).
    """

    labels: dict[str, str]
    fields: dict[str, str]

    def key(self) -> str:
        """A file-name-safe name (its results folder), e.g. 'backbone=mobilenet,pooling=gem'."""
        parts = [f"{f.split('.')[-1]}={v}" for f, v in self.labels.items()]
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:150]

    def text(self) -> str:
        return ", ".join(self.labels.values())


def _split_values(text: str) -> list[str]:
    """Splits on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v for v in (s.strip() for s in out) if v]


def parse_compare(item: str) -> tuple[str, list[Value]]:
    """'FIELD:v1,v2[f=x;g=y],...' as (FIELD, values).

    Raises:
      ValueError: no ':' or no value, unbalanced brackets, a bracket entry without '=' (one
        line naming the flag).
    """
    field, sep, rest = str(item).partition(":")
    field = field.strip()
    if not sep or not field or not rest.strip():
        raise ValueError(
            f"--compare={item}: expected FIELD:v1,v2,... (e.g. model.pooling:mac,rmac)"
        )
    if rest.count("[") != rest.count("]"):
        raise ValueError(f"--compare={item}: unbalanced brackets")
    values = []
    for raw in _split_values(rest):
        m = _ITEM.match(raw)
        if not m:
            raise ValueError(f"--compare={item}: cannot read the value {raw!r}")
        label, extra = m.group(1), m.group(2)
        fields = [(field, label)]
        for assignment in (extra or "").split(";"):
            if not assignment.strip():
                continue
            name, eq, value = assignment.partition("=")
            if not eq or not name.strip():
                raise ValueError(
                    f"--compare={item}: {assignment.strip()!r} in brackets is not FIELD=VALUE"
                )
            fields.append((name.strip(), value.strip()))
        values.append(Value(label, tuple(fields)))
    if len({v.label for v in values}) < len(values):
        raise ValueError(f"--compare={item}: a value is given twice")
    return field, values


def combinations(items: Sequence[str]) -> list[Combination]:
    """Every combination of the values of the `--compare` flags, the first flag varying slowest.

    Raises:
      ValueError: a malformed flag, or one field compared twice.
    """
    parsed = [parse_compare(i) for i in items]
    fields = [f for f, _ in parsed]
    if len(set(fields)) < len(fields):
        raise ValueError(f"--compare: a field is compared twice ({', '.join(fields)})")
    out = []
    for values in itertools.product(*(v for _, v in parsed)):
        labels = {f: v.label for f, v in zip(fields, values, strict=True)}
        sets: dict[str, str] = {}
        for v in values:
            sets.update(dict(v.fields))
        out.append(Combination(labels, sets))
    return out


def tidy_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per combination, method and metric.

    Args:
      entries: [{'combination': Combination, 'rows': `report.table_rows` of its results (one
        dict per method, values in %) or None, 'error': str or None}].

    Returns:
      [{<compared field>: label, ..., 'method', 'metric' ('mAP M', 'mP@5 H', ...), 'value' (%,
      or None), 'error' ('' or the message)}]; a failed combination has one row, metric ''.
    """
    rows = []
    for e in entries:
        labels = dict(e["combination"].labels)
        if e.get("error"):
            rows.append({**labels, "method": "", "metric": "", "value": None, "error": e["error"]})
            continue
        for table_row in e["rows"]:
            table_row = dict(table_row)
            method = table_row.pop("method")
            for metric, value in table_row.items():
                rows.append(
                    {**labels, "method": method, "metric": metric, "value": value, "error": ""}
                )
    return rows


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes `tidy_rows` as CSV (atomically); returns the path."""
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["method", "metric", "value", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
    return path


def wide_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per combination and method: the compared values, 'method', every metric (%),
    'error' (a failed combination: one row, its metrics None)."""
    out = []
    metrics = next((list(e["rows"][0])[1:] for e in entries if e.get("rows")), [])
    for e in entries:
        labels = dict(e["combination"].labels)
        if e.get("error"):
            out.append({**labels, "method": "", **dict.fromkeys(metrics), "error": e["error"]})
            continue
        for row in e["rows"]:
            out.append({**labels, **row, "error": ""})
    return out


def format_table(entries: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """One fixed-width table: a row per combination and method (the compared values first)."""
    fields = list(entries[0]["combination"].labels) if entries else []
    heads = [f.split(".")[-1] for f in fields] + ["method"]
    lines = []
    metric_names: list[str] = []
    body = []
    for e in entries:
        labels = list(e["combination"].labels.values())
        if e.get("error"):
            body.append((labels + [""], None, e["error"]))
            continue
        for row in e["rows"]:
            row = dict(row)
            method = row.pop("method")
            metric_names = metric_names or list(row)
            body.append((labels + [method], row, None))
    widths = [max([len(h)] + [len(b[0][i]) for b in body]) for i, h in enumerate(heads)]
    cols = [max(len(m), 6) for m in metric_names]
    header = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))
    header += "  " + "  ".join(m.rjust(c) for m, c in zip(metric_names, cols, strict=True))
    if title:
        lines.append(title)
    lines += [header, "-" * len(header)]
    for names, row, error in body:
        text = "  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))
        if error is not None:
            text += f"  failed: {' '.join(str(error).split())}"
        else:
            text += "  " + "  ".join(
                ("-" if row[m] is None else f"{row[m]:.2f}").rjust(c)
                for m, c in zip(metric_names, cols, strict=True)
            )
        lines.append(text)
    return "\n".join(lines)
