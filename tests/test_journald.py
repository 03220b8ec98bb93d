"""journald's native protocol, the journald log format, `memguard events` and `memguard install`.

The encoder is checked against a real AF_UNIX datagram socket bound in a
temporary directory and a decoder written here from the protocol's
description (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/), not from the
code under test. No systemd is needed; tests/test_systemd.py checks the
same against a real journald.
"""

from __future__ import annotations

import array
import fcntl
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
import structlog

from memguard.cli import main
from memguard.commands import events as events_cmd
from memguard.commands.install import exec_start_argv, render_unit, systemd_quote
from memguard.report.journald import (
    MESSAGE_IDS,
    JournalEntry,
    JournalLogger,
    JournalSender,
    encode_entry,
    event_fields,
    field_name,
    message_id,
    under_journald,
    valid_field_name,
)
from memguard.report.log import configure_logging, get_logger, resolve_format

REPO = Path(__file__).resolve().parent.parent


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """The fields of one native-protocol datagram: ``KEY=value\\n``, or ``KEY\\n`` + little-endian uint64
    length + bytes + ``\\n``."""
    fields: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields.append((key.decode("ascii"), value))
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n", "binary field not terminated by a newline"
            fields.append((line.decode("ascii"), value))
            i = nl + 10 + size
    return fields


@pytest.fixture
def journal_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for journald's, in a short temporary path (sun_path is 108 bytes)."""
    d = tempfile.mkdtemp(prefix="mgj-")
    path = os.path.join(d, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(1 << 20)
    return {k: v.decode() for k, v in decode(data)}


# ---------------------------------------------------------------------------
# The encoder


def test_simple_values_are_key_equals_value_lines(journal_socket):
    """Values without a newline go as ``KEY=value`` lines, in order, numbers and booleans as text, and
    journald's socket receives exactly those bytes as one datagram."""
    path, sock = journal_socket
    payload = encode_entry([("MESSAGE", "hello"), ("PRIORITY", 6), ("MEMGUARD_VALUE", 1.5),
                            ("MEMGUARD_DRY_RUN", True), ("MEMGUARD_WORKLOADS", ["a", "b"])])
    assert payload == (b"MESSAGE=hello\nPRIORITY=6\nMEMGUARD_VALUE=1.5\nMEMGUARD_DRY_RUN=true\n"
                       b'MEMGUARD_WORKLOADS=["a","b"]\n')
    sender = JournalSender(path)
    try:
        assert sender.send(payload)
    finally:
        sender.close()
    assert sock.recv(65536) == payload


def test_multi_line_and_nul_values_use_the_binary_form(journal_socket):
    """A value holding a newline (a traceback) or a NUL is sent as KEY, newline, its length as a little-endian
    uint64, the raw bytes, newline; the decoder gets the exact value back, next to simple fields."""
    path, sock = journal_socket
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n"
    payload = encode_entry([("MESSAGE", traceback), ("MEMGUARD_RAW", b"a\0b"), ("PRIORITY", 3)])
    assert payload.startswith(b"MESSAGE\n" + struct.pack("<Q", len(traceback.encode())))
    sender = JournalSender(path)
    try:
        sender.send(payload)
    finally:
        sender.close()
    fields = decode(sock.recv(65536))
    assert fields == [("MESSAGE", traceback.encode()), ("MEMGUARD_RAW", b"a\0b"), ("PRIORITY", b"3")]


@pytest.mark.parametrize("name", ["MESSAGE", "A", "MEMGUARD_SIGNAL_SENT", "X" * 64, "A1_2"])
def test_valid_field_names(name):
    """Upper-case letters, digits and underscores, 1 to 64 of them, not starting with a digit or
    underscore, are field names a client may send."""
    assert valid_field_name(name)
    encode_entry([(name, "x")])


@pytest.mark.parametrize("name", ["", "message", "_PID", "__CURSOR", "1ABC", "X" * 65, "A-B", "A=B", "A B",
                                  "MEMGUARD_É"])
def test_invalid_field_names_are_refused(name):
    """Lower case, a leading underscore (journald's trusted fields), a leading digit, more than 64
    characters or any other character: refused before anything is sent."""
    assert not valid_field_name(name)
    with pytest.raises(ValueError):
        encode_entry([(name, "x")])


def test_event_keys_become_prefixed_field_names():
    """Every event key becomes MEMGUARD_<KEY>, upper-cased, other characters replaced by ``_``; keys that
    cannot make a valid name (private, too long) are left out."""
    assert field_name("signal_sent") == "MEMGUARD_SIGNAL_SENT"
    assert field_name("scope.description") == "MEMGUARD_SCOPE_DESCRIPTION"
    assert field_name("ran-for-s") == "MEMGUARD_RAN_FOR_S"
    assert field_name("_record") is None
    assert field_name("k" * 60) is None
    assert field_name("") is None


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journal_socket):
    """EMSGSIZE: the entry is written to a sealed memfd and only the fd travels, in an otherwise empty
    datagram (journald rejects payload and fd together)."""
    path, sock = journal_socket
    sender = JournalSender(path, sndbuf_bytes=32 * 1024)  # small buffer: the big entry cannot fit
    big = "x" * (512 * 1024)
    payload = encode_entry([("MESSAGE", big), ("PRIORITY", 6)])
    try:
        assert sender.send(payload)
    finally:
        sender.close()
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
    assert data == b""
    (level, kind, raw), = anc
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fds.frombytes(raw[: fds.itemsize])
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        content = os.pread(fd, len(payload) + 1, 0)
    finally:
        os.close(fd)
    assert content == payload
    assert dict(decode(content))["MESSAGE"] == big.encode()


def test_a_stalled_journald_never_blocks_the_sender_and_drops_are_counted(journal_socket):
    """The socket is non-blocking: when journald does not read, entries that would block are dropped and
    counted at once (the loop and its watchdog pings go on), and the next entry that gets through says how
    many were lost (MEMGUARD_JOURNAL_DROPPED)."""
    path, sock = journal_socket
    sender = JournalSender(path)
    logger = JournalLogger(sender, io.StringIO())
    entry = JournalEntry((("MESSAGE", "m"), ("PRIORITY", 6)), {"event": "x"})
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("sending blocked"))
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        for _ in range(2000):  # far more than a unix datagram queue holds (net.unix.max_dgram_qlen)
            logger.msg(entry)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sender.dropped > 0 and sender.sent + sender.dropped == 2000
    lost = sender.unreported_drops
    sock.setblocking(False)
    while True:  # journald catches up
        try:
            sock.recv(65536)
        except BlockingIOError:
            break
    logger.msg(entry)
    fields = dict(decode(sock.recv(65536)))
    assert int(fields["MEMGUARD_JOURNAL_DROPPED"]) == lost
    sender.close()


def test_without_a_journal_entries_fall_back_to_json_lines(tmp_path):
    """A journal socket that is not there: the entry is written as a JSON line to the fallback stream
    rather than lost."""
    out = io.StringIO()
    logger = JournalLogger(JournalSender(str(tmp_path / "no-socket")), out)
    logger.msg(JournalEntry((("MESSAGE", "m"),), {"event": "kill", "worker": "w-0"}))
    assert json.loads(out.getvalue()) == {"event": "kill", "worker": "w-0"}


# ---------------------------------------------------------------------------
# Events as journal fields


def test_a_decision_event_carries_its_numbers_as_fields():
    """A terminate decision: MESSAGE is the sentence, PRIORITY follows the level, MESSAGE_ID is the event
    type's fixed id, SYSLOG_IDENTIFIER is memguard, every other key is a MEMGUARD_ field; None values and
    the timestamp are left out."""
    fields = dict(event_fields({
        "event": "terminate", "level": "warning", "timestamp": "2026-01-01T00:00:00",
        "message": "trials-0 (pid 42): terminate", "workload": "trials", "worker": "trials-0", "pid": 42,
        "rule": "too-big", "signal": "worker.memory", "value": 9.5e9, "threshold": 8589934592,
        "unit": "bytes", "source": None,
    }))
    assert fields["MESSAGE"] == "trials-0 (pid 42): terminate"
    assert fields["PRIORITY"] == 4
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["terminate"]
    assert fields["SYSLOG_IDENTIFIER"] == "memguard"
    assert fields["MEMGUARD_EVENT"] == "terminate"
    assert (fields["MEMGUARD_WORKER"], fields["MEMGUARD_WORKLOAD"], fields["MEMGUARD_PID"]) == (
        "trials-0", "trials", 42)
    assert (fields["MEMGUARD_RULE"], fields["MEMGUARD_VALUE"], fields["MEMGUARD_THRESHOLD"]) == (
        "too-big", 9.5e9, 8589934592)
    assert "MEMGUARD_SOURCE" not in fields and "MEMGUARD_TIMESTAMP" not in fields
    assert "MEMGUARD_MESSAGE" not in fields and "MEMGUARD_LEVEL" not in fields
    encode_entry(fields.items())


def test_an_event_naming_another_process_carries_it_as_object_pid():
    """An event that names a process other than memguard (a worker it signals, starts or lost) carries
    its pid as OBJECT_PID, for journald to add that process's comm, exe and cmdline; an event about
    memguard itself (its own pid, as in `started`), or with no usable pid, carries none."""
    victim = dict(event_fields({"event": "terminate", "level": "warning", "worker": "w-0", "pid": 4242},
                               own_pid=100))
    assert victim["OBJECT_PID"] == 4242 and victim["MEMGUARD_PID"] == 4242
    spawn = dict(event_fields({"event": "spawn", "pid": "77"}, own_pid=100))
    assert spawn["OBJECT_PID"] == 77
    for pid in (100, None, 0, -5, "x", True):
        assert "OBJECT_PID" not in dict(event_fields({"event": "started", "pid": pid}, own_pid=100)), pid
    assert "OBJECT_PID" not in dict(event_fields({"event": "started", "pid": os.getpid()}))
    encode_entry(victim.items())


@pytest.mark.parametrize("level,priority", [("debug", 7), ("info", 6), ("warning", 4), ("error", 3),
                                            ("critical", 2)])
def test_levels_map_to_syslog_priorities(level, priority):
    """debug 7, info 6, warning 4, error 3, critical 2 (the syslog numbers journald uses)."""
    assert dict(event_fields({"event": "x", "level": level}))["PRIORITY"] == priority


def test_worker_output_is_attributed_to_the_worker():
    """An output line: SYSLOG_IDENTIFIER is the worker (so `journalctl -t trials-0` finds it), MESSAGE is the
    line as written, PRIORITY 6 for stdout and stderr alike unless the line starts with an sd-daemon <N>
    prefix, which sets the priority and is stripped."""
    out = dict(event_fields({"event": "output", "level": "info", "worker": "trials-0", "stream": "stdout",
                             "line": "epoch 3 loss 0.2", "message": "trials-0 stdout: epoch 3 loss 0.2"}))
    assert (out["SYSLOG_IDENTIFIER"], out["MESSAGE"], out["PRIORITY"]) == ("trials-0", "epoch 3 loss 0.2", 6)
    assert (out["MEMGUARD_WORKER"], out["MEMGUARD_STREAM"]) == ("trials-0", "stdout")
    assert "MEMGUARD_LINE" not in out
    err = dict(event_fields({"event": "output", "level": "info", "worker": "trials-0", "stream": "stderr",
                             "line": "Warning: slow"}))
    assert err["PRIORITY"] == 6
    prefixed = dict(event_fields({"event": "output", "level": "info", "worker": "trials-0",
                                  "stream": "stderr", "line": "<3>CUDA error"}))
    assert (prefixed["PRIORITY"], prefixed["MESSAGE"]) == (3, "CUDA error")


def test_message_ids_are_stable_128_bit_ids_one_per_event_type():
    """Every id is 32 lower-case hex digits and no two event types share one; an event missing from the
    table gets an id derived from its name, the same in every run and on every host."""
    ids = list(MESSAGE_IDS.values()) + [message_id("some_new_event")]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert message_id("some_new_event") == message_id("some_new_event") == "3ce5a1c0332b50b6a2e466f9447102ce"
    assert message_id("terminate") == MESSAGE_IDS["terminate"]


def test_an_exception_is_part_of_the_message():
    """A logged exception's traceback goes in MESSAGE after the sentence (one entry, binary form)."""
    fields = dict(event_fields({"event": "crash", "level": "error", "message": "boom",
                                "exception": "Traceback ...\nValueError: x"}))
    assert fields["MESSAGE"] == "boom\nTraceback ...\nValueError: x"
    assert b"MESSAGE\n" in encode_entry(fields.items())


# ---------------------------------------------------------------------------
# Choosing the format


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path):
    """$JOURNAL_STREAM names the device:inode of the stream systemd connected; it counts only when stdout or
    stderr really is that stream (output redirected elsewhere keeps its own format)."""
    f = open(tmp_path / "stream", "w")
    other = open(tmp_path / "other", "w")
    try:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald([f], env)
        assert under_journald([other, f], env)
        assert not under_journald([other], env)
        assert not under_journald([f], {})
        assert not under_journald([f], {"JOURNAL_STREAM": "garbage"})
    finally:
        f.close()
        other.close()


def test_journald_format_sends_structlog_events_to_the_socket(journal_socket):
    """configure_logging("journald") routes every structlog event to the journal socket as one entry."""
    path, sock = journal_socket
    try:
        assert configure_logging("journald", journal_socket=path) == "journald"
        get_logger().warning("kill", worker="w-1", pid=7, rule="last-resort", value=1.0, threshold=2.0,
                             message="w-1 (pid 7): kill")
        fields = receive(sock)
    finally:
        structlog.reset_defaults()
    assert fields["MEMGUARD_EVENT"] == "kill" and fields["PRIORITY"] == "4"
    assert fields["MESSAGE"] == "w-1 (pid 7): kill" and fields["MEMGUARD_RULE"] == "last-resort"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["kill"]


def test_format_falls_back_where_there_is_no_journal(tmp_path, monkeypatch):
    """`journald` without a journal socket is JSON lines; `auto` is journald only under systemd's journal
    stream, else console on a terminal and JSON otherwise."""
    missing = str(tmp_path / "none")
    stream = io.StringIO()
    assert resolve_format("journald", stream, journal_socket=missing) == "json"
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert resolve_format("auto", stream, journal_socket=missing) == "json"
    assert resolve_format("console", stream) == "console"


# ---------------------------------------------------------------------------
# memguard events


FAKE_JOURNALCTL = """\
#!{python}
import json, sys
with open({argv_file!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
entries = [
    {{"__CURSOR": "c1", "__REALTIME_TIMESTAMP": "1777000000000000", "MEMGUARD_EVENT": "spawn",
      "MEMGUARD_WORKER": "w-0", "PRIORITY": "6", "MESSAGE": "w-0: start", "SYSLOG_IDENTIFIER": "memguard"}},
    {{"__CURSOR": "c2", "__REALTIME_TIMESTAMP": "1777000001000000", "MEMGUARD_EVENT": "output",
      "MEMGUARD_WORKER": "w-0", "MEMGUARD_STREAM": "stdout", "PRIORITY": "6", "MESSAGE": "pids 42",
      "SYSLOG_IDENTIFIER": "w-0"}},
    {{"__CURSOR": "c3", "__REALTIME_TIMESTAMP": "1777000002000000", "MEMGUARD_EVENT": "terminate",
      "MEMGUARD_WORKER": "w-0", "MEMGUARD_PID": "42", "MEMGUARD_RULE": "too-big",
      "MEMGUARD_VALUE": "70000000.0", "MEMGUARD_THRESHOLD": "67108864", "PRIORITY": "4",
      "MESSAGE": "w-0 (pid 42): terminate", "SYSLOG_IDENTIFIER": "memguard"}},
    {{"__CURSOR": "c4", "__REALTIME_TIMESTAMP": "1777000003000000", "PRIORITY": "4",
      "MESSAGE": "memguard.service: Watchdog timeout (limit 20s)!", "SYSLOG_IDENTIFIER": "systemd"}},
]
if "--reverse" in sys.argv:
    entries.reverse()
for e in entries:
    print(json.dumps(e), flush=True)
"""


@pytest.fixture
def fake_journalctl(tmp_path: Path) -> tuple[Path, Path]:
    argv_file = tmp_path / "argv"
    exe = tmp_path / "journalctl"
    exe.write_text(FAKE_JOURNALCTL.format(python=sys.executable, argv_file=str(argv_file)))
    exe.chmod(0o755)
    return exe, argv_file


def test_events_turns_filters_into_journal_matches(fake_journalctl, capsys):
    """--event and --worker become MEMGUARD_EVENT= / MEMGUARD_WORKER= matches on -u memguard.service;
    -n reads newest first and prints the last N in time order."""
    exe, argv_file = fake_journalctl
    rc = main(["events", "--journalctl", str(exe), "--event", "terminate,kill", "--worker", "w-0",
               "--since", "1h ago", "-n", "2"])
    assert rc == 0
    argv = json.loads(argv_file.read_text().splitlines()[0])
    assert argv[argv.index("-u") + 1] == "memguard.service"
    assert argv[argv.index("--since") + 1] == "1h ago"
    assert {"-o", "json", "--reverse", "MEMGUARD_EVENT=terminate", "MEMGUARD_EVENT=kill",
            "MEMGUARD_WORKER=w-0"} <= set(argv)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "terminate" in lines[0] and "w-0 (pid 42): terminate" in lines[0]
    assert "[systemd]" in lines[1] and "Watchdog timeout" in lines[1]


def test_events_json_has_the_shape_of_memguards_own_log(fake_journalctl, capsys):
    """--json prints one object per event with memguard's keys (event, worker, pid, rule, value, threshold,
    level, message, timestamp), numbers as numbers; worker output only with --output."""
    exe, _ = fake_journalctl
    assert main(["events", "--journalctl", str(exe), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["spawn", "terminate", "[systemd]"]
    term = events[1]
    assert (term["worker"], term["pid"], term["rule"], term["value"], term["threshold"]) == (
        "w-0", 42, "too-big", 70000000.0, 67108864)
    assert term["level"] == "warning" and term["message"] == "w-0 (pid 42): terminate"
    assert term["timestamp"] == datetime.fromtimestamp(1777000002).astimezone().isoformat(timespec="microseconds")
    assert main(["events", "--journalctl", str(exe), "--json", "--output"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["spawn", "output", "terminate", "[systemd]"]
    assert events[1]["line"] == "pids 42" and events[1]["stream"] == "stdout"


def test_events_without_journalctl_says_so(tmp_path, capsys):
    """No journalctl on the machine: a clear error, exit status 2."""
    assert main(["events", "--journalctl", str(tmp_path / "missing-journalctl")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "systemd" in err


def test_events_explains_journalctl_permission_errors(monkeypatch):
    """journalctl's two ways of saying the system journal is out of reach (no file could be opened; only the
    user's own journal could) become one message naming the user, the group systemd-journal and sudo; a
    user already in the group (in a session older than that) is told to log in again; any other error
    is left as journalctl wrote it."""
    no_files = "No journal files were opened due to insufficient permissions."
    hint = ("Hint: You are currently not seeing messages from other users and the system.\n"
            "      Users in groups 'adm', 'systemd-journal' can see all messages.\n"
            "      Pass -q to turn off this notice.")
    monkeypatch.setattr(events_cmd, "_user_and_groups", lambda: ("alice", {"alice", "users"}))
    for err in (no_files, hint):
        text = events_cmd.permission_hint(err)
        assert text is not None and "you (alice) may not read the system journal" in text
        assert "sudo usermod -aG systemd-journal alice" in text and "sudo memguard events" in text
    assert "No journal files were opened" in events_cmd.permission_hint(no_files)
    assert "in DIR" not in events_cmd.permission_hint(no_files, "/srv/j") and "/srv/j" in \
        events_cmd.permission_hint(no_files, "/srv/j")
    monkeypatch.setattr(events_cmd, "_user_and_groups", lambda: ("bob", {"bob", "systemd-journal"}))
    assert "log in again" in events_cmd.permission_hint(no_files)
    assert events_cmd.permission_hint("Failed to parse timestamp: yesterday-ish") is None


def test_event_entries_decode_repeated_and_binary_values():
    """journalctl -o json gives a repeated field as a list and a non-UTF-8 value as a list of bytes; both
    are read back as text."""
    event = events_cmd.entry_to_event({"MEMGUARD_EVENT": "x", "MEMGUARD_NOTE": [104, 105],
                                      "MEMGUARD_TAG": ["a", "b"], "MESSAGE": "m", "PRIORITY": "3"})
    assert (event["note"], event["tag"], event["level"]) == ("hi", "b", "error")


# ---------------------------------------------------------------------------
# memguard install


def test_packaged_files_are_the_repositorys(tmp_path):
    """The unit and default configuration shipped in the wheel (memguard/data/) are byte-identical to
    systemd/memguard.service and config/ (after editing those, copy them to src/memguard/data/), and the
    journal catalog there is the one memguard/catalog.py renders."""
    data = REPO / "src" / "memguard" / "data"
    assert (data / "memguard.service").read_bytes() == (REPO / "systemd" / "memguard.service").read_bytes()
    assert (data / "memguard.yaml").read_bytes() == (REPO / "config" / "memguard.yaml").read_bytes()
    assert (data / "workloads.d" / "example.yaml").read_bytes() == (
        REPO / "config" / "workloads.d" / "example.yaml").read_bytes()
    from memguard.catalog import render

    assert (data / "memguard.catalog").read_text() == render(), (
        "src/memguard/data/memguard.catalog is stale: python -c 'from memguard.catalog import render; "
        "print(render(), end=\"\")' > src/memguard/data/memguard.catalog")


def test_install_into_a_root_places_unit_and_default_config(tmp_path, capsys):
    """`memguard install --root DIR` writes the unit where systemd.unit(5) puts an administrator's units
    (/usr/local/lib/systemd/system, leaving /etc/systemd/system to overrides) with ExecStart pointing at
    this memguard, the default configuration (which passes `memguard check`), the journal catalog, the man
    page and the completions; nothing else, and systemd is not reloaded."""
    assert main(["install", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    unit = (tmp_path / "usr/local/lib/systemd/system/memguard.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line == "ExecStart=" + " ".join(
        systemd_quote(a) for a in exec_start_argv() + ["daemon", "--config", "/etc/memguard/memguard.yaml"])
    assert os.path.isabs(exec_start_argv()[0])
    assert unit.replace(exec_line, "") == render_unit(["X"]).replace(
        "ExecStart=X daemon --config /etc/memguard/memguard.yaml", "")
    config = tmp_path / "etc/memguard/memguard.yaml"
    assert config.read_bytes() == (REPO / "config" / "memguard.yaml").read_bytes()
    assert (tmp_path / "etc/memguard/workloads.d/example.yaml").exists()
    assert "daemon-reload" in out and "--update-catalog" in out and "not installing into /" in out
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "etc/memguard/memguard.yaml", "etc/memguard/workloads.d/example.yaml",
        "usr/local/lib/systemd/catalog/memguard.catalog",
        "usr/local/lib/systemd/system/memguard.service",
        "usr/local/share/bash-completion/completions/memguard",
        "usr/local/share/man/man8/memguard.8",
        "usr/local/share/zsh/site-functions/_memguard"]
    assert (tmp_path / "usr/local/lib/systemd/catalog/memguard.catalog").read_bytes() == (
        REPO / "src/memguard/data/memguard.catalog").read_bytes()
    # The example runs as user ml in /opt/exp, which a test machine lacks: check its form only.
    assert main(["check", "--no-host-checks", str(config)]) == 0


def test_install_never_overwrites_an_existing_configuration(tmp_path, capsys):
    """An existing memguard.yaml is kept as it is, and no example workload joins workloads the user
    already has; the output says what was kept. The unit is replaced, the old one kept as .bak."""
    etc = tmp_path / "etc/memguard"
    (etc / "workloads.d").mkdir(parents=True)
    mine = "workloads: workloads.d/\n# mine\n"
    (etc / "memguard.yaml").write_text(mine)
    (etc / "workloads.d" / "trials.yaml").write_text("name: trials\ncommand: [sleep, '100']\n")
    unit = tmp_path / "usr/local/lib/systemd/system/memguard.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/old\n")
    assert main(["install", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (etc / "memguard.yaml").read_text() == mine
    assert not (etc / "workloads.d" / "example.yaml").exists()
    assert re.search(r"keep\s+\S*memguard\.yaml\s+\(an existing configuration is never overwritten\)", out)
    assert "already holds trials.yaml" in out
    assert (unit.with_name("memguard.service.bak")).read_text() == "[Service]\nExecStart=/old\n"
    assert "Type=notify" in unit.read_text()

    assert main(["install", "--root", str(tmp_path)]) == 0  # again: nothing to do
    assert "unchanged" in capsys.readouterr().out


def test_install_moves_aside_a_unit_an_earlier_install_left_in_etc(tmp_path, capsys):
    """A memguard.service that an earlier `memguard install` wrote to /etc/systemd/system would hide the
    new one (/etc comes first in systemd's unit path): it is moved aside to .bak, and said so. A unit
    there that memguard did not write (the administrator's own) is kept, with a warning."""
    etc_unit = tmp_path / "etc/systemd/system/memguard.service"
    etc_unit.parent.mkdir(parents=True)
    etc_unit.write_text(render_unit(["/old/memguard"]))
    assert main(["install", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert not etc_unit.exists() and etc_unit.with_name("memguard.service.bak").exists()
    assert re.search(r"move aside\s+\S*etc/systemd/system/memguard\.service -> memguard\.service\.bak", out)
    assert (tmp_path / "usr/local/lib/systemd/system/memguard.service").exists()

    etc_unit.write_text("[Service]\nExecStart=/mine\n")
    assert main(["install", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert etc_unit.read_text() == "[Service]\nExecStart=/mine\n"
    assert "not written by memguard install: it overrides" in out


def test_install_dry_run_changes_nothing(tmp_path, capsys):
    """--dry-run prints the plan (what it would create, the ExecStart line) and writes nothing."""
    assert main(["install", "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would create" in out and "ExecStart=" in out
    assert list(tmp_path.iterdir()) == []


def test_install_into_the_system_needs_root(monkeypatch, capsys):
    """Installing into / as an ordinary user is refused with a hint, before anything is written."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["install"]) == 1
    assert "must run as root" in capsys.readouterr().err


@pytest.mark.parametrize("arg,quoted", [
    ("/usr/bin/memguard", "/usr/bin/memguard"),
    ("/opt/my env/bin/python", '"/opt/my env/bin/python"'),
    ("/opt/100%/python", "/opt/100%%/python"),
    ("/opt/$HOME/python", "/opt/$$HOME/python"),
    ('/opt/a"b', '"/opt/a\\"b"'),
])
def test_exec_start_words_are_quoted_for_systemd(arg, quoted):
    """ExecStart= words with spaces or quotes are quoted; % and $ are doubled so systemd takes them
    literally (no specifier or variable expansion)."""
    assert systemd_quote(arg) == quoted
