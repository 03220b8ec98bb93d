"""The daemon's clock port: monotonic time, and sleeping until a deadline or a wake-up.

The decision core never reads a clock: the daemon passes it ``now``. The
daemon itself reads time and sleeps only through a :class:`Clock`, so a
test drives the whole daemon in virtual time
(:class:`memguard.testing.clock.VirtualClock`). Wall time is only for log
timestamps, which the logging library stamps itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock."""

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        """Return at ``deadline`` (on this clock) or as soon as ``wake`` is set, whichever is first."""


class MonotonicClock:
    """``time.monotonic`` and asyncio's own timers."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        timeout = deadline - time.monotonic()
        if wake.is_set() or timeout <= 0:
            await asyncio.sleep(0)  # always yield: the control socket and child watchers run between ticks
            return
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
