r"""Evaluates retrieval on Revisited Oxford/Paris: descriptors, search, re-ranking, mAP table.

  python evaluate.py --dataset=paris6k                       # EfficientNet-B1 + R-MAC (default)
  python evaluate.py --config=configs/demo.py                # offline synthetic demo
  python evaluate.py --dataset=paris6k --descriptors=STORE   # precomputed descriptors
  python evaluate.py --dataset=paris6k --descriptors=feats.mat   # revisitop .mat (X, Q: [D, N])
  python evaluate.py --model=runs/train/model.keras --dataset=oxford5k
  python evaluate.py --config.model.backbone=vgg16 --config.rerank.diffusion.k=100
  python evaluate.py --dataset=paris6k --distractors=r1m     # RPar+R1M (1M distractors)
  python evaluate.py --dataset=oxford5k --distractors=~/photos   # any folder as distractors
  python evaluate.py --dataset=~/my_benchmark               # own benchmark: jpg/ + gnd.json
  python evaluate.py --dataset=~/my_benchmark --tune        # settings chosen, cross-validated
  python evaluate.py --dataset=paris6k --compare=model.backbone:vgg16,resnet50 \
      --compare=model.pooling:mac,rmac                       # every combination x every method

Prints the table (mAP E/M/H and mP@1,5,10 in %, per method) and writes results.json,
results.csv, result grids and an HTML report under --out (default <workdir>/eval/<dataset>).
"""

import sys

from absl import flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli

cli.define_config_flag()
flags.DEFINE_string("out", None, "Folder for the results (default <workdir>/eval/<dataset>).")
flags.DEFINE_string(
    "descriptors", None, "Precomputed descriptors: a store folder (db/, queries/) or a .mat file."
)
flags.DEFINE_bool(
    "tune",
    False,
    "Choose re-ranking (and whitening) settings on the benchmark's ground truth, "
    "cross-validated over its queries (config block `tune`); writes them as a config file.",
)
flags.DEFINE_multi_string(
    "compare",
    None,
    "FIELD:v1,v2,... (any config field; repeatable): evaluate every combination of the values "
    "with every method of rerank.methods; one table, comparison.csv, a chart and report.html.",
)
cli.define_benchmark_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup_logging(FLAGS.verbose)
    cfg = FLAGS.config
    cli.apply_overrides(cfg, cli.benchmark_overrides(FLAGS))
    cli.run_main(lambda: check_arguments(cfg))  # in a second, before TensorFlow loads
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise
    cli.set_model_image_size(cfg, FLAGS)
    if FLAGS.tune and FLAGS.compare:
        cli.fail("--tune and --compare are separate runs: give one of them")
    if FLAGS.tune:
        from cbir_tf.runs.tune import run_tune as run
    elif FLAGS.compare:
        from cbir_tf.runs.compare import run_comparison

        def run(cfg, **kwargs):
            return run_comparison(cfg, FLAGS.compare, **kwargs)
    else:
        from cbir_tf.runs.evaluate import run_benchmark as run

    cli.run_main(
        lambda: run(
            cfg,
            model_path=FLAGS.model,
            descriptors=FLAGS.descriptors,
            out_dir=FLAGS.out,
            download=FLAGS.download,
        )
    )


def check_arguments(cfg) -> None:
    """The flags, files and names of this run, checked before TensorFlow loads."""
    checks.benchmark(cfg)
    checks.rerank_methods(cfg)
    checks.path_exists(
        "descriptors", FLAGS.descriptors, hint="a store folder holding db/ and queries/, or a .mat"
    )
    if not FLAGS.descriptors:
        checks.model(cfg, FLAGS.model)


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-evaluate`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
