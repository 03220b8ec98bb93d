"""What ``memguard ctl status``, ``memguard top``, ``memguard health`` and systemd's STATUS line say.

:func:`status_line` is one ASCII line. :func:`status_reply` is the control
socket's answer to ``status``: that line, one record per worker, and what a
live view needs: the scope's gauges (memory, swap, PSI, each GPU) with the
thresholds of the rules marked on them, each worker's memory against its
limit with a short history, and the recent events. Every figure is in a
base unit (bytes, seconds, percent) or null when unknown; docs/control.md
describes the fields.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..decide.rules import growth_rate
from ..decide.state import CoreState, Phase, WorkerState
from ..expr import Comparison, comparisons
from ..model import Observation, is_known
from ..units import format_size

__all__ = ["status_line", "status_reply", "HISTORY_POINTS", "EVENTS_IN_STATUS"]

#: 60 points of memory history per worker: a minute at the default 1 s poll, enough for a sparkline
#: (the core keeps the readings of the workload's growth window, 60 s by default).
HISTORY_POINTS = 60
#: The last 50 events ride along in each status reply (a screenful; the ring keeps more).
EVENTS_IN_STATUS = 50


def status_line(state: CoreState, obs: Observation | None, kernel_oom_kills: int = 0) -> str:
    """One ASCII line: workers by phase, blocked count, scope memory, GPUs, what is firing."""
    counts: dict[str, int] = {}
    blocked = 0
    for w in state.workers.values():
        counts[w.phase.value] = counts.get(w.phase.value, 0) + 1
        if w.phase == Phase.RUNNING and not w.admission_open:
            blocked += 1
    parts = [f"{counts.get('running', 0)} running", f"{blocked} blocked", f"{counts.get('failed', 0)} failed"]
    if kernel_oom_kills:
        parts.append(f"{kernel_oom_kills} kernel OOM kills")
    if obs is not None:
        for g in obs.gpus:
            if is_known(g.used_bytes) and is_known(g.total_bytes):
                parts.append(f"gpu{g.index} {format_size(g.used_bytes)}/{format_size(g.total_bytes)}")
            else:
                parts.append(f"gpu{g.index} unknown")
        avail = obs.scope.available_bytes
        if not is_known(avail):
            parts.append("available unknown")
        else:
            parts.append(f"{format_size(avail)} available ({obs.scope.kind})")
    firing = _firing(state)
    if firing:
        parts.append("firing: " + "; ".join(firing[:3]))
    return ", ".join(parts)


def _firing(state: CoreState) -> list[str]:
    firing = [rs.explain.when if rs.explain is not None else key.when_text
              for key, rs in state.system_rules.items() if rs.active]
    for w in state.workers.values():
        firing += [f"{w.name}: {rs.explain.when}" for rs in w.rules.values() if rs.active and rs.explain]
    return firing


def _num(v: object) -> float | int | None:
    """A reading as JSON: the number, or None when unknown."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not is_known(v):
        return None
    return v


# ---------------------------------------------------------------------------
# gauges and the thresholds marked on them


def _mark_at(c: Comparison, total: float | None) -> float | None:
    """Where on a used/total gauge the comparison ``c`` starts to hold, in the gauge's unit; None if it cannot
    be drawn (a base unknown, a comparison pointing the other way)."""
    value = c.threshold
    if c.unit == "percent" and c.signal.split(".")[0] in ("memory", "swap", "gpu", "worker"):
        if total is None:
            return None
        value = c.threshold / 100.0 * total
    if c.signal in ("memory.available", "swap.free", "gpu.free"):
        if total is None or c.op not in ("<", "<="):
            return None
        return max(total - value, 0.0)
    if c.op not in (">", ">="):
        return None
    return value


def _marks(rules: Iterable[Any], signals: tuple[str, ...], total: float | None, states: Mapping[Any, Any],
           device: str | None = None) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        for c in comparisons(rule.when):
            if c.signal not in signals or (device is not None and c.device not in (None, device)):
                continue
            at = _mark_at(c, total)
            if at is None:
                continue
            rs = states.get(rule.key)
            out.append({"at": at, "rule": rule.name, "action": rule.action.value, "when": c.text,
                        "active": bool(rs is not None and rs.active),
                        "pending": bool(rs is not None and rs.pending_since is not None)})
    return sorted(out, key=lambda m: m["at"])


def _gauge(name: str, value: object, maximum: object, unit: str, marks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "value": _num(value), "max": _num(maximum), "unit": unit, "marks": marks}


def _scope(obs: Observation | None, policy: Any, state: CoreState) -> dict[str, Any] | None:
    if obs is None:
        return None
    sc, pr = obs.scope, obs.pressure
    rules = getattr(policy, "rules", ())
    states = state.system_rules
    total = _num(sc.total_bytes)
    avail = _num(sc.available_bytes)
    used = total - avail if total is not None and avail is not None else None
    swap_total, swap_free = _num(sc.swap_total_bytes), _num(sc.swap_free_bytes)
    swap_used = swap_total - swap_free if swap_total is not None and swap_free is not None else None
    gauges = [
        _gauge("memory", used, total, "bytes", _marks(rules, ("memory.available", "memory.used"), total, states)),
        _gauge("swap", swap_used, swap_total, "bytes", _marks(rules, ("swap.used", "swap.free"), swap_total, states)),
        _gauge("psi some", pr.some_avg10, 100, "percent",
               _marks(rules, ("psi.some_avg10", "psi.some_avg60"), 100.0, states)),
        _gauge("psi full", pr.full_avg10, 100, "percent",
               _marks(rules, ("psi.full_avg10", "psi.full_avg60"), 100.0, states)),
    ]
    for g in obs.gpus:
        gt = _num(g.total_bytes)
        gauges.append(_gauge(f"gpu{g.index}", g.used_bytes, g.total_bytes, "bytes",
                             _marks(rules, ("gpu.used", "gpu.free"), gt, states, device=g.index)))
    return {
        "kind": sc.kind, "path": sc.path or None, "total_bytes": total, "available_bytes": avail,
        "used_bytes": used, "swap_total_bytes": swap_total, "swap_used_bytes": swap_used,
        "oom_kills": _num(sc.oom_kills),
        "psi": {"some_avg10": _num(pr.some_avg10), "some_avg60": _num(pr.some_avg60),
                "full_avg10": _num(pr.full_avg10), "full_avg60": _num(pr.full_avg60)},
        "gauges": gauges,
        "gpus": [{"index": g.index, "name": g.name, "used_bytes": _num(g.used_bytes),
                  "total_bytes": _num(g.total_bytes)} for g in obs.gpus],
    }


# ---------------------------------------------------------------------------
# workers


#: At most 3000 history points in one reply (about 30 KiB): with many workers each gets fewer, so the reply
#: stays well inside what the control socket buffers for a client (256 KiB).
HISTORY_BUDGET = 3000


def _history(w: WorkerState, points: int) -> list[int]:
    return [int(m) for _, m in w.history][-points:] if points > 0 else []


def _worker(name: str, w: WorkerState, policy: Any, now: float | None,
            last_events: Mapping[str, Mapping[str, Any]], points: int = HISTORY_POINTS) -> dict[str, Any]:
    wl = policy.workload(w.workload) if policy is not None else None
    limit = wl.limits.memory_bytes if wl is not None else None
    gpu_limit = wl.limits.gpu_memory_bytes if wl is not None else None
    growth = growth_rate(w.history, wl.growth_window_s) if wl is not None else None
    sample = w.sample
    marks = _marks(wl.rules, ("worker.memory",), float(limit) if limit else None, w.rules) if wl is not None else []
    rec: dict[str, Any] = {
        "phase": w.phase.value, "pid": w.pid, "incarnation": w.incarnation,
        "admission": "open" if w.admission_open else "closed", "trials": w.trials,
        "memory_bytes": w.memory if isinstance(w.memory, (int, float)) else None,
        "restarts_in_window": len(w.restarts),  # failures (the restart budget)
        "planned_restarts_in_window": len(getattr(w, "planned", ())),  # recycle, brake, operator, runtime
        "last_exit": w.last_exit,
        "workload": w.workload,
        "limit_bytes": limit,
        "memory_marks": marks,
        "memory_history": _history(w, points),
        "growth_bytes_per_s": _num(growth),
        "gpu_memory_bytes": _num(sample.gpu_memory_bytes) if sample is not None else None,
        "gpu_limit_bytes": gpu_limit,
        "processes": sample.processes if sample is not None else None,
        "age_s": (now - w.started_at) if now is not None and w.started_at is not None else None,
        "trial": ({"name": w.trial_name, "age_s": now - w.trial_started_at}
                  if now is not None and w.trial_started_at is not None else None),
        "stopping": ({"event": w.stop.event, "reason": w.stop.reason, "rule": w.stop.rule}
                     if w.stop is not None else None),
        "firing": [rs.explain.when for rs in w.rules.values() if rs.active and rs.explain is not None],
        "last_event": dict(last_events[name]) if name in last_events else None,
    }
    return rec


def status_reply(state: CoreState, obs: Observation | None, kernel_oom_kills: int = 0, *, policy: Any = None,
                 events: Iterable[Mapping[str, Any]] = (), last_events: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> dict[str, Any]:
    """The control socket's answer to ``status``: the line, one record per worker, the scope's gauges with the
    rules' thresholds, and the recent events. ``policy`` (the running one) gives limits and thresholds."""
    now = obs.at if obs is not None else None
    last_events = last_events or {}
    points = min(HISTORY_POINTS, HISTORY_BUDGET // max(len(state.workers), 1))
    return {
        "ok": True,
        "status": status_line(state, obs, kernel_oom_kills),
        "workers": {name: _worker(name, w, policy, now, last_events, points)
                    for name, w in sorted(state.workers.items())},
        "scope": _scope(obs, policy, state),
        "kernel_oom_kills": kernel_oom_kills,
        "firing": _firing(state),
        "shutting_down": state.shutting_down,
        "dry_run": bool(getattr(policy, "dry_run", False)),
        "events": [dict(e) for e in list(events)[-EVENTS_IN_STATUS:]],
    }
