"""A minimal client of the search service on the standard library (tests, benchmarks, scripts).

    conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=30)
    status, answer = search(conn, open("photo.jpg", "rb").read(), k=5)

One `HTTPConnection` per thread, reused across requests (keep-alive).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from typing import Any


def multipart_body(
    field: str, filename: str, data: bytes, content_type: str = "application/octet-stream"
) -> tuple[bytes, str]:
    """A multipart/form-data body holding one file; returns (body, Content-Type header)."""
    boundary = "cbir-" + os.urandom(12).hex()
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """One request on a kept-alive connection: (status, body, headers)."""
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}


def search(
    conn: http.client.HTTPConnection,
    image: bytes,
    *,
    k: int | None = None,
    rerank: str | None = None,
    field: str = "image",
    filename: str = "query.jpg",
) -> tuple[int, dict[str, Any]]:
    """POST /api/search with an image file: (status, decoded JSON answer)."""
    params = {n: v for n, v in (("k", k), ("rerank", rerank)) if v is not None}
    path = "/api/search" + ("?" + urllib.parse.urlencode(params) if params else "")
    body, ctype = multipart_body(field, filename, image)
    status, data, _ = request(conn, "POST", path, body, {"Content-Type": ctype})
    return status, json.loads(data)
