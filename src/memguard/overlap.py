"""Does a rule's ``release:`` overlap its ``when:``? A proof, or silence.

A ``block`` or ``warn`` rule fires when ``when`` holds and ends when
``release`` holds. If one reading can make both true, the rule fires, is
released on the next tick, fires again on the tick after, and so on: it
flaps at the polling rate. A release must lie past the threshold on the
far side (``when: worker.memory > 85%``, ``release: worker.memory < 75%``).

:func:`find_overlap` looks for a reading that makes both expressions true
and returns a sentence naming it, or None. It answers only when it can
prove the overlap; where it cannot tell, it says nothing (the rule is
accepted). The method:

1. Each expression becomes a disjunction of conjunctions (and/or are
   distributed; at most :data:`MAX_TERMS` terms, else no answer).
2. For each pair (a term of ``when``, a term of ``release``) the
   comparisons are grouped by the quantity they constrain. Each quantity
   is a number on one axis with its domain (bytes >= 0, a share of a
   total in [0, 100], whole counts >= 0, any rate), and every comparison
   (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``) cuts that axis to an
   interval, less some excluded points. The pair overlaps when every
   quantity keeps at least one value.
3. Quantities are the same only when they are provably the same axis:
   ``memory.used`` as a percentage is 100 minus ``memory.available`` as a
   percentage (likewise swap and GPU used/free), and ``worker.memory`` as
   a percentage is a size once ``limits.memory`` is known. A term that
   mixes forms that cannot be converted here (``memory.available < 10%``
   with ``memory.available > 1GiB``: it depends on the machine's total)
   proves nothing and is skipped. ``gpu.used`` (any device) is treated as
   one device: values that satisfy both on one device are a real reading
   of a one-GPU machine.

Pure: no I/O, no clock; importable from anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .expr import Comparison, Expr
from .signals import SIGNALS
from .units import format_duration, format_size

__all__ = ["find_overlap", "MAX_TERMS"]

MAX_TERMS = 256
"""The most conjunctions an expression may expand to before the analysis
gives up (and accepts the rule). ``(a or b) and (c or d) and ...`` doubles
with each group; 256 terms is eight such groups, past any rule written by
hand, and keeps the check to well under a millisecond."""

_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_FAR_SIDE = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}

# Signals that are two views of one quantity: used = total - free.
_COMPLEMENT = {"memory.used": "memory.available", "swap.used": "swap.free", "gpu.used": "gpu.free"}


@dataclass(frozen=True)
class _Axis:
    """One quantity a comparison constrains, in one coordinate."""

    group: str  # the quantity ("memory", "gpu:0", "worker.memory"): one coordinate per group per term
    coord: str  # the coordinate within the group ("percent available", "bytes")
    integer: bool = False
    lo: float = -math.inf  # the domain
    hi: float = math.inf


@dataclass
class _Interval:
    lo: float
    hi: float
    lo_closed: bool = True
    hi_closed: bool = True
    excluded: set[float] = field(default_factory=set)

    def cut(self, op: str, v: float) -> None:
        if op in ("<", "<="):
            closed = op == "<="
            if v < self.hi or (v == self.hi and not closed):
                self.hi, self.hi_closed = v, closed
        elif op in (">", ">="):
            closed = op == ">="
            if v > self.lo or (v == self.lo and not closed):
                self.lo, self.lo_closed = v, closed
        elif op == "==":
            self.cut("<=", v)
            self.cut(">=", v)
        else:  # "!="
            self.excluded.add(v)

    def point(self, integer: bool) -> float | None:
        """A value inside, or None when empty."""
        if integer:
            a = self.lo if self.lo_closed else math.floor(self.lo) + 1
            a = math.ceil(a) if math.isfinite(a) else 0.0
            b = self.hi if self.hi_closed else math.ceil(self.hi) - 1
            b = math.floor(b) if math.isfinite(b) else math.inf
            x = a
            while x <= b and x <= a + len(self.excluded) + 1:
                if x not in self.excluded:
                    return float(x)
                x += 1
            return None
        if self.lo > self.hi:
            return None
        if self.lo == self.hi:
            ok = self.lo_closed and self.hi_closed and self.lo not in self.excluded
            return self.lo if ok else None
        # A stretch of positive length: pick a point inside that no != excludes.
        if math.isfinite(self.lo) and math.isfinite(self.hi):
            candidates = [(self.lo + self.hi) / 2]
        elif math.isfinite(self.lo):
            candidates = [self.lo * 2 if self.lo > 0 else self.lo + 1]
        elif math.isfinite(self.hi):
            candidates = [self.hi / 2 if self.hi > 0 else self.hi - 1]
        else:
            candidates = [0.0]
        for _ in range(len(self.excluded) + 2):
            x = candidates[-1]
            if x not in self.excluded and (self.lo < x < self.hi):
                return x
            lo = self.lo if math.isfinite(self.lo) else x - 1
            candidates.append((lo + x) / 2)
        return None  # pragma: no cover - finitely many exclusions cannot cover an open stretch


def _axis(c: Comparison, bases: Mapping[str, float]) -> tuple[_Axis, str, float] | None:
    """The axis, operator and value of ``c`` in that axis' coordinate; None when it cannot be placed."""
    spec = SIGNALS.get(c.signal)
    if spec is None:
        return None
    op, v = c.op, c.threshold
    if c.signal.startswith("gpu."):
        group = f"gpu:{c.device if c.device is not None else '*'}"
    elif c.signal.startswith(("memory.", "swap.")):
        group = c.signal.split(".")[0]
    else:
        group = c.signal
    if c.unit == "percent" and spec.percent_of is not None and spec.percent_of.startswith("limits."):
        base = bases.get(spec.percent_of)
        if base is None or base <= 0:
            return _Axis(group, "percent", lo=0.0), op, v
        return _Axis(group, "bytes", lo=0.0), op, v / 100.0 * base
    if c.signal in _COMPLEMENT or c.signal in _COMPLEMENT.values():
        if c.unit == "percent":
            if c.signal in _COMPLEMENT:  # used% = 100 - free%: flip onto the free axis
                op, v = _FLIP[op], 100.0 - v
            return _Axis(group, "percent free", lo=0.0, hi=100.0), op, v
        # Sizes of used and of free are different axes (the total is not known here).
        return _Axis(group, f"bytes {c.signal.split('.')[1]}", lo=0.0), op, v
    if c.unit == "percent":
        return _Axis(group, "percent", lo=0.0, hi=100.0 if spec.percent_of is None else math.inf), op, v
    if c.unit == "count":
        return _Axis(group, "count", integer=True, lo=0.0), op, v
    if c.unit == "bytes_per_second":
        return _Axis(group, "rate"), op, v
    return _Axis(group, c.unit, lo=0.0), op, v


def _terms(expr: Expr) -> list[list[Comparison]] | None:
    """``expr`` as a disjunction of conjunctions; None past :data:`MAX_TERMS`."""
    if isinstance(expr, Comparison):
        return [[expr]]
    parts = [_terms(a) for a in expr.args]
    if any(p is None for p in parts):
        return None
    if expr.op == "or":
        out = [t for p in parts for t in p]  # type: ignore[union-attr]
        return out if len(out) <= MAX_TERMS else None
    acc: list[list[Comparison]] = [[]]
    for p in parts:
        acc = [a + b for a in acc for b in p]  # type: ignore[union-attr]
        if len(acc) > MAX_TERMS:
            return None
    return acc


def _witness(term: list[Comparison], bases: Mapping[str, float]) -> dict[_Axis, float] | None:
    """Values, one per axis, that make every comparison of ``term`` true; None if none or not provable."""
    placed = [_axis(c, bases) for c in term]
    if any(p is None for p in placed):
        return None
    coords: dict[str, str] = {}
    intervals: dict[_Axis, _Interval] = {}
    for axis, op, v in placed:  # type: ignore[misc]
        if coords.setdefault(axis.group, axis.coord) != axis.coord:
            return None  # two forms of one quantity that cannot be converted here: proves nothing
        iv = intervals.setdefault(axis, _Interval(axis.lo, axis.hi))
        iv.cut(op, v)
    groups = set(coords)
    if "gpu:*" in groups and any(g.startswith("gpu:") and g != "gpu:*" for g in groups):
        return None  # "any device" next to a named device: depends on how many devices there are
    out: dict[_Axis, float] = {}
    for axis, iv in intervals.items():
        x = iv.point(axis.integer)
        if x is None:
            return None
        out[axis] = x
    return out


def _free_name(group: str) -> str:
    """The signal a "percent free" axis is shown as."""
    if group == "memory":
        return "memory.available"
    if group == "swap":
        return "swap.free"
    device = group.partition(":")[2]
    return "gpu.free" if device == "*" else f"gpu[{device}].free"


def _show(axis: _Axis, x: float, term: list[Comparison], bases: Mapping[str, float]) -> str:
    """A witness value in the words of the rule: ``worker.memory at 2.2GiB (27.5% of limits.memory)``."""
    name = axis.group
    used = False
    for c in term:
        placed = _axis(c, bases)
        if placed is not None and placed[0] == axis:
            name = c.signal if c.device is None else c.signal.replace("gpu.", f"gpu[{c.device}].")
            used = c.signal in _COMPLEMENT
            break
    if axis.coord == "percent free":
        return f"{name} at {100.0 - x:g}%" if used else f"{_free_name(axis.group)} at {x:g}%"
    if axis.coord == "percent":
        return f"{name} at {x:g}%"
    if axis.coord == "bytes" and axis.group in ("worker.memory", "worker.gpu_memory"):
        base_key = SIGNALS[axis.group].percent_of or ""
        base = bases.get(base_key)
        pct = f" ({100.0 * x / base:g}% of {base_key})" if base else ""
        return f"{name} at {format_size(x)}{pct}"
    if axis.coord.startswith("bytes"):
        return f"{name} at {format_size(x)}"
    if axis.coord == "seconds":
        return f"{name} at {format_duration(x)}"
    if axis.coord == "rate":
        return f"{name} at {format_size(x)}/s" if x >= 0 else f"{name} at -{format_size(-x)}/s"
    return f"{name} at {x:g}"


def find_overlap(when: Expr, release: Expr, bases: Mapping[str, float] | None = None) -> str | None:
    """A sentence showing a reading where both ``when`` and ``release`` hold, or None.

    ``bases`` gives what percentages of worker signals are of:
    ``{"limits.memory": bytes, "limits.gpu_memory": bytes}`` where the
    workload sets them.
    """
    bases = bases or {}
    w_terms, r_terms = _terms(when), _terms(release)
    if w_terms is None or r_terms is None:
        return None
    for wt in w_terms:
        for rt in r_terms:
            both = wt + rt
            found = _witness(both, bases)
            if found is None:
                continue
            reading = ", ".join(_show(axis, x, both, bases) for axis, x in found.items())
            return f"both hold at once (for example with {reading}), so the rule would fire and release on " \
                   f"alternate ticks{_advice(when)}"
    return None


def _advice(when: Expr) -> str:
    if not isinstance(when, Comparison) or when.op not in _FAR_SIDE:
        return ": a release must be false whenever when is true, i.e. lie past the threshold on the far side"
    shown = when.signal if when.device is None else when.signal.replace("gpu.", f"gpu[{when.device}].")
    return (f": a release must lie past the threshold on the far side, e.g. "
            f"\"{shown} {_FAR_SIDE[when.op]} {when.describe_threshold()}\" or further away, "
            f"which leaves a band between the two")
