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

__all__ = ["configure_logging", "resolve_format", "get_logger", "action_event", "LEVELS", "FORMATS", "SafeStream"]

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


class SafeStream:
    """A text stream whose failures never reach the caller: the log must not take the guard down.

    memguard's standard output may be closed at start, a pipe whose reader
    went away (EPIPE), or a file on a full filesystem (ENOSPC). A write
    that fails is dropped and counted; the first failure is said once on
    ``fallback`` (standard error, when it is another stream and still
    works); the stream is tried again every ``retry_s`` seconds (a disk
    frees up, a reader comes back), and the first line that gets through
    again is preceded by how many were lost.
    """

    #: 10 s between tries of a failing stream: cheap, and a freed disk is used again soon.
    RETRY_S = 10.0

    def __init__(self, stream: TextIO | None, fallback: TextIO | None = None, *,
                 clock: Any = None, retry_s: float = RETRY_S) -> None:
        import time

        self.stream = stream
        self.fallback = fallback if fallback is not stream else None
        self.clock = clock or time.monotonic
        self.retry_s = retry_s
        self.dropped = 0
        self.failures = 0
        self._down_since: float | None = None
        self._said = False

    def isatty(self) -> bool:
        try:
            return bool(self.stream is not None and self.stream.isatty())
        except (OSError, ValueError, AttributeError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError("no stream")
        return self.stream.fileno()

    def write(self, text: str) -> int:
        if self.stream is None:
            self.dropped += 1
            return len(text)
        now = self.clock()
        if self._down_since is not None and now - self._down_since < self.retry_s:
            self.dropped += 1
            return len(text)
        try:
            if self._down_since is not None and self.dropped:
                self.stream.write(f'{{"event": "log_recovered", "lines_lost": {self.dropped}}}\n')
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as e:  # closed, EPIPE, ENOSPC, EIO
            self.failures += 1
            self.dropped += 1
            self._down_since = now
            self._say(e)
            return len(text)
        if self._down_since is not None:
            self._down_since = None
            self.dropped = 0
        return len(text)

    def flush(self) -> None:
        if self.stream is None or self._down_since is not None:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError) as e:
            self._down_since = self.clock()
            self._say(e)

    def _say(self, error: BaseException) -> None:
        if self._said or self.fallback is None:
            return
        self._said = True
        try:
            self.fallback.write(f"memguard: its log output fails ({type(error).__name__}: {error}); lines are "
                                f"dropped and counted, guarding goes on, the output is tried again every "
                                f"{self.retry_s:g} s\n")
            self.fallback.flush()
        except (OSError, ValueError):
            pass


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None,
                      extra_processors: list | None = None, *, journal_socket: str | None = None) -> str:
    """Set up structlog for the daemon; return the format chosen.

    ``fmt``: auto (journald under systemd, console on a TTY, else JSON), console, json, journald.
    The stream (standard output by default; None when it was closed at start) is wrapped in a
    :class:`SafeStream`: a failing log never stops guarding.
    """
    if not isinstance(stream, SafeStream):
        stream = SafeStream(stream if stream is not None else sys.stdout, sys.stderr)  # type: ignore[assignment]
    assert stream is not None
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
