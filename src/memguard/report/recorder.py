"""The flight recorder: the last minutes of what the daemon sampled, kept in fixed memory.

Every tick the daemon already has an :class:`~memguard.model.Observation`
and the actions the core decided; :class:`FlightRecorder` keeps them in
bounded rings so that an incident can carry the minutes before a death
(and the seconds after it) without anything being read again.

Two rings of fixed capacity, one float per series per slot:

- the **scope ring** takes every tick (fast-path ticks included): the
  scope's available and total memory, swap, the kernel OOM counter and
  PSI; one slot per ``fast_resolution_s`` (default 0.5 s). Ticks that fall
  in the same slot are merged keeping the worst value (lowest available,
  highest pressure), so a spike between two slots is never lost;
- the **full ring** takes full ticks only: each worker's memory and GPU
  memory, each GPU's used and total memory, and whether a trial is
  running; one slot per ``resolution_s`` (default 1 s), merged keeping the
  highest memory.

Values are 32-bit floats (a 100 GiB figure is exact to 8 KiB); times
64-bit. An unknown reading is NaN, shown as ``null`` in a timeline.
Columns of workers that are gone are dropped once the window holds no
value of theirs. A worker's growth (bytes per second over the last five
full ticks) is computed from its memory series when a timeline is asked
for, not stored. Marks (memguard's decisions, spawns, exits, trial
events) go in a bounded deque.

Cost: a window of 600 s is 1200 scope slots x 9 series and 600 full slots
x (1 + 3 per worker + 2 per GPU) series; ``bench/recorder.py`` measures
the bytes and the time per tick (see docs/benchmarks.md).

No I/O, no clock: times are the observation's ``at`` (monotonic seconds).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from typing import Any, Iterable, Mapping, Sequence

from ..model import (
    Action,
    Exited,
    Notice,
    Observation,
    Signal,
    SignalProcess,
    Spawn,
    Spawned,
    SpawnFailed,
    TrialEvent,
    is_known,
    signal_name,
)

__all__ = ["FlightRecorder", "DEFAULT_WINDOW_S", "DEFAULT_RESOLUTION_S", "DEFAULT_FAST_RESOLUTION_S",
           "DEFAULT_MAX_MARKS", "SCOPE_SERIES"]

DEFAULT_WINDOW_S = 600.0
"""How far back the recorder remembers, seconds (10 minutes): long enough to
show a leak's slope before a death, short enough to stay small."""

DEFAULT_RESOLUTION_S = 1.0
"""One full-tick slot per second: the daemon's full ticks come about once a second."""

DEFAULT_FAST_RESOLUTION_S = 0.5
"""One scope slot per half second: fast ticks near a threshold come every
10-100 ms; keeping the worst value of each half second shows a 3-second
spike with six points and costs twice the full ring's slots."""

DEFAULT_MAX_MARKS = 500
"""Decisions and lifecycle events kept (oldest dropped first): one every
1.2 s over the whole window, far more than a healthy machine makes; about
250 KiB when full."""

TIMELINE_MAX_MARKS = 200
"""Marks put in one timeline at most (the latest): an incident needs the
decisions just before it, not every restart of a loop."""

NAN = float("nan")


class Mark:
    """One moment on the timeline: a decision, a lifecycle event, a kernel kill. Compact (slots)."""

    __slots__ = ("at", "event", "worker", "pid", "text", "rule", "signal", "value", "threshold", "sent", "extra")

    def __init__(self, at: float, event: str, fields: Mapping[str, Any]) -> None:
        self.at = at
        self.event = event
        f = dict(fields)
        self.worker = f.pop("worker", None)
        self.pid = f.pop("pid", None)
        self.text = f.pop("text", None)
        self.rule = f.pop("rule", None)
        self.signal = f.pop("signal", None)
        self.value = f.pop("value", None)
        self.threshold = f.pop("threshold", None)
        self.sent = f.pop("sent", None)
        f.pop("unit", None)
        self.extra = {k: v for k, v in f.items() if v is not None and v != ""} or None

    def to_dict(self, around: float) -> dict[str, Any]:
        d: dict[str, Any] = {"at": self.at, "t": round(self.at - around, 3), "event": self.event}
        for k in ("worker", "pid", "text", "rule", "signal", "value", "threshold", "sent"):
            v = getattr(self, k)
            if v is not None and v != "":
                d[k] = v
        if self.extra:
            d.update(self.extra)
        return d

# (series, aggregation within a slot)
SCOPE_SERIES: tuple[tuple[str, str], ...] = (
    ("available_bytes", "min"),
    ("total_bytes", "last"),
    ("swap_free_bytes", "min"),
    ("swap_total_bytes", "last"),
    ("oom_kills", "max"),
    ("psi_some_avg10", "max"),
    ("psi_full_avg10", "max"),
    ("psi_some_avg60", "max"),
    ("psi_full_avg60", "max"),
)

_WORKER_SERIES = (("memory_bytes", "max"), ("gpu_memory_bytes", "max"), ("trial", "max"))
_GPU_SERIES = (("used_bytes", "max"), ("total_bytes", "last"))


def _num(v: object) -> float:
    if isinstance(v, bool) or not is_known(v) or v is None:
        return NAN
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return NAN


class _Ring:
    """Fixed-capacity rows of (time, column values). Columns are added lazily, all the same length."""

    def __init__(self, capacity: int, resolution_s: float) -> None:
        if capacity < 2:
            raise ValueError("a ring needs at least 2 slots")
        self.capacity = capacity
        self.resolution_s = resolution_s
        self.times = array("d", [NAN]) * capacity
        self.cols: dict[str, array] = {}
        self.aggs: dict[str, str] = {}
        self.head = -1  # index of the newest slot
        self.size = 0
        self._slot = None  # slot number (time // resolution) of the newest row

    def column(self, name: str, agg: str) -> array:
        col = self.cols.get(name)
        if col is None:
            col = self.cols[name] = array("f", [NAN]) * self.capacity
            self.aggs[name] = agg
        return col

    def push(self, at: float, values: Mapping[str, tuple[float, str]]) -> None:
        slot = math.floor(at / self.resolution_s)
        if self._slot is not None and slot == self._slot and self.head >= 0:
            i = self.head
            self.times[i] = at
            for name, (v, agg) in values.items():
                col = self.column(name, agg)
                old = col[i]
                if math.isnan(old) or agg == "last":
                    col[i] = v
                elif not math.isnan(v):
                    col[i] = min(old, v) if agg == "min" else max(old, v)
            return
        self.head = (self.head + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self._slot = slot
        i = self.head
        self.times[i] = at
        for col in self.cols.values():
            col[i] = NAN
        for name, (v, agg) in values.items():
            self.column(name, agg)[i] = v

    def indices(self, start: float, end: float) -> list[int]:
        """Slot indices oldest first whose time is in [start, end]."""
        out = []
        for k in range(self.size):
            i = (self.head - self.size + 1 + k) % self.capacity
            t = self.times[i]
            if start <= t <= end:
                out.append(i)
        return out

    def drop_empty(self, keep: Iterable[str] = ()) -> int:
        """Remove columns with no value in the ring (a worker long gone)."""
        keep = set(keep)
        gone = [n for n, col in self.cols.items() if n not in keep and all(math.isnan(x) for x in col)]
        for n in gone:
            del self.cols[n]
            del self.aggs[n]
        return len(gone)

    def nbytes(self) -> int:
        return self.times.itemsize * len(self.times) + sum(c.itemsize * len(c) for c in self.cols.values())


class FlightRecorder:
    """The last ``window_s`` seconds of observations and decisions, in fixed memory.

    Feed it :meth:`record` once per tick (every tick, fast ones too) and
    :meth:`record_actions` with what the core decided; ask
    :meth:`timeline` for the minutes around an incident.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, *, resolution_s: float = DEFAULT_RESOLUTION_S,
                 fast_resolution_s: float = DEFAULT_FAST_RESOLUTION_S, max_marks: int = DEFAULT_MAX_MARKS) -> None:
        if window_s <= 0 or resolution_s <= 0 or fast_resolution_s <= 0:
            raise ValueError("window_s, resolution_s and fast_resolution_s must be positive")
        self.window_s = float(window_s)
        self.scope = _Ring(max(2, math.ceil(window_s / fast_resolution_s)), fast_resolution_s)
        self.full = _Ring(max(2, math.ceil(window_s / resolution_s)), resolution_s)
        self.marks: deque[Mark] = deque(maxlen=max_marks)
        self.thresholds: dict[str, list[tuple[str, float]]] = {}
        self._trial: dict[str, float] = {}
        self._live: set[str] = set()
        self._pushes = 0
        self.latest_at: float | None = None

    # -- input -----------------------------------------------------------

    def record(self, obs: Observation) -> None:
        """One tick's observation (fast or full), and the worker events it carries."""
        at = obs.at
        self.latest_at = at if self.latest_at is None else max(self.latest_at, at)
        s = obs.scope
        p = obs.pressure
        self.scope.push(at, {
            "available_bytes": (_num(s.available_bytes), "min"),
            "total_bytes": (_num(s.total_bytes), "last"),
            "swap_free_bytes": (_num(s.swap_free_bytes), "min"),
            "swap_total_bytes": (_num(s.swap_total_bytes), "last"),
            "oom_kills": (_num(s.oom_kills), "max"),
            "psi_some_avg10": (_num(p.some_avg10), "max"),
            "psi_full_avg10": (_num(p.full_avg10), "max"),
            "psi_some_avg60": (_num(p.some_avg60), "max"),
            "psi_full_avg60": (_num(p.full_avg60), "max"),
        })
        for ev in obs.events:
            self._event(ev)
        if not obs.full:
            return
        values: dict[str, tuple[float, str]] = {}
        live = set()
        for name, w in obs.workers.items():
            live.add(name)
            values[f"worker[{name}].memory_bytes"] = (_num(w.memory_bytes), "max")
            values[f"worker[{name}].gpu_memory_bytes"] = (_num(w.gpu_memory_bytes), "max")
            if name in self._trial:
                values[f"worker[{name}].trial"] = (self._trial[name], "max")
        for g in obs.gpus:
            values[f"gpu[{g.index}].used_bytes"] = (_num(g.used_bytes), "max")
            values[f"gpu[{g.index}].total_bytes"] = (_num(g.total_bytes), "last")
        self.full.push(at, values)
        self._live = live
        self._pushes += 1
        if self._pushes % self.full.capacity == 0:
            self.full.drop_empty()

    def _event(self, ev: object) -> None:
        if isinstance(ev, TrialEvent):
            if ev.kind == "start":
                self._trial[ev.worker] = 1.0
            elif ev.kind == "end":
                self._trial[ev.worker] = 0.0
            self._mark(ev.at, "trial", worker=ev.worker, detail=ev.kind,
                       text=f"trial {ev.kind}" + (f" {ev.name}" if ev.name else "") +
                       ("" if ev.ok is None else (" ok" if ev.ok else " failed")))
        elif isinstance(ev, Spawned):
            if ev.worker in self._trial:
                self._trial[ev.worker] = 0.0
            self._mark(ev.at, "spawned", worker=ev.worker, pid=ev.pid, text=f"started (pid {ev.pid})")
        elif isinstance(ev, SpawnFailed):
            self._mark(ev.at, "spawn_failed", worker=ev.worker, text=ev.error)
        elif isinstance(ev, Exited):
            if ev.worker in self._trial:
                self._trial[ev.worker] = 0.0
            how = f"signal {signal_name(ev.signal)}" if ev.signal is not None else f"exit {ev.returncode}"
            self._mark(ev.at, "exited", worker=ev.worker, pid=ev.pid,
                       text=how + (" (kernel OOM kill)" if ev.kernel_oom else ""))

    def record_actions(self, at: float, actions: Sequence[Action]) -> None:
        """What the core decided this tick (reported whether carried out or not)."""
        for a in actions:
            if isinstance(a, Notice) and a.level == "debug":
                continue
            fields: dict[str, Any] = {}
            explain = getattr(a, "explain", None)
            if explain is not None:
                fields.update(rule=explain.rule, signal=explain.signal, value=explain.value,
                              threshold=explain.threshold, unit=explain.unit)
            if isinstance(a, (Signal, SignalProcess)):
                fields["sent"] = signal_name(a.signum)
            worker = getattr(a, "worker", None)
            pid = getattr(a, "pid", None)
            text = explain.display if explain is not None else getattr(a, "reason", "")
            kind = a.event if not isinstance(a, Spawn) else "spawn"
            self._mark(at, kind, worker=worker, pid=pid, text=text, action=True, **fields)

    def record_mark(self, at: float, kind: str, **fields: Any) -> None:
        """Any other moment worth a mark on the timeline (a kernel OOM kill, a reload, an incident)."""
        self._mark(at, kind, **fields)

    def _mark(self, at: float, kind: str, **fields: Any) -> None:
        self.marks.append(Mark(at, kind, fields))

    def set_thresholds(self, thresholds: Mapping[str, Sequence[tuple[str, float]]]) -> None:
        """Static lines to draw: ``{"scope.available_bytes": [("host-low", 1.6e9)], ...}`` (series names as in
        :meth:`timeline`)."""
        self.thresholds = {k: list(v) for k, v in thresholds.items()}

    # -- output -----------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the rings' arrays (the marks deque not counted)."""
        return self.scope.nbytes() + self.full.nbytes()

    def timeline(self, window_s: float = 120.0, *, around: float | None = None, after_s: float = 0.0,
                 workers: Sequence[str] | None = None, max_workers: int = 8,
                 max_marks: int = TIMELINE_MAX_MARKS) -> dict[str, Any]:
        """The recorded window ``[around - window_s, around + after_s]`` as a JSON-ready dict.

        ``around`` defaults to the newest sample. Times are seconds relative
        to ``around``. ``workers`` limits the worker series to those named;
        by default the ``max_workers`` with the highest peak memory in the
        window. Values are ints (bytes, counts) or floats (percent), None
        where unknown. At most ``max_marks`` marks, the latest (a restart
        loop can make thousands; ``marks_left_out`` counts the rest).
        """
        if around is None:
            around = self.latest_at if self.latest_at is not None else 0.0
        start, end = around - window_s, around + after_s
        out: dict[str, Any] = {"around_monotonic": around, "window_s": window_s, "after_s": after_s}
        scope = self._section(self.scope, start, end, around, None)
        _derive(scope, "used_bytes", "total_bytes", "available_bytes")
        _derive(scope, "swap_used_bytes", "swap_total_bytes", "swap_free_bytes")
        out["scope"] = scope
        idx = self.full.indices(start, end)
        names = self._pick_workers(idx, workers, max_workers)
        keep = [n for n in self.full.cols if n.startswith("gpu[") or
                any(n.startswith(f"worker[{w}].") for w in names)]
        full = self._section(self.full, start, end, around, keep)
        summary: dict[str, dict[str, Any]] = {}
        for w in names:
            mem = full.get(f"worker[{w}].memory_bytes")
            if mem is None:
                continue
            known = [v for v in mem if v is not None]
            growth = [g for g in _growth(full["t"], mem) if g is not None]
            summary[w] = {"peak_bytes": max(known) if known else None, "last_bytes": known[-1] if known else None,
                          "growth_bytes_per_s": growth[-1] if growth else None}
        out["full"] = full
        out["worker_summary"] = summary
        marks = [m.to_dict(around) for m in self.marks if start <= m.at <= end]
        out["thresholds"] = self._thresholds(marks)
        if len(marks) > max_marks:
            out["marks_left_out"] = len(marks) - max_marks
            marks = marks[-max_marks:]
        out["marks"] = marks
        out["workers"] = names
        return out

    def _pick_workers(self, idx: list[int], workers: Sequence[str] | None, max_workers: int) -> list[str]:
        all_names = sorted({n[len("worker["):n.index("]")] for n in self.full.cols if n.startswith("worker[")})
        if workers is not None:
            return [w for w in workers if w in all_names]
        peaks = []
        for w in all_names:
            col = self.full.cols.get(f"worker[{w}].memory_bytes")
            vals = [col[i] for i in idx if col is not None and not math.isnan(col[i])]
            if vals:
                peaks.append((max(vals), w))
        peaks.sort(reverse=True)
        return sorted(w for _, w in peaks[:max_workers])

    def _section(self, ring: _Ring, start: float, end: float, around: float,
                 names: Sequence[str] | None) -> dict[str, Any]:
        idx = ring.indices(start, end)
        sec: dict[str, Any] = {"resolution_s": ring.resolution_s,
                               "t": [round(ring.times[i] - around, 3) for i in idx]}
        for name in (names if names is not None else list(ring.cols)):
            col = ring.cols.get(name)
            if col is None:
                continue
            vals = [_out(col[i], name) for i in idx]
            if any(v is not None for v in vals):
                sec[name] = vals
        return sec

    def _thresholds(self, marks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen = set()
        for series, lines in self.thresholds.items():
            for label, value in lines:
                out.append({"series": series, "value": value, "label": label})
                seen.add((series, value))
        for m in marks:
            if m.get("threshold") is None or not m.get("signal"):
                continue
            series = _series_of_signal(str(m["signal"]), m.get("worker"))
            if series is None:
                continue
            key = (series, m["threshold"])
            if key not in seen:
                seen.add(key)
                out.append({"series": series, "value": m["threshold"], "label": m.get("rule") or m["signal"],
                            "signal": m["signal"]})
        return out


def _out(v: float, name: str) -> int | float | None:
    if math.isnan(v):
        return None
    if name.endswith("_bytes") or name.endswith("oom_kills") or name.endswith(".trial"):
        return int(round(v))
    return round(v, 2)


def _growth(t: list[float], mem: list[Any], span: int = 5) -> list[float | None]:
    """Memory growth rate, bytes per second, over the last ``span`` samples at each point."""
    out: list[float | None] = []
    for i in range(len(t)):
        j = max(0, i - span)
        a, b = mem[j], mem[i]
        dt = t[i] - t[j]
        if a is None or b is None or dt <= 0:
            out.append(None)
        else:
            out.append(round((b - a) / dt, 1))
    return out


def _derive(sec: dict[str, Any], name: str, total: str, part: str) -> None:
    """``sec[name] = sec[total] - sec[part]`` point by point (None where either is unknown)."""
    a, b = sec.get(total), sec.get(part)
    if a is None or b is None:
        return
    vals = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
    if any(v is not None for v in vals):
        sec[name] = vals


def _series_of_signal(signal: str, worker: str | None) -> str | None:
    """The timeline series a rule's signal is drawn on (None for signals that are not drawn)."""
    s = signal.lower()
    if s.startswith("worker."):
        if not worker:
            return None
        return {"worker.memory": f"worker[{worker}].memory_bytes",
                "worker.gpu_memory": f"worker[{worker}].gpu_memory_bytes",
                "worker.growth": f"worker[{worker}].growth_bytes_per_s"}.get(s)
    simple = {"memory.available": "scope.available_bytes", "memory.used": "scope.used_bytes",
              "swap.used": "scope.swap_used_bytes", "swap.free": "scope.swap_free_bytes"}
    if s in simple:
        return simple[s]
    if s.startswith("psi."):
        return "scope.psi_" + s[len("psi."):]
    if s.startswith("gpu[") and "]." in s:
        dev, _, what = s.partition("].")
        return f"{dev}].{what}_bytes" if what in ("used", "free") else None
    return None
