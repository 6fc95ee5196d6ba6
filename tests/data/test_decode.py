"""Decoding in bounded memory (issue 24 item 2): the strip pipeline of `load_resized` gives the
full-resolution path's pixels exactly, its peak memory is the decoded file plus a strip, and
JPEG draft decoding costs memory of the model's input size."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from png_bytes import raw_png

from cbir_tf.data import decode

ROOT = __file__.rsplit("/tests/", 1)[0]
ORIENTATIONS = range(1, 9)


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """A random image of `mode` (values that exercise each colour rule)."""
    rng = np.random.default_rng(seed)
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), np.uint8), mode)
    if mode in ("L", "P", "LA"):
        img = Image.fromarray(rng.integers(0, 256, (height, width), np.uint8))
        if mode == "LA":
            img = img.convert("LA")
            img.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), np.uint8)))
        return img.convert("P") if mode == "P" else img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), np.uint16))
    if mode == "I":  # values past 0..65535: min-max stretched over the whole image
        return Image.fromarray(rng.integers(-5000, 300_000, (height, width)).astype(np.int32))
    values = rng.normal(0, 3, (height, width)).astype(np.float32)  # F, stretched too
    values[0, 0] = np.nan
    return Image.fromarray(values)


# (mode, format): every colour rule of decode._to_rgb, saved where its orientation tag is read.
CASES = [
    ("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"),
    ("L", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"),
]  # fmt: skip


@pytest.mark.parametrize("mode,fmt", CASES)
def test_strips_give_the_full_resolution_pixels(tmp_path, monkeypatch, mode, fmt):
    # Strips of ~3 rows (with odd reduction factors and a partial last block) against the
    # full-resolution path: load_image, then resize_longest (PIL's thumbnail).
    monkeypatch.setattr(decode, "STRIP_PIXELS", 1000)
    for shape_seed, (w, h) in enumerate([(301, 157), (64, 1000)]):
        img = _image(mode, w, h, shape_seed)
        for orientation in ORIENTATIONS:
            exif = Image.Exif()
            exif[0x0112] = orientation
            path = str(tmp_path / f"{orientation}_{w}.{fmt.lower()}")
            extra = {"transparency": 7} if mode == "P" else {}
            img.save(path, fmt, exif=exif, **extra)
            for size, bbox in [(50, None), (77, None), (120, (10.4, 3, 60.6, 150))]:
                full = decode.load_image(path, bbox)
                reference = decode.resize_longest(full, size, max(w, h) if bbox else None)
                got = decode.load_resized(path, size, bbox)
                assert got.shape == reference.shape, (orientation, size, bbox)
                np.testing.assert_array_equal(got, reference, err_msg=f"{orientation} {size}")


def _peak_mib(setup: str, code: str) -> tuple[float, float]:
    """(resident MiB before `code`, peak resident MiB while it ran) in a fresh interpreter."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {root!r})
        from cbir_tf.data import decode
        from PIL import Image
        import numpy as np

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))

        {setup}
        with open("/proc/self/clear_refs", "w") as f:  # the peak from here on
            f.write("5")
        before = status("VmRSS:")
        {code}
        print(before, status("VmHWM:"))
        """
    ).format(root=ROOT, setup=setup, code=code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, peak = (float(v) for v in out.stdout.split())
    return before, peak


def _flat_png(path, width: int, height: int, bit_depth: int, color_type: int, channels: int):
    """A large PNG of a gradient row repeated (PNG filter Up): a few hundred KB on disk."""
    first = b"\x00" + bytes(i % 251 for i in range(width * channels * bit_depth // 8))
    up = b"\x02" + b"\x00" * (len(first) - 1)
    rows = (first if i == 0 else up for i in range(height))
    path.write_bytes(raw_png(width, height, bit_depth, color_type, rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_memory_is_the_decoded_file_plus_a_strip(tmp_path):
    # A 5000 x 5000 RGBA PNG (PIL holds 95 MiB decoded) and a 16-bit one (48 MiB): the old path
    # made ~5 full-resolution copies (RGBA composite, RGB, thumbnail copy; uint32 arrays).
    side = 5000
    rgba = _flat_png(tmp_path / "rgba.png", side, side, 8, 6, 4)
    gray16 = _flat_png(tmp_path / "gray16.png", side, side, 16, 0, 1)
    decoded = {rgba: 4 * side * side / 2**20, gray16: 2 * side * side / 2**20}
    for path, mib in decoded.items():
        before, peak = _peak_mib("", f"decode.load_resized({path!r}, 224)")
        assert peak - before < mib + 64, f"{path}: {peak - before:.0f} MiB for {mib:.0f} decoded"


def _photo_jpeg(path, width: int, height: int, orientation: int = 1) -> str:
    """A smooth, photo-like JPEG (a real photo's pixels would do as well)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [
            127 + 120 * np.sin(x / 37.0) * np.cos(y / 53.0),
            127 + 120 * np.cos((x + y) / 71.0),
            127 + 100 * np.sin(np.hypot(x - width / 3, y - height / 2) / 29.0),
        ],
        axis=-1,
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=92, exif=exif)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_jpeg_draft_costs_memory_of_the_model_input_not_of_the_photo(tmp_path):
    path = _photo_jpeg(tmp_path / "large.jpg", 6000, 4000)
    full_mib = 4 * 6000 * 4000 / 2**20  # PIL holds RGB in 4 bytes a pixel: 92 MiB
    before, peak = _peak_mib("", f"decode.load_resized({path!r}, 224, draft=True)")
    assert peak - before < full_mib / 4, f"{peak - before:.0f} MiB with draft"
    # The same size as the full decode's and nearly the same pixels (a different first step).
    for orientation in (1, 6, 3):
        path = _photo_jpeg(tmp_path / f"o{orientation}.jpg", 3000, 2000, orientation)
        exact = decode.load_resized(path, 224)
        drafted = decode.load_resized(path, 224, draft=True)
        assert drafted.shape == exact.shape
        diff = np.abs(drafted.astype(np.int16) - exact)
        assert diff.mean() < 1.0 and diff.max() <= 8, (orientation, diff.mean(), diff.max())
    # Below twice the target no DCT scale applies: the pixels are the full decode's.
    small = _photo_jpeg(tmp_path / "small.jpg", 400, 300)
    np.testing.assert_array_equal(
        decode.load_resized(small, 224, draft=True), decode.load_resized(small, 224)
    )


def test_peek_size_reads_the_header_only():
    side = 9000  # 81 M pixels, never decoded
    data = raw_png(side, side, 1, 0, [b"\x00" * (1 + side // 8)])  # one row of data: truncated
    assert decode.peek_size(data) == (side, side)
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "JPEG")
    assert decode.peek_size(buf.getvalue()) == (7, 5)
    assert decode.peek_size(b"not an image") is None
    assert decode.peek_size(b"") is None
