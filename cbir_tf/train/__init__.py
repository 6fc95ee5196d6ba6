"""Fine-tuning descriptor models on labelled images: the classification-head and metric recipes.

Two recipes, both ending in a `.keras` descriptor model (backbone ▸ pooling ▸ [projection |
whitening] ▸ L2) that `extract.py --model` / `evaluate.py --model` use directly and that loads
with `safe_mode=True` (it is built from `cbir_tf.describe.models` and `cbir_tf.describe.layers`
only):

* ``head`` (the seed's recipe): the backbone is frozen; pooling ▸ dense projection ▸ ReLU ▸
  dropout ▸ softmax is trained to classify the images. An optional second stage unfreezes the top
  N blocks of the backbone with a lower learning rate, batch-norm layers kept frozen (their
  statistics would be ruined by small fine-tuning batches). The descriptor is the pooled vector
  or its linear projection (before the ReLU), never the class scores; 'auto' keeps whichever
  gives the better validation mAP.
* ``metric`` (Radenović, Tolias & Chum, TPAMI 2018): tuples (query, positive, hard negatives)
  are re-mined from the current descriptors every epoch (`cbir_tf.train.tuples`) and the network
  is trained with the contrastive or triplet loss (`losses`); GeM's p is a trained weight; a
  PCA-whitening is learned after training on the training images' descriptors and placed in
  the model.

Around both: validation leave-one-out retrieval mAP after every epoch, best-model and last-epoch
checkpoints (resume after an interruption; a checkpoint of another backbone or recipe is
refused), TensorBoard logs, early stopping, mixed precision on Tensor-Core GPUs and
`tf.distribute.MirroredStrategy` over several GPUs (nothing to configure; the saved model computes
in float32 whatever trained it). Everything is written under `workdir`:

    workdir/model.keras        the descriptor model                          (export.py)
    workdir/model.json         how it was made: backbone, pooling, whitening, val mAP, history
    workdir/whitening.npz      the learned whitening (metric recipe, when used)
    workdir/checkpoints/       state.json + last and best weights (resume)   (checkpoints.py)
    workdir/logs/              TensorBoard events and history.csv            (epoch_logs.py)

Modules: settings.py (the config, checked) ▸ data.py (images) ▸ network.py (the networks, stages)
▸ loop.py (`train`) with validation.py, checkpoints.py, epoch_logs.py ▸ export.py; losses.py.
"""

from cbir_tf.train.checkpoints import (
    CheckpointMismatchError,
    check_checkpoint_compatible,
    finished_run_differences,
)
from cbir_tf.train.data import TrainingData, load_training_data
from cbir_tf.train.loop import train
from cbir_tf.train.network import (
    TrainingModels,
    TupleModel,
    backbone_blocks,
    build_training_models,
    prepare_stage,
    set_trainable_blocks,
)
from cbir_tf.train.outputs import MODEL_FILE, TrainResult
from cbir_tf.train.settings import (
    DESCRIPTOR_KINDS,
    RECIPES,
    WHITENING_MODES,
    Settings,
    TrainConfigError,
)
from cbir_tf.train.validation import describe, leave_one_out_map

__all__ = [
    "DESCRIPTOR_KINDS",
    "MODEL_FILE",
    "RECIPES",
    "WHITENING_MODES",
    "CheckpointMismatchError",
    "Settings",
    "TrainConfigError",
    "TrainResult",
    "TrainingData",
    "TrainingModels",
    "TupleModel",
    "backbone_blocks",
    "build_training_models",
    "check_checkpoint_compatible",
    "describe",
    "finished_run_differences",
    "leave_one_out_map",
    "load_training_data",
    "prepare_stage",
    "set_trainable_blocks",
    "train",
]
