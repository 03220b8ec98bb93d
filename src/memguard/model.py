"""The values that cross room boundaries: readings in, actions out.

``sense/`` produces an :class:`Observation`; ``decide/`` turns it into
actions; ``act/`` carries the actions out and feeds back what happened
(:class:`Spawned`, :class:`SpawnFailed`, :class:`Exited`, :class:`TrialEvent`)
in the next observation; ``report/`` logs every action with the numbers
behind it. What the daemon itself is asked to do (apply the configuration,
shut down, an operator's stop/start/restart) reaches the core the same way,
as a command among the observation's events: nothing steps the core
outside the tick.

``act/`` hands ``sense/`` a :class:`LiveSnapshot` (which processes are
alive, which tree members are known) taken on the event loop, so the
threads that read ``/proc`` never touch an object the loop owns.

Everything here is an immutable value and knows nothing about the OS.

A reading that could not be taken is :data:`UNKNOWN` (or an
:class:`Unknown` carrying the reason), never a number: it refuses to be
compared, so a forgotten check fails loudly instead of escalating.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Union

if TYPE_CHECKING:
    from .policy import WorkloadPolicy

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
    "NotDone",
    "GateNotSet",
    "Progress",
    "Joined",
    "AdmitRequest",
    "AdmitCancel",
    "ProtectedProcess",
    "Adoptable",
    "Reconcile",
    "Shutdown",
    "Operator",
    "Command",
    "Event",
    "LiveWorker",
    "LiveSnapshot",
    "Observation",
    "WatchPlan",
    "Explanation",
    "Spawn",
    "Signal",
    "SignalProcess",
    "SetAdmission",
    "Reclaim",
    "Notice",
    "Admit",
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
#: A worker sample's ``io_bytes`` when no rule reads the worker's I/O (``worker.idle``, ``worker.quiet``): the
#: counters were not read, which is not a failure to read them (compared by identity).
IO_NOT_READ = Unknown("no rule reads the worker's I/O counters: not read")

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
    """PSI memory pressure of the scope, in percent of wall time (0..100).

    ``some_total_s`` / ``full_total_s``: the kernel's ever-growing stall
    counters (``total=``, microseconds in the file), in seconds: the
    ``_seconds_total`` counters of the metrics, never read by rules.
    """

    some_avg10: Reading = UNKNOWN
    some_avg60: Reading = UNKNOWN
    full_avg10: Reading = UNKNOWN
    full_avg60: Reading = UNKNOWN
    some_total_s: Reading = UNKNOWN
    full_total_s: Reading = UNKNOWN
    # memguard's own short averages, from the kernel's total stall time over about the last second (the
    # kernel's shortest average is over 10 s): they follow a thrash within seconds.
    some_avg1: Reading = UNKNOWN
    full_avg1: Reading = UNKNOWN


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
    # (pid, start time) of every live process of the tree found by this sample, main process first:
    # act/ records them so a kill reaches descendants that left the process group.
    members: tuple[tuple[int, int], ...] = ()
    # Progress counters over the tree's live processes: CPU time (user + system, with that of reaped
    # children), in seconds, and bytes read and written through system calls (rchar + wchar of
    # /proc/<pid>/io: files, pipes, sockets). Counters: the core looks at how they move.
    cpu_seconds: Reading = UNKNOWN
    io_bytes: Reading = UNKNOWN


@dataclass(frozen=True)
class GpuDeviceReading:
    """One GPU (or MIG device, index "0:1") as read this tick; bytes or Unknown."""

    index: str
    total_bytes: Reading
    used_bytes: Reading
    free_bytes: Reading
    name: str = ""
    uuid: str = ""  # "GPU-..." / "MIG-..."; "" when NVML gave none


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


@dataclass(frozen=True)
class NotDone:
    """The actor did not carry out a signal the core decided: dry run, or the process turned out to be
    protected (or its pid taken by another process) at the moment of acting. The core then stops
    waiting for an exit that will not come. ``worker`` is None for an unmanaged process."""

    worker: str | None
    incarnation: int
    pid: int
    reason: str
    at: float


@dataclass(frozen=True)
class GateNotSet:
    """The actor could not write a worker's admission gate (``open`` is what was asked): the gate still
    says the opposite, and the core must believe the file, not its wish."""

    worker: str
    incarnation: int
    open: bool
    reason: str
    at: float


@dataclass(frozen=True)
class Progress:
    """A sign of life of a worker that its counters do not show: a line of output (sent at most once
    a second per worker)."""

    worker: str
    incarnation: int
    kind: str  # "output"
    at: float


@dataclass(frozen=True)
class Joined:
    """A process memguard did not start joined as an **ad-hoc worker**: a job started with ``memguard run``
    next to the daemon, or a process matched by an ``unmanaged:`` entry with rules. memguard watches it
    (pidfd), measures its tree, ranks it as a victim and names it in events, but never restarts it.
    ``ticket`` is the admission ticket it was started under, if any (its promised memory)."""

    worker: str
    policy: "WorkloadPolicy"
    pid: int
    start: int
    at: float
    ticket: str | None = None
    origin: str = "run"  # "run" | "unmanaged"


@dataclass(frozen=True)
class AdmitRequest:
    """A job asks to start once ``need_bytes`` are available and not promised to an earlier job
    (``memguard run --wait-free``); ``wait`` False: answer now (``--require-free``)."""

    ticket: str
    need_bytes: int
    name: str
    at: float
    wait: bool = True


@dataclass(frozen=True)
class AdmitCancel:
    """The job behind an admission ticket gave up or ended before joining: its place or promise goes."""

    ticket: str
    at: float
    reason: str = ""


WorkerEvent = Union[Spawned, SpawnFailed, Exited, TrialEvent]


@dataclass(frozen=True)
class Reconcile:
    """Apply the policy passed with this step: at start (``reason`` "start") and after a reload
    that parsed ("reload"). New slots start, removed ones stop, changed ones restart."""

    reason: str


@dataclass(frozen=True)
class Shutdown:
    """Stop every worker for good (SIGTERM/SIGINT to the daemon, or a one-shot job that ended)."""

    reason: str


@dataclass(frozen=True)
class Operator:
    """An administrator asked, over the control socket, to ``stop``, ``start`` or ``restart`` a worker."""

    op: str
    worker: str


Command = Union[Reconcile, Shutdown, Operator]
Event = Union[Spawned, SpawnFailed, Exited, TrialEvent, NotDone, GateNotSet, Reconcile, Shutdown, Operator, Progress,
              Joined, AdmitRequest, AdmitCancel]


@dataclass(frozen=True)
class LiveWorker:
    """One running worker incarnation as ``act/`` knows it, for ``sense/`` to measure.

    ``members`` are the descendants recorded so far (pid, start time): a
    walk from ``pid`` cannot find one that was reparented after its parent
    died. ``cgroup`` is the incarnation's own cgroup directory, if any.
    """

    name: str
    incarnation: int
    pid: int
    start: int
    members: tuple[tuple[int, int], ...] = ()
    cgroup: str | None = None


@dataclass(frozen=True)
class LiveSnapshot:
    """What is alive, taken on the event loop; immutable, so reader threads may use it freely.

    ``own`` holds memguard's own helper processes (the sentinel), which are
    never a victim nor anyone's tree member.
    """

    workers: Mapping[str, LiveWorker] = field(default_factory=dict)
    own: frozenset[int] = frozenset()
    instance: str = ""  # MEMGUARD_INSTANCE in every worker's environment: how adopted orphans are attributed


@dataclass(frozen=True)
class ProtectedProcess:
    """A process that matches ``protect:``, with its OOM score adjustment as read (None: unreadable)."""

    pid: int
    start: int
    name: str
    oom_score_adj: int | None


@dataclass(frozen=True)
class Adoptable:
    """A process matched by an ``unmanaged:`` entry that has rules: the actor adopts it as an ad-hoc worker.
    ``entry`` is the entry's index in the policy's ``unmanaged`` list."""

    pid: int
    start: int
    name: str
    entry: int


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
    events: tuple[Event, ...] = ()
    full: bool = True
    unmanaged: tuple[ProcessSample, ...] = ()
    gpus: tuple[GpuDeviceReading, ...] = ()
    # Orphans memguard adopted (it is a child subreaper) that belong to no running worker: ``strays``
    # (pid, start, worker, incarnation) carry the marker of an incarnation that has exited (the actor kills
    # them: a worker's processes die with it); ``unattributed`` (pid, start) carry no marker of this
    # memguard (watched, killed when memguard stops).
    strays: tuple[tuple[int, int, str, int], ...] = ()
    unattributed: tuple[tuple[int, int], ...] = ()
    # Processes matching ``protect:`` (scanned every few full ticks; empty on the others): the actor gives
    # them the lowest OOM score it may set. ``adoptable``: see :class:`Adoptable`.
    protected: tuple[ProtectedProcess, ...] = ()
    adoptable: tuple[Adoptable, ...] = ()
    # Each worker's memory re-read at this very tick (a fast tick that crossed a threshold whose rule stops a
    # victim): the victim is ranked on these figures, not on the last full tick's. Empty on other ticks.
    worker_memory: Mapping[str, Reading] = field(default_factory=dict)
    # The scope's available memory as the watcher read it between the last tick and this one, as (time,
    # bytes), oldest first: the fill rate (``within:``, ``memory.fill_rate``) is built from them too.
    readings: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class WatchPlan:
    """What the observer watches between two ticks, precomputed (decide/pacing) from the last one.

    A band around the scope's available memory, in bytes: a reading at or
    below ``low_bytes`` (a memory threshold of a rule that could fire) or at
    or above ``high_bytes`` (a rule in force that could release, a pending
    rule that could stop holding) makes a tick; inside the band nothing is
    built and nothing is decided. None: no bound on that side.

    ``stop``: crossing ``low_bytes`` can fire a rule that chooses a victim,
    so that tick re-reads each worker's memory first (the victim is ranked
    on figures of the moment of acting). ``psi``: PSI triggers to arm, as
    (``"some"``/``"full"``, stall microseconds, window microseconds): a stall
    that could lead to a PSI rule firing wakes the daemon.

    Polling pace where no kernel notification watches the band: the
    headroom above ``low_bytes`` over ``max_fill_rate_bytes_per_s`` (a hog
    filling memory that fast cannot cross unseen), within
    [``min_interval_s``, ``max_interval_s``]; where the kernel notifies a
    crossing, only every ``max_interval_s`` (a backstop for what the kernel
    does not count, e.g. cached file pages becoming active), or every
    ``backstop_s`` where nothing can escape it (no cache to speak of).
    """

    low_bytes: float | None = None
    high_bytes: float | None = None
    stop: bool = False
    psi: tuple[tuple[str, int, int], ...] = ()
    max_fill_rate_bytes_per_s: float = 6000.0 * 1024 * 1024
    min_interval_s: float = 0.001
    max_interval_s: float = 1.0
    backstop_s: float = 10.0
    # Rules on the trend (``within``) that could fire: (threshold in available bytes, horizon in seconds).
    # The watcher keeps the rate of its own readings and wakes the daemon when a reading moved that far
    # along it is at or below the threshold; with any, it polls (a kernel threshold knows no rate).
    trends: tuple[tuple[float, float], ...] = ()

    def outside(self, available: float) -> bool:
        """Does this reading call for a tick?"""
        return ((self.low_bytes is not None and available <= self.low_bytes)
                or (self.high_bytes is not None and available >= self.high_bytes))

    def trend_crossed(self, available: float, fill_rate: float | None) -> bool:
        """Will a trend rule's threshold be reached within its horizon at ``fill_rate`` (bytes/s falling)?"""
        if fill_rate is None or fill_rate <= 0:
            return False
        return any(available - fill_rate * within <= t for t, within in self.trends)

    def interval(self, available: float | None, fill_rate: float | None = None) -> float | None:
        """Seconds until the next read by polling; None when there is nothing to watch."""
        if self.low_bytes is None:
            return None if self.high_bytes is None else self.max_interval_s
        if available is None:
            return self.min_interval_s
        room = available - self.low_bytes
        if self.trends and fill_rate is not None and fill_rate > 0:  # a trend rule fires that much earlier
            room = min([room] + [available - fill_rate * within - t for t, within in self.trends])
        wait = room / self.max_fill_rate_bytes_per_s
        return max(self.min_interval_s, min(wait, self.max_interval_s))


# ---------------------------------------------------------------------------
# Actions (decide -> act, report)


@dataclass(frozen=True)
class Ranked:
    """One candidate of a system rule, as the core ranked it (its memory as the decision read it)."""

    worker: str
    pid: int | None
    priority: int
    memory_bytes: int | None
    gpu_memory_bytes: int | None = None


@dataclass(frozen=True)
class Explanation:
    """Why a rule fired: which rule, which reading, which threshold.

    ``value`` and ``threshold`` are in the signal's base unit (bytes,
    seconds, percent); ``display`` is the sentence a person reads.
    ``gpu_device`` names the GPU whose reading decided (``"0"``, ``"0:1"``
    for a MIG device, ``"*"`` for a rule on any device), None for every
    other signal: victim choice under GPU pressure reads it, never the text.
    ``ranking``: for a system rule that chose a victim, the workers it chose
    among, in the victim order the core used (the first few); empty for a
    worker's own rule, where nobody else was a candidate.
    """

    rule: str
    when: str
    signal: str
    value: float | None
    threshold: float | None
    unit: str
    display: str
    source: str = ""
    gpu_device: str | None = None
    ranking: tuple[Ranked, ...] = ()


@dataclass(frozen=True)
class Spawn:
    """Start incarnation ``incarnation`` of a worker slot; ``restart`` is False for its first start."""

    worker: str
    workload: str
    incarnation: int
    reason: str
    event: str = "spawn"
    restart: bool = False


@dataclass(frozen=True)
class Signal:
    """Send ``signum`` to the worker's process group (and its recorded tree).

    ``pid`` and ``incarnation`` identify the exact process the decision was
    about; the actor refuses if that process is gone or was replaced.
    ``lifecycle`` is True for a stop someone asked for (shutdown, an
    operator, a reload that removed or changed the worker): carried out
    even in dry run, which only holds back what rules and limits decide.
    """

    worker: str
    workload: str
    pid: int
    incarnation: int
    signum: int
    event: str  # "terminate" | "kill" | "restart" | "stop" | "escalate"
    reason: str
    explain: Explanation | None = None
    lifecycle: bool = False


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


@dataclass(frozen=True)
class Admit(Notice):
    """The answer to an admission request (reported like any notice): ``granted`` or not, with the
    figures it was decided on. The actor hands it to the job waiting on ``ticket``."""

    ticket: str = ""
    granted: bool = False
    available_bytes: float | None = None
    promised_bytes: float = 0.0
    waited_s: float = 0.0


Action = Union[Spawn, Signal, SignalProcess, SetAdmission, Reclaim, Notice]
