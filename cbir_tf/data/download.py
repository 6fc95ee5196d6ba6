"""Downloads that survive bad networks, and the marker of a finished dataset folder.

Benchmark files are large (the Oxford and Paris image archives are 1-2 GB each) and come from
servers that drop connections, so `download_file` resumes a partial download with an HTTP
Range request, checks a sha256 when one is known, and renames the result into place only when
it is whole. A `COMPLETE` marker, written last and atomically, tells a finished dataset folder
from one left behind by an interrupted run. Archives are unpacked by `cbir_tf.data.archive`.

No TensorFlow: standard library, `cbir_tf.progressbar` for the progress bar, `cbir_tf.fileio`
for atomic writes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from cbir_tf import fileio as cio

COMPLETE_MARKER = "COMPLETE"
"""Name of the marker file that a finished dataset folder holds."""

_USER_AGENT = "cbir-tf (benchmark downloader; +https://github.com/)"

Opener = Callable[..., Any]
"""`opener(request: urllib.request.Request, timeout: float) -> response`; the response has
`status` (or `getcode()`), `headers` (with `.get`), `read(n)` and `close()`. Default:
`urllib.request.urlopen`. Tests inject a fake one."""


class DatasetUnavailableError(RuntimeError):
    """A dataset (or one of its files) is missing and could not be obtained.

    The message says what is missing, why, and which files to place where by hand.
    """


class ChecksumError(DatasetUnavailableError):
    """A downloaded or placed file does not have the expected sha256."""


# ----------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Download with resume
# ----------------------------------------------------------------------------------------------


class _TransientError(Exception):
    """A failure worth retrying (connection dropped, timeout, short body, 5xx)."""


class _RestartError(Exception):
    """The partial file cannot be continued; start again from byte 0."""


# Errors that end one attempt; anything else is a bug and propagates unchanged.
_DOWNLOAD_ERRORS = (
    _TransientError,
    urllib.error.URLError,
    http.client.HTTPException,
    OSError,
    ValueError,  # urllib: unknown URL type; a malformed Content-Length
)


def _is_transient(exc: BaseException) -> bool:
    """True for failures that another attempt may not meet (network hiccups, busy server)."""
    if isinstance(exc, _TransientError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 425, 429) or exc.code >= 500
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        # No DNS or nothing listening: the machine is offline or the host is gone; retrying
        # only delays the message that tells the user what to do.
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):
            return False
        return isinstance(reason, (TimeoutError, ConnectionError))
    # A local OSError (disk full, permissions) is not cured by retrying.
    return isinstance(exc, (TimeoutError, ConnectionError, http.client.HTTPException))


def _status(resp: Any) -> int:
    status = getattr(resp, "status", None)
    if status is None:
        status = resp.getcode()
    return int(status)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)
_CONTENT_RANGE_UNSAT = re.compile(r"bytes\s+\*/(\d+)", re.I)


def _fetch_into(
    url: str,
    part: str,
    opener: Opener,
    timeout: float,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Appends the rest of `url` to `part` (creating it); raises on any incomplete transfer."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = opener(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left to send from `offset`: the part is whole if its size is the
            # server's size; otherwise the remote file changed and we must start over.
            m = _CONTENT_RANGE_UNSAT.search(e.headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == offset:
                return
            raise _RestartError(f"server refused the range from byte {offset}") from None
        raise
    with contextlib.closing(resp):
        status = _status(resp)
        length = resp.headers.get("Content-Length")
        total: int | None = None
        if status == 206:
            m = _CONTENT_RANGE.search(resp.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:
                raise _RestartError("server answered a different byte range")
            if m.group(3) != "*":
                total = int(m.group(3))
            elif length is not None:
                total = offset + int(length)
            mode = "ab" if offset else "wb"
        elif status == 200:
            # The server ignored the Range header (or none was sent): the body is the whole
            # file, so the partial one is rewritten from the start.
            offset = 0
            total = int(length) if length is not None else None
            mode = "wb"
        else:
            raise urllib.error.HTTPError(url, status, f"unexpected HTTP status {status}", {}, None)

        received = 0
        from cbir_tf.progressbar import progress_bar  # deferred: tqdm only when downloading

        with (
            open(part, mode) as f,
            progress_bar(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while True:
                    chunk = resp.read(chunk_size)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                # Whatever arrived is kept on disk, so the next attempt continues from it.
                f.flush()
                os.fsync(f.fileno())
    if total is not None:
        have = offset + received
        if have < total:
            raise _TransientError(f"connection closed after {have} of {total} bytes")
        if have > total:
            raise _RestartError(f"received {have} bytes, more than the announced {total}")


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    opener: Opener | None = None,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    retry_wait: float = 2.0,
    chunk_size: int = 1 << 20,
) -> str:
    """Downloads `url` to `dest`, resuming a partial download and checking its sha256.

    Bytes arrive in `<dest>.part`; an interrupted download (this run's or an earlier run's)
    continues from the bytes already there with an HTTP Range request (from byte 0 when the
    server ignores Range). The file is renamed to `dest` only once it is whole and, when
    `sha256` is given, has that hash, so `dest` existing means the download finished.

    Args:
      url: http(s) URL (anything the opener accepts).
      dest: final path; its folder is created.
      sha256: expected hex digest, or None to skip the check.
      progress: show a progress bar (plain lines when stderr is a file or a pipe).
      opener: `opener(request, timeout=...) -> response`, default `urllib.request.urlopen`.
      timeout: seconds for connecting and for each read.
      retries: extra attempts after a transient failure (dropped connection, timeout, 5xx);
        each one resumes from the bytes already received.
      retry_wait: seconds before the first retry (grows linearly).
      chunk_size: bytes per read.

    Returns:
      `dest` as a string.

    Raises:
      ChecksumError: the downloaded file (or an existing `dest`) has another sha256; a bad
        download is deleted so that the next run starts afresh.
      DatasetUnavailableError: the file could not be downloaded; the message names the URL and
        the place to put the file by hand. The partial file is kept for the next run.
    """
    dest = os.fspath(dest)
    expected = sha256.lower() if sha256 else None
    if os.path.isfile(dest):
        if expected is None:
            return dest
        got = file_sha256(dest)
        if got == expected:
            return dest
        raise ChecksumError(
            f"{dest} exists but its sha256 is {got}, not the expected {expected}. "
            f"Delete it to download it again from {url}, or replace it with the right file."
        )
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    opener = opener or urllib.request.urlopen
    desc = os.path.basename(dest)
    failures = 0
    restarts = 0
    while True:
        try:
            _fetch_into(url, part, opener, timeout, chunk_size, progress, desc)
            break
        except _RestartError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            restarts += 1
            if restarts > 2:
                raise DatasetUnavailableError(
                    f"could not download {url}: {e}. Download it by hand and place it at {dest}."
                ) from None
        except _DOWNLOAD_ERRORS as e:
            failures += 1
            if _is_transient(e) and failures <= retries:
                time.sleep(retry_wait * failures)
                continue
            have = os.path.getsize(part) if os.path.exists(part) else 0
            kept = (
                f" The {have} bytes received so far are kept in {part}; running again resumes."
                if have
                else ""
            )
            raise DatasetUnavailableError(
                f"could not download {url} ({_describe(e)}).{kept} "
                f"Without network access, download it elsewhere and place it at {dest}."
            ) from None

    got = file_sha256(part)
    if expected is not None and got != expected:
        os.unlink(part)
        raise ChecksumError(
            f"the file downloaded from {url} has sha256 {got}, not the expected {expected}; "
            f"it was deleted. The server may have sent an error page or a changed file: check "
            f"the URL, or place the right file at {dest}."
        )
    os.replace(part, dest)
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return dest


def _fsync_dir(path: str) -> None:
    """Makes a rename durable (best effort: some file systems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error: {exc.reason}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, _TransientError) else text


# ----------------------------------------------------------------------------------------------
# Completion marker
# ----------------------------------------------------------------------------------------------


def write_complete_marker(folder: str | os.PathLike, info: dict[str, Any]) -> str:
    """Writes `<folder>/COMPLETE` atomically; call it last, once everything is verified.

    Args:
      folder: the dataset folder.
      info: what was verified (files with sizes/hashes, image counts...), stored as JSON.

    Returns:
      The marker's path.
    """
    from cbir_tf import __version__

    path = os.path.join(os.fspath(folder), COMPLETE_MARKER)
    record = {
        "complete": True,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cbir_tf_version": __version__,
        **info,
    }
    cio.atomic_write_json(path, record)
    return path


def read_complete_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the marker's content, or None when the folder holds no valid marker."""
    path = os.path.join(os.fspath(folder), COMPLETE_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("complete") is not True:
        return None
    return record


def remove_complete_marker(folder: str | os.PathLike) -> None:
    """Removes the marker (before a folder is modified, so a crash cannot leave it behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(os.fspath(folder), COMPLETE_MARKER))
    _fsync_dir(os.fspath(folder))
