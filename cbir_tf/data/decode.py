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
  * **Memory** of `load_resized` is bounded by the decoded file plus a strip, not by the copies
    the colour rules and the resize would make of a full-resolution image (a 9400 x 9400 RGBA
    PNG took 1.35 GB that way): the decoded image is turned into RGB and reduced strip by strip
    of `STRIP_PIXELS` (each strip cropped, oriented, made RGB and `Image.reduce`d on its own,
    its rows a multiple of the reduction factor), then resampled as `Image.thumbnail` does. The
    pixels are exactly those of the full-resolution path: `reduce` averages disjoint blocks, and
    the colour rules are per pixel (32-bit and float images take their value range from a first
    pass). PIL cannot decode a PNG, GIF, WebP, TIFF or BMP to fewer pixels than it holds, so for
    those the decoded file itself (4 bytes a pixel, at most `max_pixels` pixels) is the bound.
  * **JPEG draft** (`draft=True`, whole images only): the decoder's DCT scaling (1/2, 1/4, 1/8)
    decodes to the smallest scale that keeps twice the target size, as `Image.thumbnail` does on
    a file it opens itself: memory and time then scale with the model's input size, not the
    photo's. The pixels differ slightly from a full decode's (a different first reduction), so
    extraction never uses it; the service uses it for large uploads and for thumbnails.
"""

from __future__ import annotations

import functools
import io
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
    "peek_size",
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
_INVERSE_TRANSPOSE = {
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pixels per strip of `load_resized` (the colour rules make ~5 copies of a strip, 4 bytes a
# pixel: ~40 MB at most, against ~5 copies of the whole image before).
STRIP_PIXELS = 1 << 21
# PIL's LANCZOS support (Image._filters_support), which `Image.resize` widens its reduce box by.
_LANCZOS_SUPPORT = 3.0
_REDUCING_GAP = 2.0  # Image.thumbnail's default: reduce by integers, then resample >= 2x
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


def _value_range(arr: np.ndarray) -> tuple[float, float]:
    """(min, max) of an image's values, non-finite ones counted as 0 (the scaling's range)."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    return (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)


def _scale_to_uint8(
    arr: np.ndarray, mode: str, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Maps a 16-bit / 32-bit integer / float grayscale array to uint8 without clipping.

    `value_range` is the whole image's (min, max) when `arr` is one strip of it.
    """
    if mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    lo, hi = _value_range(arr) if value_range is None else value_range
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = arr * (255.0 / 65535.0)
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(
    img: Image.Image, path: str, value_range: tuple[float, float] | None = None
) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(img), mode, value_range)
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


def _open_decoded(
    path: str, max_pixels: int | None, draft_side: int | None = None
) -> tuple[Image.Image, int, tuple[int, int], tuple[float, float, float, float] | None]:
    """Decodes `path` (checked first from its header) in its stored frame.

    Args:
      path: the file.
      max_pixels: see `load_image`.
      draft_side: JPEG only: decode at the smallest DCT scale that keeps this many pixels on
        both sides (`Image.draft`); None decodes every pixel.

    Returns:
      (the decoded image, its EXIF orientation, the file's (width, height), the box of the
      drafted image that the full image covers (`Image.draft`'s; None when not drafted)).
    """
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
        drafted = None
        if draft_side is not None:
            # Only JPEG files answer (others return None); the box is of the scaled image.
            res = img.draft(None, (draft_side, draft_side))
            drafted = res[1] if res is not None and img.size != (width, height) else None
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
    return img, orientation, (width, height), drafted


def _open_rgb(
    path: str | os.PathLike, bbox: BoxLike | None, max_pixels: int | None
) -> tuple[Image.Image, int]:
    """Decodes `path` to an upright RGB PIL image; returns it and the full image's longest side."""
    path = os.fspath(path)
    img, orientation, _, _ = _open_decoded(path, max_pixels)
    return upright_rgb(img, bbox, path, orientation)


def peek_size(data: bytes) -> tuple[int, int] | None:
    """An image file's (width, height) from its header, nothing decoded; None if unreadable.

    Args:
      data: the file's bytes (an upload).
    """
    try:
        with Image.open(io.BytesIO(data), formats=_available_formats()) as img:
            return img.size
    except Exception:  # not an image, a bomb PIL refuses itself, ...: the decode will say
        return None


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
    *,
    draft: bool = False,
) -> np.ndarray:
    """`load_image` followed by `resize_longest` (a crop scaled like its full image).

    The same pixels, in bounded memory: the full-resolution image is made RGB and reduced strip
    by strip (see the module doc).

    Args:
      path, bbox, max_pixels: as `load_image`.
      image_size: longest side of the full image after resizing; None or 0 keeps the size.
      draft: JPEG files without a bbox: decode at a reduced DCT scale that keeps at least twice
        `image_size` (bounded memory and time; slightly different pixels, see the module doc).

    Returns:
      uint8 [H, W, 3].
    """
    path = os.fspath(path)
    if not image_size:
        img, _ = _open_rgb(path, bbox, max_pixels)
        return np.asarray(img, dtype=np.uint8)
    size = int(image_size)
    draft_side = int(size * _REDUCING_GAP) if draft and bbox is None else None
    img, orientation, full_size, drafted = _open_decoded(path, max_pixels, draft_side)
    width, height = img.size
    region = (0, 0, width, height) if bbox is None else _crop_box(bbox, width, height, path)
    shown = (region[2] - region[0], region[3] - region[1]) if drafted is None else full_size
    # As `_thumbnail`: a crop is scaled by the factor that brings its full image to `size`.
    target = size if bbox is None else size * max(shown) / max(full_size)
    side = max(1, math.floor(target))
    if max(shown) <= side:  # never enlarged
        return np.asarray(upright_rgb(img, bbox, path, orientation)[0], dtype=np.uint8)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method in _SWAPS_SIDES:
        shown = shown[::-1]
    out = _reduce_and_resample(img, region, method, drafted, _fit(*shown, side), path)
    return np.asarray(out, dtype=np.uint8)


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """The size `Image.thumbnail((side, side))` gives a larger width x height image."""

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    aspect = width / height
    if width <= height:
        return round_aspect(side * aspect, key=lambda n: abs(aspect - n / side)), side
    return side, round_aspect(side / aspect, key=lambda n: 0 if n == 0 else abs(aspect - side / n))


def _transpose_box(
    box: tuple[float, float, float, float], size: tuple[int, int], method: Image.Transpose | None
) -> tuple[float, float, float, float]:
    """`box` of an image of `size` (w, h), in the frame of that image transposed by `method`."""
    w, h = size
    x0, y0, x1, y1 = box
    t = Image.Transpose
    return {
        None: (x0, y0, x1, y1),
        t.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1),
        t.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
        t.ROTATE_180: (w - x1, h - y1, w - x0, h - y0),
        t.TRANSPOSE: (y0, x0, y1, x1),
        t.ROTATE_90: (y0, w - x1, y1, w - x0),  # counter-clockwise
        t.ROTATE_270: (h - y1, x0, h - y0, x1),
        t.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0),
    }[method]


def _region_range(img: Image.Image, region: tuple[int, int, int, int]) -> tuple[float, float]:
    """`_value_range` of a 32-bit or float image's region, read strip by strip."""
    x0, y0, x1, y1 = region
    rows = max(1, STRIP_PIXELS // max(1, x1 - x0))
    lo, hi = math.inf, -math.inf
    for r0 in range(y0, y1, rows):
        a, b = _value_range(np.asarray(img.crop((x0, r0, x1, min(r0 + rows, y1)))))
        lo, hi = min(lo, a), max(hi, b)
    return lo, hi


def _reduce_and_resample(
    img: Image.Image,
    region: tuple[int, int, int, int],
    method: Image.Transpose | None,
    drafted: tuple[float, float, float, float] | None,
    final: tuple[int, int],
    name: str,
) -> Image.Image:
    """`region` of `img`, oriented by `method` and made RGB, thumbnailed to `final`.

    What `Image.thumbnail(..., LANCZOS)` does to the oriented RGB region (`Image.resize` with
    reducing_gap 2: an integer `reduce` over the box the filter reads, then LANCZOS over the
    source box), with the region's rows made RGB and reduced one strip at a time.
    """
    stored = (region[2] - region[0], region[3] - region[1])
    ow, oh = stored[::-1] if method in _SWAPS_SIDES else stored
    # The part of the oriented (drafted) image the full image covers: all of it, unless the
    # DCT scale left a fraction of a pixel past the edge.
    source = (0.0, 0.0, float(ow), float(oh))
    if drafted is not None:
        source = _transpose_box(drafted, stored, method)
    bx0, by0, bx1, by1 = source
    fx = int((bx1 - bx0) / final[0] / _REDUCING_GAP) or 1
    fy = int((by1 - by0) / final[1] / _REDUCING_GAP) or 1
    x0, y0, x1, y1 = 0, 0, ow, oh
    if fx > 1 or fy > 1:  # Image._get_safe_box: the pixels the filter reads
        sx = (_LANCZOS_SUPPORT - 0.5) * (bx1 - bx0) / final[0]
        sy = (_LANCZOS_SUPPORT - 0.5) * (by1 - by0) / final[1]
        x0, y0 = max(0, int(bx0 - sx)), max(0, int(by0 - sy))
        x1, y1 = min(ow, math.ceil(bx1 + sx)), min(oh, math.ceil(by1 + sy))
    value_range = _region_range(img, region) if img.mode in ("I", "F") else None
    inverse = _INVERSE_TRANSPOSE.get(method, method)
    rows = max(fy, STRIP_PIXELS // max(1, x1 - x0) // fy * fy)  # whole blocks per strip
    offset = (region[0], region[1]) * 2
    reduced = Image.new("RGB", (-(-(x1 - x0) // fx), -(-(y1 - y0) // fy)))
    for r0 in range(y0, y1, rows):
        part = _transpose_box((x0, r0, x1, min(r0 + rows, y1)), (ow, oh), inverse)
        strip = img.crop(tuple(int(v) + o for v, o in zip(part, offset, strict=True)))
        if method is not None:
            strip = strip.transpose(method)
        strip = _to_rgb(strip, name, value_range)
        if (fx, fy) != (1, 1):
            strip = strip.reduce((fx, fy))
        reduced.paste(strip, (0, (r0 - y0) // fy))
    box = ((bx0 - x0) / fx, (by0 - y0) / fy, (bx1 - x0) / fx, (by1 - y0) / fy)
    return reduced.resize(final, Image.Resampling.LANCZOS, box=box)
