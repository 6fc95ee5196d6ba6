"""What the search service does, without HTTP: decode an upload, search, make thumbnails.

`SearchService` serves one index (one model, loaded once) and is safe to call from many threads
at once: the compiled descriptor function is reentrant, and the only lazily built state (the
search structure, the diffusion graph) is built once under a lock. `cbir_tf.serve.app` calls it
from a thread pool, off the event loop.

It serves one committed state of the index at a time (`ServedState`: a `Retriever` opened on
one commit, with its ids). Each request takes the state current when it starts and answers from
it alone (`one_state`), however long it runs; `swap` puts a new state in place between requests
(`cbir_tf.serve.reload` notices new commits) and the old one is freed once its last request ends.

Uploads go through the toolkit's own loader (`cbir_tf.data.decode.load_resized`): the same
formats, EXIF orientation, colour rules, truncation and decompression-bomb checks as indexed
images, and the same pixels; only large ones (`cbir_tf.serve.lanes`) decode a JPEG at a
reduced DCT scale. Thumbnails are read from the index's own files, addressed by row number only.
What searches run on (exact, or an approximate index and its measured recall) is reported as
the retriever's search index says (`search_report`), never assumed.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from cbir_tf.data import decode
from cbir_tf.rerank import pipeline as rerank_pipeline
from cbir_tf.retriever import Retriever
from cbir_tf.serve.lanes import release_memory

THUMBNAIL_SIZES = {"small": 256, "large": 1024}  # longest side, pixels
MAX_K = 1000


class RequestError(ValueError):
    """A request the service refuses, with the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = int(status)
        self.reason = reason


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


class ServedState:
    """One committed state of the index, as the service answers from it.

    Args:
      retriever: the index opened on that state (`Retriever.load`).
    """

    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self.ids = retriever.ids
        self.commit = retriever.commit
        self.loaded = time.time()
        self.warm: set[str] = set()  # re-ranking methods whose shared structures are built
        self.warm_lock = threading.Lock()

    def search(self, query: np.ndarray, k: int, rerank: str):
        """(scores, rows) of `query` in this state (the first search of a method builds its
        shared structures: the search index, DBA vectors, the diffusion graph)."""
        if rerank in self.warm:
            return self.retriever.search_descriptors(query, k, rerank)
        with self.warm_lock:
            result = self.retriever.search_descriptors(query, k, rerank)
            self.warm.add(rerank)
        return result

    def summary(self) -> dict[str, Any]:
        """Which state this is: its commit number and image count."""
        return {"images": len(self.ids), "commit": self.commit}


F = TypeVar("F", bound=Callable[..., Any])


def one_state(method: F) -> F:
    """Runs a service method on the state current when it is called, from start to end, even
    when `swap` replaces it meanwhile (nested calls keep the outer call's state)."""

    @functools.wraps(method)
    def pinned(self: SearchService, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._pin, "state", None) is not None:
            return method(self, *args, **kwargs)
        self._pin.state = self._served
        try:
            return method(self, *args, **kwargs)
        finally:
            self._pin.state = None

    return pinned  # type: ignore[return-value]


class SearchService:
    """Searches one index from many threads.

    Args:
      retriever: an opened index (`Retriever.load`).
      index_dir: its folder (reported by `info`).
      max_pixels: uploads with more pixels than this are refused from their header.
      thumbnail_cache_mb: memory for cached thumbnails.
      reopen: keyword arguments that reopened the index (`Retriever.load`'s root, rerank, ...);
        `cbir_tf.serve.reload` opens new commits with them.
    """

    def __init__(
        self,
        retriever: Retriever,
        index_dir: str | os.PathLike,
        *,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
        thumbnail_cache_mb: float = 64,
        reopen: Mapping[str, Any] | None = None,
    ):
        if not len(retriever):
            raise ValueError(f"the index {os.fspath(index_dir)} is empty: nothing to serve")
        self.index_dir = os.path.abspath(os.fspath(index_dir))
        self.max_pixels = max_pixels
        self.reopen = dict(reopen or {})
        self._thumbs = _LRU(int(thumbnail_cache_mb * 2**20))
        self._served = ServedState(retriever)
        self._pin = threading.local()  # the state a request in this thread answers from
        # Private scratch space for uploads: the loader reads files (stat, header, then pixels).
        self._tmp = tempfile.TemporaryDirectory(prefix="cbir_serve_")

    # -- the served state -----------------------------------------------------------------------

    @property
    def state(self) -> ServedState:
        """The state this thread's request answers from (else the current one)."""
        return getattr(self._pin, "state", None) or self._served

    @property
    def retriever(self) -> Retriever:
        """The index of `state`."""
        return self.state.retriever

    @property
    def _ids(self) -> list[str]:
        return self.state.ids

    def swap(self, retriever: Retriever) -> ServedState:
        """Serves `retriever` (a newer committed state of the index) from the next request on.

        Requests already running finish on the state they started with; it is freed after them.
        """
        if not len(retriever):
            raise ValueError(f"the index {self.index_dir} is empty: nothing to serve")
        state = ServedState(retriever)
        # Built before it serves: its first requests do not wait for the search structure.
        state.search(np.asarray(retriever.descriptors[:1], np.float32), 1, "none")
        self._served = state  # one reference assignment: each request sees old or new
        return state

    def close(self) -> None:
        self._tmp.cleanup()

    def __len__(self) -> int:
        return len(self._ids)

    @one_state
    def warm_up(self) -> None:
        """Compiles the descriptor function and builds the search structure before serving."""
        image = np.full((32, 32, 3), 128, np.uint8)
        self._search(self.retriever.describe([image]), 1, "none")
        self.retriever.resolved_rerank()  # 'auto' settings resolved before the first query

    @one_state
    def info(self) -> dict[str, Any]:
        """What GET /api/index answers."""
        return {**self._info(), **self.state.summary()}

    def _info(self) -> dict[str, Any]:
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
            **self.search_report(),
            "rerank_methods": list(rerank_pipeline.METHODS),
            # The settings every ?rerank= uses ('auto' ones resolved for this collection).
            "rerank_settings": self.retriever.resolved_rerank().to_dict(),
            "max_k": MAX_K,
        }

    def search_report(self, rerank: str = rerank_pipeline.NONE) -> dict[str, Any]:
        """What searches with `rerank` really run on: `approximate`, `recall`, `search`.

        Read from the index the searches use (`Retriever.search_index`): exact search, or an
        approximate index with its kind, nprobe, the recall measured when it was built and
        whether that met its target (`SearchIndex.summary`).
        """
        summary = self.retriever.search_index(rerank).summary()
        approximate = bool(summary["approximate"])
        return {
            "approximate": approximate,
            "recall": summary.get("recall") if approximate else None,
            "search": summary,
        }

    # -- queries ------------------------------------------------------------------------------

    def decode_upload(self, data: bytes, large: bool = False) -> np.ndarray:
        """An uploaded file's pixels as indexed images are loaded: uint8 [h, w, 3], shrunk.

        Args:
          data: the file's bytes.
          large: an image of more than the large lane's pixels (`cbir_tf.serve.lanes`): a JPEG
            is decoded at a reduced DCT scale, and the heap's free pages are released after.

        Raises:
          RequestError: 400 with the loader's reason (not an image, truncated, bomb, ...).
        """
        if not data:
            raise RequestError(400, "the uploaded file is empty")
        fd, path = tempfile.mkstemp(dir=self._tmp.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return decode.load_resized(
                path, self.retriever.image_size, None, self.max_pixels, draft=large
            )
        except decode.ImageError as e:
            raise RequestError(400, f"the uploaded file cannot be used: {e.reason}") from None
        finally:
            os.unlink(path)
            if large:
                release_memory()

    @one_state
    def search_image(self, data: bytes, k: int, rerank: str, large: bool = False) -> dict[str, Any]:
        """Searches with an uploaded image file; the JSON answer of POST /api/search.

        `large`: see `decode_upload`.
        """
        t0 = time.perf_counter()
        image = self.decode_upload(data, large)
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

    @one_state
    def search_row(
        self, row: int, k: int, rerank: str, image_id: str | None = None
    ) -> dict[str, Any]:
        """Searches with the stored descriptor of an indexed image ("more like this").

        `image_id`, when given, is the image a client saw at `row` (in an earlier state): the
        row it has now is searched, whatever commits moved it (404 once it is not indexed).
        """
        row = self._current_row(row, image_id)
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
            image_id = self._ids[int(r)]
            results.append(
                {
                    "rank": rank,
                    "row": int(r),
                    "id": image_id,
                    "score": round(float(s), 6),
                    # The id keeps the link right after a commit that moves rows.
                    "thumbnail": f"/thumbnails/{int(r)}?id={urllib.parse.quote(image_id)}",
                }
            )
        # The state answered from, and what found these results (an approximate index's
        # recall, or exact search).
        index = {**self.state.summary(), **self.search_report(rerank)["search"]}
        return {"results": results, "k": k, "rerank": rerank, "index": index}

    def _search(self, query: np.ndarray, k: int, rerank: str):
        return self.state.search(query, k, rerank)

    def _current_row(self, row: int, image_id: str | None) -> int:
        """`row`, or the row `image_id` has in the served state when it is elsewhere now."""
        if image_id is None or (0 <= row < len(self._ids) and self._ids[row] == image_id):
            return row
        now = self.retriever.row_of(image_id)
        if now is None:
            raise RequestError(404, f"image {image_id[:200]!r} is no longer indexed")
        return now

    # -- thumbnails ---------------------------------------------------------------------------

    @one_state
    def thumbnail(self, row: int, size: str = "small", image_id: str | None = None) -> bytes:
        """A JPEG of the indexed image at `row`, longest side THUMBNAIL_SIZES[size], cached.

        The file is the one the index records for that row (or, given the `image_id` a result
        named, for that image wherever it is now); nothing in a request names a path.

        Raises:
          RequestError: 404 for an unknown row, size, or an image that is gone or unreadable.
        """
        if size not in THUMBNAIL_SIZES:
            raise RequestError(404, f"unknown thumbnail size {size[:20]!r}")
        row = self._current_row(row, image_id)
        if not 0 <= row < len(self._ids):
            raise RequestError(404, f"no indexed image at row {row}")
        key = (self.state.commit, row, size)
        cached = self._thumbs.get(key)
        if cached is not None:
            return cached
        path = self.retriever.path_of(self._ids[row])
        if path is None:
            raise RequestError(404, f"the file of image {self._ids[row]!r} is unknown")
        try:
            # A JPEG at a reduced DCT scale: a picture to look at, not to describe.
            pixels = decode.load_resized(
                path, THUMBNAIL_SIZES[size], None, self.max_pixels, draft=True
            )
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
    full_check: bool = False,
) -> SearchService:
    """Opens an index (and its model, once) and warms the service up.

    Args:
      index_dir, model, root, rerank: as `Retriever.load`'s.
      full_check: compare every file of the index (and of each state reloaded later) with the
        SHA-256 of its commit (reads every byte); sizes and headers are always checked.

    Raises:
      FileNotFoundError: not an index folder.
      ValueError: an empty or unreadable index.
    """
    kwargs: dict[str, Any] = {"rerank": rerank} if rerank else {}
    kwargs["full_check"] = bool(full_check)
    retriever = Retriever.load(index_dir, model=model, root=root, **kwargs)
    service = SearchService(retriever, index_dir, reopen={"root": root, **kwargs})
    service.warm_up()
    return service
