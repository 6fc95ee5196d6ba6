"""Metric-learning losses on L2-normalised descriptors.

Training tuples are laid out as descriptors [B, T, D]: tuple b holds its query at position 0,
its positive at position 1 and T - 2 hard negatives after them. The reference code
(cnnimageretrieval-pytorch `layers/loss.py`) stores the same tuples as columns of a [D, N]
matrix with labels -1 (query), 1 (positive), 0 (negative); the values computed here equal the
reference's, per tuple, so its margins and learning rates carry over.

Both losses return one value per tuple (the reference's sum over the pairs of a tuple); Keras
averages them over the batch.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _split_tuples(tuples: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    tuples = tf.convert_to_tensor(tuples)
    # Mixed precision: distances of nearly equal unit vectors need float32.
    tuples = tf.cast(tuples, tf.float32)
    tf.debugging.assert_rank(tuples, 3, message="tuples must be [B, T, D]")
    tf.debugging.assert_greater_equal(
        tf.shape(tuples)[1], 3, message="a tuple needs a query, a positive and a negative"
    )
    return tuples[:, 0, :], tuples[:, 1, :], tuples[:, 2:, :]


def contrastive_loss_pairs(
    x1: tf.Tensor, x2: tf.Tensor, same: tf.Tensor, margin: float = 0.7, eps: float = 1e-6
) -> tf.Tensor:
    """Contrastive loss of descriptor pairs (Hadsell et al. 2006; Radenovic et al. 2018 form).

    loss = 0.5 * d^2 for matching pairs, 0.5 * max(0, margin - d)^2 for non-matching ones,
    with d = ||x1 - x2 + eps|| (the reference adds eps inside the norm so its gradient stays
    finite when x1 == x2).

    Args:
      x1, x2: float [..., D] descriptors.
      same: [...] 1 for matching pairs, 0 for non-matching pairs.
      margin: distance beyond which a non-matching pair costs nothing.
      eps: added to every difference before the norm.

    Returns:
      float32 [...] loss per pair.
    """
    x1 = tf.cast(x1, tf.float32)
    x2 = tf.cast(x2, tf.float32)
    same = tf.cast(same, tf.float32)
    dist = tf.sqrt(tf.reduce_sum(tf.square(x1 - x2 + eps), axis=-1))
    return 0.5 * same * tf.square(dist) + 0.5 * (1.0 - same) * tf.square(tf.nn.relu(margin - dist))


def contrastive_loss(tuples: tf.Tensor, margin: float = 0.7, eps: float = 1e-6) -> tf.Tensor:
    """Contrastive loss per tuple: query-positive pull plus query-negative push.

    Args:
      tuples: float [B, T, D], T >= 3 (query, positive, T - 2 negatives), rows L2-normalised.
      margin: non-matching pairs closer than `margin` are pushed apart (0.7: the reference's
        value for GeM on ResNet/VGG).
      eps: see `contrastive_loss_pairs`.

    Returns:
      float32 [B]: sum over the T - 1 pairs of each tuple.
    """
    query, positive, negatives = _split_tuples(tuples)
    pos = contrastive_loss_pairs(query, positive, 1.0, margin, eps)
    neg = contrastive_loss_pairs(query[:, None, :], negatives, 0.0, margin, eps)
    return pos + tf.reduce_sum(neg, axis=1)


def triplet_loss(tuples: tf.Tensor, margin: float = 0.1) -> tf.Tensor:
    """Triplet loss per tuple, one triplet (query, positive, negative_i) per negative.

    loss = sum_i max(0, ||q - p||^2 - ||q - n_i||^2 + margin), as the reference's
    `triplet_loss` (squared distances, no eps).

    Args:
      tuples: float [B, T, D], T >= 3, rows L2-normalised.
      margin: required gap between the squared negative and positive distances.

    Returns:
      float32 [B].
    """
    query, positive, negatives = _split_tuples(tuples)
    dist_pos = tf.reduce_sum(tf.square(query - positive), axis=-1)  # [B]
    dist_neg = tf.reduce_sum(tf.square(query[:, None, :] - negatives), axis=-1)  # [B, T-2]
    return tf.reduce_sum(tf.nn.relu(dist_pos[:, None] - dist_neg + margin), axis=1)


@keras.saving.register_keras_serializable(package="cbir_tf")
class TupleLoss(keras.losses.Loss):
    """Keras wrapper of the tuple losses: `y_pred` is [B, T, D], `y_true` is ignored.

    Args:
      kind: 'contrastive' or 'triplet'.
      margin: the loss's margin.
      eps: contrastive only, see `contrastive_loss_pairs`.
    """

    KINDS = ("contrastive", "triplet")

    def __init__(self, kind: str = "contrastive", margin: float = 0.7, eps: float = 1e-6, **kwargs):
        if kind not in self.KINDS:
            raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(self.KINDS)}")
        kwargs.setdefault("name", f"{kind}_loss")
        super().__init__(**kwargs)
        self.kind = kind
        self.margin = float(margin)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        del y_true  # the tuple layout carries the labels
        if self.kind == "contrastive":
            return contrastive_loss(y_pred, self.margin, self.eps)
        return triplet_loss(y_pred, self.margin)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(kind=self.kind, margin=self.margin, eps=self.eps)
        return config
