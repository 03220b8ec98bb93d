"""Evaluating ``when:`` expressions against readings, in three-valued logic.

A comparison whose reading is Unknown is itself unknown; ``and`` is false
if any side is false, ``or`` is true if any side is true, and otherwise an
unknown side makes the whole unknown. The core fires a rule only on a
definite True and releases it only on a definite answer, so Unknown never
escalates (invariant 1).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..expr import Comparison, Expr
from ..model import Explanation, Reading, Unknown, is_known
from ..signals import SIGNALS
from ..units import format_duration, format_size

__all__ = ["Context", "evaluate", "explain", "deciding", "distance_to_fire", "headroom_bytes"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Context:
    """Readings by signal name, and the bases that percentages refer to."""

    values: Mapping[str, Reading]
    bases: Mapping[str, Reading]  # "memory.total", "swap.total", "limits.memory"
    # GPU devices by index: {"0": {"gpu.used": .., "gpu.free": .., "gpu.total": ..}}
    gpus: Mapping[str, Mapping[str, Reading]] = field(default_factory=dict)
    # Rate of change per second of trended readings (decide.trend): "memory.available" (negative while
    # memory fills), "memory.used", "worker.memory".
    rates: Mapping[str, Reading] = field(default_factory=dict)

    def gpu_values(self, c: Comparison) -> list[tuple[str, Reading, Reading, Reading]]:
        """(device, value in the comparison's unit, raw bytes, device total) for each device ``c`` is about."""
        out = []
        for index, dev in sorted(self.gpus.items()):
            if c.device is not None and index != c.device:
                continue
            raw = dev.get(c.signal, Unknown("no reading"))
            total = dev.get("gpu.total", Unknown("no total"))
            if c.unit == "percent":
                if is_known(raw) and is_known(total) and total > 0:
                    out.append((index, 100.0 * float(raw) / float(total), raw, total))
                else:
                    out.append((index, Unknown("unknown"), raw, total))
            else:
                out.append((index, raw, raw, total))
        return out

    def value(self, c: Comparison) -> Reading:
        """The reading of ``c.signal`` in the comparison's unit."""
        if c.signal.startswith("gpu."):
            vals = [v for _, v, _, _ in self.gpu_values(c) if is_known(v)]
            if not vals:
                return Unknown("no GPU reading")
            # the device closest to firing decides (any device may fire the rule)
            return min(vals) if c.op in ("<", "<=") else max(vals)
        raw = self.values.get(c.signal, Unknown("no such reading"))
        if not is_known(raw):
            return raw
        if c.unit == "percent":
            spec = SIGNALS[c.signal]
            if spec.percent_of is None:
                return raw  # the signal is a percentage already (PSI)
            base = self.bases.get(spec.percent_of, Unknown(f"{spec.percent_of} unknown"))
            if not is_known(base) or base <= 0:
                return Unknown(f"{spec.percent_of} is unknown or zero")
            return 100.0 * float(raw) / float(base)
        return raw

    def base_bytes(self, c: Comparison) -> Reading:
        spec = SIGNALS[c.signal]
        if spec.percent_of is None:
            return Unknown("no base")
        return self.bases.get(spec.percent_of, Unknown("no base"))


def _compare(c: Comparison, ctx: Context) -> bool | None:
    if c.signal.startswith("gpu."):
        results = [None if not is_known(v) else _OPS[c.op](float(v), c.threshold)
                   for _, v, _, _ in ctx.gpu_values(c)]
        if any(r is True for r in results):
            return True
        return None if (not results or any(r is None for r in results)) else False
    v = ctx.value(c)
    if not is_known(v):
        return None
    return _OPS[c.op](float(v), c.threshold)


def evaluate(expr: Expr, ctx: Context) -> bool | None:
    """True, False, or None (unknown)."""
    if isinstance(expr, Comparison):
        return _compare(expr, ctx)
    results = [evaluate(a, ctx) for a in expr.args]
    if expr.op == "and":
        if any(r is False for r in results):
            return False
        return None if any(r is None for r in results) else True
    if any(r is True for r in results):
        return True
    return None if any(r is None for r in results) else False


def deciding(expr: Expr, ctx: Context) -> Comparison | None:
    """The first comparison that holds, the one an explanation quotes."""
    if isinstance(expr, Comparison):
        return expr if _compare(expr, ctx) is True else None
    for arg in expr.args:
        found = deciding(arg, ctx)
        if found is not None:
            return found
    return None


def _show(value: float, unit: str) -> str:
    if unit == "bytes":
        return format_size(value)
    if unit == "seconds":
        return format_duration(value)
    if unit == "bytes_per_second":
        return f"{format_size(value)}/s"
    if unit == "percent":
        return f"{value:.1f}%"
    return f"{value:g}"


def explain(rule_name: str, when_text: str, expr: Expr, ctx: Context, source: str = "") -> Explanation:
    """Which reading against which threshold made ``expr`` true, in numbers and words."""
    c = deciding(expr, ctx)
    if c is None:
        return Explanation(rule_name, when_text, "", None, None, "", f"{when_text}", source)
    spec = SIGNALS[c.signal]
    if c.signal.startswith("gpu."):
        for index, v, raw_b, total in ctx.gpu_values(c):
            if is_known(v) and _OPS[c.op](float(v), c.threshold):
                name = c.signal.replace("gpu.", f"gpu[{index}].")
                shown = format_size(float(raw_b)) + (
                    f" ({float(v):.1f}% of {format_size(float(total))})" if c.unit == "percent" else "")
                threshold_abs = (c.threshold / 100.0 * float(total)) if c.unit == "percent" else c.threshold
                display = f"{name} {shown} {c.op} {c.describe_threshold()}"
                return Explanation(rule_name, when_text, name, float(raw_b), threshold_abs, "bytes", display, source,
                                   gpu_device=index)
        return Explanation(rule_name, when_text, c.signal, None, None, "bytes", f"{when_text}", source,
                           gpu_device=c.device or "*")
    raw = ctx.values.get(c.signal)
    value = float(raw) if raw is not None and is_known(raw) else None
    base = ctx.base_bytes(c)
    if c.unit == "percent" and spec.percent_of is not None:
        pct = ctx.value(c)
        threshold_abs = c.threshold / 100.0 * float(base) if is_known(base) else None
        shown_value = f"{_show(value, spec.unit)} ({float(pct):.1f}% of {_show(float(base), spec.unit)})" if (
            value is not None and is_known(pct) and is_known(base)) else "unknown"
        shown_threshold = f"{c.threshold:g}%" + (
            f" ({_show(threshold_abs, spec.unit)})" if threshold_abs is not None else "")
        display = f"{c.signal} {shown_value} {c.op} {shown_threshold}"
        return Explanation(rule_name, when_text, c.signal, value, threshold_abs, spec.unit, display, source)
    shown = _show(value, c.unit) if value is not None else "unknown"
    display = f"{c.signal} {shown} {c.op} {c.describe_threshold()}"
    return Explanation(rule_name, when_text, c.signal, value, c.threshold, c.unit, display, source)


def distance_to_fire(expr: Expr, ctx: Context) -> float | None:
    """How far (as a fraction of the comparison's scale) the readings are from making ``expr`` true.

    0 when it holds, None when unknown. The scale of a comparison is its
    percentage base (100 points) or, without a base, its threshold. Used
    to poll faster near a threshold.
    """
    if isinstance(expr, Comparison):
        v = ctx.value(expr)
        if not is_known(v):
            return None
        v = float(v)
        if _OPS[expr.op](v, expr.threshold):
            return 0.0
        scale = 100.0 if expr.unit == "percent" else max(abs(expr.threshold), 1e-9)
        return abs(v - expr.threshold) / scale
    ds = [distance_to_fire(a, ctx) for a in expr.args]
    known = [d for d in ds if d is not None]
    if not known:
        return None
    return max(known) if expr.op == "and" else min(known)


_MEMORY_SIGNALS = {"memory.available": -1, "memory.used": +1}


def headroom_bytes(expr: Expr, ctx: Context, total: float) -> float | None:
    """Bytes the scope can still fill before a memory comparison of ``expr`` holds.

    Only ``memory.available`` falling (``<``, ``<=``) and ``memory.used``
    rising (``>``, ``>=``) count: those are the crossings a fast-filling
    hog causes. None when ``expr`` has no such comparison.
    """
    if isinstance(expr, Comparison):
        direction = _MEMORY_SIGNALS.get(expr.signal)
        if direction is None:
            return None
        if direction < 0 and expr.op not in ("<", "<="):
            return None
        if direction > 0 and expr.op not in (">", ">="):
            return None
        raw = ctx.values.get(expr.signal)
        if raw is None or not is_known(raw):
            return None
        threshold = expr.threshold / 100.0 * total if expr.unit == "percent" else expr.threshold
        gap = (float(raw) - threshold) if direction < 0 else (threshold - float(raw))
        return max(gap, 0.0)
    rooms = [headroom_bytes(a, ctx, total) for a in expr.args]
    known = [r for r in rooms if r is not None]
    if not known:
        return None
    # An "and" holds only when all of its memory parts hold, but the other
    # parts may already hold: the nearest memory crossing is what matters.
    return min(known)
