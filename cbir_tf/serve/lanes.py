"""Which uploads are large, the smaller pool of threads that decodes them, and the memory after.

A small upload costs a few milliseconds; an image of 9400 x 9400 pixels costs seconds and a few
hundred MB even in a 343 KB file (its pixels compress to nothing). Requests run in worker
threads; were large images decoded there, a handful of clients sending them would hold every
thread, and searches by row, which decode nothing, would wait seconds behind them. So an upload
is classed from the pixel count its header declares (`cbir_tf.data.decode.peek_size`, nothing
decoded) and runs in one of two lanes:

- the request lane (`threads` at once): searches by row, thumbnails, uploads of at most
  `large_image_pixels` pixels (decoded exactly as indexed images are);
- the large lane (`large_decodes` at once, apart from the request lane): larger uploads, JPEGs
  at a reduced DCT scale (`decode.load_resized(draft=True)`). Large uploads queue there; the
  request lane never waits for them.

After a large decode the C heap's free pages are handed back to the system (`release_memory`):
glibc keeps freed blocks of its thread arenas mapped, and without it the server stayed at
2.1 GB when idle after a burst of large uploads (0.79 GB before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

import anyio

from cbir_tf.data import decode


class Lanes:
    """The two pools of worker threads of the service, and which one an upload goes to.

    Args:
      threads: worker threads of the request lane.
      large_decodes: worker threads of the large lane (decodes of large images at once).
      large_image_pixels: uploads whose header declares more pixels are large.
    """

    def __init__(self, *, threads: int, large_decodes: int, large_image_pixels: int):
        if threads < 1 or large_decodes < 1:
            raise ValueError(
                f"threads ({threads}) and large_decodes ({large_decodes}) must be at least 1"
            )
        if large_image_pixels < 1:
            raise ValueError(f"large_image_pixels must be positive, got {large_image_pixels}")
        self.requests = anyio.CapacityLimiter(threads)
        self.large = anyio.CapacityLimiter(large_decodes)
        self.large_image_pixels = int(large_image_pixels)

    def is_large(self, data: bytes) -> bool:
        """Whether an upload's header declares more than `large_image_pixels` pixels."""
        size = decode.peek_size(data)
        return size is not None and size[0] * size[1] > self.large_image_pixels

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the request lane, off the event loop."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.requests)

    async def run_upload(self, data: bytes, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(data, *args, large)` in the lane the upload `data` belongs to."""
        # The header is read in a worker thread too: PIL may inflate text chunks to find it.
        large = await self.run(self.is_large, data)
        limiter = self.large if large else self.requests
        return await anyio.to_thread.run_sync(fn, data, *args, large, limiter=limiter)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> bool:
    """Returns the C heap's free pages to the system (glibc `malloc_trim`); False elsewhere."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
