"""Ad-hoc workers on the actor's side: processes memguard watches, measures and may stop, but did not start.

Two kinds of process join: a job started with ``memguard run`` next to the
daemon (it asks over the control socket, ``join``), and a process matched
by an ``unmanaged:`` entry that has rules (adopted on a full tick). Each
gets a record here: a pidfd that becomes readable when the process ends
(it is not memguard's child: memguard cannot reap it or read its status,
which its parent, ``memguard run``, may send with ``exited``), the tree
members found by sensing, and its cgroup if it has one of its own. Signals
go to the process by identity (pidfd and start time), SIGKILL also to its
recorded members and its cgroup. When the pidfd says it ended, an
:class:`~memguard.model.Exited` goes to the daemon's inbox, after
:data:`STATUS_WAIT_S` for the status to arrive from its parent.

Also here: the checks a ``join`` request must pass (who may register what),
and the name a joined process gets.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from ..model import SIGKILL, Exited
from ..sense.procstat import read_stat
from ..threads import LoopOwned, on_owner_thread
from .process import Outcome, kill_cgroup, pin, signal_process

__all__ = ["AdhocWorkers", "STATUS_WAIT_S", "job_name", "check_join", "JoinRefused"]

#: After an ad-hoc worker's process ends, its parent (``memguard run``) has this long to send its exit
#: status before the exit is reported without one: it reaps its child within milliseconds.
STATUS_WAIT_S = 0.3
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class JoinRefused(Exception):
    """A join request that may not be granted (the message says why)."""


def job_name(text: str) -> str:
    """A worker-name part from a command or a chosen name: letters, digits, ``_.-``; at most 48 characters."""
    base = os.path.basename(text.strip()) if "/" in text else text.strip()
    name = _NAME.sub("-", base).strip("-.")[:48]
    return name or "job"


def _owner(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descends_from(pid: int, ancestor: int, max_depth: int = 64) -> bool:
    cur = pid
    for _ in range(max_depth):
        if cur == ancestor:
            return True
        st = read_stat(cur)
        if st is None or st.ppid <= 1:
            return False
        cur = st.ppid
    return False


def check_join(pid: object, peer: tuple[int, int, int], cgroup: object) -> tuple[int, int, str | None, str]:
    """(pid, start time, cgroup directory or None, a note) of a join request from ``peer`` (pid, uid, gid),
    or JoinRefused. root may register any process; anyone else only a process of their own that is the peer
    itself or one of its descendants (``memguard run`` and its job). A cgroup is used only if it holds the
    process (it is how a SIGKILL reaches the whole job): otherwise it is ignored and the note says why."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise JoinRefused("field 'pid' must be the job's process id (an integer above 1)")
    st = read_stat(pid)
    if st is None or st.dead:
        raise JoinRefused(f"no running process {pid}")
    peer_pid, peer_uid, _ = peer
    if peer_uid != 0:
        if _owner(pid) != peer_uid:
            raise JoinRefused(f"process {pid} does not belong to you (uid {peer_uid})")
        if not _descends_from(pid, peer_pid):
            raise JoinRefused(f"process {pid} is neither you (pid {peer_pid}) nor one of your descendants")
    if cgroup is None:
        return pid, st.start, None, ""
    if not isinstance(cgroup, str) or not cgroup.startswith("/sys/fs/cgroup/") or ".." in cgroup.split("/"):
        raise JoinRefused("field 'cgroup' must be a directory under /sys/fs/cgroup")
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "rb") as f:
            members = {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return pid, st.start, None, f"cgroup {cgroup} ignored: its cgroup.procs cannot be read"
    if pid not in members:
        return pid, st.start, None, f"cgroup {cgroup} ignored: process {pid} is not in it"
    return pid, st.start, cgroup, ""


@dataclass(eq=False)
class _Rec:
    worker: str
    pid: int
    start: int
    pidfd: int
    cgroup: str | None
    conn: int | None  # the control connection it joined over (pushes), None for an adopted process
    members: dict[int, int] = field(default_factory=dict)
    status: tuple[int | None, int | None] | None = None  # (returncode, signal) from its parent
    ended: bool = False


class AdhocWorkers(LoopOwned):
    """The ad-hoc workers' records, on the daemon's event loop."""

    def __init__(self, post: Callable[[object], None], clock: Callable[[], float]) -> None:
        self._claim_thread()
        self._post = post
        self._clock = clock
        self._recs: dict[str, _Rec] = {}

    @on_owner_thread
    def add(self, worker: str, pid: int, start: int, cgroup: str | None, conn: int | None) -> bool:
        """Watch ``pid`` (which started at ``start``) as ``worker``. False if it is gone already."""
        fd = pin(pid, start)
        if isinstance(fd, Outcome):
            return False
        self._recs[worker] = rec = _Rec(worker, pid, start, fd, cgroup, conn)
        asyncio.get_running_loop().add_reader(fd, self._on_readable, rec)
        return True

    def __contains__(self, worker: object) -> bool:
        return worker in self._recs

    def names(self) -> list[str]:
        return list(self._recs)

    def watching(self, pid: int, start: int) -> bool:
        return any(r.pid == pid and r.start == start for r in self._recs.values())

    def conn_of(self, worker: str) -> int | None:
        rec = self._recs.get(worker)
        return rec.conn if rec is not None else None

    def cgroup(self, worker: str) -> str | None:
        rec = self._recs.get(worker)
        return rec.cgroup if rec is not None else None

    @on_owner_thread
    def live_records(self) -> dict[str, tuple[int, int, int, tuple[tuple[int, int], ...]]]:
        """worker -> (pid, start time, incarnation 1, recorded members): as the child supervisor's."""
        return {w: (r.pid, r.start, 1, tuple(r.members.items())) for w, r in self._recs.items() if not r.ended}

    @on_owner_thread
    def add_members(self, worker: str, members: tuple[tuple[int, int], ...]) -> None:
        rec = self._recs.get(worker)
        if rec is not None:
            for pid, start in members:
                if pid != rec.pid:
                    rec.members[pid] = start

    @on_owner_thread
    def signal(self, worker: str, pid: int, signum: int) -> list[tuple[int, int]]:
        """Send ``signum`` to the worker's process by identity; SIGKILL also to its recorded members and its
        cgroup. Returns the (pid, start time) pairs signalled."""
        rec = self._recs.get(worker)
        if rec is None or rec.pid != pid or rec.ended:
            return []
        sent = []
        if signal_process(rec.pid, rec.start, signum).sent:
            sent.append((rec.pid, rec.start))
        if signum == SIGKILL:
            for mpid, mstart in list(rec.members.items()):
                if signal_process(mpid, mstart, signum).sent:
                    sent.append((mpid, mstart))
                else:
                    rec.members.pop(mpid, None)
            if rec.cgroup is not None:
                kill_cgroup(rec.cgroup)
        return sent

    @on_owner_thread
    def set_status(self, worker: str, returncode: int | None, signum: int | None) -> bool:
        rec = self._recs.get(worker)
        if rec is None:
            return False
        rec.status = (returncode, signum)
        return True

    @on_owner_thread
    def forget(self, worker: str) -> None:
        rec = self._recs.pop(worker, None)
        if rec is not None:
            self._close(rec)

    @on_owner_thread
    def close(self) -> None:
        for rec in list(self._recs.values()):
            self._close(rec)
        self._recs.clear()

    # ------------------------------------------------------------------ exits

    def _close(self, rec: _Rec) -> None:
        if rec.pidfd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(rec.pidfd)
            except RuntimeError:
                pass
            os.close(rec.pidfd)
            rec.pidfd = -1

    def _on_readable(self, rec: _Rec) -> None:
        if rec.ended or rec.pidfd < 0:
            return
        rec.ended = True
        asyncio.get_running_loop().remove_reader(rec.pidfd)
        at = self._clock()
        if rec.status is not None:
            self._report(rec, at)
        else:
            asyncio.get_running_loop().call_later(STATUS_WAIT_S, self._report, rec, at)

    def _report(self, rec: _Rec, at: float) -> None:
        if self._recs.get(rec.worker) is not rec:
            return
        # What is left of its tree is not memguard's to kill: the process was not started by memguard.
        rc, sig = rec.status if rec.status is not None else (None, None)
        self._post(Exited(rec.worker, 1, rec.pid, at=at, returncode=rc, signal=sig))
