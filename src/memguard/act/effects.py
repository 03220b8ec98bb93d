"""The effects port: carries the core's decisions out and hands back what happened, as events.

:class:`Effects` is the only place where an action becomes a system call:
spawning a worker (in a cgroup of its own where possible, registered with
the sentinel), signalling it (by identity: :mod:`memguard.act.process`),
opening and closing its admission gate, pushing a reclaim request. What the
machine does in return comes back to the daemon through the :class:`Inbox`
it was started with, as values for the next tick: ``Spawned``,
``SpawnFailed``, ``Exited`` (enriched here: a kernel OOM kill counted by
the worker's own cgroup, the limit it hit, leftovers killed), trial reports
from the control socket, and administrators' requests.

In dry run it spawns (memguard owns its workers either way) but sends no
signal, closes no gate and pushes no reclaim for what a rule or limit
decided (invariant 7); stops someone asked for (shutdown, an operator, a
reload) are still carried out, or a dry-run daemon could never stop.

The admission gate of a worker is a small file,
``<runtime_dir>/admission/<worker>``, holding ``open`` or ``closed: why``;
its path is in the worker's environment as ``MEMGUARD_ADMISSION_FILE``.
Any language can read it between two units of work; ``memguard.client``
wraps it.

:meth:`Effects.snapshot` gives ``sense/`` an immutable view of what is
alive (pids, start times, recorded tree members, cgroups), taken on the
loop, so reader threads never touch the supervisor's records.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

from ..model import (SIGKILL, Action, Admit, AdmitCancel, AdmitRequest, Exited, GateNotSet, Joined, LiveSnapshot,
                     LiveWorker, NotDone, Notice, Observation, Progress, Reclaim, SetAdmission, Signal, SignalProcess,
                     Spawn, signal_name)
from ..policy import DaemonPolicy, Limits, RestartPolicy, WorkloadPolicy
from ..sense.procstat import read_comm
from ..threads import LoopOwned, on_owner_thread
from ..units import format_size
from .cgroups import CgroupLimits, WorkerCgroups, format_limits, instance_name, setup_worker_cgroups
from .children import ChildSupervisor, SpawnError, Stdio
from .adhoc import AdhocWorkers, JoinRefused, check_join, job_name
from .control import ControlError, ControlServer, pid_in_tree
from .oomscore import OomScores
from .process import Outcome, signal_process
from .reaper import MemoryReleaser

__all__ = ["Effects", "Inbox", "StartError", "worker_environment", "cuda_env", "DROP_FROM_WORKER_ENV"]

# Variables that belong to memguard's own service, never to its workers:
# a library in a worker must not be able to send READY=1 or watchdog pings
# on the daemon's behalf.
DROP_FROM_WORKER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "MEMGUARD_SOCKET", "MEMGUARD_TOKEN", "MEMGUARD_INSTANCE")


class StartError(Exception):
    """The effects port cannot start (the control socket is taken, the cgroups it must have...)."""


class Inbox(Protocol):
    """Where what happens goes: the daemon's queue for the next tick."""

    def post(self, item: Any) -> None:
        """Queue an event (Spawned, Exited, TrialEvent...) for the next tick."""

    def admin(self, request: dict[str, Any]) -> Awaitable[Mapping[str, Any]]:
        """Queue an administrator's request; the reply comes after the tick that handles it."""

    def output(self, worker: str, stream: str, line: str) -> None:
        """A line a worker wrote (reported, not decided on)."""


def worker_environment(base: Mapping[str, str], wl: WorkloadPolicy, worker: str, replica: int,
                       incarnation: int, admission_file: str, gpus: Iterable[Any] = (),
                       instance: str = "") -> dict[str, str]:
    """The environment a worker incarnation starts with. ``MEMGUARD_INSTANCE``, ``MEMGUARD_WORKER`` and
    ``MEMGUARD_INCARNATION`` also mark every descendant: how memguard attributes an orphan it adopted."""
    env = {k: v for k, v in base.items() if k not in DROP_FROM_WORKER_ENV}
    env.update(dict(wl.environment))
    if instance:
        env["MEMGUARD_INSTANCE"] = instance
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
    env.update(cuda_env(wl.gpus, gpus))
    return env


def cuda_env(gpus: Sequence[str], devices: Iterable[Any]) -> dict[str, str]:
    """The environment that shows a worker the GPUs of its ``gpus:`` and no others.

    ``gpus`` are the workload's entries as configured: NVML indexes
    (``"0"``), MIG device indexes (``"0:1"``) or UUIDs (``"GPU-..."``,
    ``"MIG-..."``). ``devices`` are those of the last reading (anything with ``index`` and
    ``uuid``: :class:`~memguard.model.GpuDeviceReading`, or the sensor's own devices). Each index is replaced by the UUID NVML
    gave for it, so ``CUDA_VISIBLE_DEVICES`` names exactly the devices
    memguard watches, whatever order CUDA enumerates them in; UUIDs pass
    through. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set too, so a worker that
    enumerates devices itself sees them in NVML's order.

    When some index has no known UUID (sensing off, the GPU lost, a GPU in
    MIG mode named by its parent index), the entries are passed as written:
    with ``PCI_BUS_ID`` order CUDA's index N is NVML's index N on the same
    machine. Mixing UUIDs with indexes is left to CUDA only when the
    configuration itself mixes them. No ``gpus`` gives an empty mapping:
    the worker inherits the environment as it is.
    """
    wanted = [str(g).strip() for g in gpus]
    if not wanted:
        return {}
    by_index = {d.index: d.uuid for d in devices if isinstance(d.uuid, str) and d.uuid}
    mapped: list[str] = []
    for g in wanted:
        if g.startswith(("GPU-", "MIG-")):
            mapped.append(g)
        elif g in by_index:
            mapped.append(by_index[g])  # type: ignore[arg-type]
        else:
            mapped = wanted  # some index has no UUID: keep every entry as written
            break
    return {"CUDA_VISIBLE_DEVICES": ",".join(mapped), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _mlockall() -> str | None:
    """Lock current and future pages (on fault, so nothing is touched needlessly). None on success."""
    import ctypes
    import errno as _errno

    MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        return _errno.errorcode.get(err, str(err))
    return None


class Effects(LoopOwned):
    """The real effects port: child processes, worker cgroups, admission gates, the control socket."""

    def __init__(self, *, runtime_dir: str, worker_cgroups: str = "auto", base_env: Mapping[str, str] | None = None,
                 control_socket: str | None = None, sentinel: bool = True, oom_score_adj: int | None = None,
                 mlock: bool = False, clock: Callable[[], float] | None = None, stdio: Stdio | None = None) -> None:
        import time

        self._claim_thread()
        self.oom_score_adj = oom_score_adj  # memguard's own, only ever lowered
        self.mlock = mlock
        self.runtime_dir = runtime_dir
        self.worker_cgroups_mode = worker_cgroups
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.control_socket = control_socket or os.path.join(runtime_dir, "control.sock")
        self.admission_dir = os.path.join(runtime_dir, "admission")
        self._clock = clock or time.monotonic
        self._use_sentinel = sentinel
        self._stdio = stdio  # memguard run: the job's standard streams are memguard's own
        self._inbox: Inbox | None = None
        self.children: ChildSupervisor | None = None
        self.cgroups: WorkerCgroups | None = None
        self.control: ControlServer | None = None
        self._gates: dict[str, bool] = {}  # what each gate file says now (True: open)
        self._gpus: tuple = ()  # the last GPU reading's devices (index -> UUID for CUDA_VISIBLE_DEVICES)
        self.instance = instance_name()  # unique for good: this process's pid and start time
        self._unattributed: set[tuple[int, int]] = set()
        self._gate_errors: set[str] = set()  # workers whose gate file could not be written (said once)
        # Processes memguard did not start (memguard run jobs, adopted matches), admission tickets waiting
        # for the core's answer, OOM scores, memory reaped after kills, output as a sign of progress.
        self.adhoc: AdhocWorkers | None = None
        self._tickets: dict[str, tuple[Any, int]] = {}  # ticket -> (future, connection id)
        self._ticket_seq = 0
        self._adopted: set[tuple[int, int]] = set()
        self._oom = OomScores()
        self._releaser = MemoryReleaser(self._late_notice)
        self._output_at: dict[str, float] = {}
        self._high_warned: set[str] = set()

    # ------------------------------------------------------------------ life

    @on_owner_thread
    async def start(self, inbox: Inbox) -> list[Notice]:
        """Serve the control socket, set up worker cgroups, start the child supervisor. Raises StartError."""
        self._inbox = inbox
        os.makedirs(self.admission_dir, mode=0o755, exist_ok=True)
        self.control = ControlServer(self.control_socket, inbox.post, inbox.admin, self._identify,
                                     self._incarnation_of, clock=self._clock, on_notice=self._control_notice,
                                     worker_of_pid=self._worker_of, on_job=self._on_job,
                                     on_close=self._on_conn_close)
        try:
            await self.control.start()
        except (ControlError, OSError) as e:
            self.control = None
            raise StartError(f"cannot serve the control socket: {e}") from e
        from .cgroups import CgroupError

        try:
            self.cgroups, note = setup_worker_cgroups(self.worker_cgroups_mode)
        except CgroupError as e:
            await self.control.close()
            self.control = None
            raise StartError(str(e)) from e
        self.children = ChildSupervisor(self._on_child_event, self._on_output, clock=self._clock,
                                        sentinel=self._use_sentinel, stdio=self._stdio)
        await self.children.start()
        self.children.set_instance(self.instance)
        import asyncio

        self.adhoc = AdhocWorkers(inbox.post, self._clock)
        self._releaser.start(asyncio.get_running_loop())
        return self._protect_self() + [Notice("cgroups", reason=note)]

    def describe(self) -> dict[str, str]:
        """Where the runtime files are, for the start-up line."""
        return {"runtime_dir": self.runtime_dir, "socket": self.control_socket}

    def _protect_self(self) -> list[Notice]:
        """memguard's own OOM score, and its pages locked in RAM (it must stay responsive)."""
        notes = []
        if self.oom_score_adj is not None:
            try:
                with open("/proc/self/oom_score_adj") as f:
                    current = int(f.read())
                # Only ever lower it: under systemd the unit's OOMScoreAdjust may already be lower.
                if self.oom_score_adj < current:
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write(str(self.oom_score_adj))
            except (OSError, ValueError) as e:
                try:
                    with open("/proc/self/oom_score_adj") as f:
                        shown = f.read().strip()
                except OSError:
                    shown = "?"
                notes.append(Notice("self_protection", reason=(
                    f"memguard's oom_score_adj stays {shown}: lowering it to {self.oom_score_adj} needs "
                    f"CAP_SYS_RESOURCE ({getattr(e, 'strerror', e)}); workers still run higher, so the kernel "
                    f"picks them first")))
        if self.mlock:
            err = _mlockall()
            if err:
                notes.append(Notice("self_protection", level="warning", reason=(
                    f"mlockall failed ({err}); memguard's pages may be swapped out under pressure "
                    f"(set mlock: false to silence)")))
        return notes

    @on_owner_thread
    async def close(self) -> None:
        for fut, _ in self._tickets.values():
            if not fut.done():
                fut.set_result({"ok": False, "error": "memguard is stopping"})
        self._tickets.clear()
        if self.adhoc is not None:
            self.adhoc.close()
        self._releaser.close()
        if self.control is not None:
            await self.control.close()
        if self.children is not None:
            if not self.children.live():
                self.children.kill_adopted()  # every worker has stopped: what is left of their trees goes too
            await self.children.close()
        if self.cgroups is not None:
            self.cgroups.close()

    # ------------------------------------------------------------------ what is alive

    @on_owner_thread
    def snapshot(self) -> LiveSnapshot:
        if self.children is None:
            return LiveSnapshot()
        cg = self.cgroups
        workers = {name: LiveWorker(name, inc, pid, start, members, cg.path(name) if cg is not None else None)
                   for name, (pid, start, inc, members) in self.children.live_records().items()}
        if self.adhoc is not None:
            for name, (pid, start, inc, members) in self.adhoc.live_records().items():
                workers.setdefault(name, LiveWorker(name, inc, pid, start, members, self.adhoc.cgroup(name)))
        own = frozenset(p for p in (self.children.sentinel_pid,) if p)
        return LiveSnapshot(workers=workers, own=own, instance=self.instance)

    @property
    def socket_path(self) -> str:
        return self.control_socket

    def admission_file(self, worker: str) -> str:
        return os.path.join(self.admission_dir, worker)

    # ------------------------------------------------------------------ actions

    @on_owner_thread
    def execute(self, actions: Iterable[Action], policy: DaemonPolicy, obs: Observation | None = None) -> list[Notice]:
        """Carry out one tick's actions; returns what needs reporting besides them (refusals, errors).

        On a full tick the tree members the observation found are recorded
        first, so a SIGKILL of this very tick reaches them too.
        """
        notes: list[Notice] = []
        if obs is not None and obs.full and self.children is not None:
            live = self.children.live()
            for name, sample in obs.workers.items():
                if sample.members and name in live and live[name][0] == sample.pid:
                    self.children.add_members(name, sample.members[1:])
                elif sample.members and self.adhoc is not None and name in self.adhoc:
                    self.adhoc.add_members(name, sample.members[1:])
            self._orphans(obs, notes)
            self._kernel_scores(obs, policy, notes)
            self._adopt(obs, policy, notes)
        if obs is not None and obs.gpus:
            self._gpus = obs.gpus
        for action in actions:
            if isinstance(action, Admit):
                self._answer_ticket(action)
            elif isinstance(action, Spawn):
                self._spawn(action, policy, notes)
            elif policy.dry_run and not (isinstance(action, Signal) and action.lifecycle):
                # Decided and reported; nothing is done (invariant 7). The core learns it was not done.
                if isinstance(action, (Signal, SignalProcess)):
                    self._not_done(action, "dry run")
            elif isinstance(action, Signal):
                self._signal(action, policy, notes)
            elif isinstance(action, SetAdmission):
                if not self._gate(action.worker, action.open, action.reason, notes):
                    inc = self.children.live().get(action.worker, (0, 0))[1] if self.children is not None else 0
                    assert self._inbox is not None
                    self._inbox.post(GateNotSet(action.worker, inc, action.open, "write failed", self._clock()))
            elif isinstance(action, SignalProcess):
                self._signal_process(action, policy, notes)
            elif isinstance(action, Reclaim):
                reached = self.control.send_reclaim(action.worker, action.reason) if self.control else 0
                if not reached:
                    notes.append(Notice("reclaim_unheard", level="warning", worker=action.worker,
                                        workload=action.workload, pid=action.pid,
                                        reason="no memguard.client connection of this worker listens for "
                                               "reclaim requests"))
        return notes

    def _orphans(self, obs: Observation, notes: list[Notice]) -> None:
        """Adopted orphans of no running worker: a leftover of an incarnation that has exited is killed
        (a worker's processes die with it); one that carries no marker is watched (the sentinel kills it
        should memguard die; memguard kills it when it stops) and named once."""
        assert self.children is not None
        live = self.children.live()
        mains = {pid for pid, _ in live.values()}
        killed = [(pid, start) for pid, start, worker, inc in obs.strays
                  if pid not in mains and (worker not in live or live[worker][1] != inc)  # checked again now
                  and signal_process(pid, start, SIGKILL).sent]
        if killed:
            notes.append(Notice("leftovers_killed", level="warning", reason=(
                f"killed {len(killed)} leftover process(es) of exited workers that had left their process "
                f"tree (pids {', '.join(str(p) for p, _ in killed[:10])})"), fields={"pids": [p for p, _ in killed]}))
        for pid, start in obs.unattributed:
            if (pid, start) in self._unattributed or pid in mains:
                continue
            self._unattributed.add((pid, start))
            self.children.watch_process(pid, start)
            notes.append(Notice("unattributed", level="warning", pid=pid, reason=(
                f"process {pid} left a worker's tree and carries no memguard marker in its environment: it "
                f"cannot be counted for a worker; it is killed when memguard stops")))
        if len(self._unattributed) > 4096:
            self._unattributed = set(obs.unattributed)

    def _spawn(self, action: Spawn, policy: DaemonPolicy, notes: list[Notice]) -> None:
        wl = policy.workload(action.workload)
        if wl is None or self.children is None:
            return
        self._warn_memory_high(wl, notes)
        replica = int(action.worker.rsplit("-", 1)[1]) if "-" in action.worker else 0
        gate = self.admission_file(action.worker)
        self._gate(action.worker, True, "started", notes)
        env = worker_environment(self.base_env, wl, action.worker, replica, action.incarnation, gate, self._gpus,
                                 self.instance)
        if self.control is not None:
            env.update(self.control.worker_env(action.worker, action.incarnation))
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
                notes.append(Notice("cgroup", level="debug", worker=action.worker, workload=action.workload,
                                    reason=f"in cgroup {cg.path} ({format_limits(limits)})"))
            except OSError as e:
                notes.append(Notice("cgroup_error", level="error", worker=action.worker, workload=action.workload,
                                    reason=f"cannot create the worker's cgroup, starting it without: {e}"))
        try:
            self.children.spawn(action.worker, action.incarnation, list(wl.command), env, wl.working_dir,
                                wl.user, wl.group, wl.oom_score_adj, procs)
        except SpawnError:
            pass  # reported to the core as SpawnFailed by the supervisor

    def _protected(self, pid: int, policy: DaemonPolicy) -> bool:
        return bool(policy.protect) and read_comm(pid) in policy.protect

    def _signal(self, action: Signal, policy: DaemonPolicy, notes: list[Notice]) -> None:
        if self.children is None or action.pid <= 1 or action.pid == os.getpid():
            return
        if self._protected(action.pid, policy):
            notes.append(Notice("refused", level="warning", worker=action.worker, workload=action.workload,
                                pid=action.pid, reason="the process matches protect: at the moment of signalling; "
                                                       "not signalled"))
            if not action.lifecycle:
                self._not_done(action, "protected")
            return
        if self.adhoc is not None and action.worker in self.adhoc:
            self._signal_adhoc(action, policy, notes)
            return
        if action.signum == SIGKILL:
            # The main process and its recorded members first, each reaped the moment it is killed
            # (process_mrelease); the group, the members again and the cgroup then get SIGKILL as always.
            record = self.children.live_record(action.worker)
            if record is not None and record[0] == action.pid and record[2] == action.incarnation:
                self._releaser.kill([(record[0], record[1]), *record[3]], action.worker)
        self.children.signal(action.worker, action.pid, action.incarnation, action.signum)
        if action.signum == SIGKILL and self.cgroups is not None:
            self.cgroups.kill(action.worker)  # the whole cgroup: escaped descendants too

    def _signal_process(self, action: SignalProcess, policy: DaemonPolicy, notes: list[Notice]) -> None:
        """Signal an unmanaged victim, only if it is still the process that was chosen."""
        if self._protected(action.pid, policy):
            self._not_done(action, "protected")
            return
        if action.signum == SIGKILL and self._releaser.kill([(action.pid, action.start)],
                                                            f"unmanaged {action.name}"):
            return  # killed, and its memory reaped at once
        outcome = signal_process(action.pid, action.start, action.signum)
        if outcome in (Outcome.REPLACED, Outcome.DENIED):
            notes.append(Notice("refused", level="warning", pid=action.pid,
                                reason=f"unmanaged process {action.name} (pid {action.pid}) not signalled: "
                                       + ("the pid now belongs to another process" if outcome is Outcome.REPLACED
                                          else "permission denied")))
            self._not_done(action, outcome.value)

    def _not_done(self, action: Signal | SignalProcess, reason: str) -> None:
        assert self._inbox is not None
        if isinstance(action, Signal):
            self._inbox.post(NotDone(action.worker, action.incarnation, action.pid, reason, self._clock()))
        else:
            self._inbox.post(NotDone(None, 0, action.pid, reason, self._clock()))

    def _gate(self, worker: str, is_open: bool, reason: str, notes: list[Notice]) -> bool:
        """Write the worker's admission file; False when it could not be written (said once per worker until
        a write succeeds again)."""
        try:
            _write_atomic(self.admission_file(worker), "open\n" if is_open else f"closed: {reason}\n")
        except OSError as e:
            if worker not in self._gate_errors:
                self._gate_errors.add(worker)
                notes.append(Notice("admission_error", level="error", worker=worker, reason=(
                    f"cannot write the admission file {self.admission_file(worker)}: {e}; its gate still says "
                    f"{'closed' if is_open else 'open'} and memguard tries again every few seconds")))
            return False
        self._gates[worker] = is_open
        if worker in self._gate_errors:
            self._gate_errors.discard(worker)
            notes.append(Notice("admission_recovered", worker=worker, reason="the admission file is written again"))
        return True

    @on_owner_thread
    def forget(self, workers: Iterable[str]) -> None:
        """Workers removed from the configuration: delete their admission files."""
        for w in workers:
            if self.adhoc is not None and w in self.adhoc:
                self.adhoc.forget(w)
            self._gates.pop(w, None)
            try:
                os.unlink(self.admission_file(w))
            except FileNotFoundError:
                pass
            except OSError:
                pass

    # ------------------------------------------------------------------ what happened

    def _on_child_event(self, ev: Any) -> None:
        if isinstance(ev, Exited):
            if self.control is not None:
                self.control.revoke(ev.worker)
            ev = self._exit_from_cgroup(ev)
        assert self._inbox is not None
        self._inbox.post(ev)

    def _exit_from_cgroup(self, ev: Exited) -> Exited:
        """Attribute an exit through the worker's cgroup: kernel OOM kill at its limit, leftovers killed."""
        cg = self.cgroups
        if cg is None or cg.get(ev.worker) is None or self.children is None:
            return ev
        mc = cg.get(ev.worker)
        assert mc is not None
        ooms = mc.oom_kills()
        limit = cg.limits.get(ev.worker)
        leftovers = cg.kill(ev.worker)
        self.children.unwatch_cgroup(mc.path)
        cg.release(ev.worker)
        changes: dict[str, Any] = {"leftovers": max(ev.leftovers, leftovers)}
        if isinstance(ooms, int):
            changes["kernel_oom"] = ooms > 0
            if ooms > 0 and limit is not None and limit.memory_max is not None:
                changes["oom_detail"] = f"at its cgroup limit {format_size(limit.memory_max)} (limits.memory)"
            elif ooms > 0:
                changes["oom_detail"] = "inside its cgroup"
        return replace(ev, **changes)

    # -- the control socket's questions (on the loop) ---------------------------------

    def _incarnation_of(self, worker: str) -> int | None:
        assert self.children is not None
        live = self.children.live().get(worker)
        return live[1] if live is not None else None

    def _identify(self, worker: str, pid: int) -> bool:
        """Is ``pid`` in ``worker``'s process tree (its main process, a descendant, or a recorded member)?"""
        assert self.children is not None
        live = self.children.live().get(worker)
        if live is None:
            return False
        # Its session or parent chain, else a member recorded earlier (a setsid()'d orphan).
        return pid_in_tree(pid, live[0]) or self.children.is_member(worker, pid)

    def _worker_of(self, pid: int) -> str | None:
        """The running worker whose tree holds ``pid`` (its connection counts in the workers' pool)."""
        if self.children is None:
            return None
        for worker, (main, _inc) in self.children.live().items():
            if pid_in_tree(pid, main) or self.children.is_member(worker, pid):
                return worker
        return None

    def _control_notice(self, event: str, fields: dict[str, Any]) -> None:
        details = ", ".join(f"{k} {v}" for k, v in fields.items())
        assert self._inbox is not None
        self._inbox.post(Notice(event, level="warning",
                                fields={k: v for k, v in fields.items() if k not in ("event", "message")},
                                reason=f"control socket: {event.replace('_', ' ')} ({details})"))



    # ------------------------------------------------------------------ progress, kernel scores, adoption

    def _on_output(self, worker: str, stream: str, line: str) -> None:
        """A worker's line: to the reporter; to the core, as a sign of progress, at most once a second."""
        assert self._inbox is not None
        self._inbox.output(worker, stream, line)
        now = self._clock()
        if now - self._output_at.get(worker, -1e9) >= _PROGRESS_EVERY_S and self.children is not None:
            live = self.children.live().get(worker)
            if live is not None:
                self._output_at[worker] = now
                self._inbox.post(Progress(worker, live[1], "output", now))

    def _kernel_scores(self, obs: Observation, policy: DaemonPolicy, notes: list[Notice]) -> None:
        """Protected processes get the lowest OOM score memguard may set; candidates it would stop anyway (matched
        unmanaged processes, ad-hoc workers) are raised to its workers' score."""
        if obs.protected:
            notes.extend(self._oom.protect(obs.protected))
        for p in obs.unmanaged:
            notes.extend(self._oom.raise_candidate(p.pid, p.start, p.name))
        if self.adhoc is not None:
            for name, (pid, start, _, _) in self.adhoc.live_records().items():
                notes.extend(self._oom.raise_candidate(pid, start, name))

    def _adopt(self, obs: Observation, policy: DaemonPolicy, notes: list[Notice]) -> None:
        """Processes matched by an unmanaged: entry with rules become ad-hoc workers."""
        if not obs.adoptable or self.adhoc is None or self._inbox is None:
            return
        for a in obs.adoptable:
            key = (a.pid, a.start)
            if key in self._adopted or self.adhoc.watching(a.pid, a.start) or a.entry >= len(policy.unmanaged):
                continue
            self._adopted.add(key)
            m = policy.unmanaged[a.entry]
            name = f"{job_name(m.name or a.name)}-{a.pid}"
            wl = WorkloadPolicy(name=job_name(m.name or a.name), command=(a.name,), priority=m.priority,
                                rules=m.rules, restart=RestartPolicy(mode="never"),
                                source=f"unmanaged {m.name or m.cmdline or m.user or m.cgroup or ''}".strip())
            if self.adhoc.add(name, a.pid, a.start, None, None):
                self._inbox.post(Joined(name, wl, a.pid, a.start, self._clock(), origin="unmanaged"))
        if len(self._adopted) > 4096:
            self._adopted = {(a.pid, a.start) for a in obs.adoptable}

    def _warn_memory_high(self, wl: WorkloadPolicy, notes: list[Notice]) -> None:
        """limits.memory_high is a cgroup v2 setting: said once per workload where it has no effect."""
        if wl.limits.memory_high_bytes is None or wl.name in self._high_warned:
            return
        if self.cgroups is not None and self.cgroups.version == 2:
            return
        self._high_warned.add(wl.name)
        why = ("this machine has the cgroup v1 memory controller, which has no memory.high"
               if self.cgroups is not None else "workers get no cgroup of their own here (worker_cgroups)")
        notes.append(Notice("memory_high_ignored", level="warning", workload=wl.name, reason=(
            f"limits.memory_high {format_size(wl.limits.memory_high_bytes)} of workload {wl.name} is ignored: "
            f"{why}. limits.memory still applies. For a soft limit here, add a rule such as "
            f"{{when: \"worker.memory > {format_size(wl.limits.memory_high_bytes)}\", action: reclaim}}. "
            f"Said once.")))

    def _late_notice(self, note: Notice) -> None:
        """A notice from a helper thread (memory released), delivered on the loop."""
        if self._inbox is not None:
            self._inbox.post(note)

    # ------------------------------------------------------------------ jobs: admission and ad-hoc workers

    def _signal_adhoc(self, action: Signal, policy: DaemonPolicy, notes: list[Notice]) -> None:
        """A signal for a process memguard did not start (protection was checked by the caller)."""
        assert self.adhoc is not None and self.control is not None
        conn = self.adhoc.conn_of(action.worker)
        if conn is not None:
            self.control.push_to(conn, {"event": "signal", "worker": action.worker, "action": action.event,
                                        "signal": signal_name(action.signum), "reason": action.reason,
                                        "explain": action.explain.display if action.explain else None})
        if action.signum == SIGKILL:
            record = self.adhoc.live_records().get(action.worker)
            if record is not None and record[0] == action.pid:
                self._releaser.kill([(record[0], record[1]), *record[3]], action.worker)
        self.adhoc.signal(action.worker, action.pid, action.signum)

    def _on_job(self, op: str, req: dict[str, Any], peer: tuple[int, int, int], conn: int) -> Any:
        try:
            if op == "admit":
                return self._admit(req, conn)
            if op == "join":
                return self._join(req, peer, conn)
            if op == "exited":
                return self._exited(req, peer)
        except JoinRefused as e:
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _admit(self, req: dict[str, Any], conn: int) -> Any:
        import asyncio

        need, name, wait = req.get("need_bytes"), req.get("name", "job"), req.get("wait", True)
        if not isinstance(need, int) or isinstance(need, bool) or need < 0 or need > 1 << 60:
            return {"ok": False, "error": "field 'need_bytes' must be a number of bytes (an integer)"}
        if not isinstance(name, str) or not isinstance(wait, bool):
            return {"ok": False, "error": "field 'name' must be a string and 'wait' true or false"}
        assert self._inbox is not None
        self._ticket_seq += 1
        ticket = f"t{self._ticket_seq}"
        fut = asyncio.get_running_loop().create_future()
        self._tickets[ticket] = (fut, conn)
        self._inbox.post(AdmitRequest(ticket, need, name[:200] or "job", self._clock(), wait))
        return fut

    def _answer_ticket(self, action: Admit) -> None:
        entry = self._tickets.get(action.ticket)
        if entry is None:
            return
        fut, conn = entry
        if not action.granted:
            del self._tickets[action.ticket]
        if not fut.done():
            reply = {"ok": action.granted, "ticket": action.ticket, "available_bytes": action.available_bytes,
                     "promised_bytes": action.promised_bytes, "waited_s": round(action.waited_s, 3)}
            if not action.granted:
                reply["error"] = action.reason
            fut.set_result(reply)

    def _join(self, req: dict[str, Any], peer: tuple[int, int, int], conn: int) -> dict[str, Any]:
        assert self.adhoc is not None and self._inbox is not None
        pid, start, cgroup, note = check_join(req.get("pid"), peer, req.get("cgroup"))
        command = req.get("command") or []
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            return {"ok": False, "error": "field 'command' must be a list of strings"}
        raw_name = req.get("name") or (command[0] if command else "job")
        if not isinstance(raw_name, str):
            return {"ok": False, "error": "field 'name' must be a string"}
        priority, memory_max, ticket = req.get("priority", 0), req.get("memory_max_bytes"), req.get("ticket")
        if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
            return {"ok": False, "error": "field 'priority' must be an integer from -1000 to 1000"}
        if memory_max is not None and (not isinstance(memory_max, int) or isinstance(memory_max, bool)
                                       or memory_max <= 0):
            return {"ok": False, "error": "field 'memory_max_bytes' must be a positive integer"}
        if ticket is not None and (not isinstance(ticket, str) or ticket not in self._tickets
                                   or self._tickets[ticket][1] != conn):
            return {"ok": False, "error": "field 'ticket' must be a ticket this connection was admitted with"}
        name = job_name(raw_name)
        worker = f"{name}-{pid}"
        if worker in self.adhoc or (self.children is not None and worker in self.children.live()):
            return {"ok": False, "error": f"process {pid} has joined already, as {worker}"}
        wl = WorkloadPolicy(name=name, command=tuple(c[:4096] for c in command[:64]) or (name,), priority=priority,
                            limits=Limits(memory_bytes=memory_max), restart=RestartPolicy(mode="never"),
                            source=f"memguard run (pid {peer[0]}, uid {peer[1]})")
        if not self.adhoc.add(worker, pid, start, cgroup, conn):
            return {"ok": False, "error": f"process {pid} ended before it could join"}
        self._inbox.post(Joined(worker, wl, pid, start, self._clock(), ticket=ticket, origin="run"))
        return {"ok": True, "worker": worker, **({"note": note} if note else {})}

    def _exited(self, req: dict[str, Any], peer: tuple[int, int, int]) -> dict[str, Any]:
        assert self.adhoc is not None
        worker, rc, sig = req.get("worker"), req.get("returncode"), req.get("signal")
        if not isinstance(worker, str) or worker not in self.adhoc:
            return {"ok": False, "error": "field 'worker' must name an ad-hoc worker"}
        if rc is not None and (not isinstance(rc, int) or isinstance(rc, bool)):
            return {"ok": False, "error": "field 'returncode' must be an integer"}
        if sig is not None and (not isinstance(sig, int) or isinstance(sig, bool)):
            return {"ok": False, "error": "field 'signal' must be a signal number"}
        record = self.adhoc.live_records().get(worker)
        pid = record[0] if record is not None else None
        if peer[1] != 0 and pid is not None and not pid_in_tree(pid, peer[0]):
            return {"ok": False, "error": "only the job's parent may report its exit"}
        self.adhoc.set_status(worker, rc, sig)
        return {"ok": True}

    def _on_conn_close(self, conn: int) -> None:
        """A connection ended: tickets it waited on (or was admitted with and never used) are given up."""
        if self._inbox is None:
            return
        for ticket in [t for t, (_, c) in self._tickets.items() if c == conn]:
            fut, _ = self._tickets.pop(ticket)
            if not fut.done():
                fut.cancel()
            # The core gives up a place in the queue or an unused promise; a job that joined keeps its promise.
            self._inbox.post(AdmitCancel(ticket, self._clock(), "the job's connection closed"))


#: A worker's output lines tell the core it makes progress at most once a second (a chatty worker must
#: not flood the inbox: one event a second is enough for worker.quiet, whose rules count minutes).
_PROGRESS_EVERY_S = 1.0
