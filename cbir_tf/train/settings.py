"""The settings of a training run, read from a config and checked against configs/default.py.

The config files (`configs/default.py`, `train_head.py`, `train_metric.py`) are the only
source of defaults: `Settings` declares no default of its own. `Settings.from_config` checks the
config's `train`, `model` and `whitening` blocks with `cbir_tf.config.check_config` (the one
check of every block: an unknown or ill-typed field is one error naming it; here the `train`
block must also be complete) and reads the settings from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cbir_tf import config as config_lib
from cbir_tf.describe import catalog
from cbir_tf.train import augment as augment_lib
from cbir_tf.train import losses

RECIPES = ("head", "metric")
DESCRIPTOR_KINDS = ("auto", "pooled", "projected")
WHITENING_MODES = ("auto", "pca", "none")
MIXED_PRECISION_MODES = ("auto", "on", "off")
STRATEGIES = ("auto", "mirrored", "default")

# Settings read from other blocks than `train`: {setting: (block, field)}.
_ELSEWHERE = {
    "backbone": ("model", "backbone"),
    "alpha": ("model", "alpha"),
    "weights": ("model", "weights"),
    "pooling": ("model", "pooling"),
    "gem_p": ("model", "gem_p"),
    "rmac_levels": ("model", "rmac_levels"),
    "whitening_dim": ("whitening", "dim"),
    "whitening_shrinkage": ("whitening", "shrinkage"),
}
_AUGMENT_FIELDS = ("crop_scale", "crop_ratio", "flip", "color_jitter")
# Names of a choice: spelled in any case in the config, compared in lower case.
_LOWER_CASE = frozenset(
    {"recipe", "pooling", "descriptor", "loss", "whitening", "cache", "mixed_precision", "strategy"}
)


class TrainConfigError(config_lib.ConfigError):
    """The config's `train` block has an unknown, missing or ill-typed field."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a training run needs, read once from the config (see `from_config`).

    The fields are named after the config's: `train.<name>`, except backbone, alpha, weights,
    pooling, gem_p and rmac_levels (`model.<name>`), whitening_dim and whitening_shrinkage
    (`whitening.dim`, `whitening.shrinkage`) and augment (`train.crop_scale`, `crop_ratio`,
    `flip`, `color_jitter`).
    """

    recipe: str
    backbone: str
    alpha: float
    weights: str
    pooling: str
    gem_p: float
    rmac_levels: int
    image_size: int
    batch_size: int
    epochs: int
    learning_rate: float
    fine_tune_blocks: int
    fine_tune_epochs: int
    fine_tune_learning_rate: float
    dense_units: int
    dropout: float
    descriptor: str
    loss: str
    margin: float
    pool_size: int
    num_negatives: int
    tuples_per_epoch: int
    metric_blocks: int
    whitening: str
    whitening_dim: int
    whitening_shrinkage: float
    early_stopping_patience: int
    val_fraction: float
    cache: str
    augment: augment_lib.Augment
    mixed_precision: str
    strategy: str
    seed: int

    def __post_init__(self):
        _check_choice("recipe", self.recipe, RECIPES, "valid recipes")
        _check_choice("descriptor", self.descriptor, DESCRIPTOR_KINDS, "valid")
        _check_choice("whitening", self.whitening, WHITENING_MODES, "valid")
        _check_choice("loss", self.loss, losses.TupleLoss.KINDS, "valid")
        # KeyError listing the valid backbones, or the poolings this backbone takes; 'auto'
        # is resolved in from_config (the settings hold what is built).
        if catalog.resolve_pooling(self.backbone, self.pooling) != self.pooling:
            raise ValueError(f"pooling {self.pooling!r} is not resolved: see from_config")
        for name in ("image_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.fine_tune_epochs < 0 or self.fine_tune_blocks < 0:
            raise ValueError("epochs, fine_tune_epochs and fine_tune_blocks must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            raise ValueError("train.mixed_precision must be auto, on or off")
        if self.strategy not in STRATEGIES:
            raise ValueError("train.strategy must be auto, mirrored or default")

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """Reads `config.train`, `config.model` and `config.whitening`.

        Args:
          config: the run's ConfigDict (or nested dicts), e.g. configs/train_metric.py.

        Raises:
          TrainConfigError: `config.train` has a field configs/default.py does not know, lacks
            one, or holds a value of another type; a model/whitening field is missing.
        """
        try:
            config_lib.check_config(config, blocks=("train",), complete=True)
            config_lib.check_config(config, blocks=("model", "whitening"))
        except config_lib.ConfigError as e:
            raise TrainConfigError(str(e)) from None
        train = _section(config, "train")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name == "augment":
                continue
            block, key = _ELSEWHERE.get(field.name, ("train", field.name))
            section = train if block == "train" else _section(config, block)
            if key not in section:
                raise TrainConfigError(f"config.{block} has no field {key!r}")
            like = config_lib.default(f"{block}.{key}")
            values[field.name] = _convert(field.name, section[key], like)
        for name in ("crop_scale", "crop_ratio"):
            if len(train[name]) != 2:
                raise TrainConfigError(f"config.train.{name} must be (min, max), got {train[name]}")
        values["backbone"] = catalog.get_spec(values["backbone"]).name
        values["pooling"] = catalog.resolve_pooling(values["backbone"], values["pooling"])
        augment = augment_lib.Augment(
            crop_scale=tuple(train["crop_scale"]),
            crop_ratio=tuple(train["crop_ratio"]),
            flip=bool(train["flip"]),
            color_jitter=float(train["color_jitter"]),
        )
        return cls(augment=augment, **values)

    @property
    def total_epochs(self) -> int:
        """Epochs of all stages together."""
        if self.recipe == "head" and self.fine_tune_blocks > 0:
            return self.epochs + self.fine_tune_epochs
        return self.epochs

    def stage_of(self, epoch: int) -> int:
        """1 for the first stage, 2 for the head recipe's unfrozen stage."""
        return 2 if self.recipe == "head" and epoch >= self.epochs else 1

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must share with the run that resumes it."""
        return {
            "backbone": self.backbone,
            "alpha": self.alpha,
            "recipe": self.recipe,
            "pooling": self.pooling,
        }

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (model.json's `settings`)."""
        out = dataclasses.asdict(self)
        out["augment"] = dataclasses.asdict(self.augment)
        return out


def _convert(name: str, value: Any, like: Any) -> Any:
    if name == "weights" and value is None:
        return "none"
    if isinstance(like, float) and not isinstance(like, bool):
        return float(value)
    if isinstance(like, str):
        return str(value).lower() if name in _LOWER_CASE else str(value)
    return value


def _check_choice(name: str, value: str, valid: tuple[str, ...], label: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; {label}: {', '.join(valid)}")


def _section(config: Any, name: str) -> Mapping[str, Any]:
    """`config.<name>` as a mapping (a ConfigDict or a dict alike)."""
    section = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
    if section is None:
        raise TrainConfigError(
            f"the config has no {name!r} block: start it from configs/default.py"
        )
    return dict(section.items())
