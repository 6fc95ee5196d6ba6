"""Query images described exactly as indexed images are: files, PIL images and arrays.

A query goes through the same loader as the collection's images (`cbir_tf.data.pipeline`:
EXIF orientation, crop to its box, colour, longest side to the index's image size) and the same
compiled function (`cbir_tf.describe.extract.extract`), so that a photo of the collection found
by its own file scores 1. In-memory queries (PIL images, arrays from a camera or an upload) are
converted the way the loader converts files: alpha composited on white, grayscale made RGB,
shrunk with the same `resize_longest`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbir_tf.describe.extract import extract


def describe_queries(
    model,
    queries: Sequence[Any],
    bboxes: Sequence[Sequence[float] | None] | None = None,
    *,
    image_size: int | None,
    scales: Sequence[float] = (1.0,),
    ms_power: float = 1.0,
) -> np.ndarray:
    """Descriptors of query images, computed exactly as `extract` describes indexed images.

    Files go through the same loader (`cbir_tf.data.pipeline`); in-memory images are converted
    the same way (EXIF orientation of PIL images, alpha on white) and shrunk with the same
    `resize_longest`.

    Args:
      model, image_size, scales, ms_power: as for `extract` (those the index was made with).
      queries: Q images: paths, PIL images or arrays [H, W], [H, W, 3|4] (uint8, or float
        in 0..255).
      bboxes: optional per-query crop boxes (x1, y1, x2, y2) in pixels, or None entries.

    Returns:
      float32 [Q, D].

    Raises:
      FileNotFoundError: a query file does not exist.
      ValueError: a query cannot be read (the message names it and says why).
    """
    queries = list(queries)
    boxes = list(bboxes) if bboxes is not None else [None] * len(queries)
    if len(boxes) != len(queries):
        raise ValueError(f"{len(boxes)} bboxes for {len(queries)} queries")
    files = [i for i, q in enumerate(queries) if isinstance(q, (str, os.PathLike))]
    arrays = [i for i in range(len(queries)) if i not in set(files)]
    out: list[np.ndarray | None] = [None] * len(queries)
    common = {"image_size": image_size, "scales": scales, "ms_power": ms_power, "progress": False}
    if files:
        paths = []
        for i in files:
            p = os.path.abspath(os.path.expanduser(os.fspath(queries[i])))
            if not os.path.isfile(p):
                raise FileNotFoundError(f"query image {p} does not exist")
            paths.append(p)
        file_boxes = [boxes[i] for i in files]
        res = extract(
            model,
            paths,
            ids=[str(i) for i in files],
            bboxes=file_boxes if any(b is not None for b in file_boxes) else None,
            **common,
        )
        _collect(res, queries, out)
    if arrays:
        images = [_prepare_array(queries[i], boxes[i], image_size) for i in arrays]
        res = extract(model, images, ids=[str(i) for i in arrays], **common)
        _collect(res, queries, out)
    return np.stack(out).astype(np.float32, copy=False)


def _collect(res: Any, queries: Sequence[Any], out: list) -> None:
    if res.skipped:
        qid, reason = res.skipped[0]
        what = queries[int(qid)]
        name = os.fspath(what) if isinstance(what, (str, os.PathLike)) else f"#{qid}"
        raise ValueError(f"query {name} cannot be read: {reason}")
    for image_id, vec in zip(res.ids, np.asarray(res.descriptors), strict=True):
        out[int(image_id)] = vec


def _prepare_array(image: Any, bbox: Sequence[float] | None, image_size: int | None):
    """An in-memory query as the file loader would deliver it: uint8 [h, w, 3], shrunk.

    PIL images: cropped to `bbox` in their stored frame, then EXIF-oriented (as files are).
    Transparent pixels are composited on white, grayscale becomes RGB, floats are clipped to
    0..255; the crop is scaled by the factor of its full image (`resize_longest`).
    """
    from PIL import Image

    from cbir_tf.data.decode import ImageError, resize_longest, upright_rgb

    if isinstance(image, Image.Image):
        img = image
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(
                f"a query array must be an image [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}"
            )
        if 0 in arr.shape:
            raise ValueError(f"a query array is empty: shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr)
    try:
        rgb, longest = upright_rgb(img, bbox, "query image")
    except ImageError as e:
        raise ValueError(f"query image: {e.reason}") from None
    rgb = np.asarray(rgb, dtype=np.uint8)
    if not image_size:
        return rgb
    return resize_longest(rgb, int(image_size), longest if bbox is not None else None)
