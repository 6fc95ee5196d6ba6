"""Fine-tuning, seed recipe: frozen backbone + classification head, optional unfrozen top blocks.

EfficientNet-B1 with GeM pooling; the head (GeM -> dense 512 -> ReLU -> dropout -> softmax) is
trained on a labelled folder (one sub-folder per class), then the top 2 blocks are fine-tuned
with a 100x lower learning rate, batch norm frozen. The descriptor kept is the pooled or the
projected vector, whichever retrieves the validation images better.

Run:
  python train.py --config=configs/train_head.py --train_dir=DATA/train --val_dir=DATA/val \
      --workdir=runs/head
  python evaluate.py --model=runs/head/model.keras --dataset=paris6k

Offline, pass the backbone's ImageNet weights file: --weights=/path/to/..._notop.h5
"""

from cbir_tf import config


def get_config():
    c = config.default_config()
    c.model.pooling = "gem"
    c.train.recipe = "head"
    c.train.image_size = 224
    c.train.batch_size = 32
    c.train.epochs = 10
    c.train.learning_rate = 1e-3
    c.train.fine_tune_blocks = 2
    c.train.fine_tune_epochs = 5
    c.train.fine_tune_learning_rate = 1e-5
    c.train.dense_units = 512
    c.train.dropout = 0.5
    c.workdir = "runs/head"
    return c
