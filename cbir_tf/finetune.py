"""Fine-tuning moved to the `cbir_tf.train` package; this alias keeps `from cbir_tf import
finetune` and `finetune.train(config, ...)` working (README, benchmarks, older code)."""

from cbir_tf.train import *  # noqa: F403
from cbir_tf.train import __all__  # noqa: F401
