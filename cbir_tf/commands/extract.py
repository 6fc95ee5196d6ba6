r"""Extracts global descriptors: a benchmark (database + cropped queries) or your own photos.

  python extract.py                                   # default: EfficientNet-B1 + R-MAC, Paris6k
  python extract.py --dataset=oxford5k
  python extract.py --dataset=paris6k --distractors=r1m   # + the 1M distractors (own store)
  python extract.py --distractors=r1m --out=part0 --shard_index=0 --num_shards=4   # 1 of 4
  python extract.py --images=~/photos --out=index/    # own collection (recursive), an index
  python extract.py --images=DIR --out=index/ --backbone=mobilenetv2 \
      --weights=mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \
      --config.data.image_size=224       # offline: a local weights file, at the size it suits
  python extract.py --images=DIR --out=part0 --shard_index=0 --num_shards=4   # one of 4 shards
  python extract.py --merge=part0,part1,part2,part3 --out=STORE             # join the shards
  python extract.py --verify --out=index/         # every file against its commit's checksum
  python extract.py --images=DIR --out=index/ --runner=beam                 # Apache Beam, local
  python extract.py --images=DIR --out=index/ --runner=beam \
      --beam_options="--runner=FlinkRunner --flink_master=HOST:8081 --environment_type=LOOPBACK"

Interrupted runs resume where they stopped: run the same command again.
"""

import sys

from absl import flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli

cli.define_config_flag()
flags.DEFINE_string(
    "images",
    None,
    "A folder of images (searched recursively) to index, or a .txt/.lst file listing image "
    "paths, one per line (relative to the list file).",
)
flags.DEFINE_string("out", None, "Output store / index folder.")
flags.DEFINE_integer("shard_index", None, "This process's shard (0-based).")
flags.DEFINE_integer("num_shards", None, "Number of shards the collection is split into.")
flags.DEFINE_list("merge", None, "Shard stores to merge into --out (no extraction).")
flags.DEFINE_enum("runner", None, ["local", "beam"], "local, or an Apache Beam pipeline.")
flags.DEFINE_string("beam_options", None, "Beam pipeline options, passed through unchanged.")
flags.DEFINE_bool(
    "verify",
    False,
    "Check every file of the index or store folder --out (and the stores below it) against the "
    "size and SHA-256 recorded at its commit: one line per damaged file, exit status 1.",
)
cli.define_benchmark_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup_logging(FLAGS.verbose)
    if FLAGS.verify:
        from cbir_tf.runs import extract as runs

        sys.exit(0 if cli.run_main(lambda: runs.verify(FLAGS.out)) else 1)
    cfg = FLAGS.config
    cli.apply_overrides(
        cfg,
        {
            **cli.benchmark_overrides(FLAGS),
            "extract.out": FLAGS.out,
            "extract.shard_index": FLAGS.shard_index,
            "extract.num_shards": FLAGS.num_shards,
            "extract.runner": FLAGS.runner,
            "extract.beam_options": FLAGS.beam_options,
        },
    )
    cli.run_main(lambda: check_arguments(cfg))  # in a second, before TensorFlow loads
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise
    cli.set_model_image_size(cfg, FLAGS)
    from cbir_tf.runs import extract as runs

    if FLAGS.merge:
        cli.run_main(lambda: runs.merge(FLAGS.merge, FLAGS.out))
    elif FLAGS.images:
        cli.run_main(
            lambda: runs.extract_folder(
                cfg,
                FLAGS.images,
                FLAGS.out,
                model_path=FLAGS.model,
            )
        )
    else:
        cli.run_main(
            lambda: runs.extract_dataset(cfg, model_path=FLAGS.model, download=FLAGS.download)
        )


def check_arguments(cfg) -> None:
    """The flags, files and names of this run, checked before TensorFlow loads."""
    if FLAGS.merge:
        checks.required("out", FLAGS.out, "with --merge: the folder of the merged store")
        for shard in FLAGS.merge:
            checks.path_exists("merge", shard, "folder")
        return
    checks.model(cfg, FLAGS.model)
    if FLAGS.images:
        checks.required("out", FLAGS.out, "with --images: the folder to write the index into")
        checks.path_exists("images", FLAGS.images)
    else:
        checks.benchmark(cfg)


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-extract`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
