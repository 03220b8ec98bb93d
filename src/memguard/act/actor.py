"""Carrying out the core's decisions: spawn, signal, open and close admission gates.

The actor is the only place that turns an action into a system call. In
dry run it reports what it would have done and sends no signal and closes
no gate (invariant 7); spawning still happens, since memguard owns its
workers either way.

The admission gate of a worker is a small file,
``<runtime_dir>/admission/<worker>``, holding ``open`` or ``closed: why``;
its path is in the worker's environment as ``MEMGUARD_ADMISSION_FILE``.
Any language can read it between two units of work; ``memguard.client``
wraps it.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Iterable, Mapping

from ..model import SIGKILL, Action, Notice, Reclaim, SetAdmission, Signal, SignalProcess, Spawn
from ..policy import DaemonPolicy, WorkloadPolicy
from ..sense.procstat import same_process
from .cgroups import CgroupLimits, WorkerCgroups, format_limits
from .children import ChildSupervisor, SpawnError

__all__ = ["Actor", "worker_environment", "DROP_FROM_WORKER_ENV"]

# Variables that belong to memguard's own service, never to its workers:
# a library in a worker must not be able to send READY=1 or watchdog pings
# on the daemon's behalf.
DROP_FROM_WORKER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "MEMGUARD_SOCKET", "MEMGUARD_TOKEN")


def worker_environment(base: Mapping[str, str], wl: WorkloadPolicy, worker: str, replica: int,
                       incarnation: int, admission_file: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in DROP_FROM_WORKER_ENV}
    env.update(dict(wl.environment))
    env.update({
        "MEMGUARD_WORKER": worker,
        "MEMGUARD_WORKLOAD": wl.name,
        "MEMGUARD_REPLICA": str(replica),
        "MEMGUARD_INCARNATION": str(incarnation),
        "MEMGUARD_ADMISSION_FILE": admission_file,
    })
    if wl.limits.memory_bytes:
        env["MEMGUARD_MEMORY_LIMIT"] = str(wl.limits.memory_bytes)
    if wl.limits.gpu_memory_bytes:
        env["MEMGUARD_GPU_MEMORY_LIMIT"] = str(wl.limits.gpu_memory_bytes)
    if wl.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(wl.gpus)
    return env


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Actor:
    def __init__(self, children: ChildSupervisor, runtime_dir: str, report: Callable[[Action, bool], None],
                 protect_check: Callable[[int], bool], base_env: Mapping[str, str] | None = None,
                 cgroups: WorkerCgroups | None = None,
                 extra_env: Callable[[str, int], Mapping[str, str]] | None = None,
                 reclaim: Callable[[str, str], int] | None = None) -> None:
        self.children = children
        self.cgroups = cgroups
        self.extra_env = extra_env  # (worker, incarnation) -> control-socket variables
        self.reclaim = reclaim  # (worker, reason) -> connections reached
        self.runtime_dir = runtime_dir
        self.report = report
        self.protect_check = protect_check  # pid -> True if it must never be signalled
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.admission_dir = os.path.join(runtime_dir, "admission")
        os.makedirs(self.admission_dir, mode=0o755, exist_ok=True)
        self.signals_sent = 0

    def admission_file(self, worker: str) -> str:
        return os.path.join(self.admission_dir, worker)

    def execute(self, actions: Iterable[Action], policy: DaemonPolicy) -> None:
        for action in actions:
            self.report(action, policy.dry_run)
            if isinstance(action, Spawn):
                self._spawn(action, policy)
            elif isinstance(action, Signal):
                if not policy.dry_run:
                    self._signal(action)
            elif isinstance(action, SetAdmission):
                if not policy.dry_run:
                    self._gate(action.worker, action.open, action.reason)
            elif isinstance(action, SignalProcess):
                if not policy.dry_run:
                    self._signal_process(action)
            elif isinstance(action, Reclaim):
                if not policy.dry_run:
                    reached = self.reclaim(action.worker, action.reason) if self.reclaim else 0
                    if not reached:
                        self.report(Notice("reclaim_unheard", level="warning", worker=action.worker,
                                           workload=action.workload, pid=action.pid,
                                           reason="no memguard.client connection of this worker listens for "
                                                  "reclaim requests"), False)

    def _spawn(self, action: Spawn, policy: DaemonPolicy) -> None:
        wl = policy.workload(action.workload)
        if wl is None:
            return
        replica = int(action.worker.rsplit("-", 1)[1]) if "-" in action.worker else 0
        gate = self.admission_file(action.worker)
        self._gate(action.worker, True, "started")
        env = worker_environment(self.base_env, wl, action.worker, replica, action.incarnation, gate)
        if self.extra_env is not None:
            env.update(self.extra_env(action.worker, action.incarnation))
        procs = None
        if self.cgroups is not None:
            # Dry run measures through the cgroup but enforces nothing: no kernel limits.
            limits = CgroupLimits() if policy.dry_run else CgroupLimits(
                memory_max=wl.limits.memory_bytes, memory_high=wl.limits.memory_high_bytes,
                swap_max=wl.limits.swap_bytes, cpu=wl.limits.cpu)
            try:
                cg = self.cgroups.prepare(action.worker, action.incarnation, limits)
                procs = cg.path + "/cgroup.procs"
                self.children.watch_cgroup(cg.path)
                self.report(Notice("cgroup", level="debug", worker=action.worker, workload=action.workload,
                                   reason=f"in cgroup {cg.path} ({format_limits(limits)})"), False)
            except OSError as e:
                self.report(Notice("cgroup_error", level="error", worker=action.worker, workload=action.workload,
                                   reason=f"cannot create the worker's cgroup, starting it without: {e}"), False)
        try:
            self.children.spawn(action.worker, action.incarnation, list(wl.command), env, wl.working_dir,
                                wl.user, wl.group, wl.oom_score_adj, procs)
        except SpawnError:
            pass  # reported to the core as SpawnFailed by the supervisor

    def _signal(self, action: Signal) -> None:
        if action.pid <= 1 or action.pid == os.getpid():
            return
        if self.protect_check(action.pid):
            self.report(Notice("refused", level="warning", worker=action.worker, workload=action.workload,
                               pid=action.pid, reason="the process matches protect: at the moment of signalling; "
                                                      "not signalled"), False)
            return
        if self.children.signal(action.worker, action.pid, action.incarnation, action.signum):
            self.signals_sent += 1
        if action.signum == SIGKILL and self.cgroups is not None:
            self.cgroups.kill(action.worker)  # the whole cgroup: escaped descendants too

    def _signal_process(self, action: SignalProcess) -> None:
        """Signal an unmanaged victim through a pidfd, only if it is still the process that was chosen."""
        if action.pid <= 1 or action.pid == os.getpid() or self.protect_check(action.pid):
            return
        try:
            fd = os.pidfd_open(action.pid)
        except OSError:
            return  # already gone
        try:
            if not same_process(action.pid, action.start):  # checked after pidfd_open: the fd is that process
                self.report(Notice("refused", level="warning", pid=action.pid,
                                   reason="the pid now belongs to another process; not signalled"), False)
                return
            signal.pidfd_send_signal(fd, action.signum)
            self.signals_sent += 1
        except OSError:
            pass
        finally:
            os.close(fd)

    def _gate(self, worker: str, is_open: bool, reason: str) -> None:
        try:
            _write_atomic(self.admission_file(worker), "open\n" if is_open else f"closed: {reason}\n")
        except OSError as e:
            self.report(Notice("admission_error", level="error", worker=worker,
                               reason=f"cannot write the admission file: {e}"), False)

    def forget(self, workers: Iterable[str]) -> None:
        for w in workers:
            try:
                os.unlink(self.admission_file(w))
            except FileNotFoundError:
                pass
