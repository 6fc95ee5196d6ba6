"""The search service (cbir_tf.serve, serve.py): the real server on a loopback port.

One uvicorn server runs in a thread over a small index (a small random conv net at 80 px) for
the whole module. Tests speak HTTP to it: searches, hostile requests (each followed by an
ordinary query that must still succeed), path traversal, and the page in headless Chromium.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from photos import synthetic_photo
from PIL import Image

from cbir_tf.serve import client

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PHOTOS = 8
MAX_UPLOAD_MB = 1.0


def _start(app):
    """Runs `app` with uvicorn in a thread on a free loopback port: (server, thread, port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization
    from cbir_tf.retriever import Retriever
    from cbir_tf.serve import app as serve_app
    from cbir_tf.serve import service as service_lib

    base = tmp_path_factory.mktemp("serve")
    photos = base / "photos"
    for i in range(NUM_PHOTOS):
        synthetic_photo(photos / ("sub" if i % 3 == 0 else "") / f"p{i}.jpg", i)
    # A small random conv net (as test_retriever's): distinct descriptors, fast on 2 cores.
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    r = Retriever(model, image_size=80, rerank={"diffusion": {"k": 3}})
    r.index(str(photos), progress=False)
    r.save(base / "index")
    service = service_lib.open_service(base / "index", rerank={"diffusion": {"k": 3}})
    app = serve_app.create_app(service, max_upload_mb=MAX_UPLOAD_MB, threads=4)
    server, thread, port = _start(app)
    yield {"port": port, "photos": str(photos), "service": service, "index": str(base / "index")}
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


@pytest.fixture
def conn(served):
    c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    yield c
    c.close()


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _query(served, name="sub/p3.jpg"):
    return os.path.join(served["photos"], *name.split("/")), name


def _assert_still_serving(served):
    """An ordinary query on a fresh connection finds its own image first."""
    path, image_id = _query(served, "p4.jpg")
    c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    try:
        status, answer = client.search(c, _bytes(path), k=3)
    finally:
        c.close()
    assert status == 200, answer
    assert answer["results"][0]["id"] == image_id


def test_search_finds_the_query_image_first(served, conn):
    path, image_id = _query(served)
    status, answer = client.search(conn, _bytes(path), k=5)
    assert status == 200, answer
    results = answer["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert results[0]["id"] == image_id and results[0]["score"] > 0.999
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    row = results[0]["row"]
    assert results[0]["thumbnail"] == f"/thumbnails/{row}?id=sub/p3.jpg"
    assert {"decode", "describe", "search", "upload", "total"} <= set(answer["timing_ms"])
    commit = served["service"].state.commit
    expected = {"images": NUM_PHOTOS, "commit": commit, "approximate": False, "kind": "exact"}
    assert answer["index"] == expected
    # Same ranking over HTTP as the library gives.
    lib = served["service"].retriever.search(path, k=5)
    assert [r["id"] for r in results] == [h.id for h in lib]
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in lib], atol=1e-5)
    # Defaults: k=10 clamped to the index size; every re-ranking method answers.
    status, answer = client.search(conn, _bytes(path))
    assert status == 200 and len(answer["results"]) == NUM_PHOTOS
    for method in ("aqe", "diffusion", "aqe+diffusion"):
        status, answer = client.search(conn, _bytes(path), k=3, rerank=method)
        assert status == 200 and answer["rerank"] == method, answer
        lib = served["service"].retriever.search(path, k=3, rerank=method)
        assert [r["id"] for r in answer["results"]] == [h.id for h in lib]


def test_search_with_an_indexed_row(served, conn):
    status, data, _ = client.request(conn, "POST", "/api/search?row=2&k=3")
    answer = json.loads(data)
    assert status == 200 and answer["results"][0]["row"] == 2
    assert answer["query"]["id"] == served["service"].retriever.ids[2]
    status, data, _ = client.request(conn, "POST", f"/api/search?row={NUM_PHOTOS}")
    assert status == 404 and "no indexed image at row" in json.loads(data)["error"]


def test_thumbnails_health_index_and_page(served, conn):
    status, data, headers = client.request(conn, "GET", "/thumbnails/1")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and thumb.size == (96, 72)  # never enlarged
    assert client.request(conn, "GET", "/thumbnails/1")[1] == data  # cached, same bytes
    assert client.request(conn, "GET", "/thumbnails/1?size=large")[0] == 200
    status, data, _ = client.request(conn, "GET", "/api/health")
    assert status == 200 and json.loads(data) == {"status": "ok", "images": NUM_PHOTOS}
    status, data, _ = client.request(conn, "GET", "/api/index")
    info = json.loads(data)
    assert info["images"] == NUM_PHOTOS and info["dimension"] == 32
    assert info["image_size"] == 80 and info["approximate"] is False and info["recall"] is None
    assert info["search"] == {"approximate": False, "kind": "exact"}
    assert info["rerank_methods"][0] == "none"
    status, data, headers = client.request(conn, "GET", "/")
    page = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    # Offline: no reference to another host (CDN, fonts, scripts).
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


def _hostile_cases(served):
    photo = _bytes(_query(served)[0])
    from png_bytes import bomb_png

    tiny = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(tiny, "PNG")  # below the net's valid convolutions
    return [
        # (what, path, body, content-type, status, words of the reason)
        ("tiny", "/api/search", tiny.getvalue(), None, 400, "cannot describe this 2x2 image"),
        ("non-image", "/api/search", b"hello, not a photo\n" * 10, None, 400, "not an image"),
        ("truncated", "/api/search", photo[: len(photo) // 2], None, 400, "truncated"),
        ("bomb", "/api/search", bomb_png(), None, 400, "decompression bomb"),
        ("empty", "/api/search", b"", None, 400, "empty"),
        ("k=0", "/api/search?k=0", photo, None, 400, "k must be from 1"),
        ("k=abc", "/api/search?k=abc", photo, None, 400, "k must be an integer"),
        ("k huge", "/api/search?k=1000001", photo, None, 400, "k must be from 1"),
        ("rerank", "/api/search?rerank=magic", photo, None, 400, "unknown rerank 'magic'"),
        ("row", "/api/search?row=-1", b"", "text/plain", 400, "row must be a row number"),
        ("row ²", "/api/search?row=%C2%B2", b"", "text/plain", 400, "row must be a row number"),
        ("not multipart", "/api/search", photo, "image/jpeg", 400, "multipart/form-data"),
        ("bad multipart", "/api/search", b"--x\r\nxx", "multipart/form-data", 400, "multipart"),
        ("over limit", "/api/search", b"\0" * int(MAX_UPLOAD_MB * 2**20 + 1), None, 413, "limit"),
    ]


def test_hostile_requests_get_4xx_with_a_reason_and_the_server_keeps_serving(served, conn):
    for what, path, payload, ctype, status, words in _hostile_cases(served):
        if ctype is None:
            body, ctype = client.multipart_body("image", "x.jpg", payload)
        else:
            body = payload
        c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
        got, data, headers = client.request(c, "POST", path, body, {"Content-Type": ctype})
        c.close()
        reason = json.loads(data)["error"]
        assert got == status, f"{what}: {got} {reason}"
        assert words in reason and "\n" not in reason, f"{what}: {reason}"
        _assert_still_serving(served)
    # The wrong field name, and a URL where the photo should be: no file, and nothing fetched.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/photo.jpg"
    body, ctype = client.multipart_body("photo", "x.jpg", _bytes(_query(served)[0]))
    got, data, _ = client.request(conn, "POST", "/api/search", body, {"Content-Type": ctype})
    assert got == 400 and "no file in the multipart field 'image'" in json.loads(data)["error"]
    text = f'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n{url}\r\n--b--\r\n'
    got, data, _ = client.request(
        conn, "POST", "/api/search?url=" + url, text.encode(),
        {"Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    assert got == 400 and "no file" in json.loads(data)["error"]
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    _assert_still_serving(served)


def test_upload_limit_is_enforced_while_streaming(served):
    """A chunked upload without Content-Length is refused before the client finishes sending."""
    limit = int(MAX_UPLOAD_MB * 2**20)
    total = 64 * limit  # what the client would send if the server kept reading
    sock = socket.create_connection(("127.0.0.1", served["port"]), timeout=30)
    head = (
        "POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(part), part))
    chunk = b"\0" * 65536
    sent = 0
    sock.settimeout(0.5)
    reply = b""
    try:
        while sent < total and not reply:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if sent > limit:
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    while b"\r\n\r\n" not in reply:
        more = sock.recv(65536)
        if not more:
            break
        reply += more
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 4 * limit, f"the server read {sent} bytes before refusing"
    _assert_still_serving(served)


TRAVERSALS = [
    "/thumbnails/../../etc/passwd",
    "/thumbnails/..%2f..%2f..%2fetc%2fpasswd",
    "/thumbnails/%2e%2e/%2e%2e/etc/passwd",
    "/thumbnails/%252e%252e%252fetc%252fpasswd",
    "/thumbnails//etc/passwd",
    "/thumbnails/%2Fetc%2Fpasswd",
    "/thumbnails/1/../../../../etc/passwd",
    "/thumbnails/0%00/etc/passwd",
    "/thumbnails/-1",
    "/thumbnails/1?size=../../../etc/passwd",
    "/thumbnails/p1.jpg",
    "/thumbnails/sub%2Fp0.jpg",
    "//etc/passwd",
    "/etc/passwd",
    "/../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/api/../../etc/passwd",
    "/page.html",
    "/static/../../etc/passwd",
    "/api/search/..%2f..%2fetc%2fpasswd",
    "/api/index/../../../etc/passwd",
    "/api/health/%2e%2e%2f%2e%2e%2fetc/passwd",
]


def test_path_traversal_gets_404_and_reads_nothing_outside_the_images(served, monkeypatch):
    from cbir_tf.data import decode

    opened = []
    real = decode.load_resized

    def spy(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decode, "load_resized", spy)
    for path in TRAVERSALS:
        c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
        c.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        c.endheaders()
        resp = c.getresponse()
        data = resp.read()
        c.close()
        assert resp.status == 404, f"{path}: {resp.status}"
        assert b"root:" not in data and json.loads(data)["error"]
    # The upload's file name is never used as a path.
    evil = os.path.join(served["photos"], "..", "..", "evil.jpg")
    c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    status, answer = client.search(c, _bytes(_query(served)[0]), filename="../../evil.jpg")
    c.close()
    assert status == 200 and not os.path.exists(evil)
    photos = os.path.realpath(served["photos"])
    tmp = os.path.realpath(served["service"]._tmp.name)
    assert all(p.startswith((photos + os.sep, tmp + os.sep)) for p in opened), opened
    assert any(p.startswith(tmp + os.sep) for p in opened)  # the upload, in private scratch
    _assert_still_serving(served)


def test_searches_run_concurrently_and_off_the_event_loop(served, monkeypatch):
    service = served["service"]
    paths = [os.path.join(served["photos"], f"p{i}.jpg") for i in (1, 2, 4, 5)]
    results, errors = {}, []

    def worker(i):
        c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
        try:
            for _ in range(3):
                status, answer = client.search(c, _bytes(paths[i % 4]), k=2)
                assert status == 200, answer
                results.setdefault(i, []).append(answer["results"][0]["id"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, ids in results.items():
        assert ids == [os.path.basename(paths[i % 4])] * 3

    # While a search is stuck in its worker thread, the event loop still answers others.
    release, entered = threading.Event(), threading.Event()
    real = service.search_image

    def slow(*args):
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(service, "search_image", slow)
    stuck = threading.Thread(target=_assert_still_serving, args=(served,))
    stuck.start()
    try:
        assert entered.wait(30)
        c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=5)
        assert client.request(c, "GET", "/api/health")[0] == 200
        c.close()
    finally:
        release.set()
        stuck.join(timeout=60)


@pytest.mark.slow
def test_serve_py_serves_an_index_and_stops_on_ctrl_c(served):
    """The entry point end to end: a child process on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "serve.py", f"--index={served['index']}", f"--port={port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            assert time.monotonic() < deadline, "serve.py did not answer within 120 s"
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                status, data, _ = client.request(c, "GET", "/api/health")
                break
            except OSError:
                time.sleep(0.3)
        assert status == 200 and json.loads(data)["images"] == NUM_PHOTOS
        path, image_id = _query(served)
        status, answer = client.search(c, _bytes(path), k=1)
        c.close()
        assert status == 200 and answer["results"][0]["id"] == image_id
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-2000:]
    assert f"serving on http://127.0.0.1:{port}/" in out


@pytest.mark.slow
def test_serve_cli_reports_a_missing_index_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "serve.py", f"--index={tmp_path / 'nope'}", "--port=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is not an image index" in last


def test_only_loopback_hosts_count_as_local():
    from cbir_tf.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert not is_loopback("example.org")


# -- hostile numbers and parameters (issue 24 item 7) --------------------------------------------


def test_overlong_numbers_and_parameters_get_a_short_400_and_no_traceback(served, caplog):
    digits = "7" * 5000  # past Python's int() limit of 4300 digits
    photo = _bytes(_query(served)[0])
    cases = [
        # (method, path, photo sent, words of the reason)
        ("POST", f"/api/search?row={digits}", False, "row must be a row number"),
        ("POST", "/api/search?row=12345678901234567890", False, "at most 19 digits"),
        ("GET", f"/thumbnails/{digits}", False, "row must be a row number"),
        ("GET", "/thumbnails/999999999999999999999999", False, "at most 19 digits"),
        ("POST", f"/api/search?k={digits}", True, "k must be an integer from 1 to 1000"),
        ("POST", f"/api/search?k={'x' * 5000}", True, "k must be an integer from 1 to 1000"),
        ("POST", "/api/search?k=5_0", True, "k must be an integer"),
        ("POST", f"/api/search?rerank={'x' * 5000}", True, "unknown rerank 'xxx"),
    ]
    with caplog.at_level(logging.ERROR):
        for method, path, with_photo, words in cases:
            body, ctype = client.multipart_body("image", "x.jpg", photo) if with_photo else (
                b"", "text/plain")  # fmt: skip
            c = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
            got, data, _ = client.request(c, method, path, body, {"Content-Type": ctype})
            c.close()
            reason = json.loads(data)["error"]
            assert got == 400, f"{path[:60]}: {got} {reason[:300]}"
            assert words in reason and len(reason) < 200, f"{path[:60]}: {reason[:300]}"
            if len(path) > 5000:  # the value is quoted, not echoed
                assert "(5000 characters)" in reason, reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors  # nothing was a server error
    _assert_still_serving(served)


def test_rerank_plus_typed_unencoded_is_read_as_plus(served, conn):
    path, _ = _query(served)
    lib = [h.id for h in served["service"].retriever.search(path, k=3, rerank="aqe+dba")]
    body, ctype = client.multipart_body("image", "x.jpg", _bytes(path))
    # 'aqe+dba' typed into a URL as is: the query string decodes '+' to a space.
    for raw in ("aqe+dba", "aqe%2Bdba", "aqe%20dba"):
        status, data, _ = client.request(
            conn, "POST", f"/api/search?k=3&rerank={raw}", body, {"Content-Type": ctype}
        )
        answer = json.loads(data)
        assert status == 200, (raw, answer)
        assert answer["rerank"] == "aqe+dba" and [r["id"] for r in answer["results"]] == lib


# -- large uploads in a lane of their own (issue 24 item 2) ----------------------------------------


def _blocking_large_decodes(service, monkeypatch):
    """Makes the decodes of large uploads wait for an event; returns (release, state)."""
    release = threading.Event()
    state = {"running": 0, "most": 0, "large": 0, "small": 0}
    lock = threading.Lock()
    real = service.decode_upload

    def decode_upload(data, large=False):
        with lock:
            state["large" if large else "small"] += 1
            state["running"] += large
            state["most"] = max(state["most"], state["running"])
        try:
            if large:
                release.wait(60)
            return real(data, large)
        finally:
            with lock:
                state["running"] -= large

    monkeypatch.setattr(service, "decode_upload", decode_upload)
    return release, state


def test_large_uploads_wait_in_their_own_lane_and_row_searches_go_on(served, monkeypatch):
    from cbir_tf.serve import app as serve_app

    service = served["service"]
    # Two request threads, one large decode at a time; the test photos (96 x 72) are small.
    app = serve_app.create_app(service, threads=2, large_decodes=1, large_image_pixels=10_000)
    server, thread, port = _start(app)
    release, state = _blocking_large_decodes(service, monkeypatch)
    large = io.BytesIO()
    Image.fromarray(np.full((100, 120, 3), 90, np.uint8)).save(large, "PNG")  # 12000 pixels
    answers = []

    def upload_large():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        answers.append(client.search(c, large.getvalue(), k=2)[0])
        c.close()

    uploads = [threading.Thread(target=upload_large) for _ in range(4)]
    try:
        for t in uploads:
            t.start()
        deadline = time.monotonic() + 30
        while state["large"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["large"] == 1  # one decodes, three wait in the large lane
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for row in range(3):  # more searches than request threads: none is held
            status, data, _ = client.request(c, "POST", f"/api/search?row={row}&k=2")
            assert status == 200 and json.loads(data)["results"][0]["row"] == row
        path, image_id = _query(served, "p4.jpg")
        status, answer = client.search(c, _bytes(path), k=2)  # a small upload goes on too
        assert status == 200 and answer["results"][0]["id"] == image_id
        c.close()
        assert state["small"] == 1 and state["large"] == 1
    finally:
        release.set()
        for t in uploads:
            t.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=10)
    assert answers == [200] * 4 and state["large"] == 4 and state["most"] == 1


@pytest.mark.slow
def test_a_large_photo_is_searched_with_bounded_decoding(served, conn, tmp_path):
    """A 6000 x 4500 JPEG (27 M pixels) and a 16-bit 5000 x 5000 PNG through the large lane."""
    from png_bytes import raw_png

    path, image_id = _query(served)
    photo = Image.open(path).resize((6000, 4500), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    status, answer = client.search(conn, buf.getvalue(), k=2)
    assert status == 200, answer
    assert answer["results"][0]["id"] == image_id
    assert answer["query"] == {"width": 80, "height": 60}  # the model's input size
    side = 5000
    first = b"\x00" + bytes(range(256)) * (2 * side // 256) + bytes(2 * side % 256)
    rows = (first if i == 0 else b"\x02" + bytes(2 * side) for i in range(side))
    status, answer = client.search(conn, raw_png(side, side, 16, 0, rows), k=2)
    assert status == 200 and answer["query"] == {"width": 80, "height": 80}, answer


# -- what the service says it searches with (issue 24 item 3) -------------------------------------

ROWS, DIM = 5000, 32
FORCED_ANN = {"min_rows": 1000, "kind": "ivfpq", "bytes_per_vector": 100, "tune_queries": 100,
              "target_recall": 0.9}  # fmt: skip


def _clustered_rows(n, d, seed=0):
    """Unit vectors in clusters of ~20 (an approximate index has neighbours to miss)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, d))
    x = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def approximate_served(tmp_path_factory):
    """An index of 5000 rows whose approximate index (IVF-PQ) is forced on, served over HTTP."""
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization
    from cbir_tf.retriever import Retriever
    from cbir_tf.serve import app as serve_app
    from cbir_tf.serve import service as service_lib

    directory = tmp_path_factory.mktemp("ann_serve") / "index"
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(DIM, 3, strides=2, activation="relu")(inp)
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    r = Retriever(model, image_size=64, directory=directory, ann=FORCED_ANN)
    ids = [f"img{i}.jpg" for i in range(ROWS)]
    # As tests/search/test_ann.py: rows written directly (describing 5000 photos takes minutes).
    r._apply((_clustered_rows(ROWS, DIM), ids, []), {i: f"/photos/{i}" for i in ids},
             {i: [1, 0] for i in ids}, set())  # fmt: skip
    service = service_lib.open_service(directory)
    server, thread, port = _start(serve_app.create_app(service, threads=2))
    yield {"port": port, "service": service, "index": str(directory)}
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


def test_the_approximate_index_served_is_reported_with_its_recall(approximate_served):
    from cbir_tf.search import ann

    meta = ann.read_meta(approximate_served["index"])
    assert meta["kind"] == "ivfpq"
    c = http.client.HTTPConnection("127.0.0.1", approximate_served["port"], timeout=60)
    status, data, _ = client.request(c, "GET", "/api/index")
    info = json.loads(data)
    assert status == 200 and info["approximate"] is True and info["recall"] == meta["recall"]
    search = info["search"]
    assert search["kind"] == "ivfpq" and search["factory"] == meta["factory"]
    assert search["nprobe"] == meta["nprobe"] and search["recall"] == meta["recall"]
    assert search["recall_k"] == meta["recall_k"] and search["rows"] == ROWS
    assert search["target_recall"] == meta["target_recall"] == FORCED_ANN["target_recall"]
    assert search["target_met"] is (meta["recall"] >= meta["target_recall"])
    # Every answer says what found it: the approximate index for plain searches ...
    status, data, _ = client.request(c, "POST", "/api/search?row=7&k=5")
    answer = json.loads(data)
    assert status == 200 and answer["results"][0]["row"] == 7
    assert answer["index"] == {"images": ROWS, "commit": answer["index"]["commit"], **search}
    # ... and, with DBA, the augmented database's index, built in memory with the service's
    # search.ann settings (exact below 200k rows).
    status, data, _ = client.request(c, "POST", "/api/search?row=7&k=5&rerank=dba")
    answer = json.loads(data)
    assert status == 200 and answer["index"]["approximate"] is False, answer["index"]
    assert answer["index"]["kind"] == "flat"
    c.close()


def test_a_damaged_approximate_index_is_reported_as_exact_search(approximate_served, tmp_path):
    from cbir_tf.serve import service as service_lib

    copy = tmp_path / "copy"
    shutil.copytree(approximate_served["index"], copy)
    (copy / "ann.faiss").write_bytes(b"damaged")  # refused: searches are exact
    service = service_lib.open_service(copy)
    try:
        info = service.info()
        assert info["approximate"] is False and info["search"] == {
            "approximate": False, "kind": "exact"}  # fmt: skip
        out = service.search_row(3, 4, "none")
        assert out["results"][0]["row"] == 3 and out["index"]["kind"] == "exact"
    finally:
        service.close()


# -- the page in a real browser -----------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
)


def _browser(profile):
    """Debian's chromium driven by chromedriver (selenium), or a skip naming what is missing."""
    binary = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p), None)
    driver_bin = next(
        (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p), None
    )
    missing = [n for n, p in (("chromium", binary), ("chromium-driver", driver_bin)) if not p]
    if missing or not all(os.access(p, os.X_OK) for p in (binary, driver_bin)):
        pytest.skip(f"{' and '.join(missing) or 'chromium'} not installed "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(driver_bin), options=options)


def drive_page(driver, base_url, query_path, expected_id, screenshot=None, timeout=60):
    """Chooses `query_path` on the page, checks the grid, then queries with the second result.

    Returns:
      The ids shown after the click-through query.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(base_url + "/")
    wait.until(lambda d: "images" in d.find_element(By.ID, "info").text)
    driver.find_element(By.ID, "file").send_keys(os.path.abspath(query_path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
    assert cards[0].get_attribute("data-id") == expected_id
    assert "#1" in cards[0].text and expected_id in cards[0].text.replace("\n", "")
    # Every thumbnail of the grid loaded from the server.
    wait.until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('#results img'))"
        ".every(i => i.complete && i.naturalWidth > 0)"))  # fmt: skip
    if screenshot:
        driver.save_screenshot(str(screenshot))
    second = cards[1].get_attribute("data-id")
    cards[1].click()
    wait.until(ec.visibility_of_element_located((By.ID, "viewer-img")))
    wait.until(
        lambda d: d.execute_script(
            "var i = document.getElementById('viewer-img'); return i.complete && i.naturalWidth > 0"
        )
    )
    assert second in driver.find_element(By.ID, "viewer-caption").text
    driver.find_element(By.ID, "viewer-search").click()
    wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#results .result")
            and d.find_elements(By.CSS_SELECTOR, "#results .result")[0].get_attribute("data-id")
            == second
        )
    )
    return [c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, ".result")]


def _check_paths_shown(driver):
    """Issue 26 item 12: each card shows its image's path relative to the collection (not the
    file name alone), and a card hovered shows it in full."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
    for card in cards:
        image_id = card.get_attribute("data-id")
        path = card.find_element(By.CSS_SELECTOR, ".path")
        assert path.text.replace("\n", "") == image_id == path.get_attribute("title")
    assert any("/" in c.get_attribute("data-id") for c in cards)  # sub/...: a folder shown
    # A long path: its folders cut on one line, in full under the pointer.
    card = next(c for c in cards if "/" in c.get_attribute("data-id"))
    driver.execute_script(
        "arguments[0].querySelector('.path .dir bdi').textContent = arguments[1]",
        card, "a/long/folder/path/that/names/what/the/image/shows/sub/",
    )  # fmt: skip
    folders = card.find_element(By.CSS_SELECTOR, ".path .dir")
    fits = "return arguments[0].scrollWidth <= arguments[0].clientWidth"
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "info")).perform()
    assert not driver.execute_script(fits, folders)  # cut
    ActionChains(driver).move_to_element(card).perform()
    assert driver.execute_script(fits, folders)  # in full, wrapped
    assert folders.text.replace("\n", "").endswith("/image/shows/sub/")


def test_page_in_headless_chromium(served, tmp_path):
    driver = _browser(tmp_path / "profile")
    try:
        path, image_id = _query(served)
        shot = tmp_path / "serve.png"
        ids = drive_page(driver, f"http://127.0.0.1:{served['port']}", path, image_id, shot)
        assert len(ids) == 8 and ids[0] != image_id
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
        assert pixels.std() > 20, "the screenshot is (nearly) blank"
        _check_paths_shown(driver)
        # An error from the server shows on the page, and the page stays usable.
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "file").send_keys(str(bad))
        status = driver.find_element(By.ID, "status")
        deadline = time.monotonic() + 30
        while "not an image" not in status.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "not an image" in status.text and status.get_attribute("class") == "error"
    finally:
        driver.quit()
