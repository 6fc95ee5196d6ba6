r"""Serves an image index over HTTP: a search page and a JSON API.

  python extract.py --images=~/photos --out=index/        # build the index first
  python serve.py --index=index/ --port=8080              # then open http://127.0.0.1:8080/
  curl -F image=@photo.jpg 'http://127.0.0.1:8080/api/search?k=5&rerank=aqe'

The page takes a photo (drop or file picker), shows the k most similar indexed images with rank,
score and path in the collection, and searches again with any result clicked. The model is
loaded once; new commits of the index (extract.py adding photos) are served within
--reload_every seconds, each request answered from one committed state. Only this machine can
connect unless --host says otherwise.
"""

import sys

from absl import flags
from ml_collections import config_flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli
from cbir_tf.config import default

flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (wider than loopback is logged).")
flags.DEFINE_integer("port", 8080, "Port to listen on.")
flags.DEFINE_float("max_upload_mb", 20.0, "Largest accepted upload, MiB (refused while streaming).")
flags.DEFINE_integer("threads", None, "Worker threads for decoding and search (default: cores).")
flags.DEFINE_integer(
    "large_image_pixels", default("serve.large_image_pixels"),
    "Uploads whose header declares more pixels are large: decoded apart, JPEGs at reduced scale.",
)  # fmt: skip
flags.DEFINE_integer(
    "large_decodes", default("serve.large_decodes"),
    "Uploads of large images decoded at once, in threads apart from the other requests.",
)  # fmt: skip
flags.DEFINE_float(
    "reload_every",
    None,
    "Seconds between checks for a new commit of the index, served from the next request on "
    "(default: config search.reload_every, 2; 0: only on POST /api/reload from this machine).",
)
cli.define_index_flags()
config_flags.DEFINE_config_file("config", None, cli.INDEX_CONFIG_HELP)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup_logging(FLAGS.verbose)
    cli.run_main(check_arguments)  # in a second, before TensorFlow loads
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise
    from cbir_tf.serve import app as serve_app

    cli.run_main(
        lambda: serve_app.serve(
            FLAGS.index,
            host=FLAGS.host,
            port=FLAGS.port,
            max_upload_mb=FLAGS.max_upload_mb,
            threads=FLAGS.threads,
            model=FLAGS.model,
            root=FLAGS.root,
            large_decodes=FLAGS.large_decodes,
            large_image_pixels=FLAGS.large_image_pixels,
            full_check=FLAGS.verify,
            rerank=cli.rerank_block(FLAGS.config),
            **({} if FLAGS.reload_every is None else {"reload_every": FLAGS.reload_every}),
        )
    )


def check_arguments() -> None:
    """The flags and files of this run, checked before TensorFlow loads."""
    checks.index("index", FLAGS.index)
    checks.path_exists("model", FLAGS.model)
    checks.path_exists("root", FLAGS.root, "folder")


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-serve`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
