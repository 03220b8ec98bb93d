"""The decision core's memory: frozen values, replaced (never mutated) by each step.

Theory of operation
-------------------
Each worker slot (``trials-0``, ``trials-1``, ...) walks one small state
machine. The core asks for a process (``Spawn``); the actor reports it
(``Spawned`` or ``SpawnFailed``); rules or the operator ask it to stop
(``Signal``: the stop signal, then SIGKILL once the grace period is over);
the actor reports the exit (``Exited``), and the restart policy and budget
decide what comes next. Every transition the core makes is listed in
:data:`TRANSITIONS`; :func:`check_transition` refuses any other, so a new
code path cannot invent one silently.

    pending --spawn--> starting --spawned--> running --stop--> stopping
       ^                  |                    |                  |
       |             spawn_failed            exited             exited
       |                  v                    v                  v
       +-----backoff---- (restart policy and budget) --> stopped | failed

A stop the actor could not carry out (dry run; a process found protected
at the last moment) comes back as ``NotDone`` and returns the worker from
``stopping`` to ``running``: nothing waits for an exit that will not come.

Two budgets decide what follows an exit. A failure (a crash, a kernel OOM
kill, a spawn that failed, a stop by a rule) spends ``restart.budget``, and
past it the slot is ``failed``. A planned restart (recycling, the brake,
``limits.runtime``, an operator, a reload, a clean exit under ``always``)
is counted in ``restart.planned`` instead and never fails the slot: when
that window is full, the next recycle or brake restart waits for room.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from ..model import Explanation, Reading, UNKNOWN, WorkerSample
from ..policy import RuleKey, WorkloadPolicy

__all__ = [
    "Phase",
    "TRANSITIONS",
    "check_transition",
    "RuleState",
    "StopState",
    "Incarnation",
    "WorkerState",
    "CoreState",
    "ProcessStop",
    "Ticket",
    "Promise",
]


class Phase(str, Enum):
    PENDING = "pending"  # waiting to be started (first start, or backoff before a restart)
    STARTING = "starting"  # Spawn asked for, not yet confirmed
    RUNNING = "running"
    STOPPING = "stopping"  # stop signal sent; SIGKILL when the grace period ends
    STOPPED = "stopped"  # finished on its own, stopped by the operator, or shut down
    FAILED = "failed"  # restart budget spent; stays so until reload or an operator start


# (from, to): what causes it. The only moves the core may make.
TRANSITIONS: dict[tuple[Phase, Phase], str] = {
    (Phase.PENDING, Phase.STARTING): "spawn time reached",
    (Phase.PENDING, Phase.STOPPED): "shutdown or operator stop before it started",
    (Phase.STARTING, Phase.RUNNING): "Spawned",
    (Phase.STARTING, Phase.PENDING): "SpawnFailed, restart after backoff",
    (Phase.STARTING, Phase.FAILED): "SpawnFailed past the restart budget",
    (Phase.STARTING, Phase.STOPPED): "SpawnFailed during shutdown",
    (Phase.STARTING, Phase.STOPPING): "Spawned during shutdown or after an operator stop",
    (Phase.RUNNING, Phase.STOPPING): "a rule, the runtime limit, a reload, the operator, or shutdown",
    (Phase.RUNNING, Phase.PENDING): "exited on its own; the restart policy restarts it",
    (Phase.RUNNING, Phase.STOPPED): "exited on its own; the restart policy does not restart it",
    (Phase.RUNNING, Phase.FAILED): "exited on its own past the restart budget",
    (Phase.STOPPING, Phase.PENDING): "stopped by memguard; restart (at once or after backoff)",
    (Phase.STOPPING, Phase.RUNNING): "the stop was not carried out (dry run, or protected at the last moment)",
    (Phase.STOPPING, Phase.STOPPED): "stopped for good (shutdown, operator, removed from config)",
    (Phase.STOPPING, Phase.FAILED): "stopped by a rule (a failure) past the restart budget",
    (Phase.STOPPED, Phase.PENDING): "operator start or reload",
    (Phase.FAILED, Phase.PENDING): "operator start or reload",
}


def check_transition(old: Phase, new: Phase) -> None:
    if old != new and (old, new) not in TRANSITIONS:
        raise AssertionError(f"illegal worker transition {old.value} -> {new.value}")


@dataclass(frozen=True)
class RuleState:
    """One rule against one subject (the scope, or one worker incarnation).

    ``pending_since``: when the condition was first seen true (for ``for:``).
    ``active``: a level action (block, warn) is in force until release.
    ``quiet_until``: no re-fire before then (a stop rule that found no victim,
    a reclaim waiting for its interval).
    """

    pending_since: float | None = None
    active: bool = False
    quiet_until: float = 0.0
    explain: Explanation | None = None


@dataclass(frozen=True)
class StopState:
    """A stop in progress: why, what to do after the exit, when to SIGKILL."""

    event: str  # terminate | kill | restart | stop
    reason: str  # rule | runtime | shutdown | operator | reload | removed | stuck | brake | recycle
    then: str  # "restart" (at once) | "policy" (restart policy) | "stay" | "remove"
    requested_at: float
    kill_at: float | None  # when SIGKILL is due; None once it was sent
    severity: int
    rule: str | None = None
    explain: Explanation | None = None
    system: bool = False  # chosen as a victim by a system rule
    rule_key: RuleKey | None = None  # the worker rule that asked for it (quieted if it was not carried out)
    # A planned restart (recycle, brake, runtime, operator, reload): counted apart from failures.
    planned: bool = False


@dataclass(frozen=True)
class Incarnation:
    """Everything that belongs to one start of a worker slot, replaced whole at the next start.

    A new field added here is reset at every restart by construction: no
    code path has to remember to clear it.
    """

    number: int = 0
    pid: int | None = None
    started_at: float | None = None
    stop: StopState | None = None
    admission_open: bool = True
    rules: Mapping[RuleKey, RuleState] = field(default_factory=dict)
    memory: Reading = UNKNOWN
    sample: WorkerSample | None = None
    # Trials, as the worker's client reports them.
    trials: int = 0
    trial_started_at: float | None = None  # None: no trial running
    trial_name: str | None = None
    last_heartbeat: float | None = None
    refusals: int = 0  # consecutive trials that had to wait
    blocked_since: float | None = None  # admission closed since
    history: tuple[tuple[float, float], ...] = ()  # (time, memory bytes) within the growth window
    draining_since: float | None = None  # gate closed for a restart at the next trial boundary
    drain_explain: Explanation | None = None
    gate_retry_at: float = 0.0  # the gate file could not be written: no new try before then
    last_trial_end: float | None = None  # when the last trial ended (a wait at the gate starts then)
    # The brake (restart_when_blocked), one round per closing of the gate by the worker's own memory:
    brake_asked_at: float | None = None  # the reclaim it asked for
    brake_memory: Reading = UNKNOWN  # the worker's memory when it asked
    reclaimed_at: float | None = None  # the worker's answer: its reclaim callbacks are done
    fulls_since_reclaimed: int = 0  # full readings since that answer; the second one was taken after it
    brake_verdict: Explanation | None = None  # the evidence says restart: done at the next trial boundary
    # No recycle or brake restart before then: a stop that was not carried out (dry run), or no room
    # left among the planned restarts (restart.planned).
    planned_wait_until: float = 0.0
    planned_waiting: bool = False  # a planned restart waits for room in restart.planned (said once)
    # Progress (decide.progress): (time, CPU seconds) of recent full samples; the last I/O counter; when the
    # worker last used CPU or did I/O, last did I/O, last wrote a line of output.
    cpu_history: tuple[tuple[float, float], ...] = ()
    io_bytes: Reading = UNKNOWN
    active_at: float | None = None
    io_at: float | None = None
    output_at: float | None = None
    progress_known: bool = True  # False once a sample could not read the CPU or I/O counters


@dataclass(frozen=True)
class WorkerState:
    """One worker slot: its phase, restart bookkeeping, and the current :class:`Incarnation`.

    The incarnation's fields read through (``w.pid``, ``w.memory``...);
    they change only by replacing ``inc``.
    """

    name: str
    workload: str
    replica: int
    phase: Phase = Phase.PENDING
    spawn_at: float = 0.0
    backoff_s: float = 0.0  # the next backoff; 0 = the policy minimum
    restarts: tuple[float, ...] = ()  # when each restart after a failure was decided (restart.budget window)
    planned: tuple[float, ...] = ()  # when each planned restart was decided (restart.planned window)
    spec: tuple = ()  # WorkloadPolicy.spec_key() the current incarnation was started with
    last_exit: str = ""
    inc: Incarnation = field(default_factory=Incarnation)
    # An ad-hoc worker (decide.adhoc): a process memguard did not start, joined with this policy. It is
    # watched, ranked and named like any worker, never restarted, and leaves when its process ends.
    adhoc: WorkloadPolicy | None = None

    @property
    def incarnation(self) -> int:
        return self.inc.number

    pid = property(lambda self: self.inc.pid)
    started_at = property(lambda self: self.inc.started_at)
    stop = property(lambda self: self.inc.stop)
    admission_open = property(lambda self: self.inc.admission_open)
    rules = property(lambda self: self.inc.rules)
    memory = property(lambda self: self.inc.memory)
    sample = property(lambda self: self.inc.sample)
    trials = property(lambda self: self.inc.trials)
    trial_started_at = property(lambda self: self.inc.trial_started_at)
    trial_name = property(lambda self: self.inc.trial_name)
    last_heartbeat = property(lambda self: self.inc.last_heartbeat)
    refusals = property(lambda self: self.inc.refusals)
    blocked_since = property(lambda self: self.inc.blocked_since)
    history = property(lambda self: self.inc.history)
    draining_since = property(lambda self: self.inc.draining_since)
    drain_explain = property(lambda self: self.inc.drain_explain)
    gate_retry_at = property(lambda self: self.inc.gate_retry_at)
    last_trial_end = property(lambda self: self.inc.last_trial_end)
    brake_asked_at = property(lambda self: self.inc.brake_asked_at)
    brake_memory = property(lambda self: self.inc.brake_memory)
    reclaimed_at = property(lambda self: self.inc.reclaimed_at)
    fulls_since_reclaimed = property(lambda self: self.inc.fulls_since_reclaimed)
    brake_verdict = property(lambda self: self.inc.brake_verdict)
    planned_wait_until = property(lambda self: self.inc.planned_wait_until)
    cpu_history = property(lambda self: self.inc.cpu_history)
    active_at = property(lambda self: self.inc.active_at)
    io_at = property(lambda self: self.inc.io_at)
    output_at = property(lambda self: self.inc.output_at)


@dataclass(frozen=True)
class ProcessStop:
    """A stop in progress of an unmanaged process (an opt-in victim of a system rule)."""

    pid: int
    start: int
    name: str
    requested_at: float
    kill_at: float | None
    severity: int
    explain: Explanation | None = None


@dataclass(frozen=True)
class Ticket:
    """A job waiting to be admitted (``memguard run --wait-free``), in arrival order."""

    ticket: str
    need_bytes: int
    name: str
    since: float


@dataclass(frozen=True)
class Promise:
    """Memory promised to an admitted job: held back from later jobs until the job has grown into it
    (its worker's memory), or has ended. ``worker`` once it joined."""

    ticket: str
    need_bytes: int
    name: str
    at: float
    worker: str | None = None


@dataclass(frozen=True)
class CoreState:
    workers: Mapping[str, WorkerState] = field(default_factory=dict)
    system_rules: Mapping[RuleKey, RuleState] = field(default_factory=dict)
    # The last victim of a system rule and the post-action delay (invariant 3).
    victim: tuple[str, int] | None = None
    victim_severity: int = -1
    delay_until: float = 0.0
    shutting_down: bool = False
    oom_kills: Reading = UNKNOWN
    process_stop: ProcessStop | None = None
    # (time, available bytes) of the scope's recent readings, fast and full (decide.trend).
    trend: tuple[tuple[float, float], ...] = ()
    # Jobs waiting for memory, first come first served, and memory promised to admitted ones (decide.adhoc).
    queue: tuple[Ticket, ...] = ()
    promises: Mapping[str, Promise] = field(default_factory=dict)


_INIT_FIELDS: dict[type, frozenset[str]] = {}


def evolve(obj: Any, /, **changes: Any) -> Any:
    """``dataclasses.replace`` for the core's frozen dataclasses, without running ``__init__`` again.

    The core replaces a few fields of each worker's state several times per tick: with 200 workers that is
    over a thousand copies a full tick, and ``dataclasses.replace`` (which rebuilds every field through
    ``__init__``) was a third of a full tick's step. These classes have no ``__post_init__`` and no
    ``__slots__``: a copy of the instance dictionary with the changes applied is the same object. Unknown
    fields are refused as ``replace`` refuses them.
    """
    cls = type(obj)
    names = _INIT_FIELDS.get(cls)
    if names is None:
        if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__") or not hasattr(obj, "__dict__"):
            return dataclasses.replace(obj, **changes)
        names = _INIT_FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    for key in changes:
        if key not in names:
            raise TypeError(f"{cls.__name__} has no field {key!r} to replace")
    new = object.__new__(cls)
    d = new.__dict__
    d.update(obj.__dict__)
    d.update(changes)
    return new
