"""The control socket: workers report their trials, administrators send commands.

One Unix stream socket (``<runtime_dir>/control.sock`` by default), one JSON
object per line each way. Every request names an ``op``; it may carry an
``id``, echoed in the reply. A reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. The full protocol is in docs/control.md.

Who may do what:

- **Worker ops** (``hello``, ``trial_start``, ``trial_end``,
  ``trial_withdraw``, ``trial_requeued``, ``heartbeat``, ``refused``,
  ``reclaimed``) carry ``worker`` and ``token``. The token is
  a fresh secret per incarnation (:meth:`ControlServer.new_token`, given to
  the worker as ``MEMGUARD_TOKEN``), and the peer process (``SO_PEERCRED``)
  must belong to that worker's process tree (``identify``). A token alone,
  leaked to another process, is not enough; nor is being a worker: worker A
  cannot report, start or end a trial of worker B.
- **Admin ops** (``status``, ``reload``, ``stop``, ``start``, ``restart``)
  are allowed to root, to the daemon's own user, and to members of
  ``admin_group`` (the peer's gid or supplementary groups).
- ``ping`` is allowed to anyone and changes nothing.

The server never blocks the loop: each connection has its own reader task
reading lines of at most ``max_line`` bytes; replies are written with a
deadline and a cap on what may wait in a connection's buffer, so a client
that never reads is dropped instead of stalling anything.

Nobody can lock the others out. Connections are counted in three pools by
who is at the other end (``SO_PEERCRED``, at connect): administrators
(root, memguard's own user, ``admin_group``), processes of a running
worker's tree, and everyone else. Each pool has its own cap, and in the
last one each user id has a cap of its own (``max_per_uid``): one local
user holding every connection it may open still leaves room for root's
``memguard ctl`` and for every worker's client. A connection that has not
sent a request for ``idle_timeout_s`` is closed: the clock restarts only
on a request, never on a blank line or a line trickled in byte by byte.
A worker's subscribed (``hello``) connection waits for pushes and has no
idle timeout.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import hmac
import inspect
import json
import math
import os
import secrets
import socket
import stat
import struct
import time
from typing import Any, Awaitable, Callable, Mapping

from ..model import TrialEvent
from ..sense.procstat import read_stat
from ..threads import LoopOwned, on_owner_thread

__all__ = [
    "ControlServer",
    "ControlError",
    "WORKER_OPS",
    "ADMIN_OPS",
    "JOB_OPS",
    "pid_in_tree",
    "peer_credentials",
    "DEFAULT_SOCKET_NAME",
]

DEFAULT_SOCKET_NAME = "control.sock"

#: Worker op -> TrialEvent.kind (``hello`` subscribes and produces no event).
_EVENT_KIND = {
    "trial_start": "start",
    "trial_end": "end",
    "trial_withdraw": "withdrawn",  # a claimed trial was not created: the gate closed meanwhile
    "trial_requeued": "requeued",  # a trial a dead incarnation left running was failed and requeued
    "heartbeat": "heartbeat",
    "refused": "refused",
    "reclaimed": "reclaimed",
}
WORKER_OPS = frozenset({"hello", *_EVENT_KIND})
ADMIN_OPS = frozenset({"status", "reload", "stop", "start", "restart"})
#: Ops of jobs started next to the daemon (``memguard run``): ``admit`` (wait in the admission queue),
#: ``join`` (register as an ad-hoc worker), ``exited`` (its exit status). Open to anyone: the daemon's
#: ``on_job`` decides what each peer may do (a job registers only itself or its own descendants).
JOB_OPS = frozenset({"admit", "join", "exited"})
_ADMIN_NEEDS_WORKER = frozenset({"stop", "start", "restart"})

# Defaults, with their units and reasons.
#: 64 KiB per line: the longest legitimate request (a trial name plus a
#: failure detail) is well under 8 KiB; anything longer is a broken or
#: hostile client, answered with an error and disconnected.
DEFAULT_MAX_LINE_BYTES = 64 * 1024
#: 300 s idle: an admin tool or a worker between two requests never holds a
#: connection that long; subscribed worker connections are exempt.
DEFAULT_IDLE_TIMEOUT_S = 300.0
#: 256 connections from processes that are neither administrators nor workers
#: (monitoring scripts, `memguard top` of other users...); beyond it new ones are refused.
DEFAULT_MAX_CONNECTIONS = 256
#: 16 connections per user id among those: a person's few tools; one user cannot take the pool.
DEFAULT_MAX_PER_UID = 16
#: 64 connections from administrators: `memguard ctl`, `top` and scripts of root and group memguard.
DEFAULT_MAX_ADMIN_CONNECTIONS = 64
#: Connections from workers' trees, per running worker: its subscribed connections
#: (MAX_SUBSCRIPTIONS_PER_WORKER) and as many short-lived ones.
WORKER_CONNECTIONS_PER_WORKER = 32
#: 5 s to hand a reply to a client: a healthy client reads in microseconds.
DEFAULT_WRITE_TIMEOUT_S = 5.0
#: 256 KiB of unread replies or pushes before a connection is dropped: a few
#: thousand replies a client did not read.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024
#: Heartbeats of one worker reach the core at most once per second; more
#: are answered but not passed on, so a busy loop cannot flood the core.
HEARTBEAT_MIN_INTERVAL_S = 1.0
#: At most this many subscribed connections per worker incarnation: a
#: worker and a few of its children; the oldest is dropped beyond it.
MAX_SUBSCRIPTIONS_PER_WORKER = 16

_MAX_NAME = 256
_MAX_DETAIL = 4096
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


class ControlError(Exception):
    """The control socket cannot be served (path taken, bad permissions)."""


# ---------------------------------------------------------------------------
# helpers usable by the daemon


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _peer_groups(sock: Any, pid: int) -> set[int] | None:
    """Supplementary groups of the peer: SO_PEERGROUPS (taken at connect), else /proc/<pid>/status."""
    size = struct.calcsize("I")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024 * size)
        n = len(raw) // size
        return set(struct.unpack(f"{n}I", raw[: n * size]))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return None


def _ppid(pid: int) -> int | None:
    st = read_stat(pid)
    return None if st is None else st.ppid


def pid_in_tree(pid: int, root_pid: int, *, max_depth: int = 64) -> bool:
    """True when ``pid`` is ``root_pid``, one of its descendants, or in its session.

    memguard starts every worker in a session of its own (session id = the
    worker's pid); a process cannot join another session, so membership of
    the session is proof of descent even for an orphan that was reparented
    to the daemon. The parent chain covers a descendant that called
    ``setsid()`` itself while its parents still live.
    """
    if pid <= 0 or root_pid <= 0:
        return False
    if pid == root_pid:
        return True
    try:
        if os.getsid(pid) == root_pid:
            return True
    except OSError:
        return False
    cur = pid
    for _ in range(max_depth):
        parent = _ppid(cur)
        if parent is None or parent <= 1:
            return False
        if parent == root_pid:
            return True
        cur = parent
    return False


def _encode(message: Mapping[str, Any]) -> bytes:
    """One line of strict JSON (no NaN or Infinity: not JSON); a value that cannot be written becomes null."""
    try:
        text = json.dumps(dict(message), separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(_finite(dict(message)), separators=(",", ":"), allow_nan=False, default=str)
    return (text + "\n").encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _short(value: object, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------


class _Conn:
    __slots__ = ("reader", "writer", "pid", "uid", "gid", "sock", "auth", "subscribed", "task", "since", "pool")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, since: float) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = writer.get_extra_info("socket")
        self.pid, self.uid, self.gid = -1, -1, -1
        self.auth: tuple[str, int] | None = None  # (worker, incarnation) proven on this connection
        self.subscribed = False
        self.task: asyncio.Task[Any] | None = None
        self.since = since
        self.pool = "user"  # "admin" | "worker" | "user"

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


class ControlServer(LoopOwned):
    """The daemon's end of the control socket, on the daemon's asyncio loop (checked: memguard.threads).

    ``on_trial`` receives one :class:`TrialEvent` per authenticated worker
    report; ``on_admin`` receives an admin request (a dict with ``op``) from
    a permitted peer and returns the reply dict (``ok`` defaults to true);
    ``identify(worker, pid)`` says whether ``pid`` belongs to that worker's
    process tree; ``incarnation_of(worker)`` gives the worker's current
    incarnation, or None when it is not running.
    """

    def __init__(
        self,
        path: str,
        on_trial: Callable[[TrialEvent], None],
        on_admin: Callable[[dict[str, Any]], Awaitable[Mapping[str, Any]] | Mapping[str, Any]],
        identify: Callable[[str, int], bool],
        incarnation_of: Callable[[str], int | None],
        clock: Callable[[], float] = time.monotonic,
        admin_group: str = "memguard",
        max_line: int = DEFAULT_MAX_LINE_BYTES,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_uid: int = DEFAULT_MAX_PER_UID,
        max_admin_connections: int = DEFAULT_MAX_ADMIN_CONNECTIONS,
        worker_of_pid: Callable[[int], str | None] | None = None,
        write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        on_notice: Callable[[str, dict[str, Any]], None] | None = None,
        on_job: Callable[[str, dict[str, Any], tuple[int, int, int], int],
                         Awaitable[Mapping[str, Any]] | Mapping[str, Any]] | None = None,
        on_close: Callable[[int], None] | None = None,
    ) -> None:
        self._claim_thread()
        self.path = path
        self.on_trial = on_trial
        self.on_admin = on_admin
        self.identify = identify
        self.incarnation_of = incarnation_of
        self.clock = clock
        self.admin_group = admin_group
        self.max_line = max_line
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.max_admin_connections = max_admin_connections
        self.worker_of_pid = worker_of_pid  # pid -> the running worker whose tree holds it, or None
        self.write_timeout_s = write_timeout_s
        self.max_buffered_bytes = max_buffered_bytes
        self.on_notice = on_notice
        # Job ops: on_job(op, request, (peer pid, uid, gid), connection id); on_close(connection id) when a
        # connection ends (a job waiting in the queue gives up its place).
        self.on_job = on_job
        self.on_close = on_close
        self._tokens: dict[str, tuple[int, str]] = {}
        self._conns: set[_Conn] = set()
        self._last_heartbeat: dict[str, float] = {}
        self._server: asyncio.AbstractServer | None = None
        self._said: dict[tuple[Any, Any], float] = {}
        self._inode: tuple[int, int] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    @on_owner_thread
    async def start(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.chmod(parent, 0o755)
        self._remove_stale()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=self.max_line)
        # Workers may run as other users: anyone may connect; who may do what
        # is decided per request (token and peer pid, or peer credentials).
        os.chmod(self.path, 0o666)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.setblocking(False)
            err = probe.connect_ex(self.path)
        finally:
            probe.close()
        if err in (0, errno.EAGAIN, errno.EINPROGRESS):
            raise ControlError(f"{self.path} is in use by another process (is another memguard running?)")
        os.unlink(self.path)  # nobody listens: left over from a daemon that died

    @on_owner_thread
    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = []
        for conn in list(self._conns):
            conn.abort()
            if conn.task is not None and conn.task is not asyncio.current_task():
                conn.task.cancel()
                tasks.append(conn.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._server = None
        self._unlink_own()

    def _unlink_own(self) -> None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            try:
                os.unlink(self.path)
            except OSError:
                pass

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ tokens and pushes

    @on_owner_thread
    def new_token(self, worker: str, incarnation: int) -> str:
        """A fresh secret for this incarnation; the previous incarnation's connections are dropped."""
        self._drop_worker(worker)
        token = secrets.token_hex(16)
        self._tokens[worker] = (incarnation, token)
        return token

    @on_owner_thread
    def worker_env(self, worker: str, incarnation: int) -> dict[str, str]:
        """``MEMGUARD_SOCKET`` and a fresh ``MEMGUARD_TOKEN`` for a worker about to be spawned."""
        return {"MEMGUARD_SOCKET": self.path, "MEMGUARD_TOKEN": self.new_token(worker, incarnation)}

    @on_owner_thread
    def revoke(self, worker: str) -> None:
        """The worker exited: its token stops working and its connections are closed."""
        self._tokens.pop(worker, None)
        self._last_heartbeat.pop(worker, None)
        self._drop_worker(worker)

    def _drop_worker(self, worker: str) -> None:
        for conn in list(self._conns):
            if conn.auth is not None and conn.auth[0] == worker:
                conn.auth = None
                if conn.subscribed:
                    conn.subscribed = False
                    conn.abort()

    def send_reclaim(self, worker: str, reason: str) -> int:
        """Push ``{"event": "reclaim", "reason": ...}`` to the worker's subscribed connections.

        Returns how many connections it was written to (0: the worker's
        client is not connected, or memguard.client is not used).
        """
        return self.push(worker, {"event": "reclaim", "reason": reason})

    @on_owner_thread
    def push(self, worker: str, message: Mapping[str, Any]) -> int:
        entry = self._tokens.get(worker)
        if entry is None:
            return 0
        data = _encode(message)
        sent = 0
        for conn in list(self._conns):
            if conn.subscribed and conn.auth == (worker, entry[0]) and self._write(conn, data):
                sent += 1
        return sent

    @on_owner_thread
    def push_to(self, conn_id: int, message: Mapping[str, Any]) -> bool:
        """Push one line to the connection ``conn_id`` (a job's, for ``memguard run`` to show what the daemon
        did to it); False when it is gone."""
        data = (json.dumps(dict(message), separators=(",", ":")) + "\n").encode()
        for conn in list(self._conns):
            if id(conn) == conn_id:
                return self._write(conn, data)
        return False

    # ------------------------------------------------------------------ connections

    def _notice(self, event: str, **fields: Any) -> None:
        if self.on_notice is not None:
            try:
                self.on_notice(event, fields)
            except Exception:  # a reporting problem never breaks the socket
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer, self.clock())
        conn.task = asyncio.current_task()
        try:
            conn.pid, conn.uid, conn.gid = peer_credentials(conn.sock)
        except (OSError, struct.error, AttributeError):
            pass
        if self._closing:
            conn.abort()
            return
        refused = self._admit(conn)
        if refused:
            self._notice_once("control_refused", reason=refused, pid=conn.pid, uid=conn.uid)
            await self._send(conn, _error(refused))
            conn.abort()
            return
        self._conns.add(conn)
        try:
            await self._serve_lines(conn)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - one connection's failure never reaches the loop
            self._notice("control_error", reason=f"{type(e).__name__}: {e}", pid=conn.pid)
        finally:
            self._conns.discard(conn)
            conn.abort()
            if self.on_close is not None:
                try:
                    self.on_close(id(conn))
                except Exception:  # noqa: BLE001 - a reporting problem never breaks the socket
                    pass

    def _admit(self, conn: _Conn) -> str | None:
        """Put a new connection in its pool; the reason it is refused, or None."""
        if self._is_admin(conn):
            conn.pool = "admin"
            n = sum(1 for c in self._conns if c.pool == "admin")
            return None if n < self.max_admin_connections else (
                f"too many administrator connections (at most {self.max_admin_connections})")
        worker = self.worker_of_pid(conn.pid) if self.worker_of_pid is not None and conn.pid > 0 else None
        if worker is not None:
            conn.pool = "worker"
            n = sum(1 for c in self._conns if c.pool == "worker")
            live = max(1, len(self._tokens))
            return None if n < WORKER_CONNECTIONS_PER_WORKER * live else "too many connections from workers"
        conn.pool = "user"
        users = [c for c in self._conns if c.pool == "user"]
        if sum(1 for c in users if c.uid == conn.uid) >= self.max_per_uid:
            return f"too many connections from uid {conn.uid} (at most {self.max_per_uid} per user)"
        if len(users) >= self.max_connections:
            return f"too many connections (at most {self.max_connections})"
        return None

    def _notice_once(self, event: str, **fields: Any) -> None:
        """A refusal is said once per (uid, reason) a minute: a client retrying in a loop does not flood the log."""
        key = (fields.get("uid"), fields.get("reason"))
        now = self.clock()
        if now - self._said.get(key, -1e9) >= 60.0:
            self._said[key] = now
            if len(self._said) > 1024:
                self._said = {k: t for k, t in self._said.items() if now - t < 60.0}
            self._notice(event, **fields)

    async def _serve_lines(self, conn: _Conn) -> None:
        deadline = self.clock() + self.idle_timeout_s  # restarts on a request, not on any bytes
        while not self._closing:
            timeout = None if conn.subscribed else max(0.0, deadline - self.clock())
            try:
                line = await asyncio.wait_for(conn.reader.readline(), timeout)
            except asyncio.TimeoutError:
                return
            except ValueError:  # the line is longer than max_line
                self._notice("control_refused", reason="request line too long", pid=conn.pid, uid=conn.uid)
                await self._send(conn, _error(f"request line longer than {self.max_line} bytes; closing"))
                return
            except (ConnectionError, OSError):
                return
            if not line:
                return  # end of file
            if not line.strip():
                continue  # nothing asked: the idle clock keeps running
            deadline = self.clock() + self.idle_timeout_s
            reply = await self._handle(conn, line)
            if not await self._send(conn, reply):
                return

    def _write(self, conn: _Conn, data: bytes) -> bool:
        transport = conn.writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() + len(data) > self.max_buffered_bytes:
            self._notice("control_dropped", reason="the client does not read its replies", pid=conn.pid)
            conn.abort()
            return False
        try:
            conn.writer.write(data)
        except (ConnectionError, OSError, RuntimeError):
            conn.abort()
            return False
        return True

    async def _send(self, conn: _Conn, reply: Mapping[str, Any]) -> bool:
        data = _encode(reply)
        if not self._write(conn, data):
            return False
        try:
            await asyncio.wait_for(conn.writer.drain(), self.write_timeout_s)
        except asyncio.TimeoutError:
            self._notice("control_dropped", reason="the client did not read a reply in time", pid=conn.pid)
            conn.abort()
            return False
        except (ConnectionError, OSError):
            conn.abort()
            return False
        return True

    # ------------------------------------------------------------------ requests

    async def _handle(self, conn: _Conn, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            return _error(f"malformed JSON: {str(e)[:200]}")
        if not isinstance(req, dict):
            return _error("a request is one JSON object per line")
        rid = req.get("id")
        try:
            reply = await self._dispatch(conn, req)
        except Exception as e:  # noqa: BLE001
            reply = _error(f"internal error: {type(e).__name__}: {str(e)[:200]}")
        if isinstance(rid, (str, int, float)) and not isinstance(rid, bool) and (
                not isinstance(rid, float) or math.isfinite(rid)) and (not isinstance(rid, str) or len(rid) <= 256):
            reply["id"] = rid
        return reply

    async def _dispatch(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if not isinstance(op, str) or not op:
            return _error("missing field 'op' (a string)")
        if op == "ping":
            return {"ok": True}
        if op in WORKER_OPS:
            return self._worker_op(conn, op, req)
        if op in ADMIN_OPS:
            return await self._admin_op(conn, op, req)
        if op in JOB_OPS and self.on_job is not None:
            result = self.on_job(op, {k: v for k, v in req.items() if k != "id"}, (conn.pid, conn.uid, conn.gid),
                                 id(conn))
            if inspect.isawaitable(result):
                result = await result
            reply = dict(result) if isinstance(result, Mapping) else _error("internal error: no reply")
            reply.setdefault("ok", True)
            return reply
        return _error(f"unknown op {_short(op)}")

    def _authenticate(self, conn: _Conn, worker: str, token: str) -> tuple[int | None, str]:
        entry = self._tokens.get(worker)
        current = self.incarnation_of(worker)
        if entry is None or current is None or entry[0] != current:
            return None, "no running incarnation of that worker"
        if not hmac.compare_digest(entry[1].encode(), token.encode("utf-8", "replace")):
            return None, "wrong token"
        if conn.auth == (worker, current):
            return current, ""
        if conn.pid <= 0 or not self.identify(worker, conn.pid):
            return None, f"peer pid {conn.pid} is not in the worker's process tree"
        conn.auth = (worker, current)
        return current, ""

    def _worker_op(self, conn: _Conn, op: str, req: dict[str, Any]) -> dict[str, Any]:
        worker, token = req.get("worker"), req.get("token")
        if not isinstance(worker, str) or not worker:
            return _error("missing field 'worker' (a string)")
        if not isinstance(token, str) or not token:
            return _error("missing field 'token' (a string)")
        name, detail, ok = req.get("name"), req.get("detail", ""), req.get("ok")
        if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME):
            return _error(f"field 'name' must be a string of at most {_MAX_NAME} characters")
        if not isinstance(detail, str):
            return _error("field 'detail' must be a string")
        if op == "trial_end" and not isinstance(ok, bool):
            return _error("missing field 'ok' (true or false)")
        incarnation, why = self._authenticate(conn, worker, token)
        if incarnation is None:
            self._notice("control_auth_failed", worker=worker, op=op, pid=conn.pid, uid=conn.uid, reason=why)
            return _error(f"authentication failed for worker {_short(worker)}")
        if op == "hello":
            if not conn.subscribed:
                self._limit_subscriptions(worker, incarnation)
                conn.subscribed = True
            return {"ok": True, "worker": worker, "incarnation": incarnation}
        now = self.clock()
        if op == "heartbeat":
            last = self._last_heartbeat.get(worker)
            if last is not None and now - last < HEARTBEAT_MIN_INTERVAL_S:
                return {"ok": True}
            self._last_heartbeat[worker] = now
        event = TrialEvent(worker=worker, incarnation=incarnation, kind=_EVENT_KIND[op], at=now, name=name,
                           ok=ok if op == "trial_end" else None, detail=detail[:_MAX_DETAIL])
        self.on_trial(event)
        return {"ok": True}

    def _limit_subscriptions(self, worker: str, incarnation: int) -> None:
        subs = sorted((c for c in self._conns if c.subscribed and c.auth == (worker, incarnation)),
                      key=lambda c: c.since)
        while len(subs) >= MAX_SUBSCRIPTIONS_PER_WORKER:
            subs.pop(0).abort()

    def _is_admin(self, conn: _Conn) -> bool:
        if conn.uid < 0:
            return False
        if conn.uid == 0 or conn.uid == os.geteuid():
            return True
        try:
            gid = grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return False
        if conn.gid == gid:
            return True
        groups = _peer_groups(conn.sock, conn.pid)
        return groups is not None and gid in groups

    async def _admin_op(self, conn: _Conn, op: str, req: dict[str, Any]) -> dict[str, Any]:
        if not self._is_admin(conn):
            self._notice("control_permission_denied", op=op, pid=conn.pid, uid=conn.uid)
            return _error("permission denied")
        if op in _ADMIN_NEEDS_WORKER and (not isinstance(req.get("worker"), str) or not req["worker"]):
            return _error(f"missing field 'worker' (a string) for {op}")
        request = {k: v for k, v in req.items() if k not in ("id", "token")}
        result = self.on_admin(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, Mapping):
            return _error("internal error: the daemon gave no reply")
        reply = dict(result)
        reply.setdefault("ok", True)
        return reply
