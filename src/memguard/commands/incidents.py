"""``memguard incidents``: the deaths memguard recorded, listed, shown and drawn.

    memguard incidents [list] [QUERY] [-n N] [--json]
    memguard incidents show ID [--json] [--width COLUMNS]
    memguard incidents export ID --output FILE.svg|FILE.png

``list`` prints one line per incident, newest first; ``QUERY`` narrows it
to a pid, a worker, a container (name or id prefix) or a systemd unit.
``show`` prints one incident in full: what died, how, why, the evidence,
and its timeline drawn in the terminal (memory in use, each rule's
threshold as a dashed row, each action as a mark under the axis).
``export`` writes the timeline as a picture for a ticket or a chat: SVG
with nothing more installed, PNG with matplotlib (the ``plot`` extra).
Records are read from ``--dir`` (default: memguard's state directory,
``/var/lib/memguard/incidents`` for root); damaged files are skipped and
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, TextIO

from ..report.incidents import Incident, IncidentStore, default_incident_dir
from ..units import format_size
from . import plot

__all__ = ["add_parser", "run", "format_list", "format_show", "merged_timeline"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "incidents",
        help="the deaths memguard recorded: list, show, export a picture",
        description="List, show and draw the incident records memguard wrote (one per death it saw).",
    )
    p.add_argument("--dir", metavar="DIR", help=f"where the records are (default: {default_incident_dir()})")
    isub = p.add_subparsers(dest="incidents_command")
    ls = isub.add_parser("list", help="one line per incident, newest first")
    ls.add_argument("query", nargs="?", help="only this pid, worker, container (name or id prefix) or unit")
    ls.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="at most N incidents (default 50)")
    ls.add_argument("--json", action="store_true", help="the records as a JSON array")
    sh = isub.add_parser("show", help="one incident in full, with its timeline drawn")
    sh.add_argument("id", help="the incident id (or a unique prefix of it)")
    sh.add_argument("--json", action="store_true", help="the record as JSON")
    sh.add_argument("--width", type=int, default=60, metavar="COLUMNS", help="chart width (default 60)")
    ex = isub.add_parser("export", help="the incident's memory timeline as a picture (SVG or PNG)")
    ex.add_argument("id", help="the incident id (or a unique prefix of it)")
    ex.add_argument("--output", "-o", required=True, metavar="FILE", help="FILE.svg or FILE.png")
    p.set_defaults(func=run, incidents_command=None, query=None, lines=50, json=False)
    return p


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    store = IncidentStore(args.dir) if args.dir else IncidentStore(default_incident_dir())
    cmd = args.incidents_command or "list"
    if cmd == "list":
        return _list(store, args, out)
    inc = store.load(args.id)
    if inc is None:
        several = store.match(args.id) if len(args.id) >= 6 else []
        if len(several) > 1:
            print(f"memguard incidents: {len(several)} incidents start with {args.id!r} ({', '.join(several[:4])}"
                  f"{', ...' if len(several) > 4 else ''}): give more of the id", file=sys.stderr)
        elif several:
            print(f"memguard incidents: {several[0]} is damaged; `memguard incidents list` says why",
                  file=sys.stderr)
        else:
            print(f"memguard incidents: no incident {args.id!r} in {store.dir}", file=sys.stderr)
        return 1
    if cmd == "show":
        if args.json:
            print(inc.to_json(indent=2), file=out)
        else:
            print("\n".join(format_show(inc, width=max(20, args.width))), file=out)
        return 0
    return _export(inc, args.output)


def _list(store: IncidentStore, args: argparse.Namespace, out: TextIO) -> int:
    if args.query:
        items = store.find(args.query)
        broken: list = []
    else:
        items, broken = store.scan()
    items = items[:max(0, args.lines)]
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2), file=out)
    else:
        for line in format_list(items):
            print(line, file=out)
        if not items:
            where = f" matching {args.query!r}" if args.query else ""
            print(f"no incidents{where} in {store.dir}", file=out)
    for b in broken:
        print(f"memguard incidents: skipped {b.path}: {b.reason}", file=sys.stderr)
    return 0


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _who(inc: Incident) -> str:
    o = inc.owner
    pid = inc.pid
    head = o.describe() if o is not None else "?"
    if o is not None and o.kind == "memguard-worker":
        head = f"worker {o.worker}"
    return f"{head}" + (f" pid {pid}" if pid is not None else "")


def format_list(items: list[Incident]) -> list[str]:
    """One line per incident: id, local time, cause, who, the summary."""
    lines = []
    for i in items:
        state = " (pending)" if i.state == "pending" else ""
        lines.append(f"{i.id}  {_when(i.wall)}  {i.cause:<9} {_who(i)}{state}")
        lines.append(f"    {i.summary}")
    return lines


def _command_text(cmd: Any) -> str | None:
    if isinstance(cmd, list):
        return shlex.join(str(c) for c in cmd)
    return str(cmd) if cmd else None


def format_show(inc: Incident, width: int = 60) -> list[str]:
    """The whole incident for a person, timeline chart included."""
    L = [f"Incident {inc.id}   {_when(inc.wall)}   cause: {inc.cause}" +
         ("   (pending: written before the signal)" if inc.state == "pending" else ""),
         f"  {inc.summary}", ""]
    w, h, y = inc.what, inc.how, inc.why
    owner = inc.owner
    L.append("What")
    pid = w.get("pid")
    comm = w.get("comm")
    head = (f"pid {pid}" + (f" ({comm})" if comm else "")) if pid is not None else ""
    L.append("  " + ", ".join(x for x in (head, owner.describe() if owner else "") if x))
    cmd = _command_text(w.get("command"))
    if cmd:
        L.append(f"  command: {cmd}")
    for key in ("user", "uid", "cgroup"):
        if w.get(key) not in (None, ""):
            L.append(f"  {key}: {w[key]}")
    L.append("How")
    if h.get("meaning"):
        L.append(f"  {h['meaning']}" + (f" (sent by {h['sent_by']})" if h.get("sent_by") else ""))
    if h.get("exit_code") is not None:
        L.append(f"  exit code {h['exit_code']}" + (", OOMKilled" if h.get("oom_killed") else ""))
    oom = h.get("oom") or {}
    if oom:
        parts = [f"OOM: {oom.get('kind', '?')}"]
        if oom.get("limit_bytes"):
            parts.append(f"limit {format_size(oom['limit_bytes'])}" +
                         (f" ({oom['limit_kind']})" if oom.get("limit_kind") else ""))
        if oom.get("memcg"):
            parts.append(f"of {oom['memcg']}")
        if oom.get("rss_bytes") is not None:
            parts.append(f"its RSS {format_size(oom['rss_bytes'])}")
        if oom.get("invoker"):
            parts.append(f"invoked by {oom['invoker']}" + (f" (pid {oom['invoker_pid']})" if oom.get("invoker_pid")
                                                           else ""))
        L.append("  " + ", ".join(parts))
    if h.get("output_line"):
        L.append(f"  it printed: {h['output_line']}" + (f"  [{h['output_cause']}]" if h.get("output_cause") else ""))
    L.append("Why")
    L.append(f"  {y.get('text') or y.get('reason') or inc.summary}")
    if y.get("rule"):
        L.append(f"  rule {y['rule']}: {y.get('when', '')}")
    for n, r in enumerate(y.get("ranking") or [], 1):
        who = r.get("worker") or r.get("pid")
        mem = f" {format_size(r['memory_bytes'])}" if isinstance(r.get("memory_bytes"), (int, float)) else ""
        L.append(f"  {n}. {who}{mem}" + (f" score {r['score']}" if r.get("score") is not None else ""))
    if inc.outcome:
        o = inc.outcome
        L.append("Outcome")
        after = f", {o['after_s']}s after the signal" if o.get("after_s") is not None else ""
        if o.get("meaning"):
            L.append(f"  exited: {o['meaning']}{after}")
            after = ""
        if o.get("note") or not o.get("meaning"):
            L.append(f"  {o.get('note') or 'completed'}{after}")
    if inc.evidence:
        L.append("Evidence")
        L.extend(f"  {line[:200]}" for line in inc.evidence[-8:])
    tl = merged_timeline(inc)
    if tl is not None:
        series, thresholds, marks = plot.chart_series(tl)
        t0, t1 = plot.window_of(tl)
        L.append("")
        L.append(f"Timeline ({t0:+.0f}s to {t1:+.0f}s around the incident)")
        for s in series[:2]:
            ths = [th for th in thresholds if th["series"] == s.name]
            L.extend(plot.text_chart(s, t0=t0, t1=t1, width=width, thresholds=ths, marks=marks))
            L.append("")
        for m in marks:
            what = m.get("event", "")
            extra = " ".join(str(x) for x in (m.get("worker"), m.get("pid") and f"pid {m['pid']}",
                                               m.get("rule") and f"rule {m['rule']}") if x)
            L.append(f"  ▲ {m['t']:+7.1f}s  {what} {extra}".rstrip() + (f": {m['text']}" if m.get("text") else ""))
    else:
        L.append("")
        L.append("Timeline: none recorded (memguard was not running, or had just started)")
    return L


def merged_timeline(inc: Incident) -> dict[str, Any] | None:
    """The timeline before the incident joined with the seconds after it, when there are both."""
    before, after = inc.timeline, inc.after
    if not before and not after:
        return None
    if not after:
        return before
    if not before:
        return after
    out = json.loads(json.dumps(before))
    for sec in ("scope", "full"):
        a, b = out.get(sec) or {}, (after.get(sec) or {})
        if not b.get("t"):
            continue
        last = a["t"][-1] if a.get("t") else -float("inf")
        keep = [i for i, t in enumerate(b["t"]) if t > last]
        n_old = len(a.get("t", []))
        for key in set(a) | set(b):
            if key == "resolution_s":
                continue
            old = a.get(key, [None] * n_old)
            new = b.get(key, [None] * len(b["t"]))
            a[key] = list(old) + [new[i] for i in keep]
        out[sec] = a
    seen = {(m["t"], m.get("event")) for m in out.get("marks", [])}
    out["marks"] = out.get("marks", []) + [m for m in after.get("marks", []) if (m["t"], m.get("event")) not in seen]
    return out


def _export(inc: Incident, path: str) -> int:
    tl = merged_timeline(inc)
    if tl is None:
        print(f"memguard incidents: incident {inc.id} has no timeline to draw", file=sys.stderr)
        return 1
    series, thresholds, marks = plot.chart_series(tl)
    t0, t1 = plot.window_of(tl)
    title = f"{inc.id} {inc.cause}: {inc.summary}"
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".svg":
            with open(path, "w", encoding="utf-8") as f:
                f.write(plot.render_svg(title, series, thresholds, marks, t0=t0, t1=t1))
        elif ext == ".png":
            plot.render_png(path, title, series, thresholds, marks, t0=t0, t1=t1)
        else:
            print(f"memguard incidents: --output must end in .svg or .png, not {ext or 'nothing'}", file=sys.stderr)
            return 2
    except plot.PlotUnavailable as e:
        print(f"memguard incidents: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"memguard incidents: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
