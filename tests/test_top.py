"""``memguard top`` (commands/top.py) and the status reply it reads (report/status.py).

The frame is a pure function of the daemon's reply, tested directly; the
reply is tested on the real pump in virtual time; and the whole command
runs for real in tmux against a running daemon (send-keys, capture-pane).
"""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from memguard.commands.top import View, bar, frame_text, render, sparkline
from memguard.daemon import Daemon as PumpDaemon
from memguard.policy import DaemonPolicy
from memguard.report.reporter import Reporter
from memguard.testing import FakeEffects, FakeObserver, GiB, MiB, RecordingLog, VirtualClock

from corekit import rule, workload
from daemonkit import Daemon, make_cgroup, worker_cmd, write_config
from tmuxkit import Pane


def reply(**workers) -> dict:
    return {
        "ok": True, "status": "2 running, 0 blocked, 0 failed, 6GiB available (host)",
        "scope": {"gauges": [
            {"name": "memory", "value": 18 * GiB, "max": 24 * GiB, "unit": "bytes",
             "marks": [{"at": 20 * GiB, "rule": "low", "action": "block", "active": False},
                       {"at": 22 * GiB, "rule": "crit", "action": "kill", "active": True}]},
            {"name": "psi some", "value": 3.5, "max": 100, "unit": "percent", "marks": []}]},
        "workers": workers, "events": [
            {"time": 0.0, "level": "warning", "event": "kill", "worker": "a-0", "message": "a-0 (pid 10): kill"}],
    }


def worker(phase="running", memory=300 * MiB, limit=1 * GiB, **kw) -> dict:
    return {"phase": phase, "pid": 10, "memory_bytes": memory, "limit_bytes": limit, "admission": "open",
            "trials": 3, "restarts_in_window": 0, "memory_history": [100, 200, 300], "growth_bytes_per_s": 2 * MiB,
            "memory_marks": [], "last_event": {"event": "spawn", "message": "start"}, **kw}


# ---------------------------------------------------------------------------
# the frame


def test_frame_shows_gauges_with_marks_and_each_worker():
    """The memory bar is filled to used/total with | at a rule's threshold and ! at one that fires; each worker
    line has its name, state, memory, limit, share, sparkline, growth and last event; events follow."""
    text = frame_text(reply(**{"a-0": worker(), "b-0": worker(phase="failed", memory=None, limit=None)}), 160,
                      View(), host="box", now=0.0)
    mem = next(line for line in text.splitlines() if line.startswith("memory"))
    inner = mem[mem.index("[") + 1: mem.index("]")]
    assert inner.count("|") == 1 and inner.count("!") == 1 and inner.index("|") < inner.index("!")
    assert "18GiB / 24GiB" in mem and "! kill at 22GiB" in mem
    a = next(line for line in text.splitlines() if line.startswith("a-0"))
    assert re.search(r"a-0\s+running\s+10\s+300MiB\s+1GiB\s+29%", a) and "+2MiB/s" in a and "spawn: start" in a
    assert "▁" in a and "█" in a
    assert re.search(r"b-0\s+failed", text) and "RECENT EVENTS" in text and "a-0 (pid 10): kill" in text


def test_small_and_tiny_terminals_degrade():
    """Under 60 columns only name, state and memory are drawn; under 20x4 the view says it is too small;
    --ascii sparklines use no Unicode."""
    lines = render(reply(**{"a-0": worker()}), 40, 10, View())
    text = "\n".join("".join(s.text for s in line) for line in lines)
    assert "a-0" in text and "running" in text and "300MiB" in text and "memory [" not in text
    assert max(len("".join(s.text for s in line)) for line in lines) <= 40 and len(lines) == 10
    assert "too small" in "".join(s.text for s in render(reply(), 15, 3, View())[0])
    assert sparkline([1, 5, 9], 5, unicode=False) == "  _+@"


def test_bar_marks_and_unknowns():
    """A bar without a known value is question marks, never a guess; a mark at the end stays inside."""
    assert "".join(s.text for s in bar(None, 10, [], 7)) == "[?????]"
    assert "".join(s.text for s in bar(5, 10, [{"at": 10, "active": False}], 12)) == "[#####....|]"


# ---------------------------------------------------------------------------
# the reply, from the real pump in virtual time


def test_status_reply_carries_limits_history_marks_and_events():
    """After a few seconds the status reply has, per worker, its workload's limit, a memory history with one
    point per full tick, the marks of its memory rules; the scope's memory gauge with the system rule's
    threshold; the recent events (spawns first)."""
    async def main():
        clock = VirtualClock()
        observer, effects, log = FakeObserver(total=24 * GiB, available=20 * GiB), FakeEffects(clock=clock.now), \
            RecordingLog()
        pol = DaemonPolicy(workloads=(workload("w", replicas=2, memory=1 * GiB,
                                               rules=(rule("worker.memory > 80%", "restart"),)),),
                           rules=(rule("memory.available < 10%", "block", "system"),))
        daemon = PumpDaemon(pol, observer, effects, Reporter(log=log), clock, capture_signals=False)
        task = asyncio.ensure_future(daemon.run())
        await clock.advance(5.0)
        fut = daemon.admin({"op": "status"})
        await clock.advance(0.1)
        got = fut.result()
        daemon.post(__import__("memguard.model", fromlist=["Shutdown"]).Shutdown("test"))
        await clock.advance(1.0)
        await task
        return got

    got = asyncio.run(asyncio.wait_for(main(), 60))
    w = got["workers"]["w-0"]
    assert w["limit_bytes"] == 1 * GiB and w["workload"] == "w" and w["memory_bytes"] == 100 * MiB
    assert 4 <= len(w["memory_history"]) <= 7 and set(w["memory_history"]) == {100 * MiB}
    assert [m["at"] for m in w["memory_marks"]] == [0.8 * GiB] and w["memory_marks"][0]["action"] == "restart"
    mem = got["scope"]["gauges"][0]
    assert mem["name"] == "memory" and mem["value"] == 4 * GiB and mem["max"] == 24 * GiB
    assert mem["marks"][0]["at"] == pytest.approx(24 * GiB * 0.9) and mem["marks"][0]["active"] is False
    assert [e["event"] for e in got["events"] if e["event"] == "spawn"] == ["spawn", "spawn"]
    assert w["last_event"]["event"] == "spawn"


# ---------------------------------------------------------------------------
# for real, in tmux


@pytest.fixture
def memcg():
    cg = make_cgroup(2 * GiB)
    yield cg
    cg.cleanup()


def _row(screen: str, name: str) -> str:
    for line in screen.splitlines():
        if line.startswith(name + " "):
            return line
    return ""


def test_top_in_tmux_shows_workers_follows_a_restart_and_quits(tmp_path, memcg):
    """memguard top in a real terminal (tmux) against a running daemon: every worker's name, state and memory
    are on screen; r then y on the selected worker restarts it through the daemon and the screen follows (new
    pid, one restart, its last event); q quits with status 0."""
    cfg = write_config(tmp_path, """\
        scope: host
        workloads: workloads.d/
        rules:
          - {name: low, when: "memory.available < 5%", action: block}
        """, {
        "alpha": f"name: alpha\nreplicas: 2\ncommand: {worker_cmd('--rate', '20', '--max', '30')}\n"
                 "limits: {memory: 512MiB}\n",
        "beta": f"name: beta\ncommand: {worker_cmd()}\n"})
    d = Daemon(cfg, cgroup=memcg)
    pane = None
    try:
        for w in ("alpha-0", "alpha-1", "beta-0"):
            d.event("spawn", worker=w, timeout=30)
        sock = cfg.parent / "run" / "control.sock"
        pane = Pane(f"{sys.executable} -m memguard.cli top --socket {sock} --delay 0.3", tmp_path,
                    env={"TERM": "xterm-256color", "LANG": "C.UTF-8"})
        screen = pane.wait(lambda s: all(re.search(rf"^{w}\s+running\s+\d+\s+[\d.]+MiB", s, re.M)
                                         for w in ("alpha-0", "alpha-1", "beta-0")),
                           "three running workers with their memory")
        assert "memory   [" in screen and "| block at" in screen and "RECENT EVENTS" in screen
        old_pid = _row(screen, "alpha-0").split()[2]
        pane.keys("r")
        pane.wait(lambda s: "restart alpha-0? press y" in s, "the confirmation prompt")
        pane.keys("y")
        d.event("operator", op="restart", worker="alpha-0", timeout=30)
        screen = pane.wait(lambda s: re.search(r"^alpha-0\s+running\s+(\d+)", s, re.M) is not None
                           and _row(s, "alpha-0").split()[2] != old_pid
                           and re.search(r"\s1 spawn: alpha-0: restart", _row(s, "alpha-0")) is not None,
                           "alpha-0 running again with a new pid, one restart and its last event")
        assert "restart alpha-0: done" in screen
        pane.keys("q")
        assert pane.wait_exit() == 0
    finally:
        if pane is not None:
            pane.close()
        assert d.stop() == 0
