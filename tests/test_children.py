"""ChildSupervisor and the sentinel, with real processes and real signals.

No mocks and no sleeping to synchronise: tests await the supervisor's own
callbacks under asyncio deadlines, and check that a process is gone with a
pidfd (readable once it has exited; a zombie counts as gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from memguard.act import children as children_mod
from memguard.act.children import LINE_MAX, ChildSupervisor, SpawnError
from memguard.act.process import start_time
from memguard.model import Exited, Spawned, SpawnFailed, WorkerEvent

PY = sys.executable
HELPERS = Path(__file__).parent / "helpers"
FORKER = str(HELPERS / "child_forker.py")
DAEMON = str(HELPERS / "child_daemon.py")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


# ---------------------------------------------------------------------------
# helpers


def run(coro, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder:
    """Collects what the supervisor reports; lets a test await a condition on it."""

    def __init__(self) -> None:
        self.events: list[WorkerEvent] = []
        self.lines: list[tuple[str, str, str]] = []
        self._changed = asyncio.Event()

    def on_event(self, event: WorkerEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def on_output(self, worker: str, stream: str, line: str) -> None:
        self.lines.append((worker, stream, line))
        self._changed.set()

    async def until(self, cond: Callable[[], object], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def exited(self, worker: str) -> Exited | None:
        for e in self.events:
            if isinstance(e, Exited) and e.worker == worker:
                return e
        return None

    async def exit_of(self, worker: str, timeout: float = 5.0) -> Exited:
        await self.until(lambda: self.exited(worker), timeout)
        e = self.exited(worker)
        assert e is not None
        return e

    async def stdout_int(self, worker: str, timeout: float = 5.0) -> int:
        def first() -> int | None:
            for w, s, line in self.lines:
                if w == worker and s == "stdout" and line.strip().isdigit():
                    return int(line)
            return None

        await self.until(first, timeout)
        value = first()
        assert value is not None
        return value


@contextlib.asynccontextmanager
async def supervised(**kwargs) -> AsyncIterator[tuple[ChildSupervisor, Recorder]]:  # type: ignore[no-untyped-def]
    """A started supervisor; on the way out, kills and awaits every live worker."""
    rec = Recorder()
    sup = ChildSupervisor(rec.on_event, rec.on_output, **kwargs)
    await sup.start()
    try:
        yield sup, rec
    finally:
        for worker, (pid, inc) in sup.live().items():
            sup.signal(worker, pid, inc, signal.SIGKILL)
        await rec.until(lambda: not sup.live(), 5)
        await sup.close()


def gone(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (zombie or reaped)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


async def until(cond: Callable[[], bool], timeout: float) -> None:
    """Await a condition the kernel gives no event for (e.g. a zombie reaped)."""

    async def wait() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


def kill_and_reap(pidfds: dict[int, int]) -> None:
    """SIGKILL every listed process still alive; reap those that are our children."""
    for pid, fd in pidfds.items():
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    for pid, fd in pidfds.items():
        gone(fd, 5)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        os.close(fd)


# ---------------------------------------------------------------------------
# tests


def test_output_lines_exit_code_and_last_lines() -> None:
    """Each output line reaches on_output with its stream, the exit code is
    reported, and Exited.last_lines holds the lines written just before exit."""
    code = "import sys; print('one'); print('two'); print('err', file=sys.stderr); sys.exit(3)"

    async def main() -> None:
        async with supervised() as (sup, rec):
            pid = sup.spawn("w", 1, [PY, "-c", code], ENV, None, None, None, None)
            assert rec.events[0] == Spawned("w", 1, pid, rec.events[0].at)
            e = await rec.exit_of("w")
            assert (e.pid, e.incarnation, e.returncode, e.signal) == (pid, 1, 3, None)
            assert sorted(e.last_lines) == ["err", "one", "two"]
            assert e.last_lines.index("one") < e.last_lines.index("two")
            assert sorted(rec.lines) == [("w", "stderr", "err"), ("w", "stdout", "one"), ("w", "stdout", "two")]
            assert sup.live() == {}
            assert sup.last_lines("w") == e.last_lines

    run(main())


def test_partial_and_overlong_lines() -> None:
    """A \\r\\n line loses its \\r, a line over LINE_MAX is truncated once (its
    rest dropped), and a last line without newline is delivered at EOF."""
    code = (
        "import sys; w = sys.stdout.buffer.write;"
        f"w(b'a\\r\\n'); w(b'x' * {LINE_MAX * 2} + b'\\n'); w(b'after\\n'); w(b'tail')"
    )

    async def main() -> None:
        async with supervised() as (sup, rec):
            sup.spawn("w", 1, [PY, "-c", code], ENV, None, None, None, None)
            await rec.exit_of("w")
            await rec.until(lambda: any(line == "tail" for _, _, line in rec.lines))
            lines = [line for _, _, line in rec.lines]
            assert lines[0] == "a"
            assert lines[1].startswith("x" * LINE_MAX) and lines[1].endswith("truncated by memguard]")
            assert len(lines[1]) < LINE_MAX + 100
            assert lines[2:] == ["after", "tail"]

    run(main())


def test_signal_terminates_and_refuses_wrong_incarnation() -> None:
    """signal() delivers SIGTERM to the worker (Exited.signal == 15) and refuses,
    returning False, a wrong incarnation, a wrong pid, or an unknown worker;
    the worker stays alive after a refused signal."""

    async def main() -> None:
        async with supervised() as (sup, rec):
            pid = sup.spawn("w", 7, ["sleep", "30"], ENV, None, None, None, None)
            assert sup.live() == {"w": (pid, 7)}
            assert sup.signal("w", pid, 8, signal.SIGTERM) is False
            assert sup.signal("w", 1, 7, signal.SIGTERM) is False
            assert sup.signal("other", pid, 7, signal.SIGTERM) is False
            fd = os.pidfd_open(pid)
            try:
                assert not gone(fd, 0.2)
            finally:
                os.close(fd)
            assert sup.signal("w", pid, 7, signal.SIGTERM) is True
            e = await rec.exit_of("w")
            assert (e.signal, e.returncode, e.pid) == (signal.SIGTERM, None, pid)
            assert sup.signal("w", pid, 7, signal.SIGKILL) is False  # reaped: refused

    run(main())


def test_session_env_and_cwd(tmp_path: Path) -> None:
    """The worker leads its own session and process group, its pid is the
    command's own (setpriv execs in place), its environment is exactly the
    one passed, its stdin is /dev/null, and cwd is applied."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MEMGUARD_TEST": "a b=c"}
    code = (
        "import json, os; print(json.dumps({'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0),"
        " 'env': dict(os.environ), 'cwd': os.getcwd(), 'stdin': os.readlink('/proc/self/fd/0')}))"
    )

    async def main() -> None:
        async with supervised() as (sup, rec):
            pid = sup.spawn("w", 1, [PY, "-I", "-c", code], env, str(tmp_path), None, None, None)
            e = await rec.exit_of("w")
            assert e.returncode == 0, e.last_lines
            seen = json.loads(e.last_lines[-1])
            assert seen["pid"] == seen["pgid"] == seen["sid"] == pid
            assert seen["env"] == env
            assert seen["cwd"] == str(tmp_path)
            assert seen["stdin"] == "/dev/null"

    run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_user_drops_root_groups() -> None:
    """user='nobody' runs the worker as nobody with nobody's groups only:
    root's supplementary groups (and gid 0) are dropped."""
    pw = pwd.getpwnam("nobody")
    expected = sorted(set(os.getgrouplist("nobody", pw.pw_gid)))

    async def main() -> None:
        async with supervised() as (sup, rec):
            sup.spawn("w", 1, ["sh", "-c", "id -u; id -g; id -G"], ENV, "/", "nobody", None, None)
            e = await rec.exit_of("w")
            assert e.returncode == 0, e.last_lines
            uid, gid, groups = e.last_lines
            assert int(uid) == pw.pw_uid
            assert int(gid) == pw.pw_gid
            assert sorted(int(g) for g in groups.split()) == expected
            assert "0" not in groups.split()

    run(main())


def test_spawn_errors_are_clear(tmp_path: Path) -> None:
    """A missing command, a missing or non-directory cwd, an unknown user or
    group raise SpawnError naming the culprit, report SpawnFailed, and leave
    nothing running."""

    async def main() -> None:
        async with supervised() as (sup, rec):
            cases = [
                (["no-such-command-xyz"], None, None, None, "no-such-command-xyz"),
                (["./nope.sh"], str(tmp_path), None, None, "./nope.sh"),
                (["true"], str(tmp_path / "missing-dir"), None, None, "missing-dir"),
                (["true"], "/etc/hostname", None, None, "/etc/hostname"),
                (["true"], None, "no-such-user-xyz", None, "no-such-user-xyz"),
                (["true"], None, None, "no-such-group-xyz", "no-such-group-xyz"),
            ]
            for i, (argv, cwd, user, group, name) in enumerate(cases):
                with pytest.raises(SpawnError) as info:
                    sup.spawn("w", i, argv, ENV, cwd, user, group, None)
                assert name in str(info.value)
                failed = rec.events[-1]
                assert isinstance(failed, SpawnFailed) and failed.incarnation == i
                assert failed.error == str(info.value)
            assert sup.live() == {}
            assert not any(isinstance(e, Spawned) for e in rec.events)

    run(main())


def test_kill_reaches_escaped_descendant() -> None:
    """A grandchild that called setsid() escaped the worker's process group;
    once recorded with add_members, signal(SIGKILL) kills it with the worker."""

    async def main() -> None:
        async with supervised() as (sup, rec):
            pid = sup.spawn("w", 1, [PY, "-I", FORKER, "--setsid"], ENV, None, None, None, None)
            grandchild = await rec.stdout_int("w")
            gfd = os.pidfd_open(grandchild)
            try:
                st = start_time(grandchild)
                assert st is not None
                # The escape is real: a group kill alone would miss it.
                assert os.getpgid(grandchild) != pid
                sup.add_members("w", [(grandchild, st)])
                assert sup.signal("w", pid, 1, signal.SIGKILL) is True
                e = await rec.exit_of("w")
                assert e.signal == signal.SIGKILL
                assert gone(gfd, 2.0)
                # Reparented to us (subreaper) and reaped by the supervisor.
                await until(lambda: not os.path.exists(f"/proc/{grandchild}"), 3)
            finally:
                kill_and_reap({grandchild: gfd})

    run(main())


def test_orphans_are_reparented_and_reaped() -> None:
    """With subreaper on, a worker's child orphaned by the worker's exit is
    reparented to the daemon and reaped by it when it exits (no zombie).
    (Leftovers are not killed here: by default they die with the worker, and
    the sweep could reap the killed orphan before the test reads its parent.)"""

    async def main() -> None:
        async with supervised(kill_leftovers=False) as (sup, rec):
            sup.spawn("w", 1, [PY, "-I", FORKER, "--exit", "--child-exit-on-usr1"], ENV, None, None, None, None)
            child = await rec.stdout_int("w")
            cfd = os.pidfd_open(child)
            try:
                e = await rec.exit_of("w")
                assert e.returncode == 0
                stat = Path(f"/proc/{child}/stat").read_text()
                assert int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid()  # reparented to us
                signal.pidfd_send_signal(cfd, signal.SIGUSR1)  # now the orphan exits
                loop = asyncio.get_running_loop()
                exited = loop.create_future()
                loop.add_reader(cfd, lambda: exited.done() or exited.set_result(None))
                await asyncio.wait_for(exited, 5)
                loop.remove_reader(cfd)
                await until(lambda: not os.path.exists(f"/proc/{child}"), 3)
            finally:
                kill_and_reap({child: cfd})

    run(main())


@pytest.mark.parametrize("restart_sentinel", [False, True], ids=["sentinel", "restarted-sentinel"])
def test_daemon_sigkill_leaves_no_worker_alive(restart_sentinel: bool) -> None:
    """THE guarantee: when the daemon is killed with SIGKILL, promptly (a 5 s deadline,
    generous for a loaded machine) no worker and no worker's child is alive (pdeathsig kills the workers'
    main processes, the sentinel kills their groups). With a sentinel that
    died and was restarted, the new one was given every live group."""
    children_mod._set_subreaper(True)  # orphans come back to us: we can reap them
    pidfds: dict[int, int] = {}
    argv = [PY, DAEMON] + (["--restart-sentinel"] if restart_sentinel else [])
    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None
        p = select.poll()
        p.register(daemon.stdout, select.POLLIN)
        assert p.poll(15000), "the test daemon printed nothing"
        info = json.loads(daemon.stdout.readline())
        watched = info["workers"] + info["children"]
        for pid in watched + [info["sentinel"]]:
            pidfds[pid] = os.pidfd_open(pid)
        assert all(not gone(pidfds[pid], 0) for pid in watched)

        daemon.kill()
        daemon.wait()
        end = time.monotonic() + 5.0  # generous for a loaded machine
        survivors = [pid for pid in watched if not gone(pidfds[pid], max(0.0, end - time.monotonic()))]
        assert survivors == [], f"still alive 5 s after the daemon's SIGKILL: {survivors}"
        assert gone(pidfds[info["sentinel"]], 5), "the sentinel did not exit after EOF"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stdout.close()
        kill_and_reap(pidfds)
        children_mod._set_subreaper(False)


def test_clean_quit_spares_groups_and_oom_score_adj() -> None:
    """close() makes the sentinel quit cleanly: it exits without killing the
    registered groups. oom_score_adj is applied to the worker when given."""

    async def main() -> tuple[ChildSupervisor, int, int]:
        rec = Recorder()
        sup = ChildSupervisor(rec.on_event, rec.on_output)
        await sup.start()
        sentinel = sup.sentinel_pid
        assert sentinel is not None
        sfd = os.pidfd_open(sentinel)
        try:
            pid = sup.spawn("w", 1, ["sleep", "30"], ENV, None, None, None, 500)
            assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "500"
            wfd = os.pidfd_open(pid)
            await sup.close()
            assert gone(sfd, 0), "close() returned before the sentinel exited"
            assert not os.path.exists(f"/proc/{sentinel}"), "the sentinel was not reaped"
            return sup, pid, wfd
        finally:
            os.close(sfd)

    sup, pid, wfd = run(main())
    try:
        assert not gone(wfd, 0.3), "the sentinel's clean quit killed the worker"
    finally:
        os.killpg(pid, signal.SIGKILL)
        os.close(wfd)
        # After close() the supervisor no longer reaps: the Popen it kept does.
        sup._workers["w"].popen.wait(5)


def test_oom_score_adj_out_of_range_is_refused() -> None:
    """An oom_score_adj outside -1000..1000 is a SpawnError, and nothing starts."""

    async def main() -> None:
        async with supervised(sentinel=False) as (sup, rec):
            with pytest.raises(SpawnError, match="oom_score_adj"):
                sup.spawn("w", 1, ["sleep", "30"], ENV, None, None, None, 5000)
            assert sup.live() == {}

    run(main())


def test_restart_after_exit_keeps_tails_apart() -> None:
    """A worker may be spawned again once reaped (not while running); the new
    incarnation starts with an empty tail."""

    async def main() -> None:
        async with supervised() as (sup, rec):
            sup.spawn("w", 1, [PY, "-c", "print('first')"], ENV, None, None, None, None)
            await rec.exit_of("w")
            pid = sup.spawn("w", 2, ["sleep", "30"], ENV, None, None, None, None)
            with pytest.raises(SpawnError, match="still running"):
                sup.spawn("w", 3, ["sleep", "30"], ENV, None, None, None, None)
            assert sup.live() == {"w": (pid, 2)}
            assert sup.last_lines("w") == ()

    run(main())


def test_sentinel_eof_kills_registered_and_spares_reused() -> None:
    """The sentinel on its own: at EOF it SIGKILLs a registered group (all its
    members), a registered single pid and the pids of a registered cgroup
    (cgroup.procs fallback when there is no cgroup.kill), but spares a
    group whose leader's start time does not match (a reused pid)."""
    import tempfile

    procs: dict[str, subprocess.Popen[bytes]] = {}
    pidfds: dict[int, int] = {}
    sentinel: subprocess.Popen[bytes] | None = None
    member = 0
    children_mod._set_subreaper(True)  # the forker's child comes back to us to be reaped
    with tempfile.TemporaryDirectory() as cg:
        try:
            for name in ("single", "cgroup", "reused"):
                procs[name] = subprocess.Popen(["sleep", "30"], start_new_session=True)
            # A group of two: the forker and the child it forks (same group).
            procs["group"] = subprocess.Popen([PY, "-I", FORKER], stdout=subprocess.PIPE, start_new_session=True)
            out = procs["group"].stdout
            assert out is not None
            poller = select.poll()
            poller.register(out, select.POLLIN)
            assert poller.poll(10000)
            member = int(out.readline())
            out.close()
            for p in procs.values():
                pidfds[p.pid] = os.pidfd_open(p.pid)
            pidfds[member] = os.pidfd_open(member)
            Path(cg, "cgroup.procs").write_text(f"{procs['cgroup'].pid}\n")
            sentinel = subprocess.Popen(
                [PY, "-I", children_mod._SENTINEL_PATH], stdin=subprocess.PIPE, start_new_session=True
            )
            assert sentinel.stdin is not None
            g, s_, r = procs["group"].pid, procs["single"].pid, procs["reused"].pid
            sentinel.stdin.write(
                (
                    f"add {g} {start_time(g)}\n"
                    f"pid {s_} {start_time(s_)}\n"
                    f"add {r} {start_time(r) + 1}\n"  # not the process registered
                    f"cgroup {cg}\n"
                    "bogus line\n"
                ).encode()
            )
            sentinel.stdin.close()  # EOF: as if the daemon died
            assert sentinel.wait(5) == 0
            for name in ("group", "single", "cgroup"):
                assert gone(pidfds[procs[name].pid], 2), f"{name} survived the sentinel"
            assert gone(pidfds[member], 2), "the group's second member survived the sentinel"
            assert not gone(pidfds[r], 0.2), "the sentinel killed a group it had not registered"
            assert not Path(cg, "cgroup.kill").exists()
        finally:
            if sentinel is not None and sentinel.poll() is None:
                sentinel.kill()
                sentinel.wait()
            for p in procs.values():
                p.kill()
                p.wait()
            if member:
                kill_and_reap({member: pidfds.pop(member)})
            for fd in pidfds.values():
                os.close(fd)
            children_mod._set_subreaper(False)


def test_without_setpriv_the_pid_is_still_the_worker() -> None:
    """Without setpriv the command is started directly (the sentinel alone
    covers a dead daemon); the pid, group and errors are the same."""

    async def main() -> None:
        async with supervised() as (sup, rec):
            pid = sup.spawn("w", 1, [PY, "-I", "-c", "import os; print(os.getpid(), os.getpgid(0))"], ENV, None, None, None, None)
            e = await rec.exit_of("w")
            assert e.last_lines == (f"{pid} {pid}",)
            with pytest.raises(SpawnError, match="no-such-command-xyz"):
                sup.spawn("x", 1, ["no-such-command-xyz"], ENV, None, None, None, None)

    saved = children_mod._SETPRIV
    children_mod._SETPRIV = None
    try:
        run(main())
    finally:
        children_mod._SETPRIV = saved
