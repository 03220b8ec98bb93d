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
``memguard diagnose PID|WORKER|CONTAINER`` answer from what was written down,
without the daemon running:

- memguard's incident records (``--dir``, by default the state directory's
  ``incidents/``), found by pid, incident id, worker, container name or id
  prefix, or systemd unit;
- the kernel log read directly (``/dev/kmsg``, this boot's ring): the OOM
  kills no record holds (memguard was not running, or not installed then);
- the container runtime (Docker's or Podman's socket) for a container no
  record holds: its exit code, ``OOMKilled``, its last log lines and its
  ``kill`` events, joined with the kernel's report of its cgroup.

Each answer carries the cause, ``limit_bytes``, ``signal``, ``exit_code`` and
the evidence lines like ``--log`` does, plus the incident's id, time, pid
and owner. The sources are tried through :data:`LATEST_SOURCES` and
:data:`TARGET_RESOLVERS` (a resolver returning None passes to the next).

Exit status: 0 a diagnosis was printed, whatever the cause; 2 nothing could be
diagnosed: no such file, an unreadable one, a bad option, or no record of a
target anywhere.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable, TextIO

from ..diagnose import Verdict, diagnose_exit, recommend, split_lines
from ..model import signal_name

__all__ = ["add_parser", "run", "Report", "diagnose_log", "read_tail", "format_report", "report_json",
           "report_of_incident", "LATEST_SOURCES", "TARGET_RESOLVERS", "Unavailable"]

MAX_BYTES = 4 * 1024 * 1024
"""Bytes read from the end of a log, default. A job's last error and the teardown after it fit many times over;
the read stays bounded on a log of gigabytes."""

MAX_LINES = 1000
"""Lines diagnosed from the end of the log, default: a long traceback, the messages around it and a framework's
shutdown chatter after it."""

WRAP = 100
"""Width of the human-readable output, in characters."""

LATEST = 5
"""Deaths shown by ``memguard diagnose`` without a target, default: the latest few are what a person arriving
after the fact asks about; ``memguard incidents list`` has them all."""

CONTAINER_LOG_LINES = 50
"""A container's last log lines read for its diagnosis (as the daemon reads them at its death)."""


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
    heading: str = ""  # a first line for people (an incident's id, time and owner); none for a log


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
    p.add_argument("--dir", metavar="DIR", help="where memguard's incident records are (default: the state "
                                                 "directory's incidents/)")
    p.add_argument("--latest", type=int, default=LATEST, metavar="N",
                   help=f"without a target: the latest N deaths (default {LATEST})")
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

    out = [report.heading] if report.heading else []
    out += field_lines("cause", v.cause) + field_lines("what", v.detail) + field_lines("status", _status(v))
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
        if args.latest < 1:
            raise ValueError("--latest must be 1 or more")
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
    what = f"process {target}" if re.fullmatch(r"\d+", target) else repr(target)
    raise Unavailable(f"no recorded death of {what}: no incident record in {_store(args).dir} names it"
                      + ("" if re.fullmatch(r"\d+", target) else ", no container runtime knows it")
                      + " and the kernel log holds no OOM kill of it; diagnose its output with --log FILE")


def _from_latest(args: argparse.Namespace) -> list[Report]:
    reports: list[Report] = []
    for source in LATEST_SOURCES:
        reports.extend(source(args))
    reports.sort(key=lambda r: r.fields.get("wall") or 0.0, reverse=True)
    return reports[:args.latest]


# ----------------------------------------------------------------------------------------------
# Deaths written down: memguard's incident records, the kernel log, the container runtime


def _store(args: argparse.Namespace) -> Any:
    from ..report.incidents import IncidentStore, default_incident_dir

    return IncidentStore(getattr(args, "dir", None) or default_incident_dir())


def _when(wall: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _advice(inc: Any, sig: int | None, limit: int | None) -> str:
    """What to do, for an incident: the classifier's advice, or the seed table's for its cause and sender."""
    why, how = inc.why, inc.how
    if why.get("recommendation"):
        return str(why["recommendation"])
    sent_by = str(how.get("sent_by") or "")
    owner = inc.owner
    container = owner is not None and owner.kind == "container"
    if inc.cause == "killed" and "runtime" in sent_by:
        return ("Find who stopped it (a deploy script, an orchestrator, a person): the runtime sent the signal "
                "(docker kill, or docker stop past its timeout). docker stop sends SIGTERM, then SIGKILL after 10 s "
                "by default: a job that needs longer to save a checkpoint needs a longer --stop-timeout.")
    if inc.source == "memguard" and why.get("rule"):
        text = recommend(inc.cause, sig=sig, limit_bytes=limit) if inc.cause != "killed" else ""
        return (f"memguard stopped it: rule {why['rule']} ({why.get('when', '')}). " + text).strip()
    text = recommend(inc.cause, sig=sig, limit_bytes=limit, kernel_oom=True if sent_by == "kernel" else None)
    if inc.cause == "host_oom" and container:
        text = text.replace("Raise the memory limit", "Raise the container's --memory limit", 1)
    return text


def report_of_incident(inc: Any, path: str | None = None) -> Report:
    """A :class:`Report` of one incident record: its verdict in the fields ``--log`` prints, and who died."""
    how, why = inc.how, inc.why
    oom = how.get("oom") if isinstance(how.get("oom"), dict) else {}
    outcome = inc.outcome or {}
    exit_code = how.get("exit_code", how.get("returncode"))
    if exit_code is None:
        exit_code = outcome.get("returncode")
    sig = how.get("signal")
    if inc.source == "memguard" and outcome.get("signal") is not None:
        sig = outcome["signal"]  # what ended it (memguard's SIGTERM may have been escalated to SIGKILL)
    if sig is None and isinstance(exit_code, int) and 128 < exit_code < 193:
        sig = exit_code - 128
    limit = oom.get("limit_bytes") or why.get("limit_bytes")
    evidence = tuple(inc.evidence) or ((str(how["output_line"]),) if how.get("output_line") else ())
    if not evidence and inc.source == "memguard" and why.get("rule"):
        evidence = (f"rule {why['rule']} ({why.get('when', '')}): {why.get('text', '')}",)  # its numbers
    verdict = Verdict(inc.cause, inc.summary, _advice(inc, sig if isinstance(sig, int) else None, limit), evidence,
                      exit_code if isinstance(exit_code, int) else None, sig if isinstance(sig, int) else None,
                      limit if isinstance(limit, int) else None)
    what = inc.what
    owner = inc.owner
    who = owner.describe() if owner is not None else "a process"
    pid = inc.pid
    fields: dict[str, Any] = {"incident": inc.id if inc.state != "unrecorded" else None, "time": _when(inc.wall),
                              "wall": inc.wall, "origin": inc.source, "sources": list(inc.sources),
                              "state": inc.state, "pid": pid, "comm": what.get("comm"),
                              "command": what.get("command"), "cgroup": what.get("cgroup"),
                              "worker": what.get("worker") or (owner.worker if owner is not None else None)}
    if owner is not None and owner.container_id:
        fields["container"] = {"id": owner.container_id, "name": owner.name, "image": owner.image}
    if owner is not None and owner.unit:
        fields["unit"] = owner.unit
    if path:
        fields["file"] = path
    fields = {k: v for k, v in fields.items() if v not in (None, [], "")}
    head = f"incident {inc.id}" if inc.state != "unrecorded" else \
        "from the container runtime (no incident record)" if inc.source == "container" else \
        "from the kernel log (no incident record)"
    heading = f"{head}  {_when(inc.wall)}  {who}" + (f", pid {pid}" if pid is not None else "")
    return Report(inc.id, verdict, (), fields, heading)


def _kernel_kills() -> tuple[list[Any], str | None, str | None]:
    """Every OOM kill still in this boot's kernel log ring, read directly; (kills, boot id, why not)."""
    from ..sense.kmsg import KmsgCursor, KmsgReader, KmsgUnavailable, OomReportParser, read_boot_id

    boot = read_boot_id()
    if not isinstance(boot, str) or not boot:
        return [], None, "this boot's id is unknown"
    try:
        reader = KmsgReader.open(resume=KmsgCursor(boot, 0), boot_id=boot)
    except KmsgUnavailable as e:
        return [], boot, str(e.strerror or e)
    parser = OomReportParser()
    kills: list[Any] = []
    with reader:
        while True:
            items = reader.read(4096)
            if not items:
                break
            kills.extend(parser.feed_all(items))
    kills.extend(parser.flush())
    return kills, boot, None


def _unrecorded(kills: list[Any], boot: str | None, known: set[str]) -> list[Any]:
    """Incidents (not written) of the kernel's kills that no record holds."""
    import time

    from ..report.incidents import death_key, incident_from_oom_kill
    from ..sense.containers import attribute_cgroup
    from ..sense.kmsg import kernel_time_to_wall

    out = []
    now_wall, now_mono = time.time(), time.monotonic()
    for kill in kills:
        if death_key(boot, kill.pid) in known:
            continue
        owner = attribute_cgroup(kill.cgroup) if kill.cgroup else None
        inc = incident_from_oom_kill(kill, owner, wall=kernel_time_to_wall(kill.ts_us, now_wall, now_mono),
                                     boot_id=boot)
        out.append(replace(inc, state="unrecorded"))
    return out


def _latest_deaths(args: argparse.Namespace) -> list[Report]:
    store = _store(args)
    records, broken = store.scan()
    for b in broken:
        print(f"memguard diagnose: skipped {b.path}: {b.reason}", file=sys.stderr)
    kills, boot, why_not = _kernel_kills()
    extra = _unrecorded(kills, boot, {i.key for i in records})
    if not records and not extra:
        where = f"no incident records in {store.dir}"
        raise Unavailable(where + (f" and the kernel log cannot be read ({why_not})" if why_not else
                                   " and no OOM kill in the kernel log") + "; diagnose a job's output with --log FILE")
    incs = sorted(records + extra, key=lambda i: i.wall, reverse=True)[:args.latest]
    return [report_of_incident(i, str(store.path_of(i.id)) if i.state != "unrecorded" else None) for i in incs]


def _recorded_target(target: str, args: argparse.Namespace) -> list[Report] | None:
    store = _store(args)
    found = store.find(target)
    if target.isdigit():
        kills, boot, _ = _kernel_kills()
        pid = int(target)
        found = found + _unrecorded([k for k in kills if k.pid == pid], boot, {i.key for i in found})
    if not found:
        return None
    found.sort(key=lambda i: i.wall, reverse=True)
    return [report_of_incident(i, str(store.path_of(i.id)) if i.state != "unrecorded" else None) for i in found]


def _rfc3339(text: str) -> float | None:
    """Epoch seconds of a runtime's time stamp (``2026-11-28T22:50:58.123456789Z``); None for the zero time."""
    import datetime as _dt

    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    if m is None or text.startswith("0001-"):
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    t = _dt.datetime.fromisoformat(m.group(1) + zone).timestamp()
    return t + (float("0." + m.group(2)) if m.group(2) else 0.0)


def _container_target(target: str, args: argparse.Namespace) -> list[Report] | None:
    """A container no record holds, asked of the runtime and joined with the kernel's report of its cgroup."""
    import time

    from ..report.incidents import incident_from_container
    from ..sense.containers import ContainerInfo, DockerClient, attribute_cgroup

    if target.isdigit():
        return None
    docker = DockerClient()
    info = docker.inspect(target)
    if not isinstance(info, ContainerInfo):
        return None
    if info.running:
        raise Unavailable(f"container {info.name or target} is running (pid {info.pid}): nothing has died yet")
    kills, boot, _ = _kernel_kills()
    mine = [k for k in kills if k.cgroup and attribute_cgroup(k.cgroup).container_id == info.id]
    logs = docker.logs(info.id, CONTAINER_LOG_LINES)
    started = _rfc3339(info.started_at) or time.time() - 86400
    finished = _rfc3339(info.finished_at) or time.time()
    events = docker.events(since=started - 1, until=min(time.time(), finished + 1), container=info.id)
    owner = attribute_cgroup(mine[-1].cgroup) if mine else None
    inc = incident_from_container(info, wall=finished, boot_id=boot, owner=owner, kills=mine,
                                  events=events if isinstance(events, list) else (),
                                  log_lines=logs if isinstance(logs, list) else ())
    return [report_of_incident(replace(inc, state="unrecorded"))]


LATEST_SOURCES.append(_latest_deaths)
TARGET_RESOLVERS.extend([_recorded_target, _container_target])
