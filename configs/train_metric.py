"""Fine-tuning by metric learning (Radenović, Tolias & Chum, TPAMI 2018), on labelled folders.

EfficientNet-B1 + GeM (p trained), contrastive loss with margin 0.7 on tuples of a query, a
positive (same class) and 5 hard negatives (different classes, at most one per class) re-mined
from the current descriptors each epoch among a random pool; batch norm frozen; a PCA-whitening
learned on the training descriptors afterwards and kept when it helps on validation. For the
triplet loss use --config.train.loss=triplet --config.train.margin=0.1.

Run:
  python train.py --config=configs/train_metric.py --train_dir=DATA/train --val_dir=DATA/val \
      --workdir=runs/metric
  python evaluate.py --model=runs/metric/model.keras --dataset=roxford5k
"""

from cbir_tf import config


def get_config():
    c = config.default_config()
    c.model.pooling = "gem"
    c.model.gem_p = 3.0
    c.train.recipe = "metric"
    c.train.image_size = 320
    c.train.batch_size = 35  # images per step: 5 tuples of 1 + 1 + 5 images
    c.train.epochs = 30
    c.train.learning_rate = 1e-5
    c.train.loss = "contrastive"
    c.train.margin = 0.7
    c.train.num_negatives = 5
    c.train.tuples_per_epoch = 2000
    c.train.pool_size = 20000
    c.train.early_stopping_patience = 5
    c.train.metric_blocks = 0  # all blocks
    c.train.whitening = "auto"
    c.workdir = "runs/metric"
    return c
