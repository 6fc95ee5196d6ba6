"""Synthetic photos and image folders for the tests that list, index and search images."""

import os

import numpy as np
from PIL import Image, ImageDraw


def smooth_pixels(h, w, seed):
    """uint8 `[h, w, 3]` smooth random colours (a photo-like image: JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


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


def view_of(path, out, seed):
    """Another view of a photo: a random crop (70-90 % of each side), resized back, re-encoded."""
    r = np.random.default_rng(seed)
    img = Image.open(path).convert("RGB")
    w, h = img.size
    cw, ch = int(w * r.uniform(0.7, 0.9)), int(h * r.uniform(0.7, 0.9))
    x, y = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
    img.crop((x, y, x + cw, y + ch)).resize((w, h)).save(out, quality=90)
    return str(out)


def tiny_benchmark(folder, groups=6, views=3, loners=6, seed=0):
    """A benchmark folder in the `--dataset=FOLDER` layout (jpg/ and gnd.json): `groups`
    synthetic photos, each with one query view and `views` database views (its positives: the
    first easy, the others hard), and `loners` unrelated photos. Returns the folder."""
    import json

    jpg = os.path.join(folder, "jpg")
    os.makedirs(jpg, exist_ok=True)
    imlist, qimlist, gnd = [], [], []
    for g in range(groups):
        src = synthetic_photo(os.path.join(folder, "src", f"g{g}.jpg"), seed * 1000 + g)
        qimlist.append(f"q{g}")
        view_of(src, os.path.join(jpg, f"q{g}.jpg"), seed * 1000 + 100 + g)
        rows = []
        for v in range(views):
            rows.append(len(imlist))
            imlist.append(f"g{g}v{v}")
            view_of(src, os.path.join(jpg, f"g{g}v{v}.jpg"), seed * 1000 + 10 * g + v)
        gnd.append({"easy": rows[:1], "hard": rows[1:], "junk": [], "bbx": None})
    for j in range(loners):
        imlist.append(f"other{j}")
        synthetic_photo(os.path.join(jpg, f"other{j}.jpg"), seed * 1000 + 500 + j)
    with open(os.path.join(folder, "gnd.json"), "w") as f:
        json.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return str(folder)
