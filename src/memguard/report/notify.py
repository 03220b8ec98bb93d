"""systemd notifications: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Without ``NOTIFY_SOCKET`` (not run by systemd) every call is a silent
no-op. Watchdog pings are sent only from the tick loop, after a tick has
completed, so a wedged loop stops pinging and systemd restarts the
daemon; they go out at a quarter of ``WATCHDOG_USEC`` (systemd asks for
half or faster), never more than once a second. STATUS is kept ASCII.

Sending never blocks and never fails silently. The sdnotify package opens
and connects the datagram socket (it knows ``NOTIFY_SOCKET``'s forms,
``/path`` and ``@abstract``), but its ``notify()`` is not used: it sends
with a blocking ``sendall`` (a notify socket whose receive queue is full,
systemd busy or stopped, would stall the tick loop, the very thing the
watchdog guards) and hides every error behind a bare ``except``. So each
message goes out through that socket made non-blocking, and a message
that cannot go out (the queue full, the socket refused, gone or never
there) is dropped: the loop carries on guarding, the next tick tries
again (reconnecting when needed), and the problem is reported once per
outage through ``on_problem``, with its recovery reported once too. A
READY, RELOADING or STOPPING that was dropped is sent again at the next
tick, so systemd learns the state as soon as the socket takes messages.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Callable, Mapping

import sdnotify

from .log import get_logger

__all__ = ["Notifier", "watchdog_interval"]


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between pings asked of this process, or None when no watchdog is set."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        return max(int(usec) / 1e6, 0.0) or None
    except ValueError:
        return None


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\n", " ")[:200]


def _log_problem(event: str, level: str, message: str) -> None:
    getattr(get_logger(), level)(event, message=message)


class Notifier:
    """sd_notify for the daemon's loop. ``on_problem(event, level, message)`` hears of a failing notify
    socket (``notify_failed``, once per outage) and of its recovery (``notify_recovered``); by default they
    are logged."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_problem: Callable[[str, str, str], None] | None = None) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or ""
        self.enabled = bool(self.address)
        self.clock = clock
        self.on_problem = on_problem or _log_problem
        self._sock: socket.socket | None = None
        wd = watchdog_interval()
        self.watchdog_s = wd
        self.ping_every_s = min(max(wd / 4, 0.05), 1.0) if wd else None
        self._last_ping = 0.0
        self._last_status = ""
        self._pending: str | None = None  # a state message (READY, RELOADING, STOPPING) still to deliver
        self._failing = False  # in an outage: reported once, until a message gets through again
        self.dropped = 0  # messages that could not be sent
        self.sent: list[str] = []  # what was sent, for the status command and tests

    # ------------------------------------------------------------------ the socket

    def _connect(self) -> socket.socket:
        """A connected, non-blocking socket to NOTIFY_SOCKET (opened by sdnotify). Raises OSError."""
        try:
            n = sdnotify.SystemdNotifier(debug=True)  # debug: raise, instead of keeping a None socket
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - sdnotify fails with TypeError/IndexError on odd addresses
            raise OSError(errno.EINVAL, f"cannot use NOTIFY_SOCKET={self.address!r}: {e}") from None
        sock = n.socket
        sock.setblocking(False)
        return sock

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _send(self, message: str) -> bool:
        """Send one message without blocking; True when the socket took it."""
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                self._sock = self._connect()
            self._sock.send(message.encode("ascii", "replace"))
        except OSError as e:
            if not isinstance(e, BlockingIOError) and e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self._close()  # refused, gone, or never there: connect afresh next time
            self._dropped(message, e)
            return False
        self.sent = (self.sent + [message])[-20:]
        if self._failing:
            self._failing = False
            self.on_problem("notify_recovered", "info",
                            f"the systemd notify socket {self.address} takes messages again "
                            f"({self.dropped} dropped in all)")
        return True

    def _dropped(self, message: str, error: OSError) -> None:
        self.dropped += 1
        if self._failing:
            return
        self._failing = True
        if isinstance(error, BlockingIOError) or error.errno in (errno.EAGAIN, errno.ENOBUFS):
            why = "its queue is full (systemd is not reading it)"
        else:
            why = error.strerror or str(error)
        first = message.split("\n", 1)[0]
        self.on_problem("notify_failed", "warning",
                        f"cannot notify systemd at {self.address}: {why}; {first} dropped. memguard goes on "
                        f"guarding and retries at every tick; if systemd's watchdog is on and this lasts, "
                        f"systemd will restart memguard")

    # ------------------------------------------------------------------ messages

    def _state(self, message: str) -> None:
        """A state change systemd must learn: kept for the next tick when it cannot go out now."""
        self._pending = None if self._send(message) else message

    def ready(self, status: str) -> None:
        self._last_status = _ascii(status)
        self._state(f"READY=1\nSTATUS={self._last_status}")
        self._last_ping = self.clock()
        if self.ping_every_s:
            self._send("WATCHDOG=1")

    def tick(self, status: str) -> None:
        """After every completed tick: a dropped state message again, a watchdog ping when due, STATUS when
        it changed."""
        if not self.enabled:
            return
        if self._pending is not None:
            self._state(self._pending)
        now = self.clock()
        status = _ascii(status)
        if self.ping_every_s is not None and now - self._last_ping >= self.ping_every_s:
            self._last_ping = now
            self._send("WATCHDOG=1" + (f"\nSTATUS={status}" if status != self._last_status else ""))
            self._last_status = status
        elif status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def max_sleep(self) -> float | None:
        """The loop must tick at least this often for the watchdog to be fed."""
        return self.ping_every_s

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self._state(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading configuration")

    def stopping(self) -> None:
        self._state("STOPPING=1\nSTATUS=stopping workers")

    def close(self) -> None:
        self._close()
