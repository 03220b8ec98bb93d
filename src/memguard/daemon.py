"""The daemon: wires sense -> decide -> act -> report into one asyncio loop.

Each pass of the loop is one tick: read the machine (a full tick reads
process trees and pressure too; a fast-path tick only the scope's memory
figure), let the core decide, carry the decisions out, report them. Then
sleep until the sooner of the next full tick and the fast path's next
read, or until something happens (a worker exits, a signal arrives).

Signal handlers only enqueue; the loop handles SIGHUP (reload), SIGTERM
and SIGINT (graceful stop) by name, and puts the original handlers back on
exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from typing import Any, Callable

from . import __version__
from .act.actor import Actor
from .act.cgroups import setup_worker_cgroups
from .act.children import ChildSupervisor
from .act.control import ControlError, ControlServer, pid_in_tree
from .config import ConfigError, load_config
from .decide.core import (all_stopped, begin_shutdown, operator_restart, operator_start, operator_stop, reconcile,
                          step)
from .decide.pacing import fast_path_interval, next_full_tick
from .decide.state import CoreState, Phase
from .paths import default_runtime_dir
from .model import (Action, Exited, GpuDeviceReading, Observation, Pressure, Spawned, WorkerEvent, WorkerSample,
                    is_known)
from .policy import DaemonPolicy
from .report.log import action_event, get_logger
from .report.metrics import Metrics
from .report.notify import Notifier
from .sense.cgroup import ScopeReader, choose_scope
from .sense.procs import TreeTracker
from .sense.gpu import GpuReading, GpuSensor, attribute_all, host_pid_map
from .sense.host import host_scope
from .sense.psi import read_pressure
from .sense.unmanaged import scan_unmanaged
from .units import format_size

__all__ = ["Daemon", "default_runtime_dir"]

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def gpu_observation(reading: GpuReading, samples: dict[str, WorkerSample], trees: dict[str, list[int]],
                    pid_map: Any = None) -> tuple[tuple[GpuDeviceReading, ...], dict[str, WorkerSample]]:
    """Turn an NVML reading into the model's values: device figures, and each worker's GPU memory."""
    devices = tuple(GpuDeviceReading(d.index, d.total_bytes, d.used_bytes, d.free_bytes,
                                     d.name if isinstance(d.name, str) else "") for d in reading.devices)
    if not reading.devices:
        return devices, samples
    att = attribute_all(reading, trees, pid_map)
    out = dict(samples)
    for name, sample in samples.items():
        wg = att.workers.get(name)
        if wg is not None:
            out[name] = replace(sample, gpu_memory_bytes=wg.total_bytes, gpu_per_device=dict(wg.per_device))
    return devices, out


def mlockall() -> str | None:
    """Lock current and future pages (on fault, so nothing is touched needlessly). None on success."""
    import ctypes
    import errno as _errno

    MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        return _errno.errorcode.get(err, str(err))
    return None


class Daemon:
    def __init__(self, policy: DaemonPolicy, config_path: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.config_path = config_path
        self.clock = clock
        self.log = get_logger()
        self.state = CoreState()
        self.pending: list[WorkerEvent] = []
        self.signals: list[int] = []
        self.wake: asyncio.Event | None = None
        self.tracker = TreeTracker()
        self.samples: dict[str, WorkerSample] = {}
        self.pressure = Pressure()
        self.unmanaged: tuple = ()
        self.gpu = GpuSensor() if policy.gpu != "off" else None
        self.gpus: tuple[GpuDeviceReading, ...] = ()
        self.gpu_problems: tuple = ()
        self.scope: ScopeReader = choose_scope(policy.scope)
        self.runtime_dir = policy.runtime_dir or default_runtime_dir()
        self.children = ChildSupervisor(self._on_event, self._on_output, clock=clock)
        self.cgroups, self.cgroup_note = setup_worker_cgroups(policy.worker_cgroups)
        self.control = ControlServer(os.path.join(self.runtime_dir, "control.sock"), self._on_trial,
                                     self._on_admin, self._identify, self._incarnation_of, clock=clock,
                                     on_notice=self._on_control_notice)
        self.actor = Actor(self.children, self.runtime_dir, self._report, self._is_protected_pid,
                           cgroups=self.cgroups, extra_env=self.control.worker_env,
                           reclaim=self.control.send_reclaim)
        self.kernel_oom_kills = 0
        self.metrics = Metrics(policy.metrics_file, __version__) if policy.metrics_file else None
        self.notifier = Notifier()
        self.ticks = 0
        self.last_obs: Observation | None = None
        self.last_full_scope: Any = None
        self.stop_when_done = False  # one-shot use (memguard run): exit once no worker will run again

    # ------------------------------------------------------------------ callbacks

    def _on_event(self, ev: WorkerEvent) -> None:
        if isinstance(ev, Spawned):
            self.tracker.track(ev.worker, ev.pid)
        elif isinstance(ev, Exited):
            self.control.revoke(ev.worker)
            self.tracker.forget(ev.worker)
            self.samples.pop(ev.worker, None)
            ev = self._exit_from_cgroup(ev)
            if ev.kernel_oom:
                self.kernel_oom_kills += 1
                if self.metrics is not None:
                    self.metrics.kernel_oom_kills += 1
        self.pending.append(ev)
        if self.wake is not None:
            self.wake.set()

    # -- the control socket ---------------------------------------------------

    def _on_trial(self, ev: Any) -> None:
        self.pending.append(ev)
        if self.wake is not None:
            self.wake.set()

    def _on_control_notice(self, event: str, fields: dict[str, Any]) -> None:
        details = ", ".join(f"{k} {v}" for k, v in fields.items())
        self.log.warning(event, **{k: v for k, v in fields.items() if k not in ("event", "message")},
                         message=f"control socket: {event.replace('_', ' ')} ({details})")

    def _incarnation_of(self, worker: str) -> int | None:
        live = self.children.live().get(worker)
        return live[1] if live is not None else None

    def _identify(self, worker: str, pid: int) -> bool:
        """Is ``pid`` in ``worker``'s process tree (its main process, a descendant, or a recorded member)?"""
        live = self.children.live().get(worker)
        if live is None:
            return False
        # Its session or parent chain, else a member recorded earlier (a setsid()'d orphan).
        return pid_in_tree(pid, live[0]) or any(p == pid for p, _ in self.tracker.members(worker))

    def _on_admin(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        now = self.clock()
        if op == "status":
            return {"ok": True, "status": self._status(), "workers": {
                name: {"phase": w.phase.value, "pid": w.pid, "incarnation": w.incarnation,
                       "admission": "open" if w.admission_open else "closed", "trials": w.trials,
                       "memory_bytes": w.memory if isinstance(w.memory, (int, float)) else None,
                       "restarts_in_window": len(w.restarts), "last_exit": w.last_exit}
                for name, w in sorted(self.state.workers.items())}}
        if op == "reload":
            ok = self.reload()
            return {"ok": ok, **({} if ok else {"error": "the new configuration has errors; see the log"})}
        worker = req.get("worker")
        if worker not in self.state.workers:
            return {"ok": False, "error": f"no worker named {worker!r}"}
        fn = {"stop": operator_stop, "start": operator_start, "restart": operator_restart}.get(str(op))
        if fn is None:
            return {"ok": False, "error": f"unknown admin op {op!r}"}
        self.log.info("operator", op=op, worker=worker, message=f"operator asked to {op} {worker}")
        self.state, actions = fn(self.state, self.policy, worker, now)
        self._execute(actions)
        if self.wake is not None:
            self.wake.set()
        return {"ok": True, "phase": self.state.workers[worker].phase.value}

    def _exit_from_cgroup(self, ev: Exited) -> Exited:
        """Attribute an exit through the worker's cgroup: kernel OOM kill at its limit, leftovers killed."""
        cg = self.cgroups
        if cg is None or cg.path(ev.worker) is None:
            return ev
        ooms = cg.oom_kills(ev.worker)
        limit = cg.limits.get(ev.worker)
        leftovers = cg.kill(ev.worker)
        path = cg.path(ev.worker)
        if path is not None:
            self.children.unwatch_cgroup(path)
        cg.release(ev.worker)
        changes: dict[str, Any] = {"leftovers": max(ev.leftovers, leftovers)}
        if isinstance(ooms, int):
            changes["kernel_oom"] = ooms > 0
            if ooms > 0 and limit is not None and limit.memory_max is not None:
                changes["oom_detail"] = f"at its cgroup limit {format_size(limit.memory_max)} (limits.memory)"
            elif ooms > 0:
                changes["oom_detail"] = "inside its cgroup"
        return replace(ev, **changes)

    def _on_output(self, worker: str, stream: str, line: str) -> None:
        self.log.info("output", worker=worker, stream=stream, line=line,
                      message=f"{worker} {stream}: {line}")

    def _on_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.wake is not None:
            self.wake.set()

    def _report(self, action: Action, dry_run: bool) -> None:
        level, event, fields = action_event(action, dry_run=dry_run)
        getattr(self.log, level)(event, **fields)

    def _is_protected_pid(self, pid: int) -> bool:
        if not self.policy.protect:
            return False
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip() in self.policy.protect
        except OSError:
            return False

    # ------------------------------------------------------------------ sensing

    def _sample_workers(self) -> dict[str, WorkerSample]:
        # What runs now, including workers spawned since the last step.
        live = {name: pid for name, (pid, _inc) in self.children.live().items()}
        in_cgroup = [n for n in live if self.cgroups is not None and self.cgroups.path(n) is not None]
        samples = self.tracker.sample_all(live, self.policy.protect, skip_memory=in_cgroup)
        if self.cgroups is not None:
            for name, sample in samples.items():
                if self.cgroups.path(name) is not None:
                    samples[name] = replace(sample, memory_bytes=self.cgroups.memory(name),
                                            processes=max(sample.processes, self.cgroups.processes(name)),
                                            source="cgroup")
            self.cgroups.sweep()
        return samples

    async def _observe(self, full: bool) -> Observation:
        if full:
            loop = asyncio.get_running_loop()
            self.samples = await self._while_fast_path(loop.run_in_executor(None, self._sample_workers))
            for name in self.samples:
                self.children.add_members(name, self.tracker.members(name, refresh=False))
            pressure_path = self.scope.cgroup.pressure_path() if (
                self.scope.kind == "cgroup" and self.scope.cgroup is not None) else None
            self.pressure = read_pressure(pressure_path) if pressure_path else read_pressure()
            if self.gpu is not None and self.gpu.enabled:
                await self._read_gpu()
            if self.policy.unmanaged:
                exclude = {pid for name in self.samples for pid, _ in self.tracker.members(name, refresh=False)}
                if self.children.sentinel_pid:
                    exclude.add(self.children.sentinel_pid)
                self.unmanaged = await self._while_fast_path(loop.run_in_executor(
                    None, scan_unmanaged, self.policy.unmanaged, exclude, self.policy.protect))
        # read last: the freshest figure for this tick's decision
        # (a full reading when an exit is pending: its OOM counter tells a kernel kill from another SIGKILL)
        exits = any(isinstance(ev, Exited) for ev in self.pending)
        scope = self.scope() if full or exits else self._fast_scope(self.last_full_scope)
        events = tuple(self.pending)
        self.pending.clear()
        return Observation(at=self.clock(), scope=scope, pressure=self.pressure, workers=dict(self.samples),
                           events=events, full=full, unmanaged=self.unmanaged, gpus=self.gpus)

    def _fast_scope(self, last: Any) -> Any:
        """The scope's memory for a fast-path tick: only what moves fast (usage, working set).

        Limits, swap and the OOM counter come from the last full reading; the
        host's /proc/vmstat is skipped (two thirds of a host read's cost).
        """
        if self.scope.kind == "host":
            return host_scope(oom_kills=False)
        cg = self.scope.cgroup
        total = last.total_bytes if last is not None else None
        if cg is None or last is None or last.kind != "cgroup" or not is_known(total):
            return self.scope()
        ws = cg.working_set_bytes()
        avail = (total - ws if total > ws else 0) if is_known(ws) else ws
        return replace(last, available_bytes=avail)

    async def _while_fast_path(self, work: "asyncio.Future[Any]") -> Any:
        """Await slow sensing (process trees: PSS walks page tables, ~10 ms per GiB) while the fast path
        keeps reading the scope's memory and acting on a crossing, as between ticks."""
        while True:
            obs = self.last_obs
            fp = fast_path_interval(self.state, obs, self.policy) if obs is not None else None
            done, _ = await asyncio.wait({work}, timeout=fp)
            if done:
                return work.result()
            assert obs is not None
            light = replace(obs, at=self.clock(), scope=self._fast_scope(obs.scope), events=(), full=False)
            self.state, actions = step(self.state, light, self.policy, self.clock())
            self._execute(actions)
            self.last_obs = light

    async def _read_gpu(self) -> None:
        assert self.gpu is not None
        reading = await self.gpu.read_async()
        trees = {name: [pid for pid, _ in self.tracker.members(name, refresh=False)] for name in self.samples}
        pid_map = host_pid_map([p for pids in trees.values() for p in pids])
        self.gpus, self.samples = gpu_observation(reading, self.samples, trees, pid_map)
        if reading.problems != self.gpu_problems:
            for problem in reading.problems:
                if problem not in self.gpu_problems:
                    self.log.warning("gpu_problem", device=problem.device, kind=problem.kind,
                                     message=f"GPU {problem.device if problem.device is not None else '(all)'}: "
                                             f"{problem.kind}: {problem.message}; its readings are unknown "
                                             f"this tick (unknown never escalates)")
            self.gpu_problems = reading.problems

    # ------------------------------------------------------------------ the loop

    def _execute(self, actions: list[Action]) -> None:
        self.actor.execute(actions, self.policy)
        if self.metrics is not None:
            self.metrics.count(actions)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        for sig in _HANDLED:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        finally:
            for sig in _HANDLED:
                loop.remove_signal_handler(sig)
            await self.control.close()
            await self.children.close()
            if self.cgroups is not None:
                self.cgroups.close()
            if self.gpu is not None:
                self.gpu.close()

    def _started(self) -> None:
        p = self.policy
        self.log.info(
            "started",
            version=__version__, pid=os.getpid(), config=self.config_path, scope=self.scope.kind,
            scope_description=self.scope.description, workloads=[w.name for w in p.workloads],
            system_rules=len(p.rules), dry_run=p.dry_run, runtime_dir=self.runtime_dir, socket=self.control.path,
            message=(f"memguard {__version__} guarding {self.scope.description}; "
                     f"{sum(w.replicas for w in p.workloads)} worker(s) in {len(p.workloads)} workload(s), "
                     f"{len(p.rules)} system rule(s); control socket {self.control.path}"
                     + ("; DRY RUN: no signals" if p.dry_run else "")),
        )

    def _protect_self(self) -> None:
        """memguard's own OOM score, and its pages locked in RAM (it must stay responsive)."""
        try:
            with open("/proc/self/oom_score_adj") as f:
                current = int(f.read())
            # Only ever lower it: under systemd the unit's OOMScoreAdjust=-1000 is already better.
            if self.policy.oom_score_adj < current:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(self.policy.oom_score_adj))
        except (OSError, ValueError) as e:
            try:
                with open("/proc/self/oom_score_adj") as f:
                    current = f.read().strip()
            except OSError:
                current = "?"
            self.log.info("self_protection", message=(
                f"memguard's oom_score_adj stays {current}: lowering it to {self.policy.oom_score_adj} needs "
                f"CAP_SYS_RESOURCE ({getattr(e, 'strerror', e)}); workers still run higher, so the kernel picks "
                f"them first"))
        if self.policy.mlock:
            err = mlockall()
            if err:
                self.log.warning("self_protection", message=f"mlockall failed ({err}); memguard's pages may be "
                                                            f"swapped out under pressure (set mlock: false to silence)")

    async def _run(self) -> int:
        try:
            await self.control.start()
        except ControlError as e:
            self.log.error("start_failed", message=f"cannot serve the control socket: {e}")
            return 2
        await self.children.start()
        self._protect_self()
        self._started()
        self.log.info("cgroups", message=self.cgroup_note)
        if self.gpu is not None:
            started = await asyncio.get_running_loop().run_in_executor(None, self.gpu.start)
            if started.enabled:
                names = ", ".join(f"{d.index}: {d.name} {format_size(d.total_bytes) if is_known(d.total_bytes) else '?'}"
                                  for d in started.devices)
                self.log.info("gpu", devices=len(started.devices), message=f"GPU sensing on: {names}")
            else:
                self.log.info("gpu", jetson=started.jetson, message=f"GPU sensing off: {started.reason}"
                              + (" GPU memory is system RAM here: the RAM rules cover it." if started.jetson else ""))
        now = self.clock()
        self.state, actions = reconcile(self.state, self.policy, now, reason="start")
        self._execute(actions)
        self.notifier.ready(self._status())
        next_full = now
        while True:
            self._handle_signals()
            now = self.clock()
            full = now >= next_full
            obs = await self._observe(full)
            now = self.clock()
            self.state, actions = step(self.state, obs, self.policy, now)
            self._execute(actions)
            self.ticks += 1
            self.last_obs = obs
            if full:
                self.last_full_scope = obs.scope
            if self.notifier.enabled:
                self.notifier.tick(self._status())
            if full and self.metrics is not None:
                try:
                    self.metrics.write(obs, self.state.workers)
                except OSError as e:
                    self.log.error("metrics_error", message=f"cannot write {self.policy.metrics_file}: {e}")
                    self.metrics = None
            if self.state.shutting_down and all_stopped(self.state):
                break
            if self.stop_when_done and self._done():
                break
            now = self.clock()
            until_full = next_full_tick(self.state, obs, self.policy, now)
            if full or now + until_full < next_full:
                next_full = now + until_full
            fp = fast_path_interval(self.state, obs, self.policy)
            wake_at = next_full if fp is None else min(next_full, now + fp)
            if self.notifier.max_sleep() is not None:
                wake_at = min(wake_at, now + self.notifier.max_sleep())
            await self._sleep_until(wake_at)
        if self.metrics is not None:
            try:
                self.metrics.write(self.last_obs, self.state.workers)
            except OSError:
                pass
        self.log.info("stopped", message="all workers stopped; memguard exits")
        self.notifier.stopping()
        return 0

    def _done(self) -> bool:
        return all(w.phase in (Phase.STOPPED, Phase.FAILED) for w in self.state.workers.values())

    async def _sleep_until(self, deadline: float) -> None:
        assert self.wake is not None
        timeout = deadline - self.clock()
        if self.pending or self.signals:
            return
        if timeout > 0:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self.wake.clear()

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                if self.state.shutting_down:
                    self.log.info("stopping", message="already stopping; waiting for workers to exit")
                    continue
                self.log.info("stopping", signal=signal.Signals(signum).name,
                              message=f"{signal.Signals(signum).name} received: stopping every worker")
                self.notifier.stopping()
                self.state, actions = begin_shutdown(self.state, self.policy, self.clock())
                self._execute(actions)

    def reload(self) -> bool:
        """Re-read the configuration; a bad one keeps the running policy and logs every error."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError([])
            new = load_config(self.config_path)
        except ConfigError as e:
            for issue in e.errors:
                self.log.error("config_error", file=issue.file, line=issue.line, key=issue.path,
                               reason=issue.message, message=str(issue))
            self.log.error("reload_failed", errors=len(e.errors),
                           message=f"reload refused: {len(e.errors)} error(s); the running policy stays in force")
            self.notifier.ready(self._status())
            return False
        if new.scope != self.policy.scope:
            self.scope = choose_scope(new.scope)
        if new.runtime_dir not in (None, self.runtime_dir):
            self.log.warning("reload_note", message="runtime_dir changes take effect at the next start")
            new = replace(new, runtime_dir=self.runtime_dir)
        self.policy = new
        self.state, actions = reconcile(self.state, self.policy, self.clock(), reason="reload")
        self.log.info("reloaded", workloads=[w.name for w in new.workloads], system_rules=len(new.rules),
                      message=f"configuration reloaded: {len(new.workloads)} workload(s), "
                              f"{len(new.rules)} system rule(s)")
        self._execute(actions)
        self.notifier.ready(self._status())
        return True

    def _status(self) -> str:
        """One ASCII line: workers by phase, blocked count, scope memory, what is firing."""
        counts: dict[str, int] = {}
        blocked = 0
        for w in self.state.workers.values():
            counts[w.phase.value] = counts.get(w.phase.value, 0) + 1
            if w.phase == Phase.RUNNING and not w.admission_open:
                blocked += 1
        parts = [f"{counts.get('running', 0)} running", f"{blocked} blocked", f"{counts.get('failed', 0)} failed"]
        if self.kernel_oom_kills:
            parts.append(f"{self.kernel_oom_kills} kernel OOM kills")
        for g in self.gpus:
            if is_known(g.used_bytes) and is_known(g.total_bytes):
                parts.append(f"gpu{g.index} {format_size(g.used_bytes)}/{format_size(g.total_bytes)}")
            else:
                parts.append(f"gpu{g.index} unknown")
        obs = self.last_obs
        if obs is not None:
            avail = obs.scope.available_bytes
            if not isinstance(avail, (int, float)):
                parts.append("available unknown")
            else:
                parts.append(f"{format_size(avail)} available ({obs.scope.kind})")
        firing = [k.split("|")[1] for k, rs in self.state.system_rules.items() if rs.active]
        for w in self.state.workers.values():
            firing += [f"{w.name}: {rs.explain.when}" for rs in w.rules.values() if rs.active and rs.explain]
        if firing:
            parts.append("firing: " + "; ".join(firing[:3]))
        return ", ".join(parts)
