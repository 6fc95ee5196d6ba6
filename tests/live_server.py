"""A real uvicorn server on a free loopback port, in a thread, for the service's tests."""

from __future__ import annotations

import socket
import threading
import time


def start(app):
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


def stop(server, thread) -> None:
    server.should_exit = True
    thread.join(timeout=30)
