"""Adaptive pacing: when the daemon must tick again, and what to watch meanwhile.

Two things run in the daemon:

* the **full tick** (process trees, PSI, every rule). It runs at
  ``fast_poll_interval`` while something is under way (a rule pending or in
  force that nothing else watches, a worker stopping) or near a threshold
  that only a full tick measures (a worker's memory, PSI, GPU, swap); at
  ``poll_interval`` while some rule reads such a figure (or the machine has
  GPUs, read at full ticks only); and only every
  :data:`QUIET_FULL_TICK_S` when every rule is watched between ticks (the
  scope's memory) or is a timer. Timers (a ``for:`` running out, a grace
  period, a restart back-off, a trial timeout) bring it forward.
* between ticks, the observer **watches** the scope's available memory
  against a band of byte thresholds precomputed here (:func:`watch_plan`,
  a :class:`~memguard.model.WatchPlan`): through a kernel notification
  where there is one, else by reading it every ``headroom / max_fill_rate``
  seconds (a hog filling memory at the planned rate cannot cross a
  threshold unseen: earlyoom's scheme). Only a reading outside the band
  makes a tick, so holding memory just above a threshold costs a read, not
  a decision.
"""

from __future__ import annotations

import math
from typing import Iterable

from ..expr import Comparison, Expr
from ..model import Observation, WatchPlan, is_known
from ..policy import DaemonPolicy, Rule, RuleKind, WorkloadPolicy
from .evaluate import distance_to_fire
from .rules import system_context, timers, workload_of, worker_context, worker_rules
from .state import CoreState, Phase, WorkerState
from .trend import projected

__all__ = ["next_full_tick", "next_wake", "watch_plan", "watched", "reads_measured", "NEAR", "QUIET_FULL_TICK_S"]

# A rule is "near" when its readings are within 10 % of its scale (10
# points of a percentage, or 10 % of an absolute threshold) from firing.
NEAR = 0.10

# 10 s between full ticks when every rule is watched between ticks or is a timer: the full tick then only
# records new descendants of the workers, refreshes the figures the status and metrics show and re-checks
# `protect`. Ten times the default poll interval; a crossing, an exit or a timer ticks at once anyway.
QUIET_FULL_TICK_S = 10.0

# PSI triggers wake the daemon when a stall reaches half a PSI rule's threshold over a 2 s window (the
# shortest window the kernel allows without CAP_SYS_RESOURCE is 2 s, in multiples of 2 s).
PSI_WINDOW_US = 2_000_000

# Signals a full tick measures (the observer's fast reads and the kernel do not see them change).
# The progress signals (worker.cpu, .idle, .quiet) come from the counters a full tick reads; memory.fill_rate
# is the trend of the ticks' readings.
_MEASURED_PREFIXES = ("worker.memory", "worker.gpu_memory", "worker.processes", "worker.growth", "worker.cpu",
                      "worker.idle", "worker.quiet", "psi.", "swap.", "gpu.", "memory.fill_rate")


def _comparisons(expr: Expr) -> Iterable[Comparison]:
    if isinstance(expr, Comparison):
        yield expr
        return
    for a in expr.args:
        yield from _comparisons(a)


def _falling_memory(c: Comparison) -> bool:
    """A comparison the watcher sees cross: available memory falling, or used memory rising."""
    return ((c.signal == "memory.available" and c.op in ("<", "<="))
            or (c.signal == "memory.used" and c.op in (">", ">=")))


def _rising_memory(c: Comparison) -> bool:
    """A comparison the watcher sees cross the other way: available memory rising, used memory falling."""
    return ((c.signal == "memory.available" and c.op in (">", ">="))
            or (c.signal == "memory.used" and c.op in ("<", "<=")))


def watched(rule: Rule) -> bool:
    """Is every reading of this rule's ``when`` (and ``release``) watched between ticks?

    True for rules on the scope's memory alone: the observer sees them cross
    whatever the full tick's pace. Not for a rule on the trend (``within``):
    its readings move with the fill rate, which only the ticks' readings give,
    so near its threshold, pending or in force it keeps the full tick at the
    fast pace (the band still wakes the daemon at its threshold raised by the
    last known rate).
    """
    if rule.within_s is not None:
        return False
    if not all(_falling_memory(c) for c in _comparisons(rule.when)):
        return False
    return rule.release is None or all(_rising_memory(c) for c in _comparisons(rule.release))


def reads_measured(rule: Rule) -> bool:
    """Does the rule read a figure only a full tick measures (a worker's memory, PSI, swap, GPU)?"""
    exprs = [rule.when] + ([rule.release] if rule.release is not None else [])
    return any(c.signal.startswith(_MEASURED_PREFIXES) for e in exprs for c in _comparisons(e))


def _available_threshold(c: Comparison, total: float) -> float:
    """The comparison's threshold as available bytes of the scope."""
    t = c.threshold / 100.0 * total if c.unit == "percent" else c.threshold
    return total - t if c.signal == "memory.used" else t


def _polled(rule: Rule) -> bool:
    """Does the rule need full ticks at the poll interval: a figure only they measure, or a trend (``within``)?"""
    return rule.kind != RuleKind.RUNTIME and (reads_measured(rule) or rule.within_s is not None)


def _needs_polling(state: CoreState, policy: DaemonPolicy) -> bool:
    """Does some rule read what only a full tick measures (or are unmanaged processes candidates)?"""
    if policy.unmanaged:
        return True
    if any(_polled(r) or not watched(r) for r in policy.rules):
        return True
    if any(_polled(r) for wl in policy.workloads for r in wl.rules):
        return True
    # A job started by hand (``memguard run``) brings its own rules.
    return any(w.adhoc is not None and w.phase == Phase.RUNNING and any(_polled(r) for r in w.adhoc.rules)
               for w in state.workers.values())


def _busy(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float, full: bool) -> bool:
    if state.process_stop is not None:
        return True
    for w in state.workers.values():
        if w.phase == Phase.STOPPING or w.draining_since is not None:
            return True
        if w.phase == Phase.RUNNING and w.sample is None:
            return True  # just started: measured soon (until then it is no victim candidate, protect unknown)
    ctx = system_context(obs, state.trend)
    for rule in policy.rules:
        if watched(rule):
            continue  # the watcher sees it cross (or release, or stop holding) between ticks
        rs = state.system_rules.get(rule.key)
        if rs is not None and (rs.pending_since is not None or rs.active):
            return True
        d = distance_to_fire(rule.when, projected(ctx, rule.within_s) if rule.within_s else ctx)
        if d is not None and d <= NEAR:
            return True
    if not full:
        return False  # workers' figures change only at full ticks: their nearness was judged there
    for w in state.workers.values():
        if w.phase != Phase.RUNNING:
            continue
        wl = workload_of(w, policy)
        if wl is None or not wl.rules:
            continue
        if any(rs.pending_since is not None or rs.active for rs in w.rules.values()):
            return True
        if not any(_polled(r) for r in wl.rules):
            continue
        wctx = worker_context(w, wl, ctx, now)
        for rule in wl.rules:
            if not _polled(rule):
                continue  # an age limit is a timer; a rule on system memory is watched
            d = distance_to_fire(rule.when, projected(wctx, rule.within_s) if rule.within_s else wctx)
            if d is not None and d <= NEAR:
                return True
    return False


def _worker_timers(w: WorkerState, wl: WorkloadPolicy, now: float) -> Iterable[float]:
    """When a worker's built-in checks fall due: its runtime limit, trial and heartbeat timeouts, recycling."""
    if w.phase != Phase.RUNNING:
        return
    if wl.limits.runtime_s is not None and w.started_at is not None:
        yield w.started_at + wl.limits.runtime_s
    if w.trial_started_at is not None:
        if wl.trial_timeout_s is not None:
            yield w.trial_started_at + wl.trial_timeout_s
        if wl.heartbeat_timeout_s is not None and w.last_heartbeat is not None:
            yield w.last_heartbeat + wl.heartbeat_timeout_s
    if wl.recycle.max_age_s is not None and w.started_at is not None:
        yield w.started_at + wl.recycle.max_age_s * (1.0 - wl.recycle.jitter)  # the earliest it can be due
    if w.blocked_since is not None and wl.brake.after_s is not None:
        yield w.blocked_since + wl.brake.after_s
    clocks = {"worker.age": w.started_at, "worker.trial_age": w.trial_started_at,
              "worker.blocked_for": w.blocked_since}
    for r in worker_rules(wl):
        for c in _comparisons(r.when):  # a rule on a worker's age (or a trial's) falls due at a known moment
            base = clocks.get(c.signal)
            if base is not None and c.op in (">", ">="):
                yield base + c.threshold
        rs = w.rules.get(r.key)
        if rs is not None and rs.pending_since is not None:
            yield rs.pending_since + r.for_s
        if rs is not None and rs.quiet_until > now:
            yield rs.quiet_until


def next_full_tick(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float,
                   full: bool = True) -> float:
    """Seconds until the next full tick."""
    if _busy(state, obs, policy, now, full):
        interval = policy.fast_poll_interval_s
    elif _needs_polling(state, policy) or obs.gpus:
        interval = policy.poll_interval_s  # (GPUs are read at full ticks only: status and problems stay fresh)
    else:
        interval = max(policy.poll_interval_s, QUIET_FULL_TICK_S)
    due = list(timers(state))
    for r in policy.rules:
        rs = state.system_rules.get(r.key)
        if rs is None:
            continue
        if rs.pending_since is not None:
            due.append(rs.pending_since + r.for_s)
        if rs.quiet_until > now:
            due.append(rs.quiet_until)
    for w in state.workers.values():
        wl = workload_of(w, policy)
        if wl is not None:
            due.extend(_worker_timers(w, wl, now))
    soonest = min([d - now for d in due if d > now], default=interval)
    return max(0.0, min(interval, soonest))


def watch_plan(state: CoreState, obs: Observation, policy: DaemonPolicy) -> WatchPlan:
    """The band of the scope's available memory to watch until the next tick (see the module text).

    ``low_bytes``: the highest memory threshold, in available bytes, of a
    rule that could still fire and that the scope is still above. ``high_bytes``: the
    lowest point at which a watched rule in force releases or a pending one
    stops holding.
    """
    base = dict(max_fill_rate_bytes_per_s=policy.max_fill_rate_bytes_per_s,
                min_interval_s=policy.min_fast_path_interval_s, max_interval_s=policy.poll_interval_s,
                backstop_s=max(policy.poll_interval_s, QUIET_FULL_TICK_S))
    psi = _psi_triggers(policy)
    total, avail = obs.scope.total_bytes, obs.scope.available_bytes
    if not is_known(total) or not is_known(avail):
        return WatchPlan(psi=psi, **base)
    total_f, avail_f = float(total), float(avail)
    dying = _victim_dying(state)
    low: float | None = None
    high: float | None = None
    stop = False
    trends: list[tuple[float, float]] = []
    rules: list[tuple[Rule, object]] = [(r, state.system_rules.get(r.key)) for r in policy.rules]
    for w in state.workers.values():
        if w.phase != Phase.RUNNING:
            continue
        wl = workload_of(w, policy)
        if wl is not None:
            rules.extend((r, w.rules.get(r.key)) for r in wl.rules)
    for rule, rs in rules:
        active = rs is not None and rs.active  # type: ignore[attr-defined]
        pending = rs is not None and rs.pending_since is not None  # type: ignore[attr-defined]
        if active:
            release = rule.release if rule.release is not None else rule.when
            comps = [c for c in _comparisons(release)
                     if (_rising_memory(c) if rule.release is not None else _falling_memory(c))]
            for c in comps:
                t = _available_threshold(c, total_f)
                if t > avail_f:
                    high = t if high is None else min(high, t)
            continue
        if (not pending and dying is not None and rule.scope == "system"
                and rule.action.severity <= dying):
            continue  # a victim is dying: only a harder rule could act now (invariant 3)
        for c in _comparisons(rule.when):
            if not _falling_memory(c):
                continue
            t = _available_threshold(c, total_f)
            if rule.within_s and not pending and t < avail_f:
                trends.append((t, rule.within_s))  # the watcher projects its own readings' rate
            if pending and t < avail_f:
                continue
            if pending:
                high = t if high is None else min(high, t)  # it stops holding when available rises past t
            elif t < avail_f:
                low = t if low is None else max(low, t)
                if rule.action.stops_worker and rule.scope == "system":
                    stop = True
    return WatchPlan(low_bytes=low, high_bytes=high, stop=stop, psi=psi, trends=tuple(trends), **base)


def _victim_dying(state: CoreState) -> int | None:
    """The severity of the victim still being stopped (its memory not yet back), or None.

    While it dies, rules no harder than the one that chose it cannot act (invariant 3): watching the
    scope for them would only wake the daemon while the kernel frees the victim's memory, which
    counts as used until it is gone. The full ticks at the fast pace follow the victim to its exit.
    """
    if state.process_stop is not None:
        return state.victim_severity
    if state.victim is not None:
        name, inc = state.victim
        w = state.workers.get(name)
        if w is not None and w.incarnation == inc and w.phase == Phase.STOPPING:
            return state.victim_severity
    return None


def _psi_triggers(policy: DaemonPolicy) -> tuple[tuple[str, int, int], ...]:
    """PSI triggers for the system rules that read PSI: half the lowest threshold of each kind, over 2 s."""
    lowest: dict[str, float] = {}
    for r in policy.rules:
        for c in _comparisons(r.when):
            if c.signal.startswith("psi.") and c.op in (">", ">="):
                kind = "full" if c.signal.startswith("psi.full") else "some"
                lowest[kind] = min(lowest.get(kind, math.inf), c.threshold)
    out = []
    for kind, pct in sorted(lowest.items()):
        stall = int(PSI_WINDOW_US * max(pct, 1.0) / 200.0)  # half the threshold, at least 0.5 % of the window
        out.append((kind, max(stall, 1), PSI_WINDOW_US))
    return tuple(out)


def next_wake(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float, next_full: float,
              full: bool) -> tuple[float, float]:
    """(when the next full tick is due, when to wake for the next tick of either kind).

    After a full tick the next one is planned afresh; after a fast one it
    only comes sooner, never later. Between ticks the observer watches the
    plan of :func:`watch_plan` and wakes the daemon on a crossing.
    """
    until_full = next_full_tick(state, obs, policy, now, full)
    if full or now + until_full < next_full:
        next_full = now + until_full
    return next_full, next_full
