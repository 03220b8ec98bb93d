"""Incident records: one JSON file per death, written so that it survives the writer.

An incident says, for one process (or container) that died:

- **what** died: pid, command line, user, cgroup, and what it belongs to
  (a memguard worker, a container, a systemd unit: an
  :class:`~memguard.sense.containers.Owner`);
- **how**: the signal or exit code and what it means, the OOM kind and the
  limit that was hit, the out-of-memory line the process printed;
- **why**: the rule and its numbers and the victim ranking (memguard's own
  action), or the kernel's reason ("the kernel at the container's 16GiB
  limit");
- its ``cause``, one word from :data:`CAUSES`;
- the **timeline** the flight recorder held before it, and the seconds
  after it (added later with :meth:`IncidentStore.append_after`).

The store
---------
:class:`IncidentStore` keeps one ``<id>.json`` per incident in a
directory (:func:`default_incident_dir`: ``$STATE_DIRECTORY/incidents``
under systemd's ``StateDirectory=memguard``, ``/var/lib/memguard/incidents``
for root, ``$XDG_STATE_HOME/memguard/incidents`` or
``~/.local/state/memguard/incidents`` otherwise). Writes are atomic: a
temporary file in the same directory, ``fsync``, ``rename``, ``fsync`` of
the directory; a reader sees the old record or the new one, never half of
one. Retention keeps at most :data:`DEFAULT_MAX_COUNT` records, none older
than :data:`DEFAULT_MAX_AGE_S`, and at most :data:`DEFAULT_MAX_BYTES` in
all, dropping the oldest first. Listing and loading skip files that do
not parse and say which (:meth:`IncidentStore.scan`).

One death, one record: each incident carries a ``key`` (``death:<boot
id>:<pid>`` for a process); :meth:`IncidentStore.record` merges a new
incident into an existing one with the same key from the last
:data:`MERGE_WINDOW_S` seconds, so the kernel's report of a kill and the
worker's exit seen by memguard end as one record, whichever came first.

Before the signal
-----------------
A record of memguard's own action is written (``state: pending``) before
the signal is sent, with ``durable=False``: the file is complete on disk
in the page cache once ``rename`` returns, so a daemon killed right after
still leaves it (only a machine crash needs the ``fsync``, which
:meth:`IncidentStore.make_durable` does right after, off the hot path).
:meth:`IncidentStore.complete` adds the outcome when the process is gone.

Building records is pure (:func:`incident_for_action`,
:func:`incident_from_oom_kill`, :func:`incident_from_exit`,
:func:`incident_from_container`); only the store does I/O.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal as _signal
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..model import Exited, Explanation, Signal, SignalProcess, signal_name
from ..sense.containers import ContainerEvent, ContainerInfo, Owner
from ..sense.kmsg import OomKill
from ..units import format_size

__all__ = [
    "CAUSES",
    "SCHEMA",
    "Incident",
    "Broken",
    "IncidentStore",
    "default_state_dir",
    "default_incident_dir",
    "incident_id",
    "incident_for_action",
    "complete_action",
    "incident_from_oom_kill",
    "incident_from_exit",
    "incident_from_container",
    "exit_meaning",
    "classify_lines",
    "cause_of_rule",
    "DEFAULT_MAX_COUNT",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
]

SCHEMA = 1

CAUSES = ("host_oom", "gpu_oom", "killed", "timeout", "disk_full", "exit", "none")
"""Why something died, one word (scripts and dashboards match on these):
``host_oom`` the kernel's or a cgroup's OOM kill, a ``MemoryError``, an
allocator failure, or memguard stopping it for RAM; ``gpu_oom`` GPU memory
ran out; ``killed`` a signal from elsewhere; ``timeout`` a time limit;
``disk_full`` no space left; ``exit`` a failure with no known cause;
``none`` no failure (exit 0, or a stop that was asked for)."""

_SOURCE_RANK = {"memguard": 4, "container": 3, "exit": 3, "kernel": 1}
_PRECEDENCE = {"host_oom": 6, "gpu_oom": 5, "timeout": 4, "disk_full": 4, "killed": 3, "exit": 2, "none": 1}

DEFAULT_MAX_COUNT = 1000
"""Records kept at most. A restart loop writes one per death; 1000 holds
weeks of an ordinary machine and a day of a bad one."""

DEFAULT_MAX_AGE_S = 30 * 86400.0
"""Oldest record kept, in seconds (30 days): the usual look-back of a
post-mortem, and of journald's default retention on small disks."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""All records together at most, in bytes (64 MiB). A record with a
10-minute timeline of a dozen series is 30-100 KiB."""

MERGE_WINDOW_S = 120.0
"""Two incidents with the same key this close together (seconds of wall
time) are one death seen twice: the kernel's report and the exit. Further
apart, the pid was reused."""

TMP_MAX_AGE_S = 600.0
"""A temporary file older than this (seconds) is a writer that died mid-write; pruning removes it."""


# ---------------------------------------------------------------------------
# The record


@dataclass
class Incident:
    """One death. ``what``/``how``/``why`` are plain JSON objects (keys documented in docs/incidents.md).

    ``wall`` is epoch seconds, ``monotonic`` the CLOCK_MONOTONIC seconds
    of the same moment (the flight recorder's clock; for a kernel record,
    the kernel's timestamp). ``state`` is ``pending`` for memguard's own
    action written before the signal, ``complete`` otherwise.
    """

    id: str
    key: str
    cause: str
    summary: str
    wall: float
    monotonic: float | None = None
    boot_id: str | None = None
    source: str = "memguard"  # memguard | kernel | exit | container
    state: str = "complete"
    what: dict[str, Any] = field(default_factory=dict)
    how: dict[str, Any] = field(default_factory=dict)
    why: dict[str, Any] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    timeline: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    sources: list[str] = field(default_factory=list)
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; compact unless ``indent`` is given (``memguard incidents show --json`` indents)."""
        seps = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.to_dict(), indent=indent, separators=seps, default=_json_default, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Incident":
        """An incident from its JSON object. Raises ValueError naming what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        missing = [k for k in ("id", "cause", "wall") if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if not isinstance(data["wall"], (int, float)) or isinstance(data["wall"], bool):
            raise ValueError("wall is not a number")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        kw.setdefault("key", str(data["id"]))
        kw.setdefault("summary", "")
        for name in ("what", "how", "why"):
            if not isinstance(kw.get(name, {}), dict):
                raise ValueError(f"{name} is not an object")
        return cls(**kw)

    # Convenience for readers ---------------------------------------------

    @property
    def pid(self) -> int | None:
        pid = self.what.get("pid")
        return pid if isinstance(pid, int) else None

    @property
    def owner(self) -> Owner | None:
        o = self.what.get("owner")
        return Owner.from_dict(o) if isinstance(o, dict) else None

    def log_fields(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The fields of the one journal/log entry that references this record (event ``incident``)."""
        out: dict[str, Any] = {"incident": self.id, "cause": self.cause, "message": self.summary}
        if self.pid is not None:
            out["pid"] = self.pid
        owner = self.owner
        if owner is not None:
            if owner.worker:
                out["worker"] = owner.worker
            if owner.container_id:
                out["container"] = owner.name or owner.short_id
            if owner.unit:
                out["unit"] = owner.unit
        limit = self.how.get("oom", {}).get("limit_bytes") if isinstance(self.how.get("oom"), dict) else None
        if limit:
            out["limit_bytes"] = limit
        if path is not None:
            out["file"] = os.fspath(path)
        return out


def _json_default(o: object) -> object:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()  # type: ignore[union-attr]
    return str(o)


@dataclass(frozen=True)
class Broken:
    """A file in the store that is not a readable incident, and why."""

    path: str
    reason: str


def incident_id(wall: float, key: str) -> str:
    """``20261128-223140-3f2a9c1b``: the UTC second of the death and 8 hex digits of the key."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(wall))
    return f"{stamp}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------
# Meanings


def exit_meaning(returncode: int | None = None, signal: int | None = None) -> str:
    """What an exit status says, for a person: ``killed by SIGKILL (the OOM killer, or kill -9)``, ``exit 0 (success)``."""
    if signal is not None:
        name = signal_name(signal)
        hint = {
            int(_signal.SIGKILL): " (the kernel OOM killer, a kill -9, or a supervisor's last resort)",
            int(_signal.SIGTERM): " (asked to stop: a supervisor, systemd, docker stop or kill)",
            int(_signal.SIGINT): " (Ctrl-C or an interrupt)",
            int(_signal.SIGSEGV): " (a crash: invalid memory access)",
            int(_signal.SIGABRT): " (aborted: an assertion, abort(), or a watchdog)",
            int(_signal.SIGBUS): " (a crash: bad memory access, e.g. a truncated mapped file)",
            int(_signal.SIGHUP): " (its terminal or session went away)",
            int(_signal.SIGPIPE): " (it wrote to a closed pipe)",
        }.get(signal, "")
        return f"killed by {name}{hint}"
    if returncode is None:
        return "unknown"
    if returncode == 0:
        return "exit 0 (success)"
    if returncode > 128 and returncode - 128 < 65:
        sig = returncode - 128
        return (f"exit {returncode}: 128+{sig}, the way a shell or container runtime reports a process killed "
                f"by {signal_name(sig)}")
    return {
        1: "exit 1 (a general error)",
        2: "exit 2 (misuse: bad arguments or configuration)",
        125: "exit 125 (the container runtime could not run it)",
        126: "exit 126 (found but not executable)",
        127: "exit 127 (command not found)",
    }.get(returncode, f"exit {returncode} (a failure)")


def classify_lines(lines: Sequence[str]) -> tuple[str, str, dict[str, Any]] | None:
    """The cause the output's last lines point to (``gpu_oom``/``host_oom``/...), the quoted line and details.

    Uses :func:`memguard.diagnose.classify_output`; None when it finds nothing.
    """
    if not lines:
        return None
    from ..diagnose import classify_output

    try:
        d = classify_output(list(lines))
    except Exception:  # the classifier is text heuristics; a bug there must not lose an incident
        return None
    if d is None:
        return None
    kind = str(getattr(d, "cause", None) or getattr(d, "kind", ""))
    cause = "gpu_oom" if kind.startswith("gpu") else "host_oom" if kind.startswith("host") else kind
    if cause not in CAUSES:
        cause = "exit"
    detail: dict[str, Any] = {"source": getattr(d, "source", None)}
    for name in ("requested_bytes", "gpu"):
        v = getattr(d, name, None)
        if v is not None:
            detail[name] = v
    describe = getattr(d, "describe", None)
    if callable(describe):
        detail["text"] = describe()
    return cause, str(getattr(d, "line", "")), detail


def cause_of_rule(explain: Explanation | None, event: str = "") -> str:
    """The cause of memguard's own stop, from what its rule watched: RAM, swap or pressure ``host_oom``,
    GPU ``gpu_oom``, a run time ``timeout``, disk ``disk_full``; an operator's stop ``none``."""
    if explain is None:
        return "none" if event in ("stop", "restart") else "killed"
    sig = f"{explain.signal} {explain.when}".lower()
    if "gpu" in sig:
        return "gpu_oom"
    if any(w in sig for w in ("memory", "swap", "pressure", "psi", "rss", "available")):
        return "host_oom"
    if any(w in sig for w in ("runtime", "elapsed", "duration", "age", "timeout", "uptime")):
        return "timeout"
    if "disk" in sig:
        return "disk_full"
    return "killed"


# ---------------------------------------------------------------------------
# Building records (pure)


def _explain_dict(e: Explanation | None) -> dict[str, Any]:
    if e is None:
        return {}
    return {"rule": e.rule, "when": e.when, "signal": e.signal, "value": e.value, "threshold": e.threshold,
            "unit": e.unit, "text": e.display, "source": e.source or None}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != {} and v != []}


def death_key(boot_id: str | None, pid: int) -> str:
    return f"death:{boot_id or 'unknown-boot'}:{pid}"


def incident_for_action(action: Signal | SignalProcess, *, wall: float, monotonic: float, boot_id: str | None = None,
                        command: Sequence[str] | str | None = None, user: str | None = None,
                        cgroup: str | None = None, owner: Owner | None = None,
                        ranking: Sequence[Mapping[str, Any]] = (), timeline: dict[str, Any] | None = None,
                        dry_run: bool = False) -> Incident:
    """The pending record of memguard's own signal, to write BEFORE the signal is sent.

    ``ranking``: the victims considered, best first (``{"worker"|"pid",
    "memory_bytes", "score", ...}`` as the decision computed them).
    """
    explain = action.explain
    worker = getattr(action, "worker", None)
    if owner is None and worker:
        owner = Owner(kind="memguard-worker", cgroup=cgroup or "", worker=worker,
                      incarnation=getattr(action, "incarnation", None))
    name = getattr(action, "name", None)
    sig = signal_name(action.signum)
    who = f"{worker} (pid {action.pid})" if worker else f"pid {action.pid} ({name})"
    reason = explain.display if explain is not None else action.reason
    summary = f"memguard sent {sig} to {who}: {reason}" if not dry_run else f"memguard would send {sig} to {who}: {reason}"
    what = _clean({"pid": action.pid, "command": _command(command), "comm": name, "user": user, "cgroup": cgroup,
                   "worker": worker, "workload": getattr(action, "workload", None),
                   "incarnation": getattr(action, "incarnation", None),
                   "owner": owner.to_dict() if owner else None})
    how = _clean({"signal": action.signum, "signal_name": sig, "sent_by": "memguard", "event": action.event,
                  "meaning": f"{sig}: {action.reason}" if action.reason else exit_meaning(signal=action.signum),
                  "dry_run": dry_run or None})
    why = _clean({**_explain_dict(explain), "reason": action.reason, "ranking": [dict(r) for r in ranking] or None})
    cause = cause_of_rule(explain, action.event)
    return Incident(id=incident_id(wall, death_key(boot_id, action.pid)), key=death_key(boot_id, action.pid),
                    cause=cause, summary=summary, wall=wall, monotonic=monotonic, boot_id=boot_id, source="memguard",
                    state="pending", what=what, how=how, why=why, timeline=timeline, sources=["memguard"])


def complete_action(incident: Incident, *, wall: float, returncode: int | None = None, signal: int | None = None,
                    note: str | None = None, after: dict[str, Any] | None = None) -> Incident:
    """The pending record completed with what happened after the signal."""
    sent = {incident.how.get("signal")} | {e.get("signal") for e in incident.how.get("escalations", [])
                                           if isinstance(e, dict)}
    if signal is not None and signal in sent:
        meaning: str | None = f"killed by {signal_name(signal)}, the signal memguard sent"
    else:
        meaning = exit_meaning(returncode, signal) if (returncode, signal) != (None, None) else None
    outcome = _clean({"wall": wall, "after_s": round(wall - incident.wall, 3), "returncode": returncode,
                      "signal": signal, "signal_name": signal_name(signal) if signal is not None else None,
                      "meaning": meaning, "note": note})
    return replace(incident, state="complete", outcome=outcome, after=after or incident.after)


def _command(command: Sequence[str] | str | None) -> list[str] | str | None:
    if command is None:
        return None
    if isinstance(command, str):
        return command
    return [str(c) for c in command]


def _kill_oom_section(kill: OomKill) -> dict[str, Any]:
    return _clean({
        "kind": "cgroup" if kill.constraint == "memcg" else kill.constraint,
        "constraint": kill.constraint,
        "memcg": kill.oom_memcg,
        "limit_bytes": kill.limit_bytes,
        "limit_kind": kill.limit_kind,
        "usage_bytes": kill.memory_usage_kb * 1024 if kill.memory_usage_kb is not None else None,
        "rss_bytes": kill.rss_kb * 1024 if kill.rss_kb is not None else None,
        "anon_rss_bytes": kill.anon_rss_kb * 1024 if kill.anon_rss_kb is not None else None,
        "total_vm_bytes": kill.total_vm_kb * 1024 if kill.total_vm_kb is not None else None,
        "oom_score_adj": kill.oom_score_adj,
        "invoker": kill.invoker,
        "invoker_pid": kill.invoker_pid,
        "group": kill.group,
        "kernel_ts_us": kill.ts_us,
        "kernel_seq": kill.seq,
    })


def _kernel_why(kill: OomKill, owner: Owner | None) -> str:
    limit = kill.limit_bytes
    if kill.manual:
        return "an OOM kill asked for by hand (sysrq)"
    if kill.constraint == "memcg":
        whose = "the cgroup's"
        if owner is not None and owner.kind == "container":
            whose = "the container's"
            if kill.oom_memcg and owner.cgroup and kill.oom_memcg != owner.cgroup and \
                    owner.cgroup.startswith(kill.oom_memcg.rstrip("/") + "/"):
                whose = f"the enclosing cgroup {kill.oom_memcg}'s"
        elif owner is not None and owner.kind == "memguard-worker":
            whose = "the worker's"
        elif owner is not None and owner.kind == "pod":
            whose = "the pod's"
        elif owner is not None and owner.kind == "systemd-unit":
            whose = f"{owner.unit}'s"
        if limit is not None:
            swap = " memory+swap" if kill.limit_kind == "memory+swap" else ""
            return f"the kernel at {whose} {format_size(limit)}{swap} limit"
        return f"the kernel at {whose} memory limit ({kill.oom_memcg or 'cgroup'})"
    if kill.constraint == "global":
        return "the kernel: the machine ran out of memory"
    if kill.constraint in ("cpuset", "mempolicy"):
        return f"the kernel: the memory nodes the process may use ran out ({kill.constraint})"
    return "the kernel's OOM killer"


def incident_from_oom_kill(kill: OomKill, owner: Owner | None, *, wall: float, boot_id: str | None = None,
                           command: Sequence[str] | str | None = None, user: str | None = None,
                           timeline: dict[str, Any] | None = None, container: ContainerInfo | None = None,
                           monotonic: float | None = None) -> Incident:
    """The record of a kernel OOM kill (read from the kernel log), attributed to its owner.

    ``monotonic``: the kill on the CLOCK_MONOTONIC time line
    (:meth:`~memguard.sense.kmsg.KmsgReader.monotonic_of`); defaults to the
    kernel's own timestamp."""
    why = _kernel_why(kill, owner)
    who = owner.describe() if owner is not None else f"a process in {kill.cgroup or 'an unknown cgroup'}"
    summary = f"the kernel OOM killer killed pid {kill.pid} ({kill.comm}), {who}: {why}"
    if container is not None and not command:
        command = list(container.command) or None
    what = _clean({"pid": kill.pid, "comm": kill.comm, "command": _command(command), "uid": kill.uid, "user": user,
                   "cgroup": kill.cgroup, "owner": owner.to_dict() if owner else None,
                   "worker": owner.worker if owner else None,
                   "container": container.to_dict() if container else None})
    how = _clean({"signal": int(_signal.SIGKILL), "signal_name": "SIGKILL", "sent_by": "kernel",
                  "meaning": "killed by the kernel's OOM killer", "oom": _kill_oom_section(kill)})
    whyd = _clean({"text": why, "limit_bytes": kill.limit_bytes, "memcg": kill.oom_memcg,
                   "constraint": kill.constraint})
    mono = monotonic if monotonic is not None else (kill.ts_us / 1e6 if kill.ts_us else None)
    key = death_key(boot_id, kill.pid)
    return Incident(id=incident_id(wall, key), key=key, cause="host_oom", summary=summary, wall=wall,
                    monotonic=mono, boot_id=boot_id, source="kernel", what=what, how=how, why=whyd,
                    evidence=list(kill.lines), timeline=timeline, sources=["kernel"])


def incident_from_exit(exited: Exited, *, wall: float, boot_id: str | None = None, workload: str | None = None,
                       command: Sequence[str] | str | None = None, user: str | None = None,
                       cgroup: str | None = None, owner: Owner | None = None, limit_bytes: int | None = None,
                       timeline: dict[str, Any] | None = None, sent_by_memguard: bool = False) -> Incident:
    """The record of a worker's exit as memguard reaped it.

    The exit status decides whether it failed (exit 0 never did, whatever
    it printed); the kernel's OOM counter, then the output's last lines,
    decide why.
    """
    if owner is None:
        owner = Owner(kind="memguard-worker", cgroup=cgroup or "", worker=exited.worker,
                      incarnation=exited.incarnation)
    meaning = exit_meaning(exited.returncode, exited.signal)
    found = classify_lines(exited.last_lines)
    output_cause, output_line, output_detail = found if found else (None, None, {})
    how: dict[str, Any] = {"returncode": exited.returncode, "signal": exited.signal,
                           "signal_name": signal_name(exited.signal) if exited.signal is not None else None,
                           "meaning": meaning, "output_line": output_line or None,
                           "output_cause": output_cause, "output_detail": output_detail or None,
                           "leftovers": exited.leftovers or None}
    why: dict[str, Any] = {}
    if exited.returncode == 0:
        cause = "none"
        text = "it exited 0" + (f"; it had printed an out-of-memory line ({output_cause}) and recovered"
                                if output_cause else "")
    elif exited.kernel_oom:
        cause = "host_oom"
        detail = exited.oom_detail or "at its cgroup limit"
        text = f"the kernel OOM killer killed it {detail}"
        how["sent_by"] = "kernel"
        how["oom"] = _clean({"kind": "cgroup", "limit_bytes": limit_bytes})
        why["limit_bytes"] = limit_bytes
        if output_cause == "gpu_oom":
            text += "; the GPU out-of-memory line it printed before is context, not the cause"
    elif sent_by_memguard:
        cause = "none"
        text = f"stopped by memguard ({meaning})"
        how["sent_by"] = "memguard"
    elif exited.signal is not None:
        cause = output_cause if output_cause in ("gpu_oom", "host_oom") and exited.signal == _signal.SIGABRT \
            else "killed"
        text = f"{meaning}, not sent by memguard"
        how["sent_by"] = "elsewhere"
    elif output_cause is not None:
        cause = output_cause
        text = output_detail.get("text") or f"{output_cause} in its output"
    else:
        cause = "exit"
        text = f"{meaning}; its output names no cause"
    why["text"] = text
    who = f"{exited.worker} (pid {exited.pid})"
    summary = f"{who} exited: {text}"
    what = _clean({"pid": exited.pid, "command": _command(command), "user": user, "cgroup": cgroup,
                   "worker": exited.worker, "workload": workload, "incarnation": exited.incarnation,
                   "owner": owner.to_dict()})
    key = death_key(boot_id, exited.pid)
    return Incident(id=incident_id(wall, key), key=key, cause=cause, summary=summary, wall=wall,
                    monotonic=exited.at, boot_id=boot_id, source="exit", what=what, how=_clean(how), why=_clean(why),
                    evidence=[l for l in exited.last_lines[-10:]], timeline=timeline, sources=["exit"])


def incident_from_container(info: ContainerInfo, *, wall: float, boot_id: str | None = None,
                            owner: Owner | None = None, kills: Sequence[OomKill] = (),
                            events: Sequence[ContainerEvent] = (), log_lines: Sequence[str] = (),
                            timeline: dict[str, Any] | None = None) -> Incident:
    """The record of a container's death, from the runtime's view and the kernel's.

    A RAM kill (``State.OOMKilled``, or a kernel OOM report naming the
    container's cgroup) is ``host_oom`` whatever the container printed: a
    CUDA out-of-memory line before it is kept as context. Exit 137 without
    either is a kill from elsewhere (``docker kill``, ``docker stop`` past
    its timeout), with the signal from the runtime's ``kill`` event.
    """
    if owner is None:
        owner = Owner(kind="container", cgroup="", runtime="docker", container_id=info.id, name=info.name,
                      image=info.image)
    elif not owner.name:
        owner = replace(owner, name=info.name, image=info.image or owner.image)
    kill = kills[-1] if kills else None
    code = info.exit_code
    found = classify_lines(log_lines)
    output_cause, output_line, output_detail = found if found else (None, None, {})
    kill_events = [e for e in events if e.action == "kill" and e.signal is not None]
    oom_event = any(e.action == "oom" for e in events)
    how: dict[str, Any] = {"exit_code": code, "meaning": exit_meaning(code) if code is not None else None,
                           "oom_killed": info.oom_killed, "output_line": output_line or None,
                           "output_cause": output_cause, "output_detail": output_detail or None}
    limit = (kill.limit_bytes if kill is not None else None) or info.memory_limit_bytes
    why: dict[str, Any] = {}
    name = info.name or (owner.short_id or info.id[:12])
    if info.oom_killed or kill is not None or oom_event:
        cause = "host_oom"
        how["sent_by"] = "kernel"
        how["signal"], how["signal_name"] = int(_signal.SIGKILL), "SIGKILL"
        how["oom"] = _kill_oom_section(kill) if kill is not None else _clean({"kind": "cgroup", "limit_bytes": limit})
        text = (_kernel_why(kill, owner) if kill is not None else
                f"the kernel at the container's {format_size(limit)} limit" if limit else
                "the kernel's OOM killer (the runtime reports OOMKilled)")
        if kill is not None and kill.pid != info.pid and info.pid:
            text += f" (it killed pid {kill.pid} ({kill.comm}) of the container)"
        if output_cause == "gpu_oom":
            text += "; the GPU out-of-memory line it printed before is context, not the cause"
        why["limit_bytes"] = limit
    elif code is not None and code > 128 or kill_events:
        sig = kill_events[-1].signal if kill_events else (code - 128 if code is not None else None)
        cause = "killed"
        how["signal"] = sig
        how["signal_name"] = signal_name(sig) if sig is not None else None
        how["sent_by"] = "the container runtime: docker kill or stop" if kill_events else "elsewhere"
        text = f"killed by {signal_name(sig) if sig is not None else 'a signal'}" + \
            (" sent through the runtime (docker kill or stop), not an OOM kill" if kill_events else
             ", not an OOM kill (the runtime saw no OOM)")
    elif code == 0:
        cause = "none"
        text = "it exited 0" + (f"; it had printed an out-of-memory line ({output_cause}) and recovered"
                                if output_cause else "")
    elif output_cause is not None:
        cause = output_cause
        text = output_detail.get("text") or f"{output_cause} in its output"
    else:
        cause = "exit"
        text = f"{exit_meaning(code)}; its output names no cause" if code is not None else "it stopped"
    why["text"] = text
    summary = f"container {name} died: {text}"
    pid = kill.pid if kill is not None else info.pid
    what = _clean({"pid": pid, "command": list(info.command) or None, "cgroup": owner.cgroup or None,
                   "owner": owner.to_dict(), "container": info.to_dict()})
    key = f"container:{info.id}:{info.finished_at or wall}"
    evidence = list(kill.lines) if kill is not None else []
    evidence += [l for l in log_lines[-10:]]
    return Incident(id=incident_id(wall, key), key=key, cause=cause, summary=summary, wall=wall,
                    monotonic=kill.ts_us / 1e6 if kill is not None and kill.ts_us else None, boot_id=boot_id,
                    source="container", what=what, how=_clean(how), why=_clean(why), evidence=evidence,
                    timeline=timeline, sources=["container"] + (["kernel"] if kill is not None else []))


# ---------------------------------------------------------------------------
# Merging two views of one death


def _deep_fill(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        if k not in out or out[k] in (None, "", [], {}):
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _deep_fill(out[k], v)
    return out


def merge(old: Incident, new: Incident) -> Incident:
    """One record of two views of the same death: the stronger cause's summary and why, every detail of both."""
    # The stronger cause leads; between equals, the view that knows more about the process
    # (memguard's own decision, then the runtime's or the exit's, then the kernel's).
    def rank(i: Incident) -> tuple[int, int]:
        return _PRECEDENCE.get(i.cause, 0), _SOURCE_RANK.get(i.source, 0)

    first, second = (old, new) if rank(old) >= rank(new) else (new, old)
    # memguard's own stop stays memguard's: the kernel or the exit only add detail to it.
    if old.source == "memguard" or new.source == "memguard":
        first, second = (old, new) if old.source == "memguard" else (new, old)
    return replace(
        first, id=old.id, key=old.key, wall=min(old.wall, new.wall),
        monotonic=old.monotonic if old.monotonic is not None else new.monotonic,
        state="pending" if old.state == new.state == "pending" else "complete",
        what=_deep_fill(first.what, second.what), how=_deep_fill(first.how, second.how),
        why=_deep_fill(first.why, second.why),
        evidence=list(dict.fromkeys(first.evidence + second.evidence)),
        timeline=first.timeline or second.timeline, after=first.after or second.after,
        outcome=first.outcome or second.outcome,
        sources=list(dict.fromkeys(old.sources + new.sources)),
    )


# ---------------------------------------------------------------------------
# The store


def default_state_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """memguard's state directory: systemd's ``$STATE_DIRECTORY``, ``/var/lib/memguard`` for root,
    else ``$XDG_STATE_HOME/memguard`` or ``~/.local/state/memguard``."""
    env = os.environ if env is None else env
    sd = env.get("STATE_DIRECTORY")
    if sd:
        return Path(sd.split(":")[0])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/memguard")
    xdg = env.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "memguard"
    return Path(env.get("HOME") or os.path.expanduser("~")) / ".local" / "state" / "memguard"


def default_incident_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    return default_state_dir(env, euid) / "incidents"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IncidentStore:
    """A directory of incident records: write atomically, merge by key, list, query, prune.

    Methods raise :class:`OSError` only where the directory itself cannot be
    written (full disk, read-only); readers never raise for a bad file.
    """

    SUFFIX = ".json"

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_count: int = DEFAULT_MAX_COUNT,
                 max_age_s: float = DEFAULT_MAX_AGE_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock=time.time) -> None:
        self.dir = Path(directory) if directory is not None else default_incident_dir()
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        # Read-modify-write of one record (merge, complete, append) from several threads of one process.
        self._lock = threading.RLock()

    # -- writing -----------------------------------------------------------

    def path_of(self, incident_id: str) -> Path:
        if not incident_id or "/" in incident_id or incident_id.startswith("."):
            raise ValueError(f"not an incident id: {incident_id!r}")
        return self.dir / (incident_id + self.SUFFIX)

    def _ensure_dir(self) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)

    def _write_file(self, path: Path, text: str, durable: bool) -> None:
        # A record of memguard's own stop is written between the decision and the signal: few system calls
        # (the directory is checked only when the file cannot be created; no random temporary name).
        tmp = str(self.dir / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o640)
        except FileNotFoundError:
            self._ensure_dir()
            fd = os.open(tmp, flags, 0o640)
        try:
            try:
                os.fchmod(fd, 0o640)  # whatever the umask
                data = text.encode("utf-8")
                while data:
                    data = data[os.write(fd, data):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if durable:
            _fsync_dir(self.dir)

    def write(self, incident: Incident, *, durable: bool = True, prune: bool = True) -> Path:
        """Write (or replace) the record atomically. ``durable=False`` skips the fsyncs (see the module doc)."""
        path = self.path_of(incident.id)
        self._write_file(path, incident.to_json() + "\n", durable)
        if prune:
            self.prune(keep=incident.id)
        return path

    def record(self, incident: Incident, *, durable: bool = True) -> Incident:
        """Write the incident, merged into a record of the same death if one exists; return what was written."""
        with self._lock:
            existing = self.find_key(incident.key, near_wall=incident.wall)
            if existing is not None:
                incident = merge(existing, incident)
            elif self.path_of(incident.id).exists():
                # The same id for another death (pid reused within the second): keep both.
                loaded = self.load(incident.id)
                if loaded is not None and loaded.key != incident.key:
                    incident = replace(incident, id=incident.id + "-" + hashlib.sha1(
                        f"{incident.key}{incident.wall}".encode()).hexdigest()[:4])
            self.write(incident, durable=durable)
            return incident

    def make_durable(self, incident_id: str | None = None) -> None:
        """fsync one record (or the directory) written with ``durable=False``."""
        if incident_id is not None:
            try:
                fd = os.open(self.path_of(incident_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.dir.is_dir():
            _fsync_dir(self.dir)

    def complete(self, incident_id: str, *, wall: float, returncode: int | None = None, signal: int | None = None,
                 note: str | None = None, after: dict[str, Any] | None = None) -> Incident | None:
        """Complete a pending record with the outcome of the signal; None if the record is gone."""
        with self._lock:
            inc = self.load(incident_id)
            if inc is None:
                return None
            inc = complete_action(inc, wall=wall, returncode=returncode, signal=signal, note=note, after=after)
            self.write(inc)
            return inc

    def update(self, incident_id: str, **changes: Any) -> Incident | None:
        """Replace fields of a record (e.g. ``timeline=`` after the signal went out); None if the record is gone."""
        with self._lock:
            inc = self.load(incident_id)
            if inc is None:
                return None
            inc = replace(inc, **changes)
            self.write(inc, prune=False)
            return inc

    def amend(self, incident_id: str, change: Callable[[Incident], Incident]) -> Incident | None:
        """Replace a record with ``change(record)`` (read, changed and written under the store's lock); None if
        the record is gone."""
        with self._lock:
            inc = self.load(incident_id)
            if inc is None:
                return None
            inc = change(inc)
            self.write(inc, prune=False)
            return inc

    def append_after(self, incident_id: str, after: dict[str, Any]) -> Incident | None:
        """Add the timeline of the seconds after the death; None if the record is gone."""
        with self._lock:
            inc = self.load(incident_id)
            if inc is None:
                return None
            inc = replace(inc, after=after)
            self.write(inc, prune=False)
            return inc

        # -- small state next to the incidents (cursors) -------------------------

    def save_state(self, name: str, data: Mapping[str, Any], *, durable: bool = False) -> None:
        """A small JSON value kept beside the incidents (e.g. the kernel log cursor, ``name='kmsg'``)."""
        if not name.isidentifier():
            raise ValueError(f"not a state name: {name!r}")
        self._write_file(self.dir / f".{name}.state", json.dumps(dict(data)), durable)

    def load_state(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / f".{name}.state").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- reading -----------------------------------------------------------

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.dir.iterdir() if p.suffix == self.SUFFIX and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def _read(self, path: Path, mentioning: str | None = None) -> Incident | Broken | None:
        """The record in ``path``, or why it is not one; None when its text does not mention ``mentioning``
        (not parsed at all)."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Broken(str(path), "removed while reading")
        except (OSError, UnicodeDecodeError) as e:
            return Broken(str(path), f"unreadable: {getattr(e, 'strerror', None) or e}")
        if mentioning is not None and mentioning not in text:
            return None
        if not text.strip():
            return Broken(str(path), "empty")
        try:
            return Incident.from_dict(json.loads(text))
        except ValueError as e:
            return Broken(str(path), f"not an incident record: {e}")
        except TypeError as e:
            return Broken(str(path), f"not an incident record: {e}")

    def scan(self) -> tuple[list[Incident], list[Broken]]:
        """Every record, newest first, and the files that are not records (with why)."""
        good: list[Incident] = []
        bad: list[Broken] = []
        for p in self._files():
            got = self._read(p)
            (bad if isinstance(got, Broken) else good).append(got)  # type: ignore[arg-type]
        good.sort(key=lambda i: (i.wall, i.id), reverse=True)
        return good, bad

    def list(self, limit: int | None = None) -> list[Incident]:
        good, _ = self.scan()
        return good if limit is None else good[:limit]

    def load(self, ref: str) -> Incident | None:
        """A record by id or unique id prefix (at least 6 characters); None when there is none or it is unreadable."""
        try:
            path = self.path_of(ref)
        except ValueError:
            return None
        if path.exists():
            got = self._read(path)
            return got if isinstance(got, Incident) else None
        if len(ref) < 6:
            return None
        matches = [p for p in self._files() if p.stem.startswith(ref)]
        if len(matches) != 1:
            return None
        got = self._read(matches[0])
        return got if isinstance(got, Incident) else None

    def match(self, ref: str) -> list[str]:
        """Ids of the records whose id starts with ``ref``."""
        return sorted(p.stem for p in self._files() if p.stem.startswith(ref))

    def find_key(self, key: str, *, near_wall: float | None = None) -> Incident | None:
        """The newest record with this key (within :data:`MERGE_WINDOW_S` of ``near_wall`` if given)."""
        suffix = "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
        for p in sorted((p for p in self._files() if suffix in p.stem), reverse=True):
            got = self._read(p)
            if isinstance(got, Incident) and got.key == key:
                if near_wall is None or abs(got.wall - near_wall) <= MERGE_WINDOW_S:
                    return got
        return None

    # -- queries (for `memguard diagnose`) ------------------------------------

    def latest(self, n: int = 10) -> list[Incident]:
        """The ``n`` newest records, reading only those (names start with the UTC second of the death)."""
        out: list[Incident] = []
        for p in self._newest_files():
            if len(out) >= n:
                break
            got = self._read(p)
            if isinstance(got, Incident):
                out.append(got)
        out.sort(key=lambda i: (i.wall, i.id), reverse=True)
        return out

    def _newest_files(self) -> list[Path]:
        """Record files, newest first (names start with the UTC second of the death)."""
        return sorted(self._files(), key=lambda p: p.name, reverse=True)

    def pending(self, n: int) -> list[Incident]:
        """The pending records among the ``n`` newest files. Most records are complete: a file whose text does
        not mention ``pending`` is not parsed (a daemon's start must not hold a few hundred records' timelines
        in memory at once)."""
        out: list[Incident] = []
        for p in self._newest_files()[:n]:
            got = self._read(p, mentioning="pending")
            if isinstance(got, Incident) and got.state == "pending":
                out.append(got)
        return out

    def by_pid(self, pid: int) -> list[Incident]:
        return [i for i in self.list() if i.pid == pid or i.what.get("container", {}).get("pid") == pid]

    def by_worker(self, worker: str) -> list[Incident]:
        out = []
        for i in self.list():
            o = i.what.get("owner") or {}
            if i.what.get("worker") == worker or o.get("worker") == worker:
                out.append(i)
        return out

    def by_container(self, ref: str) -> list[Incident]:
        """By container name, full id or id prefix (4 characters or more)."""
        ref = ref.lstrip("/")
        out = []
        for i in self.list():
            o = i.what.get("owner") or {}
            c = i.what.get("container") or {}
            cid = o.get("container_id") or c.get("id") or ""
            names = {o.get("name"), c.get("name")}
            if ref in names or (len(ref) >= 4 and cid.startswith(ref)):
                out.append(i)
        return out

    def by_unit(self, unit: str) -> list[Incident]:
        return [i for i in self.list() if (i.what.get("owner") or {}).get("unit") in (unit, unit + ".service")]

    def find(self, query: str) -> list[Incident]:
        """What ``memguard diagnose QUERY`` means: a pid, an incident id, a worker, a container, a unit."""
        q = query.strip()
        if q.isdigit():
            return self.by_pid(int(q))
        one = self.load(q)
        if one is not None:
            return [one]
        for how in (self.by_worker, self.by_container, self.by_unit):
            got = how(q)
            if got:
                return got
        return []

    # -- retention -----------------------------------------------------------

    def prune(self, *, now: float | None = None, keep: str | None = None) -> int:
        """Drop the oldest records past the count, age and size limits, and stale temporary files."""
        now = self._clock() if now is None else now
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        removed = 0
        files: list[tuple[str, float, int, str]] = []  # (name-for-order, mtime, size, path)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.name.startswith(".") and e.name.endswith(".tmp"):
                if now - st.st_mtime > TMP_MAX_AGE_S:
                    removed += self._unlink(e.path)
                continue
            if e.name.endswith(self.SUFFIX) and not e.name.startswith("."):
                files.append((e.name, st.st_mtime, st.st_size, e.path))
        files.sort(reverse=True)  # names start with the UTC time: newest first
        total = 0
        for n, (name, mtime, size, path) in enumerate(files):
            if keep is not None and name == keep + self.SUFFIX:
                total += size
                continue
            too_many = n >= self.max_count
            too_old = now - _name_time(name, mtime) > self.max_age_s
            too_big = total + size > self.max_bytes
            if too_many or too_old or too_big:
                removed += self._unlink(path)
            else:
                total += size
        return removed

    @staticmethod
    def _unlink(path: str) -> int:
        try:
            os.unlink(path)
            return 1
        except OSError as e:
            if e.errno == errno.ENOENT:
                return 0
            return 0


def _name_time(name: str, fallback: float) -> float:
    try:
        import calendar

        return float(calendar.timegm(time.strptime(name[:15], "%Y%m%d-%H%M%S")))
    except ValueError:
        return fallback


def owners_of(incidents: Iterable[Incident]) -> list[str]:
    """Distinct owner descriptions, for summaries."""
    out = []
    for i in incidents:
        o = i.owner
        if o is not None:
            out.append(o.describe())
    return list(dict.fromkeys(out))
