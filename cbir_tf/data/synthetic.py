"""A small synthetic landmark benchmark in exactly the revisitop on-disk format.

Each "landmark" is a procedurally drawn scene (a facade-like structure of its own palette,
window grid, dome, roof and stripe patterns over a textured background, with clutter around
it). Database images are views of a scene: random crops, scales, rotations, brightness and
contrast changes, blur and partial occlusion. Mild views are labelled `easy`, strong ones
`hard`, and views that show only a sliver of the landmark or hide most of it `junk`, as in
the Revisited Oxford/Paris annotation. Distractor images come from unrelated scenes. Queries
are separate views whose `bbx` frames the landmark, so cropping to it removes the clutter.

The result is written as real JPEGs and `gnd_<name>.pkl` (plain Python lists, ints and
floats; no numpy object inside) in `<root>/datasets/<name>/`, plus an original-protocol file
`gnd_<name>_original.pkl` (queries inside the database, 'ok'/'junk' lists, one landmark's
queries left out) mirroring cnnimageretrieval's `gnd_oxford5k.pkl`. The default benchmark
(6 landmarks x 6 images, 12 distractors, 6 queries: 54 JPEGs of 160x120) takes well under a
second to generate and is byte-for-byte deterministic for a seed; it serves as the `demo`
dataset and as the tiny fixture of end-to-end tests.

numpy + PIL + standard library only.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from cbir_tf import fileio as cio
from cbir_tf.data.download import file_sha256, remove_complete_marker, write_complete_marker
from cbir_tf.data.revisited import dataset_dir

__all__ = ["make_synthetic_benchmark"]

_JPEG_QUALITY = 90


def _color(rng: np.random.Generator, hue: float | None = None, light: tuple = (0.3, 0.9)) -> tuple:
    """A random RGB colour (optionally near a hue), as a tuple of Python ints."""
    h = rng.uniform(0, 1) if hue is None else (hue + rng.uniform(-0.06, 0.06)) % 1.0
    s = rng.uniform(0.45, 1.0)
    v = rng.uniform(*light)
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (int(r * 255), int(g * 255), int(b * 255))


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Vertical two-colour gradient with low-amplitude noise texture ("sky over ground")."""
    w, h = size
    top = np.array(_color(rng, light=(0.5, 1.0)), np.float32)
    bottom = np.array(_color(rng, light=(0.2, 0.6)), np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1), np.float32)
    img += rng.normal(0.0, 10.0, size=(h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size, avoid, n: int):
    """Small random shapes (trees, cars, signs) outside the `avoid` box."""
    w, h = size
    for _ in range(n):
        for _try in range(20):
            cw, ch = int(rng.integers(6, 26)), int(rng.integers(6, 26))
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            if avoid is None or (
                x + cw < avoid[0] or x > avoid[2] or y + ch < avoid[1] or y > avoid[3]
            ):
                break
        else:
            continue
        c = _color(rng)
        if rng.uniform() < 0.5:
            draw.ellipse((x, y, x + cw, y + ch), fill=c)
        else:
            draw.rectangle((x, y, x + cw, y + ch), fill=c)


def _draw_landmark(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box) -> None:
    """A facade with a window grid, a dome or roof, columns and stripes inside `box`."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    hue = rng.uniform(0, 1)
    wall = _color(rng, hue, light=(0.45, 0.85))
    accent = _color(rng, (hue + 0.5) % 1.0, light=(0.15, 0.5))
    roof_y = y1 + int(bh * rng.uniform(0.25, 0.4))
    draw.rectangle((x1, roof_y, x2, y2), fill=wall, outline=accent, width=2)
    # Roof: a dome, a pediment or a flat parapet with towers; landmark-specific shapes.
    kind = int(rng.integers(0, 3))
    roof = _color(rng, (hue + rng.uniform(0.2, 0.8)) % 1.0)
    if kind == 0:
        r = int(bw * rng.uniform(0.18, 0.3))
        cx = x1 + bw // 2 + int(rng.integers(-bw // 8, bw // 8 + 1))
        draw.pieslice((cx - r, roof_y - r, cx + r, roof_y + r), 180, 360, fill=roof, outline=accent)
        draw.rectangle((cx - 2, roof_y - r - 12, cx + 2, roof_y - r), fill=accent)
    elif kind == 1:
        draw.polygon([(x1, roof_y), (x2, roof_y), (x1 + bw // 2, y1)], fill=roof, outline=accent)
    else:
        tw = max(6, int(bw * rng.uniform(0.1, 0.18)))
        for tx in (x1, x2 - tw):
            draw.rectangle((tx, y1, tx + tw, roof_y), fill=roof, outline=accent)
            draw.polygon([(tx, y1), (tx + tw, y1), (tx + tw // 2, y1 - tw)], fill=accent)
    # Window grid: rows x cols and window colour differ between landmarks.
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(3, 8))
    win = _color(rng, (hue + 0.33) % 1.0, light=(0.1, 0.95))
    gx, gy = bw / cols, (y2 - roof_y) / (rows + 1)
    arched = rng.uniform() < 0.5
    for r_ in range(rows):
        for c_ in range(cols):
            wx, wy = x1 + c_ * gx + gx * 0.25, roof_y + (r_ + 0.4) * gy
            rect = (int(wx), int(wy), int(wx + gx * 0.5), int(wy + gy * 0.6))
            if arched:
                draw.rounded_rectangle(rect, radius=max(1, int(gx * 0.2)), fill=win)
            else:
                draw.rectangle(rect, fill=win)
    # Door and stripes.
    dx = x1 + bw // 2
    draw.rectangle((dx - bw // 12, y2 - bh // 5, dx + bw // 12, y2), fill=accent)
    stripe = _color(rng, (hue + 0.15) % 1.0)
    for k in range(int(rng.integers(1, 4))):
        sy = roof_y + 3 + 4 * k
        draw.line((x1, sy, x2, sy), fill=stripe, width=2)


def _scene(rng: np.random.Generator, size: tuple[int, int], landmark: bool) -> tuple:
    """Returns (scene image, landmark box (x1, y1, x2, y2) in scene pixels)."""
    w, h = size
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    bw = int(w * rng.uniform(0.38, 0.5))
    bh = int(h * rng.uniform(0.45, 0.6))
    cx = w // 2 + int(rng.integers(-w // 20, w // 20 + 1))
    cy = h // 2 + int(rng.integers(-h // 20, h // 20 + 1))
    box = (cx - bw // 2, cy - bh // 2, cx + bw // 2, cy + bh // 2)
    # Distractor scenes get a structure too (so they are not trivially rejected), just not
    # one of the landmarks.
    _draw_landmark(draw, rng, box)
    _draw_clutter(draw, rng, size, box, n=int(rng.integers(10, 20)) if landmark else 15)
    return img, box


def _view(
    scene: Image.Image,
    center: tuple[float, float],
    scale: float,
    angle_deg: float,
    out_size: tuple[int, int],
    fill: tuple,
) -> Image.Image:
    """Samples a view: output pixel (u, v) shows scene point center + R * s * (u - W/2, v - H/2)."""
    w, h = out_size
    a = math.radians(angle_deg)
    ca, sa = math.cos(a) * scale, math.sin(a) * scale
    cx, cy = center
    # PIL's affine maps output (u, v) to input (a*u + b*v + c, d*u + e*v + f).
    coeffs = (
        ca,
        -sa,
        cx - ca * w / 2 + sa * h / 2,
        sa,
        ca,
        cy - sa * w / 2 - ca * h / 2,
    )
    return scene.transform(
        out_size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def _photometric(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness / contrast / colour changes and blur, stronger for larger `strength`."""
    img = ImageEnhance.Brightness(img).enhance(1.0 + rng.uniform(-1, 1) * 0.45 * strength)
    img = ImageEnhance.Contrast(img).enhance(1.0 + rng.uniform(-1, 1) * 0.4 * strength)
    img = ImageEnhance.Color(img).enhance(1.0 + rng.uniform(-1, 1) * 0.5 * strength)
    if strength > 0.6 and rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    return img


def _occlude(img: Image.Image, rng: np.random.Generator, fraction: float) -> Image.Image:
    """Covers about `fraction` of the image with a noisy rectangle (a passer-by, a bus)."""
    if fraction <= 0:
        return img
    w, h = img.size
    ow = int(w * math.sqrt(fraction) * rng.uniform(0.8, 1.25))
    oh = int(min(h, w * h * fraction / max(ow, 1)))
    ow = min(ow, w)
    x, y = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
    patch = np.array(_color(rng), np.float32) + rng.normal(0, 25, (oh, ow, 3))
    img = img.copy()
    img.paste(Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8), "RGB"), (x, y))
    return img


# Per difficulty: (scale range as a multiple of the scale framing the landmark, centre jitter
# as a fraction of the landmark size, max rotation in degrees, photometric strength, occlusion).
_DIFFICULTY = {
    "easy": ((1.05, 1.35), 0.08, 4.0, 0.25, (0.0, 0.0)),
    "hard": ((0.75, 1.8), 0.22, 22.0, 0.8, (0.12, 0.3)),
    "junk": ((0.28, 0.4), 0.45, 10.0, 0.5, (0.0, 0.1)),
}


def _db_view(scene, box, rng, kind: str, out_size) -> Image.Image:
    (s_lo, s_hi), jitter, max_rot, strength, (o_lo, o_hi) = _DIFFICULTY[kind]
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    frame = max(bw / out_size[0], bh / out_size[1])  # scale at which the landmark just fits
    scale = frame * rng.uniform(s_lo, s_hi)
    cx = (x1 + x2) / 2 + rng.uniform(-jitter, jitter) * bw
    cy = (y1 + y2) / 2 + rng.uniform(-jitter, jitter) * bh
    if kind == "junk":
        # A sliver: the view is centred near a corner of the landmark, most of it outside.
        cx = (x1 if rng.uniform() < 0.5 else x2) + rng.uniform(-0.1, 0.1) * bw
        cy = (y1 if rng.uniform() < 0.5 else y2) + rng.uniform(-0.1, 0.1) * bh
    angle = rng.uniform(-max_rot, max_rot)
    fill = tuple(int(v) for v in np.asarray(scene.getpixel((0, 0))))
    img = _view(scene, (cx, cy), scale, angle, out_size, fill)
    img = _photometric(img, rng, strength)
    return _occlude(img, rng, rng.uniform(o_lo, o_hi))


def _query_view(scene, box, rng, out_size) -> tuple[Image.Image, list[float]]:
    """A view without rotation (so the box stays axis-aligned) and its landmark box."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    scale = max(bw / out_size[0], bh / out_size[1]) * rng.uniform(1.3, 1.55)
    cx = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * bw
    cy = (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * bh
    img = _view(scene, (cx, cy), scale, 0.0, out_size, (0, 0, 0))
    img = _photometric(img, rng, 0.2)
    w, h = out_size

    def to_view(x: float, y: float) -> tuple[float, float]:
        return (x - cx) / scale + w / 2, (y - cy) / scale + h / 2

    u1, v1 = to_view(x1, y1)
    u2, v2 = to_view(x2, y2)
    bbx = [
        round(max(0.0, u1), 1),
        round(max(0.0, v1), 1),
        round(min(float(w), u2), 1),
        round(min(float(h), v2), 1),
    ]
    return img, bbx


def _split_counts(n: int) -> tuple[int, int, int]:
    """(easy, hard, junk) counts for n views of a landmark: about 1/2, 1/3, 1/6."""
    junk = max(1, n // 6) if n >= 3 else 0
    hard = max(1, n // 3) if n >= 2 else 0
    return n - hard - junk, hard, junk


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per (purpose, landmark, image): changing one count (say, more
    distractors) leaves every other image unchanged."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _check_arguments(
    name: str,
    num_landmarks: int,
    images_per_landmark: int,
    distractors: int,
    queries_per_landmark: int,
    image_size: tuple[int, int],
) -> tuple[int, int]:
    """Raises ValueError for arguments no benchmark can be made of; returns (width, height)."""
    if num_landmarks < 1 or images_per_landmark < 1 or queries_per_landmark < 1:
        raise ValueError("num_landmarks, images_per_landmark and queries_per_landmark must be >= 1")
    if distractors < 0:
        raise ValueError("distractors must be >= 0")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name must be a plain folder name (letters, digits, _ . -), got {name!r}")
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16, got {image_size}")
    return width, height


def _render(
    seed: int,
    num_landmarks: int,
    images_per_landmark: int,
    distractors: int,
    queries_per_landmark: int,
    out_size: tuple[int, int],
) -> tuple[dict[str, Image.Image], dict[str, tuple[int, str]], list[tuple[str, int, list[float]]]]:
    """Draws every image of the benchmark.

    Returns:
      (images {name: PIL image}, labels {database name: (landmark or -1, 'easy' | 'hard' |
      'junk' | 'distractor')}, queries [(name, landmark, bbx)]).
    """
    scene_size = (2 * out_size[0], 2 * out_size[1])
    n_easy, n_hard, n_junk = _split_counts(images_per_landmark)
    kinds = ["easy"] * n_easy + ["hard"] * n_hard + ["junk"] * n_junk
    images: dict[str, Image.Image] = {}
    labels: dict[str, tuple[int, str]] = {}
    queries: list[tuple[str, int, list[float]]] = []
    for lm in range(num_landmarks):
        scene, box = _scene(_rng(seed, 1, lm), scene_size, landmark=True)
        for k, kind in enumerate(kinds):
            rng = _rng(seed, 2, lm, k)
            db_name = f"landmark{lm:02d}_{k:06d}"
            images[db_name] = _db_view(scene, box, rng, kind, out_size)
            labels[db_name] = (lm, kind)
        for j in range(queries_per_landmark):
            img, bbx = _query_view(scene, box, _rng(seed, 3, lm, j), out_size)
            q_name = f"landmark{lm:02d}_query_{j:06d}"
            images[q_name] = img
            queries.append((q_name, lm, bbx))
    for d in range(distractors):
        rng = _rng(seed, 4, d)
        scene, box = _scene(rng, scene_size, landmark=False)
        db_name = f"distractor_{d:06d}"
        images[db_name] = _db_view(scene, box, rng, "hard", out_size)
        labels[db_name] = (-1, "distractor")
    return images, labels, queries


def _revisited_gnd(
    seed: int, labels: dict[str, tuple[int, str]], queries: list[tuple[str, int, list[float]]]
) -> dict[str, Any]:
    """The revisited ground truth: {'gnd', 'imlist', 'qimlist'}, plain Python objects."""
    # Interleave landmarks and distractors, as in the real lists.
    imlist = sorted(labels)
    order = _rng(seed, 5).permutation(len(imlist))
    imlist = [imlist[i] for i in order]
    index = {n: i for i, n in enumerate(imlist)}
    gnd = []
    for _q_name, lm, bbx in queries:
        entry: dict[str, Any] = {"bbx": bbx}
        for kind in ("easy", "hard", "junk"):
            entry[kind] = sorted(
                index[n] for n, (l_, k_) in labels.items() if l_ == lm and k_ == kind
            )
        gnd.append(entry)
    return {"gnd": gnd, "imlist": imlist, "qimlist": [q[0] for q in queries]}


def _original_gnd(
    revisited: dict[str, Any], queries: list[tuple[str, int, list[float]]], num_landmarks: int
) -> dict[str, Any]:
    """The original-protocol ground truth, as cnnimageretrieval's `gnd_oxford5k.pkl`.

    The queries are database images too, 'ok' = easy + hard + the landmark's own queries, and
    the last landmark's queries are not covered (when there are several landmarks).
    """
    imlist, qimlist, gnd = revisited["imlist"], revisited["qimlist"], revisited["gnd"]
    covered = [i for i, q in enumerate(queries) if q[1] < num_landmarks - 1] or [0]
    o_gnd = []
    for i in covered:
        g = gnd[i]
        own = [len(imlist) + j for j, q in enumerate(queries) if q[1] == queries[i][1]]
        o_gnd.append(
            {"bbx": g["bbx"], "ok": sorted(g["easy"] + g["hard"] + own), "junk": g["junk"]}
        )
    return {"gnd": o_gnd, "imlist": imlist + qimlist, "qimlist": [qimlist[i] for i in covered]}


def _write_jpegs(jpg_dir: str, images: dict[str, Image.Image]) -> None:
    for img_name, img in images.items():
        with open(os.path.join(jpg_dir, img_name + ".jpg"), "wb") as f:
            f.write(_jpeg_bytes(img))
            # Durable before the marker vouches for them (the marker itself is atomic).
            f.flush()
            os.fsync(f.fileno())


def _write_gnd(path: str, cfg: dict[str, Any]) -> None:
    # Protocol 3, plain lists/ints/floats: the format of the published revisitop files.
    cio.atomic_write_bytes(path, pickle.dumps(cfg, protocol=3))


def make_synthetic_benchmark(
    root: str | os.PathLike,
    name: str = "demo",
    num_landmarks: int = 6,
    images_per_landmark: int = 6,
    distractors: int = 12,
    queries_per_landmark: int = 1,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    original_protocol: bool = True,
) -> str:
    """Generates a synthetic benchmark in the revisitop layout under `root`.

    Writes `<root>/datasets/<name>/jpg/*.jpg`, `gnd_<name>.pkl` (dict with 'imlist',
    'qimlist' and 'gnd': per query 'bbx' [x1, y1, x2, y2] floats and 'easy' / 'hard' / 'junk'
    lists of 0-based imlist indices, plain Python objects), optionally
    `gnd_<name>_original.pkl` (original protocol: the queries are also database images, per
    query 'ok' (easy + hard + itself) and 'junk' and 'bbx'; the last landmark's queries are
    not covered, as 55 of the 70 revisited queries are originals), and finally the
    `COMPLETE` marker. Output is deterministic for a given seed and arguments.

    Args:
      root: data root (the revisitop `data` folder).
      name: dataset name (folder and `gnd_<name>.pkl`).
      num_landmarks: number of landmarks (one scene each, at least 1).
      images_per_landmark: database views per landmark, split about 1/2 easy, 1/3 hard,
        1/6 junk (at least one easy).
      distractors: database images of unrelated scenes.
      queries_per_landmark: query views per landmark (not in the database).
      image_size: (width, height) of every image.
      seed: random seed.
      original_protocol: also write the original-protocol ground truth.

    Returns:
      The dataset folder `<root>/datasets/<name>`.
    """
    width, height = _check_arguments(
        name, num_landmarks, images_per_landmark, distractors, queries_per_landmark, image_size
    )
    folder = dataset_dir(root, name)
    jpg_dir = os.path.join(folder, "jpg")
    os.makedirs(jpg_dir, exist_ok=True)
    remove_complete_marker(folder)  # a regenerated folder is incomplete until the end

    images, labels, queries = _render(
        seed, num_landmarks, images_per_landmark, distractors, queries_per_landmark, (width, height)
    )
    revisited = _revisited_gnd(seed, labels, queries)
    _write_jpegs(jpg_dir, images)
    files = [f"gnd_{name}.pkl"]
    _write_gnd(os.path.join(folder, files[0]), revisited)
    original_path = os.path.join(folder, f"gnd_{name}_original.pkl")
    if original_protocol:
        _write_gnd(original_path, _original_gnd(revisited, queries, num_landmarks))
        files.append(os.path.basename(original_path))
    elif os.path.exists(original_path):
        os.unlink(original_path)  # left by an earlier run

    write_complete_marker(
        folder,
        {
            "dataset": name,
            "synthetic": {
                "seed": seed,
                "num_landmarks": num_landmarks,
                "images_per_landmark": images_per_landmark,
                "distractors": distractors,
                "queries_per_landmark": queries_per_landmark,
                "image_size": [width, height],
            },
            "files": {
                f: {
                    "size": os.path.getsize(os.path.join(folder, f)),
                    "sha256": file_sha256(os.path.join(folder, f)),
                }
                for f in files
            },
            "num_images": len(revisited["imlist"]),
            "num_queries": len(revisited["qimlist"]),
        },
    )
    return folder
