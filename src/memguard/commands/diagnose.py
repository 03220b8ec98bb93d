"""``memguard diagnose``: why did it die?

    memguard diagnose --log FILE [--json] [--exit-code N | --signal SIG] [--oom-killed] [--memory-limit SIZE]

reads the end of a log file (a job's output, a container's log; ``-`` reads
standard input), finds the lines that say why the program ended (GPU or host
out of memory, a full disk, a time limit, a kill) and prints the cause from
memguard's vocabulary (docs/incidents.md, "Causes"), those lines with their
line numbers, and what to do::

    cause:     gpu_oom
    what:      GPU out of memory on GPU 0 (tried to allocate 2.00 GiB), reported by pytorch
    status:    exit status unknown
    evidence:  train.log:1234  torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ...
    do:        Reduce the batch size (or sequence length), use mixed precision ...

The exit status decides whether it failed, the text what kind of failure: a
log alone says what kind; ``--exit-code`` or ``--signal`` says whether (an
exit 0 is never a failure). ``--json`` prints one JSON object per line with
the fields ``cause``, ``detail``, ``recommendation``, ``evidence``,
``exit_code``, ``signal``, ``signal_name``, ``limit_bytes`` (plus
``source``, ``requested_bytes``, ``gpu`` where known, ``log`` and
``evidence_lines``).

``memguard diagnose`` without ``--log`` (the latest deaths on the box) and
``memguard diagnose PID|WORKER|CONTAINER`` read memguard's incident records;
they answer through :data:`LATEST_SOURCES` and :data:`TARGET_RESOLVERS`,
which the incident store fills. Where none is registered they say so.

Exit status: 0 a diagnosis was printed, whatever the cause; 2 nothing could be
diagnosed: no such file, an unreadable one, a bad option, or no incident
source for a target.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, TextIO

from ..diagnose import Verdict, diagnose_exit, split_lines
from ..model import signal_name

__all__ = ["add_parser", "run", "Report", "diagnose_log", "read_tail", "format_report", "report_json",
           "LATEST_SOURCES", "TARGET_RESOLVERS", "Unavailable"]

MAX_BYTES = 4 * 1024 * 1024
"""Bytes read from the end of a log, default. A job's last error and the teardown after it fit many times over;
the read stays bounded on a log of gigabytes."""

MAX_LINES = 1000
"""Lines diagnosed from the end of the log, default: a long traceback, the messages around it and a framework's
shutdown chatter after it."""

WRAP = 100
"""Width of the human-readable output, in characters."""


class Unavailable(Exception):
    """A source of incidents that cannot answer here (not installed, no state directory): the message says why."""


@dataclass(frozen=True)
class Report:
    """One diagnosis to print: what it is about (``title``: a log file, later a pid, worker or container),
    the verdict, where each evidence line sits in its source (``locations``, aligned with
    ``verdict.evidence``), and extra JSON fields (``fields``)."""

    title: str
    verdict: Verdict
    locations: tuple[str, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)


# Hooks for the incident store: ``memguard diagnose`` (no target) asks every LATEST_SOURCES entry for its reports;
# ``memguard diagnose TARGET`` asks the TARGET_RESOLVERS in turn, the first that returns a list answers (None: not
# mine). Either may raise Unavailable.
LATEST_SOURCES: list[Callable[[argparse.Namespace], list[Report]]] = []
TARGET_RESOLVERS: list[Callable[[str, argparse.Namespace], list[Report] | None]] = []


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "diagnose",
        help="why did a program die? (reads a log file: --log FILE)",
        description="Say why a program died: the cause (gpu_oom, host_oom, killed, timeout, disk_full, exit, none, "
                    "unknown), the lines that say so, and what to do.",
    )
    p.add_argument("target", nargs="?", metavar="PID|WORKER|CONTAINER",
                   help="what to diagnose from memguard's incident records (needs the incident store)")
    p.add_argument("--log", "-l", metavar="FILE", help="diagnose this log file ('-' for standard input)")
    p.add_argument("--json", action="store_true", help="one JSON object per diagnosis, one per line")
    status = p.add_mutually_exclusive_group()
    status.add_argument("--exit-code", type=int, metavar="N",
                        help="the program's exit status (128+N and negative values name a signal)")
    status.add_argument("--signal", metavar="SIG", help="the signal that ended it: KILL, SIGTERM, 9, ...")
    p.add_argument("--oom-killed", action="store_true",
                   help="the kernel's OOM killer killed it (dmesg, docker inspect's OOMKilled)")
    p.add_argument("--memory-limit", metavar="SIZE", help="the memory limit it ran under (8GiB), quoted in the advice")
    p.add_argument("--lines", "-n", type=int, default=MAX_LINES, metavar="N",
                   help=f"diagnose the last N lines (default {MAX_LINES})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------------
# Reading a log


def read_tail(stream: BinaryIO, *, max_bytes: int = MAX_BYTES, max_lines: int = MAX_LINES,
              seekable: bool = True) -> tuple[list[str], int | None]:
    """The last ``max_lines`` lines of a binary stream, reading at most ``max_bytes`` from its end, and
    the line number of the first one returned (1-based), or None when the read started mid-stream
    (line numbers are then counted from the end)."""
    start_known = True
    if seekable:
        size = stream.seek(0, os.SEEK_END)
        offset = max(0, size - max_bytes)
        stream.seek(offset)
        data = stream.read(max_bytes)
        start_known = offset == 0
    else:
        chunks: collections.deque[bytes] = collections.deque()
        held = 0
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            held += len(chunk)
            while held - len(chunks[0]) >= max_bytes:
                held -= len(chunks.popleft())
                start_known = False
        data = b"".join(chunks)
        if len(data) > max_bytes:
            data = data[-max_bytes:]
            start_known = False
    if not start_known:
        cut = data.find(b"\n")
        data = data[cut + 1:] if cut >= 0 else data  # the first line is partial
    lines = split_lines([data])
    if lines and lines[-1] == "" and data.endswith((b"\n", b"\r")):
        lines.pop()
    first = 1 if start_known else None
    if len(lines) > max_lines:
        if first is not None:
            first += len(lines) - max_lines
        lines = lines[-max_lines:]
    return lines, first


def _parse_signal(text: str) -> int:
    t = text.strip().upper()
    if t.lstrip("-").isdigit():
        n = abs(int(t))
        if 0 < n < 128:
            return n
        raise ValueError(f"no signal numbered {text}")
    import signal as _signal

    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(_signal.Signals[name])
    except KeyError:
        raise ValueError(f"no signal named {text}") from None


def diagnose_log(lines: list[str], first_line: int | None, *, name: str, returncode: int | None = None,
                 signal: int | None = None, kernel_oom: bool | None = None,
                 limit_bytes: int | None = None) -> Report:
    """A :class:`Report` for log lines (as :func:`read_tail` returns them), each evidence line located
    as ``name:N`` (or ``name:end-N`` counted from the last line when the start was not read)."""
    verdict = diagnose_exit(returncode, signal, lines, kernel_oom=kernel_oom, limit_bytes=limit_bytes)
    numbers: list[int | None] = []
    for d in verdict.findings:
        if d.index < 0:
            numbers.append(None)
        elif first_line is not None:
            numbers.append(first_line + d.index)
        else:
            numbers.append(d.index - len(lines))  # -1 is the last line
    locations = tuple(f"{name}:{n}" if n is not None and n > 0 else f"{name}:end{n}" if n is not None else name
                      for n in numbers)
    return Report(name, verdict, locations, {"log": name, "evidence_lines": numbers,
                                             "lines_read": len(lines)})


def _from_log(args: argparse.Namespace) -> list[Report]:
    returncode, sig = args.exit_code, None
    if args.signal is not None:
        sig = _parse_signal(args.signal)
    limit = None
    if args.memory_limit:
        from ..units import parse_size

        limit = parse_size(int(args.memory_limit) if args.memory_limit.isdigit() else args.memory_limit)
    if args.log == "-":
        lines, first = read_tail(sys.stdin.buffer, max_bytes=args.max_bytes, max_lines=args.lines, seekable=False)
        name = "stdin"
    else:
        with open(args.log, "rb") as f:
            lines, first = read_tail(f, max_bytes=args.max_bytes, max_lines=args.lines, seekable=f.seekable())
        name = args.log
    return [diagnose_log(lines, first, name=name, returncode=returncode, signal=sig,
                         kernel_oom=True if args.oom_killed else None, limit_bytes=limit)]


# ----------------------------------------------------------------------------------------------
# Output


def report_json(report: Report) -> dict[str, Any]:
    """The JSON object printed for a report: the verdict's documented fields, then the report's own."""
    out = report.verdict.to_dict()
    out.update(report.fields)
    return out


def _status(v: Verdict) -> str:
    if v.signal is not None and v.exit_code is not None:
        return f"exit {v.exit_code} ({signal_name(v.signal)})"
    if v.signal is not None:
        return f"killed by {signal_name(v.signal)}"
    if v.exit_code is not None:
        return f"exit {v.exit_code}"
    return "exit status unknown"


def format_report(report: Report, width: int = WRAP) -> str:
    """The report for people: cause, what, status, evidence (one line each, with its location), advice."""
    v = report.verdict
    label = 11

    def field_lines(name: str, text: str) -> list[str]:
        wrapped = textwrap.wrap(text, width=max(40, width - label)) or [""]
        return [f"{name + ':':<{label}}{wrapped[0]}"] + [" " * label + w for w in wrapped[1:]]

    out = field_lines("cause", v.cause) + field_lines("what", v.detail) + field_lines("status", _status(v))
    if v.evidence:
        for i, line in enumerate(v.evidence):
            where = report.locations[i] if i < len(report.locations) else ""
            out.append(f"{'evidence:' if i == 0 else '':<{label}}{where + '  ' if where else ''}{line}")
    else:
        out.append(f"{'evidence:':<{label}}(no line in the text names a cause)")
    if v.recommendation:
        out += field_lines("do", v.recommendation)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Running


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if args.lines is not None and args.lines < 1:
            raise ValueError("--lines must be 1 or more")
        if args.log is not None and args.target is not None:
            raise ValueError("give either --log FILE or a target, not both")
        if args.log is not None:
            reports = _from_log(args)
        elif args.target is not None:
            reports = _from_target(args.target, args)
        else:
            reports = _from_latest(args)
    except (ValueError, Unavailable) as e:
        print(f"memguard diagnose: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = getattr(e, "filename", None) or args.log
        print(f"memguard diagnose: cannot read {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        for i, report in enumerate(reports):
            if args.json:
                out.write(json.dumps(report_json(report), ensure_ascii=False) + "\n")
            else:
                out.write(("\n" if i else "") + format_report(report) + "\n")
        out.flush()
    except BrokenPipeError:  # `memguard diagnose ... | head`
        pass
    return 0


def _from_target(target: str, args: argparse.Namespace) -> list[Report]:
    for resolve in TARGET_RESOLVERS:
        found = resolve(target, args)
        if found is not None:
            return found
    if re.fullmatch(r"\d+", target):
        what = f"process {target}"
    else:
        what = f"{target!r}"
    raise Unavailable(f"no incident records to diagnose {what} from; diagnose its output with --log FILE "
                      "(a container's: docker logs NAME > FILE, then --log FILE --exit-code "
                      "$(docker inspect -f '{{.State.ExitCode}}' NAME))")


def _from_latest(args: argparse.Namespace) -> list[Report]:
    if not LATEST_SOURCES:
        raise Unavailable("no incident records to read the latest deaths from; diagnose a job's output with "
                          "--log FILE")
    reports: list[Report] = []
    for source in LATEST_SOURCES:
        reports.extend(source(args))
    return reports
