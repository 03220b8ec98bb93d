"""``memguard events``: memguard's history, read back from the journal.

A thin wrapper around ``journalctl -u memguard -o json``: the filters become
journal matches (``MEMGUARD_EVENT=terminate``, ``MEMGUARD_WORKER=trials-0``;
the same field given twice matches either value), and each entry becomes
one line for people::

    2026-05-04 10:02:13.120  terminate   trials-0   trials-0 (pid 4242): terminate: ... [worker.memory 9.1GiB > 8GiB]

or, with ``--json``, one JSON object per line in the shape of memguard's
own JSON log (``event``, ``worker``, ``pid``, ``rule``, ``value``,
``threshold``, ..., plus ``timestamp``, ``level`` and ``message``).

The workers' output lines are left out unless ``--output`` (or
``--event output``) asks for them; systemd's own lines about the unit
(started, watchdog timeout, main process killed) are shown as ``[systemd]``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import shutil
import signal
import subprocess
import sys
from typing import Any, Iterable, Iterator, TextIO

__all__ = ["add_parser", "run", "journalctl_argv", "entry_to_event", "format_line", "permission_hint"]

LEVELS = {0: "emergency", 1: "alert", 2: "critical", 3: "error", 4: "warning", 5: "notice", 6: "info",
          7: "debug"}
PREFIX = "MEMGUARD_"
# The decision keys of memguard's log (report/log.py), in its order.
ORDER = ("workload", "worker", "pid", "rule", "when", "signal", "value", "threshold", "unit", "action",
         "reason", "source")
# Keys always kept as text in --json output, even when they look like numbers.
TEXT_KEYS = {"event", "worker", "workload", "rule", "message", "reason", "when", "signal", "file", "key",
             "stream", "line"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("events", help="memguard's events from the journal (wraps journalctl)")
    p.add_argument("--since", "-S", metavar="TIME", help="from this time on (journalctl syntax: '1h ago', "
                                                          "'today', '2026-05-04 10:00')")
    p.add_argument("--until", "-U", metavar="TIME", help="up to this time (journalctl syntax)")
    p.add_argument("--worker", "-w", action="append", default=[], metavar="NAME",
                   help="only this worker (repeat for several)")
    p.add_argument("--workload", action="append", default=[], metavar="NAME",
                   help="only this workload (repeat for several)")
    p.add_argument("--event", "-e", action="append", default=[], metavar="NAME",
                   help="only this event: terminate, kill, restart, block, exit, config_error, ... "
                        "(repeat, or separate with commas)")
    p.add_argument("--priority", "-p", metavar="LEVEL", help="only this level or worse (error, warning, ...)")
    p.add_argument("--output", action="store_true", help="include the workers' output lines")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--unit", "-u", default="memguard", help="the unit memguard runs as (default: memguard)")
    p.add_argument("--directory", "-D", metavar="DIR", help="read the journal files in DIR (journalctl -D)")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N events")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events as they come")
    p.add_argument("--journalctl", default="journalctl", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _split(values: Iterable[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def journalctl_argv(args: argparse.Namespace, journalctl: str, *, reverse: bool = False,
                    follow_after: str | None = None) -> list[str]:
    """journalctl's command line for these filters."""
    unit = args.unit if "." in args.unit else f"{args.unit}.service"
    argv = [journalctl, "--no-pager", "-o", "json", "--all", "-u", unit]
    if args.directory:
        argv += ["-D", args.directory]
    if args.since:
        argv += ["--since", args.since]
    if args.until:
        argv += ["--until", args.until]
    if args.priority:
        argv += ["-p", args.priority]
    if reverse:
        argv.append("--reverse")
    if follow_after is not None:
        argv += ["--follow", f"--after-cursor={follow_after}"] if follow_after else ["--follow", "--lines=0"]
    argv += [f"MEMGUARD_EVENT={e}" for e in _split(args.event)]
    argv += [f"MEMGUARD_WORKER={w}" for w in _split(args.worker)]
    argv += [f"MEMGUARD_WORKLOAD={w}" for w in _split(args.workload)]
    return argv


# --------------------------------------------------------------------------
# Entries


def _text(value: Any) -> str:
    """A journal JSON value as text: a string, a list of byte values (not UTF-8), or a list of those
    (a field given more than once; the last is kept), or null (too large without --all)."""
    if value is None:
        return ""
    if isinstance(value, list):
        if value and all(isinstance(b, int) for b in value):
            return bytes(value).decode("utf-8", "replace")
        return _text(value[-1]) if value else ""
    return str(value)


def _typed(key: str, text: str) -> Any:
    if key in TEXT_KEYS:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, (bool, int, float, list, dict)) and json.dumps(value) == text:
        return value
    if isinstance(value, float) and repr(value) == text:
        return value
    return text


def _time(entry: dict[str, Any]) -> _dt.datetime | None:
    try:
        usec = int(_text(entry.get("__REALTIME_TIMESTAMP")))
    except ValueError:
        return None
    return _dt.datetime.fromtimestamp(usec / 1e6).astimezone()


def entry_to_event(entry: dict[str, Any]) -> dict[str, Any]:
    """One journal entry (``journalctl -o json``) as a memguard event dict, keys in the order of memguard's
    own log: event, timestamp, level, the decision's keys, the rest alphabetically, message."""
    name = _text(entry.get(PREFIX + "EVENT"))
    ident = _text(entry.get("SYSLOG_IDENTIFIER"))
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        if key.startswith(PREFIX) and key != PREFIX + "EVENT":
            k = key[len(PREFIX):].lower()
            fields[k] = _typed(k, _text(value))
    if name == "output" and "line" not in fields:
        fields["line"] = _text(entry.get("MESSAGE"))
    try:
        priority = int(_text(entry.get("PRIORITY")) or 6)
    except ValueError:
        priority = 6
    event: dict[str, Any] = {"event": name or f"[{ident or 'unknown'}]"}
    when = _time(entry)
    if when is not None:
        event["timestamp"] = when.isoformat(timespec="microseconds")
    event["level"] = LEVELS.get(priority, "info")
    for key in ORDER:
        if key in fields:
            event[key] = fields.pop(key)
    event.update(sorted(fields.items()))
    event["message"] = _text(entry.get("MESSAGE"))
    return event


def format_line(event: dict[str, Any]) -> str:
    when = event.get("timestamp", "")
    try:
        shown = _dt.datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if when else ""
    except ValueError:
        shown = when
    name = str(event.get("event", ""))
    worker = str(event.get("worker", "") or "-")
    message = str(event.get("message", "")).replace("\n", "\n    ")
    if name == "output":
        message = f"{event.get('stream', 'out')}: {message}"
    return f"{shown:<23}  {name:<17} {worker:<14} {message}"


def _wanted(event: dict[str, Any], args: argparse.Namespace) -> bool:
    if event["event"] == "output":
        return args.output or "output" in _split(args.event)
    return True


def _emit(event: dict[str, Any], args: argparse.Namespace, out: TextIO) -> None:
    out.write((json.dumps(event, ensure_ascii=False) if args.json else format_line(event)) + "\n")
    out.flush()


def _entries(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for raw in lines:
        raw = raw.strip()
        if not raw:
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry


# --------------------------------------------------------------------------
# Running journalctl

#: What journalctl (systemd 245 and later) says on stderr when the user may not read the system journal:
#: the error when it could open no file at all, the hint when it could open only the user's own journal.
_NO_PERMISSION = ("insufficient permissions", "not seeing messages from other users", "Permission denied")
JOURNAL_GROUPS = ("systemd-journal", "adm")


def _user_and_groups() -> tuple[str, set[str]]:
    import grp
    import os
    import pwd

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    names = set()
    for gid in {os.getegid(), *os.getgroups()}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return user, names


def permission_hint(err: str, directory: str | None = None) -> str | None:
    """What to do, when journalctl's stderr says the journal could not be read for lack of permission;
    None for any other message."""
    if not any(phrase in err for phrase in _NO_PERMISSION):
        return None
    user, groups = _user_and_groups()
    where = f"the journal files in {directory}" if directory else "the system journal, where memguard's events are"
    lines = [f"memguard events: you ({user}) may not read {where}."]
    member = [g for g in JOURNAL_GROUPS if g in groups]
    if member:
        lines.append(f"  You are in the group {member[0]}, but this session was started before you joined it: "
                     "log in again (or run `newgrp systemd-journal`).")
    else:
        lines.append(f"  Add yourself to the group systemd-journal (or adm): sudo usermod -aG systemd-journal "
                     f"{user}, then log in again;")
        lines.append("  or run it as root: sudo memguard events ...")
    said = next((line.strip() for line in err.splitlines() if any(p in line for p in _NO_PERMISSION)), "")
    lines.append(f"  (journalctl: {said})")
    return "\n".join(lines)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    journalctl = shutil.which(args.journalctl)
    if journalctl is None:
        print(f"memguard events: {args.journalctl} not found. It is part of systemd; memguard writes its "
              "events to the journal only when it runs under systemd. Elsewhere, read the daemon's output "
              "(--log-format json).", file=sys.stderr)
        return 2
    if args.lines is not None and args.lines < 0:
        print("memguard events: -n must be 0 or more", file=sys.stderr)
        return 2
    try:
        last_cursor: str | None = None
        limit = args.lines if args.lines is not None else (10 if args.follow else None)
        if limit is not None:
            # Newest first, stopping after `limit` shown events: cheap on a long journal.
            shown: collections.deque[dict[str, Any]] = collections.deque()
            rc, last_cursor = _read(journalctl_argv(args, journalctl, reverse=True), args, shown.appendleft,
                                    limit=limit)
            for event in shown:
                _emit(event, args, out)
            if rc != 0:
                return rc
        else:
            rc, last_cursor = _read(journalctl_argv(args, journalctl), args, lambda e: _emit(e, args, out))
            if rc != 0:
                return rc
        if args.follow:
            rc, _ = _read(journalctl_argv(args, journalctl, follow_after=last_cursor or ""), args,
                          lambda e: _emit(e, args, out))
            return rc
        return 0
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `memguard events | head`
        return 0


def _read(argv: list[str], args: argparse.Namespace, sink: Any, *, limit: int | None = None
          ) -> tuple[int, str | None]:
    """Run journalctl, hand each wanted event to ``sink``; stop after ``limit`` events. Returns journalctl's
    exit status (0 when stopped early) and the cursor of the first entry read (the newest when reversed,
    which is where a follow resumes)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", bufsize=1)
    assert proc.stdout is not None and proc.stderr is not None
    first_cursor: str | None = None
    last_cursor: str | None = None
    count = 0
    stopped = False
    finished = False  # journalctl ended by itself
    try:
        if limit == 0:
            stopped = True
        else:
            for entry in _entries(proc.stdout):
                cursor = entry.get("__CURSOR")
                if first_cursor is None:
                    first_cursor = cursor
                last_cursor = cursor
                event = entry_to_event(entry)
                if not _wanted(event, args):
                    continue
                sink(event)
                count += 1
                if limit is not None and count >= limit:
                    stopped = True
                    break
            else:
                finished = True
    finally:
        if not finished and proc.poll() is None:  # stopped early, or interrupted
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().strip()
    if err and not (stopped and proc.returncode in (-signal.SIGTERM, 0)):
        # journalctl says "-- No entries --" on stdout; on stderr it says why it could not read.
        hint = permission_hint(err, args.directory)
        if hint is None:
            print(err, file=sys.stderr)
        elif not getattr(args, "_hinted", False):  # once, not again for the --follow run after it
            args._hinted = True
            print(hint, file=sys.stderr)
    rc = 0 if stopped else proc.returncode
    if rc == 1 and not err:  # no entries matched: not an error for us
        rc = 0
    cursor = first_cursor if argv.count("--reverse") else last_cursor
    return rc, cursor
