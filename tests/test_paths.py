"""Where the daemon listens and where clients look: memguard.paths, and a non-root daemon found without flags.

The rules are checked as functions of (uid, environment) first; then a real
daemon runs as an unprivileged user (a uid of its own, tests/userkit.py)
and ``memguard ctl status``, run as that same user with the same
environment and no flag, reaches it: once through ``/tmp/memguard-UID``
(no login session), once through ``$XDG_RUNTIME_DIR/memguard``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from daemonkit import HELPERS, MEMGUARD, REPO
from memguard import paths
from userkit import as_user, free_uid, user_switch  # noqa: F401 - user_switch is a fixture

# ---------------------------------------------------------------------------
# The rules


def test_default_runtime_dir_by_user_and_session() -> None:
    """root: /run/memguard; a user with a login session: $XDG_RUNTIME_DIR/memguard; without one
    /tmp/memguard-UID; a relative XDG_RUNTIME_DIR is ignored (the spec requires an absolute path)."""
    assert paths.default_runtime_dir(0, {}, run_exists=True) == "/run/memguard"
    assert paths.default_runtime_dir(0, {}, run_exists=False) == "/tmp/memguard-0"
    assert paths.default_runtime_dir(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000/memguard"
    assert paths.default_runtime_dir(1000, {}) == "/tmp/memguard-1000"
    assert paths.default_runtime_dir(1000, {"XDG_RUNTIME_DIR": "run/user"}) == "/tmp/memguard-1000"


def test_daemon_runtime_dir_flag_then_config_then_default() -> None:
    """--runtime-dir beats runtime_dir:, which beats the default for the user; $MEMGUARD_SOCKET (set in
    every worker's environment) is not the daemon's business."""
    env = {"MEMGUARD_SOCKET": "/somewhere/else.sock"}
    assert paths.daemon_runtime_dir("/flag", "/conf", uid=1000, env=env) == "/flag"
    assert paths.daemon_runtime_dir(None, "/conf", uid=1000, env=env) == "/conf"
    assert paths.daemon_runtime_dir(None, None, uid=1000, env=env) == "/tmp/memguard-1000"


def test_client_candidates_in_order() -> None:
    """A client asked for a socket by name (--socket, $MEMGUARD_SOCKET) looks nowhere else; otherwise it
    tries its own user's default, the other places that user's daemon may use, then root's service."""
    assert paths.client_socket_candidates("/x.sock", uid=1000, env={"MEMGUARD_SOCKET": "/y"}) == ["/x.sock"]
    assert paths.client_socket_candidates(None, uid=1000, env={"MEMGUARD_SOCKET": "/y"}) == ["/y"]
    assert paths.client_socket_candidates(None, uid=1000, env={"XDG_RUNTIME_DIR": "/run/user/1000"}) == [
        "/run/user/1000/memguard/control.sock", "/tmp/memguard-1000/control.sock", "/run/memguard/control.sock"]
    assert paths.client_socket_candidates(None, uid=1000, env={}) == [
        "/tmp/memguard-1000/control.sock", "/run/user/1000/memguard/control.sock", "/run/memguard/control.sock"]
    assert paths.client_socket_candidates(None, uid=0, env={}) == ["/run/memguard/control.sock"]


def test_find_socket_skips_an_untrusted_tmp_directory(tmp_path: Path) -> None:
    """/tmp/memguard-UID made by someone else (or writable by others) is not trusted: anyone may create it
    first. The client passes it by and names the first place it looked when nothing is found."""
    uid = free_uid()
    d = Path(f"/tmp/memguard-{uid}")
    if os.geteuid() != 0:
        pytest.skip("creating a directory owned by another uid needs root")
    d.mkdir(mode=0o755)
    try:
        import socket as _socket

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.bind(str(d / "control.sock"))
        try:
            os.chown(d, uid + 1, uid + 1)  # another user's directory
            path, tried = paths.find_socket(uid=uid, env={})
            assert path == tried[0] == str(d / "control.sock") and len(tried) == 3
            assert not paths._trusted(str(d), uid)
            os.chown(d, uid, uid)
            assert paths._trusted(str(d), uid)
            os.chmod(d, 0o777)
            assert not paths._trusted(str(d), uid)
            os.chmod(d, 0o755)
            path, _ = paths.find_socket(uid=uid, env={})
            assert path == str(d / "control.sock")
        finally:
            s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# A real non-root daemon


class UserDaemon:
    """``memguard daemon`` running as an unprivileged uid, its JSON events read into a queue."""

    def __init__(self, config: Path, uid: int, env: dict[str, str]) -> None:
        self.uid, self.env = uid, env
        argv = as_user([*MEMGUARD, "daemon", "--config", str(config), "--log-format", "json"], uid)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                                     start_new_session=True)
        self.q: queue.Queue[dict | None] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.q.put(json.loads(raw))
            except ValueError:
                self.q.put({"event": "unparsed", "line": raw.decode(errors="replace")})
        self.q.put(None)

    def event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} within {timeout}s; events: {self.events[-10:]}")
            try:
                ev = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"the daemon exited ({self.proc.wait()}) before {name}: {self.events[-10:]}"
                                     f" {err[-2000:]}")
            self.events.append(ev)
            if ev.get("event") == name:
                return ev

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """`memguard ctl ARGS` as the same user, same environment, no --socket."""
        return subprocess.run(as_user([*MEMGUARD, "ctl", *args], self.uid), env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the process itself: setpriv and sh exec'd into it
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture
def config_dir() -> Iterator[Path]:
    """A daemon file and one sleeping worker, readable by any user (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="memguard-paths-", dir=REPO / "build"))
    d.chmod(0o755)
    (d / "workloads.d").mkdir(mode=0o755)
    (d / "memguard.yaml").write_text(textwrap.dedent("""\
        poll_interval: 500ms
        scope: host
        workloads: workloads.d/
        mlock: false
        """))
    (d / "workloads.d" / "sleeper.yaml").write_text(textwrap.dedent(f"""\
        name: sleeper
        command: {json.dumps([sys.executable, str(HELPERS / "worker_mem.py"), "--rate", "0"])}
        """))
    for f in (d / "memguard.yaml", d / "workloads.d" / "sleeper.yaml"):
        f.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _clean_env(**extra: str) -> dict[str, str]:
    """A login-like environment: no MEMGUARD_SOCKET, no XDG_RUNTIME_DIR unless given."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def _round_trip(config_dir: Path, uid: int, env: dict[str, str], expected_dir: str) -> None:
    d = UserDaemon(config_dir / "memguard.yaml", uid, env)
    try:
        started = d.event("started")
        sock = os.path.join(expected_dir, "control.sock")
        assert started["socket"] == sock and sock in started["message"], started
        d.event("spawn")
        st = os.stat(sock)
        assert st.st_uid == uid  # the daemon really runs as that user

        r = d.ctl("status", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        reply = json.loads(r.stdout)
        assert reply["ok"] and "sleeper-0" in reply["workers"], reply

        r = d.ctl("status")
        assert r.returncode == 0 and "sleeper-0" in r.stdout, r.stdout + r.stderr
    finally:
        assert d.stop() == 0


@pytest.mark.root
def test_non_root_daemon_and_ctl_meet_in_tmp(user_switch: None, config_dir: Path) -> None:
    """An unprivileged user without a login session (no XDG_RUNTIME_DIR): the daemon listens on
    /tmp/memguard-UID/control.sock and says so in its `started` event; `memguard ctl status` run by the
    same user with no flag reaches it."""
    uid = free_uid()
    try:
        _round_trip(config_dir, uid, _clean_env(), f"/tmp/memguard-{uid}")
    finally:
        shutil.rmtree(f"/tmp/memguard-{uid}", ignore_errors=True)


@pytest.mark.root
def test_non_root_daemon_and_ctl_meet_in_xdg_runtime_dir(user_switch: None, config_dir: Path) -> None:
    """A user with a login session: the daemon listens in $XDG_RUNTIME_DIR/memguard, and ctl, in the same
    session, finds it there without a flag."""
    uid = free_uid()
    xdg = Path(tempfile.mkdtemp(prefix="xdg-", dir=REPO / "build"))
    try:
        os.chown(xdg, uid, uid)
        xdg.chmod(0o700)
        _round_trip(config_dir, uid, _clean_env(XDG_RUNTIME_DIR=str(xdg)), str(xdg / "memguard"))
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


@pytest.mark.root
def test_ctl_says_where_it_looked_when_no_daemon_runs(user_switch: None) -> None:
    """`memguard ctl status` by a user with no daemon of their own (and none of root's to be reached)
    exits 1 and names every socket it tried and how to name another."""
    uid = free_uid()
    r = subprocess.run(as_user([*MEMGUARD, "ctl", "status"], uid), env=_clean_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    if os.path.exists(paths.SYSTEM_SOCKET):
        pytest.skip("a memguard service runs on this machine: ctl would reach it")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"/tmp/memguard-{uid}/control.sock" in r.stderr and "/run/memguard/control.sock" in r.stderr
    assert "--socket" in r.stderr and "Traceback" not in r.stderr
