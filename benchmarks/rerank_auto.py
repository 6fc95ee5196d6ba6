"""Re-ranking with yesterday's defaults and with 'auto', on the collections users bring (issue 25).

For each benchmark of `rerank_benchmarks.py` (instance-level, class-level, a small one) and the
synthetic demo, and each shared weights file (MobileNet alpha 0.25 `.h5`, MobileNetV2 alpha 1.0
`.weights.h5`), evaluates plain, aqe, diffusion, aqe+diffusion, dba and aqe+dba (GeM at 448 px
as the issue measured, the demo as configs/demo.py runs it: R-MAC at 224 px):

  defaults   the settings every collection got before 'auto': α-QE n=2, DBA n=2, diffusion
             k=50, kq=10 (Iscen et al.'s, now `rerank.papers`)
  auto       `cbir_tf.rerank.auto`: chosen from each collection's similarity graph

through `cbir_tf.runs.evaluate.run_benchmark`, the code `evaluate.py` runs; descriptors are
extracted once into `--workdir` and reused. Prints and writes a markdown table and JSON
(mAP E / M / H, and every auto row's difference from plain), with the load average beside each
run: the machine is shared.

Run:
  python benchmarks/rerank_auto.py --bench=/tmp/rerank-benchmarks --workdir=/tmp/rerank-work
The photos and weights are looked up in ../shared (or $CBIR_SHARED).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _data import shared_dir  # noqa: E402

METHODS = ("plain", "aqe", "diffusion", "aqe+diffusion", "dba", "aqe+dba")
WEIGHTS = {
    "MobileNet 0.25": ("mobilenet", "0.25", "weights/mobilenet_2_5_224_tf_no_top.h5"),
    "MobileNetV2 1.0": ("mobilenetv2", "1.0", "weights/mobilenet_v2_1.0_224_no_top.weights.h5"),
}
SETTINGS = {
    "defaults": {"qe.n": 2, "dba.n": 2, "diffusion.k": 50, "diffusion.kq": 10},
    "auto": {},
}


def _config(dataset: str, weights: str, settings: dict, workdir: str, data_root: str):
    from cbir_tf import config as config_lib

    backbone, alpha, path = WEIGHTS[weights]
    cfg = config_lib.load_config("demo" if dataset == "demo" else "default")
    fields = {
        "data.dataset": dataset, "workdir": workdir, "data.data_root": data_root,
        "model.backbone": backbone, "model.alpha": alpha,
        "model.weights": os.path.join(shared_dir(), path), "model.weights_fallback": "",
        "rerank.methods": str(METHODS), "eval.num_visualize": 0,
    }  # fmt: skip
    if dataset != "demo":
        fields.update({"model.pooling": "gem", "data.image_size": 448})
    fields.update({f"rerank.{k}": v for k, v in settings.items()})
    for field, value in fields.items():
        config_lib.set_field(cfg, field, value)
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, help="rerank_benchmarks.py's --out (built if absent)")
    p.add_argument("--workdir", required=True, help="descriptor stores (reused across runs)")
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "rerank_auto_2cores")
    )
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.bench, "instance")):
        import rerank_benchmarks

        rerank_benchmarks.main([f"--out={args.bench}"])
    from cbir_tf.runs.evaluate import run_benchmark

    datasets = [os.path.join(args.bench, n) for n in ("instance", "class", "small")] + ["demo"]
    runs = []
    for dataset in datasets:
        for weights in WEIGHTS:
            for label, settings in SETTINGS.items():
                cfg = _config(dataset, weights, settings, args.workdir, args.workdir + "/data")
                t0 = time.perf_counter()
                out = run_benchmark(cfg, out_dir=os.path.join(args.workdir, "eval", label),
                                    progress=False, echo=False)  # fmt: skip
                seconds = time.perf_counter() - t0
                rows = {r.pop("method"): r for r in _rows(out)}
                runs.append({
                    "dataset": os.path.basename(dataset), "weights": weights, "settings": label,
                    "title": out["table"].splitlines()[0], "rows": rows,
                    "seconds": round(seconds, 1), "load": [round(x, 2) for x in os.getloadavg()],
                })  # fmt: skip
                print(f"{runs[-1]['dataset']:8s} {weights:15s} {label:8s} "
                      f"{seconds:6.1f} s  load {runs[-1]['load']}", flush=True)  # fmt: skip
    _write(args.out, runs)


def _rows(out):
    from cbir_tf.evaluate import report

    return report.table_rows(out["results"], (1, 5, 10))


def _write(out: str, runs: list[dict]) -> None:
    lines = [
        "| collection | weights | settings | " + " | ".join(METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    worst = []
    for r in runs:
        cells = []
        plain = r["rows"]["plain"]
        for m in METHODS:
            v = r["rows"][m]
            cells.append(" / ".join("-" if v[f"mAP {p}"] is None else f"{v[f'mAP {p}']:.2f}"
                                    for p in "EMH"))  # fmt: skip
            if r["settings"] == "auto":
                for p in "EMH":
                    if v[f"mAP {p}"] is not None:
                        worst.append((v[f"mAP {p}"] - plain[f"mAP {p}"], r["dataset"],
                                      r["weights"], m, p))  # fmt: skip
        lines.append(
            f"| {r['dataset']} | {r['weights']} | {r['settings']} | " + " | ".join(cells) + " |"
        )
    worst.sort()
    text = "\n".join(lines)
    text += "\n\nmAP E / M / H (%). Lowest auto rows relative to plain (points):\n"
    text += "\n".join(f"- {d:+.2f} {ds} {w} {m} mAP {p}" for d, ds, w, m, p in worst[:8])
    text += "\n\nTitles (settings used):\n" + "\n".join(
        f"- {r['title']}" for r in runs if r["settings"] == "auto"
    )
    text += "\n\nSeconds and load average (1, 5, 15 min) per run, 2 shared cores:\n" + "\n".join(
        f"- {r['dataset']} {r['weights']} {r['settings']}: {r['seconds']} s, load {r['load']}"
        for r in runs
    )
    print(text)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    with open(out + ".json", "w") as f:
        json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
