"""The only readers of a config: a config (or one of its blocks) -> keyword arguments.

Configs are `ml_collections.ConfigDict`s built by the `get_config()` files of `cbir_tf/configs/`,
or the same nested structure as plain dicts (e.g. the `model` block an index manifest keeps).
`cbir_tf/configs/default.py` is the single source of defaults: a field a config lacks (an old
manifest, a hand-written dict) takes the default config's value, never one written in code.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

__all__ = ["as_dict", "block", "defaults", "model_kwargs"]


def as_dict(config: Any) -> dict[str, Any]:
    """A config (ConfigDict or mapping, nested) as nested plain dicts; None gives {}."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in dict(config).items()}


@functools.lru_cache(maxsize=1)
def _default_dict() -> dict[str, Any]:
    from cbir_tf.configs import default

    return as_dict(default.get_config())


def defaults(name: str) -> dict[str, Any]:
    """A copy of block `name` of the default config (e.g. 'model', 'rerank')."""
    return _merge({}, _default_dict()[name])


def block(config: Any, name: str) -> dict[str, Any]:
    """Block `name` of a full config (e.g. 'rerank'), missing fields taking the defaults'."""
    given = as_dict(config).get(name) or {}
    return _merge(defaults(name), given)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _merge({}, v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def model_kwargs(model_block: Any) -> dict[str, Any]:
    """`models.build_descriptor_model` arguments from a config's `model` block.

    Args:
      model_block: `cfg.model` (ConfigDict or dict); missing fields take the default config's.

    Returns:
      {'backbone', 'weights', 'alpha', 'pooling', 'gem_p', 'rmac_levels'}.
    """
    m = _merge(defaults("model"), as_dict(model_block))
    return {
        "backbone": m["backbone"],
        "weights": m["weights"],
        "alpha": float(m["alpha"]),
        "pooling": m["pooling"],
        "gem_p": float(m["gem_p"]),
        "rmac_levels": int(m["rmac_levels"]),
    }
