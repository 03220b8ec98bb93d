"""A real HTTP receiver for tests: the standard library's http.server on 127.0.0.1, in a thread.

Every POST lands in a queue (its path, headers, body, the wall time it
arrived); the answer to each is scripted (``statuses``: a list of status
codes used in turn, then 200). Tests wait on the queue with a deadline.
"""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

DEADLINE_S = 10.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """``with Receiver() as r: ... r.url ... r.next()``."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.got: queue.Queue[Received] = queue.Queue()
        self.count = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                receiver.count += 1
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.got.put(Received(self.path, dict(self.headers), body, time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/memguard"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next(self, timeout: float = DEADLINE_S) -> Received:
        try:
            return self.got.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no POST arrived within {timeout}s") from None

    def drain(self) -> list[Received]:
        out = []
        while True:
            try:
                out.append(self.got.get_nowait())
            except queue.Empty:
                return out
