"""The sentinel: kills the workers' process groups when the daemon dies.

A tiny process started by :class:`memguard.act.children.ChildSupervisor`
with a pipe from the daemon as its standard input. The daemon tells it,
one line at a time, what to kill should the daemon disappear::

    add <pgid> <starttime>     a worker's process group (leader's start time)
    del <pgid>                 that group is gone: forget it
    pid <pid> <starttime>      one process outside any registered group
    unpid <pid>                forget it
    cgroup <path>              a cgroup directory: kill everything in it
    uncgroup <path>            forget it
    quit                       clean shutdown: exit and kill nothing

End of file on standard input means the daemon died (even by SIGKILL: the
kernel closes its end of the pipe): the sentinel then sends SIGKILL to
every registered process group, process and cgroup, and exits.

It runs in its own process group, so killing a worker group never kills
it, and ignores SIGINT, SIGTERM and SIGHUP, so that it outlives the daemon
for the moment it takes to clean up.

Standard library only; run as ``python -I path/to/sentinel.py``.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["main", "start_time"]


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _kill_process(pid: int, start: int) -> None:
    """SIGKILL ``pid`` only if it is still the process that started at ``start``."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # The pidfd pins the process: checked after opening, the start time
        # proves the pidfd refers to the registered process, not a reuse.
        if start_time(pid) == start:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kill_group(pgid: int, start: int) -> None:
    """SIGKILL the process group ``pgid`` unless its number was reused.

    A group's number cannot be handed out again while any member lives, so
    a missing leader (exited, members left) still means our group; a leader
    with another start time means the old group is gone and the number
    now belongs to someone else.
    """
    now = start_time(pgid)
    if now is not None and now != start:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _kill_cgroup(path: str) -> None:
    try:  # cgroup v2 (Linux 5.14+): one write kills the whole cgroup
        fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY)  # no O_CREAT
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, b"1")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    for _ in range(10):  # a few passes: processes may fork while we kill
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class _State:
    def __init__(self) -> None:
        self.groups: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.cgroups: dict[str, None] = {}

    def command(self, line: str) -> bool:
        """Apply one line; False when told to quit."""
        word, _, rest = line.partition(" ")
        try:
            if word == "add":
                pgid, start = rest.split()
                self.groups[int(pgid)] = int(start)
            elif word == "del":
                self.groups.pop(int(rest), None)
            elif word == "pid":
                pid, start = rest.split()
                self.pids[int(pid)] = int(start)
            elif word == "unpid":
                self.pids.pop(int(rest), None)
            elif word == "cgroup" and rest:
                self.cgroups[rest] = None
            elif word == "uncgroup":
                self.cgroups.pop(rest, None)
            elif word == "quit":
                return False
            elif word:
                print(f"memguard sentinel: unknown command {line!r}", file=sys.stderr)
        except ValueError:
            print(f"memguard sentinel: bad line {line!r}", file=sys.stderr)
        return True

    def kill_all(self) -> None:
        for path in self.cgroups:
            _kill_cgroup(path)
        for pgid, start in self.groups.items():
            _kill_group(pgid, start)
        for pid, start in self.pids.items():
            _kill_process(pid, start)


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    state = _State()
    buf = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            state.kill_all()
            return 0
        buf += chunk
        while True:
            line, sep, rest = buf.partition(b"\n")
            if not sep:
                break
            buf = rest
            if not state.command(line.decode("utf-8", "replace").strip()):
                return 0


if __name__ == "__main__":
    sys.exit(main())
