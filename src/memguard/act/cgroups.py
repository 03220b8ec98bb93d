"""One memory cgroup per worker: the kernel as memguard's last line of defence.

Polling can be outrun: a job can allocate gigabytes between two ticks. So,
where it may, memguard puts every worker incarnation in a cgroup of its
own, below its own memory cgroup, with ``limits.memory`` as the hard limit
(``memory.max`` / ``memory.limit_in_bytes``): past it the kernel reclaims
and, at worst, OOM-kills inside that one cgroup, never sshd or memguard.
The cgroup also gives exact accounting of forked trees (working set =
usage minus inactive file) and a way to kill a tree whole, escaped
descendants included (``cgroup.kill``, or SIGKILL to every pid on v1).

cgroup v2: memguard first moves itself into a ``supervisor`` leaf (the
"no internal processes" rule), enables the memory controller for the
children of its cgroup, then creates one leaf per worker. This needs a
delegated cgroup (systemd ``Delegate=yes``). cgroup v1: worker cgroups are
created under memguard's own memory cgroup.

Without the rights (an unprivileged run, no delegation), memguard falls
back to process-tree accounting and says so once.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from ..model import Reading, Unknown
from ..sense.cgroup import CgroupError, MemoryCgroup, create_child, find_own_cgroup
from ..units import format_size

__all__ = ["WorkerCgroups", "CgroupLimits", "setup_worker_cgroups"]


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int | None = None
    memory_high: int | None = None
    swap_max: int | None = None
    cpu: float | None = None  # cores


def _write(path: str, value: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, value.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class WorkerCgroups:
    """Creates, limits, reads, kills and removes the cgroups of worker incarnations."""

    def __init__(self, parent: MemoryCgroup) -> None:
        self.parent = parent
        self.version = parent.version
        self.by_worker: dict[str, MemoryCgroup] = {}
        self.stale: list[MemoryCgroup] = []  # exited, not yet removable
        self.limits: dict[str, CgroupLimits] = {}

    # -- life of one incarnation's cgroup --------------------------------

    def prepare(self, worker: str, incarnation: int, limits: CgroupLimits) -> MemoryCgroup:
        """A fresh cgroup for this incarnation, limits set. Raises OSError/CgroupError."""
        self.release(worker)
        cg = create_child(self.parent, f"{worker}.{incarnation}", exist_ok=True)
        if limits.memory_max is not None:
            cg.set_limit(limits.memory_max)
        if self.version == 2:
            if limits.memory_high is not None:
                _write(cg.path + "/memory.high", str(limits.memory_high))
            if limits.swap_max is not None:
                _write(cg.path + "/memory.swap.max", str(limits.swap_max))
            if limits.cpu is not None:
                _write(cg.path + "/cpu.max", f"{int(limits.cpu * 100000)} 100000")
        else:
            if limits.swap_max is not None and limits.memory_max is not None:
                _write(cg.path + "/memory.memsw.limit_in_bytes", str(limits.memory_max + limits.swap_max))
        self.by_worker[worker] = cg
        self.limits[worker] = limits
        return cg

    def procs_file(self, worker: str) -> str | None:
        cg = self.by_worker.get(worker)
        return cg.path + "/cgroup.procs" if cg is not None else None

    def path(self, worker: str) -> str | None:
        cg = self.by_worker.get(worker)
        return cg.path if cg is not None else None

    def memory(self, worker: str) -> Reading:
        cg = self.by_worker.get(worker)
        if cg is None:
            return Unknown("no cgroup")
        return cg.working_set_bytes()

    def oom_kills(self, worker: str) -> Reading:
        cg = self.by_worker.get(worker)
        if cg is None:
            return Unknown("no cgroup")
        return cg.oom_kills()

    def processes(self, worker: str) -> int:
        cg = self.by_worker.get(worker)
        if cg is None:
            return 0
        try:
            return len(cg.pids())
        except OSError:
            return 0

    def kill(self, worker: str) -> int:
        """SIGKILL every process of the worker's cgroup (escaped descendants too). Returns how many."""
        cg = self.by_worker.get(worker)
        if cg is None:
            return 0
        return _kill_all(cg)

    def release(self, worker: str) -> None:
        """Forget the worker's cgroup; remove it now if empty, else later (see sweep)."""
        cg = self.by_worker.pop(worker, None)
        self.limits.pop(worker, None)
        if cg is not None:
            self.stale.append(cg)
        self.sweep()

    def sweep(self) -> None:
        """Remove exited incarnations' cgroups that are empty by now."""
        keep = []
        for cg in self.stale:
            try:
                if cg.pids():
                    _kill_all(cg)
                    keep.append(cg)
                    continue
                cg.remove()
            except FileNotFoundError:
                continue
            except (OSError, CgroupError):
                keep.append(cg)
        self.stale = keep

    def describe(self) -> str:
        return f"cgroup v{self.version} under {self.parent.path}"

    def close(self) -> None:
        for w in list(self.by_worker):
            self.release(w)
        for _ in range(40):  # killed processes leave their cgroup within milliseconds
            self.sweep()
            if not self.stale:
                break
            time.sleep(0.025)
        if self.version == 1 and not self.stale and os.path.basename(self.parent.path) == "memguard-workers":
            try:
                self.parent.remove()
            except (OSError, CgroupError):
                pass


def _kill_all(cg: MemoryCgroup) -> int:
    if cg.version == 2 and os.path.exists(cg.path + "/cgroup.kill"):
        try:
            n = len(cg.pids())
        except OSError:
            n = 0
        _write(cg.path + "/cgroup.kill", "1")
        return n
    signalled: set[int] = set()
    for _ in range(10):  # v1: no atomic kill; a fork in flight is caught on the next pass
        try:
            pids = [p for p in cg.pids() if p not in signalled]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)  # a pid in our worker's cgroup: ours by construction
                signalled.add(pid)
            except ProcessLookupError:
                pass
    return len(signalled)


def setup_worker_cgroups(mode: str) -> tuple[WorkerCgroups | None, str]:
    """Decide at start-up whether workers get cgroups: (manager or None, a sentence for the log).

    ``mode``: ``auto`` (when memguard may create them), ``on`` (required:
    raises CgroupError if impossible), ``off``.
    """
    if mode == "off":
        return None, "per-worker cgroups are off (worker_cgroups: off): process-tree accounting"
    own = find_own_cgroup()
    why = None
    parent = None
    if own is None:
        why = "memguard runs in no memory cgroup"
    elif own.version == 1:
        try:
            parent = create_child(own, "memguard-workers", exist_ok=True)
        except (OSError, CgroupError) as e:
            why = f"cannot create worker cgroups under {own.path}: {e}"
    else:
        parent, why = _v2_delegate(own)
    if parent is None:
        if mode == "on":
            raise CgroupError(f"worker_cgroups: on, but {why}")
        return None, f"no per-worker cgroups ({why}): process-tree accounting, no kernel limit per worker"
    mgr = WorkerCgroups(parent)
    return mgr, f"per-worker cgroups: {mgr.describe()}; limits.memory is each worker's hard limit"


def _v2_delegate(own: MemoryCgroup) -> tuple[MemoryCgroup | None, str | None]:
    """Move memguard into own/supervisor and let own's children have memory control."""
    try:
        with open(own.path + "/cgroup.procs") as f:
            members = [int(x) for x in f.read().split()]
    except OSError as e:
        return None, f"cannot read {own.path}/cgroup.procs: {e}"
    others = [p for p in members if p != os.getpid()]
    if others:
        return None, (f"memguard shares its cgroup {own.path} with other processes {others[:5]}; "
                      "run it as a service with Delegate=yes")
    try:
        sup = create_child_plain(own, "supervisor")
        with open(sup + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        with open(own.path + "/cgroup.subtree_control", "w") as f:
            f.write("+memory")
        try:
            with open(own.path + "/cgroup.subtree_control", "w") as f:
                f.write("+cpu")
        except OSError:
            pass
    except OSError as e:
        return None, f"cannot delegate {own.path}: {e}"
    return own, None


def create_child_plain(parent: MemoryCgroup, name: str) -> str:
    path = parent.path + "/" + name
    os.makedirs(path, exist_ok=True)
    return path


def format_limits(limits: CgroupLimits) -> str:
    parts = []
    if limits.memory_max is not None:
        parts.append(f"memory.max {format_size(limits.memory_max)}")
    if limits.memory_high is not None:
        parts.append(f"memory.high {format_size(limits.memory_high)}")
    if limits.swap_max is not None:
        parts.append(f"swap {format_size(limits.swap_max)}")
    if limits.cpu is not None:
        parts.append(f"cpu {limits.cpu:g}")
    return ", ".join(parts) or "no limits"
