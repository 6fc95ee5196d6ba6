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
import logging
import os
from typing import Any

from cbir_tf.data.ground_truth import GroundTruthError

__all__ = ["GND_JSON", "find_ground_truth", "open_folder"]

log = logging.getLogger(__name__)

GND_JSON = "gnd.json"


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
        f"{folder} has no ground truth: write {path} (imlist, qimlist, gnd: see "
        "docs/benchmarks.md, 'Your own benchmark') or place a revisitop gnd_<name>.pkl there"
    )


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
