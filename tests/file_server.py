"""A local HTTP file server for download tests (Range, dropped connections, 416)."""

import http.server
import threading


class RangeServer:
    """A file server on 127.0.0.1 that speaks HTTP Range and can misbehave on demand.

    `files` maps URL paths to bodies; `die_after[path]` drops the next connection to `path` after
    that many bytes (once); `ignore_range` answers every request with the whole file (200).
    """

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = {} if files is None else files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.die_after: dict[str, int] = {}  # path -> bytes sent before the next drop (once)
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.die_after.pop(self.path, None)
                if cut is not None:
                    # The connection drops mid-way: fewer bytes than announced, then close.
                    self.wfile.write(body[start : start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def offline_opener(request, timeout):
    """An `opener` for the download code that behaves as a machine without network does."""
    import socket
    import urllib.error

    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def no_network_opener(request, timeout):
    """An `opener` that fails the test on any network access."""
    raise AssertionError(f"unexpected network access: {request.full_url}")
