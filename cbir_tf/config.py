"""Configs: the shipped `get_config()` files, their defaults, and their blocks as plain dicts.

Configs are `ml_collections.ConfigDict`s built by `get_config()` files: the shipped ones live in
`configs/` at the top of a checkout (installed as `cbir_tf/configs/` by setup.py), a user's own
anywhere. `configs/default.py` is the single source of defaults: a field a config lacks (an old
manifest, a hand-written dict) takes the default config's value, never one written in code, and
library signatures read theirs with `default("block.field")`.

This module and the command layer (`cbir_tf/commands/`, `cbir_tf/runs/`) are the only readers
of a whole config; the library below them takes keyword arguments, e.g.
`build_descriptor_model(**config.block(cfg, "model"))`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "as_dict",
    "block",
    "config_file_text",
    "config_dir",
    "config_path",
    "default",
    "default_config",
    "defaults",
    "differences",
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
