"""Image loading for descriptor extraction: robust decoding with PIL, in threads or tf.data.

Every image goes through `load_image`, which either returns an RGB uint8 array or raises
`ImageError(path, reason)`; `iter_images` (threads, what descriptor extraction uses) and
`image_dataset` (tf.data) turn those errors into strings so that a run over a large collection
skips and counts broken files instead of stopping.

Decisions (and why):
  * **Formats**: only the raster formats of photo collections are opened (`ALLOWED_FORMATS`:
    JPEG (MPO included), PNG, BMP, GIF, WebP, TIFF, PPM/PGM/PBM). PIL would otherwise hand an
    EPS file named `.jpg` to Ghostscript, i.e. run an external interpreter on a downloaded file.
  * **Decompression bombs** are refused from the size in the file header, before any pixel is
    decoded (`Image.open` only reads the header): images above `max_pixels` (default
    `DEFAULT_MAX_PIXELS` = 89 478 485, PIL's own warning threshold, about 9459 x 9459, i.e.
    ~268 MB as RGB) raise `ImageError`. PIL's hard limit (`Image.MAX_IMAGE_PIXELS` x 2) still
    applies when a larger `max_pixels` is passed.
  * **Truncated or corrupt data** is refused rather than padded with grey: the pixels are
    decoded eagerly with `.load()`, which raises on a short file as long as PIL's global
    `ImageFile.LOAD_TRUNCATED_IMAGES` keeps its default False (a process that sets it True opts
    into padding, and this module leaves that choice alone).
  * **EXIF orientation** is applied, so a photo rotated by its camera tag gives the same pixels
    as the upright photo.
  * **Query boxes** `(x1, y1, x2, y2)` are in the *stored* pixel frame, before the EXIF rotation:
    that is the frame of the Revisited Oxford/Paris annotations and of the reference loader
    (cnnimageretrieval-pytorch crops `Image.open(path).convert('RGB')`, which ignores EXIF). The
    crop is rounded as PIL's `Image.crop` rounds a float box (Python `round` of each coordinate),
    then clipped to the image (the reference would pad out-of-image parts with black), and the
    EXIF rotation is applied to the crop.
  * **Colour**: grayscale, palette, CMYK, YCbCr become RGB through PIL. Transparent pixels
    (RGBA, LA, PA, a transparent palette index or PNG tRNS colour) are composited on **white**:
    their stored colour is arbitrary (often black), and white is what a viewer shows on a page.
    16-bit grayscale (`I;16`) is scaled with v * 255 / 65535 (65535 -> 255), not clipped as a
    plain conversion would; 32-bit integer (`I`) and float (`F`) images are scaled the same way
    when their values fit 0..65535 / 0..1, kept when they fit 0..255, and min-max stretched
    otherwise. PIL decodes 16-bit RGB PNGs to 8 bits itself (high byte). Animated GIFs give
    their first frame.
  * **Resizing** (`resize_longest`) only shrinks, exactly as the reference: `PIL.Image.thumbnail`
    with LANCZOS into a square of the target size; a query crop is scaled by the same factor as
    its full image (`size * crop_longest / full_longest`), as cnnimageretrieval-pytorch does.
    Sides never reach 0 (an 8 x 4000 image becomes 1 x 224 at size 224).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "image_dataset",
    "iter_images",
    "load_image",
    "load_resized",
    "make_load_fn",
    "resize_longest",
]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default, ~9459 x 9459
# PIL's JPEG plugin also opens multi-picture (MPO) camera files; WEBP needs PIL built with libwebp.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")

# EXIF orientation tag (0x0112) -> the transpose that makes the image upright; the same table
# as PIL.ImageOps.exif_transpose.
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_BoxLike = Sequence[float] | np.ndarray


@functools.cache
def _available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


class ImageError(Exception):
    """An image that cannot be used, with the reason.

    Attributes:
      path: the file.
      reason: short human-readable cause (what a run's summary of skipped images shows).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def _orientation(img: Image.Image) -> int:
    # A broken EXIF block should not cost the image: its pixels are fine, keep them as stored.
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in _ORIENTATION_TRANSPOSE else 1
    except Exception:
        return 1


def _crop_box(bbox: _BoxLike, width: int, height: int, path: str) -> tuple[int, int, int, int]:
    try:
        values = [float(v) for v in np.asarray(bbox, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        raise ImageError(path, f"invalid bbox {bbox!r}: expected 4 numbers") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ImageError(path, f"invalid bbox {bbox!r}: expected 4 finite numbers x1, y1, x2, y2")
    # PIL's Image.crop rounds a float box with Python's round(); the reference crops that way.
    x1, y1, x2, y2 = (round(v) for v in values)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        raise ImageError(path, f"bbox {tuple(values)} is empty inside the {width}x{height} image")
    return x1, y1, x2, y2


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Maps a 16-bit / 32-bit integer / float grayscale array to uint8 without clipping."""
    if mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = arr * (255.0 / 65535.0)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        # A transparent palette index / grey level / colour (PNG tRNS, GIF).
        img = img.convert("RGBA")
    elif mode in _ALPHA_MODES and mode != "RGBA":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(path, f"unsupported colour mode {mode}: {e}") from None
    return img


def _open_rgb(
    path: str | os.PathLike, bbox: _BoxLike | None, max_pixels: int | None
) -> tuple[Image.Image, int]:
    """Decodes `path` to an upright RGB PIL image; returns it and the full image's longest side."""
    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise ImageError(path, "is a folder, not an image file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        # We own the file object, so PIL keeps the decoded pixels after it is closed (closing an
        # image PIL opened itself would free them).
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    with f:
        try:
            # Lazy: reads the header only, so the size check below happens before decoding.
            img = Image.open(f, formats=_available_formats())
        except Image.DecompressionBombError as e:
            raise ImageError(path, f"decompression bomb refused: {e}") from None
        except UnidentifiedImageError:
            raise ImageError(
                path, f"not an image, or not one of the formats {', '.join(ALLOWED_FORMATS)}"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(path, f"corrupt image header: {type(e).__name__}: {e}") from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(path, f"invalid image size {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                path,
                f"decompression bomb refused: {width}x{height} = {width * height} pixels "
                f"exceeds max_pixels={max_pixels}",
            )
        orientation = _orientation(img)
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageError(path, f"decompression bomb refused: {e}") from None
        except MemoryError:
            raise ImageError(path, f"out of memory decoding {width}x{height} pixels") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, ValueError, ...
            raise ImageError(
                path, f"truncated or corrupt image data: {type(e).__name__}: {e}"
            ) from None
    return upright_rgb(img, bbox, path, orientation)


def upright_rgb(
    img: Image.Image,
    bbox: _BoxLike | None = None,
    name: str = "<in-memory image>",
    orientation: int | None = None,
) -> tuple[Image.Image, int]:
    """A decoded image as files are delivered: cropped, EXIF-oriented, RGB (see module doc).

    Args:
      img: a decoded PIL image (a file's, or one given in memory).
      bbox: optional crop (x1, y1, x2, y2) in the stored pixel frame.
      name: what error messages call the image.
      orientation: its EXIF orientation if already read (default: read from `img`).

    Returns:
      (RGB PIL image, longest side of the full image before cropping).

    Raises:
      ImageError: an empty or invalid bbox, or a colour mode that cannot become RGB.
    """
    width, height = img.size
    if orientation is None:
        orientation = _orientation(img)
    if bbox is not None:
        img = img.crop(_crop_box(bbox, width, height, name))
    if orientation != 1:
        img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return _to_rgb(img, name), max(width, height)


def load_image(
    path: str | os.PathLike,
    bbox: _BoxLike | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Reads an image file as upright RGB pixels.

    Args:
      path: image file.
      bbox: optional crop (x1, y1, x2, y2), floats, in the stored pixel frame (see module doc).
      max_pixels: refuse images with more pixels than this, from the header, before decoding;
        None disables this check (PIL's own limit still applies).

    Returns:
      uint8 [H, W, 3], RGB.

    Raises:
      ImageError: missing, empty, unreadable, truncated, unsupported or oversized image, or an
        empty/invalid bbox.
    """
    img, _ = _open_rgb(path, bbox, max_pixels)
    return np.asarray(img, dtype=np.uint8)


def _thumbnail(img: Image.Image, size: int, reference_longest: int | None) -> Image.Image:
    longest = max(img.size)
    target = size if reference_longest is None else size * longest / reference_longest
    box = max(1, math.floor(target))
    if longest <= box:  # thumbnail never enlarges
        return img
    img = img.copy()
    img.thumbnail((box, box), Image.Resampling.LANCZOS)
    return img


def resize_longest(
    image: np.ndarray, size: int, reference_longest: int | None = None
) -> np.ndarray:
    """Shrinks an image so that its longest side is `size` (never enlarges), as the reference.

    Args:
      image: uint8 [H, W, 3].
      size: target longest side in pixels (>= 1).
      reference_longest: for a query crop, the longest side of its full image: the crop is then
        scaled by the factor that brings the full image to `size` (cnnimageretrieval-pytorch).

    Returns:
      uint8 [h, w, 3] with max(h, w) = size (or the input when already small enough); h, w >= 1.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    out = _thumbnail(Image.fromarray(image, mode="RGB"), size, reference_longest)
    return np.asarray(out, dtype=np.uint8)


def load_resized(
    path: str | os.PathLike,
    image_size: int | None,
    bbox: _BoxLike | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """`load_image` followed by `resize_longest` (a crop scaled like its full image).

    Args:
      path, bbox, max_pixels: as `load_image`.
      image_size: longest side of the full image after resizing; None or 0 keeps the size.

    Returns:
      uint8 [H, W, 3].
    """
    img, full_longest = _open_rgb(path, bbox, max_pixels)
    if image_size:
        img = _thumbnail(img, int(image_size), full_longest if bbox is not None else None)
    return np.asarray(img, dtype=np.uint8)


def _normalize_bboxes(bboxes: Any, n: int) -> list[Any] | None:
    if bboxes is None:
        return None
    boxes = list(bboxes)
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} bboxes for {n} images")
    return [None if b is None else np.asarray(b, dtype=np.float64) for b in boxes]


def _load_or_reason(
    path: str, image_size: int | None, bbox: Any, max_pixels: int | None
) -> tuple[np.ndarray | None, str]:
    """`load_resized`, with any failure turned into (None, reason) instead of raised."""
    try:
        return load_resized(path, image_size, bbox, max_pixels), ""
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # one bad file must never stop a run over a whole collection
        return None, f"unexpected {type(e).__name__}: {e}"


def make_load_fn(
    paths: Sequence[str | os.PathLike],
    image_size: int | None,
    bboxes: Sequence[_BoxLike | None] | np.ndarray | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Callable[[Any], dict[str, Any]]:
    """The tf.data map function of `image_dataset`: index -> decoded image or error string.

    Works eagerly (`fn(tf.constant(3, tf.int64))`) and inside `Dataset.map`.

    Args:
      paths: N image files.
      image_size: longest side after resizing (None/0: no resizing).
      bboxes: None, or N boxes (x1, y1, x2, y2) / None entries.
      max_pixels: as `load_image`.

    Returns:
      fn(index int64 scalar tensor) -> {'index': int64 [], 'image': uint8 [H, W, 3] ([0, 0, 3]
      when the image failed), 'error': string [] ('' when ok, else the reason)}.
    """
    import tensorflow as tf

    paths = [os.fspath(p) for p in paths]
    boxes = _normalize_bboxes(bboxes, len(paths))
    empty = np.zeros((0, 0, 3), np.uint8)

    def load(index: tf.Tensor) -> tuple[np.ndarray, bytes]:
        i = int(index.numpy())
        box = None if boxes is None else boxes[i]
        image, reason = _load_or_reason(paths[i], image_size, box, max_pixels)
        return (empty, reason.encode("utf-8", "replace")) if image is None else (image, b"")

    def fn(index: Any) -> dict[str, Any]:
        index = tf.cast(index, tf.int64)
        image, error = tf.py_function(load, [index], Tout=[tf.uint8, tf.string])
        image.set_shape([None, None, 3])
        error.set_shape([])
        return {"index": index, "image": image, "error": error}

    return fn


# How decoding threads lower their priority (Linux): a nice increment (19: the lowest priority of
# the normal policy), "idle" the SCHED_IDLE policy, 0 nothing. See `iter_images`. Measured on 2
# cores, EfficientNetB1 at 512: nice 19 fills the cores the network leaves idle better than
# SCHED_IDLE (which gets fewer of those moments) or nice 10 (which slows the network more).
DECODE_PRIORITY: str | int = 19
_MAX_DEFAULT_THREADS = 4
_FIRST_PATIENCE_S = 0.25  # how long the consumer first waits for a worker's image (no timings yet)
_CLOSE_WAIT_S = 2.0  # how long closing waits for the workers to finish their current image


def _default_num_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT_THREADS, cores))


def _lower_thread_priority(priority: str | int) -> None:
    """Lowers the calling thread's CPU priority (Linux only; elsewhere a no-op).

    On Linux scheduling policy and nice value belong to each thread, addressed by its thread id;
    elsewhere a thread id is no process id, hence the platform check.
    """
    if not priority or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if priority == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        else:
            nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(priority))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError, ValueError):
        pass


class _DecodeAhead:
    """Decodes items 0..n-1 in worker threads, at most `depth` ahead of the consumer, in order.

    `get(i)` must be called for i = 0, 1, ... in turn. An item no worker has started yet is
    decoded by the consumer itself; an item a worker has held for much longer than decoding takes
    (a low-priority thread starved by other processes) is decoded again by the consumer, whose
    result is kept, and until the workers are ahead again the consumer does not wait for them.
    The consumer thread runs at normal priority, so a machine busy with other work can slow the
    decoding down to the serial rate but never starve it.
    """

    def __init__(
        self, load: Callable[[int], Any], n: int, num_threads: int, depth: int, priority: Any
    ):
        self._load = load
        self._n = n
        self._depth = max(1, depth)
        self._priority = priority
        self._cond = threading.Condition()
        self._next = 0  # first item nobody has claimed
        self._wanted = 0  # the item the consumer asks for next
        self._done: dict[int, Any] = {}
        self._cpu_s: list[float] = []  # decode CPU time of recent items (workers)
        self._closed = False
        self._starved = False  # workers fell behind: take items over without waiting
        self._threads = [
            threading.Thread(target=self._work, name=f"cbir-decode-{k}", daemon=True)
            for k in range(num_threads)
        ]
        for t in self._threads:
            t.start()

    def _safe_load(self, i: int) -> Any:
        try:
            return self._load(i)
        except BaseException as e:  # a worker must always hand its item back
            return None, f"unexpected {type(e).__name__}: {e}"

    def _work(self) -> None:
        _lower_thread_priority(self._priority)
        while True:
            with self._cond:
                while not self._closed and self._wanted + self._depth <= self._next < self._n:
                    self._cond.wait()
                if self._closed or self._next >= self._n:
                    return
                i = self._next
                self._next += 1
            cpu = time.thread_time()
            result = self._safe_load(i)
            cpu = time.thread_time() - cpu
            with self._cond:
                if i >= self._wanted and not self._closed:  # else the consumer did it itself
                    self._done[i] = result
                self._cpu_s = self._cpu_s[-31:] + [cpu]
                self._cond.notify_all()

    def _patience(self) -> float:
        if not self._cpu_s:
            return _FIRST_PATIENCE_S
        return 0.005 + 4.0 * statistics.median(self._cpu_s)

    def get(self, i: int) -> Any:
        with self._cond:
            if i in self._done:
                self._starved = False  # the workers are ahead again
            waited = 0.0
            while i not in self._done:
                if self._next == i:  # nobody started it: decode it here
                    self._next += 1
                    break
                patience = 0.0 if self._starved else self._patience()
                if waited >= patience:  # its worker is starved: decode it here too
                    self._starved = True
                    break
                start = time.perf_counter()
                self._cond.wait(patience - waited)
                waited += time.perf_counter() - start
            if i in self._done:
                self._wanted = i + 1
                self._cond.notify_all()
                return self._done.pop(i)
        result = self._safe_load(i)
        with self._cond:
            self._done.pop(i, None)  # a worker that finished meanwhile
            self._wanted = i + 1
            self._cond.notify_all()
        return result

    def close(self) -> None:
        """Stops the workers; waits for them briefly (a starved one exits when it gets the CPU)."""
        with self._cond:
            self._closed = True
            self._done.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + _CLOSE_WAIT_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


def iter_images(
    paths: Sequence[str | os.PathLike],
    image_size: int | None,
    bboxes: Sequence[_BoxLike | None] | np.ndarray | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    low_priority: bool = True,
    transform: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[int, Any, str]]:
    """Decodes images ahead in Python threads, in order, with bounded memory (no TensorFlow).

    This is what descriptor extraction reads images with. PIL releases the GIL while it decodes
    and resizes, so the threads overlap the network's forward pass; with `low_priority` (Linux)
    they run at the lowest priority (`DECODE_PRIORITY`), i.e. mostly in the moments the network
    leaves a core idle, and they give way as soon as a network thread wants the core back, so
    decoding hardly slows the network down. The calling thread, at normal priority, decodes an
    image itself when no worker has started it, or when a worker is starved (other processes
    keep every core busy), so decoding never falls below the serial rate. Leaving a loop over
    the iterator early, or closing it, stops and joins the threads.

    Args:
      paths: N image files.
      image_size: longest side after resizing (None/0: original size); crops scaled like their
        full image (`load_resized`).
      bboxes: None, or N boxes (x1, y1, x2, y2) in the stored pixel frame / None entries.
      num_threads: decoding threads (default: the usable cores, at most 4); 0 decodes in the
        calling thread only.
      prefetch: images decoded ahead of the one being consumed, at most (default 2 per thread);
        bounds the memory held.
      max_pixels: as `load_image`.
      low_priority: lower the decoding threads' priority (see above).
      transform: optional function applied to each decoded image in the decoding thread (e.g.
        making the network's input tensor); an exception it raises becomes the image's error
        (an `ImageError`'s reason as it is).

    Returns:
      An iterator of N (index, uint8 [H, W, 3] image (or `transform` of it) or None, error: ''
      when ok, else the reason), in path order.
    """
    paths = [os.fspath(p) for p in paths]
    boxes = _normalize_bboxes(bboxes, len(paths))
    threads = _default_num_threads() if num_threads is None else int(num_threads)
    if threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    depth = 2 * max(1, threads) if prefetch is None else int(prefetch)
    if depth < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")

    def load(i: int) -> tuple[Any, str]:
        box = None if boxes is None else boxes[i]
        image, reason = _load_or_reason(paths[i], image_size, box, max_pixels)
        if image is None or transform is None:
            return image, reason
        try:
            return transform(image), ""
        except ImageError as e:
            return None, e.reason
        except Exception as e:
            return None, f"unexpected {type(e).__name__}: {e}"

    def generate() -> Iterator[tuple[int, Any, str]]:
        if not paths:
            return
        priority = DECODE_PRIORITY if low_priority else 0
        ahead = _DecodeAhead(load, len(paths), min(threads, len(paths)), depth, priority)
        try:
            for i in range(len(paths)):
                image, reason = ahead.get(i)
                yield i, image, reason
        finally:
            ahead.close()

    return generate()


def image_dataset(
    paths: Sequence[str | os.PathLike],
    image_size: int | None,
    bboxes: Sequence[_BoxLike | None] | np.ndarray | None = None,
    num_parallel_calls: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
):
    """Decodes images in parallel, in order, with prefetching; failures become error strings.

    Images are not batched: they differ in size, and padding them together would change their
    descriptors.

    Args:
      paths: N image files.
      image_size: longest side after resizing (None/0: original size); crops scaled like their
        full image.
      bboxes: None, or N boxes (x1, y1, x2, y2) in the stored pixel frame / None entries.
      num_parallel_calls: parallel decodes (None: tf.data.AUTOTUNE).
      max_pixels: as `load_image`.

    Returns:
      tf.data.Dataset of N dicts, in path order: {'index': int64 [], 'image': uint8 [H, W, 3]
      (empty [0, 0, 3] when failed), 'error': string [] ('' when ok, else the reason)}.
    """
    import tensorflow as tf

    fn = make_load_fn(paths, image_size, bboxes, max_pixels)
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else int(num_parallel_calls)
    ds = tf.data.Dataset.range(len(paths))
    ds = ds.map(fn, num_parallel_calls=parallel, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
