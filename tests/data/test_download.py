"""Resumable downloads and the COMPLETE marker (no network)."""

from __future__ import annotations

import email.message
import hashlib
import io
import json
import os
import socket
import urllib.error

import pytest
from file_server import RangeServer

from cbir_tf.data import download as dl
from cbir_tf.data.download import (
    ChecksumError,
    DatasetUnavailableError,
    download_file,
    read_complete_marker,
    remove_complete_marker,
    write_complete_marker,
)

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    s = RangeServer()
    s.files["/data.bin"] = PAYLOAD
    yield s
    s.close()


def test_download_whole_file_checks_sha_and_leaves_no_part(server, tmp_path):
    dest = tmp_path / "sub" / "data.bin"
    out = download_file(server.url("/data.bin"), dest, sha256=SHA, progress=True)
    assert out == str(dest)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert server.requests == [("/data.bin", None)]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.die_after["/data.bin"] = 100_000
    with pytest.raises(DatasetUnavailableError) as exc:
        download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False, retries=0)
    msg = str(exc.value)
    assert "100000 bytes received so far are kept" in msg and str(dest) in msg
    part = tmp_path / "data.bin.part"
    assert not dest.exists(), "an interrupted download must never look finished"
    assert part.read_bytes() == PAYLOAD[:100_000]

    download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False, retries=0)
    assert server.requests[-1] == ("/data.bin", "bytes=100000-")
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_dropped_connection_is_retried_within_one_call(server, tmp_path):
    server.die_after["/data.bin"] = 12_345
    dest = tmp_path / "data.bin"
    download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False, retry_wait=0)
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, "bytes=12345-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    # A partial file whose bytes are not a prefix of the payload: appending to it would give
    # a corrupt file, so the 200 answer must replace it.
    (tmp_path / "data.bin.part").write_bytes(b"x" * 5000)
    download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False)
    assert server.requests == [("/data.bin", "bytes=5000-")]
    assert dest.read_bytes() == PAYLOAD


def test_part_already_whole_is_finished_on_416(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # killed between last byte and rename
    download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_part_longer_than_remote_restarts(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD + b"extra")  # remote file shrank
    download_file(server.url("/data.bin"), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_sha_mismatch_is_refused_and_the_bad_file_deleted(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError, match=f"has sha256 {SHA}, not the expected 0+"):
        download_file(server.url("/data.bin"), dest, sha256="0" * 64, progress=False)
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_existing_file_with_right_sha_needs_no_network(tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used")

    assert download_file("http://x.invalid/d", dest, sha256=SHA, opener=no_network) == str(dest)


def test_existing_file_with_wrong_sha_is_refused_untouched(tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="Delete it to download it again"):
        download_file("http://x.invalid/d", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == b"something else"


def test_http_error_names_status_url_and_destination(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(DatasetUnavailableError) as exc:
        download_file(server.url("/missing.bin"), dest, progress=False, retry_wait=0)
    msg = str(exc.value)
    assert "HTTP 404" in msg and server.url("/missing.bin") in msg and str(dest) in msg
    assert len(server.requests) == 1, "a 404 is not worth retrying"


def test_offline_message_names_url_and_place_without_traceback(tmp_path):
    calls = []

    def offline(request, timeout):
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    dest = tmp_path / "gnd_x.pkl"
    with pytest.raises(DatasetUnavailableError) as exc:
        download_file("http://example.org/gnd_x.pkl", dest, opener=offline, timeout=7.5)
    msg = str(exc.value)
    assert "http://example.org/gnd_x.pkl" in msg
    assert f"place it at {dest}" in msg
    assert "Name or service not known" in msg
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    assert calls == [("http://example.org/gnd_x.pkl", 7.5)], "offline: fail fast, no retries"


class _FakeResponse:
    """What an opener returns: status, headers, read(n), close()."""

    def __init__(self, status, body, headers, fail_after=None):
        self.status = status
        self.headers = email.message.Message()
        for k, v in headers.items():
            self.headers[k] = v
        self._body = io.BytesIO(body)
        self._fail_after = fail_after
        self._sent = 0

    def read(self, n):
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise ConnectionResetError("connection reset by peer")
        if self._fail_after is not None:
            n = min(n, self._fail_after - self._sent)
        chunk = self._body.read(n)
        self._sent += len(chunk)
        return chunk

    def close(self):
        pass


def test_fake_opener_connection_reset_then_resume(tmp_path):
    """The same resume logic through an injected opener (no socket at all)."""
    seen = []

    def opener(request, timeout):
        rng = request.get_header("Range")
        seen.append(rng)
        if rng is None:  # first attempt: the connection resets after 50 000 bytes
            return _FakeResponse(200, PAYLOAD, {"Content-Length": str(len(PAYLOAD))}, 50_000)
        start = int(rng.split("=")[1].rstrip("-"))
        return _FakeResponse(
            206,
            PAYLOAD[start:],
            {
                "Content-Length": str(len(PAYLOAD) - start),
                "Content-Range": f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}",
            },
        )

    dest = tmp_path / "f.bin"
    with pytest.raises(DatasetUnavailableError, match="connection reset"):
        download_file("http://h/f.bin", dest, SHA, progress=False, opener=opener, retries=0)
    assert (tmp_path / "f.bin.part").stat().st_size == 50_000
    download_file("http://h/f.bin", dest, SHA, progress=False, opener=opener, retries=0)
    assert seen == [None, "bytes=50000-"]
    assert dest.read_bytes() == PAYLOAD


def test_wrong_content_range_restarts(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])
    seen = []

    def opener(request, timeout):
        seen.append(request.get_header("Range"))
        if request.get_header("Range"):  # answers another range than the one asked for
            return _FakeResponse(206, PAYLOAD[10:], {"Content-Range": "bytes 10-299999/300000"})
        return _FakeResponse(200, PAYLOAD, {"Content-Length": str(len(PAYLOAD))})

    download_file("http://h/f.bin", tmp_path / "f.bin", SHA, progress=False, opener=opener)
    assert seen == ["bytes=1000-", None]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------------------------
# COMPLETE marker
# ----------------------------------------------------------------------------------------------


def test_complete_marker_roundtrip_and_invalid_markers(tmp_path):
    assert read_complete_marker(tmp_path) is None
    path = write_complete_marker(tmp_path, {"dataset": "x", "files": {"a": {"size": 1}}})
    rec = read_complete_marker(tmp_path)
    assert rec["dataset"] == "x" and rec["files"] == {"a": {"size": 1}} and rec["complete"]
    assert json.loads(open(path).read()) == rec
    # No temporary file left next to it.
    assert sorted(os.listdir(tmp_path)) == [dl.COMPLETE_MARKER]

    (tmp_path / dl.COMPLETE_MARKER).write_text('{"complete": tr')  # torn write
    assert read_complete_marker(tmp_path) is None
    (tmp_path / dl.COMPLETE_MARKER).write_text('{"complete": false}')
    assert read_complete_marker(tmp_path) is None
    (tmp_path / dl.COMPLETE_MARKER).write_text("[1, 2]")
    assert read_complete_marker(tmp_path) is None
    remove_complete_marker(tmp_path)
    remove_complete_marker(tmp_path)  # idempotent
    assert not (tmp_path / dl.COMPLETE_MARKER).exists()


def test_file_sha256_matches_hashlib(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(PAYLOAD)
    assert dl.file_sha256(p, chunk_size=4096) == SHA
