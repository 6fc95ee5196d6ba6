"""Synthetic photos and image folders for the tests that list, index and search images."""

import os

import numpy as np
from PIL import Image, ImageDraw


def synthetic_photo(path, seed, size=(96, 72)):
    """A synthetic 'photo': coloured shapes on a coloured background, distinct per seed.

    Writes a JPEG at `path` (folders made as needed) and returns the path as a string.
    """
    r = np.random.default_rng(seed)

    def colour():
        return tuple(int(v) for v in r.integers(0, 256, 3))

    img = Image.new("RGB", size, colour())
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = (int(v) for v in r.integers(0, size[0] - 16, 2))
        w, h = (int(v) for v in r.integers(8, 40, 2))
        d.ellipse([x, y % size[1], x + w, y % size[1] + h], fill=colour())
        d.rectangle([y, x // 2, y + h // 2, x // 2 + w // 3], fill=colour())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, quality=95)
    return str(path)


def plain_image(path, size=(40, 30), color=(200, 10, 10), fmt="JPEG"):
    """Writes a one-colour image at `path` (folders made as needed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def labelled_collection(root, counts, size=(40, 30)):
    """A labelled folder: `counts[c]` images `NN.jpg` in sub-folder `c` of `root` per class."""
    for c, n in counts.items():
        for i in range(n):
            plain_image(os.path.join(root, c, f"{i:02d}.jpg"), size, (20 * i, 80, 40))
