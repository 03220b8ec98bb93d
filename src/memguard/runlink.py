"""``memguard run`` next to a running daemon: one control-socket connection, on ``run``'s own event loop.

Over it the job waits for memory in the daemon's admission queue
(``admit``), registers as an ad-hoc worker once it runs (``join``: the
daemon then counts it, ranks it as a victim of its system rules and names
it in its events), and reports its exit status (``exited``). The daemon
pushes what it does to the job (``{"event": "signal", ...}``), which
``memguard run`` shows and lists in its summary. A ``ping`` every
:data:`KEEPALIVE_S` keeps the connection from being closed as idle.

The socket is found the way ``memguard ctl`` finds it: ``--socket``, else
``MEMGUARD_SOCKET``, else ``/run/memguard/control.sock``. No daemon there
(nothing listens, no such file) means ``memguard run`` works alone, as it
always did.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any, Callable

from .client import DEFAULT_ADMIN_SOCKET, ENV_SOCKET

__all__ = ["DaemonLink", "daemon_socket", "KEEPALIVE_S"]

#: A ping every 60 s: far inside the daemon's idle timeout for connections (300 s).
KEEPALIVE_S = 60.0
#: 10 s for the daemon to answer a request that does not wait (join, exited): it answers after its next
#: tick, in milliseconds, unless it is wedged.
REPLY_TIMEOUT_S = 10.0
_MAX_LINE = 1 << 20


def daemon_socket(explicit: str | None = None) -> str:
    """Where the daemon's control socket is (as ``memguard ctl`` looks for it)."""
    return explicit or os.environ.get(ENV_SOCKET) or DEFAULT_ADMIN_SOCKET


class DaemonLink:
    """One connection to the daemon; requests with replies matched by id, pushes to ``on_push``."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.on_push: Callable[[dict[str, Any]], None] | None = None
        self.closed = False
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._keepalive())]

    @classmethod
    async def connect(cls, path: str) -> "DaemonLink | None":
        """A link to the daemon at ``path``; None when no daemon listens there."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=_MAX_LINE), 5.0)
        except (OSError, asyncio.TimeoutError, ValueError):
            return None
        link = cls(path, reader, writer)
        try:
            reply = await link.request("ping", timeout=5.0)
        except (ConnectionError, asyncio.TimeoutError):
            await link.close()
            return None
        if not reply.get("ok"):
            await link.close()
            return None
        return link

    async def request(self, op: str, *, timeout: float | None = REPLY_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (``timeout`` None: as long as it takes). Raises
        ConnectionError when the daemon went away, asyncio.TimeoutError."""
        if self.closed:
            raise ConnectionError("the connection to memguard is closed")
        rid = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        data = (json.dumps({"op": op, **fields, "id": rid}, separators=(",", ":")) + "\n").encode()
        try:
            self._writer.write(data)
            await self._writer.drain()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    def send(self, op: str, **fields: Any) -> None:
        """Send a request whose reply nobody waits for (it is read and dropped)."""
        if self.closed:
            return
        rid = next(self._ids)
        try:
            self._writer.write((json.dumps({"op": op, **fields, "id": rid}, separators=(",", ":")) + "\n").encode())
        except (ConnectionError, RuntimeError):
            self.closed = True

    async def _read(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "event" in msg:
                    if self.on_push is not None:
                        try:
                            self.on_push(msg)
                        except Exception:  # noqa: BLE001 - showing a push must not end the link
                            pass
                    continue
                fut = self._waiting.get(msg.get("id"))  # type: ignore[arg-type]
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("memguard closed the connection"))

    async def _keepalive(self) -> None:
        while not self.closed:
            await asyncio.sleep(KEEPALIVE_S)
            self.send("ping")

    async def close(self) -> None:
        """Flush what was sent, then close."""
        self.closed = True
        for t in self._tasks:
            t.cancel()
        try:
            await asyncio.wait_for(self._writer.drain(), 2.0)
        except (ConnectionError, OSError, asyncio.TimeoutError, RuntimeError):
            pass
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        except (ConnectionError, OSError, asyncio.TimeoutError, RuntimeError):
            pass
        await asyncio.gather(*self._tasks, return_exceptions=True)
