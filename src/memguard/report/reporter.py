"""The reporter port: every sink the daemon tells what it saw and did.

The log (structlog: journald under systemd, JSON lines or a console view
otherwise), the Prometheus textfile, and systemd's notification socket
(READY, STATUS, WATCHDOG, RELOADING, STOPPING) are all behind one object,
so the daemon's loop says *what* happened and never *how* it is written.

It also keeps what a post-mortem needs (all optional; None turns one off):
the **flight recorder** (every observation and decision of the last
minutes, :class:`~memguard.report.recorder.FlightRecorder`), the **incident
store** (one record per death, :mod:`memguard.report.incidents`, written by
:class:`~memguard.report.incidentsink.IncidentSink`: memguard's own stops
before the signal goes out, failing worker exits) and the **death watch**
(the kernel's OOM kills anywhere on the box and containers' deaths,
:class:`~memguard.report.deaths.DeathWatch`). Each incident gets one log
entry, event ``incident``.

No sink failure stops guarding: a sink that raises is counted, said once
(on the sinks that still work), and tried again later; the tick goes on.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..decide.state import CoreState
from ..model import Action, Notice, Observation, Signal, SignalProcess, is_known
from ..policy import DaemonPolicy
from ..threads import LoopOwned, on_owner_thread
from ..units import format_size
from .deaths import DeathWatch
from .incidents import Incident, IncidentStore
from .incidentsink import IncidentSink, announced_fields
from .log import action_event, get_logger
from .metrics import Metrics
from .notify import Notifier
from .outlets import Outlets
from .recorder import FlightRecorder
from .status import status_line, status_reply

__all__ = ["Reporter"]


class Reporter(LoopOwned):
    """The real reporter. ``log`` is a structlog logger (the configured one by default).

    ``incidents``, ``recorder`` and ``deaths`` are the post-mortem sinks (see
    the module doc); ``clock`` is the daemon's clock (the observations'
    ``at``), ``wall`` the wall clock of the records.
    """

    def __init__(self, *, log: Any = None, metrics: Metrics | None = None, notifier: Notifier | None = None,
                 incidents: IncidentStore | None = None, recorder: FlightRecorder | None = None,
                 deaths: DeathWatch | None = None, deaths_problem: str | None = None, boot_id: str | None = None,
                 outlets: Outlets | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._claim_thread()
        self.log = log if log is not None else get_logger()
        self.metrics = metrics
        self.notifier = notifier if notifier is not None else Notifier()
        self.kernel_oom_kills = 0
        self.sink_failures: dict[str, int] = {}
        self._gpu_problems: frozenset[Any] = frozenset()
        self._last_obs: Observation | None = None
        self.outlets = outlets if outlets is not None else Outlets()  # recent events, alerts, /metrics
        self.recorder = recorder
        self._tick_actions: list[Action] = []
        self.deaths_problem = deaths_problem
        self.incidents: IncidentSink | None = None
        if incidents is not None:
            self.incidents = IncidentSink(incidents, recorder=recorder, deaths=deaths, boot_id=boot_id,
                                          announce=self._announce, failed=self._failed, say=self.note, clock=clock,
                                          wall=wall)

    # ------------------------------------------------------------------ guarded sinks

    def _failed(self, sink: str, error: BaseException) -> None:
        n = self.sink_failures.get(sink, 0) + 1
        self.sink_failures[sink] = n
        if n == 1 and sink != "log":
            self.event("error", "sink_error", sink=sink,
                       message=f"{sink}: {type(error).__name__}: {error}; memguard keeps guarding and tries "
                               f"again (said once)")

    def event(self, level: str, event: str, **fields: Any) -> None:
        """One log event; a failing log never reaches the caller."""
        try:
            getattr(self.log, level)(event, **fields)
        except Exception as e:  # noqa: BLE001 - no sink failure stops guarding
            self._failed("log", e)
        self.outlets.event(level, event, fields)

    def _guarded(self, sink: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a failure counted against ``sink`` and said once; None then."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - no sink failure stops guarding
            self._failed(sink, e)
            return None

    def _announce(self, inc: Incident, path: str) -> None:
        """The one log (journald) entry of a new incident record."""
        level = "info" if inc.cause == "none" else "warning"
        self.event(level, "incident", **announced_fields(inc, path))

    # ------------------------------------------------------------------ what the core decided

    @on_owner_thread
    def before_acting(self, actions: Sequence[Action], dry_run: bool) -> None:
        """What must be on disk before the effects act: each of memguard's own stops as an incident record
        (pending), so that a daemon that dies right after its signal still leaves it. Nothing else stands
        between a decision and its signal: the log lines follow in :meth:`decisions`."""
        if self.incidents is None:
            return
        for action in actions:
            if isinstance(action, (Signal, SignalProcess)):
                self._guarded("incidents", self.incidents.before, action, dry_run)

    @on_owner_thread
    def decisions(self, actions: Iterable[Action], dry_run: bool) -> None:
        """Log each action and count it for the metrics (the daemon calls it once the effects have acted).

        An incident record of memguard's own stop is announced just before the stop's own log line (written
        by :meth:`before_acting`, or here when that was not called).
        """
        actions = list(actions)
        for action in actions:
            if self.incidents is not None:
                self._guarded("incidents", self.incidents.decided, action, dry_run)
            level, event, fields = action_event(action, dry_run=dry_run)
            self.event(level, event, **fields)
            if isinstance(action, Notice) and action.event == "exit" and action.fields.get("kernel_oom"):
                self.kernel_oom_kills += 1
        if self.metrics is not None:
            self.metrics.count(actions)
        if self.recorder is not None:
            self._tick_actions.extend(actions)

    @on_owner_thread
    def output(self, worker: str, stream: str, line: str) -> None:
        self.event("info", "output", worker=worker, stream=stream, line=line, message=f"{worker} {stream}: {line}")

    # ------------------------------------------------------------------ the daemon's own life

    @on_owner_thread
    def started(self, policy: DaemonPolicy, *, scope: Mapping[str, str], effects: Mapping[str, Any],
                gpu: Any = None) -> None:
        """The start-up lines: what is guarded, how many workers, where the control socket is, the GPUs."""
        from .. import __version__

        p = policy
        self.outlets.start(policy, self)
        self.event("info", "started", version=__version__, pid=os.getpid(), config=p.source or None,
                   scope=scope.get("kind"), scope_description=scope.get("description"),
                   workloads=[w.name for w in p.workloads], system_rules=len(p.rules), dry_run=p.dry_run,
                   runtime_dir=effects.get("runtime_dir"), socket=effects.get("socket"),
                   message=(f"memguard {__version__} guarding {scope.get('description')}; "
                            f"{sum(w.replicas for w in p.workloads)} worker(s) in {len(p.workloads)} workload(s), "
                            f"{len(p.rules)} system rule(s); control socket {effects.get('socket')}"
                            + ("; DRY RUN: no signals" if p.dry_run else "")))
        if gpu is not None:
            if gpu.enabled:
                names = ", ".join(f"{d.index}: {d.name} "
                                  f"{format_size(d.total_bytes) if is_known(d.total_bytes) else '?'}"
                                  for d in gpu.devices)
                self.event("info", "gpu", devices=len(gpu.devices), jetson=gpu.jetson,
                           message=f"GPU sensing on: {names}" + (f"; {gpu.reason}" if gpu.reason else ""))
            else:
                self.event("info", "gpu", jetson=gpu.jetson, message=f"GPU sensing off: {gpu.reason}")
        if self.deaths_problem:
            self.event("warning", "incidents", message=f"kernel OOM kills outside memguard's workers are not "
                                                       f"recorded: {self.deaths_problem}")
        if self.incidents is not None:
            self._guarded("deaths", self.incidents.start, policy)

    @on_owner_thread
    def note(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        self.event(level, event, message=message, **fields)

    @on_owner_thread
    def gpu_problems(self, problems: Iterable[Any]) -> None:
        """Each distinct GPU problem said once, while it lasts (a problem's ``key``, where it has one, says
        which are the same: a message that carries a changing figure is still one problem)."""
        current = {getattr(p, "key", p): p for p in problems}
        for key, p in current.items():
            if key in self._gpu_problems:
                continue
            where = p.device if p.device is not None else "(all)"
            self.event("warning", "gpu_problem", device=p.device, kind=p.kind,
                       message=f"GPU {where}: {p.kind}: {p.message}; its readings are unknown this tick "
                               f"(unknown never escalates)")
        self._gpu_problems = frozenset(current)

    @on_owner_thread
    def config_errors(self, errors: Iterable[Any], *, reload: bool) -> None:
        errors = list(errors)
        for issue in errors:
            self.event("error", "config_error", file=getattr(issue, "file", None), line=getattr(issue, "line", None),
                       key=getattr(issue, "path", None), reason=getattr(issue, "message", str(issue)),
                       message=str(issue))
        if reload:
            self.event("error", "reload_failed", errors=len(errors),
                       message=f"reload refused: {len(errors)} error(s); the running policy stays in force")

    @on_owner_thread
    def reloaded(self, policy: DaemonPolicy) -> None:
        self.outlets.configure(policy)
        if self.incidents is not None:
            self.incidents.policy = policy
        self.event("info", "reloaded", workloads=[w.name for w in policy.workloads], system_rules=len(policy.rules),
                   message=f"configuration reloaded: {len(policy.workloads)} workload(s), "
                           f"{len(policy.rules)} system rule(s)")

    # ------------------------------------------------------------------ systemd and metrics

    def _notify(self, method: str, *args: Any) -> None:
        try:
            getattr(self.notifier, method)(*args)
        except Exception as e:  # noqa: BLE001
            self._failed("sd_notify", e)

    @on_owner_thread
    def ready(self, state: CoreState) -> None:
        self._notify("ready", self.status_line(state))

    @on_owner_thread
    def reloading(self) -> None:
        self._notify("reloading")

    @on_owner_thread
    def stopping(self) -> None:
        self._notify("stopping")

    @on_owner_thread
    def tick(self, obs: Observation, state: CoreState) -> None:
        """After every completed tick: the flight recorder, the incident records this tick made (their
        timelines, fsync and merges in a thread), the watchdog ping and STATUS; the metrics file after a full
        one."""
        self._last_obs = obs
        if self.recorder is not None:
            actions, self._tick_actions = self._tick_actions, []
            self._guarded("recorder", self._record, obs, actions)
        if self.incidents is not None:
            self._guarded("incidents", self.incidents.ticked, obs, state)
        if self.notifier.enabled:
            self._notify("tick", self.status_line(state))
        if self.metrics is not None:
            self.metrics.latest(obs, state.workers)  # what /metrics serves between full ticks
        if obs.full and self.metrics is not None:
            self._write_metrics(obs, state)

    def _record(self, obs: Observation, actions: list[Action]) -> None:
        assert self.recorder is not None
        self.recorder.record(obs)
        if actions:
            self.recorder.record_actions(obs.at, actions)

    def _write_metrics(self, obs: Observation | None, state: CoreState) -> None:
        assert self.metrics is not None
        try:
            self.metrics.write(obs, state.workers)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the guard; retried next full tick
            self._failed("metrics", e)
        else:
            if self.sink_failures.get("metrics"):
                self.sink_failures["metrics"] = 0
                self.event("info", "sink_recovered", sink="metrics",
                           message=f"metrics: {self.metrics.path} written again")

    def max_sleep(self) -> float | None:
        """The loop must tick at least this often (the watchdog)."""
        return self.notifier.max_sleep()

    @on_owner_thread
    def stopped(self, state: CoreState) -> None:
        if self.metrics is not None:
            self._write_metrics(self._last_obs, state)
        if self.incidents is not None and self._guarded("incidents", self.incidents.stop) is False:
            self.event("warning", "incidents", message="incident records still being written when memguard "
                                                       "exits: the last ones may lack their timeline")
        self.event("info", "stopped", message="all workers stopped; memguard exits")
        self._notify("stopping")

    # ------------------------------------------------------------------ status

    def status_line(self, state: CoreState) -> str:
        return status_line(state, self._last_obs, self.kernel_oom_kills)

    def status_reply(self, state: CoreState) -> Mapping[str, Any]:
        return status_reply(state, self._last_obs, self.kernel_oom_kills, **self.outlets.status_fields())

    async def close(self) -> None:
        """At the daemon's very end: queued alerts get a moment to go out; the /metrics endpoint closes."""
        await self.outlets.close()
