"""Pictures of an incident's timeline: a text chart for the terminal, SVG by hand, PNG through matplotlib.

All three draw the same thing: the memory in use (the scope's, and the
workers' that mattered) over the recorded window, each threshold a rule
compared it with as a dashed line, and each of memguard's actions and each
death as a mark at its moment. SVG needs nothing beyond the standard
library; PNG needs matplotlib (the ``plot`` extra), imported only when a
PNG is asked for. The daemon never imports this module.
"""

from __future__ import annotations

import math
from typing import Any, Sequence
from xml.sax.saxutils import escape

from ..units import format_size

__all__ = ["Series", "chart_series", "text_chart", "render_svg", "render_png", "PlotUnavailable"]

BLOCKS = " ▁▂▃▄▅▆▇█"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
MARK_EVENTS_SHOWN = ("warn", "terminate", "kill", "escalate", "restart", "stop", "block", "release", "reclaim", "exited",
                     "kernel_oom_kill", "spawned", "spawn_failed")


class PlotUnavailable(RuntimeError):
    """The picture format needs a library that is not installed (the message says which, and how to get it)."""


class Series:
    """One line of a chart: times (seconds relative to the incident), values (None where unknown)."""

    def __init__(self, name: str, t: Sequence[float], values: Sequence[float | None], unit: str = "bytes") -> None:
        self.name = name
        self.t = list(t)
        self.values = list(values)
        self.unit = unit

    def known(self) -> list[float]:
        return [v for v in self.values if v is not None]


def chart_series(timeline: dict[str, Any], *, max_workers: int = 3) -> tuple[list[Series], list[dict[str, Any]],
                                                                           list[dict[str, Any]]]:
    """The memory series worth drawing, the thresholds on them, the marks: (series, thresholds, marks)."""
    out: list[Series] = []
    scope = timeline.get("scope") or {}
    full = timeline.get("full") or {}
    if scope.get("used_bytes"):
        out.append(Series("memory used", scope["t"], scope["used_bytes"]))
    workers = [w for w in timeline.get("workers", []) if full.get(f"worker[{w}].memory_bytes")]
    for w in workers[:max_workers]:
        out.append(Series(f"{w} memory", full["t"], full[f"worker[{w}].memory_bytes"]))
    for name in sorted(k for k in full if k.startswith("gpu[") and k.endswith(".used_bytes")):
        if any(v for v in full[name] if v):
            out.append(Series(name.replace(".used_bytes", " used"), full["t"], full[name]))
    drawn = {"scope.used_bytes": "memory used", "scope.available_bytes": "memory used"}
    thresholds = []
    total = next((v for v in reversed(scope.get("total_bytes") or []) if v), None)
    for th in timeline.get("thresholds", []):
        series, value = th.get("series"), th.get("value")
        if value is None:
            continue
        if series == "scope.available_bytes" and total:
            # An "available below X" rule is the line "used above total - X" on the used-memory chart.
            thresholds.append({"series": "memory used", "value": total - value, "label": th.get("label", "")})
        elif series in drawn:
            thresholds.append({"series": drawn[series], "value": value, "label": th.get("label", "")})
        elif series and series.startswith("worker[") and series.endswith(".memory_bytes"):
            w = series[len("worker["):series.index("]")]
            thresholds.append({"series": f"{w} memory", "value": value, "label": th.get("label", "")})
    marks = [m for m in timeline.get("marks", []) if m.get("event") in MARK_EVENTS_SHOWN]
    return out, thresholds, marks


def _fmt(v: float, unit: str) -> str:
    return format_size(v) if unit == "bytes" else f"{v:g}"


def _columns(series: Series, t0: float, t1: float, width: int) -> list[float | None]:
    cols: list[float | None] = [None] * width
    span = max(t1 - t0, 1e-9)
    for t, v in zip(series.t, series.values):
        if v is None or t < t0 or t > t1:
            continue
        c = min(width - 1, int((t - t0) / span * width))
        cols[c] = v if cols[c] is None else max(cols[c], v)  # type: ignore[type-var]
    # Columns narrower than the sampling interval fall between samples: hold the last value
    # across them (only between two samples, never past the last, and not across a real gap).
    known = [i for i, v in enumerate(cols) if v is not None]
    step = _median_gap(series.t) / span * width if len(series.t) > 1 else 0
    for a, b in zip(known, known[1:]):
        if 1 < b - a <= max(2.0, 2.5 * step):
            for i in range(a + 1, b):
                cols[i] = cols[a]
    return cols


def _median_gap(t: Sequence[float]) -> float:
    gaps = sorted(b - a for a, b in zip(t, t[1:]) if b > a)
    return gaps[len(gaps) // 2] if gaps else 0.0


def text_chart(series: Series, *, t0: float, t1: float, width: int = 60, height: int = 8,
               thresholds: Sequence[dict[str, Any]] = (), marks: Sequence[dict[str, Any]] = ()) -> list[str]:
    """A block-character chart of one series with its thresholds (dashed rows) and marks (▲ under the axis)."""
    cols = _columns(series, t0, t1, width)
    known = [v for v in cols if v is not None]
    limits = [float(th["value"]) for th in thresholds]
    top = max(known + limits + [1.0]) * 1.05
    label_w = 9
    rows: list[list[str]] = []
    for r in range(height):
        row = []
        floor = (height - 1 - r) / height * top
        for v in cols:
            if v is None:
                row.append(" ")
                continue
            level = (v - floor) / top * height * 8
            row.append(BLOCKS[max(0, min(8, int(round(level))))])
        rows.append(row)
    th_rows: dict[int, str] = {}
    for th in thresholds:
        r = height - 1 - min(height - 1, int(float(th["value"]) / top * height))
        th_rows[r] = f"{th.get('label') or 'threshold'} {_fmt(float(th['value']), series.unit)}"
        rows[r] = [("╌" if ch == " " else ch) for ch in rows[r]]
    lines = [f"{series.name} (max {_fmt(max(known), series.unit) if known else 'unknown'})"]
    for r, row in enumerate(rows):
        if r == 0:
            label = _fmt(top, series.unit)
        elif r == height - 1:
            label = "0"
        else:
            label = ""
        side = f"  ╌ {th_rows[r]}" if r in th_rows else ""
        lines.append(f"{label:>{label_w}} ┤{''.join(row)}{side}")
    lines.append(" " * label_w + " └" + "─" * width)
    axis = [" "] * width
    ticks = [(0, f"{t0:+.0f}s"), (width // 2, f"{(t0 + t1) / 2:+.0f}s"), (width - 1, f"{t1:+.0f}s")]
    for c, text in ticks:
        start = max(0, min(width - len(text), c - len(text) // 2))
        for i, ch in enumerate(text):
            axis[start + i] = ch
    lines.append(" " * label_w + "  " + "".join(axis))
    if marks:
        under = [" "] * width
        span = max(t1 - t0, 1e-9)
        for m in marks:
            if t0 <= m["t"] <= t1:
                under[min(width - 1, int((m["t"] - t0) / span * width))] = "▲"
        lines.append(" " * label_w + "  " + "".join(under))
    return lines


# ---------------------------------------------------------------------------
# SVG, by hand


def render_svg(title: str, series: Sequence[Series], thresholds: Sequence[dict[str, Any]],
               marks: Sequence[dict[str, Any]], *, t0: float, t1: float, width: int = 960, height: int = 460) -> str:
    """The timeline as a standalone SVG document (no external resources)."""
    left, right, top, bottom = 80, 190, 62, 60
    pw, ph = width - left - right, height - top - bottom
    vals = [v for s in series for v in s.known()] + [float(th["value"]) for th in thresholds]
    ymax = max(vals + [1.0]) * 1.08
    span = max(t1 - t0, 1e-9)

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    def y(v: float) -> float:
        return top + ph - v / ymax * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           ]
    for n, line in enumerate(_wrap(title, 120)[:2]):
        weight = ' font-weight="bold"' if n == 0 else ""
        out.append(f'<text x="16" y="{20 + 17 * n}" font-size="13"{weight}>{escape(line)}</text>')
    # grid and axes
    for i in range(6):
        v = ymax / 1.08 * i / 5
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#e6e6e6"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{escape(format_size(v))}</text>')
    for i in range(7):
        t = t0 + span * i / 6
        out.append(f'<line x1="{x(t):.1f}" y1="{top + ph}" x2="{x(t):.1f}" y2="{top + ph + 5}" stroke="#333"/>')
        out.append(f'<text x="{x(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{t:+.0f}s</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 18}" text-anchor="middle">seconds from the incident</text>')
    # series
    for n, s in enumerate(series):
        color = COLORS[n % len(COLORS)]
        pts: list[str] = []
        segments: list[list[str]] = []
        for t, v in zip(s.t, s.values):
            if v is None or t < t0 or t > t1:
                if pts:
                    segments.append(pts)
                    pts = []
                continue
            pts.append(f"{x(t):.1f},{y(v):.1f}")
        if pts:
            segments.append(pts)
        for seg in segments:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(seg)}"/>')
        ly = top + 14 + 18 * n
        out.append(f'<line x1="{left + pw + 12}" y1="{ly - 4}" x2="{left + pw + 32}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 38}" y="{ly}">{escape(s.name)}</text>')
    # thresholds
    for th in thresholds:
        v = float(th["value"])
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="6,4"/>')
        out.append(f'<text x="{left + pw - 4}" y="{y(v) - 4:.1f}" text-anchor="end" fill="#d62728">'
                   f'{escape(str(th.get("label") or "threshold"))} {escape(format_size(v))}</text>')
    # marks
    for k, m in enumerate(marks):
        t = float(m["t"])
        if not t0 <= t <= t1:
            continue
        color = "#000" if m.get("event") in ("exited", "kernel_oom_kill") else "#ff7f0e"
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{top + ph}" stroke="{color}" '
                   f'stroke-width="1.5"/>')
        label = m.get("event", "")
        if m.get("worker"):
            label += f" {m['worker']}"
        out.append(f'<text x="{x(t) + 3:.1f}" y="{top + 12 + 13 * (k % 4)}" fill="{color}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    if len(lines) > 2:
        lines = [lines[0], (" ".join(lines[1:]))[:width - 1] + "…"]
    return lines


# ---------------------------------------------------------------------------
# PNG, through matplotlib


def render_png(path: str, title: str, series: Sequence[Series], thresholds: Sequence[dict[str, Any]],
               marks: Sequence[dict[str, Any]], *, t0: float, t1: float) -> None:
    """The timeline as a PNG file. Raises PlotUnavailable without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise PlotUnavailable(
            "PNG export needs matplotlib: install memguard's plot extra (pip install -e '.[plot]' in a checkout) "
            "or matplotlib itself; SVG export (--output FILE.svg) needs nothing") from None
    fig, ax = plt.subplots(figsize=(10, 4.6), dpi=100)
    try:
        for n, s in enumerate(series):
            xs = [t for t, v in zip(s.t, s.values) if v is not None and t0 <= t <= t1]
            ys = [v for t, v in zip(s.t, s.values) if v is not None and t0 <= t <= t1]
            ax.plot(xs, ys, color=COLORS[n % len(COLORS)], linewidth=1.8, label=s.name)
        for th in thresholds:
            v = float(th["value"])
            ax.axhline(v, color="#d62728", linestyle="--", linewidth=1)
            ax.annotate(f"{th.get('label') or 'threshold'} {format_size(v)}", (t1, v), xytext=(-4, 3),
                        textcoords="offset points", ha="right", color="#d62728", fontsize=8)
        for k, m in enumerate(marks):
            t = float(m["t"])
            if not t0 <= t <= t1:
                continue
            color = "black" if m.get("event") in ("exited", "kernel_oom_kill") else "#ff7f0e"
            ax.axvline(t, color=color, linewidth=1)
            ax.annotate(m.get("event", "") + (f" {m['worker']}" if m.get("worker") else ""), (t, 1),
                        xycoords=("data", "axes fraction"), xytext=(3, -12 - 11 * (k % 4)),
                        textcoords="offset points", color=color, fontsize=8)
        ax.set_xlim(t0, t1)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(v) if v > 0 else "0"))
        ax.set_xlabel("seconds from the incident")
        ax.set_title("\n".join(_wrap(title, 110)), fontsize=9, loc="left")
        ax.grid(True, color="#e6e6e6")
        if series:
            ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def window_of(timeline: dict[str, Any]) -> tuple[float, float]:
    """The time span to draw: the recorded window (and the seconds after, when present)."""
    ts = list((timeline.get("scope") or {}).get("t", [])) + list((timeline.get("full") or {}).get("t", []))
    ts += [m["t"] for m in timeline.get("marks", [])]
    if not ts:
        return -float(timeline.get("window_s", 60.0)), 0.0
    lo, hi = min(ts), max(ts)
    if math.isclose(lo, hi):
        lo -= 1.0
    return lo, max(hi, 0.0)
