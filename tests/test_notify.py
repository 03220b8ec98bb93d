"""sd_notify from the daemon's side: a notify socket that stalls, refuses or is missing never blocks the loop.

Every test uses a real AF_UNIX datagram socket as systemd's notify socket:
one whose receive queue is filled to the brim and not read (systemd busy
or stuck), one that was closed (nobody bound to the path any more), a
path that does not exist, and an abstract address. The Notifier's calls
run on a thread joined with a deadline: a blocking send (what sdnotify's
own ``notify()`` does) would hang there for ever, so the deadline is a
hang detector, not a speed measurement.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from daemonkit import Daemon, make_cgroup, worker_cmd, write_config
from memguard.report.notify import Notifier

HANG_S = 20  # far beyond any non-blocking send; only a blocked call gets near it


class Problems:
    """The on_problem callback: every (event, level, message) it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, str, str]] = []

    def __call__(self, event: str, level: str, message: str) -> None:
        self.heard.append((event, level, message))

    def events(self) -> list[str]:
        return [e for e, _, _ in self.heard]


class Clock:
    """Virtual time for the watchdog's pacing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def receiver(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock


def fill(path: str) -> int:
    """Fill the receive queue of the socket at ``path`` until it takes no more; returns how many went in.
    A sender's own send buffer can run out before the receiver's queue does, so senders are added until a
    fresh one cannot send even once: then the queue itself is full."""
    n = 0
    senders: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            senders.append(s)
            sent_here = 0
            while True:
                try:
                    s.sendto(b"X=1", path)
                except BlockingIOError:
                    break
                sent_here += 1
            if sent_here == 0:
                return n
            n += sent_here
            assert len(senders) < 1000, "the queue never filled"
    finally:
        for s in senders:
            s.close()


def drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def in_thread(fn: Callable[[], None]) -> None:
    """Run fn on a thread; fail if it has not returned within HANG_S (it blocked)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), "a Notifier call blocked"
    if errors:
        raise errors[0]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    d = Path("/tmp") / f"mg-notify-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def make_notifier(monkeypatch: pytest.MonkeyPatch, address: str, watchdog_usec: int = 2_000_000
                  ) -> tuple[Notifier, Problems, Clock]:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    problems, clock = Problems(), Clock()
    return Notifier(clock=clock, on_problem=problems), problems, clock


def ticks(n: Notifier, clock: Clock, count: int) -> None:
    for i in range(count):
        clock.now += 1.0  # a watchdog ping is due at every tick
        n.tick(f"{i} running")


def test_a_full_queue_never_blocks_is_reported_once_and_ready_is_sent_once_it_drains(
        monkeypatch: pytest.MonkeyPatch, sockdir: Path) -> None:
    """A notify socket whose queue is full and not read: ready() and hundreds of watchdog ticks all return
    (non-blocking send), the problem is reported exactly once (notify_failed, naming the full queue), and
    once the queue is read again the next tick delivers the READY that was dropped, pings resume, and the
    recovery is reported once."""
    path = str(sockdir / "notify")
    rx = receiver(path)
    try:
        assert fill(path) > 0
        n, problems, clock = make_notifier(monkeypatch, path)

        def stalled() -> None:
            n.ready("0 running")
            ticks(n, clock, 600)  # more than the 512 datagrams a queue holds by default

        in_thread(stalled)
        assert problems.events() == ["notify_failed"]
        event, level, message = problems.heard[0]
        assert level == "warning" and "queue is full" in message and path in message
        assert n.dropped >= 601 and not any(m.startswith("READY=1") for m in n.sent)

        drain(rx)
        in_thread(lambda: ticks(n, clock, 2))
        got = [m.decode() for m in drain(rx)]
        assert got and got[0].startswith("READY=1\nSTATUS="), got
        assert any(m.startswith("WATCHDOG=1") for m in got), got
        assert problems.events() == ["notify_failed", "notify_recovered"]
    finally:
        rx.close()


def test_a_closed_socket_is_reported_once_and_reconnected_when_it_comes_back(
        monkeypatch: pytest.MonkeyPatch, sockdir: Path) -> None:
    """The socket's path exists but nobody is bound to it any more (the receiver was closed): every send is
    refused, without blocking or raising, and reported once; when a socket is bound there again, the
    Notifier connects afresh at the next tick and delivers the pending READY."""
    path = str(sockdir / "notify")
    receiver(path).close()  # leaves the path behind, with nobody listening
    n, problems, clock = make_notifier(monkeypatch, path)
    in_thread(lambda: (n.ready("0 running"), ticks(n, clock, 50)))
    assert problems.events() == ["notify_failed"]
    assert "refused" in problems.heard[0][2].lower(), problems.heard[0]

    os.unlink(path)
    rx = receiver(path)
    try:
        in_thread(lambda: ticks(n, clock, 1))
        got = [m.decode() for m in drain(rx)]
        assert got and got[0].startswith("READY=1"), got
        assert problems.events() == ["notify_failed", "notify_recovered"]
    finally:
        rx.close()


def test_a_peer_closed_after_connecting_is_reported_once(monkeypatch: pytest.MonkeyPatch, sockdir: Path) -> None:
    """The receiver goes away after the Notifier has connected and sent: the next sends fail (refused),
    return at once, and the problem is reported once, however many ticks follow."""
    path = str(sockdir / "notify")
    rx = receiver(path)
    n, problems, clock = make_notifier(monkeypatch, path)
    in_thread(lambda: n.ready("0 running"))
    assert [m.decode().split("\n")[0] for m in drain(rx)][0] == "READY=1"
    rx.close()
    in_thread(lambda: ticks(n, clock, 50))
    assert problems.events() == ["notify_failed"]
    assert n.dropped == 50


def test_a_missing_path_is_reported_once(monkeypatch: pytest.MonkeyPatch, sockdir: Path) -> None:
    """NOTIFY_SOCKET naming a path that does not exist: nothing raises, nothing blocks, one report that
    names the address and the error."""
    path = str(sockdir / "no" / "such" / "socket")
    n, problems, clock = make_notifier(monkeypatch, path)
    in_thread(lambda: (n.ready("0 running"), ticks(n, clock, 20), n.reloading(), n.ready("x"), n.stopping()))
    assert problems.events() == ["notify_failed"]
    assert path in problems.heard[0][2] and os.strerror(errno.ENOENT) in problems.heard[0][2]


def test_an_abstract_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name (an abstract socket, as systemd may use) receives READY, STATUS and the pings;
    nothing is reported."""
    name = f"memguard-notify-test-{uuid.uuid4().hex}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    try:
        n, problems, clock = make_notifier(monkeypatch, "@" + name)
        in_thread(lambda: (n.ready("1 running"), ticks(n, clock, 1)))
        got = [m.decode() for m in drain(rx)]
        assert got[0] == "READY=1\nSTATUS=1 running" and "WATCHDOG=1" in got[1], got
        assert problems.heard == []
    finally:
        rx.close()


def test_without_notify_socket_nothing_is_sent_or_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not run by systemd (no NOTIFY_SOCKET): every call is a silent no-op."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    problems = Problems()
    n = Notifier(on_problem=problems)
    n.ready("x")
    n.tick("y")
    n.stopping()
    assert not n.enabled and n.sent == [] and problems.heard == []


@pytest.fixture
def memcg():
    cg = make_cgroup(512 * 1024**2)
    yield cg
    cg.cleanup()


def test_the_daemon_keeps_guarding_behind_a_stalled_notify_socket(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sockdir: Path, memcg) -> None:
    """The real daemon with NOTIFY_SOCKET (and a watchdog) pointing at a socket whose queue is full: it
    logs notify_failed once, goes on guarding (a leaking worker past its limit is terminated) and, once
    the queue is read, delivers READY and logs notify_recovered."""
    path = str(sockdir / "notify")
    rx = receiver(path)
    fill(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 100 ms: plenty of sends into the full queue
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = write_config(tmp_path, """
        poll_interval: 200ms
        fast_poll_interval: 50ms
        scope: host
        workloads: workloads.d/
        mlock: false
        """, {"leak": f"""
        name: leak
        command: {worker_cmd("--rate", "20", "--max", "120")}
        limits: {{memory: 128MiB}}
        grace: 2s
        rules:
          - {{name: over-half, when: "worker.memory > 50%", action: terminate}}
        restart: {{policy: never}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        failed = d.event("notify_failed")
        assert "queue is full" in failed["message"] and failed["level"] == "warning"
        d.event("terminate", worker="leak-0", timeout=30)
        assert len(list(d.all("notify_failed"))) == 1

        seen = [m.decode() for m in drain(rx)]  # READY may already be among what the drain read
        d.event("notify_recovered", timeout=10)
        rx.settimeout(10)
        deadline = time.monotonic() + 20  # watchdog pings keep coming: bound the wait for READY itself
        while not any(m.startswith("READY=1") for m in seen):
            assert time.monotonic() < deadline, f"no READY=1 after the queue was read: {seen[-5:]}"
            seen.append(rx.recv(4096).decode())
        assert len(list(d.all("notify_failed"))) == 1
    finally:
        assert d.stop() == 0
        rx.close()
