"""Global descriptor extraction: images -> float32 [N, D] L2-normalised rows, streamed to a store.

Images keep their own size (longest side `image_size`, aspect kept): padding images of different
sizes into one batch would change their descriptors, so each image runs alone through ONE
compiled function whose input signature is ``[1, None, None, 3]``; it is traced once and reused
for every image shape (`build_extract_function`), and `extract` calls its concrete function.
Decoding runs ahead in low-priority Python threads (`cbir_tf.data.pipeline.iter_images`; PIL
releases the GIL), which fill the cores the network leaves idle: the network rarely waits on JPEG
decoding, and decoding slows it down little.

Multi-scale extraction follows the reference (cnnimageretrieval-pytorch ``extract_ms``): for each
scale s the image is resized by s with bilinear interpolation, the network's L2-normalised
vector v_s computed, and the vectors combined as

    v = (1/S * sum_s v_s ** p) ** (1/p),   then v / (||v|| + 1e-6)

with p = ``ms_power``. The reference uses p = 1 by default and p = GeM's p for GeM pooling
without whitening (``msp = net.pool.p``); do the same here by passing ``ms_power=gem_p``. A power
p != 1 requires non-negative vectors (GeM, MAC, SPoC without whitening). Resizing by s uses
``floor(h * s), floor(w * s)`` like the reference's ``interpolate(scale_factor=s)``; unlike the
reference it antialiases by default when shrinking (``antialias=True``), which avoids aliasing at
s = 1/2; ``antialias=False`` reproduces the reference's plain bilinear resize.

Each vector goes to a sink as it is computed: `MemorySink`, or a store's resumable writer
(`cbir_tf.store.writer.StoreWriter`). Sharding takes a contiguous slice (`cbir_tf.store.shards`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cbir_tf.config import default
from cbir_tf.data.image_list import shard_meta, validate_ids
from cbir_tf.fileio import json_safe


class NonFiniteDescriptorError(ValueError):
    """A descriptor holds NaN or Inf; the message names the image."""


def library_versions() -> dict[str, str | None]:
    """Versions of the packages that determine descriptor values (without importing them)."""
    from cbir_tf import __version__

    versions: dict[str, str | None] = {"cbir_tf": __version__}
    # TensorFlow ships under several distribution names (tensorflow-cpu, tf-nightly, ...).
    candidates = {
        "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos"),
        "keras": ("keras",),
        "numpy": ("numpy",),
    }
    for package, distributions in candidates.items():
        versions[package] = None
        module = sys.modules.get(package)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            versions[package] = module.__version__
            continue
        for dist in distributions:
            try:
                versions[package] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _normalize(obj: Any) -> Any:
    return json_safe(obj, default=repr)


@dataclasses.dataclass
class ExtractionResult:
    """What `extract` returns.

    Attributes:
      descriptors: float32 [N, D] L2-normalised rows of the images that were read (memory-mapped
        from the store when the sink is a store's).
      ids: N ids, in input order (skipped images left out).
      skipped: (id, reason) of every image that could not be read, in input order.
      meta: the store's metadata (extraction settings, dim, counts).
      num_resumed: images found already done in the store (not computed again).
      num_computed: images this call ran through the network.
      seconds: wall time of this call.
      images_per_second: images computed (or skipped) per second by this call.
      num_traces: how many times the compiled function was traced (1 unless shapes retrace).
    """

    descriptors: np.ndarray
    ids: list[str]
    skipped: list[tuple[str, str]]
    meta: dict[str, Any]
    num_resumed: int = 0
    num_computed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    num_traces: int = 0


# One compiled function per (model, settings): extracting the database and then the queries
# with the same model reuses the traced graph.
_FUNCTION_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _validate_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    return scales


def build_extract_function(
    model, scales: Sequence[float] = (1.0,), ms_power: float = 1.0, antialias: bool = True
):
    """The compiled per-image descriptor function.

    Args:
      model: keras model mapping float32 RGB 0..255 [1, H, W, 3] to [1, D] L2-normalised vectors.
      scales: image scales; (1.0,) is the plain single-scale descriptor.
      ms_power: power p of the generalised mean combining the scales (see module docstring).
      antialias: antialias when shrinking the image for a scale < 1.

    Returns:
      A `tf.function` with input signature float32 [1, None, None, 3] returning float32 [1, D]:
      one trace serves every image size (check with `experimental_get_tracing_count()`).
    """
    import tensorflow as tf

    scales = _validate_scales(scales)
    p = float(ms_power)
    if not math.isfinite(p) or p <= 0:
        raise ValueError(f"ms_power must be a positive number, got {ms_power}")
    key = (scales, p, bool(antialias))
    try:
        per_model = _FUNCTION_CACHE.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: no caching
        per_model = {}
    if key in per_model:
        return per_model[key]

    def forward(x):
        return tf.cast(model(x, training=False), tf.float32)

    if scales == (1.0,):

        def descriptor(image):
            return forward(image)

    else:

        def descriptor(image):
            shape = tf.shape(image)
            h = tf.cast(shape[1], tf.float64)
            w = tf.cast(shape[2], tf.float64)
            total = None
            for s in scales:
                if s == 1.0:
                    x = image
                else:
                    size = tf.stack(
                        [
                            tf.maximum(tf.cast(tf.floor(h * s), tf.int32), 1),
                            tf.maximum(tf.cast(tf.floor(w * s), tf.int32), 1),
                        ]
                    )
                    x = tf.image.resize(image, size, method="bilinear", antialias=antialias)
                v = forward(x)
                v = v if p == 1.0 else tf.pow(v, p)
                total = v if total is None else total + v
            v = total / float(len(scales))
            if p != 1.0:
                v = tf.pow(v, 1.0 / p)
            return v / (tf.norm(v, axis=-1, keepdims=True) + 1e-6)

    fn = tf.function(
        descriptor,
        input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)],
    )
    per_model[key] = fn
    return fn


def is_array(item: Any) -> bool:
    """Whether an image given to `extract` is decoded pixels (an array), not a path."""
    return isinstance(item, np.ndarray) or (
        hasattr(item, "shape") and hasattr(item, "dtype") and not isinstance(item, (str, bytes))
    )


def _network_input(image: np.ndarray):
    """[H, W, 3] pixels -> the compiled function's float32 [1, H, W, 3] input tensor."""
    import tensorflow as tf

    if image.dtype == np.uint8:
        # Converting a freshly made float32 numpy array to a tensor costs ~1.8 ms at 512 x 384
        # (4% of EfficientNetB1's forward pass on 2 cores); handing TensorFlow the uint8 pixels
        # and casting there costs ~0.15 ms, with the same values (uint8 -> float32 is exact).
        return tf.cast(image[np.newaxis], tf.float32)
    return tf.convert_to_tensor(image[np.newaxis].astype(np.float32))


def _iter_images(
    items: Sequence[Any],
    image_size: int | None,
    bboxes: Sequence[Any] | None,
    num_parallel_calls: int | None,
) -> Iterator[tuple[int, Any, str]]:
    """Yields (position in `items`, float32 [1, H, W, 3] input tensor or None, error or '')."""
    if not items:
        return
    if all(is_array(it) for it in items):
        # Already-decoded images (tests, benchmarks, callers with their own loader): used as
        # given, without resizing.
        for k, image in enumerate(items):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
                yield k, None, f"expected an RGB image [H, W, 3], got shape {image.shape}"
            else:
                yield k, _network_input(image), ""
        return
    if any(is_array(it) for it in items):
        raise TypeError("pass either image paths or decoded image arrays, not a mixture")
    from cbir_tf.data.pipeline import ImageError, iter_images

    def to_input(image: np.ndarray):
        if 0 in image.shape:
            raise ImageError("", f"decoded to an empty image of shape {image.shape}")
        return _network_input(image)

    # The input tensors are made in the decoding threads too, off the network's path.
    images = iter_images(
        items, image_size, bboxes=bboxes, num_threads=num_parallel_calls, transform=to_input
    )
    try:
        yield from images
    finally:
        images.close()  # stops the decoding threads when the caller stops early


class MemorySink:
    """Collects descriptors in memory: what `extract` writes to without a store.

    The sink protocol (`cbir_tf.store.writer.StoreWriter` follows it too): a context manager
    with `done` (ids already described), `add(id, vector)`, `skip(id, reason)` and `finish()`:
    (descriptors float32 [N, D], ids, skipped [(id, reason)], meta) in input order. `extract`
    opens one as `sink(ids, meta)`, so the class itself is the default opener.

    Args:
      ids: every image id of the run, in input order.
      meta: the run's metadata; counts and `dim` are added by `finish`.
    """

    def __init__(self, ids: Sequence[str], meta: dict[str, Any]):
        self.ids = list(ids)
        self.meta = dict(meta)
        self.done: set[str] = set()
        self._vectors: dict[str, np.ndarray] = {}
        self._skipped: dict[str, str] = {}

    def __enter__(self) -> MemorySink:
        return self

    def __exit__(self, *exc_info) -> None:
        """Nothing to save: what was recorded is lost with an error, as it was never stored."""

    def add(self, image_id: str, vector: np.ndarray) -> None:
        """Records the descriptor (float32 [D]) of one image."""
        self._vectors[image_id] = vector
        self.done.add(image_id)

    def skip(self, image_id: str, reason: str) -> None:
        """Records that one image could not be read, and why."""
        self._skipped[image_id] = reason
        self.done.add(image_id)

    def finish(self) -> tuple[np.ndarray, list[str], list[tuple[str, str]], dict[str, Any]]:
        """(descriptors float32 [N, D], ids, skipped, meta) of the images, in input order."""
        ids = [i for i in self.ids if i in self._vectors]
        dim = next(iter(self._vectors.values())).shape[0] if ids else 0
        descriptors = (
            np.stack([self._vectors[i] for i in ids]).astype(np.float32, copy=False)
            if ids
            else np.zeros((0, dim), np.float32)
        )
        skipped = [(i, self._skipped[i]) for i in self.ids if i in self._skipped]
        meta = dict(
            self.meta,
            num_images=len(ids),
            num_skipped=len(skipped),
            dim=dim,
        )
        return descriptors, ids, skipped, meta


def extract(
    model,
    paths: Sequence[Any],
    *,
    ids: Sequence[str] | None = None,
    image_size: int | None = default("data.image_size"),
    scales: Sequence[float] = default("data.scales"),
    ms_power: float = default("data.ms_power"),
    bboxes: Sequence[Any] | None = None,
    sink: Callable[[list[str], dict[str, Any]], Any] | None = None,
    meta: dict[str, Any] | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    total_images: int | None = None,
    progress: bool = True,
    antialias: bool = True,
    num_parallel_calls: int | None = None,
) -> ExtractionResult:
    """Computes one global descriptor per image, into a sink (memory, or a resumable store).

    Args:
      model: keras model, float32 RGB 0..255 [1, H, W, 3] -> [1, D] L2-normalised (e.g.
        `cbir_tf.describe.models.build_descriptor_model`).
      paths: image files (decoded by `cbir_tf.data.pipeline.iter_images`: EXIF-oriented RGB,
        cropped to `bboxes`, longest side resized to `image_size`), or already-decoded uint8
        arrays [H, W, 3] used as given.
      ids: one unique single-line id per image (default: the paths as given, or "0", "1", ...
        for arrays); the store's ids.txt.
      image_size: longest side in pixels (images are only shrunk); None keeps the size.
      scales: multi-scale factors, e.g. (1, 2 ** -0.5, 0.5); see the module docstring.
      ms_power: power of the generalised mean combining the scales (1 = arithmetic mean; the
        reference uses GeM's p for GeM pooling).
      bboxes: per image None or (x1, y1, x2, y2) crop box (query images).
      sink: opens what the descriptors go to, given the run's ids and meta: None keeps them in
        memory (`MemorySink`); `cbir_tf.store.writer.StoreSink(folder)` writes a store
        resumably (an interrupted run resumes; a complete store with the same settings and
        images is just loaded). Its `path`, when it has one, is shown in the progress.
      meta: the model's description (backbone, weights, pooling, whitening, ...) saved in
        meta.json; a resumed run must pass the same.
      shard_index: which shard of the (ids, paths) list this call handles.
      num_shards: how many contiguous shards the list is split into (`shard_range`).
      total_images: the whole list's size when `paths` is shard `shard_index`'s slice already.
      progress: show a progress bar (images/s, ETA) and a summary of skipped images.
      antialias: antialias when shrinking for a scale < 1 (False = the reference's resize).
      num_parallel_calls: decoding threads (default: `iter_images`'s, the usable cores up to 4).

    Returns:
      ExtractionResult of this shard: descriptors float32 [N, D], ids, skipped (id, reason).

    Raises:
      NonFiniteDescriptorError: a descriptor holds NaN or Inf (the message names the image);
        images finished before it are saved.
      Whatever the sink raises: a store's sink refuses another process's store
        (`cbir_tf.fileio.LockError`), work of other settings or images (`StoreMismatchError`),
        and a full disk (`StoreWriteError`; the store stays resumable).
    """
    start_time = time.perf_counter()
    inputs = (paths, ids, bboxes, shard_index, num_shards, total_images)
    items, ids, bboxes, shard = shard_inputs(*inputs)
    scales = _validate_scales(scales)
    run_meta = _run_meta(meta, image_size, scales, ms_power, antialias)
    run_meta.update(shard)
    fn = build_extract_function(model, scales, ms_power, antialias)
    traces_before = fn.experimental_get_tracing_count()
    sink = (sink or MemorySink)(ids, run_meta)
    where = getattr(sink, "path", None)
    # Leaving this block with an error saves the images finished so far (StoreWriter.__exit__).
    with sink:
        num_resumed = len(sink.done)
        todo = [k for k, i in enumerate(ids) if i not in sink.done]
        bar = _progress_bar(len(ids), num_resumed, progress, where)
        try:
            computed, skipped_now = _describe_images(
                fn, sink, [items[k] for k in todo], [ids[k] for k in todo],
                None if bboxes is None else [bboxes[k] for k in todo],
                image_size, scales, ms_power, num_parallel_calls, bar,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        descriptors, out_ids, skipped, out_meta = sink.finish()
    seconds = time.perf_counter() - start_time
    if progress:
        _print_summary(len(ids), num_resumed, computed, skipped, skipped_now, seconds)
    return ExtractionResult(
        descriptors=descriptors,
        ids=list(out_ids),
        skipped=list(skipped),
        meta=out_meta,
        num_resumed=num_resumed,
        num_computed=computed,
        seconds=seconds,
        images_per_second=(computed + skipped_now) / seconds if seconds > 0 else 0.0,
        num_traces=fn.experimental_get_tracing_count() - traces_before,
    )


def shard_inputs(paths, ids, bboxes, shard_index: int, num_shards: int, total=None):
    """(items, ids, bboxes, shard meta) of one shard of `extract`'s inputs.

    Args:
      paths, ids, bboxes, shard_index, num_shards: as `extract` takes them (ids None: derived).
      total: the whole list's size when `paths` is the shard's slice already (kept as is).
    """
    items = list(paths)
    if ids is None:
        ids = [str(k) if is_array(p) else os.fspath(p) for k, p in enumerate(items)]
    ids = validate_ids(ids)
    if len(ids) != len(items):
        raise ValueError(f"{len(ids)} ids for {len(items)} images")
    if bboxes is not None and len(bboxes) != len(items):
        raise ValueError(f"{len(bboxes)} bboxes for {len(items)} images")
    shard = shard_meta(len(items) if total is None else int(total), shard_index, num_shards)
    lo, hi = shard["shard_start"], shard["shard_stop"]
    if total is not None and hi - lo != len(items):
        raise ValueError(f"shard {shard_index} holds {hi - lo} of {total}, got {len(items)}")
    lo, hi = (0, len(items)) if total is not None else (lo, hi)  # `items` is the slice already
    bboxes = None if bboxes is None else list(bboxes)[lo:hi]
    return items[lo:hi], ids[lo:hi], bboxes, shard


def _run_meta(meta, image_size, scales, ms_power, antialias) -> dict[str, Any]:
    """The caller's `meta` plus the extraction settings (which it must not contradict)."""
    run_meta = _normalize(dict(meta or {}))
    run_meta.setdefault("versions", library_versions())
    settings = {
        "image_size": image_size,
        "scales": list(scales),
        "ms_power": float(ms_power),
        "ms_antialias": bool(antialias) if len(scales) > 1 else None,
    }
    for key, value in settings.items():
        if key in run_meta and run_meta[key] != _normalize(value) and key != "ms_antialias":
            raise ValueError(
                f"meta[{key!r}] = {run_meta[key]!r} disagrees with the extraction argument "
                f"{key}={value!r}"
            )
    run_meta.update(_normalize(settings))
    return run_meta


def _describe_images(
    fn, sink, items, ids, bboxes, image_size, scales, ms_power, num_parallel_calls, bar
) -> tuple[int, int]:
    """Runs `items` through `fn` into `sink`; returns (images computed, images skipped)."""
    computed = skipped = 0

    def record(k: int, output) -> None:
        nonlocal computed
        vec = output.numpy()[0]
        if not np.isfinite(vec).all():
            raise NonFiniteDescriptorError(_non_finite_message(ids[k], items[k], scales, ms_power))
        computed += 1
        sink.add(ids[k], vec)
        if bar is not None:
            bar.update(1)

    # One image in flight: the next image is dispatched before the previous result is read
    # back, so that an accelerator never idles while the host copies a vector.
    in_flight = None
    call = None  # the concrete function, obtained at the first image
    for k, inputs, error in _iter_images(items, image_size, bboxes, num_parallel_calls):
        if error:
            skipped += 1
            sink.skip(ids[k], error)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(skipped=skipped, refresh=False)
            continue
        if call is None:
            # Calling the concrete function skips the tf.function's per-call signature
            # matching (0.3-0.5 ms an image); the input signature makes it the only one.
            call = fn.get_concrete_function()
        output = call(inputs)
        if in_flight is not None:
            record(*in_flight)
        in_flight = (k, output)
    if in_flight is not None:
        record(*in_flight)
    if computed + skipped != len(items):
        got = computed + skipped
        raise RuntimeError(f"the image pipeline yielded {got} of {len(items)} images")
    return computed, skipped


def _non_finite_message(image_id: str, item: Any, scales, ms_power: float) -> str:
    where = "" if is_array(item) else f" ({os.fspath(item)})"
    msg = f"the descriptor of image {image_id!r}{where} holds NaN or Inf"
    if len(scales) > 1 and ms_power != 1.0:
        msg += (
            f"; ms_power={ms_power} needs non-negative vectors (GeM/MAC/SPoC without "
            "whitening): use ms_power=1 for whitened or R-MAC descriptors"
        )
    else:
        msg += "; the model produces invalid values for it (check the weights and the image)"
    return msg


def _progress_bar(total: int, initial: int, enabled: bool, where: str | None):
    if not enabled:
        return None
    if initial:
        print(f"resuming {where}: {initial} of {total} images already done",
              file=sys.stderr)  # fmt: skip
    from cbir_tf.progressbar import progress_bar

    desc = "descriptors" if where is None else f"descriptors -> {where}"
    return progress_bar(total=total, initial=initial, unit="img", desc=desc, smoothing=0.05,
                        dynamic_ncols=True)  # fmt: skip


def _print_summary(total, resumed, computed, skipped, skipped_now: int, seconds) -> None:
    rate = (computed + skipped_now) / seconds if seconds > 0 else 0.0
    lines = [
        f"extracted {computed} images in {seconds:.1f} s ({rate:.2f} images/s)"
        + (f", {resumed} already done" if resumed else "")
        + f"; {len(skipped)} of {total} skipped"
    ]
    for image_id, reason in skipped[:20]:
        lines.append(f"  skipped {image_id}: {reason}")
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see skipped.json)")
    print("\n".join(lines), file=sys.stderr)
