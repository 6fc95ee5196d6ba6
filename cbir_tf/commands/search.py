r"""Searches an image index with a photo (or a folder of photos) and shows the results.

  python extract.py --images=~/photos --out=index/           # build the index first
  python search.py --index=index/ --query=photo.jpg --k=10 --out=results/
  python search.py --index=index/ --query=queries/ --rerank=aqe --out=results/   # one page each
  python search.py --index=index/ --query=photo.jpg --rerank=diffusion --config=tuned.py

Prints a ranked table (rank, score, image id) per query; with --out writes an HTML page (the
query and its results as thumbnails with scores) and a PNG result grid per query, plus
results/index.html linking them when --query is a folder. Pages work offline (thumbnails sit
beside them, or inside them with --embed).
"""

import sys

from absl import flags
from ml_collections import config_flags

from cbir_tf import quiet
from cbir_tf.commands import checks, cli
from cbir_tf.rerank import pipeline

flags.DEFINE_string("query", None, "Query image, or a folder of query images.")
flags.DEFINE_integer("k", 10, "Results per query.")
flags.DEFINE_enum("rerank", pipeline.NONE, list(pipeline.METHODS), "Re-ranking (aqe, dba, ...).")
flags.DEFINE_string("out", None, "Folder for the HTML pages and PNG grids (none: table only).")
flags.DEFINE_bool("recursive", True, "Search sub-folders of a --query folder for images.")
flags.DEFINE_bool("embed", False, "Embed images in the pages (one self-contained file each).")
flags.DEFINE_bool("exact", False, "Exact search even where the index has an approximate index.")
flags.mark_flags_as_required(["query"])
cli.define_index_flags()
config_flags.DEFINE_config_file("config", None, cli.INDEX_CONFIG_HELP)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup_logging(FLAGS.verbose)
    cli.run_main(check_arguments)  # in a second, before TensorFlow loads
    quiet.import_tensorflow(FLAGS.verbose)  # after the flags parsed, without its noise
    from cbir_tf.runs.search import run_search

    cli.run_main(
        lambda: run_search(
            FLAGS.index,
            FLAGS.query,
            k=FLAGS.k,
            rerank=FLAGS.rerank,
            out=FLAGS.out,
            model=FLAGS.model,
            root=FLAGS.root,
            recursive=FLAGS.recursive,
            embed=FLAGS.embed,
            exact=FLAGS.exact,
            full_check=FLAGS.verify,
            rerank_settings=cli.rerank_block(FLAGS.config),
        )
    )


def check_arguments() -> None:
    """The flags and files of this run, checked before TensorFlow loads."""
    from cbir_tf.retriever import check_k

    check_k(FLAGS.k)
    checks.index("index", FLAGS.index)
    checks.path_exists("query", FLAGS.query)
    checks.path_exists("model", FLAGS.model)
    checks.path_exists("root", FLAGS.root, "folder")


def run() -> None:
    """Parses the command line and runs the command (console script `cbir-search`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
