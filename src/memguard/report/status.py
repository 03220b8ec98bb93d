"""What ``memguard ctl status`` and systemd's STATUS line say: the core's state, for people and scripts."""

from __future__ import annotations

from typing import Any

from ..decide.state import CoreState, Phase
from ..model import Observation, is_known
from ..units import format_size

__all__ = ["status_line", "status_reply"]


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
    firing = [rs.explain.when if rs.explain is not None else key.when_text
              for key, rs in state.system_rules.items() if rs.active]
    for w in state.workers.values():
        firing += [f"{w.name}: {rs.explain.when}" for rs in w.rules.values() if rs.active and rs.explain]
    if firing:
        parts.append("firing: " + "; ".join(firing[:3]))
    return ", ".join(parts)


def status_reply(state: CoreState, obs: Observation | None, kernel_oom_kills: int = 0) -> dict[str, Any]:
    """The control socket's answer to ``status``: the line above and one record per worker."""
    return {"ok": True, "status": status_line(state, obs, kernel_oom_kills), "workers": {
        name: {"phase": w.phase.value, "pid": w.pid, "incarnation": w.incarnation,
               "admission": "open" if w.admission_open else "closed", "trials": w.trials,
               "memory_bytes": w.memory if isinstance(w.memory, (int, float)) else None,
               "restarts_in_window": len(w.restarts), "last_exit": w.last_exit}
        for name, w in sorted(state.workers.items())}}
