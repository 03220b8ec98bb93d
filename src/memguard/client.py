"""What a worker imports to cooperate with memguard. Standard library only.

::

    import memguard.client as mg

    @mg.trial                      # or: with mg.trial("trial-7"): ...
    def run_one(params):
        for epoch in range(100):
            train(...)
            mg.heartbeat()         # a long trial says it is alive (at most one message a second)

    mg.on_reclaim(cache.clear)     # run when memguard asks for memory back

Outside memguard (no ``MEMGUARD_SOCKET`` and no ``MEMGUARD_ADMISSION_FILE``
in the environment) every function here is a no-op, so the same code runs
on a laptop.

Under memguard:

- :func:`trial` waits while the worker's admission gate is closed (memguard
  closed it because memory is short: new trials wait, running ones go on),
  reports ``refused`` once when it has to wait, then claims the trial
  (``trial_start``) and reads the gate once more, withdrawing the claim and
  waiting again if it closed meanwhile; on exit it reports ``trial_end``
  (``ok`` false when an exception, including KeyboardInterrupt, is
  propagating).
- The client keeps one connection to memguard's control socket, opened on
  first use, and a daemon thread that reads what memguard pushes. On a
  ``reclaim`` push it runs ``gc.collect()``, returns freed heap to the
  system (glibc ``malloc_trim``), empties PyTorch's CUDA cache when torch is
  already imported, then the callbacks given to :func:`on_reclaim`, and
  reports ``reclaimed``. Callbacks run on that background thread; an
  exception in one is reported, never raised in the worker.
- When the socket cannot be reached (memguard restarting), the client
  retries briefly, then carries on with the admission file alone and tries
  the socket again later. A trial is never failed because memguard is away.
"""

from __future__ import annotations

import _thread
import gc
import itertools
import os
import sys
import time

from . import paths as _paths

# Importing the client stays cheap for every worker: json, socket, logging and threading are imported
# when first used (a worker outside memguard never needs them); typing only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any, Callable, Mapping, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "MemguardError",
    "AdmissionTimeout",
    "ControlUnavailable",
    "Client",
    "trial",
    "heartbeat",
    "on_reclaim",
    "budget",
    "under_memguard",
    "worker_name",
    "wait_for_admission",
    "admission",
    "admin_request",
    "default_client",
]

ENV_SOCKET = "MEMGUARD_SOCKET"
ENV_TOKEN = "MEMGUARD_TOKEN"
ENV_WORKER = "MEMGUARD_WORKER"
ENV_ADMISSION = "MEMGUARD_ADMISSION_FILE"
ENV_MEMORY_LIMIT = "MEMGUARD_MEMORY_LIMIT"
ENV_GPU_MEMORY_LIMIT = "MEMGUARD_GPU_MEMORY_LIMIT"
_ENV_KEYS = (ENV_SOCKET, ENV_TOKEN, ENV_WORKER, ENV_ADMISSION)

#: Where ``memguard`` run as root (the service) puts its socket. Admin
#: requests look there last (see :mod:`memguard.paths`).
DEFAULT_ADMIN_SOCKET = _paths.SYSTEM_SOCKET

# Defaults, with their units and reasons.
#: 0.2 s between two reads of the admission file while waiting: a trial
#: starts at most 0.2 s after the gate opens, for one tiny read per tick.
POLL_INTERVAL_S = 0.2
#: Three connection attempts, 50 ms, 200 ms and 500 ms apart (0.75 s in all):
#: long enough to ride over a socket being recreated, short enough that a
#: trial is not held up when memguard is really gone.
CONNECT_BACKOFF_S = (0.05, 0.2, 0.5)
#: After giving up, try the socket again 30 s later (at the next request).
RECONNECT_AFTER_S = 30.0
#: 2 s for memguard to answer ``hello``; the daemon's loop answers in
#: milliseconds unless it is stuck, and then the client goes on without it.
REQUEST_TIMEOUT_S = 2.0
#: A heartbeat is sent at most once a second; more often tells memguard nothing.
HEARTBEAT_INTERVAL_S = 1.0
#: memguard's replies and pushes are short lines; 1 MiB without a newline is not memguard.
_MAX_LINE_BYTES = 1024 * 1024



class _LazyLog:
    """``logging.getLogger("memguard.client")``, imported at the first message."""

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("memguard.client"), name)


_log = _LazyLog()


class MemguardError(Exception):
    """Base class of the errors memguard.client raises."""


class AdmissionTimeout(MemguardError):
    """memguard kept the worker's admission gate closed longer than ``wait_timeout``."""

    def __init__(self, worker: str | None, reason: str, waited_s: float) -> None:
        self.worker = worker
        self.reason = reason
        self.waited_s = waited_s
        super().__init__(
            f"memguard kept admission closed for worker {worker or '?'} for {waited_s:.0f}s "
            f"(wait_timeout); reason given: {reason or 'none'}")


class ControlUnavailable(MemguardError):
    """The control socket could not be reached or did not answer (admin requests)."""


# ---------------------------------------------------------------------------
# the connection


class _Connection:
    """One socket to memguard plus the daemon thread that reads replies and pushes."""

    def __init__(self, sock: socket.socket, on_push: Callable[[dict[str, Any]], None]) -> None:
        self.sock = sock
        self.on_push = on_push
        self.pid = os.getpid()
        self.alive = True
        import threading

        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # id -> [Event, reply]
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._read_loop, name="memguard-client", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any], wait_s: float | None = None) -> dict[str, Any] | None:
        """Send one request; with ``wait_s``, wait that long for its reply. Raises OSError when dead."""
        if not self.alive:
            raise ConnectionError("connection to memguard closed")
        rid = next(self._ids)
        slot: list[Any] | None = None
        if wait_s is not None:
            import threading

            slot = [threading.Event(), None]
            self._waiting[rid] = slot
        import json

        data = (json.dumps({**message, "id": rid}, separators=(",", ":")) + "\n").encode()
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except BaseException:  # an error, or KeyboardInterrupt half-way through a line
            self.close()  # a torn line must not be followed by the next one: start a new connection
            raise
        if slot is None:
            return None
        slot[0].wait(wait_s)
        self._waiting.pop(rid, None)
        return slot[1]

    def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._dispatch(line)
                if len(buf) > _MAX_LINE_BYTES:
                    break  # not memguard speaking: give the connection up
        except OSError:
            pass
        finally:
            self.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            import json

            msg = json.loads(line)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if "event" in msg:
            try:
                self.on_push(msg)
            except Exception:  # noqa: BLE001 - the reader thread must survive anything
                _log.exception("memguard: handling a push failed")
            return
        slot = self._waiting.get(msg.get("id"))  # type: ignore[arg-type]
        if slot is not None:
            slot[1] = msg
            slot[0].set()
        elif msg.get("ok") is False:
            error = str(msg.get("error"))
            if error not in self._reported:  # say each distinct problem once
                self._reported.add(error)
                _log.warning("memguard refused a report: %s", error)

    def close(self) -> None:
        self.alive = False
        try:
            self.sock.shutdown(2)  # socket.SHUT_RDWR
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        for slot in list(self._waiting.values()):
            slot[0].set()


# ---------------------------------------------------------------------------
# the client


class Client:
    """memguard's worker-side client. Module-level functions use one per process.

    ``env`` defaults to ``os.environ``; a client built with an environment
    lacking both ``MEMGUARD_SOCKET`` and ``MEMGUARD_ADMISSION_FILE`` does
    nothing.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, poll_interval_s: float = POLL_INTERVAL_S,
                 connect_backoff_s: tuple[float, ...] = CONNECT_BACKOFF_S,
                 reconnect_after_s: float = RECONNECT_AFTER_S) -> None:
        env = os.environ if env is None else env
        self.socket_path = env.get(ENV_SOCKET) or None
        self.token = env.get(ENV_TOKEN) or None
        self.worker = env.get(ENV_WORKER) or None
        self.admission_file = env.get(ENV_ADMISSION) or None
        self.poll_interval_s = poll_interval_s
        self.connect_backoff_s = connect_backoff_s
        self.reconnect_after_s = reconnect_after_s
        self._lock = _thread.allocate_lock()
        self._conn: _Connection | None = None
        self._retry_at = 0.0
        self._warned = False
        self._callbacks: list[Callable[[], Any]] = []
        self._last_heartbeat = float("-inf")
        self._reclaim_lock = _thread.allocate_lock()
        self._reclaim_pending = False
        self._reclaim_running = False

    # ------------------------------------------------------------------ state

    @property
    def active(self) -> bool:
        """True when this process runs under memguard."""
        return bool(self.socket_path or self.admission_file)

    def admission(self) -> tuple[bool, str]:
        """(open, reason) from the admission file; open when there is no file or it cannot be read."""
        if not self.admission_file:
            return True, ""
        try:
            with open(self.admission_file) as f:
                text = f.read(4096).strip()
        except OSError:
            return True, ""
        if text.startswith("closed"):
            return False, text[len("closed"):].lstrip(":").strip()
        return True, ""

    # ------------------------------------------------------------------ the socket

    def _connection(self) -> _Connection | None:
        if not (self.socket_path and self.token and self.worker):
            return None
        with self._lock:
            conn = self._conn
            if conn is not None and conn.alive and conn.pid == os.getpid():
                return conn
            if conn is not None and conn.pid != os.getpid():
                self._conn = conn = None  # inherited across fork(): the parent's, not ours
            if time.monotonic() < self._retry_at:
                return None
            conn = self._connect()
            if conn is None:
                self._retry_at = time.monotonic() + self.reconnect_after_s
                if not self._warned:
                    self._warned = True
                    _log.warning("memguard: cannot reach %s; going on with the admission file alone",
                                 self.socket_path)
                return None
            self._conn = conn
            return conn

    def _connect(self) -> _Connection | None:
        assert self.socket_path is not None
        for attempt, pause in enumerate((0.0, *self.connect_backoff_s)):
            if pause:
                time.sleep(pause)
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(REQUEST_TIMEOUT_S)
                sock.connect(self.socket_path)
                sock.settimeout(None)
            except OSError:
                sock.close()
                continue
            conn = _Connection(sock, self._on_push)
            try:
                reply = conn.send(self._message("hello"), wait_s=REQUEST_TIMEOUT_S)
            except OSError:
                continue
            if reply is not None and reply.get("ok") is False:
                _log.warning("memguard refused this worker's hello: %s", reply.get("error"))
                conn.close()
                return None  # a wrong token will not get better by retrying
            return conn
        return None

    def _message(self, op: str, **fields: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": op, "worker": self.worker, "token": self.token}
        msg.update({k: v for k, v in fields.items() if v is not None})
        return msg

    def _send(self, op: str, **fields: Any) -> bool:
        """Send a report without waiting for its answer; False when memguard could not be reached."""
        for _ in range(2):  # a connection found dead is replaced once
            conn = self._connection()
            if conn is None:
                return False
            try:
                conn.send(self._message(op, **fields))
                return True
            except OSError:
                continue
        return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ the API

    def wait_for_admission(self, wait_timeout: float | None = 3600.0, name: str | None = None) -> float:
        """Wait until the admission gate is open; returns the seconds waited.

        Reports ``refused`` once when it has to wait. Raises
        :class:`AdmissionTimeout` after ``wait_timeout`` seconds (None: wait
        for ever).
        """
        is_open, reason = self.admission()
        if is_open:
            return 0.0
        self._send("refused", name=name, detail=reason)
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            if wait_timeout is not None and waited >= wait_timeout:
                raise AdmissionTimeout(self.worker, reason, waited)
            pause = self.poll_interval_s
            if wait_timeout is not None:
                pause = min(pause, max(0.0, wait_timeout - waited))
            time.sleep(pause)
            is_open, now_reason = self.admission()
            if is_open:
                return time.monotonic() - start
            reason = now_reason or reason

    def claim(self, wait_timeout: float | None = 3600.0, name: str | None = None) -> float:
        """Wait at the gate, then claim the next trial before it is created; returns the seconds waited.

        The claim (``trial_start``) goes to memguard first and the gate is
        read again after it: a gate that closed in between is answered with
        ``trial_withdraw`` and another wait. So a trial never starts behind
        a closed gate, and memguard, which recycles or brakes a worker only
        between trials, has heard of any trial whose start crossed the
        closing before that trial begins. Without the control socket the
        claim is the wait alone.
        """
        waited = 0.0
        while True:
            waited += self.wait_for_admission(None if wait_timeout is None else max(0.0, wait_timeout - waited),
                                              name=name)
            if not self._send("trial_start", name=name):
                return waited  # no socket: nobody to race with but the file itself
            if self.admission()[0]:
                return waited
            self._send("trial_withdraw")

    def name_trial(self, name: str) -> bool:
        """Name the claimed trial once it exists (Optuna gives a trial its number only when it creates it)."""
        return self._send("trial_start", name=name)

    def end_trial(self, name: str | None, ok: bool, detail: str | None = None) -> bool:
        """Report the end of the claimed trial: ``ok`` False for a failure, ``detail`` what failed."""
        return self._send("trial_end", name=name, ok=ok, detail=detail)

    def withdraw(self) -> bool:
        """Give a claim back: the trial was not created after all (nothing is counted)."""
        return self._send("trial_withdraw")

    def report_requeued(self, name: str, detail: str) -> bool:
        """Tell memguard that a trial an earlier start of this worker left running was failed and requeued."""
        return self._send("trial_requeued", name=name, detail=detail)

    def trial(self, name: str | None = None, *, wait_timeout: float | None = 3600.0) -> "_Trial":
        return _Trial(self, name, wait_timeout)

    def heartbeat(self) -> bool:
        """Tell memguard a long trial is alive; at most one message a second. True when sent."""
        if not self.socket_path:
            return False
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return False
        self._last_heartbeat = now
        return self._send("heartbeat")

    def on_reclaim(self, callback: F) -> F:
        """Run ``callback()`` (no arguments, on a background thread) when memguard asks for memory back."""
        self._callbacks.append(callback)
        self._connection()  # subscribe now, so the push can reach us
        return callback

    def _on_push(self, msg: dict[str, Any]) -> None:
        if msg.get("event") != "reclaim":
            return
        with self._reclaim_lock:
            self._reclaim_pending = True
            if self._reclaim_running:
                return  # the running pass will go round once more
            self._reclaim_running = True
        import threading

        threading.Thread(target=self._reclaim_loop, name="memguard-reclaim", daemon=True).start()

    def _reclaim_loop(self) -> None:
        while True:
            with self._reclaim_lock:
                if not self._reclaim_pending:
                    self._reclaim_running = False
                    return
                self._reclaim_pending = False
            try:
                detail = self.run_reclaim()
            except BaseException as e:  # noqa: BLE001 - never let a reclaim kill the thread silently
                detail = f"reclaim failed: {type(e).__name__}: {e}"
            self._send("reclaimed", detail=detail)

    def run_reclaim(self) -> str:
        """Run the built-in reclaim steps and the callbacks now; returns a one-line summary."""
        notes: list[str] = []
        errors: list[str] = []
        try:
            notes.append(f"gc collected {gc.collect()} objects")
        except Exception as e:  # noqa: BLE001
            errors.append(f"gc.collect: {type(e).__name__}: {e}")
        if _malloc_trim():
            notes.append("malloc_trim")
        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    notes.append("torch.cuda.empty_cache")
            except Exception as e:  # noqa: BLE001
                errors.append(f"torch.cuda.empty_cache: {type(e).__name__}: {e}")
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception as e:  # noqa: BLE001 - reported, never raised in the worker
                errors.append(f"{getattr(cb, '__qualname__', repr(cb))}: {type(e).__name__}: {e}")
        ran = f"{len(self._callbacks)} callback(s)"
        text = "; ".join([*notes, ran])
        if errors:
            text += "; errors: " + "; ".join(errors)
        return text[:2000]

    def budget(self) -> dict[str, Any]:
        return _budget(os.environ)


def _malloc_trim() -> bool:
    """Give freed heap memory back to the system (glibc only); False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class _Trial:
    def __init__(self, client: Client | None, name: str | None, wait_timeout: float | None) -> None:
        self.client = client
        self.name = name
        self.wait_timeout = wait_timeout
        self._started: Client | None = None

    def _recreate_cm(self) -> "_Trial":
        return _Trial(self.client, self.name, self.wait_timeout)  # one per call: re-entrant as a decorator

    def __call__(self, func: F) -> F:
        """Used as a decorator: each call runs in a trial of its own (contextlib.ContextDecorator's way)."""
        import functools

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with self._recreate_cm():
                return func(*args, **kwargs)

        return inner  # type: ignore[return-value]

    def __enter__(self) -> "_Trial":
        c = self.client or default_client()
        if not c.active:
            return self
        c.claim(self.wait_timeout, name=self.name)
        self._started = c
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        c, self._started = self._started, None
        if c is not None:
            detail = f"{et.__name__}: {ev}"[:500] if et is not None else None
            c.end_trial(self.name, et is None, detail)
        return False


# ---------------------------------------------------------------------------
# module-level API, on one client per process


_default: Client | None = None
_default_key: tuple[str | None, ...] | None = None
_default_lock = _thread.allocate_lock()
_callbacks: list[Callable[[], Any]] = []


def default_client() -> Client:
    """The process's client, rebuilt when the memguard variables of the environment change."""
    global _default, _default_key
    key = tuple(os.environ.get(k) for k in _ENV_KEYS)
    with _default_lock:
        if _default is None or key != _default_key:
            if _default is not None:
                _default.close()
            _default = Client()
            _default._callbacks = _callbacks  # callbacks survive a rebuild
            _default_key = key
        return _default


def _after_fork_in_child() -> None:
    # Locks and the connection belong to the parent; start afresh in the child.
    global _default, _default_key, _default_lock
    _default_lock = _thread.allocate_lock()
    _default = None
    _default_key = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def under_memguard() -> bool:
    """True when this process was started by memguard."""
    return bool(os.environ.get(ENV_SOCKET) or os.environ.get(ENV_ADMISSION))


def worker_name() -> str | None:
    """The worker's name (``trials-0``), or None outside memguard."""
    return os.environ.get(ENV_WORKER) or None


def trial(name: Any = None, *, wait_timeout: float | None = 3600.0) -> Any:
    """Wrap one trial: wait at the admission gate, report start and end.

    A context manager (``with trial("trial-7"):``) and a decorator
    (``@trial`` or ``@trial("name")``). ``wait_timeout`` in seconds (None:
    wait for ever) bounds the wait at a closed gate; past it
    :class:`AdmissionTimeout` is raised. A no-op outside memguard.
    """
    if callable(name):  # bare @trial
        return _Trial(None, None, wait_timeout)(name)
    return _Trial(None, name, wait_timeout)


def wait_for_admission(wait_timeout: float | None = 3600.0) -> float:
    """Wait until memguard admits new work (no trial is reported); returns the seconds waited."""
    return default_client().wait_for_admission(wait_timeout)


def admission() -> tuple[bool, str]:
    """(open, reason) of this worker's admission gate right now; (True, "") outside memguard."""
    return default_client().admission()


def heartbeat() -> bool:
    """Tell memguard the running trial is alive (for ``heartbeat_timeout``); rate-limited to 1/s."""
    return default_client().heartbeat()


def on_reclaim(callback: F) -> F:
    """Register ``callback()`` to run when memguard asks this worker for memory back.

    Usable as a decorator. Callbacks run on a background thread after
    ``gc.collect()``; keep them quick and thread-safe (clear a cache, drop
    a buffer). A no-op outside memguard (the callback is kept, never run).
    """
    if callback not in _callbacks:
        _callbacks.append(callback)
    c = default_client()
    if c.active:
        c._connection()
    return callback


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def _budget(env: Mapping[str, str]) -> dict[str, Any]:
    return {
        "memory_limit_bytes": _int_env(env, ENV_MEMORY_LIMIT),
        "gpu_memory_limit_bytes": _int_env(env, ENV_GPU_MEMORY_LIMIT),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
    }


def budget() -> dict[str, Any]:
    """The memory this worker is meant to use, from its environment; None where not set.

    ``memory_limit_bytes`` (the workload's ``limits.memory``),
    ``gpu_memory_limit_bytes``, ``cuda_visible_devices``.
    """
    return _budget(os.environ)


def admin_request(op: str, socket_path: str | None = None, *, timeout_s: float = 10.0,
                  **fields: Any) -> dict[str, Any]:
    """Send one admin request (``status``, ``reload``, ``stop``, ``start``, ``restart``) and return the reply.

    ``socket_path`` defaults to ``MEMGUARD_SOCKET``, then the socket of this
    user's own daemon, then root's ``/run/memguard/control.sock``: the first
    that exists (:func:`memguard.paths.find_socket`). Raises
    :class:`ControlUnavailable` when the socket cannot be reached or does not
    answer within ``timeout_s``; when no socket exists, the message names
    every place looked at.
    """
    path, tried = _paths.find_socket(socket_path)
    if len(tried) > 1 and not os.path.exists(path):
        raise ControlUnavailable("no memguard control socket found (looked at " + ", ".join(tried)
                                 + "); is memguard running? Name the socket with --socket or MEMGUARD_SOCKET")
    import json
    import socket

    data = (json.dumps({"op": op, **fields, "id": 1}, separators=(",", ":")) + "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(data)
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ControlUnavailable(f"cannot talk to memguard at {path}: {e}") from e
    if b"\n" not in buf:
        raise ControlUnavailable(f"memguard at {path} closed the connection without answering")
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as e:
        raise ControlUnavailable(f"memguard at {path} answered something that is not JSON") from e
    if not isinstance(reply, dict):
        raise ControlUnavailable(f"memguard at {path} answered something that is not a JSON object")
    return reply
