"""The layer that owns the worker processes: spawn, watch, signal, reap.

:class:`ChildSupervisor` lives on the daemon's asyncio event loop (one
thread; every method is called from that thread). Each worker is started
with :class:`subprocess.Popen` in a session and process group of its own,
wrapped in ``setpriv --pdeathsig KILL --`` so that its main process dies
with the daemon's thread, and registered with the **sentinel**
(:mod:`memguard.act.sentinel`), a tiny process that kills every registered
group when the daemon's end of its pipe closes, however the daemon died.

Exits are detected through a pidfd per worker (no ``waitpid(-1)``, no
child watcher): when it becomes readable the worker is reaped with
``waitid(P_PIDFD)``, its output pipes are drained, and an
:class:`~memguard.model.Exited` is reported.

The daemon is a child subreaper: descendants orphaned by a worker are
reparented to it and reaped here (see :meth:`ChildSupervisor._sweep`).

Popen never reaps: its ``returncode`` is set here once we have reaped, so
neither ``Popen.__del__`` nor ``subprocess._cleanup`` can race us.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import grp
import logging
import os
import pwd
import shlex
import select
import shutil
import signal as _signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Iterable, Mapping, Sequence

from memguard.act.errors import SpawnError
from memguard.act.process import Outcome, signal_group, signal_process
from memguard.model import Exited, Spawned, SpawnFailed, WorkerEvent
from memguard.sense.procstat import read_stat
from memguard.threads import LoopOwned, on_owner_thread

__all__ = ["ChildSupervisor", "SpawnError", "MEMBER_SIGNALS", "LINE_MAX"]

log = logging.getLogger(__name__)

#: Signals that also go to every recorded member of a worker's tree (the
#: members that may have escaped the process group with setsid()). Graceful
#: signals (SIGTERM, SIGINT...) go to the process group only.
MEMBER_SIGNALS = frozenset({_signal.SIGKILL, _signal.SIGSTOP, _signal.SIGCONT})

#: A single output line longer than this many bytes is truncated.
LINE_MAX = 64 * 1024
_TRUNCATED = " [... line truncated by memguard]"

_PR_SET_CHILD_SUBREAPER = 36
# 30 s between safety-net sweeps: SIGCHLD sweeps at once, and each full tick's walk prunes the recorded
# members (add_members), so the timer only catches a SIGCHLD the kernel coalesced away. (It ran every second
# and re-read every member's stat: the largest share of an idle daemon's CPU.)
_SWEEP_INTERVAL = 30.0
_SENTINEL_RESTART_DELAY = 1.0
_DRAIN_CHUNKS = 32  # 64 KiB reads: more than the largest pipe buffer (1 MiB)
_SENTINEL_PATH = Path(__file__).with_name("sentinel.py")
_SETPRIV = shutil.which("setpriv")  # checked once


# ---------------------------------------------------------------------------
# /proc helpers


_read_stat = read_stat  # state, ppid, pgrp, session, start: the identity checks below


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _exited_unreaped(pidfd: int) -> bool:
    """True when the process has exited and waits to be reaped (peek, do not reap)."""
    try:
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def _group_members(pgid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process in process group ``pgid`` (one /proc scan)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is not None and st.pgrp == pgid and not st.dead:
            out.append((int(name), st.start))
    return out


def _reap_pidfd(pidfd: int, pid: int) -> tuple[int | None, int | None] | None:
    """Reap the exited process behind ``pidfd``: (returncode, signal), or None if still running.

    ``(-1, None)`` when the status was lost (someone else reaped it).
    """
    try:
        if hasattr(os, "P_PIDFD"):
            res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            if res is None or res.si_pid == 0:
                return None
            if res.si_code == os.CLD_EXITED:
                return res.si_status, None
            return None, res.si_status  # CLD_KILLED / CLD_DUMPED
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == 0:
            return None
        if os.WIFSIGNALED(status):
            return None, os.WTERMSIG(status)
        return os.waitstatus_to_exitcode(status), None
    except ChildProcessError:
        return -1, None


def _is_alive(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


# ---------------------------------------------------------------------------
# Records


class _Stream:
    """One output pipe of a worker, read without blocking, split into lines."""

    __slots__ = ("name", "file", "fd", "buf", "discarding")

    def __init__(self, name: str, file) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.file = file
        self.fd: int | None = file.fileno()
        self.buf = bytearray()
        self.discarding = False
        os.set_blocking(self.fd, False)


@dataclass(frozen=True)
class Stdio:
    """Where a job's standard streams lead when memguard stands in a shell pipeline (``memguard run``):
    ``stdin`` is given to the job as its standard input (None: /dev/null); what the job writes to its
    stdout and stderr is still read (last lines, output as progress) and copied as it came, every byte,
    to ``stdout`` and ``stderr`` (None: not copied). memguard's own descriptors, open when it started:
    Python sets ``sys.stdin`` and the others to None when one was closed, and its number may since have
    been reused by a file or socket of memguard's own, which the job must neither read nor write.

    When the reader of ``stdout`` or ``stderr`` goes away (``memguard run -- yes | head -1``), the job's pipe
    is closed too, so that the job gets SIGPIPE as it would without memguard. A reader that stops reading (a
    paused pager) holds up the copy (:class:`_Copier`, a thread), never memguard's loop: guarding goes on,
    and the job waits on its own writes as it would alone."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None

    @classmethod
    def own(cls) -> "Stdio":
        """memguard's own standard streams, those that were open when it started."""

        def fd(f: object, n: int) -> int | None:
            try:
                return n if f is not None and f.fileno() == n else None  # type: ignore[attr-defined]
            except (OSError, ValueError, AttributeError):
                return None

        return cls(fd(sys.__stdin__, 0), fd(sys.__stdout__, 1), fd(sys.__stderr__, 2))

    def copy_to(self, stream: str) -> int | None:
        return self.stdout if stream == "stdout" else self.stderr


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (a partial write goes on; a non-blocking descriptor is waited for). Raises OSError."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except InterruptedError:
            continue
        view = view[n:]


class _Copier:
    """Copies a job's output to one of memguard's own descriptors from a thread of its own, so that a reader
    that stops reading blocks this thread, not the loop. It holds at most about :attr:`HIGH` bytes: past that
    :meth:`put` says so and the supervisor stops reading the job's pipe until the copy has caught up (then
    ``wake(copier)`` is called, from this thread), so the job waits on its own writes as it would alone. A reader that
    is gone (EPIPE, or another write error) marks it ``broken``, drops what it held, and wakes the loop."""

    HIGH = 256 * 1024

    def __init__(self, fd: int, wake: Callable[[_Copier], None]) -> None:
        self.fd = fd
        self.broken: OSError | None = None
        self.waiting: list[tuple[_Proc, _Stream]] = []  # streams not read until the copy catches up (loop)
        self._wake = wake
        self._chunks: Deque[bytes] = collections.deque()
        self._pending = 0  # bytes queued or being written
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name=f"memguard-copy-{fd}", daemon=True).start()

    def put(self, chunk: bytes) -> bool:
        """Queue a chunk; False when the copy is behind by HIGH bytes or more (stop reading for now)."""
        with self._cond:
            if self.broken is None:
                self._chunks.append(chunk)
                self._pending += len(chunk)
                self._cond.notify_all()
            return self._pending < self.HIGH

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                chunk = self._chunks.popleft()
            err: OSError | None = None
            try:
                _write_all(self.fd, chunk)
            except OSError as e:
                err = e
            with self._cond:
                behind = self._pending >= self.HIGH
                self._pending -= len(chunk)
                if err is not None and self.broken is None:
                    self.broken = err
                    self._chunks.clear()
                    self._pending = 0
                wake = (behind and self._pending < self.HIGH) or err is not None
                self._cond.notify_all()
            if wake:
                self._wake(self)

    def flush(self) -> None:
        """Wait (in a thread) until everything queued is written or the reader is gone."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0 or self.broken is not None)

    def close(self) -> None:
        """The thread ends once what is queued is written."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(eq=False)
class _Proc:
    worker: str
    incarnation: int
    pid: int
    start: int
    popen: subprocess.Popen  # type: ignore[type-arg]
    pidfd: int | None
    streams: list[_Stream]
    tail: Deque[str]
    members: dict[int, int] = field(default_factory=dict)  # pid -> start time
    reaped: bool = False

    @property
    def pipes_open(self) -> bool:
        return any(s.fd is not None for s in self.streams)


# ---------------------------------------------------------------------------


class ChildSupervisor(LoopOwned):
    """Owns the worker processes; lives on one asyncio event loop (its methods assert that, see
    :mod:`memguard.threads`).

    ``on_event`` receives :class:`Spawned` and :class:`SpawnFailed` (from
    :meth:`spawn`, synchronously) and :class:`Exited` (when a worker's main
    process has been reaped). ``on_output`` receives every output line as
    ``(worker, "stdout" | "stderr", line)``, without its newline.

    A daemon's workers read ``/dev/null``. With ``stdio`` (``memguard run``)
    the job reads memguard's standard input and its output is also copied,
    byte for byte and unsplit, to memguard's own standard output and error:
    see :class:`Stdio`.
    """

    def __init__(
        self,
        on_event: Callable[[WorkerEvent], None],
        on_output: Callable[[str, str, str], None],
        clock: Callable[[], float] = time.monotonic,
        sentinel: bool = True,
        subreaper: bool = True,
        tail_lines: int = 50,
        kill_leftovers: bool = True,
        stdio: Stdio | None = None,
    ) -> None:
        self._claim_thread()
        self._stdio = stdio or Stdio()
        self._copiers: dict[str, _Copier] = {}  # "stdout"/"stderr" -> its copy to memguard's own, with stdio
        # A worker's processes die with it: when its main process exits, what
        # is left of its group and recorded tree is killed (no orphan keeps
        # holding RAM or GPU memory after a crash).
        self.kill_leftovers = kill_leftovers
        self._on_event = on_event
        self._on_output = on_output
        self._clock = clock
        self._use_sentinel = sentinel
        self._use_subreaper = subreaper
        self._tail_lines = tail_lines
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._workers: dict[str, _Proc] = {}  # latest incarnation per worker
        self._old: set[_Proc] = set()  # earlier incarnations with output pipes still open
        # Registrations mirrored to the sentinel (the daemon's copy is the truth;
        # a restarted sentinel is sent all of it again).
        self._groups: dict[int, int] = {}  # pgid -> leader start time
        self._pids: dict[int, int] = {}  # pid -> start time
        self._cgroups: dict[str, None] = {}
        self._instance: str | None = None
        # Sessions/groups created by our workers or their recorded members:
        # a zombie child of ours in one of them is an orphan of a worker tree.
        self._sessions: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._subreaper_set = False
        self._sigchld = False
        self._sweep_pending = False
        self._timer: asyncio.TimerHandle | None = None
        # sentinel
        self._sentinel: subprocess.Popen | None = None  # type: ignore[type-arg]
        self._sentinel_pidfd: int | None = None
        self._sentinel_w: int | None = None
        self._sentinel_buf = bytearray()
        self._sentinel_writer = False
        self._sentinel_started_at = 0.0
        self._sentinel_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Become a subreaper, start the sentinel, start watching for orphans."""
        if self._loop is not None:
            raise RuntimeError("ChildSupervisor already started")
        self._loop = asyncio.get_running_loop()
        for name in ("stdout", "stderr"):
            fd = self._stdio.copy_to(name)
            if fd is not None:
                self._copiers[name] = _Copier(fd, self._copy_caught_up)
        if self._use_subreaper:
            _set_subreaper(True)
            self._subreaper_set = True
        if self._use_sentinel:
            self._start_sentinel()
        try:
            self._loop.add_signal_handler(_signal.SIGCHLD, self._schedule_sweep)
            self._sigchld = True
        except (RuntimeError, ValueError, NotImplementedError):
            # Not the main thread: the periodic sweep alone reaps orphans.
            self._sigchld = False
        self._timer = self._loop.call_later(_SWEEP_INTERVAL, self._periodic)

    async def close(self) -> None:
        """Stop watching, close fds, tell the sentinel to quit without killing.

        Workers still running are left running (a graceful shutdown stops
        them before calling this); they are no longer watched or reaped.
        """
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        loop = self._loop
        if self._timer is not None:
            self._timer.cancel()
        if self._sentinel_timer is not None:
            self._sentinel_timer.cancel()
        if self._sigchld:
            loop.remove_signal_handler(_signal.SIGCHLD)
            self._sigchld = False
        for rec in list(self._workers.values()) + list(self._old):
            self._forget(rec)
        self._old.clear()
        for copier in self._copiers.values():  # the job's last output reaches the terminal before memguard's
            copier.close()
            await asyncio.to_thread(copier.flush)
        await self._stop_sentinel()
        if self._subreaper_set:
            try:
                _set_subreaper(False)
            except OSError:  # pragma: no cover - prctl(…, 0) does not fail
                pass
            self._subreaper_set = False

    # ------------------------------------------------------------------ API

    @on_owner_thread
    def spawn(
        self,
        worker: str,
        incarnation: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        user: str | None,
        group: str | None,
        oom_score_adj: int | None,
        cgroup_procs: str | None = None,
    ) -> int:
        """Start one incarnation of ``worker``; return its pid.

        With ``cgroup_procs`` (a cgroup's ``cgroup.procs`` file) the worker
        enters that cgroup, and gets its ``oom_score_adj``, before its
        command is executed, so not one page it touches is charged
        elsewhere and no child it forks escapes either setting.

        Reports :class:`Spawned` (or :class:`SpawnFailed`) through
        ``on_event`` before returning (or raising :class:`SpawnError`).
        """
        try:
            pid = self._spawn(worker, incarnation, argv, env, cwd, user, group, oom_score_adj, cgroup_procs)
        except SpawnError as e:
            self._emit(SpawnFailed(worker, incarnation, str(e), at=self._clock()))
            raise
        self._emit(Spawned(worker, incarnation, pid, at=self._clock()))
        return pid

    @on_owner_thread
    def signal(self, worker: str, pid: int, incarnation: int, signum: int) -> bool:
        """Send ``signum`` to the worker's process group (and, for
        :data:`MEMBER_SIGNALS`, to its recorded members).

        Refused (False) unless ``pid`` is the not-yet-reaped main process of
        that exact incarnation; False too if the group is already gone.
        """
        rec = self._workers.get(worker)
        if rec is None or rec.reaped or rec.pid != pid or rec.incarnation != incarnation or rec.pidfd is None:
            return False
        sent = False
        st = _read_stat(pid)
        if st is not None and st.pgrp != pid:
            # The main process left its group: signal it as well, by its identity.
            # Otherwise killpg reaches it, and it must not get a signal twice
            # (many programs treat a second SIGINT/SIGTERM as "force quit").
            sent = signal_process(pid, rec.start, signum).sent or sent
        # pgid == pid (setsid); the number cannot be reused while the main
        # process is unreaped, and only we reap it.
        outcome = signal_group(pid, None, signum)
        sent = outcome.sent or sent
        if outcome is Outcome.DENIED:
            log.warning("killpg(%s, %s) was refused", pid, signum)
        if signum in MEMBER_SIGNALS:
            for mpid, mstart in list(rec.members.items()):
                if self._signal_member(mpid, mstart, signum, rec.pid):
                    sent = True
                else:
                    rec.members.pop(mpid, None)
        return sent

    @on_owner_thread
    def add_members(self, worker: str, members: Iterable[tuple[int, int]]) -> None:
        """Record processes of ``worker``'s tree, as (pid, start time), found by sensing: the whole tree a
        full tick's walk found (recorded members it did not find are gone and forgotten).

        They receive :data:`MEMBER_SIGNALS` with the group, are reaped here
        when they become our orphans, and those outside the worker's process
        group are registered with the sentinel.
        """
        rec = self._workers.get(worker)
        if rec is None:
            return
        members = list(members)
        found = dict(members)
        for mpid in [p for p, start in rec.members.items() if found.get(p) != start]:
            del rec.members[mpid]  # the walk that found these no longer found it: it is gone
        for mpid, mstart in members:
            if mpid == rec.pid or rec.members.get(mpid) == mstart:
                continue
            st = _read_stat(mpid)
            if st is None or st.start != mstart or st.dead:
                continue
            rec.members[mpid] = mstart
            for sid in {st.session, st.pgrp} - {rec.pid}:
                self._note_session(sid)  # an escaped session/group: its orphans are ours
            if st.pgrp == rec.pid:
                continue  # killed with the worker's group
            if st.pgrp == mpid:
                self._register_group(mpid, mstart)
            elif mpid not in self._pids:
                self._pids[mpid] = mstart
                self._sentinel_send(f"pid {mpid} {mstart}\n")

    @on_owner_thread
    def live(self) -> dict[str, tuple[int, int]]:
        """worker -> (pid, incarnation) of every worker whose main process is not reaped."""
        return {w: (r.pid, r.incarnation) for w, r in self._workers.items() if not r.reaped}

    @on_owner_thread
    def live_records(self) -> dict[str, tuple[int, int, int, tuple[tuple[int, int], ...]]]:
        """worker -> (pid, start time, incarnation, recorded members) of every unreaped worker:
        copies, for an immutable snapshot."""
        return {w: rec for w in self._workers if (rec := self.live_record(w)) is not None}

    @on_owner_thread
    def live_record(self, worker: str) -> tuple[int, int, int, tuple[tuple[int, int], ...]] | None:
        """(pid, start time, incarnation, recorded members) of one unreaped worker, or None (see live_records)."""
        r = self._workers.get(worker)
        return None if r is None or r.reaped else (r.pid, r.start, r.incarnation, tuple(r.members.items()))

    @on_owner_thread
    def is_member(self, worker: str, pid: int) -> bool:
        """Is ``pid`` a recorded member of ``worker``'s current tree?"""
        rec = self._workers.get(worker)
        return rec is not None and not rec.reaped and pid in rec.members

    def last_lines(self, worker: str) -> tuple[str, ...]:
        """The last output lines of the worker's latest incarnation (both streams, in order)."""
        rec = self._workers.get(worker)
        return tuple(rec.tail) if rec is not None else ()

    @on_owner_thread
    def watch_process(self, pid: int, start: int) -> None:
        """Have the sentinel kill this process (by identity) if the daemon dies."""
        if self._pids.get(pid) != start:
            self._pids[pid] = start
            self._sentinel_send(f"pid {pid} {start}\n")

    @on_owner_thread
    def set_instance(self, instance: str) -> None:
        """The marker in every worker's environment: should the daemon die, the sentinel also kills every
        process whose environment carries it (a descendant not registered yet)."""
        self._instance = instance
        self._sentinel_send(f"instance {instance}\n")

    @on_owner_thread
    def kill_adopted(self) -> int:
        """SIGKILL every orphan memguard adopted (a worker's descendant reparented to it); for the end, when
        no worker runs any more and whatever is left of their trees is a leftover. Returns how many."""
        keep = {r.pid for r in self._workers.values() if not r.reaped}
        if self._sentinel is not None:
            keep.add(self._sentinel.pid)
        killed = 0
        for pid, _orphan_thread in _children():
            if pid in keep:
                continue
            st = _read_stat(pid)
            if st is not None and not st.dead and signal_process(pid, st.start, _signal.SIGKILL).sent:
                killed += 1
        return killed

    @on_owner_thread
    def watch_cgroup(self, path: str) -> None:
        """Have the sentinel kill everything in cgroup ``path`` if the daemon dies."""
        if path not in self._cgroups:
            self._cgroups[path] = None
            self._sentinel_send(f"cgroup {path}\n")

    @on_owner_thread
    def unwatch_cgroup(self, path: str) -> None:
        if self._cgroups.pop(path, 0) is None:
            self._sentinel_send(f"uncgroup {path}\n")

    @property
    def sentinel_pid(self) -> int | None:
        """Pid of the running sentinel (None without one)."""
        return self._sentinel.pid if self._sentinel is not None else None

    # ------------------------------------------------------------------ spawn

    def _spawn(
        self,
        worker: str,
        incarnation: int,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        user: str | None,
        group: str | None,
        oom_score_adj: int | None,
        cgroup_procs: str | None = None,
    ) -> int:
        if self._loop is None or self._closed:
            raise SpawnError("the child supervisor is not running")
        old = self._workers.get(worker)
        if old is not None and not old.reaped:
            raise SpawnError(f"worker {worker!r} is still running (pid {old.pid})")
        argv = [str(a) for a in argv]
        if not argv or not argv[0]:
            raise SpawnError("empty command")
        if oom_score_adj is not None and not -1000 <= oom_score_adj <= 1000:
            raise SpawnError(f"oom_score_adj {oom_score_adj} is outside -1000..1000")
        uid, gid = _resolve_ids(user, group)
        if cwd is not None and not os.path.isdir(cwd):
            what = "does not exist" if not os.path.exists(cwd) else "is not a directory"
            raise SpawnError(f"working directory {cwd!r} {what}")
        _check_command(argv[0], env, cwd)

        kwargs: dict[str, object] = {}
        prelude: list[str] = []
        setpriv_ids: list[str] = []
        if cgroup_procs is not None:
            prelude.append(f"echo $$ > {shlex.quote(cgroup_procs)}")
        if oom_score_adj is not None and prelude:
            prelude.append(f"echo {int(oom_score_adj)} > /proc/self/oom_score_adj")
            adj_done = True
        else:
            adj_done = False
        if prelude and _SETPRIV and (uid is not None or gid is not None):
            # The prelude must run as root (joining a cgroup); setpriv drops
            # privileges after it, with no supplementary group kept.
            if gid is None and uid is not None:
                gid = pwd.getpwuid(uid).pw_gid
            setpriv_ids = ([f"--regid={gid}"] if gid is not None else []) + (
                [f"--reuid={uid}"] if uid is not None else []) + ["--clear-groups"]
        else:
            if uid is not None:
                kwargs["user"] = uid
                kwargs["extra_groups"] = []  # drop root's supplementary groups
            if gid is not None:
                kwargs["group"] = gid
        full = [_SETPRIV, *setpriv_ids, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else argv
        if prelude:
            full = ["/bin/sh", "-c", " && ".join(prelude) + ' && exec "$@"', f"memguard:{worker}", *full]
        try:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL if self._stdio.stdin is None else self._stdio.stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,
                cwd=cwd,
                env=dict(env),
                **kwargs,  # type: ignore[arg-type]
            )
        except FileNotFoundError as e:
            if cwd is not None and e.filename == cwd:
                raise SpawnError(f"working directory {cwd!r} does not exist") from e
            raise SpawnError(f"command not found: {argv[0]!r}") from e
        except PermissionError as e:
            raise SpawnError(f"cannot start {argv[0]!r}: {e}") from e
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise SpawnError(f"cannot start {argv[0]!r}: {e}") from e

        pid = popen.pid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            _abort(popen)
            raise SpawnError(f"cannot watch {argv[0]!r} (pidfd_open: {e})") from e
        st = _read_stat(pid)  # unreaped, so readable even if it already exited
        start = st.start if st is not None else 0
        if oom_score_adj is not None and not adj_done:
            try:
                with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                    f.write(str(oom_score_adj))
            except OSError as e:
                gone = e.errno in (errno.ESRCH, errno.ENOENT) or not _is_alive(pidfd)
                if not gone:
                    os.close(pidfd)
                    _abort(popen)
                    raise SpawnError(f"cannot set oom_score_adj {oom_score_adj} for {argv[0]!r}: {e}") from e

        assert popen.stdout is not None and popen.stderr is not None
        rec = _Proc(
            worker=worker,
            incarnation=incarnation,
            pid=pid,
            start=start,
            popen=popen,
            pidfd=pidfd,
            streams=[_Stream("stdout", popen.stdout), _Stream("stderr", popen.stderr)],
            tail=collections.deque(maxlen=self._tail_lines),
        )
        if old is not None and old.pipes_open:
            self._old.add(old)
        self._workers[worker] = rec
        self._note_session(pid)
        self._register_group(pid, start)
        loop = self._loop
        for s in rec.streams:
            assert s.fd is not None
            loop.add_reader(s.fd, self._on_readable, rec, s)
        loop.add_reader(pidfd, self._on_exit, rec)
        return pid

    # ------------------------------------------------------------------ output

    def _on_readable(self, rec: _Proc, s: _Stream) -> None:
        self._read(rec, s, drain=False)

    def _read(self, rec: _Proc, s: _Stream, drain: bool) -> None:
        """Read what the pipe holds: one chunk, or with ``drain`` until it is
        empty (bounded, in case a descendant writes as fast as we read)."""
        budget = _DRAIN_CHUNKS if drain else 1
        while s.fd is not None and budget > 0:
            budget -= 1
            try:
                chunk = os.read(s.fd, 65536)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            copier = self._copiers.get(s.name) if chunk else None
            if copier is not None:
                if copier.broken is not None:  # the reader is gone: the job's pipe goes too (SIGPIPE)
                    if copier.broken.errno != errno.EPIPE:
                        log.warning("cannot copy %s's %s: %s", rec.worker, s.name, copier.broken)
                    self._feed(rec, s, chunk)  # still counted in the last lines
                    self._close_stream(s)
                    self._maybe_drop(rec)
                    return
                if not copier.put(chunk) and not drain:  # behind: read on once the copy has caught up
                    self._feed(rec, s, chunk)
                    assert self._loop is not None
                    self._loop.remove_reader(s.fd)
                    copier.waiting.append((rec, s))
                    return
            if not chunk:
                if s.buf or s.discarding:
                    line = bytes(s.buf)
                    s.buf.clear()
                    if not s.discarding:
                        self._line(rec, s.name, line)
                    s.discarding = False
                self._close_stream(s)
                self._maybe_drop(rec)
                return
            self._feed(rec, s, chunk)

    def _copy_caught_up(self, copier: _Copier) -> None:
        """Called from a copier's thread: hand over to the loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._copied, copier)
        except RuntimeError:  # the loop is closed: nothing waits any more
            pass

    def _copied(self, copier: _Copier) -> None:
        """The copy caught up (or its reader is gone): read the streams that waited for it again."""
        waiting, copier.waiting = copier.waiting, []
        for rec, s in waiting:
            if not self._closed and s.fd is not None and self._loop is not None:
                self._loop.add_reader(s.fd, self._on_readable, rec, s)

    def _feed(self, rec: _Proc, s: _Stream, chunk: bytes) -> None:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                piece = chunk[start:]
                if not s.discarding:
                    s.buf += piece
                    if len(s.buf) > LINE_MAX:
                        self._line(rec, s.name, bytes(s.buf[:LINE_MAX]), truncated=True)
                        s.buf.clear()
                        s.discarding = True
                return
            piece = chunk[start:nl]
            start = nl + 1
            if s.discarding:
                s.discarding = False
                continue
            if s.buf:
                s.buf += piece
                line = bytes(s.buf)
                s.buf.clear()
            else:
                line = piece
            if len(line) > LINE_MAX:
                self._line(rec, s.name, line[:LINE_MAX], truncated=True)
            else:
                self._line(rec, s.name, line)

    def _line(self, rec: _Proc, stream: str, raw: bytes, truncated: bool = False) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        text = raw.decode("utf-8", "replace")
        if truncated:
            text += _TRUNCATED
        rec.tail.append(text)
        try:
            self._on_output(rec.worker, stream, text)
        except Exception:
            log.exception("on_output callback failed")

    def _close_stream(self, s: _Stream) -> None:
        if s.fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(s.fd)
        s.fd = None
        try:
            s.file.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ exit

    def _kill_leftovers(self, rec: _Proc) -> int:
        """SIGKILL what is left of a worker whose main process has exited but is not reaped yet.

        While the main process is an unreaped zombie its pid, and so its
        process-group number, cannot be reused: killpg cannot hit a stranger.
        Recorded members outside the group are checked by start time.
        """
        left = 0
        for mpid, mstart in list(rec.members.items()):
            if self._signal_member(mpid, mstart, _signal.SIGKILL, rec.pid):
                left += 1
        group = [p for p, _ in _group_members(rec.pid) if p != rec.pid]
        if group and not signal_group(rec.pid, None, _signal.SIGKILL).sent:
            group = []
        return left + len([p for p in group if p not in rec.members])

    def _on_exit(self, rec: _Proc) -> None:
        if rec.reaped or rec.pidfd is None:
            return
        leftovers = 0
        if self.kill_leftovers and _exited_unreaped(rec.pidfd):
            leftovers = self._kill_leftovers(rec)
        status = _reap_pidfd(rec.pidfd, rec.pid)
        if status is None:
            return  # spurious wakeup: still running
        returncode, signum = status
        assert self._loop is not None
        self._loop.remove_reader(rec.pidfd)
        os.close(rec.pidfd)
        rec.pidfd = None
        rec.reaped = True
        # Tell Popen the process is reaped, so it never waits on the pid.
        rec.popen.returncode = returncode if signum is None else -signum
        # Everything the main process wrote is in the pipes by now: drain it
        # so that the Exited carries the last lines. Descendants may keep
        # the pipes open; their later output is still read and forwarded.
        for s in rec.streams:
            self._read(rec, s, drain=True)
        self._check_group(rec.pid)
        if rec.pipes_open and self._workers.get(rec.worker) is not rec:
            self._old.add(rec)
        self._emit(
            Exited(
                rec.worker,
                rec.incarnation,
                rec.pid,
                at=self._clock(),
                returncode=returncode,
                signal=signum,
                last_lines=tuple(rec.tail),
                leftovers=leftovers,
            )
        )

    def _maybe_drop(self, rec: _Proc) -> None:
        if rec in self._old and rec.reaped and not rec.pipes_open:
            self._old.discard(rec)

    # ------------------------------------------------------------------ members

    def _signal_member(self, pid: int, start: int, signum: int, worker_pgid: int) -> bool:
        """Signal one recorded member if it is still the process we recorded (and, if it leads a group
        of its own, that group too)."""
        if not signal_process(pid, start, signum).sent:
            return False
        if pid != worker_pgid:
            st = _read_stat(pid)
            if st is not None and st.pgrp == pid:  # an escaped group leader: take its group too
                signal_group(pid, start, signum)
        return True

    def _note_session(self, sid: int) -> None:
        self._sessions[sid] = None
        self._sessions.move_to_end(sid)
        while len(self._sessions) > 4096:
            self._sessions.popitem(last=False)

    # ------------------------------------------------------------------ groups

    def _register_group(self, pgid: int, start: int) -> None:
        if self._groups.get(pgid) == start:
            return
        self._groups[pgid] = start
        self._sentinel_send(f"add {pgid} {start}\n")

    def _check_group(self, pgid: int) -> None:
        """Forget ``pgid`` (here and in the sentinel) once no process is left in it."""
        if pgid not in self._groups:
            return
        try:
            os.killpg(pgid, 0)
            return
        except ProcessLookupError:
            pass
        except OSError:
            return  # exists (EPERM)
        del self._groups[pgid]
        self._sentinel_send(f"del {pgid}\n")

    # ------------------------------------------------------------------ sweep

    def _schedule_sweep(self) -> None:
        if not self._sweep_pending and self._loop is not None and not self._closed:
            self._sweep_pending = True
            self._loop.call_soon(self._sweep)

    def _periodic(self) -> None:
        if self._closed or self._loop is None:
            return
        self._sweep()
        self._timer = self._loop.call_later(_SWEEP_INTERVAL, self._periodic)

    def _sweep(self) -> None:
        """Reap orphans of worker trees; forget groups and members that are gone.

        A child of ours is reaped here only if it is a zombie, is not a
        worker's unreaped main process nor the sentinel, and either was
        reparented to us (it hangs under the thread that receives orphans:
        the first live thread, normally the main one) or belongs to a
        session or group of our workers and their recorded members. Other
        threads' own subprocesses are left to their Popen.
        """
        self._sweep_pending = False
        if self._closed:
            return
        keep = {r.pid for r in self._workers.values() if not r.reaped}
        if self._sentinel is not None:
            keep.add(self._sentinel.pid)
        for pid, orphan_thread in _children():
            if pid in keep:
                continue
            st = _read_stat(pid)
            if st is None or st.state != "Z":
                continue
            if not (orphan_thread or st.session in self._sessions or st.pgrp in self._sessions):
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        for pgid in list(self._groups):
            if pgid not in keep:
                self._check_group(pgid)
        for pid, start in list(self._pids.items()):
            st = _read_stat(pid)
            if st is None or st.start != start or st.dead:
                del self._pids[pid]
                self._sentinel_send(f"unpid {pid}\n")
        for rec in list(self._workers.values()) + list(self._old):
            for mpid, mstart in list(rec.members.items()):
                st = _read_stat(mpid)
                if st is None or st.start != mstart or st.dead:
                    del rec.members[mpid]

    # ------------------------------------------------------------------ sentinel

    def _start_sentinel(self) -> None:
        assert self._loop is not None
        if _SENTINEL_PATH.is_file():
            argv = [sys.executable, "-I", str(_SENTINEL_PATH)]
        else:  # pragma: no cover - zipped installs
            argv = [sys.executable, "-I", "-m", "memguard.act.sentinel"]
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=r,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        os.set_blocking(w, False)
        self._sentinel = proc
        self._sentinel_w = w
        self._sentinel_buf.clear()
        self._sentinel_started_at = time.monotonic()
        self._sentinel_pidfd = os.pidfd_open(proc.pid)
        self._loop.add_reader(self._sentinel_pidfd, self._on_sentinel_exit)
        lines = [f"add {g} {s}\n" for g, s in self._groups.items()]
        lines += [f"pid {p} {s}\n" for p, s in self._pids.items()]
        lines += [f"cgroup {c}\n" for c in self._cgroups]
        if self._instance:
            lines.append(f"instance {self._instance}\n")
        if lines:
            self._sentinel_send("".join(lines))

    def _sentinel_send(self, text: str) -> None:
        if self._sentinel_w is None:
            return  # no sentinel now; a restarted one is sent everything
        self._sentinel_buf += text.encode()
        self._flush_sentinel()

    def _flush_sentinel(self) -> None:
        w = self._sentinel_w
        while w is not None and self._sentinel_buf:
            try:
                n = os.write(w, self._sentinel_buf)
            except BlockingIOError:
                if not self._sentinel_writer and self._loop is not None:
                    self._loop.add_writer(w, self._flush_sentinel)
                    self._sentinel_writer = True
                return
            except InterruptedError:
                continue
            except OSError:
                self._sentinel_buf.clear()  # sentinel died: its pidfd reports it
                break
            del self._sentinel_buf[:n]
        if self._sentinel_writer and w is not None and self._loop is not None:
            self._loop.remove_writer(w)
            self._sentinel_writer = False

    def _drop_sentinel_pipe(self) -> None:
        w = self._sentinel_w
        if w is None:
            return
        if self._sentinel_writer and self._loop is not None:
            self._loop.remove_writer(w)
            self._sentinel_writer = False
        self._sentinel_w = None
        self._sentinel_buf.clear()
        os.close(w)

    def _reap_sentinel(self) -> bool:
        proc, fd = self._sentinel, self._sentinel_pidfd
        if proc is None or fd is None:
            return True
        status = _reap_pidfd(fd, proc.pid)
        if status is None:
            return False
        rc, sig = status
        proc.returncode = rc if sig is None else -sig
        if self._loop is not None:
            self._loop.remove_reader(fd)
        os.close(fd)
        self._sentinel = None
        self._sentinel_pidfd = None
        return True

    def _on_sentinel_exit(self) -> None:
        proc = self._sentinel
        if proc is None or not self._reap_sentinel():
            return
        log.warning("memguard sentinel (pid %s) exited with %s; restarting it", proc.pid, proc.returncode)
        # Close our end only now: the new sentinel gets a new pipe.
        self._drop_sentinel_pipe()
        if self._closed:
            return
        delay = _SENTINEL_RESTART_DELAY if time.monotonic() - self._sentinel_started_at < 1.0 else 0.0
        assert self._loop is not None
        self._sentinel_timer = self._loop.call_later(delay, self._restart_sentinel)

    def _restart_sentinel(self) -> None:
        self._sentinel_timer = None
        if self._closed or self._sentinel is not None:
            return
        try:
            self._start_sentinel()
        except OSError as e:
            log.error("cannot restart the memguard sentinel: %s", e)
            assert self._loop is not None
            self._sentinel_timer = self._loop.call_later(_SENTINEL_RESTART_DELAY, self._restart_sentinel)

    async def _stop_sentinel(self, timeout: float = 2.0) -> None:
        """Clean quit: ``quit`` reaches the sentinel, then EOF; it kills nothing."""
        proc, fd = self._sentinel, self._sentinel_pidfd
        if proc is None or fd is None:
            self._drop_sentinel_pipe()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)  # from now on we wait for it ourselves
        self._sentinel_send("quit\n")
        deadline = loop.time() + timeout
        while self._sentinel_buf and self._sentinel_w is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the writer callback flushes
        if self._sentinel_buf:
            # "quit" could not be delivered: EOF would make it kill everything.
            _signal.pidfd_send_signal(fd, _signal.SIGKILL)
        self._drop_sentinel_pipe()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await asyncio.wait_for(exited, max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            _signal.pidfd_send_signal(fd, _signal.SIGKILL)
            exited = loop.create_future()
            loop.remove_reader(fd)
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            await asyncio.wait_for(exited, 5.0)
        finally:
            loop.remove_reader(fd)
        self._reap_sentinel()

    # ------------------------------------------------------------------ misc

    def _forget(self, rec: _Proc) -> None:
        assert self._loop is not None
        for s in rec.streams:
            self._close_stream(s)
        if rec.pidfd is not None:
            self._loop.remove_reader(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None

    def _emit(self, event: WorkerEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed")


# ---------------------------------------------------------------------------
# spawn helpers


def _resolve_ids(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """(uid, gid) to switch to; the user's primary group when group is None."""
    uid = gid = None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            if not user.isdigit() or group is None:
                raise SpawnError(f"unknown user {user!r}") from None
            uid = int(user)
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise SpawnError(f"unknown group {group!r}") from None
            gid = int(group)
    return uid, gid


def _check_command(cmd: str, env: Mapping[str, str], cwd: str | None) -> None:
    """Fail early and clearly when the command cannot be found.

    setpriv would only report it from inside the child (exit 127), so the
    lookup is done here the way execvp() will do it: through ``PATH`` from
    ``env``, relative paths against ``cwd``.
    """
    if "/" in cmd:
        path = cmd if os.path.isabs(cmd) else os.path.join(cwd or os.getcwd(), cmd)
        if not os.path.exists(path):
            raise SpawnError(f"command not found: {cmd!r}")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise SpawnError(f"command is not executable: {cmd!r}")
        return
    search = env.get("PATH", os.defpath)
    dirs = [d if os.path.isabs(d) else os.path.join(cwd or os.getcwd(), d or ".") for d in search.split(os.pathsep)]
    if shutil.which(cmd, path=os.pathsep.join(dirs)) is None:
        raise SpawnError(f"command not found: {cmd!r} (searched PATH={search})")


def _abort(popen: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Kill and reap a child we cannot supervise; close its pipes."""
    if not signal_group(popen.pid, None, _signal.SIGKILL).sent:  # our unreaped child: its number is ours
        try:
            popen.kill()
        except OSError:
            pass
    popen.wait()
    for f in (popen.stdout, popen.stderr):
        if f is not None:
            f.close()


def _children() -> list[tuple[int, bool]]:
    """Our child pids, each with whether it hangs under the orphan-receiving thread."""
    me = os.getpid()
    out: list[tuple[int, bool]] = []
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        tids = []
    # Orphans go to the first live thread of a subreaper: the main thread
    # (tid == pid) when it lives, otherwise the lowest-numbered one.
    first = me if me in tids else (tids[0] if tids else me)
    found = False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                data = f.read()
        except OSError:
            continue
        found = True
        out.extend((int(p), tid == first) for p in data.split())
    if found:
        return out
    # No CONFIG_PROC_CHILDREN: scan /proc (no thread information).
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None and st.ppid == me:
                out.append((int(name), False))
    return out
