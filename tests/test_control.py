"""The control socket with real sockets, real peer credentials and real processes.

Each test runs a ControlServer on a real asyncio loop (plain asyncio.run)
in a fresh directory, and talks to it the way workers and administrators
do: asyncio streams in the same process, blocking sockets in threads,
and separate processes (one of them running as ``nobody``). Nothing is
mocked and nothing sleeps to synchronise: every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from memguard.act.control import ControlError, ControlServer, pid_in_tree
from memguard.model import TrialEvent

DEADLINE_S = 10.0


def run(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def sockdir() -> Any:
    """A directory under /tmp that any user can traverse (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="memguard-ctl-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Harness:
    """A ControlServer plus what it reported, with workers and pids the test decides."""

    def __init__(self, path: str, **kw: Any) -> None:
        self.events: asyncio.Queue[TrialEvent] = asyncio.Queue()
        self.admin: list[dict[str, Any]] = []
        self.notices: list[tuple[str, dict[str, Any]]] = []
        self.pids: dict[str, set[int]] = {}
        self.incarnations: dict[str, int] = {}
        self.server = ControlServer(
            path, on_trial=self.events.put_nowait, on_admin=self.on_admin,
            identify=lambda w, pid: pid in self.pids.get(w, ()),
            incarnation_of=self.incarnations.get,
            worker_of_pid=lambda pid: next((w for w, pids in self.pids.items() if pid in pids), None),
            on_notice=lambda ev, f: self.notices.append((ev, f)), **kw)

    async def on_admin(self, req: dict[str, Any]) -> dict[str, Any]:
        self.admin.append(req)
        await asyncio.sleep(0)  # an awaitable on_admin is awaited
        return {"workers": ["trials-0"], "echo": req["op"]}

    def add_worker(self, name: str, pid: int, incarnation: int = 1) -> str:
        self.pids[name] = {pid}
        self.incarnations[name] = incarnation
        return self.server.new_token(name, incarnation)

    async def __aenter__(self) -> "Harness":
        await self.server.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.close()

    async def next_event(self, timeout: float = DEADLINE_S) -> TrialEvent:
        return await asyncio.wait_for(self.events.get(), timeout)


class Line:
    """An asyncio client speaking one JSON object per line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> "Line":
        r, w = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(r, w)

    async def send(self, obj: Any) -> None:
        self.writer.write((json.dumps(obj) + "\n").encode())
        await self.writer.drain()

    async def recv(self, timeout: float = DEADLINE_S) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line, "the server closed the connection"
        return json.loads(line)

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv()

    async def closed(self, timeout: float = DEADLINE_S) -> bool:
        """True once the server has closed the connection; False if it is still open after ``timeout``
        (asyncio's TimeoutError is an OSError: it is told apart first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while await asyncio.wait_for(self.reader.read(65536), max(0.0, deadline - loop.time())):
                pass
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, OSError):
            pass
        return True

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------
# worker authentication


def test_worker_reports_become_trial_events(sockdir: str) -> None:
    """A worker connection with its incarnation's token, from a pid identify() accepts, turns each
    report (trial_start, heartbeat, refused, trial_end, reclaimed) into a TrialEvent with the worker's
    incarnation, the name, ok and detail; ids are echoed."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock")) as h:
            tok = h.add_worker("trials-0", os.getpid(), incarnation=3)
            c = await Line.open(h.server.path)
            base = {"worker": "trials-0", "token": tok}
            assert await c.ask({"op": "trial_start", "name": "trial-7", "id": 1, **base}) == {"ok": True, "id": 1}
            ev = await h.next_event()
            assert (ev.worker, ev.incarnation, ev.kind, ev.name) == ("trials-0", 3, "start", "trial-7")
            assert (await c.ask({"op": "heartbeat", "id": "h", **base}))["id"] == "h"
            assert (await h.next_event()).kind == "heartbeat"
            assert (await c.ask({"op": "refused", "detail": "closed: rule x", **base}))["ok"]
            ev = await h.next_event()
            assert (ev.kind, ev.detail) == ("refused", "closed: rule x")
            assert (await c.ask({"op": "trial_end", "ok": False, "name": "trial-7", "detail": "boom", **base}))["ok"]
            ev = await h.next_event()
            assert (ev.kind, ev.ok, ev.name, ev.detail) == ("end", False, "trial-7", "boom")
            assert (await c.ask({"op": "reclaimed", "detail": "gc", **base}))["ok"]
            assert (await h.next_event()).kind == "reclaimed"
            # trial_end needs ok; a heartbeat within a second of the last is answered but not passed on
            assert (await c.ask({"op": "trial_end", **base}))["ok"] is False
            assert (await c.ask({"op": "heartbeat", **base}))["ok"]
            assert h.events.empty()
            c.close()

    run(main())


def test_wrong_token_or_foreign_pid_is_refused(sockdir: str) -> None:
    """A wrong token, a token of an earlier incarnation, worker A's token used for worker B, and B's own
    token used from a process that is not in B's tree (identify false) are all refused with an error
    reply; no TrialEvent reaches the core."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock")) as h:
            tok_a = h.add_worker("a-0", os.getpid())
            tok_b = h.add_worker("b-0", 999_999_999)  # B's tree does not contain this test process
            c = await Line.open(h.server.path)
            for req in (
                {"worker": "a-0", "token": "0" * 32},  # wrong token
                {"worker": "b-0", "token": tok_a},  # A's token for B
                {"worker": "b-0", "token": tok_b},  # B's token, but this pid is not B
                {"worker": "nobody-0", "token": tok_a},  # no such worker
            ):
                for op in ("trial_start", "heartbeat", "refused", "hello"):
                    reply = await c.ask({"op": op, **req})
                    assert reply["ok"] is False and "authentication failed" in reply["error"], (op, req, reply)
            # a restarted worker gets a new token; the old one stops working
            old = tok_a
            h.incarnations["a-0"] = 2
            new = h.server.new_token("a-0", 2)
            assert (await c.ask({"op": "trial_start", "worker": "a-0", "token": old}))["ok"] is False
            assert (await c.ask({"op": "trial_start", "worker": "a-0", "token": new}))["ok"] is True
            assert (await h.next_event()).incarnation == 2
            # revoked on exit: nothing more is accepted
            h.server.revoke("a-0")
            assert (await c.ask({"op": "trial_start", "worker": "a-0", "token": new}))["ok"] is False
            assert h.events.empty()
            assert sum(1 for ev, _ in h.notices if ev == "control_auth_failed") >= 17
            c.close()

    run(main())


_WORKER_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    token = sys.stdin.readline().strip()  # handed over once the test registered this pid
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    for op in sys.argv[2:]:
        f.write((json.dumps({"op": op, "worker": "w-0", "token": token, "ok": True}) + "\\n").encode())
        f.flush()
        print(f.readline().decode().strip(), flush=True)
""")


def test_only_the_worker_process_itself_can_report(sockdir: str) -> None:
    """With identify() accepting only a separate worker process's pid (found by SO_PEERCRED), that
    process's reports are accepted while this process, holding the very same token, is refused."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock")) as h:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _WORKER_SCRIPT, h.server.path, "trial_start", "trial_end",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            tok = h.add_worker("w-0", proc.pid)
            out, _ = await asyncio.wait_for(proc.communicate((tok + "\n").encode()), DEADLINE_S)
            replies = [json.loads(x) for x in out.decode().splitlines()]
            assert [r["ok"] for r in replies] == [True, True]
            assert [(await h.next_event()).kind for _ in range(2)] == ["start", "end"]
            c = await Line.open(h.server.path)
            reply = await c.ask({"op": "trial_start", "worker": "w-0", "token": tok})
            assert reply["ok"] is False and "authentication failed" in reply["error"]
            assert h.events.empty()
            c.close()

    run(main())


def test_pid_in_tree_follows_sessions_and_parents() -> None:
    """pid_in_tree accepts the root, a child in its session and a grandchild that left the session with
    setsid() while its parent lives; it rejects an unrelated process (this test process)."""
    code = textwrap.dedent("""
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        escaped = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                   start_new_session=True)
        print(child.pid, escaped.pid, flush=True)
        sys.stdin.read()
        child.stdin.close(); escaped.stdin.close(); child.wait(); escaped.wait()
    """)
    root = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        assert root.stdout is not None and root.stdin is not None
        child, escaped = map(int, root.stdout.readline().split())
        assert pid_in_tree(root.pid, root.pid)
        assert pid_in_tree(child, root.pid)
        assert pid_in_tree(escaped, root.pid)
        assert not pid_in_tree(os.getpid(), root.pid)
        assert not pid_in_tree(root.pid, child)
    finally:
        if root.stdin:
            root.stdin.close()
        root.wait(DEADLINE_S)


# ---------------------------------------------------------------------------
# admin requests and peer credentials


def _python_for(user: str) -> str | None:
    """An interpreter ``user`` can execute (the venv's may live under /root)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand):
            continue
        try:
            r = subprocess.run([cand, "-c", "pass"], user=user, extra_groups=[], capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return cand
    return None


_ADMIN_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall((json.dumps({"op": sys.argv[2], "worker": "trials-0", "id": 5}) + "\\n").encode())
    f = s.makefile("rb")
    print(f.readline().decode().strip(), flush=True)
""")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")


@needs_root
def test_admin_requests_need_root_or_the_admin_group(sockdir: str) -> None:
    """An admin request from `nobody` with no supplementary groups gets "permission denied" and on_admin
    is not called; `nobody` with the admin group as a supplementary group, and root, are allowed and
    get on_admin's reply with the request's id."""
    py = _python_for("nobody")
    if py is None:
        pytest.skip("no Python interpreter that the user nobody can run")
    try:
        grp.getgrnam("users")
        nobody_gid = pwd.getpwnam("nobody").pw_gid
    except KeyError:
        pytest.skip("needs the user nobody and the group users")

    async def as_user(path: str, op: str, **kw: Any) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(py, "-I", "-c", _ADMIN_SCRIPT, path, op,
                                                    stdout=subprocess.PIPE, **kw)
        out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
        return json.loads(out)

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "sub", "c.sock"), admin_group="users") as h:
            assert stat.S_IMODE(os.stat(h.server.path).st_mode) == 0o666
            assert stat.S_IMODE(os.stat(os.path.dirname(h.server.path)).st_mode) == 0o755
            for op in ("status", "reload", "stop", "start", "restart"):
                reply = await as_user(h.server.path, op, user="nobody", group=nobody_gid, extra_groups=[])
                assert reply == {"ok": False, "error": "permission denied", "id": 5}, (op, reply)
            assert h.admin == []
            reply = await as_user(h.server.path, "restart", user="nobody", group=nobody_gid,
                                   extra_groups=["users"])
            assert reply == {"ok": True, "workers": ["trials-0"], "echo": "restart", "id": 5}
            reply = await as_user(h.server.path, "status")  # root
            assert reply["ok"] is True and reply["echo"] == "status"
            assert [r["op"] for r in h.admin] == ["restart", "status"]
            assert all("id" not in r for r in h.admin)
            c = await Line.open(h.server.path)
            assert (await c.ask({"op": "stop"}))["error"].startswith("missing field 'worker'")
            c.close()

    run(main())


# ---------------------------------------------------------------------------
# robustness


def test_junk_and_huge_lines_get_errors_and_nothing_else_changes(sockdir: str) -> None:
    """Malformed JSON, non-object JSON, an unknown op, missing fields, deeply nested JSON and random
    bytes each get an error reply on a connection that stays usable; a 10 MB line gets an error reply
    and that connection is closed. No TrialEvent and no admin call happen."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock"), max_line=64 * 1024) as h:
            tok = h.add_worker("w-0", os.getpid())
            c = await Line.open(h.server.path)
            for bad in (b"{not json", b"[1, 2]", b'"text"', b"42", b'{"op": "fly"}', b'{"op": 5}', b"{}",
                        b'{"op": "trial_start"}', b'{"op": "trial_start", "worker": "w-0"}',
                        b'{"op": "trial_start", "worker": "w-0", "token": "' + tok.encode() + b'", "name": 5}',
                        b"[" * 50_000, b"\xff\xfe\x00garbage"):
                c.writer.write(bad + b"\n")
                reply = await c.recv()
                assert reply["ok"] is False and reply["error"], (bad[:40], reply)
            c.writer.write(os.urandom(20_000).replace(b"\n", b"x") + b"\n" + os.urandom(3000) + b"\n")
            await c.send({"op": "ping", "id": "after-junk"})
            while True:
                reply = await c.recv()
                if reply.get("id") == "after-junk":
                    assert reply["ok"] is True
                    break
                assert reply["ok"] is False
            assert h.events.empty() and h.admin == []

            loop = asyncio.get_running_loop()
            reply, rest = await loop.run_in_executor(None, _send_huge_line, h.server.path, 10 * 1024 * 1024)
            assert reply["ok"] is False and "longer than" in reply["error"]
            assert rest == b"", "the connection was not closed after the error"
            # the first connection is still served
            assert (await c.ask({"op": "ping", "id": 1})) == {"ok": True, "id": 1}
            c.close()

    run(main())


def _send_huge_line(path: str, size: int) -> tuple[dict[str, Any], bytes]:
    """Send one line of ``size`` bytes from a blocking socket; return the reply and what followed it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE_S)
        s.connect(path)
        sender = threading.Thread(target=_sendall_quietly, args=(s, b"x" * size + b"\n"))
        sender.start()
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass  # after the reply: the server closed with our unread bytes in its queue
        sender.join(DEADLINE_S)
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest


def _sendall_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the server closed the connection while we were still sending


def test_bad_clients_never_stall_the_loop_or_healthy_clients(sockdir: str) -> None:
    """While one thread sends random bytes and 10 MB lines and another client sends requests but never
    reads the replies, a healthy client keeps getting answers, a call_later timer on the server's loop
    keeps firing on time (never more than 0.25 s late), and the client that never reads is dropped."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock"), write_timeout_s=1.0) as h:
            loop = asyncio.get_running_loop()
            path = h.server.path
            junk = os.urandom(1 << 20)
            big = b"y" * (10 * 1024 * 1024) + b"\n"
            stop = threading.Event()
            dropped = threading.Event()

            def junk_sender() -> None:
                while not stop.is_set():
                    for payload in (junk, big):
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                            try:
                                s.connect(path)
                                s.sendall(payload)
                            except OSError:
                                pass

            def never_reads() -> None:
                ping = b'{"op":"ping"}\n' * 10_000
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                    try:
                        while not stop.is_set():
                            s.sendall(ping)
                    except OSError:
                        dropped.set()

            lateness: list[float] = []

            def tick(expected: float) -> None:
                lateness.append(loop.time() - expected)
                if not stop.is_set():
                    loop.call_later(0.02, tick, loop.time() + 0.02)

            threads = [threading.Thread(target=junk_sender), threading.Thread(target=never_reads)]
            for t in threads:
                t.start()
            loop.call_later(0.02, tick, loop.time() + 0.02)
            healthy = await Line.open(path)
            try:
                answered = 0
                deadline = loop.time() + 3.0
                while loop.time() < deadline or not dropped.is_set():
                    assert loop.time() < deadline + DEADLINE_S, "the client that never reads was not dropped"
                    assert (await healthy.ask({"op": "ping", "id": answered}))["id"] == answered
                    answered += 1
                    await asyncio.sleep(0.01)
            finally:
                stop.set()
                for t in threads:
                    await loop.run_in_executor(None, t.join, DEADLINE_S)
            healthy.close()
            assert answered > 50
            assert len(lateness) > 50
            # a blocked loop shows as seconds (or forever); 1 s leaves room for a loaded machine's scheduling
            assert max(lateness) < 1.0, f"the loop stalled: a timer fired {max(lateness):.3f}s late"
            assert dropped.is_set()

    run(main(), timeout=60)


def test_idle_connections_close_and_the_connection_cap_holds(sockdir: str) -> None:
    """A connection idle past idle_timeout_s is closed while a worker's subscribed (hello) connection
    stays open and still receives pushes; beyond its pool's cap a new connection gets an error."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock"), idle_timeout_s=0.3, max_connections=3,
                           max_admin_connections=3) as h:
            tok = h.add_worker("w-0", os.getpid())
            sub = await Line.open(h.server.path)
            assert (await sub.ask({"op": "hello", "worker": "w-0", "token": tok}))["ok"]
            idle = await Line.open(h.server.path)
            assert await idle.closed(timeout=5.0)
            assert h.server.send_reclaim("w-0", "still there?") == 1
            assert (await sub.recv()) == {"event": "reclaim", "reason": "still there?"}
            sub.close()
        # the cap, with an idle timeout no stall of the test can reach (an idle close would free a place)
        async with Harness(os.path.join(sockdir, "c.sock"), idle_timeout_s=600, max_connections=3,
                           max_admin_connections=3) as h:
            others = [await Line.open(h.server.path) for _ in range(3)]
            for c in others:
                assert (await c.ask({"op": "ping"}))["ok"]
            extra = await Line.open(h.server.path)
            reply = await extra.recv()
            assert reply["ok"] is False and "too many administrator connections" in reply["error"]
            for c in (*others, extra):
                c.close()

    run(main())


def test_blank_lines_do_not_keep_an_idle_connection_open(sockdir: str) -> None:
    """The idle clock restarts only on a request: a client that sends a blank line every 50 ms (or trickles
    bytes) is closed after idle_timeout_s all the same, while one that sends requests stays."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock"), idle_timeout_s=0.5) as h:
            blank = await Line.open(h.server.path)
            busy = await Line.open(h.server.path)

            async def client(line: Line, payload: bytes) -> None:
                """A client's own pace (not synchronisation): something every 50 ms."""
                while True:
                    line.writer.write(payload)
                    await line.writer.drain()
                    await asyncio.sleep(0.05)

            noise = asyncio.ensure_future(client(blank, b"\n"))
            pings = asyncio.ensure_future(client(busy, b'{"op": "ping"}\n'))
            try:
                assert await blank.closed(timeout=3.0)  # closed although bytes kept coming
                for _ in range(20):  # 1 s of answered pings: twice the idle timeout, still open
                    assert (await busy.recv())["ok"]
            finally:
                noise.cancel()
                pings.cancel()
            busy.close()

    run(main())


def _as_user(uid: int, body: Any) -> tuple[int, int, int]:
    """Fork a child that drops to ``uid`` (no supplementary group) and runs ``body(report_fd, wait_fd)``;
    returns (pid, read end of its reports, write end that releases it). The child only uses sockets."""
    rep_r, rep_w = os.pipe()
    rel_r, rel_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(rep_r)
            os.close(rel_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            body(rep_w, rel_r)
            code = 0
        finally:
            os._exit(code)
    os.close(rep_w)
    os.close(rel_r)
    return pid, rep_r, rel_w


@pytest.mark.root
def test_one_user_cannot_lock_out_root_or_the_workers(sockdir: str) -> None:
    """An unprivileged user opens connections until refused: it gets its own cap (max_per_uid), no more.
    With the users' pool full, root's status request and a worker's trial report (from another uid) still
    succeed, and a third user is refused with a clear error."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    path = os.path.join(sockdir, "c.sock")

    def hog(rep: int, rel: int) -> None:
        held, refused = [], 0
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE_S)
            s.connect(path)
            s.sendall(b'{"op": "ping"}\n')
            reply = json.loads(s.makefile().readline())
            if reply.get("ok"):
                held.append(s)
            else:
                refused += 1
                s.close()
        os.write(rep, f"{len(held)} {refused}\n".encode())
        os.read(rel, 1)  # hold them until released

    def worker(token: str):
        def body(rep: int, rel: int) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE_S)
            s.connect(path)
            s.sendall(json.dumps({"op": "trial_start", "worker": "w-0", "token": token, "name": "t1"}).encode()
                      + b"\n")
            os.write(rep, s.makefile().readline().encode())
        return body

    def stranger(rep: int, rel: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE_S)
        s.connect(path)
        os.write(rep, s.makefile().readline().encode())  # refused at once, before any request

    def read_line(fd: int) -> str:
        with os.fdopen(fd) as f:
            return f.readline()

    async def main() -> None:
        async with Harness(path, max_per_uid=4, max_connections=4) as h:
            os.chmod(path, 0o666)
            loop = asyncio.get_running_loop()
            hog_pid, hog_rep, hog_rel = _as_user(65534, hog)
            try:
                held, refused = map(int, (await loop.run_in_executor(None, read_line, hog_rep)).split())
                assert (held, refused) == (4, 4)
                admin = await Line.open(h.server.path)
                assert (await admin.ask({"op": "status"}))["ok"]
                token = h.add_worker("w-0", -1)
                wpid, wrep, wrel = _as_user(65533, worker(token))
                h.pids["w-0"] = {wpid}
                reply = json.loads(await loop.run_in_executor(None, read_line, wrep))
                assert reply == {"ok": True}, reply
                assert (await h.next_event()).kind == "start"
                spid, srep, srel = _as_user(65532, stranger)
                refusal = json.loads(await loop.run_in_executor(None, read_line, srep))
                assert refusal["ok"] is False and "too many connections" in refusal["error"]
                for fd in (wrel, srel):
                    os.close(fd)
                for p in (wpid, spid):
                    await loop.run_in_executor(None, os.waitpid, p, 0)
                admin.close()
            finally:
                os.close(hog_rel)
                await loop.run_in_executor(None, os.waitpid, hog_pid, 0)

    run(main())


def test_replies_are_strict_json(sockdir: str) -> None:
    """NaN, Infinity and -Infinity in a request are refused as not JSON; an id that is not a finite number
    or a short string is not echoed: every reply parses with a strict JSON parser."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock")) as h:
            c = await Line.open(h.server.path)
            for raw in (b'{"op": "ping", "id": NaN}\n', b'{"op": "ping", "id": Infinity}\n',
                        b'{"op": "ping", "id": 1e400}\n', b'{"op": "ping", "id": "%s"}\n' % (b"x" * 1000)):
                c.writer.write(raw)
                await c.writer.drain()
                line = await asyncio.wait_for(c.reader.readline(), DEADLINE_S)
                reply = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line!r}"))
                assert "id" not in reply, reply
            assert (await c.ask({"op": "ping", "id": 7}))["id"] == 7
            c.close()

    run(main())


# ---------------------------------------------------------------------------
# pushes, lifecycle


def test_send_reclaim_reaches_only_the_workers_subscribed_connections(sockdir: str) -> None:
    """send_reclaim writes {"event": "reclaim"} to the worker's hello'd connections and returns how many;
    a connection that did not say hello, and other workers' connections, get nothing; revoke() closes
    the subscribed connection."""

    async def main() -> None:
        async with Harness(os.path.join(sockdir, "c.sock")) as h:
            tok = h.add_worker("w-0", os.getpid())
            tok1 = h.add_worker("w-1", os.getpid())
            assert h.server.send_reclaim("w-0", "memory") == 0
            sub = await Line.open(h.server.path)
            hello = await sub.ask({"op": "hello", "worker": "w-0", "token": tok, "id": 1})
            assert hello == {"ok": True, "worker": "w-0", "incarnation": 1, "id": 1}
            other = await Line.open(h.server.path)
            assert (await other.ask({"op": "hello", "worker": "w-1", "token": tok1}))["ok"]
            plain = await Line.open(h.server.path)
            assert (await plain.ask({"op": "trial_start", "worker": "w-0", "token": tok}))["ok"]
            assert h.server.send_reclaim("w-0", "rule reclaim-early: worker.memory > 70%") == 1
            assert (await sub.recv()) == {"event": "reclaim", "reason": "rule reclaim-early: worker.memory > 70%"}
            assert (await plain.ask({"op": "ping", "id": 2})) == {"ok": True, "id": 2}  # nothing pushed there
            assert (await other.ask({"op": "ping", "id": 3})) == {"ok": True, "id": 3}
            h.server.revoke("w-0")
            assert await sub.closed()
            assert h.server.send_reclaim("w-0", "gone") == 0
            for c in (sub, other, plain):
                c.close()

    run(main())


def test_start_replaces_a_stale_socket_and_refuses_a_live_one(sockdir: str) -> None:
    """start() removes a socket file nobody listens on, refuses to take over one a live server holds or
    a path that is not a socket, and close() unlinks only its own socket."""

    async def main() -> None:
        path = os.path.join(sockdir, "c.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens
        async with Harness(path):
            c = await Line.open(path)
            assert (await c.ask({"op": "ping"}))["ok"]
            with pytest.raises(ControlError, match="in use"):
                await Harness(path).server.start()
            c.close()
        assert not os.path.exists(path)
        Path(path).write_text("not a socket")
        with pytest.raises(ControlError, match="not a socket"):
            await Harness(path).server.start()

    run(main())
