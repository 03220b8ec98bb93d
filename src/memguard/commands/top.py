"""``memguard top``: a live full-screen view of the daemon, over its control socket.

    memguard top                       # refresh every second; q quits, ? shows the keys
    memguard top --once                # one frame as plain text (scripts, dumb terminals, bug reports)

What it shows: the scope's memory, swap, PSI and GPUs as bars with the
thresholds of the system rules marked on them (``|`` a rule's threshold,
``!`` one that is firing), then one line per worker: its state, pid,
memory against its limit with the rules' marks, a sparkline of the last
minute, its growth rate, trials, admission gate, GPU memory, restarts and
its last event; the recent events underneath.

It asks the daemon for ``status`` once per refresh (one short request,
answered after the daemon's next tick) and draws with curses, which sends
only what changed on the screen: cheap over SSH, and it waits for a key or
the next refresh without spinning. Where there is no usable terminal
(``TERM=dumb``, output not a terminal) it prints plain-text frames instead.

Keys: ``q`` quit, ``s`` sort (name, memory, share of limit, growth,
restarts), ``/`` filter by name, ``j``/``k`` or arrows select a worker;
``r`` restart and ``x`` stop the selected worker, each after a ``y``
confirmation, for administrators only (the daemon checks; ``--read-only``
turns the keys off).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import locale
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..units import format_size

__all__ = ["add_parser", "run", "render", "View", "Segment", "SORTS"]

SORTS = ("name", "memory", "limit", "growth", "restarts")


def _restarts(w: dict) -> int:
    """Restarts of a worker in its windows: failures and planned ones (recycle, brake, operator, runtime)."""
    total = 0
    for key in ("restarts_in_window", "planned_restarts_in_window"):
        v = w.get(key)
        total += int(v) if isinstance(v, (int, float)) else 0
    return total
#: 1 s between refreshes: the daemon's own poll interval; faster tells nothing new.
DEFAULT_DELAY_S = 1.0
#: 0.2 s at the fastest: each refresh is a request the daemon answers after a tick.
MIN_DELAY_S = 0.2
#: 2 s for the daemon to answer: a loaded box answers in milliseconds; past this the view says so.
REQUEST_TIMEOUT_S = 2.0
#: Below 60 columns or 12 lines only the essentials are drawn.
SMALL_COLS, SMALL_LINES = 60, 12

_SPARK_UNICODE = "▁▂▃▄▅▆▇█"
_SPARK_ASCII = "_.-=+*#@"


@dataclass(frozen=True)
class Segment:
    """A piece of a line and how to show it: "" plain, "bold", "dim", "warn", "bad", "good", "sel"."""

    text: str
    style: str = ""


Line = list[Segment]


@dataclass
class View:
    """What the person chose: sort, filter, selection, and what the footer says."""

    sort: str = "name"
    filter: str = ""
    selected: str | None = None
    message: str = ""
    confirm: tuple[str, str] | None = None  # (op, worker) waiting for y
    editing: bool = False  # typing a filter
    help: bool = False
    read_only: bool = False
    unicode: bool = True
    stale: str = ""  # why the frame is old (the daemon did not answer)
    names: list[str] = field(default_factory=list)  # the workers shown, in order


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("top", help="a live view of memory, workers and events (q quits)",
                       description="A live full-screen view of memguard: scope memory, swap, PSI and GPUs with the "
                                   "rules' thresholds, every worker against its limit, the recent events.")
    p.add_argument("--socket", help="control socket (default: $MEMGUARD_SOCKET or /run/memguard/control.sock)")
    p.add_argument("--delay", "-d", type=float, default=DEFAULT_DELAY_S, metavar="SECONDS",
                   help=f"seconds between refreshes (default {DEFAULT_DELAY_S:g}, at least {MIN_DELAY_S:g})")
    p.add_argument("--sort", choices=SORTS, default="name", help="initial sort of the workers (s cycles)")
    p.add_argument("--filter", default="", metavar="TEXT", help="only workers whose name contains TEXT (/ sets it)")
    p.add_argument("--read-only", action="store_true", help="no restart/stop keys")
    p.add_argument("--once", action="store_true", help="print one frame as plain text and exit")
    p.add_argument("--ascii", action="store_true", help="ASCII only (no Unicode sparklines)")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------
# formatting


def _size(v: object) -> str:
    return format_size(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _rate(v: object) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    sign = "+" if v >= 0 else "-"
    return f"{sign}{format_size(abs(v))}/s"


def _pct(v: object, of: object) -> str:
    if isinstance(v, (int, float)) and isinstance(of, (int, float)) and of:
        return f"{100.0 * v / of:.0f}%"
    return "-"


def sparkline(points: list[int | float], width: int, unicode: bool = True) -> str:
    """The last ``width`` points as bars scaled between their min and max (flat: the lowest bar)."""
    chars = _SPARK_UNICODE if unicode else _SPARK_ASCII
    pts = points[-width:] if width > 0 else []
    if not pts:
        return " " * max(width, 0)
    lo, hi = min(pts), max(pts)
    span = hi - lo
    out = "".join(chars[0] if span <= 0 else chars[min(len(chars) - 1, int((p - lo) / span * len(chars)))]
                  for p in pts)
    return out.rjust(width)


def bar(value: object, maximum: object, marks: list[Mapping[str, Any]], width: int) -> Line:
    """``[#####.....|..!..]``: filled to value/maximum, ``|`` at each rule's threshold, ``!`` where it fires."""
    if width < 3:
        return [Segment("")]
    inner = width - 2
    if not isinstance(value, (int, float)) or not isinstance(maximum, (int, float)) or maximum <= 0:
        return [Segment("[" + "?" * inner + "]", "dim")]
    filled = max(0, min(inner, round(inner * float(value) / float(maximum))))
    cells = ["#"] * filled + ["."] * (inner - filled)
    hot = False
    firing = False
    for m in marks:
        at = m.get("at")
        if not isinstance(at, (int, float)):
            continue
        i = max(0, min(inner - 1, int(inner * float(at) / float(maximum))))
        cells[i] = "!" if m.get("active") else "|"
        firing = firing or bool(m.get("active"))
        hot = hot or float(value) >= float(at)
    style = "bad" if firing else "warn" if hot else "good"
    return [Segment("["), Segment("".join(cells), style), Segment("]")]


def _clip(line: Line, width: int) -> Line:
    out: Line = []
    left = width
    for seg in line:
        if left <= 0:
            break
        text = seg.text[:left]
        out.append(Segment(text, seg.style))
        left -= len(text)
    return out


def _text(line: Line) -> str:
    return "".join(s.text for s in line)


# ---------------------------------------------------------------------------
# the frame


def _sort_key(sort: str) -> Callable[[tuple[str, Mapping[str, Any]]], Any]:
    def num(v: object) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else -1.0

    if sort == "memory":
        return lambda kv: (-num(kv[1].get("memory_bytes")), kv[0])
    if sort == "limit":
        return lambda kv: (-(num(kv[1].get("memory_bytes")) / num(kv[1].get("limit_bytes"))
                             if num(kv[1].get("limit_bytes")) > 0 else -1.0), kv[0])
    if sort == "growth":
        return lambda kv: (-num(kv[1].get("growth_bytes_per_s")), kv[0])
    if sort == "restarts":
        return lambda kv: (-_restarts(kv[1]), kv[0])
    return lambda kv: kv[0]


def _gauges(scope: Mapping[str, Any] | None, width: int) -> list[Line]:
    if not scope:
        return [[Segment("scope: no reading yet", "dim")]]
    lines: list[Line] = []
    label_w, fig_w = 9, 22
    bar_w = max(10, min(60, width - label_w - fig_w - 30))
    for g in scope.get("gauges", []):
        name, value, maximum, unit = g.get("name", "?"), g.get("value"), g.get("max"), g.get("unit")
        if name == "swap" and not maximum:
            continue
        if unit == "percent":
            fig = f"{value:.1f}%" if isinstance(value, (int, float)) else "unknown"
        else:
            fig = f"{_size(value)} / {_size(maximum)}"
        marks = g.get("marks", [])
        notes = "  ".join(f"{'!' if m.get('active') else '|'} {m.get('action')} at "
                          f"{(_size(m.get('at')) if unit != 'percent' else str(m.get('at')) + '%')}"
                          for m in marks[:3])
        line = [Segment(f"{name:<{label_w}}", "bold")] + bar(value, maximum, marks, bar_w) + [
            Segment(f" {fig:<{fig_w}}"), Segment(notes, "bad" if any(m.get("active") for m in marks) else "dim")]
        lines.append(line)
    return lines


_COLS = (("WORKER", 16), ("STATE", 9), ("PID", 8), ("MEMORY", 9), ("LIMIT", 9), ("%LIM", 5), ("TREND", 0),
         ("GROWTH", 11), ("TRIALS", 7), ("GATE", 7), ("GPU", 9), ("RST", 4), ("LAST EVENT", 0))


def _worker_lines(workers: Mapping[str, Mapping[str, Any]], view: View, width: int, small: bool) -> list[Line]:
    rows = sorted(((n, w) for n, w in workers.items() if view.filter in n), key=_sort_key(view.sort))
    view.names = [n for n, _ in rows]
    if view.selected not in view.names:
        view.selected = view.names[0] if view.names else None
    if small:
        head = [Segment(f"{'WORKER':<16}{'STATE':<9}{'MEMORY':>9}", "bold")]
        body = []
        for n, w in rows:
            style = "sel" if n == view.selected else _state_style(w)
            body.append([Segment(f"{n[:15]:<16}{w.get('phase', '?'):<9}{_size(w.get('memory_bytes')):>9}", style)])
        return [head] + body
    fixed = sum(c for _, c in _COLS)
    trend_w = max(8, min(30, (width - fixed) // 3))
    head_text = ""
    for name, w in _COLS:
        if name == "TREND":
            head_text += f"{'TREND 60s':<{trend_w + 1}}"
        elif name == "LAST EVENT":
            head_text += name
        else:
            head_text += f"{name:<{w}}" if name in ("WORKER", "STATE", "GATE") else f"{name:>{w - 1}} "
    out: list[Line] = [[Segment(head_text, "bold")]]
    for n, w in rows:
        mem, limit = w.get("memory_bytes"), w.get("limit_bytes")
        last = w.get("last_event") or {}
        last_text = f"{last.get('event')}: {last.get('message', '')}" if last else (w.get("last_exit") or "")
        trial = w.get("trial") or {}
        gate = w.get("admission", "?")
        pct = _pct(mem, limit)
        marks = w.get("memory_marks") or []
        over = any(isinstance(m.get("at"), (int, float)) and isinstance(mem, (int, float)) and mem >= m["at"]
                   for m in marks)
        sel = n == view.selected
        row: Line = [
            Segment(f"{n[:15]:<16}", "sel" if sel else "bold"),
            Segment(f"{w.get('phase', '?'):<9}", _state_style(w)),
            Segment(f"{str(w.get('pid') or '-'):>7} "),
            Segment(f"{_size(mem):>8} ", "warn" if over else ""),
            Segment(f"{_size(limit):>8} "),
            Segment(f"{pct:>4} ", "warn" if over else ""),
            Segment(sparkline(w.get("memory_history") or [], trend_w, view.unicode) + " ", "good"),
            Segment(f"{_rate(w.get('growth_bytes_per_s')):>10} "),
            Segment(f"{w.get('trials', 0):>6}{'*' if trial else ' '}"),
            Segment(f"{gate:<7}", "warn" if gate == "closed" else ""),
            Segment(f"{_size(w.get('gpu_memory_bytes')):>8} "),
            # every restart in the window, planned or not; in the warning colour when failures are among them
            Segment(f"{_restarts(w):>3} ", "warn" if w.get("restarts_in_window") else ""),
            Segment(last_text.replace("\n", " "), "dim"),
        ]
        out.append(row)
    return out


def _state_style(w: Mapping[str, Any]) -> str:
    phase = w.get("phase")
    if phase == "failed":
        return "bad"
    if phase in ("stopping", "pending", "starting") or w.get("firing"):
        return "warn"
    if phase == "running":
        return "good"
    return "dim"


def _event_lines(events: list[Mapping[str, Any]], width: int, count: int) -> list[Line]:
    out: list[Line] = []
    for e in list(events)[-count:][::-1] if count > 0 else []:
        t = e.get("time")
        when = _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S") if isinstance(t, (int, float)) else "--:--:--"
        level = e.get("level", "info")
        style = "bad" if level == "error" else "warn" if level == "warning" else "dim"
        out.append([Segment(f"{when} "), Segment(f"{str(e.get('event', '?')):<18} ", style),
                    Segment(str(e.get("message", "")).replace("\n", " "))])
    return out


def _footer(view: View) -> Line:
    if view.confirm is not None:
        op, worker = view.confirm
        return [Segment(f"{op} {worker}? press y to confirm, any other key cancels", "bad")]
    if view.editing:
        return [Segment(f"filter: {view.filter}_  (Enter keeps it, Esc clears)", "bold")]
    keys = f"q quit  s sort:{view.sort}  / filter{':' + view.filter if view.filter else ''}  j/k select"
    keys += "" if view.read_only else "  r restart  x stop"
    keys += "  ? help"
    return [Segment(keys, "dim")] + ([Segment("  " + view.message, "warn")] if view.message else [])


HELP = [
    "memguard top: keys",
    "",
    "  q          quit",
    "  s          sort workers: name, memory, share of limit, growth, restarts",
    "  /          filter workers by name (Enter keeps it, Esc clears it)",
    "  j k arrows select a worker",
    "  r          restart the selected worker (asks for y; administrators only)",
    "  x          stop the selected worker (asks for y; administrators only)",
    "  ?          this help (any key closes it)",
    "",
    "Bars: # used, | a rule's threshold, ! a rule that is firing.",
    "TREND: the worker's memory over the last minute; GROWTH: its slope.",
    "TRIALS: * while a trial runs. GATE: closed while admission is blocked.",
]


def render(reply: Mapping[str, Any] | None, width: int, height: int, view: View, *,
           now: float | None = None, host: str = "", screen: bool = True) -> list[Line]:
    """The whole screen as lines of styled segments, at most ``height`` lines of ``width`` columns.
    ``screen`` False (a printed frame): no padding to the height, no key line."""
    if width < 20 or height < 4:
        return [[Segment("too small"[:max(width, 0)])]]
    if view.help:
        return [_clip([Segment(t, "bold" if i == 0 else "")], width) for i, t in enumerate(HELP)][:height]
    clock = _dt.datetime.fromtimestamp(now if now is not None else time.time()).strftime("%H:%M:%S")
    lines: list[Line] = []
    status = (reply or {}).get("status", "")
    title = [Segment("memguard top", "bold"), Segment(f"  {host}" if host else ""), Segment(f"  {clock}  ")]
    if view.stale:
        title.append(Segment(view.stale, "bad"))
    elif (reply or {}).get("dry_run"):
        title.append(Segment("DRY RUN  ", "warn"))
    lines.append(title)
    if reply is None:
        lines.append([Segment("waiting for the daemon's first answer...", "dim")])
        lines += [[] for _ in range(max(0, height - 3))]
        lines.append(_footer(view))
        return [_clip(line, width) for line in lines][:height]
    lines.append([Segment(status, "dim")])
    small = width < SMALL_COLS or height < SMALL_LINES
    if not small:
        lines += _gauges(reply.get("scope"), width)
        lines.append([])
    workers = _worker_lines(reply.get("workers", {}), view, width, small)
    room = height - len(lines) - 1  # the footer
    events = reply.get("events", [])
    shown = 0 if small else max(0, min(len(events), room - len(workers) - 1, 12))  # events under their title
    lines += workers[: max(room - (shown + 1 if shown else 0), 1)]
    if shown:
        lines.append([Segment("RECENT EVENTS", "bold")])
        lines += _event_lines(events, width, shown)
    if not screen:
        return [_clip(line, width) for line in lines]
    while len(lines) < height - 1:
        lines.append([])
    lines = lines[: height - 1] + [_footer(view)]
    return [_clip(line, width) for line in lines]


def frame_text(reply: Mapping[str, Any] | None, width: int, view: View, **kw: Any) -> str:
    """A printed frame (batch mode, docs): every worker and up to a dozen events, trailing blanks trimmed."""
    height = 20 + len((reply or {}).get("workers", {})) + len((reply or {}).get("scope", {}) or {})
    lines = render(reply, width, height, view, screen=False, **kw)
    return "\n".join(_text(line).rstrip() for line in lines).rstrip() + "\n"


# ---------------------------------------------------------------------------
# talking to the daemon


def _fetch(socket_path: str | None) -> tuple[Mapping[str, Any] | None, str]:
    from ..client import ControlUnavailable, admin_request

    try:
        reply = admin_request("status", socket_path, timeout_s=REQUEST_TIMEOUT_S)
    except ControlUnavailable as e:
        return None, f"no answer: {e}"
    if not reply.get("ok"):
        return None, f"the daemon refused: {reply.get('error', 'no reason given')}"
    return reply, ""


def _act(op: str, worker: str, socket_path: str | None) -> str:
    from ..client import ControlUnavailable, admin_request

    try:
        reply = admin_request(op, socket_path, timeout_s=REQUEST_TIMEOUT_S, worker=worker)
    except ControlUnavailable as e:
        return f"{op} {worker}: {e}"
    if reply.get("ok"):
        return f"{op} {worker}: done ({reply.get('phase', 'ok')})"
    return f"{op} {worker}: {reply.get('error', 'refused')}"


# ---------------------------------------------------------------------------
# the two ways to show it


def _usable_terminal() -> bool:
    term = os.environ.get("TERM", "")
    return sys.stdout.isatty() and sys.stdin.isatty() and term not in ("", "dumb", "unknown")


def _batch(args: argparse.Namespace, view: View) -> int:
    import shutil

    size = shutil.get_terminal_size((120, 40))
    host = os.uname().nodename
    while True:
        reply, why = _fetch(args.socket)
        if reply is None:
            print(f"memguard top: {why}", file=sys.stderr)
            if args.once:
                return 1
        else:
            sys.stdout.write(frame_text(reply, size.columns, view, host=host))
            sys.stdout.flush()
        if args.once:
            return 0
        try:
            time.sleep(args.delay)  # a dumb terminal gets a new frame each delay, like top -b
            sys.stdout.write("\n")
        except KeyboardInterrupt:
            return 0


_STYLES = ("bold", "dim", "warn", "bad", "good", "sel")


def _attrs(curses: Any) -> dict[str, int]:
    attrs = {"": 0, "bold": curses.A_BOLD, "dim": curses.A_DIM, "warn": curses.A_BOLD, "bad": curses.A_BOLD,
             "good": 0, "sel": curses.A_REVERSE}
    try:
        if curses.has_colors():
            curses.start_color()
            try:
                curses.use_default_colors()
                bg = -1
            except curses.error:
                bg = curses.COLOR_BLACK
            for i, (style, fg) in enumerate((("warn", curses.COLOR_YELLOW), ("bad", curses.COLOR_RED),
                                             ("good", curses.COLOR_GREEN)), start=1):
                curses.init_pair(i, fg, bg)
                attrs[style] = curses.color_pair(i) | (curses.A_BOLD if style != "good" else 0)
    except curses.error:
        pass
    return attrs


def _draw(stdscr: Any, curses: Any, lines: list[Line], attrs: dict[str, int]) -> None:
    height, width = stdscr.getmaxyx()
    stdscr.erase()
    for y, line in enumerate(lines[:height]):
        x = 0
        for seg in line:
            text = seg.text[: max(0, width - x - (1 if y == height - 1 else 0))]
            if not text:
                continue
            try:
                stdscr.addstr(y, x, text, attrs.get(seg.style, 0))
            except curses.error:
                pass
            x += len(text)
    stdscr.refresh()


def _key(view: View, ch: int, curses: Any, socket_path: str | None) -> bool:
    """Handle one key; False to quit."""
    if view.help:
        view.help = False
        return True
    if view.confirm is not None:
        op, worker = view.confirm
        view.confirm = None
        view.message = _act(op, worker, socket_path) if ch in (ord("y"), ord("Y")) else f"{op} {worker}: cancelled"
        return True
    if view.editing:
        if ch in (10, 13, curses.KEY_ENTER):
            view.editing = False
        elif ch == 27:
            view.editing, view.filter = False, ""
        elif ch in (curses.KEY_BACKSPACE, 127, 8):
            view.filter = view.filter[:-1]
        elif 32 <= ch < 127:
            view.filter += chr(ch)
        return True
    if ch in (ord("q"), ord("Q")):
        return False
    if ch == ord("s"):
        view.sort = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)]
    elif ch == ord("/"):
        view.editing, view.filter = True, ""
    elif ch == ord("?"):
        view.help = True
    elif ch in (ord("j"), curses.KEY_DOWN, ord("k"), curses.KEY_UP) and view.names:
        step = 1 if ch in (ord("j"), curses.KEY_DOWN) else -1
        i = view.names.index(view.selected) if view.selected in view.names else 0
        view.selected = view.names[(i + step) % len(view.names)]
    elif ch in (ord("r"), ord("x")):
        if view.read_only:
            view.message = "read-only view (--read-only): no restart or stop"
        elif view.selected is None:
            view.message = "no worker selected"
        else:
            view.confirm = ("restart" if ch == ord("r") else "stop", view.selected)
    return True


def _interactive(args: argparse.Namespace, view: View) -> int:
    import curses

    host = os.uname().nodename

    def main(stdscr: Any) -> int:
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        attrs = _attrs(curses)
        reply: Mapping[str, Any] | None = None
        due = 0.0
        while True:
            now = time.monotonic()
            if now >= due:
                got, why = _fetch(args.socket)
                if got is not None:
                    reply, view.stale = got, ""
                else:
                    view.stale = why
                due = time.monotonic() + args.delay
            height, width = stdscr.getmaxyx()
            _draw(stdscr, curses, render(reply, width, height, view, host=host), attrs)
            stdscr.timeout(max(1, int((due - time.monotonic()) * 1000)))  # sleeps in getch: no busy loop
            ch = stdscr.getch()
            if ch == -1 or ch == curses.KEY_RESIZE:
                continue
            if not _key(view, ch, curses, args.socket):
                return 0
            if view.message and view.confirm is None and ch in (ord("y"), ord("Y")):
                due = 0.0  # show the effect of the restart or stop at once

    for stale in ("LINES", "COLUMNS"):  # curses would take them over the terminal's real size
        os.environ.pop(stale, None)
    try:
        return curses.wrapper(main)
    except KeyboardInterrupt:
        return 0
    except curses.error as e:  # a terminal curses cannot drive after all: plain frames
        print(f"memguard top: this terminal cannot be driven full-screen ({e}); printing frames", file=sys.stderr)
        return _batch(args, view)


def run(args: argparse.Namespace) -> int:
    locale.setlocale(locale.LC_ALL, "")
    encoding = (locale.getpreferredencoding(False) or "").lower().replace("-", "")
    view = View(sort=args.sort, filter=args.filter, read_only=args.read_only,
                unicode=not args.ascii and encoding == "utf8")
    args.delay = max(MIN_DELAY_S, args.delay)
    if args.once or not _usable_terminal():
        return _batch(args, view)
    return _interactive(args, view)
