"""Synthetic photos for the tests that index and search a folder."""

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
