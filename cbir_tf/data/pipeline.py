"""Many images for descriptor extraction: decoded ahead in threads, or as a tf.data pipeline.

`iter_images` (Python threads, what descriptor extraction uses) and `image_dataset` (tf.data)
decode files with `cbir_tf.data.decode.load_resized` (its module docstring gives the rules:
formats, decompression bombs, EXIF orientation, colour, crop and resize) and turn each failure
into the reason as a string, so that a run over a large collection skips and counts broken
files instead of stopping.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cbir_tf.data import decode
from cbir_tf.data.decode import DEFAULT_MAX_PIXELS, BoxLike, ImageError

__all__ = ["image_dataset", "iter_images", "make_load_fn"]


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
        return decode.load_resized(path, image_size, bbox, max_pixels), ""
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # one bad file must never stop a run over a whole collection
        return None, f"unexpected {type(e).__name__}: {e}"


def make_load_fn(
    paths: Sequence[str | os.PathLike],
    image_size: int | None,
    bboxes: Sequence[BoxLike | None] | np.ndarray | None = None,
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
    bboxes: Sequence[BoxLike | None] | np.ndarray | None = None,
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
    bboxes: Sequence[BoxLike | None] | np.ndarray | None = None,
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
