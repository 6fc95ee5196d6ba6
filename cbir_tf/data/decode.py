"""One image file to upright RGB pixels: safe PIL decoding, EXIF orientation, colour, crop, resize.

Every image goes through `load_image` / `load_resized`, which either return an RGB uint8 array
or raise `ImageError(path, reason)`; `cbir_tf.data.pipeline` runs them over many files (in
threads or tf.data) and turns those errors into strings, so that a run over a large collection
skips and counts broken files instead of stopping.

Files on another filesystem (`gs://...`, any scheme tf.io.gfile reads) are read whole through
tf.io.gfile (`cbir_tf.remote`; TensorFlow is imported only then) and decoded from those bytes by
the same code, with the same checks and reasons.

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
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "BoxLike",
    "ImageError",
    "load_image",
    "load_resized",
    "resize_longest",
    "upright_rgb",
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
BoxLike = Sequence[float] | np.ndarray


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


def _crop_box(bbox: BoxLike, width: int, height: int, path: str) -> tuple[int, int, int, int]:
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


def _open_file(path: str):
    """The image file opened for reading, after the checks whose reasons a skip reports."""
    if "://" in path:
        # Another filesystem (gs://, s3://, ram://, ...): its bytes, read through tf.io.gfile
        # (imported only then), and decoded below exactly as a local file's.
        from cbir_tf import remote

        if remote.is_remote(path):
            try:
                return remote.read_image_file(path)
            except remote.RemoteFileError as e:
                raise ImageError(path, e.reason) from None
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
        return open(path, "rb")
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None


def _open_rgb(
    path: str | os.PathLike, bbox: BoxLike | None, max_pixels: int | None
) -> tuple[Image.Image, int]:
    """Decodes `path` to an upright RGB PIL image; returns it and the full image's longest side."""
    path = os.fspath(path)
    f = _open_file(path)
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
    bbox: BoxLike | None = None,
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
    bbox: BoxLike | None = None,
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
    bbox: BoxLike | None = None,
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
