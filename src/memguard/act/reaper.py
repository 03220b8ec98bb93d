"""Freeing a killed victim's memory fast: ``process_mrelease`` after SIGKILL, off the event loop.

A process killed with SIGKILL frees its memory while it exits, which for
gigabytes takes tenths of a second. Meanwhile the kernel no longer counts
it (its memory is already detached from it), so if another process faults
in that window the kernel's OOM killer looks for someone else: in the
replay of a real incident, it picked sshd. ``process_mrelease`` (Linux
5.15) reaps a dying process's memory at once from the caller, as the
kernel's own OOM reaper does; earlyoom calls it after each kill.

It blocks while it unmaps, so it runs here, in one thread of its own, on
pidfds pinned and identity-checked on the event loop (a reused pid is never
touched). The main victim gets its SIGKILL on the loop at once; the thread
then calls ``process_mrelease`` on it and sends each other target its
SIGKILL and the call back to back, for the call only helps before a victim
has let go of its memory on its way out. The loop never waits for the
thread. What it did
comes back to the daemon's inbox as a notice, through the event loop. A
kernel without the call is said once.

The victim's memory is not counted as available before it is gone: the
core keeps the victim locked (one victim at a time, invariant 3) until its
exit, whatever this thread achieved.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
import time
from typing import Callable

from ..model import Notice
from .process import MRELEASE_UNSUPPORTED, Outcome, pidfd_kill, pin, process_mrelease

__all__ = ["MemoryReleaser"]

class MemoryReleaser:
    """One background thread that calls ``process_mrelease`` on processes that were just killed.

    ``report`` receives a :class:`~memguard.model.Notice` on the event loop (it is called through
    ``loop.call_soon_threadsafe``).
    """

    def __init__(self, report: Callable[[Notice], None]) -> None:
        self._report = report
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.unsupported = False
        self._said_unsupported = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="memguard-mrelease", daemon=True)
        self._thread.start()

    def kill(self, targets: list[tuple[int, int]], who: str) -> list[tuple[int, int]]:
        """SIGKILL ``targets`` (pid, start time) from the releaser's thread and reap their memory at once.

        ``process_mrelease`` only helps while the victim has not yet detached its memory on its way out
        (after that the kernel returns ESRCH and the victim frees it as it unwinds), so the call should
        follow the signal closely. The first target (the main victim) is signalled here, on the caller's
        thread, at once: waking the releaser's thread can take milliseconds on a machine whose cores the
        victim keeps busy, and every millisecond is memory the victim takes. The thread then reaps it and
        sends each other target its signal and makes the call back to back, holding the interpreter lock
        across the pair. Nothing here waits for the thread (the caller's own group and member kills follow
        at once); returns the pair signalled here, the main victim, or nothing.
        """
        if self._thread is None or self.unsupported:
            return []
        first: tuple[int, int] | None = None  # the main victim (or the first still there), signalled here
        fds = []
        for pid, start in targets:
            fd = pin(pid, start)
            if isinstance(fd, Outcome):
                continue
            if not fds and pidfd_kill(fd):
                first = (pid, start)
            fds.append((fd, pid))
        if not fds:
            return []
        self._queue.put((fds, who, time.monotonic(), first is not None))
        return [first] if first is not None else []

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
        while True:  # fds never handed to the thread
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                for fd, _ in item[0]:
                    os.close(fd)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fds, who, queued, first_killed = item
            released, freeing, errors = [], [], []
            began = time.monotonic()
            for i, (fd, pid) in enumerate(fds):
                try:
                    # the first was signalled by kill() itself; each other: kill, then reap at once
                    if not (first_killed if i == 0 else pidfd_kill(fd)):
                        continue
                    err = process_mrelease(fd)
                finally:
                    os.close(fd)
                if err == 0:
                    released.append(pid)
                elif err in MRELEASE_UNSUPPORTED:
                    self.unsupported = True
                    errors.append((pid, err))
                elif err == errno.ESRCH:  # it had already let go of its memory: it frees it itself, exiting
                    freeing.append(pid)
                else:
                    errors.append((pid, err))
            took = time.monotonic() - began
            self._tell(who, released, freeing, errors, took, began - queued)

    def _tell(self, who: str, released: list[int], freeing: list[int], errors: list[tuple[int, int]], took: float,
              waited: float) -> None:
        notes = []
        if released or freeing:
            text = (f"{who}: memory of {len(released)} killed process(es) reaped with process_mrelease in "
                    f"{took * 1000:.0f} ms" + (f" (pids {', '.join(map(str, released[:10]))})" if released else ""))
            if freeing:
                text += (f"; {len(freeing)} had already let go of it and free it as they exit (pids "
                         f"{', '.join(map(str, freeing[:10]))})")
            notes.append(Notice("memory_released", level="info" if released else "debug",
                                pid=(released or freeing)[0], reason=text,
                                fields={"pids": released, "already_freeing": freeing,
                                        "release_ms": round(took * 1000, 1), "queued_ms": round(waited * 1000, 1)}))
        if self.unsupported and not self._said_unsupported:
            self._said_unsupported = True
            notes.append(Notice("memory_release_unsupported", level="warning", reason=(
                "process_mrelease is not available (Linux >= 5.15 has it): a killed victim frees its memory "
                "as it exits, which takes longer for large processes. Said once.")))
        elif errors:
            notes.append(Notice("memory_release_failed", level="debug", reason=(
                f"{who}: process_mrelease refused for {len(errors)} process(es): "
                + ", ".join(f"pid {p}: {os.strerror(e)}" for p, e in errors[:5])
                + " (a process sharing its memory with one that lives on cannot be reaped early)")))
        loop = self._loop
        for note in notes:
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._report, note)
                except RuntimeError:  # the loop closed in between
                    return
