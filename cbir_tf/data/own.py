"""Users' own benchmarks: a folder laid out like the revisitop datasets (`--dataset=FOLDER`).

    FOLDER/jpg/<name>.jpg          the database and query images
    FOLDER/gnd.json                the ground truth, written by hand (or gnd_<name>.pkl)

`gnd.json` holds the three lists of the revisitop pickles::

    {"imlist": ["img001", "img002", ...],          database images, names without extension
     "qimlist": ["q01", ...],                       query images
     "gnd": [{"easy": [0, 4], "hard": [7], "junk": [2], "bbx": [x1, y1, x2, y2]}, ...]}

one `gnd` entry per query, indices into `imlist` (0-based); `bbx` (the query's box in pixels)
may be null for the whole image; `junk` may be left out; `"ok": [...]` may replace easy and
hard (the original protocol's single list of positives: Easy and Medium then both measure it
and Hard has no positives). A pickle `gnd_<name>.pkl` in the revisitop format is read by the
restricted unpickler instead. Mistakes are reported in one line naming the file and the entry.

No TensorFlow: standard library and numpy through `cbir_tf.data.ground_truth`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

from cbir_tf.data.ground_truth import GroundTruthError, validate_ground_truth

__all__ = ["GND_JSON", "find_ground_truth", "load_gnd_json", "open_folder"]

log = logging.getLogger(__name__)

GND_JSON = "gnd.json"
_ENTRY_KEYS = {"easy", "hard", "junk", "ok", "bbx"}


def find_ground_truth(folder: str) -> str:
    """`FOLDER/gnd.json`, or its single `gnd_<name>.pkl`; GroundTruthError naming what to add."""
    path = os.path.join(folder, GND_JSON)
    if os.path.isfile(path):
        return path
    pickles = sorted(
        p for p in glob.glob(os.path.join(glob.escape(folder), "gnd_*.pkl"))
        if not p.endswith("_original.pkl")
    )  # fmt: skip
    if len(pickles) == 1:
        return pickles[0]
    if pickles:
        names = ", ".join(os.path.basename(p) for p in pickles)
        raise GroundTruthError(f"{folder} holds several ground truths ({names}): keep one")
    raise GroundTruthError(
        f"{folder} has no ground truth: write {path} (imlist, qimlist, gnd: see README, "
        "'Your own benchmark') or place a revisitop gnd_<name>.pkl there"
    )


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


def _warn_without_positives(ds: Any) -> None:
    for protocol, keys in (("Easy", ("easy",)), ("Medium", ("easy", "hard")), ("Hard", ("hard",))):
        empty = [ds.qimlist[i] for i, g in enumerate(ds.gnd) if not any(len(g[k]) for k in keys)]
        if empty:
            log.warning(
                "%s: %d of %d queries have no positives under %s (left out of its means): %s",
                ds.gnd_path, len(empty), len(ds.qimlist), protocol, empty[:5],
            )  # fmt: skip


def open_folder(folder: str | os.PathLike, *, check_images: bool = True) -> Any:
    """The `BenchmarkDataset` of an own benchmark folder (named after the folder).

    Raises:
      FileNotFoundError: no such folder.
      GroundTruthError, UnsafePickleError: a malformed or hostile ground truth.
      ImageListMismatchError: images listed but not in `jpg/` (the first ones named).
    """
    from cbir_tf.data.revisited import BenchmarkDataset

    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"benchmark folder {folder} does not exist")
    gnd_path = find_ground_truth(folder)
    name = os.path.basename(folder.rstrip(os.sep)) or "benchmark"
    ds = BenchmarkDataset(name, folder, gnd_path=gnd_path, check_images=check_images)
    ds.folder_benchmark = True
    _warn_without_positives(ds)
    return ds
