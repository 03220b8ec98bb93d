"""Signalling a process, a process group or a cgroup's processes: one primitive, identity checked.

A pid names a process only while that process lives: once it is reaped,
the number can be handed to a stranger. So every signal memguard sends
goes through here, and each path proves identity before it signals:

- one process: ``pidfd_open`` pins whatever process holds the pid now;
  its start time (``/proc/<pid>/stat`` field 22), read *after* pinning,
  must be the one recorded when memguard first saw it; then the signal
  goes through the pidfd, so it cannot reach a process that took the pid
  in between;
- a process group: a group's number cannot be reused while any member
  lives, so ``killpg`` is safe as long as the leader, if it still exists,
  is the recorded one (same start time);
- a cgroup's processes (cgroup v1 has no ``cgroup.kill``): each pid read
  from ``cgroup.procs`` is pinned with a pidfd, then ``cgroup.procs`` is
  read again: a pid still listed is, right now, the pinned process and a
  member, so the signal goes through its pidfd.

OS errors are translated here, once, into an :class:`Outcome`; nothing
above this module catches ``ProcessLookupError`` or ``PermissionError``
from a signal.

Standard library only, and nothing of memguard: the sentinel (a tiny
separate process) loads this very file to kill the same way.
"""

from __future__ import annotations

import enum
import os
import signal as _signal

__all__ = ["Outcome", "start_time", "signal_process", "signal_group", "signal_cgroup", "kill_cgroup", "pin",
           "process_mrelease", "pidfd_kill", "MRELEASE_UNSUPPORTED"]


class Outcome(str, enum.Enum):
    """What became of one signal."""

    SENT = "sent"
    GONE = "gone"  # no such process (or group) any more
    REPLACED = "replaced"  # the pid now belongs to another process: not signalled
    DENIED = "denied"  # the kernel refused (EPERM)

    @property
    def sent(self) -> bool:
        return self is Outcome.SENT


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (stat field 22); None if gone or a zombie."""
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
    fields = data[r + 2:].split() if r >= 0 else []
    try:
        if fields[0] in (b"Z", b"X", b"x"):
            return None  # exited: nothing left to signal
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _translate(e: OSError) -> Outcome:
    if isinstance(e, ProcessLookupError):
        return Outcome.GONE
    if isinstance(e, PermissionError):
        return Outcome.DENIED
    return Outcome.GONE


def _pin(pid: int) -> int | Outcome:
    if pid <= 1 or pid == os.getpid():
        return Outcome.DENIED  # never init, never ourselves
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        return _translate(e)


def pin(pid: int, start: int) -> int | Outcome:
    """A pidfd of ``pid`` if it is still the process that started at ``start`` (the caller closes it), else
    why not. A zombie is GONE: nothing is left to signal or release."""
    fd = _pin(pid)
    if isinstance(fd, Outcome):
        return fd
    now = start_time(pid)  # read after pinning: proves the pidfd is that process
    if now == start:
        return fd
    os.close(fd)
    return Outcome.GONE if now is None else Outcome.REPLACED


#: process_mrelease(2) is system call 448 on every architecture (the unified table), Linux >= 5.15.
_SYS_PROCESS_MRELEASE = 448
#: The errno values that mean "this kernel has no process_mrelease": say so once, then stop trying.
MRELEASE_UNSUPPORTED = frozenset({38})  # ENOSYS
_libc = None


def process_mrelease(pidfd: int) -> int:
    """Reap the memory of a process that is dying (it got SIGKILL) through its pidfd, now, in the caller's
    thread, as the kernel's OOM reaper would: its anonymous memory is back before it has finished exiting.
    Blocks for as long as the unmapping takes (tenths of a second for gigabytes): never call it on the
    event loop. Returns 0, or the errno (ENOSYS: Linux < 5.15; EINVAL: the process is not dying, or
    shares its memory with a process that is not; ESRCH: already gone)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syscall(_SYS_PROCESS_MRELEASE, pidfd, 0) == 0:
        return 0
    return ctypes.get_errno()


_SYS_PIDFD_SEND_SIGNAL = 424  # the unified system call table again (Linux >= 5.1)
_pylibc = None


def pidfd_kill(pidfd: int) -> bool:
    """SIGKILL through ``pidfd`` without releasing the interpreter lock (a PyDLL call), so that the caller's
    next step (``process_mrelease``) follows with no other thread in between. True if sent."""
    global _pylibc
    import ctypes

    if _pylibc is None:
        _pylibc = ctypes.PyDLL(None, use_errno=True)
    return _pylibc.syscall(_SYS_PIDFD_SEND_SIGNAL, pidfd, int(_signal.SIGKILL), None, 0) == 0


def signal_process(pid: int, start: int, signum: int) -> Outcome:
    """Send ``signum`` to ``pid`` if it is still the process that started at ``start``."""
    fd = _pin(pid)
    if isinstance(fd, Outcome):
        return fd
    try:
        now = start_time(pid)  # read after pinning: proves the pidfd is that process
        if now is None:
            return Outcome.GONE
        if now != start:
            return Outcome.REPLACED
        _signal.pidfd_send_signal(fd, signum)
        return Outcome.SENT
    except OSError as e:
        return _translate(e)
    finally:
        os.close(fd)


def signal_group(pgid: int, leader_start: int | None, signum: int) -> Outcome:
    """``killpg(pgid, signum)`` unless the number was reused: the leader, if it still lives, must
    have started at ``leader_start`` (a group's number stays taken while any member lives, so a gone
    leader with members left still means our group). ``leader_start`` None skips the check: only for
    a group whose leader is our own unreaped child, whose number cannot be reused."""
    if pgid <= 1 or pgid == os.getpgrp():
        return Outcome.DENIED
    if leader_start is not None:
        now = start_time(pgid)
        if now is not None and now != leader_start:
            return Outcome.REPLACED
    try:
        os.killpg(pgid, signum)
        return Outcome.SENT
    except OSError as e:
        return _translate(e)


def _procs(path: str) -> list[int] | None:
    try:
        with open(os.path.join(path, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def signal_cgroup(path: str, signum: int, skip: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Send ``signum`` to every process of the cgroup directory ``path`` (but those in ``skip``), each
    proven a member after being pinned (see the module text). Returns the pids signalled."""
    pids = [p for p in _procs(path) or () if p not in skip]
    if not pids:
        return []
    pinned: dict[int, int] = {}
    try:
        for pid in pids:
            fd = _pin(pid)
            if not isinstance(fd, Outcome):
                pinned[pid] = fd
        members = set(_procs(path) or ())  # re-read after pinning: still listed = the pinned process
        sent = []
        for pid, fd in pinned.items():
            if pid not in members:
                continue
            try:
                _signal.pidfd_send_signal(fd, signum)
                sent.append(pid)
            except OSError:
                pass
        return sent
    finally:
        for fd in pinned.values():
            os.close(fd)


def kill_cgroup(path: str, passes: int = 10) -> int:
    """SIGKILL everything in the cgroup ``path``: one write to ``cgroup.kill`` where the kernel has it
    (v2, Linux >= 5.14: atomic, forks in flight included), else identity-checked SIGKILLs in a few
    passes (a fork in flight is caught on the next one). Returns how many processes were there."""
    pids = _procs(path)
    if pids is None:
        return 0
    try:
        fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)  # no O_CREAT
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, b"1")
            return len(pids)
        except OSError:
            pass
        finally:
            os.close(fd)
    killed: set[int] = set()
    for _ in range(passes):
        sent = signal_cgroup(path, _signal.SIGKILL, skip=killed)
        if not sent:
            break
        killed.update(sent)
    return len(killed)
