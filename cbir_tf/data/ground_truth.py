"""Ground-truth files of the landmark benchmarks: read safely, check their structure.

A ground truth is a pickle holding 'imlist' (N database image names), 'qimlist' (Q query names)
and 'gnd' (Q dicts): under the revisited protocols 'easy' / 'hard' / 'junk' index lists and a
query box 'bbx' (revisitop's `gnd_roxford5k.pkl`), under the original one 'ok' (and 'good')
and 'junk' (cnnimageretrieval's `gnd_oxford5k.pkl`). It is read only through the restricted
unpickler of `cbir_tf.data.safe_pickle`, and checked before anything uses it, so that a wrong,
truncated or hostile file is reported by name instead of failing later. `remap_original`
re-expresses an original-protocol file in the terms of the revisited lists.

A users' own benchmark may give its ground truth as a hand-written `gnd.json` instead
(`load_gnd_json`; the format is described in `cbir_tf.data.own`).

numpy + standard library only.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from typing import Any

import numpy as np

from cbir_tf.data.safe_pickle import UnsafePickleError, restricted_loads

__all__ = [
    "GroundTruthError",
    "UnsafePickleError",
    "check_bbx",
    "image_names",
    "load_ground_truth",
    "remap_original",
    "validate_ground_truth",
]


class GroundTruthError(ValueError):
    """A ground-truth file is unreadable or does not have the benchmark's structure."""


_MAX_GND_BYTES = 256 << 20


def _unpickle(path: str, allow_numpy: bool) -> Any:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground-truth file {path} does not exist") from None
    if size > _MAX_GND_BYTES:
        raise GroundTruthError(f"{path} is {size} bytes, far too large for a ground-truth file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return restricted_loads(data, source=path, allow_numpy=allow_numpy)
    except UnsafePickleError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        RecursionError,
    ) as e:
        raise GroundTruthError(
            f"{path} is not a readable ground-truth pickle ({type(e).__name__}: {e}); it may be "
            f"truncated or not a pickle at all: delete it and download it again"
        ) from None


def load_ground_truth(
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    allow_numpy: bool = True,
    validate: bool = True,
) -> dict[str, Any]:
    """Loads a ground-truth pickle (revisitop / cnnimageretrieval format) safely.

    The restricted unpickler admits dicts, lists, tuples, str, bytes, int, float, bool and
    None; numpy arrays of plain numeric or string dtype are rebuilt from their bytes without
    calling anything numpy-side that the file names. Anything else (a pickle naming
    `os.system`, `builtins.eval`, any class) is refused before it can run.

    Args:
      path: e.g. `<data_root>/datasets/rparis6k/gnd_rparis6k.pkl`.
      kind: 'revisited' (easy/hard/junk per query), 'original' (ok[/good]/junk), or 'auto'.
      allow_numpy: admit numpy arrays (rebuilt by `cbir_tf.data.safe_pickle`, never by numpy).
      validate: check the structure (`validate_ground_truth`).

    Returns:
      The dict as stored: 'imlist' (list of N image names), 'qimlist' (list of Q names),
      'gnd' (list of Q dicts; 'bbx' [x1, y1, x2, y2] and index lists into imlist).

    Raises:
      UnsafePickleError: the pickle names a callable or class (the message names it).
      GroundTruthError: unreadable file or wrong structure (the message says what is wrong).
      FileNotFoundError: no file at `path`.
    """
    path = os.fspath(path)
    if path.endswith(".json"):  # a hand-written gnd.json of an own benchmark (data/own.py)
        return load_gnd_json(path)
    cfg = _unpickle(path, allow_numpy)
    if validate:
        validate_ground_truth(cfg, source=path, kind=kind)
    return cfg


# The keys of one query's entry in a gnd.json.
_ENTRY_KEYS = {"easy", "hard", "junk", "ok", "bbx"}


def _names(value: Any, key: str, path: str) -> list[str]:
    if not isinstance(value, list):
        raise GroundTruthError(f"{path}: '{key}' must be a list of image names")
    seen: set[str] = set()
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise GroundTruthError(f"{path}: {key}[{i}] is {name!r}, not an image name")
        if name.lower().endswith((".jpg", ".jpeg")):
            raise GroundTruthError(
                f"{path}: {key}[{i}] = {name!r}: names are written without extension "
                f"(the image is jpg/<name>.jpg)"
            )
        if name in seen:
            raise GroundTruthError(f"{path}: '{key}' lists {name!r} twice (duplicate names)")
        seen.add(name)
    return value


def _entry(g: Any, i: int, qname: str, path: str) -> dict[str, Any]:
    where = f"{path}: gnd[{i}] (query {qname!r})"
    if not isinstance(g, dict):
        raise GroundTruthError(f"{where} must be an object with easy/hard/junk/bbx or ok/junk/bbx")
    unknown = sorted(set(g) - _ENTRY_KEYS)
    if unknown:
        raise GroundTruthError(
            f"{where} has unknown key(s) {unknown}; valid: {', '.join(sorted(_ENTRY_KEYS))}"
        )
    if "ok" in g and ("easy" in g or "hard" in g):
        raise GroundTruthError(f"{where}: give either 'ok' or 'easy' and 'hard', not both")
    if "ok" not in g and not ("easy" in g and "hard" in g):
        raise GroundTruthError(f"{where} needs 'easy' and 'hard' lists (or one 'ok' list)")
    out = {
        "easy": g["ok"] if "ok" in g else g["easy"],
        "hard": [] if "ok" in g else g["hard"],
        "junk": g.get("junk", []),
    }
    for key in ("easy", "hard", "junk"):
        if not isinstance(out[key], list):
            raise GroundTruthError(f"{where}: '{key}' must be a list of indices into imlist")
    out["bbx"] = g.get("bbx")
    return out


def load_gnd_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a hand-written `gnd.json`; returns it in the revisitop structure.

    Returns:
      {'imlist', 'qimlist', 'gnd': [{'easy', 'hard', 'junk', 'bbx'}]} ('ok' lists become
      'easy' with an empty 'hard'), and 'ok_lists': how many queries gave 'ok'.

    Raises:
      GroundTruthError: one line naming the file and what is wrong (syntax with its line,
        a missing or unknown key, a duplicate name, an index outside imlist, a bad box).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise GroundTruthError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise GroundTruthError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise GroundTruthError(f"{path}: expected an object with imlist, qimlist and gnd")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise GroundTruthError(f"{path}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(data) - {"imlist", "qimlist", "gnd"})
    if unknown:
        raise GroundTruthError(f"{path}: unknown key(s) {unknown}; valid: imlist, qimlist, gnd")
    imlist = _names(data["imlist"], "imlist", path)
    qimlist = _names(data["qimlist"], "qimlist", path)
    if not isinstance(data["gnd"], list) or len(data["gnd"]) != len(qimlist):
        n = len(data["gnd"]) if isinstance(data["gnd"], list) else "no"
        raise GroundTruthError(
            f"{path}: 'gnd' must hold one entry per query: {n} entries, {len(qimlist)} queries"
        )
    gnd = [_entry(g, i, qimlist[i], path) for i, g in enumerate(data["gnd"])]
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    validate_ground_truth(cfg, source=path, kind="revisited")  # indices in range, boxes
    cfg["ok_lists"] = sum("ok" in g for g in data["gnd"])
    return cfg


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def image_names(value: Any, key: str, source: str) -> list[str]:
    """`value` (a list or 1-D array of names) as a list of plain file names, or GroundTruthError."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "US":
            raise GroundTruthError(f"{source}: '{key}' must be a 1-D list of image names")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GroundTruthError(
            f"{source}: '{key}' must be a list of image names, not {type(value).__name__}"
        )
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if not isinstance(v, str) or not v:
            raise GroundTruthError(f"{source}: {key}[{i}] is {v!r}, not an image name")
        if "/" in v or "\\" in v or v in (".", ".."):
            raise GroundTruthError(f"{source}: {key}[{i}] = {v!r} is not a plain file name")
        out.append(v)
    return out


def validate_ground_truth(cfg: Any, *, source: str = "ground truth", kind: str = "auto") -> str:
    """Checks the structure of a loaded ground truth; raises GroundTruthError saying what is wrong.

    Args:
      cfg: the loaded dict.
      source: file name used in messages.
      kind: 'revisited', 'original' or 'auto' (revisited when the first query has 'easy').

    Returns:
      The kind found: 'revisited' or 'original'.
    """
    if not isinstance(cfg, dict):
        raise GroundTruthError(f"{source}: expected a dict, found {type(cfg).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise GroundTruthError(
            f"{source}: missing key(s) {', '.join(missing)} (found: {', '.join(map(str, cfg))})"
        )
    imlist = image_names(cfg["imlist"], "imlist", source)
    qimlist = image_names(cfg["qimlist"], "qimlist", source)
    if not imlist:
        raise GroundTruthError(f"{source}: 'imlist' is empty")
    if len(set(imlist)) != len(imlist):
        seen: set[str] = set()
        dup = next(n for n in imlist if n in seen or seen.add(n))
        raise GroundTruthError(f"{source}: 'imlist' lists {dup!r} more than once")
    gnd = cfg["gnd"]
    if not isinstance(gnd, (list, tuple)):
        raise GroundTruthError(f"{source}: 'gnd' must be a list, not {type(gnd).__name__}")
    if len(gnd) != len(qimlist):
        raise GroundTruthError(
            f"{source}: 'gnd' has {len(gnd)} entries but 'qimlist' has {len(qimlist)} queries"
        )
    if kind == "auto":
        kind = "revisited" if gnd and isinstance(gnd[0], dict) and "easy" in gnd[0] else "original"
    if kind not in ("revisited", "original"):
        raise ValueError(f"kind must be 'revisited', 'original' or 'auto', not {kind!r}")
    for i, g in enumerate(gnd):
        _check_query(g, kind, len(imlist), f"{source}: gnd[{i}]", qimlist[i])
    return kind


def _check_query(g: Any, kind: str, n: int, where: str, qname: str) -> None:
    """Checks one query's entry: its lists are there and hold indices into the n images."""
    if not isinstance(g, dict):
        raise GroundTruthError(f"{where} must be a dict, not {type(g).__name__}")
    if kind == "revisited":
        required: tuple[str, ...] = ("easy", "hard", "junk")
    else:
        required = ("junk",) if "good" in g else ("ok", "junk")
    absent = [k for k in required if k not in g]
    if absent:
        raise GroundTruthError(
            f"{where} (query {qname!r}) lacks {', '.join(absent)} "
            f"({kind} protocol needs {', '.join(required)}; found {', '.join(map(str, g))})"
        )
    for key in ("easy", "hard", "junk", "ok", "good"):
        if key in g:
            _check_indices(g[key], n, f"{where}['{key}']")
    if "bbx" in g and g["bbx"] is not None:
        check_bbx(g["bbx"], f"{where}['bbx'] (query {qname!r})")


def _check_indices(ids: Any, n: int, where: str) -> None:
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu" or ids.ndim > 1:
            raise GroundTruthError(f"{where} must hold integers")
        ids = ids.reshape(-1).tolist()
    if not isinstance(ids, (list, tuple)):
        raise GroundTruthError(f"{where} must be a list of indices, not {type(ids).__name__}")
    for v in ids:
        if not _is_int(v):
            raise GroundTruthError(f"{where} holds {v!r}, not an index")
        if not 0 <= v < n:
            raise GroundTruthError(
                f"{where} holds index {int(v)}, outside 0..{n - 1} (imlist has {n} images)"
            )


def check_bbx(bbx: Any, where: str) -> list[float]:
    """A query box as [x1, y1, x2, y2] floats; GroundTruthError naming `where` if it is not."""
    values = (
        np.asarray(bbx, dtype=object).reshape(-1).tolist() if isinstance(bbx, np.ndarray) else bbx
    )
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise GroundTruthError(f"{where} must be 4 numbers [x1, y1, x2, y2], got {bbx!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
            raise GroundTruthError(f"{where} must be 4 numbers [x1, y1, x2, y2], got {bbx!r}")
        if not math.isfinite(float(v)):
            raise GroundTruthError(f"{where} holds a non-finite value: {bbx!r}")
        out.append(float(v))
    if not (out[2] > out[0] and out[3] > out[1]):
        raise GroundTruthError(f"{where} = {out} is empty (need x2 > x1 and y2 > y1)")
    return out


def _index_list(ids: Any) -> list[int]:
    if isinstance(ids, np.ndarray):
        return [int(v) for v in ids.reshape(-1)]
    return [int(v) for v in ids]


def remap_original(
    cfg: dict[str, Any], source: str, imlist: list[str], qimlist: list[str]
) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """Re-expresses an original-protocol ground truth in the revisited lists' terms.

    Queries and images are matched by name. The original 'good' list, when stored apart, is
    merged into 'ok'; ids of images not in `imlist` (the revisited queries, for instance) are
    dropped.

    Args:
      cfg: the loaded original ground truth (imlist, qimlist, gnd with ok[/good]/junk).
      source: its file, for messages and `info`.
      imlist: N revisited database image names.
      qimlist: Q revisited query names.

    Returns:
      (gnd, queries, info): one dict per covered query ('ok', 'junk': int64 sorted indices
      into `imlist`; 'bbx' when stored), int64 [Q0] indices of those queries into `qimlist`,
      and a summary (source, queries in the file, matched, unmatched names, dropped ids).
    """
    o_imlist = image_names(cfg["imlist"], "imlist", source)
    o_qimlist = image_names(cfg["qimlist"], "qimlist", source)
    db_index = {n: i for i, n in enumerate(imlist)}
    q_index = {n: i for i, n in enumerate(qimlist)}
    # Original id -> revisited id (-1 when the image is not in the revisited database).
    remap = np.array([db_index.get(n, -1) for n in o_imlist], dtype=np.int64)
    gnd, queries, unmatched, dropped = [], [], [], 0
    for qname, g in zip(o_qimlist, cfg["gnd"], strict=True):
        if qname not in q_index:
            unmatched.append(qname)
            continue
        entry: dict[str, Any] = {}
        ok = _index_list(g.get("ok", [])) + _index_list(g.get("good", []))
        for key, ids in (("ok", ok), ("junk", _index_list(g["junk"]))):
            mapped = remap[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.int64)
            dropped += int(np.sum(mapped < 0))
            entry[key] = np.unique(mapped[mapped >= 0])
        if g.get("bbx") is not None:
            entry["bbx"] = check_bbx(g["bbx"], f"{source}: bbx of {qname!r}")
        gnd.append(entry)
        queries.append(q_index[qname])
    info = {
        "source": source,
        "num_queries_in_file": len(o_qimlist),
        "num_queries": len(queries),
        "unmatched_queries": unmatched,
        "dropped_ids": dropped,
    }
    return gnd, np.asarray(queries, dtype=np.int64), info
