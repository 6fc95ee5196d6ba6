"""Image loading: a bad-image corpus, EXIF, crops, resizing, decoding threads and tf.data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFile
from png_bytes import bomb_png, raw_png

from cbir_tf.data import decode, pipeline
from cbir_tf.data.decode import ImageError, load_image, resize_longest
from cbir_tf.data.pipeline import image_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# Corpus generation
# ---------------------------------------------------------------------------------------------


def _pattern(height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """An asymmetric RGB image of constant 8x8 blocks: JPEG round trips of it and of its
    rotations decode to exactly rotated pixels (no block straddles an edge, no chroma
    subsampling), so EXIF tests can demand equality."""
    blocks = np.random.RandomState(seed).randint(0, 256, (height // 8, width // 8, 3))
    return np.kron(blocks.astype(np.uint8), np.ones((8, 8, 1), np.uint8))


def _save(img: Image.Image, path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


PALETTE = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250], [7, 7, 7]], np.uint8)
PALETTE_INDICES = np.random.RandomState(5).randint(0, 4, (10, 14)).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> path of every file of the bad-image corpus (issue 7 item 1)."""
    d = tmp_path_factory.mktemp("corpus")
    files = {}
    photo = _pattern(64, 96, seed=1)

    files["zero"] = str(d / "zero.jpg")
    open(files["zero"], "wb").close()

    good_jpeg = io.BytesIO()
    Image.fromarray(photo).save(good_jpeg, "JPEG", quality=90)
    files["truncated"] = str(d / "truncated.jpg")
    with open(files["truncated"], "wb") as f:
        f.write(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])

    files["random"] = str(d / "random.jpg")
    with open(files["random"], "wb") as f:
        f.write(np.random.RandomState(0).bytes(4096))

    files["text"] = str(d / "notes.jpg")
    with open(files["text"], "w") as f:
        f.write("this is a text file, not a photo\n" * 50)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # colour of transparent pixels is arbitrary: must not show
    rgba[:, :4, 3] = 255  # left half opaque
    rgba[:, 4:, 3] = 0  # right half transparent
    rgba[0, 0] = (200, 100, 0, 128)  # half transparent
    files["alpha"] = _save(Image.fromarray(rgba, "RGBA"), d / "alpha.png")

    gray16 = np.array([[0, 1000, 32768, 65535]], np.uint16)
    files["gray16"] = _save(Image.fromarray(gray16), d / "gray16.png")

    rgb16 = np.array([[[0, 257, 65535], [65535, 32896, 1]]], np.uint16)  # 1 x 2 x 3
    raw = b"".join(b"\x00" + r.astype(">u2").tobytes() for r in rgb16)
    files["rgb16"] = str(d / "rgb16.png")
    with open(files["rgb16"], "wb") as f:
        f.write(raw_png(2, 1, 16, 2, [raw]))

    files["gray"] = _save(Image.fromarray(photo[..., 0], "L"), d / "gray.png")
    files["cmyk"] = _save(Image.fromarray(photo).convert("CMYK"), d / "cmyk.jpg", quality=95)

    palette = Image.fromarray(PALETTE_INDICES, "P")
    palette.putpalette(PALETTE.reshape(-1).tolist())
    files["palette"] = _save(palette, d / "palette.gif")
    files["palette_transparent"] = _save(palette, d / "palette_t.png", transparency=2)

    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    files["animated"] = _save(
        frames[0], d / "animated.gif", save_all=True, append_images=frames[1:], duration=50
    )

    upright = _pattern(32, 48, seed=2)
    files["upright"] = _save(Image.fromarray(upright), d / "upright.jpg", quality=95, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright turned CCW
    files["exif6"] = _save(
        Image.fromarray(np.rot90(upright)),
        d / "exif6.jpg",
        quality=95,
        subsampling=0,
        exif=exif.tobytes(),
    )

    files["tiny"] = _save(Image.new("RGB", (1, 1), (12, 34, 56)), d / "tiny.png")
    files["tall"] = _save(Image.fromarray(np.full((4000, 8, 3), 77, np.uint8)), d / "tall.png")
    files["bmp"] = _save(Image.fromarray(photo), d / "photo.bmp")
    files["webp"] = _save(Image.fromarray(photo), d / "photo.webp", lossless=True)
    files["png"] = _save(Image.fromarray(photo), d / "photo.png")

    files["bomb"] = str(d / "bomb.png")
    with open(files["bomb"], "wb") as f:
        f.write(bomb_png())
    files["photo"] = photo
    files["upright_pixels"] = upright
    return files


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero", "empty file"),
        ("truncated", "truncated"),
        ("random", "not an image"),
        ("text", "not an image"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_files_raise_image_error_with_reason(corpus, name, reason):
    with pytest.raises(ImageError) as info:
        load_image(corpus[name])
    assert info.value.path == corpus[name]
    assert reason in info.value.reason
    assert corpus[name] in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_truncated_jpeg_is_refused_not_grey_padded(corpus):
    # PIL would pad the missing half with grey if LOAD_TRUNCATED_IMAGES were on; the default is
    # off and this module relies on it.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(corpus["truncated"])


def test_formats_outside_the_allow_list_are_refused(tmp_path):
    # An EPS file would be handed to Ghostscript by PIL; ICO is harmless but not a photo format.
    path = tmp_path / "icon.jpg"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path, format="ICO")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)
    eps = tmp_path / "doc.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(eps)


def test_alpha_is_composited_on_white(corpus):
    img = load_image(corpus["alpha"])
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[1:, :4], np.broadcast_to([10, 20, 30], (7, 4, 3)))
    np.testing.assert_array_equal(img[:, 4:], np.full((8, 4, 3), 255))
    # alpha 128: 200*128/255 + 255*127/255 = 227.4..; 100 -> 177.2..; 0 -> 127.0..
    np.testing.assert_allclose(img[0, 0], [227, 177, 127], atol=1)


def test_16bit_grayscale_is_scaled_not_clipped(corpus):
    assert Image.open(corpus["gray16"]).mode.startswith("I;16")
    img = load_image(corpus["gray16"])
    # v * 255 / 65535 rounded: 1000 -> 3.89 -> 4 (clipping would give 255), 32768 -> 128
    np.testing.assert_array_equal(img[0, :, 0], [0, 4, 128, 255])
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()


def test_16bit_rgb_png(corpus):
    img = load_image(corpus["rgb16"])
    expected = np.array([[[0, 257, 65535], [65535, 32896, 1]]]) / 257.0
    assert img.shape == (1, 2, 3)
    np.testing.assert_allclose(img, expected, atol=1.0)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I", [0, 1000, 65535], [0, 4, 255]),  # 16-bit data in a 32-bit image
        ("I", [0, 100, 255], [0, 100, 255]),  # 8-bit data kept
        ("I", [-10, 0, 90], [0, 26, 255]),  # out of range: stretched
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
        ("F", [0.0, 2.0, np.nan], [0, 2, 0]),
    ],
)
def test_32bit_int_and_float_grayscale(tmp_path, mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    path = tmp_path / "deep.tiff"
    Image.fromarray(np.array([values], dtype), mode=mode).save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(load_image(path)[0, :, 0], expected)


def test_grayscale_cmyk_palette_and_other_formats(corpus):
    photo = corpus["photo"]
    gray = load_image(corpus["gray"])
    np.testing.assert_array_equal(gray, np.repeat(photo[..., :1], 3, axis=-1))

    cmyk = load_image(corpus["cmyk"])
    assert Image.open(corpus["cmyk"]).mode == "CMYK"
    assert cmyk.shape == photo.shape
    assert np.abs(cmyk.astype(int) - photo).mean() < 6  # JPEG loss only

    assert Image.open(corpus["palette"]).mode == "P"
    np.testing.assert_array_equal(load_image(corpus["palette"]), PALETTE[PALETTE_INDICES])
    # Index 2 transparent: those pixels become white.
    expected = PALETTE[PALETTE_INDICES].copy()
    expected[PALETTE_INDICES == 2] = 255
    np.testing.assert_array_equal(load_image(corpus["palette_transparent"]), expected)

    for name in ("bmp", "webp", "png"):
        np.testing.assert_array_equal(load_image(corpus[name]), photo, err_msg=name)


def test_transparent_grey_level_and_rgb_colour(tmp_path):
    gray = np.array([[0, 50, 50, 200]], np.uint8)
    path = _save(Image.fromarray(gray, "L"), tmp_path / "trns_l.png", transparency=50)
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 255, 255, 200])
    rgb = np.array([[[1, 2, 3], [9, 9, 9]]], np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / "trns_rgb.png", transparency=(9, 9, 9))
    np.testing.assert_array_equal(load_image(path), [[[1, 2, 3], [255, 255, 255]]])


def test_animated_gif_gives_its_first_frame(corpus):
    img = load_image(corpus["animated"])
    assert img.shape == (12, 16, 3)
    np.testing.assert_array_equal(img, np.broadcast_to([255, 0, 0], img.shape))


def test_exif_rotated_jpeg_equals_upright(corpus):
    upright = load_image(corpus["upright"])
    rotated = load_image(corpus["exif6"])
    assert rotated.shape == upright.shape == (32, 48, 3)
    np.testing.assert_array_equal(rotated, upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(tmp_path, orientation):
    upright = _pattern(16, 24, seed=orientation)
    # The stored pixels are the inverse of the transpose the viewer applies.
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(upright)
    if orientation != 1:
        stored = stored.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(stored, tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(load_image(path), upright)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_keeps_the_pixels(tmp_path):
    photo = _pattern(16, 24)
    path = _save(
        Image.fromarray(photo),
        tmp_path / "bad_exif.jpg",
        quality=95,
        subsampling=0,
        exif=b"Exif\x00\x00MM\x00*garbage",
    )
    np.testing.assert_array_equal(
        load_image(path),
        load_image(_save(Image.fromarray(photo), tmp_path / "ok.jpg", quality=95, subsampling=0)),
    )


def test_tiny_and_extreme_aspect_images(corpus):
    tiny = load_image(corpus["tiny"])
    np.testing.assert_array_equal(tiny, [[[12, 34, 56]]])
    assert resize_longest(tiny, 224).shape == (1, 1, 3)  # never enlarged
    tall = load_image(corpus["tall"])
    assert tall.shape == (4000, 8, 3)
    small = resize_longest(tall, 224)
    assert small.shape == (224, 1, 3)  # the short side stays >= 1
    assert (small == 77).all()


def test_bomb_is_refused_quickly_from_the_header(corpus):
    start = time.perf_counter()
    for max_pixels in (decode.DEFAULT_MAX_PIXELS, None, 10**12):
        # None / huge: our check is off or passes, and PIL's own limit must still refuse.
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(corpus["bomb"], max_pixels=max_pixels)
    # Decoding 900 M pixels takes many seconds; reading a header, milliseconds.
    assert time.perf_counter() - start < 2.0


def test_bomb_is_refused_without_allocating_its_pixels(corpus):
    # Under a 700 MB address-space limit, decoding the bomb (900 MB as 8-bit pixels) fails with
    # MemoryError ("out of memory"): the header check must refuse it first. PIL's own limit is
    # switched off so that only ours protects; the control run shows the limit bites.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (700 * 2**20, 700 * 2**20))\n"
        "from PIL import Image\n"
        "Image.MAX_IMAGE_PIXELS = None\n"
        "from cbir_tf.data.decode import ImageError, load_image\n"
        "for max_pixels in (89_478_485, None):\n"
        "    try:\n"
        "        load_image(sys.argv[1], max_pixels=max_pixels)\n"
        "        print('DECODED')\n"
        "    except ImageError as e:\n"
        "        print('REFUSED', e.reason)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, corpus["bomb"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("REFUSED decompression bomb refused: 30000x30000"), lines
    assert lines[1].startswith("REFUSED out of memory"), lines


def test_max_pixels_is_checked_before_decoding(corpus, monkeypatch):
    calls = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: calls.append(1), raising=True)
    with pytest.raises(ImageError, match=r"96x64 = 6144 pixels exceeds max_pixels=6143"):
        load_image(corpus["png"], max_pixels=6143)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def test_bbox_is_rounded_like_pil_crop_and_clipped(corpus):
    photo = corpus["photo"]  # 64 x 96
    # PIL's crop rounds each coordinate with round(): 10.5 -> 10, 11.5 -> 12, 30.4 -> 30.
    crop = load_image(corpus["png"], bbox=(10.5, 11.5, 30.4, 40.6))
    np.testing.assert_array_equal(crop, photo[12:41, 10:30])
    reference = np.asarray(Image.fromarray(photo).crop((10.5, 11.5, 30.4, 40.6)))
    np.testing.assert_array_equal(crop, reference)
    # Out-of-image parts are clipped (not padded).
    np.testing.assert_array_equal(
        load_image(corpus["png"], bbox=(-5, -3.2, 200, 30)), photo[:30, :]
    )


@pytest.mark.parametrize(
    "bbox, message",
    [
        ((50, 10, 50, 20), "empty"),
        ((200, 0, 300, 10), "empty"),
        ((1, 2, 3), "invalid bbox"),
        ((0, 0, np.nan, 5), "invalid bbox"),
        (("a", 0, 1, 1), "invalid bbox"),
    ],
)
def test_bad_bboxes(corpus, bbox, message):
    with pytest.raises(ImageError, match=message):
        load_image(corpus["png"], bbox=bbox)


def test_bbox_is_in_the_stored_frame_then_oriented(corpus):
    stored = np.asarray(Image.open(corpus["exif6"]))  # 48 x 32, as stored
    box = (4, 8, 20, 40)
    expected = np.asarray(Image.fromarray(stored[8:40, 4:20]).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(load_image(corpus["exif6"], bbox=box), expected)


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------


def test_resize_longest_matches_pil_thumbnail_lanczos():
    image = np.random.RandomState(3).randint(0, 256, (300, 451, 3)).astype(np.uint8)
    out = resize_longest(image, 100)
    reference = Image.fromarray(image)
    reference.thumbnail((100, 100), Image.Resampling.LANCZOS)
    assert out.shape == (67, 100, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(reference))
    np.testing.assert_array_equal(resize_longest(image, 451), image)  # already that size
    np.testing.assert_array_equal(resize_longest(image, 1000), image)  # never enlarged


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_longest(np.zeros((4, 4, 3), np.uint8), 0)
    with pytest.raises(ValueError):
        resize_longest(np.zeros((4, 4), np.uint8), 2)


def test_query_crop_is_scaled_like_its_full_image(corpus):
    # cnnimageretrieval-pytorch: thumbnail the crop to size * crop_longest / full_longest.
    photo = corpus["photo"]  # 64 x 96, longest 96
    box = (8, 8, 56, 40)  # 48 x 32 crop
    out = decode.load_resized(corpus["png"], 48, bbox=box)
    reference = Image.fromarray(photo).crop(box)
    reference.thumbnail((48 * 48 / 96, 48 * 48 / 96), Image.Resampling.LANCZOS)
    assert out.shape == (16, 24, 3)
    np.testing.assert_array_equal(out, np.asarray(reference))
    # Without a box, the whole image's longest side becomes the size.
    assert decode.load_resized(corpus["png"], 48).shape == (32, 48, 3)
    assert decode.load_resized(corpus["png"], None).shape == (64, 96, 3)


# ---------------------------------------------------------------------------------------------
# tf.data
# ---------------------------------------------------------------------------------------------


def _corpus_paths(corpus):
    names = [
        "png",
        "zero",
        "gray16",
        "truncated",
        "exif6",
        "random",
        "tiny",
        "tall",
        "text",
        "bomb",
        "cmyk",
        "animated",
        "alpha",
    ]
    return names, [corpus[n] for n in names]


def test_load_fn_eagerly(corpus):
    fn = pipeline.make_load_fn([corpus["png"], corpus["zero"]], image_size=48)
    ok = fn(tf.constant(0, tf.int64))
    assert ok["index"].dtype == tf.int64 and int(ok["index"]) == 0
    assert ok["image"].dtype == tf.uint8 and tuple(ok["image"].shape) == (32, 48, 3)
    assert ok["error"].numpy() == b""
    bad = fn(tf.constant(1, tf.int64))
    assert tuple(bad["image"].shape) == (0, 0, 3)
    assert b"empty file" in bad["error"].numpy()


def test_load_fn_inside_dataset_map(corpus):
    fn = pipeline.make_load_fn([corpus["png"], corpus["zero"]], image_size=48)
    ds = tf.data.Dataset.range(2).map(fn)
    assert ds.element_spec["image"].shape.as_list() == [None, None, 3]
    items = list(ds.as_numpy_iterator())
    eager = [fn(tf.constant(i, tf.int64)) for i in range(2)]
    for item, ref in zip(items, eager, strict=True):
        np.testing.assert_array_equal(item["image"], ref["image"].numpy())
        assert item["error"] == ref["error"].numpy()


def test_image_dataset_over_the_corpus_keeps_order_and_counts_failures(corpus):
    names, paths = _corpus_paths(corpus)
    ds = image_dataset(paths, image_size=32, num_parallel_calls=4)
    items = list(ds.as_numpy_iterator())
    assert [int(x["index"]) for x in items] == list(range(len(paths)))
    failed = {names[int(x["index"])]: x["error"].decode() for x in items if x["error"]}
    assert set(failed) == {"zero", "truncated", "random", "text", "bomb"}
    assert "decompression bomb" in failed["bomb"]
    for x in items:
        if not x["error"]:
            name = names[int(x["index"])]
            expected = decode.load_resized(corpus[name], 32)
            np.testing.assert_array_equal(x["image"], expected, err_msg=name)
            assert max(x["image"].shape[:2]) <= 32 and min(x["image"].shape[:2]) >= 1


def test_image_dataset_with_bboxes(corpus):
    boxes = [(8, 8, 56, 40), None, (0, 0, 5, 5)]
    ds = image_dataset([corpus["png"]] * 3, image_size=48, bboxes=boxes)
    items = list(ds.as_numpy_iterator())
    assert items[0]["image"].shape == (16, 24, 3)
    assert items[1]["image"].shape == (32, 48, 3)
    assert items[2]["image"].shape == (2, 2, 3)  # floor(48 * 5 / 96) = 2
    with pytest.raises(ValueError, match="2 bboxes for 3 images"):
        image_dataset([corpus["png"]] * 3, 48, bboxes=boxes[:2])


# ---------------------------------------------------------------------------------------------
# Decoding threads (iter_images)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [0, 1, 3])
def test_iter_images_keeps_order_and_reports_failures(corpus, num_threads):
    names, paths = _corpus_paths(corpus)
    items = list(pipeline.iter_images(paths, 32, num_threads=num_threads, prefetch=2))
    assert [k for k, _, _ in items] == list(range(len(paths)))
    failed = {names[k]: error for k, image, error in items if error}
    assert set(failed) == {"zero", "truncated", "random", "text", "bomb"}
    assert "decompression bomb" in failed["bomb"] and "empty file" in failed["zero"]
    for k, image, error in items:
        if error:
            assert image is None
        else:
            expected = decode.load_resized(paths[k], 32)
            np.testing.assert_array_equal(image, expected, err_msg=names[k])


def test_iter_images_equals_image_dataset(corpus):
    names, paths = _corpus_paths(corpus)
    boxes = [(4, 4, 40, 30) if n == "png" else None for n in names]
    threaded = list(pipeline.iter_images(paths, 40, bboxes=boxes))
    dataset = list(image_dataset(paths, 40, bboxes=boxes).as_numpy_iterator())
    for (k, image, error), ref in zip(threaded, dataset, strict=True):
        assert k == int(ref["index"]) and error == ref["error"].decode()
        if not error:
            np.testing.assert_array_equal(image, ref["image"], err_msg=names[k])
    assert threaded[0][1].shape == (11, 15, 3)  # a 36 x 26 crop scaled like its image: 40 / 96
    with pytest.raises(ValueError, match="2 bboxes for 3 images"):
        pipeline.iter_images([corpus["png"]] * 3, 48, bboxes=boxes[:2])  # before any decoding
    with pytest.raises(ValueError, match="num_threads"):
        pipeline.iter_images([corpus["png"]], 48, num_threads=-1)
    assert list(pipeline.iter_images([], 48)) == []


def test_iter_images_transform_runs_per_image_and_its_errors_become_reasons(corpus):
    def transform(image):
        if image.shape[1] == 48:
            raise ImageError("", "too wide")
        if image.shape[1] == 24:
            raise RuntimeError("boom")
        return threading.current_thread().name, image.sum()

    paths = [corpus["png"], corpus["zero"], corpus["png"], corpus["png"]]
    boxes = [None, None, (0, 0, 48, 32), (0, 0, 96, 16)]
    items = list(pipeline.iter_images(paths, 48, bboxes=boxes, transform=transform))
    assert [(k, error) for k, _, error in items] == [
        (0, "too wide"),
        (1, "empty file (0 bytes)"),
        (2, "unexpected RuntimeError: boom"),
        (3, "too wide"),
    ]
    assert all(image is None for _, image, _ in items)
    (_, out, _), *_ = pipeline.iter_images([corpus["png"]], 16, transform=transform)
    assert out[1] == decode.load_resized(corpus["png"], 16).sum()


def test_iter_images_bounds_the_images_decoded_ahead(corpus, monkeypatch):
    real = decode.load_resized
    decoded = []
    monkeypatch.setattr(
        decode, "load_resized", lambda *a, **k: (decoded.append(1), real(*a, **k))[1]
    )
    # A patient consumer: on a busy machine it would otherwise decode starved items again itself
    # (by design), and those second decodes are not what this test bounds.
    monkeypatch.setattr(pipeline._DecodeAhead, "_patience", lambda self: 30.0)
    consumed = 0
    for _ in pipeline.iter_images([corpus["png"]] * 30, 16, num_threads=3, prefetch=4):
        time.sleep(0.01)  # a slow consumer: the threads must wait for it
        consumed += 1
        assert len(decoded) <= consumed + 4
    assert consumed == 30 and len(decoded) == 30


def test_iter_images_decodes_itself_when_the_workers_are_starved(corpus, monkeypatch):
    """A worker that never gets the CPU must not hold the run up: the caller takes over."""
    real = decode.load_resized
    release = threading.Event()

    def starved_in_workers(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "load_resized", starved_in_workers)
    monkeypatch.setattr(pipeline, "_FIRST_PATIENCE_S", 0.05)
    paths = [corpus["png"], corpus["zero"]] * 5
    start = time.perf_counter()
    try:
        items = list(pipeline.iter_images(paths, 16, num_threads=2))
        assert time.perf_counter() - start < 10  # closing does not wait for starved workers
    finally:
        release.set()
    assert [k for k, _, _ in items] == list(range(10))
    assert all(bool(error) == (k % 2 == 1) for k, _, error in items)


def test_iter_images_stops_its_threads_when_closed_early(corpus):
    before = {t.ident for t in threading.enumerate()}
    iterator = pipeline.iter_images([corpus["png"]] * 50, 16, num_threads=3)
    next(iterator)
    assert {t.name for t in threading.enumerate()} >= {"cbir-decode-0", "cbir-decode-1"}
    iterator.close()
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority: Linux")
def test_iter_images_workers_run_at_low_priority(corpus, monkeypatch):
    real = decode.load_resized
    seen = {}

    def record(*args, **kwargs):
        tid = threading.get_native_id()
        seen[threading.current_thread().name] = os.getpriority(os.PRIO_PROCESS, tid)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "load_resized", record)
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for _ in pipeline.iter_images([corpus["png"]] * 6, 16, num_threads=2, prefetch=2):
        time.sleep(0.02)
    workers = {name: nice for name, nice in seen.items() if name.startswith("cbir-decode")}
    assert workers and all(nice == min(19, main_nice + 19) for nice in workers.values())
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


def test_image_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(ImageError("a.jpg", "empty file (0 bytes)")))
    assert (e.path, e.reason) == ("a.jpg", "empty file (0 bytes)")
