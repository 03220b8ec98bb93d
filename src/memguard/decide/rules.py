"""What the rules read: the contexts a ``when:`` is evaluated in, the rules of a workload, and timers.

Shared by the step (:mod:`memguard.decide.core`) and pacing
(:mod:`memguard.decide.pacing`), so that both evaluate exactly the same
readings. Pure functions of values; no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Iterable

from ..expr import parse_expr
from ..model import UNKNOWN, Observation, Unknown, is_known
from ..policy import ActionKind, DaemonPolicy, Rule, RuleKind, WorkloadPolicy
from ..units import duration_text
from .evaluate import Context
from .progress import cpu_percent, idle_for, quiet_for
from .state import CoreState, Phase, WorkerState
from .trend import WORKER_TREND_WINDOW_S, endpoint_rate, fill_rate

__all__ = ["runtime_rule", "worker_rules", "system_context", "worker_context", "growth_rate", "timers",
           "BRAKE_ANSWER_S", "workload_of", "RUNTIME_RULE",
           "reads_growth", "changes_between_full_ticks"]

#: How long the brake waits for the worker to answer its reclaim request before judging the memory
#: as it is: 10 s. A reclaim pass (gc.collect(), malloc_trim(), emptying caches) takes about a second for
#: a few GiB of heap; a worker silent ten times that long is not giving memory back (or does not listen).
BRAKE_ANSWER_S = 10.0

RUNTIME_RULE = "limits.runtime"

# Readings that change only at full ticks: a fast tick carries the last full tick's figures for them.
_FULL_TICK_PREFIXES = ("worker.memory", "worker.gpu_memory", "worker.processes", "worker.growth", "psi.", "swap.",
                       "gpu.")


def reads_growth(wl: WorkloadPolicy) -> bool:
    """Does a rule of the workload read ``worker.growth`` (the only reason to keep a memory history)?"""
    return "worker.growth" in wl.signals


def changes_between_full_ticks(wl: WorkloadPolicy) -> bool:
    """Does a rule of the workload read something a fast tick can change (system memory, time, counters)?

    A workload whose rules read only what full ticks measure gets the same
    answers on a fast tick as on the last full one: its rules need not run.
    """
    return (any(not s.startswith(_FULL_TICK_PREFIXES) for s in wl.signals)
            or wl.limits.runtime_s is not None
            or any(r.within_s is not None for r in wl.rules))  # a trend moves with time


def runtime_rule(wl: WorkloadPolicy) -> Rule | None:
    """``limits.runtime`` as a rule, so it is explained like any other. It stops the worker: a job still
    running past its limit has failed (cause ``timeout``); the restart policy, with its backoff and budget,
    decides what follows."""
    if wl.limits.runtime_s is None:
        return None
    text = f"worker.age > {duration_text(wl.limits.runtime_s)}"
    return Rule(name=RUNTIME_RULE, when=parse_expr(text, "worker"), when_text=text,
                action=ActionKind.TERMINATE, scope="worker", source=wl.source, kind=RuleKind.RUNTIME)


def workload_of(w: WorkerState, policy: DaemonPolicy) -> WorkloadPolicy | None:
    """The policy a worker runs under: its workload's, or an ad-hoc worker's own."""
    return w.adhoc if w.adhoc is not None else policy.workload(w.workload)


def worker_rules(wl: WorkloadPolicy) -> list[Rule]:
    """The workload's ``rules:`` plus the built-in rules its limits imply."""
    rules = list(wl.rules)
    rt = runtime_rule(wl)
    if rt is not None:
        rules.append(rt)
    return rules


def _system_values(obs: Observation) -> dict[str, object]:
    sc, pr = obs.scope, obs.pressure
    total, avail = sc.total_bytes, sc.available_bytes
    used = (float(total) - float(avail)) if is_known(total) and is_known(avail) else UNKNOWN
    swap_total, swap_free = sc.swap_total_bytes, sc.swap_free_bytes
    if is_known(swap_total) and is_known(swap_free):
        swap_used: object = float(swap_total) - float(swap_free)
    else:
        swap_used = UNKNOWN
    return {
        "memory.available": avail,
        "memory.used": used,
        "swap.used": swap_used,
        "swap.free": swap_free,
        "psi.some_avg10": pr.some_avg10,
        "psi.some_avg60": pr.some_avg60,
        "psi.full_avg10": pr.full_avg10,
        "psi.full_avg60": pr.full_avg60,
        "psi.some_avg1": pr.some_avg1,
        "psi.full_avg1": pr.full_avg1,
    }


def system_context(obs: Observation, trend: tuple[tuple[float, float], ...] = ()) -> Context:
    """The readings system rules see: the scope's memory and swap, PSI, each GPU, and the fill rate from
    ``trend`` (the core's recent readings of available memory, decide.trend)."""
    gpus = {g.index: {"gpu.used": g.used_bytes, "gpu.free": g.free_bytes, "gpu.total": g.total_bytes}
            for g in obs.gpus}
    values = _system_values(obs)
    rate = fill_rate(trend, obs.at)
    values["memory.fill_rate"] = rate
    rates = {"memory.available": -float(rate), "memory.used": float(rate)} if is_known(rate) else {}
    return Context(values=values,
                   bases={"memory.total": obs.scope.total_bytes, "swap.total": obs.scope.swap_total_bytes},
                   gpus=gpus, rates=rates)


def worker_context(w: WorkerState, wl: WorkloadPolicy, system: Context, now: float) -> Context:
    """The readings a worker rule sees: the system's, plus the worker's own."""
    values = dict(system.values)
    sample = w.sample
    values["worker.memory"] = w.memory
    values["worker.gpu_memory"] = sample.gpu_memory_bytes if sample is not None else UNKNOWN
    values["worker.age"] = (now - w.started_at) if w.started_at is not None else UNKNOWN
    values["worker.processes"] = sample.processes if sample is not None else UNKNOWN
    window = wl.restart.budget_window_s
    values["worker.restarts"] = float(sum(1 for t in w.restarts if now - t < window))
    values["worker.trials"] = float(w.trials)
    values["worker.trial_age"] = (now - w.trial_started_at) if w.trial_started_at is not None else Unknown(
        "no trial running")
    values["worker.blocked_for"] = (now - w.blocked_since) if w.blocked_since is not None else 0.0
    values["worker.refusals"] = float(w.refusals)
    values["worker.growth"] = (growth_rate(w.history, wl.growth_window_s) if reads_growth(wl)
                               else Unknown("no rule reads worker.growth"))
    values["worker.cpu"] = cpu_percent(w, now)
    values["worker.idle"] = idle_for(w, now)
    values["worker.quiet"] = quiet_for(w, now)
    rates = dict(system.rates)
    wrate = endpoint_rate(w.history, now, WORKER_TREND_WINDOW_S)
    if is_known(wrate):
        rates["worker.memory"] = wrate
    bases = dict(system.bases)
    bases["limits.memory"] = wl.limits.memory_bytes if wl.limits.memory_bytes else Unknown("no limits.memory")
    bases["limits.gpu_memory"] = (wl.limits.gpu_memory_bytes if wl.limits.gpu_memory_bytes
                                  else Unknown("no limits.gpu_memory"))
    return Context(values=values, bases=bases, gpus=system.gpus, rates=rates)


def growth_rate(history: tuple[tuple[float, float], ...], window_s: float) -> object:
    """Least-squares slope of memory over time, bytes per second; Unknown until half a window is seen."""
    if len(history) < 3 or history[-1][0] - history[0][0] < window_s / 2:
        return Unknown("not enough samples for a growth rate yet")
    n = len(history)
    mt = sum(t for t, _ in history) / n
    mm = sum(m for _, m in history) / n
    var = sum((t - mt) ** 2 for t, _ in history)
    if var <= 0:
        return Unknown("samples at one instant")
    return sum((t - mt) * (m - mm) for t, m in history) / var


def timers(state: CoreState) -> Iterable[float]:
    """Moments at which the core has something due without a new reading."""
    for w in state.workers.values():
        if w.phase == Phase.PENDING:
            yield w.spawn_at
        if w.phase == Phase.STOPPING and w.stop is not None and w.stop.kill_at is not None:
            yield w.stop.kill_at
        if w.phase == Phase.RUNNING:
            if w.inc.brake_asked_at is not None and w.inc.reclaimed_at is None:
                yield w.inc.brake_asked_at + BRAKE_ANSWER_S
            if 0.0 < w.inc.planned_wait_until < math.inf:
                yield w.inc.planned_wait_until
    if state.delay_until != math.inf and state.delay_until > 0:
        yield state.delay_until
    if state.process_stop is not None and state.process_stop.kill_at is not None:
        yield state.process_stop.kill_at
