"""The HTTP search service: a Starlette app served by uvicorn.

Routes:
  GET  /                    the search page (one self-contained HTML file, no external assets)
  POST /api/search          multipart field `image`; query `k` (default 10), `rerank`; or
                            `row=<n>` (no body) to search with an indexed image
  GET  /thumbnails/<row>    JPEG of the indexed image at that row (`?size=large` for the viewer)
  GET  /api/health          liveness and the number of images
  GET  /api/index           image count, model, dimension, approximate index and its recall,
                            and the commit served
  POST /api/reload          from this machine only: serve the index's newest commit now

Errors are JSON `{"error": "<one line>"}` with a 4xx status. Uploads are counted while they
stream in and refused (413) as soon as they pass `max_upload_mb`, before the rest is read.
Decoding, description and search run in worker threads, never on the event loop: at most
`threads` at once, and uploads of large images in a smaller lane of their own
(`cbir_tf.serve.lanes`), so that they never hold the threads of searches by row and small
uploads. Images are addressed by row number only: no route takes a file path, and none
fetches a URL.

The index may grow while it is served: a new commit is noticed within `reload_every` seconds
and served from the next request on (`cbir_tf.serve.reload`); every answer comes from one
committed state and says which (`"index": {"images": ..., "commit": ...}`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cbir_tf.config import default
from cbir_tf.serve.lanes import Lanes
from cbir_tf.serve.params import parse_k, parse_rerank, parse_row, quote
from cbir_tf.serve.reload import IndexWatcher
from cbir_tf.serve.service import RequestError, SearchService

log = logging.getLogger(__name__)

FIELD = "image"
DEFAULT_MAX_UPLOAD_MB = 20.0
# The page runs only its own inline script and style, and loads images from this server.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self' blob:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _TooLarge(Exception):
    pass


def _error(status: int, reason: str) -> JSONResponse:
    # One line: a reason never carries a newline into logs or the page.
    reason = " ".join(str(reason).split())
    return JSONResponse({"error": reason}, status_code=status, headers=_HEADERS)


@functools.cache
def _page() -> bytes:
    return importlib.resources.files("cbir_tf.serve").joinpath("page.html").read_bytes()


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, raising _TooLarge once more than `limit` bytes came."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _TooLarge()
        yield chunk


async def _read_upload(request: Request, limit: int) -> bytes:
    """The bytes of the multipart field `image`, or RequestError with the reason."""
    length = request.headers.get("content-length")
    # Digits past the limit's own length are too many (and never reach int(): see params.py).
    if length is not None and length.isascii() and length.isdigit():
        digits = length.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            size = length if len(length) <= 20 else quote(length, 20)
            raise RequestError(413, f"upload of {size} bytes exceeds the limit of {limit}")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise RequestError(400, f"send the photo as multipart/form-data field {FIELD!r}")
    parser = MultiPartParser(
        request.headers, _limited(request, limit), max_files=1, max_fields=8,
        max_part_size=64 * 1024,
    )  # fmt: skip
    try:
        form = await parser.parse()
    except _TooLarge:
        raise RequestError(413, f"upload exceeds the limit of {limit} bytes") from None
    except MultiPartException as e:
        raise RequestError(400, f"malformed multipart upload: {e.message}") from None
    try:
        upload = form.get(FIELD)
        if upload is None or isinstance(upload, str):
            names = ", ".join(quote(n) for n in form.keys()) or "none"
            raise RequestError(400, f"no file in the multipart field {FIELD!r} (fields: {names})")
        return await upload.read()
    finally:
        await form.close()


def create_app(
    service: SearchService,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    threads: int | None = None,
    large_decodes: int = default("serve.large_decodes"),
    large_image_pixels: int = default("serve.large_image_pixels"),
    reload_every: float = default("search.reload_every"),
) -> Starlette:
    """The ASGI app over a service.

    Args:
      service: the opened index (`cbir_tf.serve.service.open_service`).
      max_upload_mb: the largest accepted request body, MiB.
      threads: worker threads for decoding and search (default: the usable cores, at least 2).
      large_decodes: uploads of large images decoded at once, in threads of their own.
      large_image_pixels: uploads whose header declares more pixels are large.
      reload_every: seconds between checks for a new commit of the index while serving (0:
        only on POST /api/reload).
    """
    limit = int(max_upload_mb * 2**20)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or max(2, cores or 1)
    lanes = Lanes(
        threads=threads, large_decodes=large_decodes, large_image_pixels=large_image_pixels
    )

    async def page(request: Request) -> Response:
        return HTMLResponse(_page(), headers=_HEADERS)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "images": len(service)}, headers=_HEADERS)

    async def index_info(request: Request) -> Response:
        return JSONResponse(service.info(), headers=_HEADERS)

    async def search(request: Request) -> Response:
        start = time.perf_counter()
        try:
            k = parse_k(request.query_params.get("k"))
            rerank = parse_rerank(request.query_params.get("rerank"))
            row = request.query_params.get("row")
            if row is not None:
                image_id = request.query_params.get("id")
                out = await lanes.run(service.search_row, parse_row(row), k, rerank, image_id)
            else:
                data = await _read_upload(request, limit)
                received = time.perf_counter()
                out = await lanes.run_upload(data, service.search_image, k, rerank)
                out["timing_ms"]["upload"] = round((received - start) * 1000, 2)
        except RequestError as e:
            return _error(e.status, e.reason)
        except ClientDisconnect:
            return _error(400, "the client disconnected during the upload")
        out["timing_ms"]["total"] = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse(out, headers=_HEADERS)

    async def thumbnail(request: Request) -> Response:
        row = request.path_params["row"]
        if not (row.isascii() and row.isdigit()):  # a name, '-1', '..': no such thumbnail
            return _error(404, f"not found: {request.method} {request.url.path[:200]}")
        try:
            size = request.query_params.get("size", "small")
            image_id = request.query_params.get("id")
            data = await lanes.run(
                service.thumbnail, parse_row(row, "a thumbnail's row"), size, image_id
            )
        except RequestError as e:
            return _error(e.status, e.reason)
        headers = {**_HEADERS, "Cache-Control": "public, max-age=3600"}
        return Response(data, media_type="image/jpeg", headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        reason = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, f"{reason}: {request.method} {request.url.path[:200]}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path[:200])
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    watcher = IndexWatcher(service, reload_every)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/index", index_info, methods=["GET"]),
        Route("/api/search", search, methods=["POST"]),
        Route("/api/reload", reload_route(watcher, lanes.run), methods=["POST"]),
        # One path segment, then digits only: '..', encoded slashes or absolute paths never
        # reach a file (parsed by `thumbnail`, not `{row:int}`, whose int() of 5000 digits
        # raised a 500).
        Route("/thumbnails/{row}", thumbnail, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=_watching(watcher))


def _watching(watcher: IndexWatcher):
    """The app's lifespan: the reload thread runs while the app serves."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(watcher.stop)

    return lifespan


def reload_route(watcher: IndexWatcher, off_loop):
    """POST /api/reload: serves the index's newest commit now; only from this machine."""

    async def reload(request: Request) -> Response:
        host = request.client.host if request.client else ""
        if not is_loopback(host):
            return _error(403, "reload is only accepted from this machine")
        return JSONResponse(await off_loop(watcher.check), headers=_HEADERS)

    return reload


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    threads: int | None = None,
    model: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    large_decodes: int = default("serve.large_decodes"),
    large_image_pixels: int = default("serve.large_image_pixels"),
    reload_every: float = default("search.reload_every"),
    full_check: bool = False,
    rerank: Any = None,
) -> None:
    """What `serve.py` runs: opens the index, loads the model once, serves until interrupted.

    New commits of the index are served within `reload_every` seconds (see
    `cbir_tf.serve.reload`); `full_check` compares every file with its checksum at the start and
    at each reload. `rerank` (a config's `rerank` block, e.g. of an `evaluate.py --tune` config)
    replaces the re-ranking settings saved with the index; None keeps them.

    Raises:
      FileNotFoundError: not an index folder.
      ValueError: an empty index or a bad setting.
    """
    import uvicorn

    from cbir_tf.serve.service import open_service

    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {port}")
    if max_upload_mb <= 0:
        raise ValueError(f"--max_upload_mb must be positive, got {max_upload_mb}")
    if not is_loopback(host):
        log.warning(
            "serving on %s: reachable from other machines, as --host asked (the default "
            "127.0.0.1 is reachable from this machine only)", host,
        )  # fmt: skip
    from threadpoolctl import threadpool_limits

    # Requests already run in parallel threads; a BLAS pool per product only adds wake-ups:
    # multi-threaded OpenBLAS made the [1, D] x [D, N] product of a search 7x slower here.
    threadpool_limits(limits=1, user_api="blas")
    service = open_service(index_dir, model=model, root=root, full_check=full_check, rerank=rerank)
    log.info(
        "index %s: %d images (commit %s); serving on http://%s:%d/",
        index_dir, len(service), service.state.commit, host, port,
    )  # fmt: skip
    app = create_app(
        service, max_upload_mb=max_upload_mb, threads=threads, large_decodes=large_decodes,
        large_image_pixels=large_image_pixels, reload_every=reload_every,
    )  # fmt: skip
    with contextlib.closing(service):
        uvicorn.run(app, host=host, port=int(port), log_level="info", access_log=False)
