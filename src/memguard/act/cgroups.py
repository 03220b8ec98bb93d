"""One memory cgroup per worker: the kernel as memguard's last line of defence.

Polling can be outrun: a job can allocate gigabytes between two ticks. So,
where it may, memguard puts every worker incarnation in a cgroup of its
own, below its own memory cgroup, with ``limits.memory`` as the hard limit
(``memory.max`` / ``memory.limit_in_bytes``): past it the kernel reclaims
and, at worst, OOM-kills inside that one cgroup, never sshd or memguard.
The cgroup also gives exact accounting of forked trees (working set =
usage minus inactive file) and a way to kill a tree whole, escaped
descendants included (``cgroup.kill``, or identity-checked SIGKILLs on v1).

Names: every daemon (and every ``memguard run`` job) gets a directory of
its own, ``memguard.<pid>.<start time>``, so two of them in one cgroup
never share a limit or kill each other's processes; each worker
incarnation is a leaf below it, ``<worker>.<incarnation>``. At start,
directories of instances that no longer live are emptied (their
processes killed, identity checked) and removed.

cgroup v2: memguard first moves itself into a ``supervisor`` leaf (the
"no internal processes" rule) and enables the memory controller for the
children of its cgroup. This needs a delegated cgroup (systemd
``Delegate=yes``). cgroup v1: the instance directory is created under
memguard's own memory cgroup.

Without the rights (an unprivileged run, no delegation), memguard falls
back to process-tree accounting and says so once.

This module only changes cgroups (create, limit, move, kill, remove); the
figures are read through :mod:`memguard.sense.cgroup`.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from ..sense.cgroup import CgroupError, MemoryCgroup, find_own_cgroup
from ..sense.host import read_once
from ..units import format_size
from .process import kill_cgroup, start_time

__all__ = [
    "WorkerCgroups",
    "CgroupLimits",
    "setup_worker_cgroups",
    "create_cgroup",
    "set_memory_limit",
    "move_pid",
    "remove_cgroup",
    "instance_name",
    "format_limits",
]

_INSTANCE = re.compile(r"^memguard\.(\d+)\.(\d+)$")
_LEGACY = "memguard-workers"


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int | None = None
    memory_high: int | None = None
    swap_max: int | None = None
    cpu: float | None = None  # cores


# ---------------------------------------------------------------------------
# Writers


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _try_write(path: str, value: str) -> bool:
    try:
        _write(path, value)
        return True
    except OSError:
        return False


def create_cgroup(parent: MemoryCgroup, name: str, *, exist_ok: bool = False) -> MemoryCgroup:
    """Create the cgroup ``parent/name`` (same version) and return it. Raises OSError / CgroupError.

    On v2 the parent must hand the memory controller down; if its
    ``cgroup.subtree_control`` lacks ``memory`` this tries to add it,
    which the kernel refuses when the parent itself holds processes
    (the "no internal processes" rule).
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid cgroup name {name!r}")
    if parent.version == 2:
        control = parent.path + "/cgroup.subtree_control"
        if b"memory" not in read_once(control).split():
            try:
                _write(control, "+memory")
            except OSError as e:
                raise CgroupError(
                    f"cannot enable the memory controller for children of {parent.path}: {e.strerror}"
                    " (a cgroup2 parent that holds processes cannot delegate controllers)"
                ) from e
    path = parent.path + "/" + name
    try:
        os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise
    return MemoryCgroup(parent.version, path)


def set_memory_limit(cg: MemoryCgroup, limit_bytes: int | None) -> None:
    """Set the cgroup's memory limit (None: no limit). Raises OSError."""
    if limit_bytes is not None and limit_bytes < 0:
        raise ValueError(f"a memory limit cannot be negative ({limit_bytes})")
    if cg.version == 2:
        _write(cg.path + "/memory.max", "max" if limit_bytes is None else str(int(limit_bytes)))
    else:
        _write(cg.path + "/memory.limit_in_bytes", "-1" if limit_bytes is None else str(int(limit_bytes)))


def move_pid(cg: MemoryCgroup, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup. Raises OSError."""
    _write(cg.path + "/cgroup.procs", str(int(pid)))


def remove_cgroup(cg: MemoryCgroup) -> None:
    """Remove the (empty) cgroup directory. Kills nothing: raises CgroupError if processes remain."""
    cg.close()
    try:
        left = cg.pids()
    except FileNotFoundError:
        raise CgroupError(f"cannot remove {cg.path}: it does not exist") from None
    if left:
        raise CgroupError(f"cannot remove {cg.path}: it still holds processes {left}")
    try:
        os.rmdir(cg.path)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise CgroupError(f"cannot remove {cg.path}: busy (processes or child cgroups remain)") from e
        raise


def instance_name(pid: int | None = None) -> str:
    """``memguard.<pid>.<start time>``: this process's directory, unique on the machine for good."""
    pid = os.getpid() if pid is None else pid
    return f"memguard.{pid}.{start_time(pid) or 0}"


# ---------------------------------------------------------------------------


class WorkerCgroups:
    """Creates, limits, kills and removes the cgroups of worker incarnations (on the event loop)."""

    def __init__(self, parent: MemoryCgroup) -> None:
        self.parent = parent
        self.version = parent.version
        self.by_worker: dict[str, MemoryCgroup] = {}
        self.stale: list[MemoryCgroup] = []  # exited, not yet removable
        self.limits: dict[str, CgroupLimits] = {}

    def prepare(self, worker: str, incarnation: int, limits: CgroupLimits) -> MemoryCgroup:
        """A fresh cgroup for this incarnation, limits set. Raises OSError/CgroupError."""
        self.release(worker)
        cg = create_cgroup(self.parent, f"{worker}.{incarnation}", exist_ok=True)
        if limits.memory_max is not None:
            set_memory_limit(cg, limits.memory_max)
        if self.version == 2:
            if limits.memory_high is not None:
                _try_write(cg.path + "/memory.high", str(limits.memory_high))
            if limits.swap_max is not None:
                _try_write(cg.path + "/memory.swap.max", str(limits.swap_max))
            if limits.cpu is not None:
                _try_write(cg.path + "/cpu.max", f"{int(limits.cpu * 100000)} 100000")
        elif limits.swap_max is not None and limits.memory_max is not None:
            _try_write(cg.path + "/memory.memsw.limit_in_bytes", str(limits.memory_max + limits.swap_max))
        self.by_worker[worker] = cg
        self.limits[worker] = limits
        return cg

    def path(self, worker: str) -> str | None:
        cg = self.by_worker.get(worker)
        return cg.path if cg is not None else None

    def get(self, worker: str) -> MemoryCgroup | None:
        return self.by_worker.get(worker)

    def kill(self, worker: str) -> int:
        """SIGKILL every process of the worker's cgroup (escaped descendants too). Returns how many."""
        cg = self.by_worker.get(worker)
        return kill_cgroup(cg.path) if cg is not None else 0

    def release(self, worker: str) -> None:
        """Forget the worker's cgroup; remove it now if empty, else later (see sweep)."""
        cg = self.by_worker.pop(worker, None)
        self.limits.pop(worker, None)
        if cg is not None:
            self.stale.append(cg)
        self.sweep()

    def sweep(self) -> None:
        """Remove exited incarnations' cgroups that are empty by now (what is left in them is killed)."""
        keep = []
        for cg in self.stale:
            try:
                if cg.pids():
                    kill_cgroup(cg.path)
                    keep.append(cg)
                    continue
                remove_cgroup(cg)
            except FileNotFoundError:
                continue
            except (OSError, CgroupError):
                keep.append(cg)
        self.stale = keep

    def describe(self) -> str:
        return f"cgroup v{self.version} under {self.parent.path}"

    def close(self) -> list[str]:
        """Kill what is left, remove every leaf and the instance directory. Returns what could not be."""
        for w in list(self.by_worker):
            self.release(w)
        for cg in self.stale:
            kill_cgroup(cg.path)
        return _remove_tree(self.parent.path)


def _remove_tree(path: str) -> list[str]:
    """rmdir the leaves below ``path``, then ``path`` (processes killed a moment ago take a few
    milliseconds to leave: retried briefly). Returns the directories left."""
    import time

    left: list[str] = []
    for _ in range(40):
        left = []
        try:
            names = [n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))]
        except FileNotFoundError:
            return []
        except OSError:
            return [path]
        for n in names:
            try:
                os.rmdir(os.path.join(path, n))
            except FileNotFoundError:
                pass
            except OSError:
                left.append(os.path.join(path, n))
        if not left:
            try:
                os.rmdir(path)
                return []
            except FileNotFoundError:
                return []
            except OSError:
                left = [path]
        time.sleep(0.025)
    return left


def remove_leftovers(own: MemoryCgroup) -> list[str]:
    """Empty and remove the instance directories of memguards that no longer live (a daemon killed
    with SIGKILL leaves its directory behind). Returns the directories removed."""
    removed = []
    try:
        names = os.listdir(own.path)
    except OSError:
        return removed
    for name in names:
        m = _INSTANCE.match(name)
        path = os.path.join(own.path, name)
        if m is None or not os.path.isdir(path):
            continue
        pid, start = int(m.group(1)), int(m.group(2))
        if start_time(pid) == start:
            continue  # that memguard still runs: not ours to touch
        for leaf in [os.path.join(path, n) for n in os.listdir(path)] + [path]:
            if os.path.isdir(leaf):
                kill_cgroup(leaf)
        if not _remove_tree(path):
            removed.append(path)
    legacy = os.path.join(own.path, _LEGACY)
    if os.path.isdir(legacy) and not _remove_tree(legacy):  # from before per-instance names; only if empty
        removed.append(legacy)
    return removed


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
    removed: list[str] = []
    if own is None:
        why = "memguard runs in no memory cgroup"
    else:
        base: MemoryCgroup | None = own
        if own.version == 2:
            base, why = _v2_delegate(own)
        if base is not None:
            removed = remove_leftovers(base)
            try:
                parent = create_cgroup(base, instance_name(), exist_ok=True)
            except (OSError, CgroupError) as e:
                why = f"cannot create worker cgroups under {base.path}: {e}"
    if parent is None:
        if mode == "on":
            raise CgroupError(f"worker_cgroups: on, but {why}")
        return None, f"no per-worker cgroups ({why}): process-tree accounting, no kernel limit per worker"
    mgr = WorkerCgroups(parent)
    note = f"per-worker cgroups: {mgr.describe()}; limits.memory is each worker's hard limit"
    if removed:
        note += f"; removed {len(removed)} cgroup(s) left by memguard instances that no longer run"
    return mgr, note


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
        sup = own.path + "/supervisor"
        os.makedirs(sup, exist_ok=True)
        _write(sup + "/cgroup.procs", str(os.getpid()))
        _write(own.path + "/cgroup.subtree_control", "+memory")
        _try_write(own.path + "/cgroup.subtree_control", "+cpu")
    except OSError as e:
        return None, f"cannot delegate {own.path}: {e}"
    return own, None


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
