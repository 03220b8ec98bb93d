"""``metrics: {listen: 127.0.0.1:9464}``: the Prometheus text format over HTTP, on the daemon's loop.

A deliberately small HTTP/1.1 server (standard library asyncio streams):
``GET /metrics`` (and ``HEAD``) answers the current metrics, ``GET /``
says where they are; anything else is 404 or 405. One request per
connection. It cannot stall guarding: a request must arrive within
``REQUEST_TIMEOUT_S`` and fit in ``MAX_REQUEST_BYTES``, at most
``MAX_CONNECTIONS`` are served at once (more are closed at once), and the
body is rendered from values the loop already holds (no file, no /proc
read at scrape time).
"""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["MetricsServer", "CONTENT_TYPE", "parse_listen"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: 5 s for a scraper to send its request line and headers (Prometheus sends them at once).
REQUEST_TIMEOUT_S = 5.0
#: 16 KiB of request line and headers: a scrape sends a few hundred bytes.
MAX_REQUEST_BYTES = 16 * 1024
#: 16 connections at once: one Prometheus (or two, in HA) and a few curls.
MAX_CONNECTIONS = 16


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` -> ("127.0.0.1", 9464); ``[::1]:9464`` -> ("::1", 9464)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves ``render()`` at /metrics on ``listen`` (HOST:PORT)."""

    def __init__(self, listen: str, render: Callable[[], str]) -> None:
        self.listen = listen
        self.render = render
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound address (the port the kernel chose for port 0), once started."""
        if self._server is None or not self._server.sockets:
            return None
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken or not ours."""
        host, port = parse_listen(self.listen)
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES,
                                                  reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            status, body, ctype, head_only = self._answer(head)
            data = body.encode("utf-8")
            lines = [f"HTTP/1.1 {status}", f"Content-Type: {ctype}", f"Content-Length: {len(data)}",
                     "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + (b"" if head_only else data))
            try:
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                return
        except Exception:  # noqa: BLE001 - one scrape's failure never reaches the loop
            return
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, str, bool]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "bad request\n", "text/plain", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "only GET and HEAD\n", "text/plain", False
        if target == "/metrics":
            try:
                return "200 OK", self.render(), CONTENT_TYPE, method == "HEAD"
            except Exception as e:  # noqa: BLE001
                return "500 Internal Server Error", f"memguard could not render its metrics: {e}\n", \
                    "text/plain", False
        if target == "/":
            return "200 OK", "memguard: metrics at /metrics\n", "text/plain", method == "HEAD"
        return "404 Not Found", "not found: memguard serves /metrics\n", "text/plain", False
