"""The actor's and the observer's new reach into the kernel, with real processes: OOM scores of protected
processes and candidates, process_mrelease after SIGKILL, memguard's short PSI average and the kernel PSI
trigger, and who may join the daemon as an ad-hoc worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from memguard.act.adhoc import JoinRefused, check_join, job_name
from memguard.act.oomscore import CANDIDATE_OOM_SCORE_ADJ, PROTECTED_OOM_SCORE_ADJ, OomScores, write_oom_score_adj
from memguard.act.process import start_time
from memguard.act.reaper import MemoryReleaser
from memguard.model import ProtectedProcess, is_known
from memguard.sense.psi import RecentPressure, parse_totals

from daemonkit import Daemon, write_config

MiB = 1024**2


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def test_protected_processes_get_the_lowest_score_or_one_clear_refusal():
    """A protected process is lowered to -1000 where the kernel allows it; where it refuses (no
    CAP_SYS_RESOURCE: lowering below the current score is EACCES), one warning names the process and the
    score it keeps, and a second protected process does not repeat it. Each process is handled once."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change another process's OOM score")
    a, b = _sleeper(), _sleeper()
    try:
        scores = OomScores()
        notes = scores.protect([ProtectedProcess(a.pid, start_time(a.pid), "sshd", _adj(a.pid))])
        if _adj(a.pid) == PROTECTED_OOM_SCORE_ADJ:
            assert [n.event for n in notes] == ["oom_protect"] and "-1000" in notes[0].reason
        else:
            assert [n.event for n in notes] == ["oom_protect_refused"], notes
            assert f"sshd (pid {a.pid}) stays at" in notes[0].reason and "CAP_SYS_RESOURCE" in notes[0].reason
            again = scores.protect([ProtectedProcess(b.pid, start_time(b.pid), "sshd", _adj(b.pid))])
            assert again == [], "the refusal was said twice"
        assert scores.protect([ProtectedProcess(a.pid, start_time(a.pid), "sshd", 0)]) == []
    finally:
        a.kill(), b.kill(), a.wait(), b.wait()


def test_candidates_are_raised_never_lowered_and_a_reused_pid_is_never_touched():
    """A candidate is raised to 500; one already higher keeps its score; a write with the wrong start time
    (the pid now names another process) changes nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change another process's OOM score")
    a, b, c = _sleeper(), _sleeper(), _sleeper()
    try:
        scores = OomScores()
        scores.raise_candidate(a.pid, start_time(a.pid), "job")
        assert _adj(a.pid) == CANDIDATE_OOM_SCORE_ADJ
        with open(f"/proc/{b.pid}/oom_score_adj", "w") as f:
            f.write("800")
        scores.raise_candidate(b.pid, start_time(b.pid), "job")
        assert _adj(b.pid) == 800
        before, err = write_oom_score_adj(c.pid, start_time(c.pid) + 1, 900)
        assert err != 0 and _adj(c.pid) == 0
    finally:
        for p in (a, b, c):
            p.kill()
            p.wait()


def test_a_killed_process_memory_is_reaped_with_process_mrelease():
    """A process killed through a pinned pidfd has its memory reaped by the releaser's thread, which reports
    it (or says once that the kernel has no process_mrelease)."""
    p = subprocess.Popen([sys.executable, "-c", "b = bytearray(300 << 20)\nb[::4096] = b'1' * (300 << 8)\n"
                                                "print('ready', flush=True)\nimport time; time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"

    async def main():
        loop = asyncio.get_running_loop()
        got: asyncio.Queue = asyncio.Queue()
        releaser = MemoryReleaser(got.put_nowait)
        releaser.start(loop)
        try:
            start = start_time(p.pid)
            assert releaser.kill([(p.pid, start)], "test-job") == [(p.pid, start)]
            return await asyncio.wait_for(got.get(), 10)
        finally:
            releaser.close()

    try:
        note = asyncio.run(main())
    finally:
        p.kill()
        p.wait()
    assert note.event in ("memory_released", "memory_release_unsupported"), note
    if note.event == "memory_released":
        # Reaped, or (the victim won the race) already letting go of its memory as it exits.
        assert [p.pid] in (note.fields["pids"], note.fields["already_freeing"]) and note.fields["release_ms"] >= 0


def test_recent_pressure_is_the_stall_share_of_about_the_last_second():
    """memguard's short PSI average is the growth of the kernel's total stall time over the readings of about
    the last second: 500 ms stalled in 1 s reads 50 %; unknown before readings span 0.3 s or without totals."""
    r = RecentPressure()
    some, _ = r.add(0.0, (1_000_000, 500_000))
    assert not is_known(some)
    some, full = r.add(0.5, (1_100_000, 500_000))
    assert some == pytest.approx(20.0) and full == 0.0
    some, full = r.add(1.0, (1_500_000, 700_000))
    assert some == pytest.approx(50.0) and full == pytest.approx(20.0)
    some, _ = r.add(1.6, (1_500_000, 700_000))  # the window moved past the stalls: calm again
    assert some == pytest.approx(0.0, abs=0.01) or some < 50
    assert not is_known(RecentPressure().add(0.0, (None, None))[0])
    assert parse_totals(b"some avg10=0.00 avg60=0.00 avg300=0.00 total=123\n"
                        b"full avg10=0.00 avg60=0.00 avg300=0.00 total=45\n") == (123, 45)


def test_join_checks_who_may_register_what():
    """root may register any live process; anyone else only a process of their own that is themselves or
    one of their descendants; a cgroup that does not hold the process is ignored, with a note; garbage is
    refused with a reason."""
    me = (os.getpid(), os.getuid(), os.getgid())
    child = _sleeper()
    try:
        if os.geteuid() == 0:
            pid, start, cg, note = check_join(child.pid, me, None)
            assert pid == child.pid and start == start_time(child.pid) and cg is None and note == ""
            with pytest.raises(JoinRefused, match="does not belong to you"):
                check_join(child.pid, (os.getpid(), 65534, 65534), None)
        with pytest.raises(JoinRefused, match="no running process"):
            check_join(2 ** 22 + 7, me, None)
        for bad in ("12", True, -5, 1, None):
            with pytest.raises(JoinRefused, match="field 'pid'"):
                check_join(bad, me, None)
        with pytest.raises(JoinRefused, match="under /sys/fs/cgroup"):
            check_join(child.pid, me, "/etc/../sys/fs/cgroup")
        *_, cg, note = check_join(child.pid, me, "/sys/fs/cgroup/no-such-cgroup")
        assert cg is None and "ignored" in note
    finally:
        child.kill()
        child.wait()
    assert job_name("/usr/bin/python3") == "python3" and job_name("my job!") == "my-job"
    assert job_name("") == "job" and len(job_name("x" * 300)) == 48


def _runs(python: str, user: int) -> bool:
    try:
        return subprocess.run([python, "-c", "pass"], user=user, extra_groups=[], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _ask(sock_path: str, request: object, user: int | None = None) -> dict:
    """One request over the control socket from a process of ``user`` (None: this one's)."""
    code = ("import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(sys.argv[2].encode() + b'\\n')\n"
            "print(s.makefile().readline(), end='')\n")
    python = sys.executable
    if user is not None:  # the venv's interpreter may live where that user cannot go
        python = next((p for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
                       if _runs(p, user)), "")
        if not python:
            pytest.skip(f"no Python interpreter that uid {user} may run")
    out = subprocess.run([python, "-c", code, sock_path, json.dumps(request)], capture_output=True,
                         text=True, timeout=30, user=user, extra_groups=[] if user is not None else None)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_job_ops_refuse_bad_requests_and_strangers(tmp_path):
    """Over a real daemon's control socket: a join of someone else's process by an unprivileged user, of a
    process that does not exist, with malformed fields, an exited for no such worker, an admit with a bad
    size: each answered with an error that says what is wrong, and the daemon keeps running."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    import tempfile

    cfg = write_config(tmp_path, "poll_interval: 500ms\nlog: {format: json, level: info}\n", {})
    runtime = tempfile.mkdtemp(prefix="memguard-test-run-")  # a directory every user can reach
    os.chmod(runtime, 0o755)
    d = Daemon(cfg, extra=["--runtime-dir", runtime])
    victim = _sleeper()
    try:
        d.event("started")
        sock = os.path.join(runtime, "control.sock")
        r = _ask(sock, {"op": "join", "pid": victim.pid, "command": ["sleep"]}, user=65534)
        assert r["ok"] is False and "does not belong to you" in r["error"]
        assert _ask(sock, {"op": "join", "pid": 2 ** 22 + 7})["error"].startswith("no running process")
        assert "field 'command'" in _ask(sock, {"op": "join", "pid": victim.pid, "command": "sleep"})["error"]
        assert "field 'priority'" in _ask(sock, {"op": "join", "pid": victim.pid, "priority": 1e9})["error"]
        assert "ticket" in _ask(sock, {"op": "join", "pid": victim.pid, "ticket": "t999"})["error"]
        assert "ad-hoc worker" in _ask(sock, {"op": "exited", "worker": "nobody-1", "returncode": 0})["error"]
        assert "need_bytes" in _ask(sock, {"op": "admit", "need_bytes": "lots"})["error"]
        ok = _ask(sock, {"op": "join", "pid": victim.pid, "command": ["sleep", "120"], "name": "sleepy"})
        assert ok["ok"] is True and ok["worker"] == f"sleepy-{victim.pid}"
        assert "joined already" in _ask(sock, {"op": "join", "pid": victim.pid, "name": "sleepy"})["error"]
        d.event("joined", worker=f"sleepy-{victim.pid}")
        victim.kill()
        victim.wait()
        d.event("exit", worker=f"sleepy-{victim.pid}")
        assert d.proc.poll() is None
    finally:
        victim.kill()
        victim.wait()
        assert d.stop() == 0
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)
