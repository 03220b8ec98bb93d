"""journald's native protocol: one structured journal entry per event.

Under systemd, memguard's events go straight to journald as entries whose
fields can be queried (``journalctl -u memguard MEMGUARD_EVENT=terminate``)
instead of lines of text on stdout. The protocol
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/) is small enough to speak
without a C library:

- one ``AF_UNIX``/``SOCK_DGRAM`` datagram to ``/run/systemd/journal/socket``
  is one entry;
- the payload is ``KEY=value`` lines; a value holding a newline (or any
  byte that is not text) is sent in the binary form ``KEY\\n``, its length as
  a little-endian uint64, the raw bytes, ``\\n``;
- an entry too large for one datagram (``EMSGSIZE``) goes in a sealed memfd,
  passed with ``SCM_RIGHTS`` in an otherwise empty datagram.

The socket is non-blocking with a raised send buffer: journald stalling
must never stall the tick loop (the watchdog would restart memguard for
it). An entry that would block is dropped and counted; the count rides on
the next entry that gets through (``MEMGUARD_JOURNAL_DROPPED``). Where the
socket is missing (journald gone), entries fall back to JSON lines on
stdout, which journald's stream connection or a terminal still shows.

How an event becomes fields (see docs/service.md for the reference):

- ``event`` -> ``MEMGUARD_EVENT``, ``message`` -> ``MESSAGE``,
  ``level`` -> ``PRIORITY`` (debug 7, info 6, warning 4, error 3,
  critical 2); every other key -> ``MEMGUARD_<KEY>`` (upper-cased, any
  character outside ``A-Z0-9_`` replaced by ``_``; keys that still do not
  make a valid field name are left out);
- ``MESSAGE_ID``: one fixed 128-bit id per event type (:data:`MESSAGE_IDS`),
  or, for an event not in the table, a uuid5 of its name, so it is stable
  across runs and hosts;
- ``SYSLOG_IDENTIFIER=memguard``; a worker's output line (event
  ``output``) is attributed to the worker instead: ``SYSLOG_IDENTIFIER``
  is the worker's name (``journalctl -u memguard -t trials-0``), MESSAGE the
  line itself, ``MEMGUARD_STREAM`` stdout or stderr, PRIORITY 6 for both
  streams (systemd's own default for a service's stdout and stderr), or
  the level of an ``sd-daemon(3)`` ``<N>`` prefix, which is stripped;
- ``OBJECT_PID``: an event that names a process other than memguard itself
  (``pid``: the worker it starts, signals or lost, a kernel OOM victim)
  carries that pid as ``OBJECT_PID``. journald then adds what it knows of
  that process (``OBJECT_COMM``, ``OBJECT_EXE``, ``OBJECT_CMDLINE``,
  ``OBJECT_UID``, ``OBJECT_SYSTEMD_UNIT``...), read from /proc when the
  entry arrives, so a process that has already exited gets none. journald
  honours the field from privileged senders only (memguard as root).
  ``MEMGUARD_PID`` carries the same number in every case.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TextIO

__all__ = [
    "JOURNAL_SOCKET",
    "MESSAGE_IDS",
    "PRIORITIES",
    "JournalEntry",
    "JournalSender",
    "JournalLogger",
    "JournalLoggerFactory",
    "JournaldRenderer",
    "encode_entry",
    "event_fields",
    "field_name",
    "valid_field_name",
    "message_id",
    "under_journald",
    "journal_available",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# Raised send buffer: 8 MiB holds thousands of entries while journald is
# busy (sd-journal asks for the same). Without CAP_NET_ADMIN the kernel
# caps SO_SNDBUF at net.core.wmem_max; SO_SNDBUFFORCE (root) passes it.
SNDBUF_BYTES = 8 * 1024 * 1024

PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "notice": 5, "info": 6,
              "debug": 7}

# One MESSAGE_ID per event type, made with `systemd-id128 new` style random
# ids and fixed forever: `journalctl MESSAGE_ID=...` and catalog entries
# key on them. Never change a value; add new events at the end.
MESSAGE_IDS: dict[str, str] = {
    "started": "fe9baeaac2cf4c8bbf7a37fe219c7315",
    "stopping": "0b8fa35980034a9eb3a93728fb5ce092",
    "stopped": "9402a03231c844ec89511c67c331ce29",
    "reloaded": "c62732d3bab74b2bbb55b9f6ec40f21d",
    "reload_failed": "e49b849822134f9589103002ea00f5f4",
    "config_error": "8a93920a24794d249453837bfab9baff",
    "reload_note": "6cd392b831f34ffa9c4f9f65d3a7720c",
    "output": "86f46a01dfe64c599a4ec5840df7d9f8",
    "spawn": "70a5be089fca43399c7eea58b4ede232",
    "spawn_failed": "e90a875df5624ea3b008a1ca6a9300c2",
    "exit": "3db2517aa0dd44e585bca003f76a1f71",
    "completed": "2b62305e76f346b585c1422833b19d30",
    "failed": "242082a658d546749933acec89df788b",
    "restart_scheduled": "3fb9c51d01b249208bf19a9683f0f2b0",
    "stop": "871b698ec43840828f185783ad7a4d03",
    "terminate": "f9bd3e7f6a9e4eeb93f37f4889549205",
    "kill": "dae3e35bc6ef4a43b5d8091c68fe7bba",
    "restart": "a420d3a512844b70b9b4bcc361d750db",
    "escalate": "80d5a5d578a947f58cb6348788a1b635",
    "block": "94471330b79844f5952ec7b7a19f04d0",
    "release": "f7f6a67ca2e64c27bc7b2f51e4bbc014",
    "warn": "ccfa20eaefdd4c3395b9e70005aa963a",
    "warn_cleared": "8dd5bfa9752f4c09ae88bf732a63e4fc",
    "kernel_oom_kill": "047b23b547474ae4abf43f18c3acf8d9",
    "no_victim": "51b3e53eb6ba47da87a9245e2ceb06b6",
    "refused": "275e0fd688944b7caa34146d1695229a",
    "trial_failed": "729719bde0184431a3599f6eb0462fc0",
    "reclaimed": "ded7eff4368042cbbcff015076906fd3",
    "admission_error": "1874a5347fa2449db00cca09f48fcf61",
    "self_protection": "a962833cd45546cd8cbcce55f4cc51b4",
    "cgroups": "de8d684659e84caa974244fde1d1a81b",
    "cgroup": "69b31a560ec64315b459aad2a2be5d4b",
    "cgroup_error": "6f33179ca940453d8c6f4b2bbdf449ea",
    "reclaim_unheard": "91ce8224142041a4a1c5c1fae1b9ec3e",
    "gpu": "b44087a55407430a8109abd281f7cd3e",
    "gpu_problem": "12604dd9eb234c52919d095fd340a0c7",
    "operator": "fe0198c953ad46a4931b39b44b8636ef",
    "notify_failed": "1c29e172884c4a67b853fa6f1b2d5ce4",
    "notify_recovered": "7563edf2210a4f188499a1f5d9ea6a5b",
    "start_failed": "8ae7b3d9bd814a2186aebb1837e58bad",
    "metrics_error": "ed9ace8bda5c446bbc0a58adfca45234",
    "incident": "cbaec00dd7504007b6d8a70a35baf058",
}

# The namespace of the ids derived for events missing from the table.
_MESSAGE_ID_NAMESPACE = uuid.UUID("a68ee0ce-7891-404b-a6a9-e800843f039c")

_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_KEY_CHARS = re.compile(r"[^A-Z0-9_]")
_PREFIX_LEVEL = re.compile(r"^<([0-7])>")

# Keys that become well-known fields, or are dropped: the journal stamps
# every entry with its own time.
_SPECIAL = {"event", "message", "level", "timestamp", "exception", "exc_info", "stack", "logger"}


def valid_field_name(name: str) -> bool:
    """A field name a client may send: 1-64 of ``A-Z0-9_``, not starting with a digit or ``_``
    (``_``-fields are trusted ones journald adds itself and drops from clients)."""
    return bool(_FIELD_NAME.match(name))


def field_name(key: str, prefix: str = "MEMGUARD_") -> str | None:
    """``MEMGUARD_<KEY>`` for an event key (``signal_sent`` -> ``MEMGUARD_SIGNAL_SENT``), or None when no
    valid field name can be made of it (too long, or a private key starting with ``_``)."""
    if not key or key.startswith("_"):
        return None
    name = prefix + _KEY_CHARS.sub("_", key.upper())
    return name if valid_field_name(name) else None


def message_id(event: str) -> str:
    """The MESSAGE_ID of an event type: 32 lower-case hex digits, the same on every host and run."""
    known = MESSAGE_IDS.get(event)
    if known is not None:
        return known
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, event).hex


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, (int, float)):
        return str(value).encode()
    try:
        return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):
        return str(value).encode("utf-8", "surrogateescape")


def encode_entry(fields: Iterable[tuple[str, Any]]) -> bytes:
    """The datagram for one entry. A value holding a newline or a NUL byte is sent in the binary form.
    Raises ValueError for a field name a client may not send."""
    out = bytearray()
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(f"not a valid journal field name: {name!r}")
        data = _value_bytes(value)
        key = name.encode("ascii")
        if b"\n" in data or b"\0" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def _object_pid(value: Any, own_pid: int) -> int | None:
    """The pid an event names, when it is a process other than memguard's own."""
    if isinstance(value, bool):
        return None
    try:
        pid = int(value)
    except (TypeError, ValueError):
        return None
    return pid if pid > 0 and pid != own_pid else None


def event_fields(event_dict: Mapping[str, Any], identifier: str = "memguard",
                 own_pid: int | None = None) -> list[tuple[str, Any]]:
    """The journal fields of one structlog event (see the module docstring for the mapping). ``own_pid``
    (default: this process) is never sent as OBJECT_PID."""
    event = str(event_dict.get("event", ""))
    level = str(event_dict.get("level", "info")).lower()
    priority = PRIORITIES.get(level, 6)
    message = event_dict.get("message")
    syslog_identifier = identifier
    skip = set(_SPECIAL)
    extra: list[tuple[str, Any]] = []

    if event == "output" and event_dict.get("worker"):
        # A worker's line, attributed to the worker. MESSAGE is the line as the worker wrote it.
        syslog_identifier = str(event_dict["worker"])
        line = event_dict.get("line")
        if line is None:
            line = message if message is not None else ""
        line = str(line)
        m = _PREFIX_LEVEL.match(line)
        if m:
            priority = int(m.group(1))
            line = line[m.end():]
        message = line
        skip.add("line")
    if message is None:
        message = event
    message = str(message)
    exc = event_dict.get("exception")
    if exc:
        message = f"{message}\n{exc}"

    fields: list[tuple[str, Any]] = [
        ("MESSAGE", message),
        ("PRIORITY", priority),
        ("MESSAGE_ID", message_id(event)),
        ("SYSLOG_IDENTIFIER", syslog_identifier),
        ("MEMGUARD_EVENT", event),
    ]
    object_pid = _object_pid(event_dict.get("pid"), os.getpid() if own_pid is None else own_pid)
    if object_pid is not None:
        fields.append(("OBJECT_PID", object_pid))
    for key, value in event_dict.items():
        if key in skip or value is None:
            continue
        name = field_name(key)
        if name is not None and name != "MEMGUARD_EVENT":
            extra.append((name, value))
    return fields + extra


# --------------------------------------------------------------------------
# Detection


def under_journald(streams: Iterable[TextIO | int] | None = None,
                   env: Mapping[str, str] | None = None) -> bool:
    """True when stdout or stderr is the journal stream systemd connected (``$JOURNAL_STREAM`` is the
    ``device:inode`` of that stream; a process whose output was redirected elsewhere does not match)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev_s, _, ino_s = value.partition(":")
    try:
        dev, ino = int(dev_s), int(ino_s)
    except ValueError:
        return False
    for stream in (sys.stdout, sys.stderr) if streams is None else streams:
        try:
            fd = stream if isinstance(stream, int) else stream.fileno()
            st = os.fstat(fd)
        except (OSError, ValueError, AttributeError):
            continue
        if st.st_dev == dev and st.st_ino == ino:
            return True
    return False


def journal_available(path: str = JOURNAL_SOCKET) -> bool:
    """The native socket exists (journald is, or will be on first use, listening)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------
# Sending


class JournalSender:
    """Sends encoded entries; never blocks. Counts what it sent, what it dropped, what fell back."""

    def __init__(self, path: str = JOURNAL_SOCKET, sndbuf_bytes: int = SNDBUF_BYTES) -> None:
        self.path = path
        self.sent = 0
        self.dropped = 0  # would have blocked, or journald refused it
        self.unreported_drops = 0  # dropped since the last entry that got through
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if opt is None:
                continue
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, sndbuf_bytes)
                break
            except OSError:
                continue

    def close(self) -> None:
        self.sock.close()

    def send(self, payload: bytes) -> bool:
        """True when journald has the entry. False when it was dropped (would block: counted) -- raises
        OSError only when the socket is not there at all (the caller falls back)."""
        try:
            self.sock.sendto(payload, self.path)
        except BlockingIOError:
            return self._drop()
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                return self._send_memfd(payload)
            if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                return self._drop()
            raise
        self._ok()
        return True

    def _ok(self) -> None:
        self.sent += 1
        self.unreported_drops = 0

    def _drop(self) -> bool:
        self.dropped += 1
        self.unreported_drops += 1
        return False

    def _send_memfd(self, payload: bytes) -> bool:
        """A large entry: the payload in a sealed memfd, the fd alone in the datagram."""
        fd = os.memfd_create("memguard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            try:
                self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0,
                                  self.path)
            except (BlockingIOError, InterruptedError):
                return self._drop()
            except OSError as e:
                if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                    return self._drop()
                raise
        finally:
            os.close(fd)
        self._ok()
        return True


@dataclass(frozen=True)
class JournalEntry:
    """What the renderer hands the logger: the fields, ready to encode."""

    fields: tuple[tuple[str, Any], ...]
    event_dict: Mapping[str, Any]


class JournaldRenderer:
    """The last structlog processor under journald: turns the event into a :class:`JournalEntry`."""

    def __init__(self, identifier: str = "memguard") -> None:
        self.identifier = identifier

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> Any:
        entry = JournalEntry(tuple(event_fields(event_dict, self.identifier)), dict(event_dict))
        return (entry,), {}


class JournalLogger:
    """A structlog logger that sends :class:`JournalEntry` objects to journald.

    Falls back to a JSON line on ``fallback`` (stdout) when the socket is
    missing or refuses the entry outright, so no event is lost silently.
    """

    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self.sender = sender
        self.fallback = fallback

    def msg(self, entry: JournalEntry | str) -> None:
        if isinstance(entry, str):  # something rendered elsewhere: pass it through
            self._fallback_line(entry)
            return
        fields = list(entry.fields)
        if self.sender.unreported_drops:
            fields.append(("MEMGUARD_JOURNAL_DROPPED", self.sender.unreported_drops))
        try:
            payload = encode_entry(fields)
            self.sender.send(payload)
        except (OSError, ValueError):
            self._fallback_line(json.dumps(entry.event_dict, default=str))

    def _fallback_line(self, line: str) -> None:
        try:
            print(line, file=self.fallback, flush=True)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


class JournalLoggerFactory:
    """One sender (one socket) shared by every logger structlog asks for."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self.sender = JournalSender(path)
        self.fallback = fallback or sys.stdout
        self._logger = JournalLogger(self.sender, self.fallback)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger
