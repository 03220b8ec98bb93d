"""Frozen policy objects: what ``config.py`` builds from YAML and ``decide/`` obeys.

Every default carries its unit in its name and its reason in a comment,
and docs/policy.md repeats them for users.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from .expr import Expr

__all__ = [
    "ActionKind",
    "RuleKind",
    "RuleKey",
    "Rule",
    "RestartPolicy",
    "Limits",
    "Brake",
    "Recycle",
    "WorkloadPolicy",
    "UnmanagedMatch",
    "DaemonPolicy",
    "AlertHook",
    "ALERT_LEVELS",
    "DEFAULTS",
]


class ActionKind(str, Enum):
    """What a rule does when it fires, mildest first.

    ``severity`` orders them: a harder rule may act during the post-action
    delay of a softer one (invariant 3).
    """

    WARN = "warn"  # report only
    BLOCK = "block"  # close admission: new trials wait, running ones continue
    RECLAIM = "reclaim"  # ask the worker's client to give memory back (gc, empty caches)
    RESTART = "restart"  # stop gracefully (stop signal, grace, SIGKILL), then start again at once
    TERMINATE = "terminate"  # stop gracefully; the restart policy decides what follows
    KILL = "kill"  # SIGKILL at once; the restart policy decides what follows

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @property
    def stops_worker(self) -> bool:
        return self in (ActionKind.RESTART, ActionKind.TERMINATE, ActionKind.KILL)

    @property
    def is_level(self) -> bool:
        """Level actions hold while the rule is active and undo on release (block, warn)."""
        return self in (ActionKind.WARN, ActionKind.BLOCK)


_SEVERITY = {
    ActionKind.WARN: 0,
    ActionKind.BLOCK: 1,
    ActionKind.RECLAIM: 2,
    ActionKind.RESTART: 3,
    ActionKind.TERMINATE: 4,
    ActionKind.KILL: 5,
}


class RuleKind(str, Enum):
    """Where a rule comes from: a ``rules:`` entry, or a limit memguard turns into a rule."""

    RULE = "rule"  # written by the user (or by `memguard run` from its flags)
    RUNTIME = "runtime"  # limits.runtime: an age limit, a timer rather than a reading to watch


class RuleKey(NamedTuple):
    """What identifies a rule across reloads: an unchanged rule keeps its timers."""

    scope: str
    when_text: str
    action: str
    for_s: float
    release_text: str | None
    within_s: float | None = None


@dataclass(frozen=True)
class Rule:
    """One ``rules:`` entry (or a built-in rule of ``kind`` other than RULE).

    ``key`` identifies the rule across reloads (its source text), so an
    unchanged rule keeps its timers when the config is reloaded.
    """

    name: str  # user-given ``name:`` or "rules[2]"
    when: Expr
    when_text: str
    action: ActionKind
    scope: str  # "system" | "worker"
    for_s: float = 0.0
    release: Expr | None = None
    release_text: str | None = None
    grace_s: float | None = None  # None: the workload's stop grace
    source: str = ""  # "file.yaml:12"
    kind: RuleKind = RuleKind.RULE
    # ``within: 3s``: the rule also fires when, at the recent rate of change, its condition will hold
    # within that long (memory.available falling, memory.used or worker.memory rising): the trend,
    # not only the level. None: the level alone.
    within_s: float | None = None

    @property
    def key(self) -> RuleKey:
        return RuleKey(self.scope, self.when_text, self.action.value, self.for_s, self.release_text, self.within_s)


@dataclass(frozen=True)
class RestartPolicy:
    """When a stopped worker starts again, and the two budgets that keep restarts from becoming a storm.

    Two kinds of restart are counted apart:

    * **failures** (a crash or a non-zero exit, a death by a signal memguard
      did not send, a kernel OOM kill, a spawn that failed, a stop by a rule:
      over a limit, a system rule's victim, a stuck trial) spend
      ``budget_count`` in ``budget_window_s``; past it the worker is ``failed``;
    * **planned** restarts (recycling, the brake, an
      operator's restart, a reload that changed the worker, a clean exit under
      ``always``) are the configuration doing its job: they never mark a worker
      failed. At most ``planned_count`` in ``planned_window_s`` are carried out;
      beyond that a recycle or brake restart waits for room in the window.
    """

    # on-failure: restart after a non-zero exit, a signal, or a stop by memguard;
    # a worker that exits 0 on its own has finished its work (an Optuna worker
    # that ran its n_trials) and stays stopped.
    mode: str = "on-failure"  # "always" | "on-failure" | "never"
    # Capped exponential backoff: Ray caps task retries at 60 s; supervisord's
    # +1 s per try is the most common complaint about it (supervisor#487).
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    # Failure budget: more than `budget_count` failures in `budget_window_s`
    # marks the worker `failed` (no restart storm; circus' flapping plugin).
    budget_count: int = 10
    budget_window_s: float = 600.0
    # Planned restarts: at most 5 in 10 s, systemd's own start limit
    # (StartLimitBurst=5 in StartLimitIntervalSec=10s): more is a loop, not
    # maintenance. Past it a recycle or brake restart waits (the worker goes on
    # working, or waiting at its gate) instead of failing.
    planned_count: int = 5
    planned_window_s: float = 10.0


@dataclass(frozen=True)
class Limits:
    # The base of `worker.memory` percentages, and the worker cgroup's hard
    # limit (memory.max) where memguard gives workers cgroups.
    memory_bytes: int | None = None
    # Past it the worker is stopped (a failure: the restart policy and its backoff decide what follows).
    runtime_s: float | None = None
    memory_high_bytes: int | None = None  # cgroup v2 throttle point (memory.high)
    swap_bytes: int | None = None  # swap the worker's cgroup may use
    cpu: float | None = None  # CPU quota in cores (cgroup v2 cpu.max)
    # The worker's GPU memory budget: the base of `worker.gpu_memory`
    # percentages, and MEMGUARD_GPU_MEMORY_LIMIT in its environment.
    gpu_memory_bytes: int | None = None


@dataclass(frozen=True)
class Brake:
    """``restart_when_blocked``: the fix for an emergency brake that cannot give memory back.

    When one of the worker's own ``block`` rules holds its gate closed and no
    trial runs, memguard asks the worker once to give memory back (a reclaim),
    measures it again as soon as the worker says its reclaim callbacks are
    done, and restarts it if its memory did not come back past the rule's
    release threshold: only a restart returns leaked memory. ``after_s`` is a
    ceiling: a worker is never left waiting at a gate its own memory holds
    closed for longer, whatever the evidence (an unanswered reclaim, readings
    that cannot be taken).

    ``refusals`` is the old trigger (N trials in a row had to wait); a trial
    waits once rather than being refused again, so it never counted anything
    useful. It is still read, so old files load, and reported as ignored.
    """

    enabled: bool = False
    # 30 s: far longer than a reclaim pass (gc.collect() and malloc_trim() of a
    # few GiB take about a second) plus the two readings that judge it, so the
    # evidence decides and not this timer; short against trials of minutes.
    after_s: float = 30.0
    refusals: int | None = None  # deprecated, ignored (see above)


@dataclass(frozen=True)
class Recycle:
    """Restart a worker at a trial boundary after ``max_trials`` trials or ``max_age_s``.

    ``jitter`` (a fraction) spreads replicas' max_age so they do not recycle
    together (circus' max_age_variance, gunicorn's max_requests_jitter).
    """

    max_trials: int | None = None
    max_age_s: float | None = None
    jitter: float = 0.1


def rules_signals(rules: tuple[Rule, ...]) -> frozenset[str]:
    """Every signal the rules' ``when`` and ``release`` read."""
    out: set[str] = set()
    todo: list = [e for r in rules for e in (r.when, r.release) if e is not None]
    while todo:
        e = todo.pop()
        args = getattr(e, "args", None)
        if args is None:
            out.add(e.signal)
        else:
            todo.extend(args)
    return frozenset(out)


@dataclass(frozen=True)
class WorkloadPolicy:
    name: str
    command: tuple[str, ...]
    replicas: int = 1
    # Lower priority is chosen first as a victim under system pressure.
    priority: int = 0
    user: str | None = None
    group: str | None = None
    working_dir: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    limits: Limits = field(default_factory=Limits)
    rules: tuple[Rule, ...] = ()
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # 10 s: supervisord's stopwaitsecs; long enough for a Python worker to
    # flush and exit, short enough that memory comes back before the box stalls.
    grace_s: float = 10.0
    stop_signal: int = int(_signal.SIGTERM)
    # 500: if the kernel must choose a process to kill, it chooses a worker,
    # never sshd or memguard (which runs at -900 and, under systemd, -1000).
    oom_score_adj: int = 500
    brake: Brake = field(default_factory=Brake)
    recycle: Recycle = field(default_factory=Recycle)
    trial_timeout_s: float | None = None  # a trial running longer is stuck: terminate
    heartbeat_timeout_s: float | None = None  # a trial silent longer is stuck: terminate
    # worker.growth is the slope of worker.memory over this window (least squares).
    growth_window_s: float = 60.0
    # 30 s between two reclaim requests of one rule: a reclaim is cheap, but a
    # worker asked every tick would spend its time in gc.collect().
    reclaim_interval_s: float = 30.0
    gpus: tuple[str, ...] = ()  # devices the workload is pinned to: CUDA_VISIBLE_DEVICES
    source: str = ""
    #: Every signal its rules' ``when`` and ``release`` read, worked out once (a policy is frozen): what the
    #: reader must measure for its workers (PSS, I/O counters) and what the core must keep (a memory history).
    signals: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", rules_signals(self.rules))

    def spec_key(self) -> tuple:
        """What a running worker was started with: a change restarts it on reload."""
        return (self.command, self.user, self.group, self.working_dir, self.environment, self.limits, self.gpus)

    def worker_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.replicas)]


@dataclass(frozen=True)
class UnmanagedMatch:
    """An opt-in class of processes memguard does not own that system rules may choose as victims.

    Every field given must match: ``cmdline`` and ``cgroup`` are regular
    expressions searched in the command line and in /proc/<pid>/cgroup,
    ``user`` a user name. Protected processes, memguard and its workers
    are never candidates.
    """

    cmdline: str | None = None
    user: str | None = None
    cgroup: str | None = None
    priority: int = 0
    name: str = ""
    # Worker rules for each matched process: with rules, a matched process is adopted as an ad-hoc
    # worker (counted, measured as a tree, named in events, its rules and progress signals apply).
    rules: tuple[Rule, ...] = ()


ALERT_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AlertHook:
    """One ``alerts:`` entry: a webhook (HTTP POST of JSON) or an exec hook, and which events it gets.

    ``events`` are event names (``kill``, ``failed``...) or, for ``exit``
    events, their cause (``kernel_oom``); empty: every event at or above
    ``severity``. docs/alerts.md repeats these defaults for users.
    """

    name: str  # "alerts[0]" or the entry's name:
    webhook: str | None = None  # http:// or https:// URL
    exec: tuple[str, ...] = ()  # argv, run without a shell
    events: tuple[str, ...] = ()
    # None: "warning" when no events are listed (every stop, block, failure and kernel OOM kill, none of the
    # routine: spawn, release, exit 0), any level when they are (the list is the filter).
    severity: str | None = None
    # 1 min: the same event (kind, worker, rule or cause) told once a minute is news; every tick is spam.
    dedup_s: float = 60.0
    # 0 s: every event that passes the filters is sent; a pager sets e.g. 1m.
    min_interval_s: float = 0.0
    # 30 per hour: a restart storm on a 64-worker box must not become 64 pages a minute.
    max_per_hour: int = 30
    # 10 s per attempt: a healthy webhook answers in well under a second; a hook that hangs is cut off.
    timeout_s: float = 10.0
    # 3 retries, 1 s apart and doubling (1 s, 2 s, 4 s): rides over a receiver restarting.
    retries: int = 3
    backoff_s: float = 1.0
    headers: tuple[tuple[str, str], ...] = ()  # extra HTTP headers (Authorization...)
    source: str = ""


@dataclass(frozen=True)
class DaemonPolicy:
    # 1 s: a relaxed pace; idle, the daemon measured 0.3-0.6 % of one core (docs/benchmarks.md).
    poll_interval_s: float = 1.0
    # 100 ms near or past a threshold (earlyoom's floor between reads).
    fast_poll_interval_s: float = 0.1
    scope: str = "auto"  # "auto" | "host" | "cgroup"
    workloads_dir: str | None = None
    dry_run: bool = False
    protect: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    # 5 s after a victim exits before a second one is chosen for a rule no
    # harder than the first: the kernel needs a moment to return its pages and
    # the readings to settle (oomd and systemd-oomd wait 15 s, but act on 30 s
    # averages; memguard reads instantaneous figures).
    post_action_delay_s: float = 5.0
    # The fastest memory fill rate the fast path plans for: with H bytes of
    # headroom to a threshold it re-reads memory after H / rate seconds.
    # 6000 MiB/s is earlyoom's figure for RAM.
    max_fill_rate_bytes_per_s: float = 6000.0 * 1024 * 1024
    # Shortest pause of the fast path, 1 ms (earlyoom goes as low).
    min_fast_path_interval_s: float = 0.001
    runtime_dir: str | None = None  # admission files, control socket; default chosen at start
    worker_cgroups: str = "auto"  # "auto" | "on" | "off": a memory cgroup per worker incarnation
    # memguard's own OOM score: far below its workers', so the kernel never
    # picks the guard (nohang and systemd-oomd ship -900/-100 units likewise).
    oom_score_adj: int = -900
    # Lock memguard's pages in RAM (mlockall) so it stays responsive while
    # the machine swaps or thrashes, as earlyoom and nohang do.
    mlock: bool = True
    unmanaged: tuple[UnmanagedMatch, ...] = ()
    gpu: str = "auto"  # "auto": NVML sensing when a driver is there; "off"
    metrics_file: str | None = None  # Prometheus textfile, rewritten after each full tick
    metrics_listen: str | None = None  # "127.0.0.1:9464": serve /metrics over HTTP there
    alerts: tuple[AlertHook, ...] = ()
    # Incident records and the kernel log position: $STATE_DIRECTORY (systemd's StateDirectory=), else
    # /var/lib/memguard for root, ~/.local/state/memguard otherwise. Takes effect at the next start.
    state_dir: str | None = None
    # The flight recorder's memory: 10 minutes show a leak's slope before a death and cost well under a MiB
    # (docs/benchmarks.md).
    recorder_window_s: float = 600.0
    log_format: str = "auto"  # "auto" | "console" | "json" | "journald"
    log_level: str = "info"
    workloads: tuple[WorkloadPolicy, ...] = ()
    source: str = ""

    def workload(self, name: str) -> WorkloadPolicy | None:
        for w in self.workloads:
            if w.name == name:
                return w
        return None


DEFAULTS = DaemonPolicy()
