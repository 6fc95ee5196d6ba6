"""Benchmarks of the collections users bring, built from the real clothing photos (issue 25).

Writes, in the `--dataset=FOLDER` layout (`jpg/` and `gnd.json`, see README "Your own
benchmark"), three benchmarks built deterministically from ../shared/data/clothing-small:

  instance/  instance-level: 120 photos of train/ (12 a class) are the objects; each gets a
             query (a framing of 25-40 % of the photo, slightly tilted, colour-changed and
             JPEG-compressed) and 5 database views of its own, as several shots of one object:
             the wide shot (the whole photo, colour-changed) and four framings of 20-40 % of it,
             one colour-changed, one small and strongly compressed, one tilted (cut to the
             rotated rectangle: no borders) and one as it is; views showing at least half of
             what the query shows are easy, the others hard; 1 120 other train/ photos are
             distractors (1 720 database images, 120 queries, 5 positives a query)
  class/     class-level: test/ (372 photos, 10 classes); 3 queries a class, the other 342
             photos the database, a query's positives (easy) every photo of its class
  small/     a user's own handful: 30 validation/ photos of 3 classes, one query a class and
             the 27 others the database (positives: the query's class)

The transformed views are generated images written to the output folder; the other photos are
copied there (never into the project tree). The same command writes the same files.

Run:
  python benchmarks/rerank_benchmarks.py --out=/tmp/rerank-benchmarks
  python evaluate.py --dataset=/tmp/rerank-benchmarks/instance --weights=...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _data import DATA, shared_dir  # noqa: E402

CLASSES = (
    "dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt",
    "t-shirt",
)  # fmt: skip
# The database views of an object: the wide shot and four framings, each with one more change.
VIEWS = ("wide", "colour", "small", "tilted", "plain")
# A view showing at least this share of what the query shows is easy, the others hard.
EASY_OVERLAP = 0.5


def photos(split: str) -> dict[str, list[str]]:
    """{class: sorted photo paths} of one split of clothing-small."""
    base = os.path.join(shared_dir(), DATA, split)
    return {
        c: sorted(os.path.join(base, c, f) for f in os.listdir(os.path.join(base, c)))
        for c in CLASSES
    }


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
    # A colour cast: one channel scaled, as a white balance gone wrong.
    a = np.asarray(img, np.float32) * rng.uniform(0.85, 1.15, size=3)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def framing(rng: np.random.Generator, area: tuple[float, float]) -> np.ndarray:
    """A box [x0, y0, x1, y1] in fractions of the photo, of a random area and place."""
    a = rng.uniform(*area)
    aspect = rng.uniform(0.8, 1.25)
    w, h = min(1.0, np.sqrt(a * aspect)), min(1.0, np.sqrt(a / aspect))
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return np.array([x, y, x + w, y + h])


def shown(box: np.ndarray, query: np.ndarray) -> float:
    """The share of the query's framing that `box` shows too."""
    w = max(0.0, min(box[2], query[2]) - max(box[0], query[0]))
    h = max(0.0, min(box[3], query[3]) - max(box[1], query[1]))
    return w * h / ((query[2] - query[0]) * (query[3] - query[1]))


def _cut(img: Image.Image, box: np.ndarray) -> Image.Image:
    w, h = img.size
    return img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotated, then cut to the largest upright rectangle inside, as a tilted shot has no borders
    (filled corners would make every rotated view look alike, whatever its object)."""
    w, h = img.size
    a = abs(np.radians(degrees))
    sin, cos = np.sin(a), np.cos(a)
    long, short = max(w, h), min(w, h)
    if short <= 2.0 * sin * cos * long or abs(sin - cos) < 1e-10:
        x = 0.5 * short
        cw, ch = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        cw, ch = (w * cos - h * sin) / cos2, (h * cos - w * sin) / cos2
    out = img.rotate(degrees, resample=Image.BICUBIC, expand=True)
    cx, cy = out.size[0] / 2, out.size[1] / 2
    return out.crop(
        (int(cx - cw / 2 + 1), int(cy - ch / 2 + 1), int(cx + cw / 2 - 1), int(cy + ch / 2 - 1))
    )


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def view(img: Image.Image, kind: str, box: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The part `box` of a photo, with the change `kind` (see the module docstring)."""
    out = _cut(img, box)
    if kind in ("wide", "colour"):
        return _colour(out, rng)
    if kind == "small":  # scale change and strong compression
        w, h = out.size
        s = rng.uniform(0.4, 0.6)
        return _jpeg(out.resize((int(w * s), int(h * s)), Image.LANCZOS), int(rng.integers(15, 30)))
    if kind == "tilted":
        return _rotate(out, rng.choice([-1.0, 1.0]) * rng.uniform(10, 25))
    if kind == "plain":
        return out
    if kind == "query":
        out = _rotate(out, rng.choice([-1.0, 1.0]) * rng.uniform(3, 12))
        return _jpeg(_colour(out, rng), 75)
    raise ValueError(kind)


def _write(folder: str, images: dict[str, Image.Image | str], gnd: dict) -> None:
    jpg = os.path.join(folder, "jpg")
    os.makedirs(jpg, exist_ok=True)
    for name, img in images.items():
        path = os.path.join(jpg, name + ".jpg")
        if isinstance(img, str):
            shutil.copyfile(img, path)
        else:
            img.save(path, format="JPEG", quality=92)
    with open(os.path.join(folder, "gnd.json"), "w") as f:
        json.dump(gnd, f)


def instance_benchmark(folder: str, seed: int = 0, per_class: int = 12, distractors: int = 1120):
    """The instance-level benchmark (objects in several views, real distractors)."""
    rng = np.random.default_rng(seed)
    train = photos("train")
    objects, rest = [], []
    for c in CLASSES:
        order = rng.permutation(len(train[c]))
        objects += [train[c][i] for i in order[:per_class]]
        rest += [train[c][i] for i in order[per_class:]]
    rest = [rest[i] for i in sorted(rng.choice(len(rest), distractors, replace=False))]
    images: dict[str, Image.Image | str] = {}
    imlist, qimlist, gnd = [], [], []
    for o, path in enumerate(objects):
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        r = np.random.default_rng([seed, o])
        entry = {"easy": [], "hard": [], "junk": [], "bbx": None}
        qbox = framing(r, (0.25, 0.4))
        for kind in VIEWS:
            box = np.array([0.0, 0.0, 1.0, 1.0]) if kind == "wide" else framing(r, (0.2, 0.4))
            name = f"obj{o:03d}_{kind}"
            images[name] = view(img, kind, box, r)
            entry["easy" if shown(box, qbox) >= EASY_OVERLAP else "hard"].append(len(imlist))
            imlist.append(name)
        qname = f"obj{o:03d}_query"
        images[qname] = view(img, "query", qbox, r)
        qimlist.append(qname)
        gnd.append(entry)
    for j, path in enumerate(rest):
        images[f"other{j:04d}"] = path
        imlist.append(f"other{j:04d}")
    # Database images interleaved, so that row order says nothing about the ground truth.
    order = np.random.default_rng([seed, 1]).permutation(len(imlist))
    new_row = np.empty(len(order), np.int64)
    new_row[order] = np.arange(len(order))
    imlist = [imlist[i] for i in order]
    for g in gnd:
        for key in ("easy", "hard"):
            g[key] = sorted(int(new_row[i]) for i in g[key])
    _write(folder, images, {"imlist": imlist, "qimlist": qimlist, "gnd": gnd})


def class_benchmark(
    folder: str, split: str, classes, queries_per_class: int, per_class=None, seed=0
):
    """A class-level benchmark: queries of each class, positives every photo of their class."""
    rng = np.random.default_rng(seed)
    data = photos(split)
    images: dict[str, Image.Image | str] = {}
    db, queries = [], []
    for c in classes:
        order = rng.permutation(len(data[c]))
        if per_class:
            order = order[:per_class]
        for i, idx in enumerate(order):
            name = f"{c}_{os.path.splitext(os.path.basename(data[c][idx]))[0][:8]}"
            images[name] = data[c][idx]
            (queries if i < queries_per_class else db).append((name, c))
    db = [db[i] for i in np.random.default_rng([seed, 1]).permutation(len(db))]
    imlist = [n for n, _ in db]
    gnd = [
        {
            "easy": [j for j, (_, dc) in enumerate(db) if dc == c],
            "hard": [],
            "junk": [],
            "bbx": None,
        }
        for _, c in queries
    ]
    _write(folder, images, {"imlist": imlist, "qimlist": [n for n, _ in queries], "gnd": gnd})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "rerank-benchmarks"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.commonpath([os.path.abspath(args.out), ROOT]) == ROOT:
        sys.exit("error: --out must be outside the project tree (the photos are not copied in)")
    instance_benchmark(os.path.join(args.out, "instance"), args.seed)
    class_benchmark(os.path.join(args.out, "class"), "test", CLASSES, 3, seed=args.seed)
    class_benchmark(
        os.path.join(args.out, "small"),
        "validation",
        ("dress", "shoes", "shorts"),
        1,
        10,
        args.seed,
    )
    for name in ("instance", "class", "small"):
        with open(os.path.join(args.out, name, "gnd.json")) as f:
            g = json.load(f)
        print(f"{args.out}/{name}: {len(g['imlist'])} images, {len(g['qimlist'])} queries")


if __name__ == "__main__":
    main()
