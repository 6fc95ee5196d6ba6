"""What the search service does, without HTTP: decode an upload, search, make thumbnails.

`SearchService` wraps one `Retriever` (one model, loaded once) and is safe to call from many
threads at once: the index is read-only while serving, the compiled descriptor function is
reentrant, and the only lazily built state (the search structure, the diffusion graph) is
built once under a lock. `cbir_tf.serve.app` calls it from a thread pool, off the event loop.

Uploads go through the toolkit's own loader (`cbir_tf.data.decode.load_resized`): the same
formats, EXIF orientation, colour rules, truncation and decompression-bomb checks as indexed
images. Thumbnails are read from the index's own files, addressed by row number only.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbir_tf.data import decode
from cbir_tf.rerank import pipeline as rerank_pipeline
from cbir_tf.retriever import Retriever

THUMBNAIL_SIZES = {"small": 256, "large": 1024}  # longest side, pixels
MAX_K = 1000


class RequestError(ValueError):
    """A request the service refuses, with the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = int(status)
        self.reason = reason


def parse_k(value: str | None, default: int = 10, max_k: int = MAX_K) -> int:
    """The `k` query parameter: an integer in 1..max_k (RequestError 400 otherwise)."""
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except ValueError:
        raise RequestError(400, f"k must be an integer from 1 to {max_k}, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise RequestError(400, f"k must be from 1 to {max_k}, got {k}")
    return k


def parse_rerank(value: str | None) -> str:
    """The `rerank` query parameter: a re-ranking method (RequestError 400 otherwise)."""
    if value is None or value == "":
        return rerank_pipeline.NONE
    try:
        rerank_pipeline.check_method(value[:40], "rerank")
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    return value


class _LRU:
    """A small thread-safe cache of encoded thumbnails, bounded in total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)


class SearchService:
    """Searches one index from many threads.

    Args:
      retriever: an opened index (`Retriever.load`).
      index_dir: its folder (reported by `info`).
      max_pixels: uploads with more pixels than this are refused from their header.
      thumbnail_cache_mb: memory for cached thumbnails.
    """

    def __init__(
        self,
        retriever: Retriever,
        index_dir: str | os.PathLike,
        *,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
        thumbnail_cache_mb: float = 64,
    ):
        if not len(retriever):
            raise ValueError(f"the index {os.fspath(index_dir)} is empty: nothing to serve")
        self.retriever = retriever
        self.index_dir = os.path.abspath(os.fspath(index_dir))
        self.max_pixels = max_pixels
        self._thumbs = _LRU(int(thumbnail_cache_mb * 2**20))
        self._ids = retriever.ids
        self._warm: set[str] = set()
        self._warm_lock = threading.Lock()
        # Private scratch space for uploads: the loader reads files (stat, header, then pixels).
        self._tmp = tempfile.TemporaryDirectory(prefix="cbir_serve_")

    def close(self) -> None:
        self._tmp.cleanup()

    def __len__(self) -> int:
        return len(self._ids)

    def warm_up(self) -> None:
        """Compiles the descriptor function and builds the search structure before serving."""
        image = np.full((32, 32, 3), 128, np.uint8)
        self._search(self.retriever.describe([image]), 1, "none")
        self.retriever.resolved_rerank()  # 'auto' settings resolved before the first query

    def info(self) -> dict[str, Any]:
        """What GET /api/index answers."""
        r = self.retriever
        meta = dict(r.descriptor_meta)
        weights = meta.get("weights")
        if isinstance(weights, str) and os.path.isabs(weights):
            meta["weights"] = os.path.basename(weights)  # no server paths in answers
        return {
            "images": len(self._ids),
            "dimension": int(r.descriptors.shape[1]),
            "model": meta,
            "image_size": r.image_size,
            "scales": list(r.scales),
            "backend": r.backend,
            # No approximate (ANN) index exists for these folders yet: search is exact.
            "approximate": False,
            "recall": None,
            "rerank_methods": list(rerank_pipeline.METHODS),
            # The settings every ?rerank= uses ('auto' ones resolved for this collection).
            "rerank_settings": self.retriever.resolved_rerank().to_dict(),
            "max_k": MAX_K,
        }

    # -- queries ------------------------------------------------------------------------------

    def decode_upload(self, data: bytes) -> np.ndarray:
        """An uploaded file's pixels as indexed images are loaded: uint8 [h, w, 3], shrunk.

        Raises:
          RequestError: 400 with the loader's reason (not an image, truncated, bomb, ...).
        """
        if not data:
            raise RequestError(400, "the uploaded file is empty")
        fd, path = tempfile.mkstemp(dir=self._tmp.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return decode.load_resized(path, self.retriever.image_size, None, self.max_pixels)
        except decode.ImageError as e:
            raise RequestError(400, f"the uploaded file cannot be used: {e.reason}") from None
        finally:
            os.unlink(path)

    def search_image(self, data: bytes, k: int, rerank: str) -> dict[str, Any]:
        """Searches with an uploaded image file; the JSON answer of POST /api/search."""
        t0 = time.perf_counter()
        image = self.decode_upload(data)
        t1 = time.perf_counter()
        query = self._describe(image)
        t2 = time.perf_counter()
        out = self._answer(query, k, rerank)
        t3 = time.perf_counter()
        out["timing_ms"] = {
            "decode": _ms(t1 - t0),
            "describe": _ms(t2 - t1),
            "search": _ms(t3 - t2),
        }
        out["query"] = {"width": int(image.shape[1]), "height": int(image.shape[0])}
        return out

    def _describe(self, image: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        from cbir_tf.describe.extract import NonFiniteDescriptorError

        try:
            return self.retriever.describe([image])
        except (tf.errors.InvalidArgumentError, NonFiniteDescriptorError, ValueError) as e:
            # E.g. an image smaller than the network's unpadded convolutions can take.
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            h, w = image.shape[:2]
            raise RequestError(
                400, f"the model cannot describe this {w}x{h} image: {first}"
            ) from None

    def search_row(self, row: int, k: int, rerank: str) -> dict[str, Any]:
        """Searches with the stored descriptor of an indexed image ("more like this")."""
        if not 0 <= row < len(self._ids):
            raise RequestError(404, f"no indexed image at row {row} (rows 0..{len(self) - 1})")
        t0 = time.perf_counter()
        query = np.asarray(self.retriever.descriptors[row : row + 1], np.float32)
        out = self._answer(query, k, rerank)
        out["timing_ms"] = {"search": _ms(time.perf_counter() - t0)}
        out["query"] = {"row": row, "id": self._ids[row]}
        return out

    def _answer(self, query: np.ndarray, k: int, rerank: str) -> dict[str, Any]:
        scores, rows = self._search(query, k, rerank)
        results = []
        for rank, (s, r) in enumerate(zip(scores[0], rows[0], strict=True), start=1):
            if r < 0:  # an approximate index found fewer than k neighbours
                break
            results.append(
                {
                    "rank": rank,
                    "row": int(r),
                    "id": self._ids[int(r)],
                    "score": round(float(s), 6),
                    "thumbnail": f"/thumbnails/{int(r)}",
                }
            )
        return {"results": results, "k": k, "rerank": rerank}

    def _search(self, query: np.ndarray, k: int, rerank: str):
        if rerank in self._warm:
            return self.retriever.search_descriptors(query, k, rerank)
        # The first search of a method builds shared state (search index, diffusion graph).
        with self._warm_lock:
            result = self.retriever.search_descriptors(query, k, rerank)
            self._warm.add(rerank)
        return result

    # -- thumbnails ---------------------------------------------------------------------------

    def thumbnail(self, row: int, size: str = "small") -> bytes:
        """A JPEG of the indexed image at `row`, longest side THUMBNAIL_SIZES[size], cached.

        The file is the one the index records for that row; nothing in a request names a path.

        Raises:
          RequestError: 404 for an unknown row, size, or an image that is gone or unreadable.
        """
        if size not in THUMBNAIL_SIZES:
            raise RequestError(404, f"unknown thumbnail size {size[:20]!r}")
        if not 0 <= row < len(self._ids):
            raise RequestError(404, f"no indexed image at row {row}")
        key = (row, size)
        cached = self._thumbs.get(key)
        if cached is not None:
            return cached
        path = self.retriever.path_of(self._ids[row])
        if path is None:
            raise RequestError(404, f"the file of image {self._ids[row]!r} is unknown")
        try:
            pixels = decode.load_resized(path, THUMBNAIL_SIZES[size], None, self.max_pixels)
        except decode.ImageError as e:
            raise RequestError(
                404, f"image {self._ids[row]!r} cannot be read: {e.reason}"
            ) from None
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        self._thumbs.put(key, data)
        return data


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def open_service(
    index_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    rerank: Mapping[str, Any] | None = None,
) -> SearchService:
    """Opens an index (and its model, once) and warms the service up.

    Raises:
      FileNotFoundError: not an index folder.
      ValueError: an empty or unreadable index.
    """
    kwargs = {"rerank": rerank} if rerank else {}
    retriever = Retriever.load(index_dir, model=model, root=root, **kwargs)
    service = SearchService(retriever, index_dir)
    service.warm_up()
    return service
