"""systemd notifications: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Without ``NOTIFY_SOCKET`` (not run by systemd) every call is a silent
no-op. Watchdog pings are sent only from the tick loop, after a tick has
completed, so a wedged loop stops pinging and systemd restarts the
daemon; they go out at a quarter of ``WATCHDOG_USEC`` (systemd asks for
half or faster), never more than once a second. STATUS is kept ASCII:
the sdnotify package encodes as Latin-1 and silently drops anything else.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import sdnotify

__all__ = ["Notifier", "watchdog_interval"]


def watchdog_interval(env: dict[str, str] | os._Environ = os.environ) -> float | None:
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


class Notifier:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self.clock = clock
        wd = watchdog_interval()
        self.watchdog_s = wd
        self.ping_every_s = min(max(wd / 4, 0.05), 1.0) if wd else None
        self._last_ping = 0.0
        self._last_status = ""
        self.sent: list[str] = []  # what was sent, for the status command and tests

    def _send(self, message: str) -> None:
        if self._n is not None:
            self._n.notify(message)
            self.sent = (self.sent + [message])[-20:]

    def ready(self, status: str) -> None:
        self._last_status = _ascii(status)
        self._send(f"READY=1\nSTATUS={self._last_status}")
        self._last_ping = self.clock()
        if self.ping_every_s:
            self._send("WATCHDOG=1")

    def tick(self, status: str) -> None:
        """After every completed tick: a watchdog ping when due, STATUS when it changed."""
        if not self.enabled:
            return
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
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading configuration")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping workers")
