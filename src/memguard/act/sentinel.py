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
    instance <id>              kill every process whose environment says MEMGUARD_INSTANCE=<id>
    quit                       clean shutdown: exit and kill nothing

End of file on standard input means the daemon died (even by SIGKILL: the
kernel closes its end of the pipe): the sentinel then sends SIGKILL to
every registered process group, process and cgroup, then every process
whose environment carries the daemon's instance marker (a worker's
descendant created since the daemon last registered its tree), and exits.
Every kill is identity checked (memguard's one primitive, act/process.py).

It runs in its own process group, so killing a worker group never kills
it, and ignores SIGINT, SIGTERM and SIGHUP, so that it outlives the daemon
for the moment it takes to clean up.

Standard library only; run as ``python -I path/to/sentinel.py``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys

__all__ = ["main"]


def _load_process_module():  # type: ignore[no-untyped-def]
    """memguard's one signalling primitive (act/process.py, standard library only), loaded from the file
    next to this one: the sentinel kills exactly the way the daemon does, identity checks included."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "process.py")
    spec = importlib.util.spec_from_file_location("memguard_sentinel_process", path)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with this one
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_process = _load_process_module()


class _State:
    def __init__(self) -> None:
        self.groups: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.cgroups: dict[str, None] = {}
        self.instance: bytes | None = None

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
            elif word == "instance" and rest:
                self.instance = b"MEMGUARD_INSTANCE=" + rest.encode()
            elif word == "quit":
                return False
            elif word:
                print(f"memguard sentinel: unknown command {line!r}", file=sys.stderr)
        except ValueError:
            print(f"memguard sentinel: bad line {line!r}", file=sys.stderr)
        return True

    def kill_all(self) -> None:
        for path in self.cgroups:
            _process.kill_cgroup(path)
        for pgid, start in self.groups.items():
            _process.signal_group(pgid, start, signal.SIGKILL)
        for pid, start in self.pids.items():
            _process.signal_process(pid, start, signal.SIGKILL)
        if self.instance is not None:
            for _ in range(3):  # a few passes: a marked process may fork while we kill
                if not self._kill_marked():
                    break

    def _kill_marked(self) -> int:
        """SIGKILL every process whose initial environment carries this daemon's instance marker."""
        me = os.getpid()
        killed = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            start = _process.start_time(pid)
            if start is None:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if self.instance in env.split(b"\0") and _process.signal_process(pid, start, signal.SIGKILL).sent:
                killed += 1
        return killed


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
