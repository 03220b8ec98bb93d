"""The trend: how fast memory fills, and rules that fire on "will hold within T".

A bursty allocator (Polars, a dataloader filling a shuffle buffer) can take
the last tenth of a machine's memory in a few hundred milliseconds: a
graceful rule that waits for ``memory.available < 10%`` to hold ``for: 3s``
never gets its turn before the last resort. A rule with ``within: T`` also
fires when its condition, moved along the recent rate of change of its
readings, holds ``T`` seconds from now::

    - {name: ahead, when: "memory.available < 5%", within: 3s, action: terminate}

The rates come from readings the core already sees: every reading of the
scope's available memory (fast ticks and full ones) goes into a short
history (:func:`note`), and the fill rate is the fall of available memory
between the oldest reading of the last :data:`TREND_WINDOW_S` and the newest
(:func:`fill_rate`): the average over a second, so a burst and the pause
after it count together, and a ramp shows within a few readings. A worker's
own memory trend comes from its full-tick samples over
:data:`WORKER_TREND_WINDOW_S`.

Only ``memory.available`` (falling), ``memory.used`` and ``worker.memory``
(rising) move with a trend; every other reading is taken as it is now. A
rate that is unknown (too few readings yet) projects nothing: the rule then
fires exactly as it would without ``within`` (unknown never escalates).

Pure functions of values: no I/O, no clock.
"""

from __future__ import annotations

from .state import evolve as replace  # dataclasses.replace without re-running __init__ (see evolve)

from ..model import Explanation, Reading, Unknown, is_known
from ..policy import Rule
from ..units import format_duration, format_size
from .evaluate import Context, deciding, evaluate, explain

__all__ = ["TREND_WINDOW_S", "WORKER_TREND_WINDOW_S", "note", "fill_rate", "endpoint_rate", "projected",
           "rule_holds", "rule_explain", "TRENDED"]

# 1 s: long enough that a burst and the pause after it average out (allocators burst for tens to
# hundreds of milliseconds), short enough that a ramp shows in the rate within a few hundred ms.
TREND_WINDOW_S = 1.0
# Readings closer than 10 ms are not kept: near a threshold the fast path reads every millisecond,
# and a hundred readings a second describe a one-second slope as well as a thousand.
_SPACING_S = 0.01
# A rate needs readings spanning at least 50 ms: two readings 1 ms apart give noise, not a slope.
_MIN_SPAN_S = 0.05
# A worker is measured on full ticks (every second far from thresholds): its trend is read over 3 s.
WORKER_TREND_WINDOW_S = 3.0

#: Signals that move along a trend (their rate is in Context.rates).
TRENDED = ("memory.available", "memory.used", "worker.memory")


def note(history: tuple[tuple[float, float], ...], at: float, value: Reading) -> tuple[tuple[float, float], ...]:
    """``history`` with the reading ``value`` taken at ``at``: readings kept at least 10 ms apart (the newest
    always), cut to the window plus the last reading before it (so a slow tick still leaves a pair)."""
    if not is_known(value):
        return history
    kept = history
    if len(kept) >= 2 and at - kept[-2][0] < _SPACING_S:
        kept = kept[:-1]  # the newest slot moves on until it is 10 ms past the one before
    kept = kept + ((at, float(value)),)
    start = 0
    while start + 1 < len(kept) and at - kept[start + 1][0] > TREND_WINDOW_S:
        start += 1
    return kept[start:]


def endpoint_rate(history: tuple[tuple[float, float], ...], now: float, window_s: float) -> Reading:
    """Change per second between the oldest reading of the last ``window_s`` (the last one before it when the
    window holds only the newest) and the newest; Unknown when they span less than 50 ms."""
    if len(history) < 2:
        return Unknown("not enough readings for a trend yet")
    newest = history[-1]
    inside = [p for p in history if now - p[0] <= window_s]
    before = [p for p in history if now - p[0] > window_s]
    oldest = inside[0] if inside else newest
    if newest[0] - oldest[0] < _MIN_SPAN_S and before:
        oldest = before[-1]
    span = newest[0] - oldest[0]
    if span < _MIN_SPAN_S:
        return Unknown("not enough readings for a trend yet")
    return (newest[1] - oldest[1]) / span


def fill_rate(trend: tuple[tuple[float, float], ...], now: float) -> Reading:
    """Bytes per second by which the scope's available memory fell over the last second (negative: it rose)."""
    rate = endpoint_rate(trend, now, TREND_WINDOW_S)
    return -float(rate) if is_known(rate) else rate


def projected(ctx: Context, seconds: float) -> Context:
    """``ctx`` moved ``seconds`` ahead along the known rates of its trended readings."""
    values = dict(ctx.values)
    for name, rate in ctx.rates.items():
        v = values.get(name)
        if v is not None and is_known(v) and is_known(rate):
            values[name] = max(0.0, float(v) + float(rate) * seconds)
    return replace(ctx, values=values)


def rule_holds(rule: Rule, ctx: Context) -> bool | None:
    """Does the rule's condition hold now or, with ``within``, ``within`` seconds ahead on the trend?

    True, False or None (unknown): a projection that holds counts, one that does not leaves the
    answer to the readings as they are.
    """
    now = evaluate(rule.when, ctx)
    if rule.within_s is None or now is True:
        return now
    if evaluate(rule.when, projected(ctx, rule.within_s)) is True:
        return True
    return now


def rule_explain(rule: Rule, ctx: Context) -> Explanation:
    """The explanation of a rule that fired: the readings now, or the trend that will make it hold."""
    if rule.within_s is None or evaluate(rule.when, ctx) is True:
        return explain(rule.name, rule.when_text, rule.when, ctx, rule.source)
    ahead = projected(ctx, rule.within_s)
    c = deciding(rule.when, ahead)
    ex = explain(rule.name, rule.when_text, rule.when, ahead, rule.source)
    if c is None:
        return ex
    raw, rate = ctx.values.get(c.signal), ctx.rates.get(c.signal)
    if raw is None or rate is None or not is_known(raw) or not is_known(rate) or float(rate) == 0:
        return ex
    # When does it cross? In the comparison's unit: bytes, or percent of the base.
    value, per_s = float(raw), float(rate)
    threshold = c.threshold
    base = ctx.base_bytes(c)
    if c.unit == "percent" and is_known(base) and float(base) > 0:
        threshold = c.threshold / 100.0 * float(base)
    eta = max(0.0, (threshold - value) / per_s)
    moving = "falling" if per_s < 0 else "rising"
    now_text = format_size(value)
    if c.unit == "percent" and is_known(base) and float(base) > 0:
        now_text += f" ({100.0 * value / float(base):.1f}% of {format_size(float(base))})"
    display = (f"{c.signal} {now_text} {moving} {format_size(abs(per_s))}/s: {c.op} {c.describe_threshold()}"
               + (f" ({format_size(threshold)})" if c.unit == "percent" else "")
               + f" in {format_duration(eta)}, within {format_duration(rule.within_s)}")
    return replace(ex, value=value, threshold=threshold, unit="bytes", display=display)
