"""The networks a training run trains: the descriptor model and the recipe's model around it.

* head recipe: the descriptor model's pooled vector ▸ dense projection ▸ ReLU ▸ dropout ▸
  softmax classifier; the projection (before the ReLU), L2-normalised, is a second candidate
  descriptor.
* metric recipe: `TupleModel` runs the descriptor model over tuples of images.

Also: which backbone layers train in each stage (blocks grouped by Keras layer names, batch norm
always frozen), compiling a stage, and the precision / distribution strategy of a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cbir_tf.describe import catalog, models
from cbir_tf.train import losses
from cbir_tf.train.settings import Settings

_BLOCK_PATTERNS = (
    re.compile(r"^(conv\d+_block\d+)_"),  # ResNet, DenseNet
    re.compile(r"^(convnext_\w+?_stage_\d+_block_\d+)_"),  # ConvNeXt
    # KerasHub transformer blocks, one layer each: DINOv2/v3 layers_11, CLIP/SigLIP
    # [vision_encoder_]encoder_block_11
    re.compile(r"^((?:\w+_)?(?:layers|encoder_block)_\d+)$"),
    # EfficientNet block7a_, VGG block5_, MobileNetV2 block_16_
    re.compile(r"^(block_?\d+[a-z]?)_"),
    re.compile(r"^conv_(?:dw|pw|pad)_(\d+)"),  # MobileNet v1
    re.compile(r"^(expanded_conv)_"),  # MobileNetV2's first block
)


def _block_key(name: str) -> str | None:
    for pattern in _BLOCK_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def _final_norm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.LayerNormalization)


def backbone_blocks(backbone: keras.Model) -> list[list[keras.layers.Layer]]:
    """Groups a backbone's layers into blocks, in network order.

    Layers are grouped by the block prefix of their Keras names (`block7a_`, `conv5_block3_`,
    `conv_pw_13`, `block_16_`, ConvNeXt's `convnext_tiny_stage_3_block_2_`; a KerasHub
    transformer block, `layers_11` or `encoder_block_11`, is one layer); consecutive layers
    without one (stems, EfficientNet's `top_*`, MobileNetV2's `Conv_1`, a transformer's patch
    embedding) form a block of their own, except a LayerNormalization right after a block (a
    transformer's final norm), which joins it.

    Args:
      backbone: the backbone model inside a descriptor model (a `keras.applications` CNN or a
        transformer's token model).

    Returns:
      Blocks as lists of layers; the last is the one nearest the output.
    """
    blocks: list[list[keras.layers.Layer]] = []
    previous: object = object()
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        key = _block_key(layer.name)
        if key is None and blocks and previous is not None and _final_norm(layer):
            # A transformer's (or ConvNeXt's) last LayerNorm belongs to the last block: the
            # top block trains with the norm that reads it.
            blocks[-1].append(layer)
            continue
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


def embed_function(model: keras.Model):
    """`model`'s inference call, traced once for every image size (the models are
    shape-polymorphic): float32 [B, H, W, 3] -> [B, D]."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def embed(x):
        return model(x, training=False)

    return embed


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
            self.embeds[id(model)] = embed_function(model)
        return self.embeds[id(model)]


def descriptor_model(
    settings: Settings, gem_p: float | None = None, whitening: Any = None
) -> keras.Model:
    """The run's descriptor model: backbone ▸ pooling ▸ [whitening] ▸ L2.

    Args:
      settings: backbone, weights, alpha, pooling, GeM's p and R-MAC's levels.
      gem_p: GeM's p when not `settings.gem_p` (the trained one, for the saved model).
      whitening: a `cbir_tf.describe.whitening.Whitening` to place after the pooling, or None.
    """
    return models.build_descriptor_model(
        backbone=settings.backbone,
        weights=settings.weights,
        alpha=settings.alpha,
        pooling=settings.pooling,
        gem_p=settings.gem_p if gem_p is None else gem_p,
        rmac_levels=settings.rmac_levels,
        whitening=whitening,
    )


def build_training_models(settings: Settings, num_classes: int) -> TrainingModels:
    """Builds the descriptor model and the recipe's training model around it.

    Args:
      settings: backbone, weights, pooling; recipe; head sizes.
      num_classes: classes of the head recipe's classifier.

    Returns:
      TrainingModels, not compiled (see `prepare_stage`).
    """
    spec = catalog.get_spec(settings.backbone)
    desc = descriptor_model(settings)
    backbone = desc.get_layer(spec.name)
    pool_layer = desc.get_layer(models.pooling_layer_name(settings.pooling))
    if settings.recipe == "head":
        pooled = pool_layer.output
        proj = keras.layers.Dense(settings.dense_units, name="projection")(pooled)
        x = keras.layers.ReLU(name="projection_relu")(proj)
        x = keras.layers.Dropout(settings.dropout, name="dropout")(x)
        probs = keras.layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="classifier"
        )(x)
        train_model = keras.Model(desc.input, probs, name="head_classifier")
        projected = keras.Model(
            desc.input, models.unit_normalization("projected_l2", dtype="float32")(proj)
        )
        return TrainingModels(desc, train_model, backbone, pool_layer, projected)
    tuple_model = TupleModel(desc, settings.image_size, name="tuple_model")
    # One call builds the wrapper, so checkpoints can be loaded into it before any training.
    tuple_model(np.zeros((1, 3, settings.image_size, settings.image_size, 3), np.float32))
    return TrainingModels(desc, tuple_model, backbone, pool_layer)


def prepare_stage(settings: Settings, networks: TrainingModels, stage: int) -> float:
    """Sets the trainable layers of a stage, compiles `networks.train` and builds its optimizer.

    Args:
      settings: the run's settings.
      networks: the networks (`build_training_models`).
      stage: 1, or 2 for the head recipe's unfrozen stage.

    Returns:
      The stage's learning rate.
    """
    lr = _configure_stage(settings, networks, stage)
    _compile(settings, networks, lr)
    _build_optimizer(networks)
    return lr


def _configure_stage(settings: Settings, networks: TrainingModels, stage: int) -> float:
    if settings.recipe == "head":
        n = 0 if stage == 1 else settings.fine_tune_blocks
        set_trainable_blocks(networks.backbone, n)
        return settings.learning_rate if stage == 1 else settings.fine_tune_learning_rate
    set_trainable_blocks(
        networks.backbone, -1 if settings.metric_blocks <= 0 else settings.metric_blocks
    )
    return settings.learning_rate


def _compile(settings: Settings, networks: TrainingModels, learning_rate: float) -> None:
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if settings.recipe == "head":
        networks.train.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    else:
        networks.train.compile(
            optimizer=optimizer, loss=losses.TupleLoss(settings.loss, margin=settings.margin)
        )


def _build_optimizer(networks: TrainingModels) -> None:
    """Creates the optimizer's variables now, so that a checkpoint can be restored into them."""
    if not networks.train.optimizer.built:
        networks.train.optimizer.build(networks.train.trainable_variables)


def tensor_cores(gpus: list) -> bool:
    """True when there are GPUs and all have compute capability >= 7.0 (fast float16)."""
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability is None or tuple(capability) < (7, 0):
            return False
    return True


@contextlib.contextmanager
def precision_and_strategy(settings: Settings) -> Iterator[tf.distribute.Strategy]:
    """Mixed float16 on Tensor-Core GPUs and MirroredStrategy over several GPUs ('auto').

    The global Keras dtype policy is restored on exit, so the saved model computes in float32.
    """
    gpus = tf.config.list_physical_devices("GPU")
    mixed = settings.mixed_precision == "on" or (
        settings.mixed_precision == "auto" and tensor_cores(gpus)
    )
    if settings.strategy == "mirrored" or (settings.strategy == "auto" and len(gpus) > 1):
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
