"""Builders for driving the decision core in virtual time (no processes, no clock)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace

from memguard.decide.core import step
from memguard.decide.state import CoreState
from memguard.expr import parse_expr
from memguard.model import (
    Exited,
    Reconcile,
    Observation,
    Pressure,
    ScopeMemory,
    Signal,
    Spawn,
    Spawned,
    UNKNOWN,
    WorkerSample,
)
from memguard.policy import ActionKind, DaemonPolicy, Limits, RestartPolicy, Rule, WorkloadPolicy

GiB = 1024**3
MiB = 1024**2


def rule(when: str, action: str, scope: str = "worker", *, for_s: float = 0.0, release: str | None = None,
         grace_s: float | None = None, name: str | None = None) -> Rule:
    return Rule(
        name=name or f"{action}:{when}",
        when=parse_expr(when, scope),
        when_text=when,
        action=ActionKind(action),
        scope=scope,
        for_s=for_s,
        release=parse_expr(release, scope) if release else None,
        release_text=release,
        grace_s=grace_s,
    )


def workload(name: str = "w", replicas: int = 1, *, rules: tuple[Rule, ...] = (), memory: int | None = GiB,
             priority: int = 0, grace_s: float = 10.0, restart: RestartPolicy | None = None,
             runtime_s: float | None = None, **extra: object) -> WorkloadPolicy:
    return WorkloadPolicy(
        name=name,
        command=("python3", "worker.py"),
        replicas=replicas,
        priority=priority,
        limits=Limits(memory_bytes=memory, runtime_s=runtime_s),
        rules=rules,
        grace_s=grace_s,
        restart=restart or RestartPolicy(),
        **extra,
    )


def daemon(*workloads: WorkloadPolicy, rules: tuple[Rule, ...] = (), post_action_delay_s: float = 5.0,
           dry_run: bool = False) -> DaemonPolicy:
    return DaemonPolicy(workloads=tuple(workloads), rules=rules, post_action_delay_s=post_action_delay_s,
                        dry_run=dry_run)


def scope(available: int | object = 20 * GiB, total: int = 24 * GiB, oom_kills: int | object = 0) -> ScopeMemory:
    return ScopeMemory(kind="host", total_bytes=total, available_bytes=available, swap_total_bytes=0,
                       swap_free_bytes=0, oom_kills=oom_kills)


@dataclass
class Sim:
    """A tiny in-memory actor: assigns pids, remembers what the core asked for."""

    policy: DaemonPolicy
    now: float = 0.0
    state: CoreState = field(default_factory=CoreState)
    next_pid: int = 1000
    pids: dict[str, int] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    log: list = field(default_factory=list)  # (time, action)
    memory: dict[str, object] = field(default_factory=dict)
    protected: set[str] = field(default_factory=set)
    available: object = 20 * GiB
    oom_kills: object = 0

    def start(self) -> list:
        """The daemon's first tick: the policy is applied (Reconcile "start")."""
        return self.command(Reconcile("start"))

    def command(self, cmd: object) -> list:
        """Pass a command (Reconcile, Shutdown, Operator) to the core in a step at the current time."""
        self.pending.append(cmd)
        return self.tick(0.0)

    def _absorb(self, actions: list) -> None:
        for a in actions:
            self.log.append((self.now, a))
            if isinstance(a, Spawn):
                self.next_pid += 1
                self.pids[a.worker] = self.next_pid
                self.incarnations[a.worker] = a.incarnation
                self.pending.append(Spawned(a.worker, a.incarnation, self.next_pid, self.now))

    def exit(self, worker: str, *, returncode: int | None = None, sig: int | None = None,
             kernel_oom: bool | None = None) -> None:
        self.pending.append(Exited(worker, self.incarnations[worker], self.pids[worker], self.now,
                                   returncode=returncode, signal=sig, kernel_oom=kernel_oom))

    def trial(self, worker: str, kind: str, name: str | None = None, ok: bool | None = None) -> None:
        from memguard.model import TrialEvent

        self.pending.append(TrialEvent(worker, self.incarnations[worker], kind, self.now, name=name, ok=ok))

    def observe(self) -> Observation:
        workers = {
            name: WorkerSample(worker=name, pid=pid, memory_bytes=self.memory.get(name, 100 * MiB),
                               protected=name in self.protected)
            for name, pid in self.pids.items()
        }
        obs = Observation(at=self.now, scope=scope(self.available, oom_kills=self.oom_kills),
                          pressure=Pressure(), workers=workers, events=tuple(self.pending))
        self.pending = []
        return obs

    def tick(self, dt: float = 0.0) -> list:
        self.now += dt
        self.state, actions = step(self.state, self.observe(), self.policy, self.now)
        self._absorb(actions)
        return actions

    def run(self, seconds: float, dt: float = 0.1) -> list:
        out = []
        steps = int(round(seconds / dt))
        for _ in range(steps):
            out.extend(self.tick(dt))
        return out


def signals(actions: list) -> list[Signal]:
    return [a for a in actions if isinstance(a, Signal)]


def names(actions: list) -> list[str]:
    return [getattr(a, "event", type(a).__name__) for a in actions]


SIGTERM = int(signal.SIGTERM)
SIGKILL = int(signal.SIGKILL)
UNKNOWN_READING = UNKNOWN
__all__ = ["rule", "workload", "daemon", "scope", "Sim", "signals", "names", "GiB", "MiB", "SIGTERM", "SIGKILL",
           "replace"]
