"""``memguard health``: node-problem-detector's custom plugin contract, asking the daemon.

    memguard health [--socket PATH] [--window 10m]

One line on stdout and an exit code, as node-problem-detector's custom
plugin monitor expects (and any other prober: Nagios, a cron job, a
Kubernetes exec probe):

- **0, OK**: ``memguard OK: 4 running, 0 failed, 21.9GiB available (host)``
- **1, a problem**: a worker failed (its restart budget spent), the kernel
  OOM killer fired within ``--window``, or a system rule is firing (memory
  short right now); the line names them, most serious first;
- **2, unknown**: the daemon cannot be asked (not running, socket refused,
  no reading yet), so nothing can be said about the node's memory.

It only reads (the ``status`` request); docs/fleet.md has the plugin
configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Mapping

__all__ = ["add_parser", "run", "assess", "OK", "PROBLEM", "UNKNOWN"]

OK, PROBLEM, UNKNOWN = 0, 1, 2
#: 10 minutes: node-problem-detector runs a plugin every 30 s by default; a kernel OOM kill stays a problem
#: long enough to be seen by a person looking at the node's conditions, then clears on its own.
DEFAULT_WINDOW_S = 600.0
#: node-problem-detector keeps 80 characters of a plugin's output by default (max_output_length).
LINE_MAX = 200


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cli import _duration

    p = sub.add_parser("health", help="one line and an exit code (0 OK, 1 problem, 2 unknown) for probes",
                       description="Say whether this node's memory is healthy, as node-problem-detector's custom "
                                   "plugins do: exit 0 OK, 1 a problem, 2 unknown; one line on stdout.")
    p.add_argument("--socket", help="control socket (default: $MEMGUARD_SOCKET or /run/memguard/control.sock)")
    p.add_argument("--window", type=_duration, default=DEFAULT_WINDOW_S, metavar="DURATION",
                   help="how long a kernel OOM kill stays a problem (default 10m)")
    p.set_defaults(func=run)
    return p


def _kernel_ooms(events: Any, since: float) -> list[Mapping[str, Any]]:
    out = []
    for e in events if isinstance(events, list) else []:
        if not isinstance(e, Mapping) or not isinstance(e.get("time"), (int, float)) or e["time"] < since:
            continue
        if e.get("event") == "kernel_oom_kill" or (e.get("event") == "exit" and e.get("kernel_oom")):
            out.append(e)
    return out


def assess(reply: Mapping[str, Any], now: float, window_s: float = DEFAULT_WINDOW_S) -> tuple[int, str]:
    """(exit code, line) for a status reply."""
    scope = reply.get("scope")
    workers = reply.get("workers") if isinstance(reply.get("workers"), Mapping) else {}
    if not isinstance(scope, Mapping):
        return UNKNOWN, "memguard UNKNOWN: the daemon has no reading of the machine yet"
    problems: list[str] = []
    failed = sorted(n for n, w in workers.items() if isinstance(w, Mapping) and w.get("phase") == "failed")
    if failed:
        problems.append(f"{len(failed)} worker(s) failed ({', '.join(failed[:3])}"
                        + (", ..." if len(failed) > 3 else "") + ")")
    ooms = _kernel_ooms(reply.get("events"), now - window_s)
    if ooms:
        who = sorted({str(e.get("worker")) for e in ooms if e.get("worker")})
        problems.append(f"kernel OOM kill(s) in the last {_minutes(window_s)}"
                        + (f" ({', '.join(who[:3])})" if who else ""))
    firing = [f"{m.get('rule')} ({m.get('action')})" for g in scope.get("gauges", []) if isinstance(g, Mapping)
              for m in g.get("marks", []) if isinstance(m, Mapping) and m.get("active")]
    if firing:
        problems.append("memory short: " + ", ".join(firing[:3]) + " firing")
    if problems:
        return PROBLEM, ("memguard PROBLEM: " + "; ".join(problems))[:LINE_MAX]
    running = sum(1 for w in workers.values() if isinstance(w, Mapping) and w.get("phase") == "running")
    avail = scope.get("available_bytes")
    from ..units import format_size

    shown = f"{format_size(avail)} available" if isinstance(avail, (int, float)) else "available unknown"
    return OK, f"memguard OK: {running} running, 0 failed, {shown} ({scope.get('kind', '?')})"


def _minutes(seconds: float) -> str:
    from ..units import format_duration

    return format_duration(seconds)


def run(args: argparse.Namespace) -> int:
    from ..client import ControlUnavailable, admin_request

    try:
        reply = admin_request("status", args.socket, timeout_s=5.0)
    except ControlUnavailable as e:
        print(f"memguard UNKNOWN: {e}")
        return UNKNOWN
    if not reply.get("ok"):
        print(f"memguard UNKNOWN: the daemon refused: {reply.get('error', 'no reason given')}")
        return UNKNOWN
    code, line = assess(reply, time.time(), args.window)
    print(line)
    sys.stdout.flush()
    return code
