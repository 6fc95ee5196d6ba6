r"""Fine-tunes a descriptor model on labelled images and saves it as WORKDIR/model.keras.

  python train.py --backbone=efficientnetb1 --train_dir=DATA/train --val_dir=DATA/val \
      --workdir=runs/mine                                      # head recipe (frozen backbone)
  python train.py --config=configs/train_metric.py --train_dir=DATA/train --workdir=runs/m
  python train.py --train_data=tfds:oxford_flowers102 --recipe=metric --workdir=runs/flowers
  python train.py ... --weights=mobilenet_2_5_224_tf_no_top.h5 --backbone=mobilenet \
      --config.model.alpha=0.25 --config.train.epochs=5       # offline, own weights file

A labelled folder has one sub-folder per class. Without --val_dir a stratified fraction of the
training images is held out (--config.train.val_fraction). An interrupted run resumes from its
last checkpoint: run the same command again. Then:

  python extract.py --model=WORKDIR/model.keras --images=PHOTOS --out=INDEX
  python evaluate.py --model=WORKDIR/model.keras --dataset=roxford5k
"""

import os
import sys

from absl import app, flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli

cli.define_config_flag()
flags.DEFINE_string("train_dir", None, "Labelled training folder (one sub-folder per class).")
flags.DEFINE_string(
    "train_data", None, "Training data: a labelled folder or tfds:<name>[:<split>]."
)
flags.DEFINE_string("val_dir", None, "Labelled validation folder (or tfds:<name>:<split>).")
flags.DEFINE_string("workdir", None, "Output folder (model, checkpoints, logs).")
cli.define_model_flags("Initial weights: 'imagenet', 'none' or a .h5 file.")
flags.DEFINE_enum("recipe", None, ["head", "metric"], "Training recipe (config.train.recipe).")
flags.DEFINE_string("tfds_data_dir", None, "TensorFlow Datasets folder (default TFDS's).")
flags.DEFINE_bool("progress", True, "Print one line per epoch.")
flags.DEFINE_bool("verbose", False, "Debug logging.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging(FLAGS.verbose)
    cfg = FLAGS.config
    cli.apply_overrides(
        cfg,
        {
            "workdir": FLAGS.workdir,
            "model.backbone": FLAGS.backbone,
            "model.weights": FLAGS.weights,
            "train.recipe": FLAGS.recipe,
        },
    )
    train_data = FLAGS.train_data or FLAGS.train_dir
    if not train_data:
        raise app.UsageError("give the training images: --train_dir=FOLDER or --train_data=...")
    if FLAGS.train_data and FLAGS.train_dir and FLAGS.train_data != FLAGS.train_dir:
        raise app.UsageError("give either --train_dir or --train_data, not both")
    tfds_dir = FLAGS.tfds_data_dir or cfg.train.tfds_data_dir or None

    cli.run_main(lambda: check_arguments(cfg, train_data))  # in a second, before TensorFlow
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise

    from cbir_tf import fileio
    from cbir_tf import train as fine_tuning

    def train_and_report():
        os.makedirs(cfg.workdir, exist_ok=True)
        fileio.atomic_write_text(
            os.path.join(cfg.workdir, "config.json"), cfg.to_json_best_effort()
        )
        result = fine_tuning.train(
            cfg,
            train_data,
            cfg.workdir,
            FLAGS.val_dir,
            tfds_data_dir=tfds_dir,
            progress=FLAGS.progress,
        )
        print(
            f"model: {result.model_path}\n"
            f"descriptor: {result.descriptor}; validation mAP {result.best_val_map:.4f} "
            f"(off-the-shelf {result.off_the_shelf_val_map:.4f})\n"
            f"next: python extract.py --model={result.model_path} --images=PHOTOS --out=INDEX"
        )

    cli.run_main(train_and_report)


def check_arguments(cfg, train_data: str) -> None:
    """The flags, files and names of this run, checked before TensorFlow loads."""
    for flag, value in (("train_data" if FLAGS.train_data else "train_dir", train_data),
                        ("val_dir", FLAGS.val_dir)):  # fmt: skip
        if value and not str(value).startswith("tfds:"):
            checks.path_exists(flag, value, "folder")
    checks.model(cfg, None)


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-train`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
