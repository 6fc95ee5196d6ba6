"""Configs: the shipped `get_config()` files, their defaults, and their blocks as plain dicts.

Configs are `ml_collections.ConfigDict`s built by `get_config()` files: the shipped ones live in
`configs/` at the top of a checkout (installed as `cbir_tf/configs/` by setup.py), a user's own
anywhere. `configs/default.py` is the single source of defaults: a field a config lacks (an old
manifest, a hand-written dict) takes the default config's value, never one written in code, and
library signatures read theirs with `default("block.field")`.

`check_config` checks a config against `configs/default.py` before anything runs: every block,
any block added there later included, field by field (names and value types), so that a typo in
a user's own config file (`c.model.polling = "gem"`) is refused in one line instead of being
silently ignored.

This module and the command layer (`cbir_tf/commands/`, `cbir_tf/runs/`) are the only readers
of a whole config; the library below them takes keyword arguments, e.g.
`build_descriptor_model(**config.block(cfg, "model"))`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import numbers
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "as_dict",
    "block",
    "check_config",
    "config_file_text",
    "config_dir",
    "config_path",
    "default",
    "default_config",
    "defaults",
    "differences",
    "fill_defaults",
    "load_config",
    "set_field",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


def config_dir() -> str:
    """The folder of the shipped config files: installed beside the package, or the checkout's."""
    for folder in (os.path.join(_HERE, "configs"), os.path.join(os.path.dirname(_HERE), "configs")):
        if os.path.isfile(os.path.join(folder, "default.py")):
            return folder
    raise FileNotFoundError(f"the shipped configs/ folder is missing beside {_HERE}; reinstall")


def config_path(name: str = "default") -> str:
    """The shipped config file `configs/<name>.py` (absolute; it may not exist)."""
    return os.path.join(config_dir(), f"{name}.py")


def load_config(name_or_path: str) -> Any:
    """The ConfigDict a config file's `get_config()` builds.

    Args:
      name_or_path: a shipped config's name ('default', 'demo', 'train_head', 'train_metric')
        or the path of a `get_config()` file.
    """
    path = os.path.expanduser(name_or_path)
    if not os.path.isfile(path):
        path = config_path(os.path.splitext(os.path.basename(name_or_path))[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {name_or_path}")
    name = "cbir_tf_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_config() -> Any:
    """A fresh copy of `configs/default.py`'s config (callers may change it)."""
    return load_config(config_path("default"))


def as_dict(config: Any) -> dict[str, Any]:
    """A config (ConfigDict or mapping, nested) as nested plain dicts; None gives {}."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in dict(config).items()}


@functools.lru_cache(maxsize=1)
def _default_dict() -> dict[str, Any]:
    return as_dict(default_config())


def defaults(name: str) -> dict[str, Any]:
    """A copy of block `name` of the default config (e.g. 'model', 'rerank')."""
    return _merge({}, _default_dict()[name])


def default(field: str) -> Any:
    """One field of the default config by its dotted name, e.g. `default("search.block_size")`."""
    value: Any = _default_dict()
    for part in field.split("."):
        value = value[part]
    return _merge({}, value) if isinstance(value, Mapping) else value


def block(config: Any, name: str) -> dict[str, Any]:
    """Block `name` of a full config (e.g. 'rerank'), missing fields taking the defaults'."""
    given = as_dict(config).get(name) or {}
    return _merge(defaults(name), given)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _merge({}, v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


# ---------------------------------------------------------------------------------------------
# Checking a config against configs/default.py
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config names a field configs/default.py lacks, or holds a value of another type."""


def check_config(
    config: Any,
    *,
    source: str = "",
    blocks: tuple[str, ...] | None = None,
    complete: bool = False,
    schema: Mapping[str, Any] | None = None,
) -> None:
    """Checks every field of `config` against configs/default.py: its name and its value's type.

    The valid fields and their types are those of the default config, so a block or field
    added to `configs/default.py` is checked without further code. A value's type is its
    default's: an int field takes ints, a number field ints or floats, a string field strings
    (or None), a field whose default is 'auto' strings or numbers (a number string from the
    command line included), a sequence field a list or tuple of its default's element type.

    Args:
      config: a full config (ConfigDict or nested mapping).
      source: what the messages name first, e.g. the config file ('' = nothing).
      blocks: only these blocks (default: every field of `config`).
      complete: a field of default.py that `config` lacks is an error too.
      schema: the valid fields and their default values (default: configs/default.py's).

    Raises:
      ConfigError: one line naming `source`, the field and the nearest valid name, or the
        field and the type its value must have.
    """
    given = as_dict(config)
    schema = _default_dict() if schema is None else as_dict(schema)
    if blocks is not None:
        given = {k: given[k] for k in blocks if k in given}
        schema = {k: schema[k] for k in blocks if k in schema}
    prefix = f"{source}: " if source else ""
    _check_fields(given, schema, "", prefix, complete)


def fill_defaults(config: Any) -> Any:
    """Adds to a ConfigDict, in place, the fields of configs/default.py it lacks; returns it.

    A config file written from scratch (not from `default_config()`) names only the fields it
    changes; the rest take their defaults, as `block` gives them to library calls.
    """
    import ml_collections

    def fill(node: Any, schema: Mapping[str, Any]) -> None:
        for name, like in schema.items():
            if name not in node:
                node[name] = ml_collections.ConfigDict(like) if isinstance(like, Mapping) else like
            elif isinstance(like, Mapping) and isinstance(node[name], ml_collections.ConfigDict):
                fill(node[name], like)

    with config.unlocked():
        fill(config, _default_dict())
    return config


def _check_fields(
    given: Mapping[str, Any], schema: Mapping[str, Any], path: str, prefix: str, complete: bool
) -> None:
    for name, value in given.items():
        dotted = f"{path}{name}"
        if name not in schema:
            raise ConfigError(prefix + _unknown_field(dotted, name, schema))
        like = schema[name]
        if isinstance(like, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{prefix}config.{dotted} must be a block of fields, got {value!r}"
                )
            _check_fields(value, like, f"{dotted}.", prefix, complete)
        elif not value_fits(value, like):
            raise ConfigError(
                f"{prefix}config.{dotted} must be {type_name(like)} like {like!r}, got {value!r}"
            )
    missing = sorted(set(schema) - set(given)) if complete else []
    if missing:
        where = f"config.{path[:-1]}" if path else "the config"
        raise ConfigError(
            f"{prefix}{where} lacks {', '.join(missing)}: start the config from "
            "configs/default.py (config.default_config())"
        )


def _unknown_field(dotted: str, name: str, schema: Mapping[str, Any]) -> str:
    """'config has no field model.polling: did you mean "pooling"?' (or the valid fields)."""
    nearest = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.6)
    if nearest:
        return f'config has no field {dotted}: did you mean "{nearest[0]}"?'
    block_name = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    where = f"config.{block_name}" if block_name else "a config"
    return f"config has no field {dotted}; {where} has: {', '.join(sorted(schema))}"


def value_fits(value: Any, like: Any) -> bool:
    """Whether `value` has the type of the default value `like` (see `check_config`)."""
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, numbers.Integral):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(like, numbers.Real):
        return _is_number(value)
    if isinstance(like, str):
        # 'auto' defaults stand for a value chosen at run time; a number sets it (issue 25).
        return value is None or isinstance(value, str) or (like == "auto" and _is_number(value))
    if isinstance(like, (tuple, list)):
        return isinstance(value, (tuple, list)) and (
            not like or all(value_fits(v, like[0]) for v in value)
        )
    return isinstance(value, type(like))


def type_name(like: Any) -> str:
    """How messages name the type of default value `like`: 'an int', 'a sequence of numbers'."""
    if isinstance(like, (tuple, list)):
        inner = _PLURALS.get(type_name(like[0]), "values") if like else "values"
        return f"a sequence of {inner}"
    if isinstance(like, bool):
        return "a bool"
    if isinstance(like, numbers.Integral):
        return "an int"
    if isinstance(like, numbers.Real):
        return "a number"
    if isinstance(like, str):
        return "a string or a number" if like == "auto" else "a string"
    return type(like).__name__


_PLURALS = {"a bool": "bools", "an int": "ints", "a number": "numbers", "a string": "strings"}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def differences(config: Any) -> dict[str, Any]:
    """{dotted field: value} of a config's fields whose value differs from configs/default.py
    (fields default.py lacks included), in the order of the config."""
    out: dict[str, Any] = {}

    def walk(given: Mapping[str, Any], base: Any, prefix: str) -> None:
        for key, value in given.items():
            ref = base.get(key) if isinstance(base, Mapping) else None
            if isinstance(value, Mapping):
                walk(value, ref if isinstance(ref, Mapping) else {}, f"{prefix}{key}.")
            elif not (isinstance(base, Mapping) and key in base and _same(value, ref)):
                out[f"{prefix}{key}"] = value

    walk(as_dict(config), _default_dict(), "")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def set_field(config: Any, dotted: str, value: Any) -> None:
    """Sets `config.<dotted>` (a ConfigDict) to `value` converted to the field's type: a field
    whose default is a string ('auto') takes str(value), a number field its number type.

    Raises:
      KeyError: no such field (the valid ones of its block named).
      ValueError: a value the field's type cannot take.
    """
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise KeyError(f"config has no block {'.'.join(parents[: i + 1])}")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no field {dotted}; valid: {', '.join(node.keys())}")
    node[leaf] = _typed(node[leaf], value, dotted)


def _typed(current: Any, value: Any, dotted: str) -> Any:
    if current is None or isinstance(value, type(current)) and not isinstance(value, bool):
        return value
    try:
        if isinstance(current, bool):
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return text in ("true", "1")
        if isinstance(current, str):
            return str(value)
        if isinstance(current, (int, float)):
            number = float(value)
            if isinstance(current, int) and not number.is_integer():
                raise ValueError(value)
            return type(current)(number)
        if isinstance(current, tuple):
            import ast

            parsed = ast.literal_eval(value) if isinstance(value, str) else value
            return tuple(parsed) if isinstance(parsed, (list, tuple)) else (parsed,)
    except (ValueError, SyntaxError):
        pass
    raise ValueError(f"{dotted}={value!r}: expected a value of type {type(current).__name__}")


def config_file_text(values: Mapping[str, Any], doc: str) -> str:
    """A `get_config()` file: configs/default.py with the dotted `values` set (as the commands'
    `--config=FILE` read it), `doc` as its docstring."""
    lines = [
        f'"""{doc.rstrip()}\n"""',
        "",
        "from cbir_tf import config",
        "",
        "",
        "def get_config():",
    ]
    lines.append("    c = config.default_config()")
    for dotted, value in values.items():
        lines.append(f"    c.{dotted} = {value!r}")
    lines.append("    return c")
    return "\n".join(lines) + "\n"
