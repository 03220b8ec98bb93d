"""A virtual clock for driving the whole daemon in tests: time moves only when the test says so."""

from __future__ import annotations

import asyncio
import concurrent.futures

__all__ = ["VirtualClock", "InlineExecutor"]


class InlineExecutor(concurrent.futures.Executor):
    """Runs each submitted call at once, on the caller's thread: work the daemon hands to a thread
    (a reload's parse) finishes deterministically in virtual time."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever awaits the future
            fut.set_exception(e)
        return fut


class VirtualClock:
    """Implements the daemon's clock port (:class:`memguard.clock.Clock`) in virtual time.

    ``sleep_until`` parks the caller until the test advances the clock past
    its deadline (or its wake event is set). The test moves time with
    :meth:`advance`, which runs the loop until everything is parked, then
    jumps to the earliest deadline, wakes those sleepers, and repeats up to
    the target time: every timer the daemon set fires at its own virtual
    moment, in order, however long the jump.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        if wake.is_set() or deadline <= self.t:
            await asyncio.sleep(0)  # always yield: other tasks run between two ticks
            return
        loop = asyncio.get_running_loop()
        timer: asyncio.Future = loop.create_future()
        entry = (deadline, timer)
        self._sleepers.append(entry)
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @staticmethod
    async def settle(rounds: int = 50) -> None:
        """Let every task run until it waits on something (fakes do no real I/O: a few rounds do)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds``, firing each due sleeper at its own deadline."""
        target = self.t + seconds
        while True:
            await self.settle()
            due = [d for d, _ in self._sleepers if d <= target]
            if not due:
                break
            self.t = max(self.t, min(due))
            for d, fut in list(self._sleepers):
                if d <= self.t and not fut.done():
                    fut.set_result(None)
        self.t = target
        await self.settle()

    async def run_until(self, predicate, *, limit: float, step: float = 0.01) -> None:  # type: ignore[no-untyped-def]
        """Advance in ``step`` increments until ``predicate()`` is true; AssertionError after ``limit``
        virtual seconds (a test waiting for something that never happens fails, it cannot hang)."""
        waited = 0.0
        while not predicate():
            if waited >= limit:
                raise AssertionError(f"not reached within {limit} s of virtual time")
            await self.advance(step)
            waited += step
