"""Offline demo: a small synthetic benchmark generated on the fly, in the revisitop format.

Runs anywhere without a network or pretrained weights (MobileNet, random weights), so the
numbers only show that every stage runs; use configs/default.py for real results.

Run:
  python evaluate.py --config=configs/demo.py
"""

from cbir_tf.configs import default


def get_config():
    c = default.get_config()
    c.model.backbone = "mobilenet"
    c.model.alpha = 0.25
    c.model.weights = "none"
    c.data.dataset = "demo"
    c.data.image_size = 224
    # The real recipe learns whitening on the other landmark dataset; the demo has no other
    # set, and whitening learned on its own 48 images only amplifies noise.
    c.whitening.kind = "none"
    c.rerank.diffusion.k = 10
    c.rerank.diffusion.kq = 5
    c.workdir = "runs/demo"
    return c
