r"""Exports a descriptor model for deployment: a SavedModel (TF Serving) or a TFLite file.

  python export.py --model=runs/ft/model.keras --out=exported/descriptor/1    # SavedModel
  python export.py --model=index/ --out=exported/descriptor/1                 # an index's model
  python export.py --backbone=mobilenetv2 --weights=mobilenet_v2.weights.h5 \
      --config.model.pooling=gem --whitening=whitening.npz --out=exported/gem/1  # from a config
  python export.py --model=runs/ft/model.keras --out=descriptor.tflite --format=tflite \
      --quantization=float16                                                 # float32|float16|int8

TF Serving loads a model from numbered version folders: give the SavedModel's --out as
MODEL_DIR/1 (then MODEL_DIR/2, ...) and serve MODEL_DIR.

The SavedModel's `serving_default` takes encoded images (input `image_bytes`, string [B]) and
returns L2-normalised descriptors [B, D] (output `descriptors`), doing the decoding, EXIF
orientation and resizing that extraction does; `descriptors_from_pixels` takes float32 RGB
[B, H, W, 3]. Without --model the model is built from the config (backbone, weights, pooling);
image size and scales come from `config.data` (an index folder records its own).
"""

import sys

from absl import flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli

cli.define_config_flag()
flags.DEFINE_string("model", None, "A .keras descriptor model, or an index folder.")
flags.DEFINE_string("backbone", None, "Backbone name (overrides config.model.backbone).")
flags.DEFINE_string("weights", None, "'imagenet', 'none', or a weights file (.h5).")
flags.DEFINE_string("whitening", None, "A whitening .npz (Whitening.save) to build in.")
flags.DEFINE_string("out", None, "The SavedModel folder or .tflite file to write.")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "tflite"], "What to write.")
flags.DEFINE_enum(
    "quantization",
    "float32",
    ["float32", "float16", "int8"],
    "TFLite weights (int8: dynamic range).",
)
flags.DEFINE_bool("verbose", False, "Debug logging.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup_logging(FLAGS.verbose)
    cfg = FLAGS.config
    cli.apply_overrides(cfg, {"model.backbone": FLAGS.backbone, "model.weights": FLAGS.weights})
    cli.run_main(lambda: check_arguments(cfg))  # in a second, before TensorFlow loads
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise
    from cbir_tf import config
    from cbir_tf.describe import catalog
    from cbir_tf.export import formats as export

    def run():
        if not FLAGS.out:
            raise ValueError("--out is needed: the SavedModel folder or .tflite file to write")
        export.check_target(FLAGS.out)  # before the minutes a model build and export can take
        data = config.block(cfg, "data")
        settings = {k: data[k] for k in ("image_size", "scales", "ms_power")}
        if FLAGS.model:
            if FLAGS.whitening:
                raise ValueError(
                    "--whitening applies to a model built from the config, not --model"
                )
            source = export.source_from_path(FLAGS.model, **settings)
        else:
            model = catalog.with_pooling(config.block(cfg, "model"))
            source = export.source_from_model(model, whitening_path=FLAGS.whitening, **settings)
        path = export.export(source, FLAGS.out, FLAGS.format, FLAGS.quantization)
        print(f"exported {FLAGS.format} ({FLAGS.quantization}) to {path}")

    cli.run_main(run)


def check_arguments(cfg) -> None:
    """The flags, files and names of this run, checked before TensorFlow loads."""
    from cbir_tf.export.formats import check_target

    checks.required("out", FLAGS.out, "(the SavedModel folder or .tflite file to write)")
    checks.model(cfg, FLAGS.model)
    checks.path_exists("whitening", FLAGS.whitening)
    check_target(FLAGS.out)


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-export`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
