"""One reader of ``/proc/<pid>/stat`` for every room that needs a process's identity.

A pid plus its start time names one process for good (a reused pid has a
later start time); state, parent, process group and session tell the rest.
The command name may hold spaces and parentheses, so fields are counted
from the last ``)``. (The sentinel keeps a copy of its own: it runs as a
standalone standard-library script and imports nothing of memguard.)
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["ProcStat", "read_stat", "read_comm", "same_process", "DEAD_STATES"]

DEAD_STATES = ("Z", "X", "x")


class ProcStat(NamedTuple):
    state: str  # "R", "S", "Z"...
    ppid: int
    pgrp: int
    session: int
    threads: int
    start: int  # clock ticks since boot (field 22)
    # utime + stime + cutime + cstime (fields 14-17), clock ticks: CPU used by the process and by its
    # children it has reaped.
    cpu_ticks: int = 0

    @property
    def dead(self) -> bool:
        """Exited (a zombie waiting to be reaped counts as exited)."""
        return self.state in DEAD_STATES


def read_stat(pid: int) -> ProcStat | None:
    """The fields of /proc/<pid>/stat memguard uses; None if the pid is gone or the file is unreadable."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    r = data.rfind(b")")
    if r < 0:
        return None
    f = data[r + 2:].split()
    # f[0] is field 3 (state): ppid 4, pgrp 5, session 6, utime..cstime 14-17, num_threads 20, starttime 22.
    try:
        return ProcStat(f[0].decode(), int(f[1]), int(f[2]), int(f[3]), int(f[17]), int(f[19]),
                        int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))
    except (IndexError, ValueError):
        return None


def same_process(pid: int, start: int) -> bool:
    """Is ``pid`` still the live process that started at ``start``?"""
    st = read_stat(pid)
    return st is not None and st.start == start and not st.dead


def read_comm(pid: int) -> str | None:
    """The command name of ``pid`` (``/proc/<pid>/comm``); None if gone or unreadable."""
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
