"""The tuple losses moved to `cbir_tf.train.losses`; this alias keeps `from cbir_tf import losses`
working."""

from cbir_tf.train.losses import (  # noqa: F401
    TupleLoss,
    contrastive_loss,
    contrastive_loss_pairs,
    triplet_loss,
)
