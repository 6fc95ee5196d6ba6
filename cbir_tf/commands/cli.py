"""Small helpers shared by the entry points: flags, configs, logging, quiet start, errors.

The commands (`cbir_tf/commands/`, run as `python extract.py`, `python -m
cbir_tf.commands.extract` or the installed `cbir-extract`; likewise evaluate, search, train)
stay thin: `run` parses the flags (`parse_flags`: one `error: ...` line for a bad flag or config
field), they call `apply_overrides`, then one library function, and report failures through
`run_main` so that users see one clear line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any, NoReturn

import ml_collections

from cbir_tf import config as config_lib
from cbir_tf.config import config_path

# Errors whose message already tells the user what to do: printed alone, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, OSError)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted config fields from short flags, ignoring flags left at None / ''.

    Args:
      cfg: the config to update in place.
      overrides: {'model.backbone': 'vgg16', 'data.dataset': None, ...}.
    """
    for dotted, value in overrides.items():
        if value is None or value == "":
            continue
        node = cfg
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        with cfg.unlocked():
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


def setup_logging(verbose: bool = False) -> None:
    """Plain, timestamped logging on stderr: the toolkit's own INFO lines, and only warnings
    and errors of the libraries beneath it (TensorFlow's SavedModel writer logs kilobytes at
    INFO through absl, whose level it sets itself), unless `verbose` (everything, DEBUG too)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(own_info_only)


def own_info_only(record: logging.LogRecord) -> bool:
    """A logging filter: the toolkit's records, and other libraries' warnings and errors."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "cbir_tf"


def run_main(fn: Callable[[], Any]) -> Any:
    """Runs `fn`, turning the library's explanatory errors into one line and exit status 1.

    Set CBIR_DEBUG=1 to see the full traceback.
    """
    if os.environ.get("CBIR_DEBUG"):
        return fn()
    try:
        return fn()
    except KeyboardInterrupt:
        print(
            "interrupted: finished work is saved; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as e:
        # The library's own exceptions (download, weights, pickle, lock, ...) and the usual
        # input errors explain themselves; anything else is a bug and keeps its traceback.
        if not (isinstance(e, USER_ERRORS) or type(e).__module__.startswith("cbir_tf")):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


def define_model_flags(weights_help: str) -> None:
    """Defines --backbone and --weights, the short forms of config.model's two fields."""
    from absl import flags

    flags.DEFINE_string("backbone", None, "Backbone name (overrides config.model.backbone).")
    flags.DEFINE_string("weights", None, weights_help)


def define_benchmark_flags() -> None:
    """Defines the short flags `extract.py` and `evaluate.py` share (see `benchmark_overrides`)."""
    from absl import flags

    flags.DEFINE_string(
        "dataset", None, "paris6k | oxford5k | rparis6k | roxford5k | demo | a benchmark folder."
    )
    flags.DEFINE_string(
        "distractors", None, "r1m (the revisitop 1M distractors) or a folder of images ('': none)."
    )
    flags.DEFINE_string("data_root", None, "Folder holding datasets/<name>/ (default: config).")
    flags.DEFINE_string("workdir", None, "Folder for cached whitening, descriptors and results.")
    define_model_flags("'imagenet', 'none', or a weights file (.h5).")
    flags.DEFINE_string("model", None, "A saved .keras descriptor model (from train.py).")
    flags.DEFINE_bool("download", True, "Download missing benchmark files.")
    flags.DEFINE_bool("verbose", False, "Debug logging.")


def image_size_given(values: Any) -> bool:
    """Whether `--config.data.image_size` was set on the command line (flag values of a command
    with a `--config` flag)."""
    from ml_collections import config_flags

    return "data.image_size" in config_flags.get_override_values(values["config"])


def set_model_image_size(cfg: ml_collections.ConfigDict, values: Any) -> None:
    """Sets `data.image_size` to the size the saved model of `--model` describes images at: the
    size it was trained at, unless `--config.data.image_size` was given (which then wins)."""
    if not values.model:
        return
    from cbir_tf.describe.models import image_size_for_model

    asked = int(cfg.data.image_size) if image_size_given(values) else None
    cfg.data.image_size = image_size_for_model(values.model, asked)


def define_index_flags() -> None:
    """Defines the flags of the commands that open an index folder (search.py, serve.py)."""
    from absl import flags

    flags.DEFINE_string("index", None, "Index folder (from extract.py --images or Retriever.save).")
    flags.DEFINE_string("model", None, "A .keras model replacing the one the index names.")
    flags.DEFINE_string("root", None, "Collection root, when the images moved since indexing.")
    flags.DEFINE_bool(
        "verify",
        False,
        "Compare every file of the index with the SHA-256 recorded at its commit before using "
        "it (reads every byte; sizes and headers are always checked).",
    )
    flags.DEFINE_bool("verbose", False, "Debug logging.")
    flags.mark_flag_as_required("index")


def benchmark_overrides(values: Any) -> dict[str, Any]:
    """Config fields set by the flags of `define_benchmark_flags` (for `apply_overrides`)."""
    return {
        "data.dataset": values.dataset,
        "data.distractors": values.distractors,
        "data.data_root": values.data_root,
        "workdir": values.workdir,
        "model.backbone": values.backbone,
        "model.weights": values.weights,
    }


# ---------------------------------------------------------------------------------------------
# Config files: found by name from any directory
# ---------------------------------------------------------------------------------------------

INDEX_CONFIG_HELP = (
    "A config file (e.g. one written by evaluate.py --tune) whose `rerank` block replaces the "
    "re-ranking settings saved with the index; by default the index's own."
)


def rerank_block(cfg: Any) -> dict[str, Any] | None:
    """A `--config`'s `rerank` block for `search.py` / `serve.py` (None without --config)."""
    if cfg is None:
        return None
    from cbir_tf import config as config_lib

    return config_lib.block(cfg, "rerank")


CONFIG_HELP = (
    "Config file (ml-collections): a path, or the name of a shipped config (default, demo, "
    "train_head, train_metric; also as configs/<name>.py) from any directory."
)


def define_config_flag() -> None:
    """Defines `--config` (default: the shipped configs/default.py) and its field overrides.

    Without `--config` on the command line, ml-collections loads the default file and applies
    the `--config.<field>=...` overrides while the flag is defined, i.e. when the command module
    is imported: a misspelt field raises there, and is answered in the same one line as when
    `--config` is given.
    """
    from absl import flags
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file("config", config_path("default"), CONFIG_HELP)
    except (KeyError, AttributeError) as e:
        fail(_unknown_field_line(e, sys.argv))
    except flags.Error as e:
        fail(_flag_error_line(e))


def resolve_config(value: str) -> str:
    """The config file a `--config` value means.

    An existing file is itself; otherwise `demo`, `demo.py` or `configs/demo.py` (README's form,
    from any directory) name the shipped `configs/demo.py`. A `:arg` suffix (passed to
    `get_config`) is kept. Anything else is returned unchanged, for the loader to report.
    """
    path, sep, arg = value.partition(":")
    if os.path.isfile(os.path.expanduser(path)):
        return value
    match = re.fullmatch(r"(?:configs/)?(\w+)(?:\.py)?", path)
    if match and os.path.isfile(config_path(match.group(1))):
        return config_path(match.group(1)) + sep + arg
    return value


def _resolve_config_args(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if i and re.fullmatch(r"--?config=.*", arg):
            flag, _, value = arg.partition("=")
            out[i] = f"{flag}={resolve_config(value)}"
        elif i and arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


# ---------------------------------------------------------------------------------------------
# Flags: one-line errors, key flags, the run wrapper
# ---------------------------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """Prints `error: message` (one line) on stderr and exits with status 1."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def _flag_error_line(error: Exception) -> str:
    """One line for absl's flag errors (unknown flag, bad value, config file not loadable)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return f"{type(error).__name__} while parsing the flags (see --help)"
    if "Error whilst parsing config file" in lines[0]:
        return _config_file_error_line(lines)
    # ml-collections lists every path it tried, each followed by its OS error.
    tried = [
        (lines[k - 1], line) for k, line in enumerate(lines) if k and line.startswith("[Errno")
    ]
    if tried:
        path, reason = tried[-1]
        reason = "not found" if "No such file" in reason else reason
        return f"config file {path} {reason} (see --help for the shipped configs)"
    return f"{lines[0].rstrip('.')} (see --help)"


def _config_file_error_line(lines: list[str]) -> str:
    """One line for an exception raised inside a config file's `get_config()`: the file, the
    line and its code, and the exception (ml-collections gives its whole traceback)."""
    path = re.match(r"flag --?config=([^:]*)", lines[0])
    path = path.group(1) if path else ""
    where = ""
    for k, line in enumerate(lines):
        frame = re.match(r'File "([^"]+)", line (\d+)', line)
        if frame and path and os.path.abspath(frame.group(1)) == os.path.abspath(path):
            code = (
                lines[k + 1] if k + 1 < len(lines) and not lines[k + 1].startswith("File") else ""
            )
            where = f", line {frame.group(2)}" + (f" ({code})" if code else "")
    return f"config file {path}{where}: {lines[-1]}"


def _unknown_field_line(error: Exception, argv: list[str]) -> str:
    """One line for `--config.a.b=...` naming a field the config lacks, with its suggestion."""
    # ml-collections: AttributeError(KeyError("'poolin'\nDid you mean \"pooling\" instead ..."))
    text = str(error)
    field = re.search(r"'(\w+)\\?'", text)
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    name = field.group(1) if field else ""
    dotted = next(
        (
            m.group(1)
            for arg in argv
            if (m := re.match(r"--?config\.([\w.]+)", arg)) and name in m.group(1).split(".")
        ),
        name or "?",
    )
    if suggestion:
        return f'config has no field {dotted}: did you mean "{suggestion.group(1)}"?'
    return f"config has no field {dotted} (see the config file for the fields it has)"


def _default_config_for_overrides(argv: list[str]) -> list[str]:
    """`argv` with `--config=default` added where a command's `--config` is optional (search,
    serve) and `--config.<field>=...` overrides are given without one: they then start from
    configs/default.py, as in every other command, and a misspelt field gets the same line."""
    from absl import flags

    if "config" not in flags.FLAGS or flags.FLAGS["config"].default is not None:
        return argv
    given = any(re.fullmatch(r"--?config(=.*)?", a) for a in argv[1:])
    overrides = any(re.match(r"--?config\.", a) for a in argv[1:])
    return (
        [argv[0], f"--config={config_path('default')}", *argv[1:]]
        if overrides and not given
        else argv
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with `--config` names resolved and every error as one line."""
    from absl import flags

    argv = _resolve_config_args(_default_config_for_overrides(argv))
    if "config" not in flags.FLAGS and any(re.match(r"--?config([.=]|$)", a) for a in argv[1:]):
        fail(
            f"{os.path.basename(argv[0])} takes no --config: an index folder keeps the settings "
            "it was built with (see --help for this command's flags)"
        )
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error_line(e))
    except (KeyError, AttributeError) as e:
        # ml-collections raises these for --config.<path> naming no field of the config.
        fail(_unknown_field_line(e, argv))
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:  # search/serve: optional
        check_config_flag(flags.FLAGS["config"])
    return rest


def check_config_flag(flag: Any) -> None:
    """Loads the config of a parsed `--config` flag and checks it against configs/default.py.

    Fields the file does not set take their defaults (`config.fill_defaults`); an unknown field
    or a value of the wrong type ends the command with one line naming the file and the field.
    """
    from ml_collections import config_flags

    try:
        # ml-collections defers a config file's load error to the first use of the config.
        cfg = flag.value
        cfg.get("workdir")
    except OSError as e:
        fail(_flag_error_line(e))
    source = config_flags.get_config_filename(flag) or config_path("default")
    source = source.partition(":")[0]
    try:
        config_lib.check_config(cfg, source=source)
    except config_lib.ConfigError as e:
        fail(str(e))
    config_lib.fill_defaults(cfg)
    _check_rerank_values(cfg, source)


def _check_rerank_values(cfg: Any, source: str) -> None:
    """Refuses a re-ranking value the type check lets through ('auto'-able fields are strings):
    `rerank.qe.n = "two"` is one line now, not an error after TensorFlow has loaded."""
    from cbir_tf.rerank import pipeline

    try:
        pipeline.RerankSettings.from_config(config_lib.block(cfg, "rerank"))
    except ValueError as e:
        fail(f"{source}: config.{e}")


def run(main: Callable[[list[str]], Any], module: types.ModuleType) -> None:
    """Runs a command's `main` under absl: one-line flag and usage errors, a useful --help.

    absl's --help lists the key flags of the program's main module only; the flags of a
    command live in `module` (and this module's shared ones), so they are declared key flags
    of whatever file started the program (`extract.py`, `cbir-extract`, `python -m ...`). The
    usage text is the command module's docstring.
    """
    from absl import app, flags

    main_module = sys.modules["__main__"]
    if module is not main_module and module.__doc__:
        main_module.__doc__ = module.__doc__
    for name in (module.__name__, __name__):
        for flag in flags.FLAGS.get_flags_for_module(name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except app.UsageError as e:
            fail(f"{e} (see --help)")

    app.run(guarded, flags_parser=parse_flags)
