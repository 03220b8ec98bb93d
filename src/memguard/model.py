"""The values that cross room boundaries: readings in, actions out.

``sense/`` produces an :class:`Observation`; ``decide/`` turns it into
actions; ``act/`` carries the actions out and feeds back what happened
(:class:`Spawned`, :class:`SpawnFailed`, :class:`Exited`) in the next
observation; ``report/`` logs every action with the numbers behind it.

Everything here is an immutable value and knows nothing about the OS.

A reading that could not be taken is :data:`UNKNOWN` (or an
:class:`Unknown` carrying the reason), never a number: it refuses to be
compared, so a forgotten check fails loudly instead of escalating.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from typing import Mapping, Union

__all__ = [
    "Unknown",
    "UNKNOWN",
    "is_known",
    "Reading",
    "ScopeMemory",
    "Pressure",
    "WorkerSample",
    "ProcessSample",
    "GpuDeviceReading",
    "Spawned",
    "SpawnFailed",
    "Exited",
    "TrialEvent",
    "WorkerEvent",
    "Observation",
    "Explanation",
    "Spawn",
    "Signal",
    "SignalProcess",
    "SetAdmission",
    "Reclaim",
    "Notice",
    "Action",
    "SIGKILL",
    "SIGTERM",
    "signal_name",
]

SIGKILL = int(_signal.SIGKILL)
SIGTERM = int(_signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number with no name."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"



class Unknown:
    """A reading that could not be taken. Not a number, not comparable.

    Two unknowns are equal whatever their reasons, so observations that
    differ only in why something is unknown compare equal.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unknown({self.reason!r})" if self.reason else "UNKNOWN"

    def __str__(self) -> str:
        return "unknown"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unknown)

    def __hash__(self) -> int:
        return hash(Unknown)

    def __bool__(self) -> bool:
        raise TypeError("an Unknown reading has no truth value; check is_known() first")

    def _refuse(self, other: object) -> bool:
        raise TypeError("an Unknown reading cannot be compared; check is_known() first")

    __lt__ = __le__ = __gt__ = __ge__ = _refuse


UNKNOWN = Unknown()

Reading = Union[int, float, Unknown]


def is_known(value: object) -> bool:
    return not isinstance(value, Unknown)


# ---------------------------------------------------------------------------
# Observations (sense -> decide)


@dataclass(frozen=True)
class ScopeMemory:
    """Memory of the scope memguard guards: the host, or the cgroup it runs in.

    ``available_bytes`` is what can still be used before the scope is out
    of memory: MemAvailable on a host; limit minus working set (usage less
    inactive file cache, as kubelet computes it) in a cgroup.
    ``oom_kills`` is a counter of kernel OOM kills in the scope
    (``/proc/vmstat`` oom_kill, or the cgroup's own counter).
    """

    kind: str  # "host" | "cgroup"
    total_bytes: Reading
    available_bytes: Reading
    swap_total_bytes: Reading = UNKNOWN
    swap_free_bytes: Reading = UNKNOWN
    oom_kills: Reading = UNKNOWN
    path: str = ""  # the cgroup path in cgroup scope


@dataclass(frozen=True)
class Pressure:
    """PSI memory pressure of the scope, in percent of wall time (0..100)."""

    some_avg10: Reading = UNKNOWN
    some_avg60: Reading = UNKNOWN
    full_avg10: Reading = UNKNOWN
    full_avg60: Reading = UNKNOWN


NO_PRESSURE = Pressure()


@dataclass(frozen=True)
class WorkerSample:
    """One worker's whole process tree, measured once.

    ``memory_bytes`` counts each page once, however many processes of the
    tree map it (PSS summed over the tree, or the worker's cgroup).
    ``protected`` is true when a process of the tree matches ``protect:``.
    """

    worker: str
    pid: int
    memory_bytes: Reading
    processes: int = 1
    protected: bool = False
    source: str = "tree"  # "tree" | "cgroup"
    # GPU memory of the tree's processes (NVML), in total and per device index.
    gpu_memory_bytes: Reading = UNKNOWN
    gpu_per_device: Mapping[str, Reading] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuDeviceReading:
    """One GPU (or MIG device, index "0:1") as read this tick; bytes or Unknown."""

    index: str
    total_bytes: Reading
    used_bytes: Reading
    free_bytes: Reading
    name: str = ""


@dataclass(frozen=True)
class ProcessSample:
    """A process memguard does not own, matched by an ``unmanaged:`` entry (opt-in victims).

    ``start`` is its start time (clock ticks since boot): with the pid it
    identifies the process across ticks, so a reused pid is never mistaken
    for it. ``memory_bytes`` is RssAnon + RssShmem (cheap for many processes).
    """

    pid: int
    start: int
    name: str
    user: str
    memory_bytes: Reading
    priority: int = 0
    matcher: str = ""


@dataclass(frozen=True)
class Spawned:
    worker: str
    incarnation: int
    pid: int
    at: float


@dataclass(frozen=True)
class SpawnFailed:
    worker: str
    incarnation: int
    error: str
    at: float


@dataclass(frozen=True)
class Exited:
    """A worker's main process ended and was reaped.

    Exactly one of ``returncode`` and ``signal`` is set. ``kernel_oom`` is
    True when the worker's own cgroup counted a kernel OOM kill, None when
    that cannot be known (no per-worker cgroup).
    """

    worker: str
    incarnation: int
    pid: int
    at: float
    returncode: int | None = None
    signal: int | None = None
    kernel_oom: bool | None = None
    last_lines: tuple[str, ...] = ()
    leftovers: int = 0  # processes of its tree still alive at its exit, killed then
    oom_detail: str = ""  # e.g. "at its cgroup limit 256MiB"


@dataclass(frozen=True)
class TrialEvent:
    """What a worker's client told memguard over the control socket.

    ``kind``: ``start`` (a trial began; ``name`` optional), ``end`` (it
    ended; ``ok`` False for a failure), ``heartbeat`` (a long trial is alive),
    ``refused`` (a trial had to wait: admission was closed), ``reclaimed``
    (the worker ran its reclaim callbacks).
    """

    worker: str
    incarnation: int
    kind: str
    at: float
    name: str | None = None
    ok: bool | None = None
    detail: str = ""


WorkerEvent = Union[Spawned, SpawnFailed, Exited, TrialEvent]


@dataclass(frozen=True)
class Observation:
    """Everything one tick knows about the machine.

    ``full`` is False on a fast-path tick, which re-reads only the scope's
    memory; ``workers`` then holds the last full tick's samples.
    """

    at: float
    scope: ScopeMemory
    pressure: Pressure = NO_PRESSURE
    workers: Mapping[str, WorkerSample] = field(default_factory=dict)
    events: tuple[WorkerEvent, ...] = ()
    full: bool = True
    unmanaged: tuple[ProcessSample, ...] = ()
    gpus: tuple[GpuDeviceReading, ...] = ()


# ---------------------------------------------------------------------------
# Actions (decide -> act, report)


@dataclass(frozen=True)
class Explanation:
    """Why a rule fired: which rule, which reading, which threshold.

    ``value`` and ``threshold`` are in the signal's base unit (bytes,
    seconds, percent); ``display`` is the sentence a person reads.
    """

    rule: str
    when: str
    signal: str
    value: float | None
    threshold: float | None
    unit: str
    display: str
    source: str = ""


@dataclass(frozen=True)
class Spawn:
    worker: str
    workload: str
    incarnation: int
    reason: str
    event: str = "spawn"


@dataclass(frozen=True)
class Signal:
    """Send ``signum`` to the worker's process group (and its recorded tree).

    ``pid`` and ``incarnation`` identify the exact process the decision was
    about; the actor refuses if that process is gone or was replaced.
    """

    worker: str
    workload: str
    pid: int
    incarnation: int
    signum: int
    event: str  # "terminate" | "kill" | "restart" | "stop" | "escalate"
    reason: str
    explain: Explanation | None = None


@dataclass(frozen=True)
class SetAdmission:
    """Open or close the admission gate of one worker (new trials wait)."""

    worker: str
    workload: str
    open: bool
    event: str  # "block" | "release"
    reason: str
    explain: Explanation | None = None


@dataclass(frozen=True)
class Notice:
    """A decision with nothing to carry out: only reported (warn, exit, failed...)."""

    event: str
    level: str = "info"  # debug | info | warning | error
    worker: str | None = None
    workload: str | None = None
    pid: int | None = None
    reason: str = ""
    explain: Explanation | None = None
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Reclaim:
    """Ask the worker's client to give memory back (its on_reclaim callbacks)."""

    worker: str
    workload: str
    pid: int
    incarnation: int
    reason: str
    explain: Explanation | None = None
    event: str = "reclaim"


@dataclass(frozen=True)
class SignalProcess:
    """Signal a process memguard does not own (an opt-in unmanaged victim), by pid and start time."""

    pid: int
    start: int
    name: str
    signum: int
    event: str  # "terminate" | "kill" | "escalate"
    reason: str
    explain: Explanation | None = None


Action = Union[Spawn, Signal, SignalProcess, SetAdmission, Reclaim, Notice]
