"""The kernel's OOM killer sees what memguard protects: OOM scores of protected processes and of candidates.

``protect:`` stops memguard from signalling a process; the kernel's OOM
killer knows nothing of it. When memory runs out faster than memguard can
act (or while a victim memguard killed is still freeing its memory, when
the kernel no longer counts it and looks for another), the kernel picks the
process with the highest ``oom_score``. So memguard gives every process
matching ``protect:`` the lowest score it may set, :data:`PROTECTED_OOM_SCORE_ADJ`
(-1000: the kernel never picks it), and raises the candidates it would stop
anyway (processes matched by ``unmanaged:``, ad-hoc workers) to
:data:`CANDIDATE_OOM_SCORE_ADJ` (500, as its own workers), never lowering them.

Lowering a score below the value the process was given by a privileged
writer needs CAP_SYS_RESOURCE; without it (root in a container, a unit that
drops the capability) the kernel refuses with EACCES. memguard then says so
once, naming the processes and their scores, and carries on: raising
candidates needs no capability, so the kernel still prefers them.

Each process (pid and start time) is handled once; the write goes to a
``/proc/<pid>/oom_score_adj`` opened before the process's start time is
checked, so a pid reused in between is never touched.
"""

from __future__ import annotations

import errno
import os
from typing import Iterable

from ..model import Notice, ProtectedProcess
from .process import start_time

__all__ = ["OomScores", "PROTECTED_OOM_SCORE_ADJ", "CANDIDATE_OOM_SCORE_ADJ", "write_oom_score_adj"]

#: OOM_SCORE_ADJ_MIN: the kernel's OOM killer never chooses such a process.
PROTECTED_OOM_SCORE_ADJ = -1000
#: As memguard's own workers (WorkloadPolicy.oom_score_adj): if the kernel must kill, a candidate goes first.
CANDIDATE_OOM_SCORE_ADJ = 500
#: How many (pid, start) pairs are remembered as done before the record is cut back (a busy machine
#: starts and ends many processes; only live ones matter).
_MAX_DONE = 4096


def write_oom_score_adj(pid: int, start: int, value: int, *, only_raise: bool = False) -> tuple[int | None, int]:
    """Set ``pid``'s oom_score_adj to ``value`` if it is still the process that started at ``start``.

    Returns (the value before, 0) on success (also when nothing needed changing), or (before or None, errno).
    ``only_raise``: leave a process whose score is already at or above ``value`` alone.
    """
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return None, e.errno or errno.ESRCH
    before: int | None = None
    try:
        if start_time(pid) != start:
            return None, errno.ESRCH  # the pid now names another process (or it exited)
        try:
            before = int(os.pread(fd, 16, 0))
        except ValueError:
            before = None
        if before is not None and (before == value or (only_raise and before >= value)):
            return before, 0
        os.write(fd, str(value).encode())
        return before, 0
    except OSError as e:
        return before, e.errno or errno.EIO
    finally:
        os.close(fd)


class OomScores:
    """What memguard did to OOM scores, so each process is handled once and a refusal is said once."""

    def __init__(self) -> None:
        self._done: set[tuple[int, int]] = set()
        self._refusal_said = False

    def protect(self, procs: Iterable[ProtectedProcess]) -> list[Notice]:
        """Lower each newly seen protected process to :data:`PROTECTED_OOM_SCORE_ADJ`."""
        notes: list[Notice] = []
        refused: list[tuple[ProtectedProcess, int]] = []
        for p in procs:
            key = (p.pid, p.start)
            if key in self._done:
                continue
            self._remember(key)
            if p.oom_score_adj is not None and p.oom_score_adj <= PROTECTED_OOM_SCORE_ADJ:
                continue
            before, err = write_oom_score_adj(p.pid, p.start, PROTECTED_OOM_SCORE_ADJ)
            if err in (errno.EACCES, errno.EPERM):
                refused.append((p, before if before is not None else (p.oom_score_adj or 0)))
            elif err == 0:
                notes.append(Notice("oom_protect", pid=p.pid, reason=(
                    f"protected process {p.name} (pid {p.pid}): oom_score_adj {before} -> "
                    f"{PROTECTED_OOM_SCORE_ADJ}: the kernel's OOM killer never picks it"),
                    fields={"process": p.name, "oom_score_adj": PROTECTED_OOM_SCORE_ADJ, "before": before}))
        if refused and not self._refusal_said:
            self._refusal_said = True
            shown = ", ".join(f"{p.name} (pid {p.pid}) stays at {adj}" for p, adj in refused[:8])
            notes.append(Notice("oom_protect_refused", level="warning", reason=(
                f"the kernel refuses to lower the OOM score of protected processes ({shown}"
                + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
                + f"): lowering oom_score_adj needs CAP_SYS_RESOURCE, which memguard lacks here. The kernel's "
                  f"OOM killer may still pick them; memguard raises its candidates to {CANDIDATE_OOM_SCORE_ADJ} "
                  f"instead, and acts before the kernel must. Give memguard CAP_SYS_RESOURCE (the shipped "
                  f"unit runs it as root with it) to protect them fully. Said once."),
                fields={"processes": [p.name for p, _ in refused], "pids": [p.pid for p, _ in refused]}))
        return notes

    def raise_candidate(self, pid: int, start: int, name: str) -> list[Notice]:
        """Raise a process memguard would stop anyway to :data:`CANDIDATE_OOM_SCORE_ADJ` (never lower it)."""
        key = (pid, start)
        if key in self._done:
            return []
        self._remember(key)
        before, err = write_oom_score_adj(pid, start, CANDIDATE_OOM_SCORE_ADJ, only_raise=True)
        if err or before is None or before >= CANDIDATE_OOM_SCORE_ADJ:
            return []
        return [Notice("oom_candidate", level="debug", pid=pid, reason=(
            f"candidate {name} (pid {pid}): oom_score_adj {before} -> {CANDIDATE_OOM_SCORE_ADJ}, so that the "
            f"kernel's OOM killer picks it before the rest of the machine"),
            fields={"process": name, "oom_score_adj": CANDIDATE_OOM_SCORE_ADJ, "before": before})]

    def _remember(self, key: tuple[int, int]) -> None:
        if len(self._done) >= _MAX_DONE:
            self._done.clear()  # handled again at most once more: writes are idempotent
        self._done.add(key)
