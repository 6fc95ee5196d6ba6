"""Demo: a small synthetic benchmark generated on the fly, in the revisitop format.

MobileNet (alpha 0.25) with ImageNet weights, downloaded by Keras on first use (or given with
--weights=mobilenet_2_5_224_tf_no_top.h5). Offline it falls back to random weights and says so
in the table title: the numbers then only show that every stage runs. Use configs/default.py
for the real benchmarks.

Run:
  python evaluate.py --config=configs/demo.py
"""

from cbir_tf import config


def get_config():
    c = config.default_config()
    c.model.backbone = "mobilenet"
    c.model.alpha = 0.25
    c.model.weights = "imagenet"
    c.model.weights_fallback = "none"  # offline: random weights, named in the table title
    c.data.dataset = "demo"
    c.data.image_size = 224
    # The real recipe learns whitening on the other landmark dataset; the demo has no other
    # set, and whitening learned on its own 48 images only amplifies noise.
    c.whitening.kind = "none"
    c.workdir = "runs/demo"
    return c
