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
    # on-failure: restart after a non-zero exit, a signal, or a stop by memguard;
    # a worker that exits 0 on its own has finished its work (an Optuna worker
    # that ran its n_trials) and stays stopped.
    mode: str = "on-failure"  # "always" | "on-failure" | "never"
    # Capped exponential backoff: Ray caps task retries at 60 s; supervisord's
    # +1 s per try is the most common complaint about it (supervisor#487).
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    # Restart budget: more than `budget_count` restarts in `budget_window_s`
    # marks the worker `failed` (no restart storm; circus' flapping plugin).
    budget_count: int = 10
    budget_window_s: float = 600.0


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

    A worker whose own rule keeps its admission closed, and that was refused
    ``refusals`` trials in a row or stayed blocked ``after_s``, is restarted:
    only a restart returns leaked memory.
    """

    refusals: int | None = None
    after_s: float | None = None


@dataclass(frozen=True)
class Recycle:
    """Restart a worker at a trial boundary after ``max_trials`` trials or ``max_age_s``.

    ``jitter`` (a fraction) spreads replicas' max_age so they do not recycle
    together (circus' max_age_variance, gunicorn's max_requests_jitter).
    """

    max_trials: int | None = None
    max_age_s: float | None = None
    jitter: float = 0.1


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
