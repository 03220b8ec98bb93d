"""Fake ports for running the whole daemon in a test: scripted readings, pretend processes, a log.

    from memguard.daemon import Daemon
    from memguard.testing import FakeEffects, FakeObserver, RecordingLog, VirtualClock
    from memguard.report.reporter import Reporter

    clock = VirtualClock()
    observer, effects, log = FakeObserver(), FakeEffects(clock=clock.now), RecordingLog()
    daemon = Daemon(policy, observer, effects, Reporter(log=log), clock, capture_signals=False)
    task = asyncio.ensure_future(daemon.run())
    await clock.advance(1.0)            # workers spawned, sampled, running
    observer.available = 1 << 30        # the scope runs short
    await clock.advance(0.01)
    assert effects.signals[-1].event == "kill"

No root, no processes, no real time: the daemon's own code (the pump,
pacing, reload, admin replies, shutdown) runs as in production.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..model import (Action, Exited, GateNotSet, LiveSnapshot, LiveWorker, NotDone, Notice, Observation, Pressure,
                     Reclaim, Reading, ScopeMemory, SetAdmission, Signal, SignalProcess, Spawn, Spawned, WatchPlan,
                     WorkerSample)
from ..policy import DaemonPolicy
from ..sense.observer import Sample

__all__ = ["FakeObserver", "FakeEffects", "RecordingLog", "GiB", "MiB"]

GiB = 1024**3
MiB = 1024**2


class FakeObserver:
    """The observer port over scripted readings.

    Set ``available`` / ``total`` (the scope, bytes), ``memory[worker]``
    (bytes or Unknown; 100 MiB by default), ``protected`` (worker names),
    ``pressure``. Counts ``samples`` (full ticks measured) and ``fast_reads``
    (fast ticks' readings).

    Between ticks it watches like the real one: ``plan`` is the last
    :class:`~memguard.model.WatchPlan` the daemon handed over; setting
    ``available`` outside its band wakes the daemon at once (as a kernel
    notification would), and with a ``clock`` it also reads ``available``
    on the plan's polling pace in virtual time, counting ``fast_checks``.
    ``fresh_memory[worker]`` is what a re-read at the moment of acting
    finds (default: ``memory``); ``fresh_reads`` counts those re-reads.
    """

    def __init__(self, *, total: int = 24 * GiB, available: int = 20 * GiB, clock: Any = None) -> None:
        self.total: Reading = total
        self._available: Reading = available
        self.memory: dict[str, Reading] = {}
        self.fresh_memory: dict[str, Reading] = {}
        self.protected: set[str] = set()
        self.pressure = Pressure()
        self.samples = 0
        self.fast_reads = 0
        self.fast_checks = 0
        self.fresh_reads = 0
        self.crossings = 0
        self.policy: DaemonPolicy | None = None
        self.plan: WatchPlan | None = None
        self.clock = clock
        self._crossed: bool | None = None  # None: no crossing; else whether it can stop a victim
        self._wake: Callable[[], None] | None = None
        self._last = Sample()
        self._poller: Any = None
        self._replanned: Any = None

    @property
    def available(self) -> Reading:
        return self._available

    @available.setter
    def available(self, value: Reading) -> None:
        self._available = value
        self._check()

    def _check(self) -> None:
        plan = self.plan
        if plan is None or self._crossed is not None or self._wake is None:
            return
        v = self._available
        if not isinstance(v, (int, float)) or plan.outside(float(v)):
            low = isinstance(v, (int, float)) and plan.low_bytes is not None and v <= plan.low_bytes
            self._crossed = bool(low and plan.stop)
            self.crossings += 1
            self._wake()

    def describe(self) -> dict[str, str]:
        return {"kind": "host", "description": "a scripted host (testing)"}

    def configure(self, policy: DaemonPolicy) -> str | None:
        self.policy = policy
        return None

    async def start(self, wake: Callable[[], None] | None = None) -> None:
        self._wake = wake
        if self.clock is not None and wake is not None:
            import asyncio

            self._replanned = asyncio.Event()
            self._poller = asyncio.ensure_future(self._poll())
        return None

    async def _poll(self) -> None:
        """Reads ``available`` on the plan's pace, in virtual time (what the real watcher's thread does)."""
        assert self._replanned is not None
        while True:
            plan = self.plan
            v = self._available
            wait = plan.interval(float(v)) if plan is not None and isinstance(v, (int, float)) else None
            if wait is None or self._crossed is not None:
                self._replanned.clear()
                await self._replanned.wait()
                continue
            self._replanned.clear()
            await self.clock.sleep_until(self.clock.now() + wait, self._replanned)
            if self._replanned.is_set():
                continue
            self.fast_checks += 1
            self._check()

    def watch(self, plan: WatchPlan) -> None:
        self.plan = plan
        self._crossed = None
        if self._replanned is not None:
            self._replanned.set()
        self._check()

    def watch_stats(self) -> dict[str, object]:
        return {"mode": "testing", "polls": self.fast_checks, "crossings": self.crossings}

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    def _scope(self) -> ScopeMemory:
        return ScopeMemory("host", self.total, self._available, 0, 0, 0)

    async def sample(self, snapshot: LiveSnapshot) -> Sample:
        self.samples += 1
        workers = {name: WorkerSample(name, lw.pid, self.memory.get(name, 100 * MiB), 1, name in self.protected,
                                      members=((lw.pid, lw.start),))
                   for name, lw in snapshot.workers.items()}
        return Sample(workers)

    def full(self, sample: Sample, events: tuple, now: float) -> Observation:
        self._last = sample
        return Observation(at=now, scope=self._scope(), pressure=self.pressure, workers=sample.workers,
                           events=events, full=True)

    def fast(self, events: tuple, now: float) -> Observation:
        self.fast_reads += 1
        fresh: dict[str, Reading] = {}
        if self._crossed:
            self.fresh_reads += 1
            fresh = {name: self.fresh_memory.get(name, self.memory.get(name, 100 * MiB)) for name in self._last.workers}
        return Observation(at=now, scope=self._scope(), pressure=self.pressure, workers=self._last.workers,
                           events=events, full=False, worker_memory=fresh)


@dataclass
class _Proc:
    worker: str
    incarnation: int
    pid: int
    alive: bool = True
    signals: list[int] = field(default_factory=list)


class FakeEffects:
    """The effects port over pretend processes.

    A ``Spawn`` gets a pid and is reported ``Spawned``; a signal in
    ``dies_on`` ends the process at once (``Exited`` with that signal);
    :meth:`exit` ends one as the test likes (any exit code, signal, kernel
    OOM kill, last lines). Everything carried out is recorded: ``actions``
    (all), ``signals``, ``gates`` (worker -> open), ``reclaims``.
    """

    def __init__(self, dies_on: Iterable[int] = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGKILL),
                 clock: Callable[[], float] | None = None) -> None:
        self.dies_on = set(dies_on)
        self.clock = clock or (lambda: 0.0)  # when exits and spawns happen: pass the daemon's clock
        self.inbox: Any = None
        self.actions: list[Action] = []
        self.signals: list[Signal] = []
        self.gates: dict[str, bool] = {}
        self.reclaims: list[Reclaim] = []
        self.forgotten: set[str] = set()
        self.fail_gates: set[str] = set()  # workers whose admission gate "cannot be written"
        self.procs: dict[str, _Proc] = {}
        self._next_pid = 4000
        self.closed = False

    async def start(self, inbox: Any) -> list[Notice]:
        self.inbox = inbox
        return []

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, str]:
        return {"runtime_dir": "(testing)", "socket": "(testing)"}

    def snapshot(self) -> LiveSnapshot:
        return LiveSnapshot({name: LiveWorker(name, p.incarnation, p.pid, p.pid) for name, p in self.procs.items()
                             if p.alive})

    def execute(self, actions: Iterable[Action], policy: DaemonPolicy, obs: Observation | None = None) -> list[Notice]:
        for a in actions:
            self.actions.append(a)
            if isinstance(a, Spawn):
                self._next_pid += 1
                self.procs[a.worker] = _Proc(a.worker, a.incarnation, self._next_pid)
                self.gates[a.worker] = True
                self.inbox.post(Spawned(a.worker, a.incarnation, self._next_pid, at=self.clock()))
            elif policy.dry_run and not (isinstance(a, Signal) and a.lifecycle):
                if isinstance(a, Signal):
                    self.inbox.post(NotDone(a.worker, a.incarnation, a.pid, "dry run", self.clock()))
                elif isinstance(a, SignalProcess):
                    self.inbox.post(NotDone(None, 0, a.pid, "dry run", self.clock()))
            elif isinstance(a, Signal):
                self.signals.append(a)
                p = self.procs.get(a.worker)
                if p is not None and p.alive and p.pid == a.pid:
                    p.signals.append(a.signum)
                    if a.signum in self.dies_on:
                        self.exit(a.worker, signal=a.signum)
            elif isinstance(a, SetAdmission):
                if a.worker in self.fail_gates:
                    p = self.procs.get(a.worker)
                    self.inbox.post(GateNotSet(a.worker, p.incarnation if p else 0, a.open, "cannot write",
                                               self.clock()))
                else:
                    self.gates[a.worker] = a.open
            elif isinstance(a, Reclaim):
                self.reclaims.append(a)
            elif isinstance(a, SignalProcess):
                pass
        return []

    def forget(self, workers: Iterable[str]) -> None:
        self.forgotten.update(workers)

    def pid(self, worker: str) -> int | None:
        p = self.procs.get(worker)
        return p.pid if p is not None and p.alive else None

    def exit(self, worker: str, *, returncode: int | None = None, signal: int | None = None,
             kernel_oom: bool | None = None, oom_detail: str = "", last_lines: tuple[str, ...] = ()) -> None:
        """End the worker's current process now (reported to the daemon like a reaped child)."""
        p = self.procs[worker]
        if not p.alive:
            return
        p.alive = False
        if returncode is None and signal is None:
            returncode = 0
        self.inbox.post(Exited(worker, p.incarnation, p.pid, at=self.clock(), returncode=returncode, signal=signal,
                               kernel_oom=kernel_oom, oom_detail=oom_detail, last_lines=last_lines))


class RecordingLog:
    """A logger for the reporter that keeps every event: ``events`` is a list of dicts with ``event``
    and ``level`` keys besides the event's fields."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.events.append({"event": event, "level": level, **fields})

    def __getattr__(self, level: str) -> Any:
        if level in ("debug", "info", "warning", "error", "critical"):
            return lambda event, **fields: self._log(level, event, **fields)
        raise AttributeError(level)

    def named(self, event: str, **match: Any) -> list[Mapping[str, Any]]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]
