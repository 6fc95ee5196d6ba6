"""Fine-tuning descriptor models on labelled images: the classification-head and metric recipes.

Two recipes, both ending in a `.keras` descriptor model (backbone ▸ pooling ▸ [projection |
whitening] ▸ L2) that `extract.py --model` / `evaluate.py --model` use directly and that loads
with `safe_mode=True` (it is built from `cbir_tf.models` and `cbir_tf.layers` only):

* ``head`` (the seed's recipe): the backbone is frozen; pooling ▸ dense projection ▸ ReLU ▸
  dropout ▸ softmax is trained to classify the images. An optional second stage unfreezes the top
  N blocks of the backbone with a lower learning rate, batch-norm layers kept frozen (their
  statistics would be ruined by small fine-tuning batches). The descriptor is the pooled vector
  or its linear projection (before the ReLU), never the class scores; 'auto' keeps whichever
  gives the better validation mAP.
* ``metric`` (Radenović, Tolias & Chum, TPAMI 2018): tuples (query, positive, hard negatives)
  are re-mined from the current descriptors every epoch (`cbir_tf.data.tuples`) and the network
  is trained with the contrastive or triplet loss (`cbir_tf.losses`); GeM's p is a trained weight;
  a PCA-whitening is learned after training on the training images' descriptors
  (`cbir_tf.whitening`) and placed in the model.

Around both: validation leave-one-out retrieval mAP after every epoch, best-model and last-epoch
checkpoints (atomic; resume after an interruption; a checkpoint of another backbone or recipe is
refused), TensorBoard logs, early stopping, mixed precision on Tensor-Core GPUs and
`tf.distribute.MirroredStrategy` over several GPUs (nothing to configure; the saved model computes
in float32 whatever trained it). Everything is written under `workdir`:

    workdir/model.keras        the descriptor model
    workdir/model.json         how it was made: backbone, pooling, whitening, val mAP, history
    workdir/whitening.npz      the learned whitening (metric recipe, when used)
    workdir/checkpoints/       state.json + last and best weights (resume)
    workdir/logs/              TensorBoard events (loss, accuracy, validation mAP, GeM p, learning
                               rate per epoch; needs the tensorboard package) and history.csv
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cbir_tf import backbones, io, losses, models, whitening
from cbir_tf.data import folder, training, tuples

logger = logging.getLogger(__name__)

RECIPES = ("head", "metric")
DESCRIPTOR_KINDS = ("auto", "pooled", "projected")
WHITENING_MODES = ("auto", "pca", "none")
STATE_VERSION = 1
MODEL_FILE = "model.keras"


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of another backbone, recipe, pooling or class list."""


# --------------------------------------------------------------------------- settings


def _get(section: Any, key: str, default: Any) -> Any:
    """A config field, or `default` when the config predates it."""
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(key, default)
    try:
        return getattr(section, key)
    except (AttributeError, KeyError):
        return default


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a training run needs, read once from the config (see `from_config`)."""

    recipe: str = "head"
    backbone: str = backbones.DEFAULT_BACKBONE
    alpha: float = 1.0
    weights: str = "imagenet"
    pooling: str = "gem"
    gem_p: float = 3.0
    rmac_levels: int = 3
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_blocks: int = 0
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 1e-5
    dense_units: int = 512
    dropout: float = 0.5
    descriptor: str = "auto"
    loss: str = "contrastive"
    margin: float = 0.7
    pool_size: int = 2000
    num_negatives: int = 5
    tuples_per_epoch: int = 1000
    metric_blocks: int = 0
    whitening: str = "auto"
    whitening_dim: int = 0
    whitening_shrinkage: float = 0.0
    early_stopping_patience: int = 3
    val_fraction: float = 0.1
    cache: str = "auto"
    augment: training.Augment = training.Augment()
    mixed_precision: str = "auto"
    strategy: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; valid recipes: {', '.join(RECIPES)}")
        if self.descriptor not in DESCRIPTOR_KINDS:
            raise ValueError(
                f"unknown descriptor {self.descriptor!r}; valid: {', '.join(DESCRIPTOR_KINDS)}"
            )
        if self.whitening not in WHITENING_MODES:
            raise ValueError(
                f"unknown whitening {self.whitening!r}; valid: {', '.join(WHITENING_MODES)}"
            )
        if self.loss not in losses.TupleLoss.KINDS:
            raise ValueError(
                f"unknown loss {self.loss!r}; valid: {', '.join(losses.TupleLoss.KINDS)}"
            )
        if self.pooling not in models.POOLINGS:
            raise KeyError(
                f"unknown pooling {self.pooling!r}; valid poolings: {', '.join(models.POOLINGS)}"
            )
        backbones.get_backbone_spec(self.backbone)  # KeyError listing the valid names
        for name in ("image_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.fine_tune_epochs < 0 or self.fine_tune_blocks < 0:
            raise ValueError("epochs, fine_tune_epochs and fine_tune_blocks must be >= 0")
        if self.mixed_precision not in ("auto", "on", "off"):
            raise ValueError("train.mixed_precision must be auto, on or off")
        if self.strategy not in ("auto", "mirrored", "default"):
            raise ValueError("train.strategy must be auto, mirrored or default")

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """Reads `config.model`, `config.train` and `config.whitening` (missing fields: defaults).

        Args:
          config: the run's ConfigDict (or nested dicts), e.g. configs/train_metric.py.
        """
        m = _get(config, "model", None)
        t = _get(config, "train", None)
        w = _get(config, "whitening", None)
        d = cls()
        augment = training.Augment(
            crop_scale=tuple(_get(t, "crop_scale", d.augment.crop_scale)),
            crop_ratio=tuple(_get(t, "crop_ratio", d.augment.crop_ratio)),
            flip=bool(_get(t, "flip", d.augment.flip)),
            color_jitter=float(_get(t, "color_jitter", d.augment.color_jitter)),
        )
        weights = _get(m, "weights", d.weights)
        return cls(
            recipe=str(_get(t, "recipe", d.recipe)).lower(),
            backbone=backbones.get_backbone_spec(_get(m, "backbone", d.backbone)).name,
            alpha=float(_get(m, "alpha", d.alpha)),
            weights="none" if weights is None else str(weights),
            pooling=str(_get(m, "pooling", d.pooling)).lower(),
            gem_p=float(_get(m, "gem_p", d.gem_p)),
            rmac_levels=int(_get(m, "rmac_levels", d.rmac_levels)),
            image_size=int(_get(t, "image_size", d.image_size)),
            batch_size=int(_get(t, "batch_size", d.batch_size)),
            epochs=int(_get(t, "epochs", d.epochs)),
            learning_rate=float(_get(t, "learning_rate", d.learning_rate)),
            fine_tune_blocks=int(_get(t, "fine_tune_blocks", d.fine_tune_blocks)),
            fine_tune_epochs=int(_get(t, "fine_tune_epochs", d.fine_tune_epochs)),
            fine_tune_learning_rate=float(
                _get(t, "fine_tune_learning_rate", d.fine_tune_learning_rate)
            ),
            dense_units=int(_get(t, "dense_units", d.dense_units)),
            dropout=float(_get(t, "dropout", d.dropout)),
            descriptor=str(_get(t, "descriptor", d.descriptor)).lower(),
            loss=str(_get(t, "loss", d.loss)).lower(),
            margin=float(_get(t, "margin", d.margin)),
            pool_size=int(_get(t, "pool_size", d.pool_size)),
            num_negatives=int(_get(t, "num_negatives", d.num_negatives)),
            tuples_per_epoch=int(_get(t, "tuples_per_epoch", d.tuples_per_epoch)),
            metric_blocks=int(_get(t, "metric_blocks", d.metric_blocks)),
            whitening=str(_get(t, "whitening", d.whitening)).lower(),
            whitening_dim=int(_get(w, "dim", d.whitening_dim)),
            whitening_shrinkage=float(_get(w, "shrinkage", d.whitening_shrinkage)),
            early_stopping_patience=int(
                _get(t, "early_stopping_patience", d.early_stopping_patience)
            ),
            val_fraction=float(_get(t, "val_fraction", d.val_fraction)),
            cache=str(_get(t, "cache", d.cache)).lower(),
            augment=augment,
            mixed_precision=str(_get(t, "mixed_precision", d.mixed_precision)).lower(),
            strategy=str(_get(t, "strategy", d.strategy)).lower(),
            seed=int(_get(t, "seed", d.seed)),
        )

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


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class TrainingData:
    """Training and validation images of a run."""

    train: training.TrainingImages
    val: training.TrainingImages | None
    source: str
    val_source: str


def _load_source(
    spec: str,
    load_size: int,
    min_per_class: int,
    min_classes: int,
    cache: str,
    tfds_data_dir: str | None,
    default_split: str,
) -> training.TrainingImages:
    parsed = training.parse_tfds_spec(spec)
    if parsed is not None:
        name, split = parsed
        return training.load_tfds(name, split or default_split, load_size, data_dir=tfds_data_dir)
    paths, labels, names = folder.list_labelled(
        spec, min_images_per_class=min_per_class, min_classes=min_classes
    )
    return training.images_from_paths(paths, labels, names, load_size, cache=cache, where=spec)


def load_training_data(
    train_data: str,
    val_data: str | None,
    settings: Settings,
    tfds_data_dir: str | None = None,
) -> TrainingData:
    """Lists and decodes the training (and validation) images of a run.

    Args:
      train_data: a labelled folder (one sub-folder per class) or `tfds:<name>[:<split>]`.
      val_data: the same for validation; None or '' holds out `settings.val_fraction` of the
        training images (stratified; none when the fraction is 0).
      settings: the run's settings (recipe, image size, cache, seed).
      tfds_data_dir: TFDS data folder (default TFDS's own).

    Returns:
      TrainingData.

    Raises:
      folder.CollectionError: fewer than two classes; with the metric recipe a class with a
        single image; a class whose images are all unreadable; a validation set without any
        class of two images.
    """
    load_size = training.load_size_for(settings.image_size)
    metric = settings.recipe == "metric"
    train = _load_source(
        train_data, load_size, 2 if metric else 1, 2, settings.cache, tfds_data_dir, "train"
    )
    if metric:
        tuples.check_tuple_labels(train.labels, settings.num_negatives)
    val_source = val_data or ""
    if val_data:
        val = _load_source(val_data, load_size, 1, 1, settings.cache, tfds_data_dir, "validation")
    elif settings.val_fraction > 0:
        tr_idx, va_idx = folder.split_indices(
            train.labels,
            settings.val_fraction,
            seed=settings.seed,
            min_train_per_class=2 if metric else 1,
            min_val_per_class=2,
        )
        val = train.subset(va_idx) if va_idx.size else None
        if val is not None:
            val.skipped = []  # the source's unreadable images are counted once, with train
        train = train.subset(tr_idx)
        val_source = f"{settings.val_fraction:g} of {train_data}"
    else:
        val = None
    if val is not None and np.bincount(val.labels).max(initial=0) < 2:
        raise folder.CollectionError(
            f"the validation set ({val_source}) has no class with two images: leave-one-out "
            "retrieval mAP needs a positive for each query"
        )
    return TrainingData(train, val, train_data, val_source)


# --------------------------------------------------------------------------- evaluation


def leave_one_out_map(
    descriptors: np.ndarray, labels: np.ndarray, max_pairs: int = 1 << 24
) -> tuple[float, np.ndarray]:
    """Retrieval mAP where every image queries all the others; positives share its label.

    Args:
      descriptors: float32 [N, D], L2-normalised.
      labels: int [N].
      max_pairs: queries are ranked in chunks of about max_pairs / N (bounded memory).

    Returns:
      (mAP over queries with at least one positive, aps float64 [N] with NaN for the others).
    """
    from cbir_tf import metrics, search

    labels = np.asarray(labels)
    n = labels.size
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    aps = np.full(n, np.nan)
    # Queries in chunks: full rankings take 8 bytes per (query, image) pair.
    chunk = max(1, int(max_pairs) // max(n, 1))
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        ranks, _ = search.rank_all(descriptors[rows], descriptors)
        # The query itself is in the database: junk, so it neither helps nor hurts.
        gnd = [
            {"ok": members[labels[i]][members[labels[i]] != i], "junk": np.array([i])} for i in rows
        ]
        aps[rows] = metrics.compute_map(ranks, gnd, kappas=(1,), num_images=n)[1]
    valid = ~np.isnan(aps)
    return (float(np.mean(aps[valid])) if valid.any() else float("nan")), aps


def _embed_function(model: keras.Model):
    # One trace for every image size (the models are shape-polymorphic).
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def embed(x):
        return model(x, training=False)

    return embed


def describe(
    model: keras.Model,
    images: training.TrainingImages,
    indices: np.ndarray | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    embed=None,
) -> np.ndarray:
    """Descriptors of whole images (longest side `image_size`), as extraction computes them.

    Args:
      model: raw RGB float32 [B, H, W, 3] -> [B, D].
      images: the images.
      indices: int [M] which images (default all).
      image_size: longest side.
      batch_size: images per forward pass (same-shape images are batched together).
      embed: a compiled `model` call to reuse (`_embed_function(model)`).

    Returns:
      float32 [M, D].
    """
    indices = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)
    embed = embed or _embed_function(model)
    out: np.ndarray | None = None
    for pos, batch in training.eval_batches(images, indices, image_size, batch_size):
        vec = np.asarray(embed(batch), dtype=np.float32)
        if out is None:
            out = np.zeros((indices.size, vec.shape[1]), np.float32)
        out[pos] = vec
    return out if out is not None else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- backbone blocks

_BLOCK_PATTERNS = (
    re.compile(r"^(conv\d+_block\d+)_"),  # ResNet, DenseNet
    # EfficientNet block7a_, VGG block5_, MobileNetV2 block_16_
    re.compile(r"^(block_?\d+[a-z]?)_"),
    re.compile(r"^conv_(?:dw|pw|pad)_(\d+)"),  # MobileNet v1
    re.compile(r"^(expanded_conv)_"),  # MobileNetV2's first block
)


def _block_key(name: str) -> str | None:
    for pattern in _BLOCK_PATTERNS:
        m = pattern.match(name)
        if m:
            return m.group(1)
    return None


def backbone_blocks(backbone: keras.Model) -> list[list[keras.layers.Layer]]:
    """Groups a backbone's layers into blocks, in network order.

    Layers are grouped by the block prefix of their Keras names (`block7a_`, `conv5_block3_`,
    `conv_pw_13`, `block_16_`); consecutive layers without one (stems, EfficientNet's `top_*`,
    MobileNetV2's `Conv_1`) form a block of their own.

    Args:
      backbone: a `cbir_tf.backbones.build_backbone` model.

    Returns:
      Blocks as lists of layers; the last is the one nearest the output.
    """
    blocks: list[list[keras.layers.Layer]] = []
    previous: object = object()
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        key = _block_key(layer.name)
        if not blocks or key != previous or key is None and previous is not None:
            blocks.append([])
        blocks[-1].append(layer)
        previous = key
    return blocks


def set_trainable_blocks(backbone: keras.Model, num_blocks: int) -> int:
    """Freezes the backbone except its top `num_blocks` blocks; batch norm stays frozen.

    Args:
      backbone: the backbone model.
      num_blocks: blocks to train from the top; 0 freezes everything; -1 (or more blocks than
        there are) trains all blocks.

    Returns:
      Number of trainable weight tensors in the backbone afterwards.
    """
    backbone.trainable = num_blocks != 0
    if num_blocks == 0:
        return 0
    blocks = backbone_blocks(backbone)
    train_from = 0 if num_blocks < 0 else max(0, len(blocks) - num_blocks)
    for i, block in enumerate(blocks):
        for layer in block:
            # Batch-norm statistics of small fine-tuning batches would overwrite the
            # pre-trained ones; a frozen BN layer also runs in inference mode in Keras 3.
            frozen = i < train_from or isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = not frozen
    return len(backbone.trainable_weights)


# --------------------------------------------------------------------------- models


class TupleModel(keras.Model):
    """Runs the descriptor model over tuples: [B, T, S, S, 3] -> [B, T, D].

    Training-only wrapper (never saved as a whole): the descriptor model inside is what is kept.
    """

    def __init__(self, descriptor_model: keras.Model, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.descriptor_model = descriptor_model
        self.image_size = int(image_size)

    def call(self, inputs, training=False):
        shape = keras.ops.shape(inputs)
        flat = keras.ops.reshape(inputs, (-1, self.image_size, self.image_size, 3))
        desc = self.descriptor_model(flat, training=training)
        return keras.ops.reshape(desc, (shape[0], shape[1], -1))


@dataclasses.dataclass
class TrainingModels:
    """The models of a training run; they share their layers and weights.

    Attributes:
      descriptor: raw RGB [B, H, W, 3] -> pooled -> L2 descriptor float32 [B, C].
      train: what `fit` trains and checkpoints hold: the classifier (head recipe, images ->
        class probabilities) or a `TupleModel` (metric recipe, tuples -> descriptors).
      backbone: the backbone inside `descriptor`.
      pool_layer: the pooling layer inside `descriptor`.
      projected: head recipe: image -> dense projection -> L2 descriptor [B, dense_units].
    """

    descriptor: keras.Model  # image -> pooled (-> whitening) -> L2
    train: keras.Model  # what fit() trains and checkpoints hold
    backbone: keras.Model
    pool_layer: keras.layers.Layer
    projected: keras.Model | None = None  # head recipe: image -> projection -> L2
    embeds: dict[int, Any] = dataclasses.field(default_factory=dict)

    def embed(self, model: keras.Model):
        """A traced inference call of `model`, made once per model (traces are costly)."""
        if id(model) not in self.embeds:
            self.embeds[id(model)] = _embed_function(model)
        return self.embeds[id(model)]


def _pooling_layer_name(pooling: str) -> str:
    return pooling  # build_descriptor_model names its pooling layer after the pooling


def build_training_models(s: Settings, num_classes: int) -> TrainingModels:
    """Builds the descriptor model and the recipe's training model around it.

    Args:
      s: settings (backbone, weights, pooling; recipe; head sizes).
      num_classes: classes of the head recipe's classifier.

    Returns:
      TrainingModels, not compiled (see `prepare_stage`).
    """
    spec = backbones.get_backbone_spec(s.backbone)
    desc = models.build_descriptor_model(
        backbone=s.backbone,
        weights=s.weights,
        alpha=s.alpha,
        pooling=s.pooling,
        gem_p=s.gem_p,
        rmac_levels=s.rmac_levels,
    )
    backbone = desc.get_layer(spec.name)
    pool_layer = desc.get_layer(_pooling_layer_name(s.pooling))
    if s.recipe == "head":
        pooled = pool_layer.output
        proj = keras.layers.Dense(s.dense_units, name="projection")(pooled)
        x = keras.layers.ReLU(name="projection_relu")(proj)
        x = keras.layers.Dropout(s.dropout, name="dropout")(x)
        probs = keras.layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="classifier"
        )(x)
        train_model = keras.Model(desc.input, probs, name="head_classifier")
        projected = keras.Model(
            desc.input, models.unit_normalization("projected_l2", dtype="float32")(proj)
        )
        return TrainingModels(desc, train_model, backbone, pool_layer, projected)
    tuple_model = TupleModel(desc, s.image_size, name="tuple_model")
    # One call builds the wrapper, so checkpoints can be loaded into it before any training.
    tuple_model(np.zeros((1, 3, s.image_size, s.image_size, 3), np.float32))
    return TrainingModels(desc, tuple_model, backbone, pool_layer)


def prepare_stage(s: Settings, m: TrainingModels, stage: int) -> float:
    """Sets the trainable layers of a stage, compiles `m.train` and builds its optimizer.

    Args:
      s: settings.
      m: the models (`build_training_models`).
      stage: 1, or 2 for the head recipe's unfrozen stage.

    Returns:
      The stage's learning rate.
    """
    lr = _configure_stage(s, m, stage)
    _compile(s, m, lr)
    _build_optimizer(m, s)
    return lr


def _configure_stage(s: Settings, m: TrainingModels, stage: int) -> float:
    if s.recipe == "head":
        n = 0 if stage == 1 else s.fine_tune_blocks
        set_trainable_blocks(m.backbone, n)
        return s.learning_rate if stage == 1 else s.fine_tune_learning_rate
    set_trainable_blocks(m.backbone, -1 if s.metric_blocks <= 0 else s.metric_blocks)
    return s.learning_rate


def _compile(s: Settings, m: TrainingModels, learning_rate: float) -> None:
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if s.recipe == "head":
        m.train.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    else:
        m.train.compile(optimizer=optimizer, loss=losses.TupleLoss(s.loss, margin=s.margin))


def _build_optimizer(m: TrainingModels, s: Settings) -> None:
    """Creates the optimizer's variables now, so that a checkpoint can be restored into them."""
    if not m.train.optimizer.built:
        m.train.optimizer.build(m.train.trainable_variables)


# --------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """`workdir/checkpoints`: state.json names the last and best weight folders.

    Each checkpoint is written into a fresh folder which is renamed into place, then state.json
    is replaced atomically; a run killed at any moment resumes from the last complete epoch.
    """

    def __init__(self, workdir: str):
        self.root = os.path.join(workdir, "checkpoints")
        self.state_path = os.path.join(self.root, "state.json")

    def load_state(self) -> dict[str, Any] | None:
        if not os.path.isfile(self.state_path):
            return None
        with open(self.state_path, encoding="utf-8") as f:
            return json.load(f)

    def _write_folder(self, name: str, m: TrainingModels) -> None:
        final = os.path.join(self.root, name)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # Keras writes the compiled model's optimizer state into the same file.
        m.train.save_weights(os.path.join(tmp, "model.weights.h5"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def save(self, state: dict[str, Any], m: TrainingModels, *, best: bool) -> dict[str, Any]:
        """Writes this epoch's weights (and the best ones when `best`), then the state."""
        os.makedirs(self.root, exist_ok=True)
        epoch = state["next_epoch"]
        last_name = f"last-{epoch:05d}"
        self._write_folder(last_name, m)
        state = dict(state, last=last_name)
        if best:
            best_name = f"best-{epoch:05d}"
            self._write_folder(best_name, m)
            state["best_weights"] = best_name
        io.atomic_write_json(self.state_path, {k: v for k, v in state.items() if k != "_path"})
        keep = {state.get("last"), state.get("best_weights")}
        for entry in os.listdir(self.root):
            if entry.startswith(("last-", "best-")) and entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
        return state

    def restore(self, name: str, m: TrainingModels) -> bool:
        """Loads checkpoint `name` into the model; returns whether optimizer state came with it.

        The optimizer state is restored only when the model's current optimizer has the same
        variables (same stage); otherwise Keras skips it, which is what a new stage wants.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer")
            m.train.load_weights(os.path.join(self.root, name, "model.weights.h5"))
        optimizer = getattr(m.train, "optimizer", None)  # absent before compile()
        if optimizer is None or not optimizer.built:
            return False
        # convert_to_numpy also reads a tf.distribute MirroredVariable (int() cannot).
        return int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0


def check_checkpoint_compatible(state: dict[str, Any], s: Settings, class_names: list[str]):
    """Refuses to resume a checkpoint made with another backbone, recipe, pooling or classes.

    Raises:
      CheckpointMismatchError: naming each differing field and both values.
    """
    saved = state.get("identity", {})
    wanted = s.identity()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
        for k in wanted
        if saved.get(k) != wanted[k]
    ]
    if s.recipe == "head" and state.get("class_names") != list(class_names):
        diffs.append("class_names: the training classes differ")
    if diffs:
        raise CheckpointMismatchError(
            f"{state.get('_path', 'the checkpoint')} was written by a different training run ("
            + "; ".join(diffs)
            + "). Use another --workdir, or the same settings to resume it."
        )


# --------------------------------------------------------------------------- environment


def _tensor_cores(gpus: list) -> bool:
    """True when there are GPUs and all have compute capability >= 7.0 (fast float16)."""
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability is None or tuple(capability) < (7, 0):
            return False
    return True


@contextlib.contextmanager
def _precision_and_strategy(s: Settings) -> Iterator[tf.distribute.Strategy]:
    """Mixed float16 on Tensor-Core GPUs and MirroredStrategy over several GPUs ('auto').

    The global Keras dtype policy is restored on exit, so the saved model computes in float32.
    """
    gpus = tf.config.list_physical_devices("GPU")
    mixed = s.mixed_precision == "on" or (s.mixed_precision == "auto" and _tensor_cores(gpus))
    if s.strategy == "mirrored" or (s.strategy == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    previous = keras.config.dtype_policy()
    if mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield strategy
    finally:
        keras.config.set_dtype_policy(previous)


class _EpochLogs:
    """Per-epoch figures for TensorBoard (`logs/`) and as a plain table (`logs/history.csv`).

    TensorBoard event files need the `tensorboard` package (tf.summary's implementation); without
    it only the CSV is written, with a note saying how to get the TensorBoard logs.
    """

    def __init__(self, logs_dir: str, say):
        self.dir = logs_dir
        os.makedirs(logs_dir, exist_ok=True)
        try:
            import tensorboard  # noqa: F401  (tf.summary's writer lives there)

            self.writer = tf.summary.create_file_writer(logs_dir)
        except ImportError:
            self.writer = None
            say(f"  (no TensorBoard logs: pip install tensorboard; figures go to {self.csv_path})")

    @property
    def csv_path(self) -> str:
        return os.path.join(self.dir, "history.csv")

    def write(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            with self.writer.as_default():
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        tf.summary.scalar(key, value, step=int(record["epoch"]))
            self.writer.flush()
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        lines = [",".join(keys)]
        lines += [
            ",".join("" if row.get(k) is None else f"{row[k]}" for k in keys) for row in history
        ]
        io.atomic_write_text(self.csv_path, "\n".join(lines) + "\n")


def _say(progress: bool, text: str) -> None:
    logger.debug(text)
    if progress:
        print(text, flush=True)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
      model_path: the saved `.keras` descriptor model.
      descriptor: 'pooled' or 'projected' (head), 'pooled' or 'whitened' (metric).
      best_val_map: best validation leave-one-out mAP (NaN without validation).
      off_the_shelf_val_map: validation mAP of the untrained descriptor.
      best_epoch: 0-based epoch of the best weights.
      history: one dict per epoch (loss, val maps, seconds, ...).
      train_seconds: wall time of the epochs of this run (a resumed run: this part only).
      skipped: (image, reason) of images that could not be read.
    """

    model_path: str
    descriptor: str
    best_val_map: float
    off_the_shelf_val_map: float
    best_epoch: int
    history: list[dict[str, Any]]
    train_seconds: float
    skipped: list[tuple[str, str]]


def _validate(
    s: Settings, m: TrainingModels, data: TrainingData, kinds: tuple[str, ...]
) -> dict[str, float]:
    if data.val is None:
        return {}
    out = {}
    for kind in kinds:
        model = m.projected if kind == "projected" else m.descriptor
        desc = describe(model, data.val, None, s.image_size, s.batch_size, m.embed(model))
        out[kind] = leave_one_out_map(desc, data.val.labels)[0]
    return out


def _epoch_dataset(
    s: Settings, m: TrainingModels, data: TrainingData, epoch: int, say
) -> tf.data.Dataset:
    seed = s.seed * 100003 + epoch
    if s.recipe == "head":
        return training.classification_dataset(
            data.train, s.image_size, s.batch_size, s.augment, seed=seed, shuffle=True
        )
    embed = m.embed(m.descriptor)

    def describe_indices(idx):
        return describe(m.descriptor, data.train, idx, s.image_size, s.batch_size, embed)

    t0 = time.perf_counter()
    epoch_tuples = tuples.create_epoch_tuples(
        data.train.labels,
        describe_indices,
        s.tuples_per_epoch,
        s.pool_size,
        s.num_negatives,
        np.random.default_rng(seed),
    )
    say(
        f"  mined {len(epoch_tuples)} tuples in {time.perf_counter() - t0:.1f}s "
        f"(mean negative distance {epoch_tuples.mean_negative_distance:.3f})"
    )
    # Tuples are several images each: keep the number of images per step near batch_size.
    tuples_per_batch = max(1, s.batch_size // (2 + s.num_negatives))
    return training.tuple_dataset(
        data.train, epoch_tuples.as_array(), s.image_size, tuples_per_batch, s.augment, seed=seed
    )


def _val_kinds(s: Settings) -> tuple[str, ...]:
    if s.recipe == "metric" or s.descriptor == "pooled":
        return ("pooled",)
    if s.descriptor == "projected":
        return ("projected",)
    return ("pooled", "projected")


def train(
    config: Any,
    train_data: str,
    workdir: str,
    val_data: str | None = None,
    *,
    tfds_data_dir: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tunes a descriptor model and writes it to `workdir/model.keras`.

    Resumes from `workdir/checkpoints` when a previous run was interrupted; returns at once when
    the run already finished.

    Args:
      config: the run's config (`model`, `train`, `whitening` sections; see configs/).
      train_data: labelled folder or `tfds:<name>[:<split>]`.
      workdir: output folder (created).
      val_data: validation folder / TFDS spec; None: hold out `train.val_fraction`.
      tfds_data_dir: TFDS data folder.
      progress: print one line per epoch.

    Returns:
      TrainResult.

    Raises:
      folder.CollectionError: unusable training data (see `load_training_data`).
      CheckpointMismatchError: `workdir` holds a checkpoint of another backbone/recipe/pooling,
        or a finished run of other settings (named in the message).
      cbir_tf.io.LockError: another training writes to `workdir`.
    """
    s = Settings.from_config(config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with io.folder_lock(workdir, "this training run"):
        return _train_locked(s, train_data, val_data, workdir, tfds_data_dir, progress)


def _train_locked(
    s: Settings,
    train_data: str,
    val_data: str | None,
    workdir: str,
    tfds_data_dir: str | None,
    progress: bool,
) -> TrainResult:
    def say(text):
        _say(progress, text)

    ckpt = _Checkpoints(workdir)
    state = ckpt.load_state()
    if state is not None:
        state["_path"] = ckpt.state_path
        # Refuse a foreign checkpoint before spending minutes on loading images.
        check_checkpoint_compatible(state, s, state.get("class_names", []))
        if state.get("finished") and os.path.isfile(os.path.join(workdir, MODEL_FILE)):
            diffs = finished_run_differences(workdir, s)
            if diffs:
                raise CheckpointMismatchError(
                    f"{workdir} already holds a finished run made with other settings ("
                    + "; ".join(diffs)
                    + f"); start a new run with another --workdir=FOLDER, or delete {workdir} "
                    "to train there again"
                )
            say(f"{workdir} already holds a finished run: {os.path.join(workdir, MODEL_FILE)}")
            return _result_from_json(workdir)

    data = load_training_data(train_data, val_data, s, tfds_data_dir)
    class_names = data.train.class_names
    if state is not None:
        check_checkpoint_compatible(state, s, class_names)
    skipped = list(data.train.skipped) + (list(data.val.skipped) if data.val is not None else [])
    say(
        f"training {s.recipe} recipe: {backbones.display_name(s.backbone, s.alpha)} {s.pooling}, "
        f"{len(data.train)} images in {len(class_names)} classes"
        + (f", validation {len(data.val)} images" if data.val is not None else ", no validation")
        + (f"; {len(skipped)} unreadable images skipped" if skipped else "")
    )

    kinds = _val_kinds(s)
    logs_dir = os.path.join(workdir, "logs")
    with _precision_and_strategy(s) as strategy:
        # Seeded initialisation (the head's dense layers): a run is repeatable.
        keras.utils.set_random_seed(s.seed)
        with strategy.scope():
            m = build_training_models(s, len(class_names))
        if state is None:
            base = _validate(s, m, data, ("pooled",))
            state = {
                "version": STATE_VERSION,
                "identity": s.identity(),
                "class_names": list(class_names),
                "next_epoch": 0,
                "stage": 1,
                "best_map": None,
                "best_epoch": None,
                "best_kind": None,
                "off_the_shelf_val_map": base.get("pooled"),
                "epochs_without_improvement": 0,
                "history": [],
                "train_seconds": 0.0,
                "finished": False,
            }
            if base:
                say(f"off-the-shelf validation mAP {base['pooled']:.4f}")
        stage = None
        logs = _EpochLogs(logs_dir, say)
        run_start = time.perf_counter()
        epoch = int(state["next_epoch"])
        while epoch < s.total_epochs:
            if s.stage_of(epoch) != stage:
                new_stage = s.stage_of(epoch)
                if stage is not None or new_stage == 2:
                    # A new stage starts from the best weights of the previous one.
                    name = state.get("best_weights") or state.get("last")
                    if name:
                        ckpt.restore(name, m)
                stage = new_stage
                with strategy.scope():
                    lr = prepare_stage(s, m, stage)
                if state.get("last") and state.get("stage") == stage:
                    restored = ckpt.restore(state["last"], m)
                    say(
                        f"resumed from {state['last']} (epoch {epoch}"
                        + (", optimizer state restored)" if restored else ")")
                    )
                elif state.get("stage") != stage:
                    state["epochs_without_improvement"] = 0
                state["stage"] = stage
                trainable = len(m.backbone.trainable_weights)
                say(
                    f"stage {stage}: learning rate {lr:g}, "
                    f"{trainable} trainable backbone weight tensors"
                )
            t0 = time.perf_counter()
            ds = _epoch_dataset(s, m, data, epoch, say)
            hist = m.train.fit(ds, epochs=epoch + 1, initial_epoch=epoch, verbose=0, shuffle=False)
            fit_logs = {k: float(v[-1]) for k, v in hist.history.items()}
            val = _validate(s, m, data, kinds)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "stage": stage, "seconds": seconds, **fit_logs}
            record.update({f"val_map_{k}": v for k, v in val.items()})
            if s.recipe == "metric":
                record["gem_p"] = _gem_p(m)
            record["learning_rate"] = lr
            # Best so far: the highest validation mAP over the descriptor kinds validated.
            score_kind = max(val, key=val.get) if val else None
            score = val[score_kind] if val else -float(fit_logs.get("loss", 0.0))
            improved = state["best_map"] is None or score > state["best_map"] + 1e-7
            if improved:
                state.update(best_map=score, best_epoch=epoch, best_kind=score_kind)
                state["epochs_without_improvement"] = 0
            else:
                state["epochs_without_improvement"] += 1
            state["history"].append(record)
            state["train_seconds"] = float(state["train_seconds"]) + seconds
            stop = (
                bool(val)
                and s.early_stopping_patience > 0
                and state["epochs_without_improvement"] >= s.early_stopping_patience
            )
            next_epoch = epoch + 1
            if stop:
                # Early stopping ends the stage: the head recipe still runs its second stage.
                next_epoch = (
                    s.epochs if (stage == 1 and s.total_epochs > s.epochs) else s.total_epochs
                )
            state["next_epoch"] = next_epoch
            state = ckpt.save(state, m, best=improved)
            logs.write(record, state["history"])
            val_text = " ".join(f"val mAP {k} {v:.4f}" for k, v in val.items())
            loss = fit_logs.get("loss", float("nan"))
            say(
                f"epoch {epoch + 1}/{s.total_epochs} (stage {stage}) loss {loss:.4f}"
                + (f" acc {fit_logs['accuracy']:.3f}" if "accuracy" in fit_logs else "")
                + (f" {val_text}" if val_text else "")
                + (" *best*" if improved else "")
                + f" [{seconds:.1f}s]"
            )
            if stop:
                say(f"  early stopping: no improvement for {s.early_stopping_patience} epochs")
            epoch = next_epoch
        run_seconds = time.perf_counter() - run_start

        if state.get("best_weights"):
            ckpt.restore(state["best_weights"], m)
        descriptor_kind = _final_kind(s, state)
        white, white_map = None, None
        if s.recipe == "metric" and s.whitening != "none":
            white, white_map = _learn_whitening(s, m, data, state, say)
    # Outside the mixed-precision scope: the saved model computes in float32.
    final = _final_model(s, m, descriptor_kind, white)
    kind = "whitened" if white is not None else descriptor_kind
    model_path = _save_model(final, workdir, _model_info(s, kind))
    if white is not None:
        white.save(os.path.join(workdir, "whitening.npz"))
    state["finished"] = True
    state["final_descriptor"] = "whitened" if white is not None else descriptor_kind
    io.atomic_write_json(ckpt.state_path, {k: v for k, v in state.items() if k != "_path"})
    val_best = state["best_map"] if data.val is not None else None
    result = TrainResult(
        model_path=model_path,
        descriptor=state["final_descriptor"],
        best_val_map=_num(white_map if white_map is not None else val_best),
        off_the_shelf_val_map=_num(state["off_the_shelf_val_map"]),
        best_epoch=int(state["best_epoch"] if state["best_epoch"] is not None else -1),
        history=state["history"],
        train_seconds=run_seconds,
        skipped=skipped,
    )
    _write_model_json(workdir, s, result, class_names, white, data)
    say(f"saved {model_path} ({result.descriptor} descriptor, val mAP {result.best_val_map:.4f})")
    return result


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _gem_p(m: TrainingModels) -> float | None:
    weights = m.pool_layer.get_weights()
    return float(np.ravel(weights[0])[0]) if weights else None


def _final_kind(s: Settings, state: dict[str, Any]) -> str:
    if s.recipe == "metric":
        return "pooled"
    if s.descriptor != "auto":
        return s.descriptor
    if state.get("best_kind"):
        return state["best_kind"]
    # No validation to choose by: the projection when it was trained, else the pooled vector.
    return "projected" if state.get("history") else "pooled"


def _learn_whitening(s: Settings, m: TrainingModels, data: TrainingData, state, say):
    """PCA-whitening learned on the training images' descriptors; 'auto' keeps it if it helps."""
    embed = m.embed(m.descriptor)
    desc = describe(m.descriptor, data.train, None, s.image_size, s.batch_size, embed)
    dim = s.whitening_dim if 0 < s.whitening_dim <= desc.shape[1] else 0
    white = whitening.learn_pca_whitening(
        desc,
        dim=dim,
        shrinkage=s.whitening_shrinkage,
        info={"backbone": s.backbone, "learned_on": "fine-tuning training images"},
    )
    if data.val is None:
        return (white if s.whitening == "pca" else None), None
    val_desc = describe(m.descriptor, data.val, None, s.image_size, s.batch_size, embed)
    plain = leave_one_out_map(val_desc, data.val.labels)[0]
    whitened = leave_one_out_map(whitening.apply_whitening(val_desc, white), data.val.labels)[0]
    keep = s.whitening == "pca" or whitened >= plain
    say(
        f"whitening learned on {desc.shape[0]} training descriptors: val mAP {plain:.4f} -> "
        f"{whitened:.4f} ({'kept' if keep else 'not kept'})"
    )
    state["val_map_before_whitening"] = plain
    state["val_map_whitened"] = whitened
    if keep:
        return white, whitened
    return None, plain


def _copy_weights(src: keras.layers.Layer, dst: keras.layers.Layer) -> None:
    dst.set_weights([np.asarray(w) for w in src.get_weights()])


def _final_model(
    s: Settings, m: TrainingModels, kind: str, white: whitening.Whitening | None
) -> keras.Model:
    """The descriptor model to save, rebuilt in float32 with the trained weights copied in."""
    spec = backbones.get_backbone_spec(s.backbone)
    gem_p = _gem_p(m) if s.pooling == "gem" else s.gem_p
    # Same `weights` argument as training: some constructors (EfficientNet) change their
    # layers with it; the values themselves are overwritten below.
    final = models.build_descriptor_model(
        backbone=s.backbone,
        weights=s.weights,
        alpha=s.alpha,
        pooling=s.pooling,
        gem_p=gem_p if gem_p is not None else s.gem_p,
        rmac_levels=s.rmac_levels,
        whitening=white,
    )
    _copy_weights(m.backbone, final.get_layer(spec.name))
    name = _pooling_layer_name(s.pooling)
    _copy_weights(m.pool_layer, final.get_layer(name))
    if kind != "projected":
        return final
    pooled = final.get_layer(name).output
    dense = keras.layers.Dense(s.dense_units, name="projection", dtype="float32")
    x = dense(pooled)
    _copy_weights(m.train.get_layer("projection"), dense)
    out = models.unit_normalization("l2", dtype="float32")(x)
    return keras.Model(final.input, out, name=f"{spec.name}_{s.pooling}_projected")


def _model_info(s: Settings, descriptor: str) -> dict[str, Any]:
    """Carried inside model.keras: extraction uses `image_size`, the resolution it was
    trained and validated at, unless the user asks for another."""
    info = {
        "image_size": s.image_size,
        "backbone": s.backbone,
        "pooling": s.pooling,
        "recipe": s.recipe,
        "descriptor": descriptor,
    }
    if backbones.get_backbone_spec(s.backbone).has_alpha:
        info["alpha"] = s.alpha
    return info


def _save_model(model: keras.Model, workdir: str, info: dict[str, Any]) -> str:
    return models.save_descriptor_model(model, os.path.join(workdir, MODEL_FILE), info)


def _write_model_json(workdir, s: Settings, result: TrainResult, class_names, white, data) -> None:
    info = {
        "model": os.path.basename(result.model_path),
        "recipe": s.recipe,
        "backbone": s.backbone,
        "alpha": s.alpha,
        "initial_weights": s.weights,
        "pooling": s.pooling,
        "descriptor": result.descriptor,
        "gem_p_initial": s.gem_p,
        "image_size": s.image_size,
        "whitening": None if white is None else white.info,
        "train_data": data.source,
        "val_data": data.val_source,
        "num_train_images": len(data.train),
        "num_val_images": 0 if data.val is None else len(data.val),
        "class_names": list(class_names),
        "best_val_map": result.best_val_map,
        "off_the_shelf_val_map": result.off_the_shelf_val_map,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
        "skipped_images": [list(x) for x in result.skipped],
        "history": result.history,
        "settings": _settings_dict(s),
    }
    io.atomic_write_json(os.path.join(workdir, "model.json"), info)


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["augment"] = dataclasses.asdict(s.augment)
    return d


# Settings that choose how a run executes, not what it learns: a finished run is the same run
# whatever they are now.
_EXECUTION_SETTINGS = frozenset({"cache", "mixed_precision", "strategy"})


def finished_run_differences(workdir: str, s: Settings) -> list[str]:
    """The settings in which `s` differs from the finished run in `workdir` (its model.json).

    Returns:
      One 'name (finished run: old, now: new)' per differing setting; [] when they agree or
      the run recorded no settings.
    """
    path = os.path.join(workdir, "model.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("settings") or {}
    # Through JSON, as model.json holds them (tuples become lists).
    now = json.loads(json.dumps(io.json_safe(_settings_dict(s))))
    return [
        f"{k} (finished run: {saved.get(k)!r}, now: {now.get(k)!r})"
        for k in sorted((set(saved) | set(now)) - _EXECUTION_SETTINGS)
        if saved.get(k) != now.get(k)
    ]


def _result_from_json(workdir: str) -> TrainResult:
    with open(os.path.join(workdir, "model.json"), encoding="utf-8") as f:
        info = json.load(f)

    return TrainResult(
        model_path=os.path.join(workdir, info.get("model", MODEL_FILE)),
        descriptor=info.get("descriptor", "pooled"),
        best_val_map=_num(info.get("best_val_map")),
        off_the_shelf_val_map=_num(info.get("off_the_shelf_val_map")),
        best_epoch=int(info.get("best_epoch", -1) if info.get("best_epoch") is not None else -1),
        history=info.get("history", []),
        train_seconds=0.0,
        skipped=[tuple(x) for x in info.get("skipped_images", [])],
    )


__all__ = [
    "CheckpointMismatchError",
    "Settings",
    "TrainResult",
    "TrainingData",
    "TrainingModels",
    "TupleModel",
    "backbone_blocks",
    "build_training_models",
    "prepare_stage",
    "check_checkpoint_compatible",
    "describe",
    "leave_one_out_map",
    "load_training_data",
    "set_trainable_blocks",
    "train",
]
