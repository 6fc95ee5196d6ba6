"""Writes a store, an index folder and a .keras model with the code of this checkout.

Run from a checkout of the version to freeze: PYTHONPATH=. python make_legacy.py OUT_DIR
"""

import os
import sys

import keras
import numpy as np
from PIL import Image

from cbir_tf import descriptors
from cbir_tf import whitening as wl
from cbir_tf.layers import GeM, L2Normalization, PCAWhitening
from cbir_tf.retriever import Retriever

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
keras.utils.set_random_seed(0)

# Three small photos (lossless PNG), kept with the fixture.
rng = np.random.default_rng(0)
img_dir = os.path.join(out, "images")
os.makedirs(img_dir, exist_ok=True)
paths = []
for i in range(3):
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    paths.append(os.path.join(img_dir, f"img{i}.png"))
    Image.fromarray(pixels).save(paths[-1])

# A small descriptor model of this toolkit's layers: conv -> GeM -> L2 -> whitening -> L2.
inp = keras.Input((None, None, 3), name="image")
x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
x = L2Normalization(name="pooled_l2")(GeM(p=3.0, name="gem")(x))
w = wl.Whitening(
    mean=rng.normal(0, 0.05, 8),
    projection=rng.normal(0, 1, (8, 6)),
    eigenvalues=np.linspace(2, 1, 6),
    info={},
)
x = PCAWhitening.from_whitening(w, name="whitening")(x)
model = keras.Model(inp, L2Normalization(name="l2", dtype="float32")(x), name="legacy")
model.save(os.path.join(out, "model.keras"))
probe = (rng.random((1, 20, 28, 3)) * 255).astype(np.float32)
np.save(os.path.join(out, "probe.npy"), probe)
np.save(os.path.join(out, "probe_descriptor.npy"), model(probe).numpy())

# A finished store.
res = descriptors.extract(
    model,
    paths,
    ids=["a", "b", "c"],
    image_size=32,
    store_dir=os.path.join(out, "store"),
    meta={"backbone": "legacy"},
    progress=False,
)
np.save(os.path.join(out, "store_descriptors.npy"), np.asarray(res.descriptors))

# An index folder (the inline model is saved inside it).
r = Retriever(model, image_size=32, root=img_dir)
r.index(img_dir, progress=False)
r.save(os.path.join(out, "index"))
