"""Logging: one structured event per decision, with the numbers that caused it.

On a terminal the events are rendered for people (structlog's console
renderer); otherwise as JSON lines, one object per event, which is what a
log shipper, ``jq`` or the test-suite reads. Every decision event carries
the same flat keys::

    event, workload, worker, pid, rule, when, signal, value, threshold,
    unit, action, reason, source

``value`` and ``threshold`` are in the signal's base unit (bytes,
seconds, percent); ``message`` is the sentence a person reads.

Under systemd the events go to journald as structured entries instead
(:mod:`memguard.report.journald`): ``auto`` picks that when stdout or
stderr is the journal stream systemd connected, and ``journald`` asks for
it explicitly (falling back to JSON lines when there is no journal).
"""

from __future__ import annotations

import logging
import signal as _signal
import sys
from typing import Any, Mapping, TextIO

import structlog

from ..model import Action, Notice, Reclaim, SetAdmission, Signal, SignalProcess, Spawn
from . import journald

__all__ = ["configure_logging", "resolve_format", "get_logger", "action_event", "LEVELS", "FORMATS"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


FORMATS = ("auto", "console", "json", "journald")


def resolve_format(fmt: str, stream: TextIO, *, journal_socket: str | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    """The format ``fmt`` stands for here: ``auto`` is journald when stdout or stderr is systemd's journal
    stream, else console on a TTY, else JSON; ``journald`` is JSON where there is no journal socket."""
    socket_path = journal_socket or journald.JOURNAL_SOCKET
    if fmt == "auto":
        if journald.under_journald(env=env) and journald.journal_available(socket_path):
            return "journald"
        return "console" if stream.isatty() else "json"
    if fmt == "journald" and not journald.journal_available(socket_path):
        return "json"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None,
                      extra_processors: list | None = None, *, journal_socket: str | None = None) -> str:
    """Set up structlog for the daemon; return the format chosen.

    ``fmt``: auto (journald under systemd, console on a TTY, else JSON), console, json, journald.
    """
    stream = stream or sys.stdout
    fmt = resolve_format(fmt, stream, journal_socket=journal_socket)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # The journal stamps entries itself (the timestamp is not sent there), but a fallback line needs it.
        structlog.processors.TimeStamper(fmt="iso", utc=False),
    ]
    processors += extra_processors or []
    logger_factory: Any = structlog.PrintLoggerFactory(file=stream)
    if fmt == "journald":
        processors.append(structlog.processors.format_exc_info)
        processors.append(journald.JournaldRenderer())
        logger_factory = journald.JournalLoggerFactory(journal_socket or journald.JOURNAL_SOCKET,
                                                       fallback=stream)
    elif fmt == "json":
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(_console_view)
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False,
                                                        pad_event_to=0))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    return fmt


def _console_view(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """For people: the event name and its sentence; the numbers stay in the JSON form."""
    message = event_dict.get("message")
    if message:
        # The sentence carries the numbers; the JSON form keeps every field.
        return {"event": f"{event_dict['event']:<12} {message}", "level": event_dict.get("level"),
                "timestamp": event_dict.get("timestamp")}
    return event_dict


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("memguard").bind(**bind)


def _signame(n: int) -> str:
    try:
        return _signal.Signals(n).name
    except ValueError:
        return str(n)


def action_event(action: Action, *, dry_run: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(level, event name, fields) for one decision of the core."""
    fields: dict[str, Any] = {}
    explain = getattr(action, "explain", None)
    if isinstance(action, Spawn):
        level, event = "info", "spawn"
        fields.update(workload=action.workload, worker=action.worker, incarnation=action.incarnation,
                      reason=action.reason)
        message = f"{action.worker}: {action.reason}"
    elif isinstance(action, Signal):
        level, event = "warning", action.event
        fields.update(workload=action.workload, worker=action.worker, pid=action.pid,
                      action=action.event, signal_sent=_signame(action.signum), reason=action.reason)
        message = f"{action.worker} (pid {action.pid}): {action.event}: {action.reason}"
    elif isinstance(action, SignalProcess):
        level, event = "warning", action.event
        fields.update(workload="(unmanaged)", worker=f"{action.name}[{action.pid}]", pid=action.pid,
                      action=action.event, signal_sent=_signame(action.signum), reason=action.reason, unmanaged=True)
        message = f"unmanaged {action.name} (pid {action.pid}): {action.event}: {action.reason}"
    elif isinstance(action, Reclaim):
        level, event = "info", "reclaim"
        fields.update(workload=action.workload, worker=action.worker, pid=action.pid, action="reclaim",
                      reason=action.reason)
        message = f"{action.worker} (pid {action.pid}): {action.reason}"
    elif isinstance(action, SetAdmission):
        level, event = ("warning" if not action.open else "info"), action.event
        fields.update(workload=action.workload, worker=action.worker, action=action.event, reason=action.reason)
        message = f"{action.worker}: {action.reason}"
    elif isinstance(action, Notice):
        level, event = action.level, action.event
        for key in ("workload", "worker", "pid"):
            val = getattr(action, key)
            if val is not None:
                fields[key] = val
        if action.reason:
            fields["reason"] = action.reason
        fields.update(action.fields)
        who = f"{action.worker}: " if action.worker else ""
        message = f"{who}{action.reason}" if action.reason else f"{who}{action.event}"
    else:  # pragma: no cover - the Action union is closed
        raise TypeError(f"not an action: {action!r}")
    if explain is not None:
        fields.update(rule=explain.rule, when=explain.when, signal=explain.signal, value=explain.value,
                      threshold=explain.threshold, unit=explain.unit, source=explain.source)
        message += f" [{explain.display}]"
    if dry_run and isinstance(action, (Signal, SignalProcess, SetAdmission, Reclaim)) and not (
            isinstance(action, Signal) and action.lifecycle):
        fields["dry_run"] = True
        message = "DRY RUN, not done: " + message
    fields["message"] = message
    return level, event, fields
