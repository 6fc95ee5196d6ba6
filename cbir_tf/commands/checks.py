"""What the commands check before TensorFlow loads: arguments, files and names, in a second.

Importing TensorFlow and building a model takes 5-13 s; a missing folder, `--k=0`, an unknown
pooling, a malformed `gnd.json` or a weights file of the wrong kind must not wait for it. Each
command's `check_arguments` calls these right after its flags are parsed, through
`cli.run_main`, so that a mistake is one `error: ...` line. The library checks the same things
again where it does the work (for its Python callers); these checks only answer sooner.

Nothing here imports TensorFlow: only modules of the numpy-only stages (data, store, the
re-ranking names) are imported, each when needed.
"""

from __future__ import annotations

import os
from typing import Any

from cbir_tf import config as config_lib


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...), left to the library to open."""
    return "://" in str(path)


def path_exists(flag: str, value: str | None, what: str = "file or folder", hint: str = "") -> None:
    """`--flag=value` names an existing local file or folder (URLs and unset flags pass).

    Args:
      flag, value: the flag and its value.
      what: 'folder' when it must be one.
      hint: what the flag should name, added to the message.

    Raises:
      FileNotFoundError: naming the flag and the path.
    """
    if not value or is_remote(value):
        return
    path = os.path.expanduser(str(value))
    if not os.path.exists(path):
        message = f"--{flag}={value}: {os.path.abspath(path)} does not exist"
        raise FileNotFoundError(message + (f" ({hint})" if hint else ""))
    if what == "folder" and not os.path.isdir(path):
        raise NotADirectoryError(f"--{flag}={value}: {os.path.abspath(path)} is not a folder")


def required(flag: str, value: Any, why: str) -> None:
    """`--flag` is given; else a ValueError saying what it is for."""
    if value is None or value == "" or value == []:
        raise ValueError(f"--{flag} is needed {why}")


def model(cfg: Any, model_path: str | None) -> None:
    """The model the command builds: a saved `--model` file that exists, or the config's
    `model` block with a known pooling and weights that are a keyword or an existing file."""
    if model_path:
        path_exists("model", model_path)
        return
    from cbir_tf.describe.choices import check_model_names

    check_model_names(config_lib.block(cfg, "model"))


def benchmark(cfg: Any) -> None:
    """The config's `data.dataset` and `data.distractors`: a known benchmark name, or an own
    benchmark folder whose ground truth reads (gnd.json or gnd_<name>.pkl, its images in jpg/);
    a known distractor set or an existing folder."""
    from cbir_tf.data import distractors, prepare, revisited

    data = config_lib.block(cfg, "data")
    if prepare.is_folder_benchmark(data["dataset"]):
        from cbir_tf.data.own import open_folder

        open_folder(data["dataset"], check_images=True)
    else:
        revisited.resolve_dataset_name(data["dataset"])
    value = str(data.get("distractors") or "").strip()
    if value and value.lower() not in distractors.SPECS:
        path_exists("distractors", value, "folder")


def index(flag: str, path: str) -> None:
    """`--flag=path` is an index folder (extract.py --images, Retriever.save)."""
    from cbir_tf.store import index_folder

    folder = os.path.expanduser(path)
    if not index_folder.is_index(folder):
        index_folder.read_manifest(folder)  # FileNotFoundError saying how to build one


def rerank_methods(cfg: Any) -> None:
    """The config's `rerank.methods` are methods `cbir_tf.rerank.pipeline` knows."""
    from cbir_tf.rerank import pipeline

    methods = config_lib.block(cfg, "rerank")["methods"]
    for method in [methods] if isinstance(methods, str) else methods:
        pipeline.check_method(method, what="rerank.methods", none_word="plain")
