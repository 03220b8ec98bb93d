"""``memguard health`` (commands/health.py): node-problem-detector's plugin contract against a real daemon.

Exit 0 and one OK line while every worker runs; 1 and a line naming the
failed worker once its restart budget is spent; 2 when the daemon cannot be
asked. The assessment itself is a pure function of the status reply.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from memguard.commands.health import OK, PROBLEM, UNKNOWN, assess

from daemonkit import MEMGUARD, REPO, Daemon, make_cgroup, worker_cmd, write_config

GiB = 1024**3


def scope(active: bool = False) -> dict:
    return {"kind": "host", "available_bytes": 8 * GiB, "gauges": [
        {"name": "memory", "marks": [{"rule": "low", "action": "block", "active": active}]}]}


def test_assess_names_problems_most_serious_first():
    """Failed workers, a kernel OOM kill inside the window and a firing system rule are problems, in that
    order; an OOM kill older than the window is not; a reply without a reading is unknown."""
    now = 10_000.0
    ok = {"scope": scope(), "workers": {"a-0": {"phase": "running"}}, "events": [
        {"time": now - 3600, "event": "exit", "cause": "host_oom", "kernel_oom": True, "worker": "a-0"}]}
    assert assess(ok, now) == (OK, "memguard OK: 1 running, 0 failed, 8GiB available (host)")
    bad = {"scope": scope(active=True), "workers": {"a-0": {"phase": "failed"}, "b-0": {"phase": "running"}},
           "events": [{"time": now - 60, "event": "exit", "cause": "host_oom", "kernel_oom": True, "worker": "b-0"},
                      {"time": now - 30, "event": "kernel_oom_kill"}]}
    code, line = assess(bad, now)
    assert code == PROBLEM
    assert line == ("memguard PROBLEM: 1 worker(s) failed (a-0); kernel OOM kill(s) in the last 10m (b-0); "
                    "memory short: low (block) firing")
    assert assess({"workers": {}}, now)[0] == UNKNOWN


def health(sock) -> tuple[int, list[str]]:
    out = subprocess.run(MEMGUARD + ["health", "--socket", str(sock)], capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    return out.returncode, out.stdout.splitlines()


@pytest.fixture
def memcg():
    cg = make_cgroup(2 * GiB)
    yield cg
    cg.cleanup()


def test_health_against_a_running_daemon(tmp_path, memcg):
    """OK (0) with the running count while workers run; PROBLEM (1) naming the worker once a crashing one is
    failed; UNKNOWN (2) once the daemon is gone. Always exactly one line."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {
        "calm": f"name: calm\ncommand: {worker_cmd()}\n"})
    d = Daemon(cfg, cgroup=memcg)
    sock = cfg.parent / "run" / "control.sock"
    try:
        d.event("spawn", worker="calm-0", timeout=30)
        code, lines = health(sock)
        assert code == OK and len(lines) == 1
        assert lines[0].startswith("memguard OK: 1 running, 0 failed, ") and lines[0].endswith("available (host)")
        (cfg.parent / "workloads.d" / "crash.yaml").write_text(
            "name: crash\ncommand: [sh, -c, 'exit 3']\nrestart: {backoff: 0.1s, budget: 1/10m}\n")
        d.proc.send_signal(signal.SIGHUP)
        d.event("failed", worker="crash-0", timeout=30)
        code, lines = health(sock)
        assert (code, lines) == (PROBLEM, ["memguard PROBLEM: 1 worker(s) failed (crash-0)"])
    finally:
        assert d.stop() == 0
    code, lines = health(sock)
    assert code == UNKNOWN and len(lines) == 1 and lines[0].startswith("memguard UNKNOWN: cannot talk to memguard")
