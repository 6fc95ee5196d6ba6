"""`evaluate.py --tune` on the collections users bring: its time and its cross-validated table.

Runs `cbir_tf.runs.tune.run_tune` (what `evaluate.py --tune` runs) with the default grid of
`configs/default.py` (144 re-ranking settings; no whitening is learned on a benchmark folder)
on the instance- and class-level benchmarks of `rerank_benchmarks.py`, with both shared weights
files (GeM, 448 px; descriptors cached in --workdir by `rerank_auto.py`), and writes the tables,
the settings chosen, the seconds and the load average (the 2 cores are shared) to
benchmarks/results/rerank_tune_2cores.md.

Run:
  python benchmarks/rerank_tune.py --bench=/tmp/rerank-benchmarks --workdir=/tmp/rerank-work
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rerank_auto import METHODS, WEIGHTS, _config  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "rerank_tune_2cores.md")
    )
    args = p.parse_args(argv)
    from cbir_tf.runs.tune import run_tune

    parts = []
    for name in ("instance", "class"):
        for weights in WEIGHTS:
            cfg = _config(os.path.join(args.bench, name), weights, {}, args.workdir, args.workdir)
            cfg.rerank.methods = tuple(m for m in METHODS if m != "aqe+dba")
            load = os.getloadavg()
            t0 = time.perf_counter()
            out = run_tune(cfg, out_dir=os.path.join(args.workdir, "tune", name, weights[:11]),
                           progress=False)  # fmt: skip
            seconds = time.perf_counter() - t0
            r = out["result"]
            parts.append(
                f"## {name}, {weights}\n\n```\n{out['table']}\n```\n\n"
                f"Chosen on all queries: {out['settings']}; per fold: "
                f"{[r.settings[c] for c in r.chosen]}.\n\n"
                f"{len(r.settings)} settings: {seconds:.1f} s in all ({r.seconds} s ranking the "
                f"grid, descriptors cached); load average {tuple(round(x, 2) for x in load)} "
                f"before, {tuple(round(x, 2) for x in os.getloadavg())} after (2 shared cores).\n"
            )
            print(parts[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("# evaluate.py --tune (benchmarks/rerank_tune.py)\n\n" + "\n".join(parts))


if __name__ == "__main__":
    main()
