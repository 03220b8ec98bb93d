"""The real daemon waits on the kernel: idle near a threshold it neither polls nor ticks, and it ranks its
victim on figures read when it acts. Real processes in a real memory cgroup (root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading

import pytest

from daemonkit import MEMGUARD, REPO, Daemon, make_cgroup, worker_cmd, write_config

GiB = 1024**3
MiB = 1024**2


def _status(tmp_path) -> dict:
    r = subprocess.run(MEMGUARD + ["ctl", "status", "--json", "--socket", str(tmp_path / "run" / "control.sock")],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _wakeups(pid: int) -> int:
    """Times the daemon's threads were scheduled (the third field of each thread's schedstat)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                n += int(f.read().split()[2])
        except (OSError, IndexError):
            pass
    return n


@pytest.fixture
def memcg():
    cg = make_cgroup(1 * GiB)
    yield cg
    cg.cleanup()


def test_an_idle_daemon_near_a_threshold_waits_on_the_kernel(tmp_path, memcg):
    """memguard guards a 1 GiB cgroup (v1) with a kill rule about 150 MiB above what is in use: polling would
    read every ~25 ms (150 MiB / 6000 MiB/s). Left idle for 3 s, its watcher reads at most its 1 s
    backstop, it does not tick, and its threads wake up rarely; when a worker then allocates past the
    threshold the kernel's notification wakes it and the worker is killed."""
    if memcg.version != 1:
        pytest.skip("usage threshold notifications exist on cgroup v1 only (v2 polls)")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    cfg = write_config(tmp_path, """
        poll_interval: 1s
        scope: cgroup
        workloads: workloads.d/
        rules:
          - {name: cut, when: "memory.available < 800MiB", action: kill}
        """, {"hog": f"""
        name: hog
        command: {worker_cmd("--wait-fifo", str(fifo), "--rate", "400", "--max", "600")}
        restart: {{policy: never}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    go = -1
    try:
        d.event("started")
        d.worker_pids("hog-0")
        first = _status(tmp_path)["watch"]
        assert first["mode"] == "kernel", first
        ticks, polls, woke = first["ticks"], first["polls"], _wakeups(d.pid)
        threading.Event().wait(3.0)  # the idle window being counted in (not a synchronisation)
        idle = _status(tmp_path)["watch"]
        wakeups = _wakeups(d.pid) - woke
        assert idle["polls"] - polls <= 5, idle  # the 1 s backstop, not ~120 reads
        assert idle["ticks"]["fast"] - ticks["fast"] <= 3, idle  # the status requests themselves
        assert idle["ticks"]["full"] - ticks["full"] <= 1, idle
        assert wakeups < 100, f"{wakeups} wake-ups of the daemon's threads in 3 s"
        go = os.open(fifo, os.O_WRONLY)
        kill = d.wait_for(lambda e: e.get("event") == "kill" and e.get("worker") == "hog-0", timeout=30,
                          what="the kill of the hog")
        assert kill["rule"] == "cut"
        after = _status(tmp_path)["watch"]
        assert after["kernel_wakes"] > idle["kernel_wakes"], after
    finally:
        if go >= 0:
            os.close(go)
        d.stop()


def test_the_victim_is_the_worker_largest_when_the_rule_fires(tmp_path, memcg):
    """Two workers: 'early' took 200 MB at once and holds it; 'late' was measured nearly empty, then grows at
    400 MB/s until the kill rule fires, well before the next full tick. The victim is 'late' (ranked on
    figures read at that moment), and the kill event quotes its size then, not the stale one."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    cfg = write_config(tmp_path, """
        poll_interval: 1s
        scope: cgroup
        workloads: workloads.d/
        rules:
          - {name: cut, when: "memory.available < 35%", action: kill}
        """, {"early": f"""
        name: early
        command: {worker_cmd("--rate", "2000", "--max", "200")}
        restart: {{policy: never}}
        """, "late": f"""
        name: late
        command: {worker_cmd("--wait-fifo", str(fifo), "--rate", "400", "--max", "700")}
        restart: {{policy: never}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    go = -1
    try:
        d.event("started")
        d.worker_pids("early-0")
        d.worker_pids("late-0")
        deadline = 60
        while True:  # each status is a request answered after a tick: no sleeping here
            st = _status(tmp_path)["workers"]
            if (st["early-0"]["memory_bytes"] or 0) >= 190 * MiB and st["late-0"]["memory_bytes"] is not None:
                break
            deadline -= 1
            assert deadline > 0, st
        assert st["late-0"]["memory_bytes"] < 100 * MiB
        go = os.open(fifo, os.O_WRONLY)
        kill = d.wait_for(lambda e: e.get("event") == "kill", timeout=30, what="a kill")
        assert kill["worker"] == "late-0", kill
        m = re.search(r"victim late-0 \(priority 0, memory ([\d.]+)(MiB|GiB)", kill["message"])
        assert m and float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1) > 200, kill["message"]
        assert d.proc.poll() is None
    finally:
        if go >= 0:
            os.close(go)
        d.stop()
