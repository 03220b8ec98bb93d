"""Adaptive pacing: how long the daemon may wait before it looks again.

Two clocks run in the daemon:

* the **full tick** (process trees, PSI, every rule) runs at
  ``poll_interval`` far from any threshold and at ``fast_poll_interval``
  when a rule is near, pending or active, or a worker is stopping;
* the **fast path** re-reads only the scope's memory figure (``/proc/meminfo``,
  or the scope cgroup's usage and ``memory.stat``) between full ticks, and
  keeps doing so while a full tick measures process trees, after ``headroom / max_fill_rate`` seconds: a
  hog filling memory at the planned rate cannot cross a memory threshold
  unseen (earlyoom's scheme). Near the threshold this goes down to a
  millisecond; far from it, the fast path is idle.
"""

from __future__ import annotations

from ..model import Observation, is_known
from ..policy import DaemonPolicy, RuleKind
from .evaluate import distance_to_fire, headroom_bytes
from .rules import system_context, timers, workload_of, worker_context, worker_rules
from .state import CoreState, Phase
from .trend import projected

__all__ = ["next_full_tick", "fast_path_interval", "next_wake", "NEAR"]

# A rule is "near" when its readings are within 10 % of its scale (10
# points of a percentage, or 10 % of an absolute threshold) from firing.
NEAR = 0.10


def _busy(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float) -> bool:
    if any(w.phase == Phase.STOPPING for w in state.workers.values()) or state.process_stop is not None:
        return True
    if any(rs.pending_since is not None or rs.active for rs in state.system_rules.values()):
        return True
    ctx = system_context(obs, state.trend)
    for rule in policy.rules:
        d = distance_to_fire(rule.when, projected(ctx, rule.within_s) if rule.within_s else ctx)
        if d is not None and d <= NEAR:
            return True
    for w in state.workers.values():
        if w.phase != Phase.RUNNING:
            continue
        if any(rs.pending_since is not None or rs.active for rs in w.rules.values()):
            return True
        wl = workload_of(w, policy)
        if wl is None:
            continue
        wctx = worker_context(w, wl, ctx, now)
        for rule in worker_rules(wl):
            if rule.kind == RuleKind.RUNTIME:
                continue  # an age limit is a timer, not a reading to watch closely
            d = distance_to_fire(rule.when, projected(wctx, rule.within_s) if rule.within_s else wctx)
            if d is not None and d <= NEAR:
                return True
    return False


def next_full_tick(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float) -> float:
    """Seconds until the next full tick."""
    interval = policy.fast_poll_interval_s if _busy(state, obs, policy, now) else policy.poll_interval_s
    due = [t - now for t in timers(state)]
    due += [rs.pending_since + r.for_s - now for r in policy.rules
            if (rs := state.system_rules.get(r.key)) is not None and rs.pending_since is not None]
    for w in state.workers.values():
        wl = workload_of(w, policy)
        if wl is None or w.phase != Phase.RUNNING:
            continue
        for r in worker_rules(wl):
            rs = w.rules.get(r.key)
            if rs is not None and rs.pending_since is not None:
                due.append(rs.pending_since + r.for_s - now)
        if wl.limits.runtime_s is not None and w.started_at is not None:
            due.append(w.started_at + wl.limits.runtime_s - now)
    soonest = min([d for d in due if d > 0], default=interval)
    return max(0.0, min(interval, soonest))


def fast_path_interval(state: CoreState, obs: Observation, policy: DaemonPolicy) -> float | None:
    """Seconds until the scope's memory should be re-read, or None if no rule watches it.

    The headroom is the smallest gap, in bytes, between the scope's memory
    figure and a memory threshold of a system rule that could still fire
    (not a level rule already in force).
    """
    total = obs.scope.total_bytes
    if not is_known(total):
        return None
    ctx = system_context(obs, state.trend)
    rate = ctx.values.get("memory.fill_rate")
    filling = max(0.0, float(rate)) if rate is not None and is_known(rate) else 0.0
    dying = _victim_dying(state)
    rooms: list[float] = []
    for rule in policy.rules:
        rs = state.system_rules.get(rule.key)
        if rs is not None and (rs.active or rs.pending_since is not None):
            continue  # already crossed: the full tick at the fast pace follows it
        if dying is not None and rule.action.severity <= dying:
            continue  # a victim is dying: only a harder rule could act now (invariant 3)
        room = headroom_bytes(rule.when, ctx, float(total))
        if room is not None:
            if rule.within_s:
                room = max(0.0, room - filling * rule.within_s)  # it fires that much earlier on the trend
            rooms.append(room)
    if not rooms:
        return policy.fast_poll_interval_s if dying is not None else None
    wait = min(rooms) / policy.max_fill_rate_bytes_per_s
    floor = policy.min_fast_path_interval_s
    return max(floor, min(wait, policy.poll_interval_s))


def _victim_dying(state: CoreState) -> int | None:
    """The severity of the victim still being stopped (its memory not yet back), or None.

    While it dies, rules no harder than the one that chose it cannot act (invariant 3): re-reading the
    scope every millisecond for them would only burn CPU while the kernel frees the victim's memory,
    and its memory counts as used until it is gone (nothing adds it back early). The full ticks at
    the fast pace follow the victim to its exit.
    """
    if state.process_stop is not None:
        return state.victim_severity
    if state.victim is not None:
        name, inc = state.victim
        w = state.workers.get(name)
        if w is not None and w.incarnation == inc and w.phase == Phase.STOPPING:
            return state.victim_severity
    return None


def next_wake(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float, next_full: float,
              full: bool) -> tuple[float, float]:
    """(when the next full tick is due, when to wake for the next tick of either kind).

    After a full tick the next one is planned afresh; after a fast one it
    only comes sooner, never later (a reading near a threshold pulls it in).
    """
    until_full = next_full_tick(state, obs, policy, now)
    if full or now + until_full < next_full:
        next_full = now + until_full
    fast = fast_path_interval(state, obs, policy)
    return next_full, (next_full if fast is None else min(next_full, now + fast))
