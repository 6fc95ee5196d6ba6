"""A writer that commits an index in a loop and readers that open it meanwhile (two processes).

    python tests/commit_race.py writer INDEX PHOTOS LOG COMMITS DELAY
    python tests/commit_race.py reader INDEX QUERY LOG STOPFILE

The writer alternately adds one photo and removes it again (`Retriever.index` / `remove`, the
code extract.py runs), each a commit; its renames are slowed by DELAY seconds each (a fault
injecting `os.replace`, so that readers land inside commits). After each commit it logs, as one
JSON line, the commit number and fingerprints of the ids and descriptors it committed.

The reader opens the index with `Retriever.load` in a loop until STOPFILE exists, and logs what
each opened state holds: its commit number, the fingerprints of its ids and descriptors, the
best match of QUERY (an image every state holds), and the same search repeated after a pause
(the state it holds must not change under it while commits land).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np


def fingerprints(r) -> dict:
    """The commit of a retriever's state and fingerprints of its ids and descriptors."""
    from cbir_tf.store.meta import ids_fingerprint

    desc = np.ascontiguousarray(np.asarray(r.descriptors, dtype=np.float32))
    return {
        "commit": getattr(r, "commit", None),
        "images": len(r),
        "id_list": r.ids,
        "ids": ids_fingerprint(r.ids),
        "descriptors": hashlib.sha256(desc.tobytes()).hexdigest(),
    }


def _log(path: str, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def writer(index: str, photos: str, log: str, commits: int, delay: float) -> None:
    from cbir_tf.retriever import Retriever

    real_replace = os.replace

    def slow_replace(src, dst, **kwargs):
        time.sleep(delay)
        return real_replace(src, dst, **kwargs)

    r = Retriever.load(index)
    _log(log, fingerprints(r))
    os.replace = slow_replace
    extra = sorted(os.path.join(photos, n) for n in os.listdir(photos) if n.startswith("extra"))
    for i in range(commits):
        path = extra[(i // 2) % len(extra)]
        if i % 2 == 0:
            r.index([path], progress=False)
        else:
            r.remove([path])
        _log(log, fingerprints(r))


def reader(index: str, query: str, log: str, stop: str) -> None:
    from cbir_tf.retriever import Retriever

    model, q = None, None
    while not os.path.exists(stop):
        r = Retriever.load(index, model=model)
        model = r.model
        if q is None:
            q = r.describe([query])
        entry = fingerprints(r)
        scores, rows = r.search_descriptors(q, k=3)
        top = [r.ids[int(rows[0, 0])], float(scores[0, 0])]
        time.sleep(0.05)
        scores2, rows2 = r.search_descriptors(q, k=3)
        entry["same_after_pause"] = bool(
            np.array_equal(rows, rows2) and np.array_equal(scores, scores2)
            and fingerprints(r) == entry
        )  # fmt: skip
        entry["top"] = top
        _log(log, entry)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "writer":
        writer(args[0], args[1], args[2], int(args[3]), float(args[4]))
    else:
        reader(*args)
