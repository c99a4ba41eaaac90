"""Run an app with uvicorn in a background thread of this process, on 127.0.0.1 and a free port."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any


class BackgroundServer:
    """`with BackgroundServer(app) as s: s.base_url` -> "http://127.0.0.1:PORT"; stops on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", shutdown_timeout: float = 5.0, startup_timeout: float = 60.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))  # port 0: the kernel picks a free one, and it is ours from now on
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
