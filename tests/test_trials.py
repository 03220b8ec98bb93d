"""Trial-aware supervision with the real daemon, the real client and real processes."""

from __future__ import annotations

import json
import os
import sys

import pytest

from daemonkit import HELPERS, Daemon, make_cgroup, write_config

GiB = 1024**3


def helper_cmd(name: str, *args: str) -> str:
    return json.dumps([sys.executable, str(HELPERS / name), *args])


@pytest.fixture
def memcg():
    cg = make_cgroup(int(1.5 * GiB))
    yield cg
    cg.cleanup()


def test_leaking_trials_all_finish_on_recycled_workers_without_a_kernel_oom(tmp_path, memcg):
    """Two workers run 60 trials that each leak 50-70 MB (3+ GB in all, twice the 1.5 GiB cgroup): every
    trial finishes, some on recycled workers, the kernel OOM killer fires 0 times, and the events show the
    block, the brake restart and the recycling with their reasons."""
    work = tmp_path / "study"
    cfg = write_config(tmp_path, "scope: auto\nworkloads: workloads.d/\n", {"trials": f"""
        name: trials
        command: {helper_cmd("worker_trials.py", str(work), "60")}
        replicas: 2
        environment: {{LEAK_MB_0: "50", LEAK_MB_1: "80"}}
        limits: {{memory: 600MiB}}
        rules:
          - {{name: hold, when: "worker.memory > 60%", action: block, release: "worker.memory < 40%"}}
        restart_when_blocked: {{refusals: 1}}
        recycle: {{max_trials: 6}}
        restart: {{backoff: 200ms..1s, budget: 30/1m}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        for w in ("trials-0", "trials-1"):
            d.wait_for(lambda e, w=w: e.get("event") == "completed" and e.get("worker") == w, timeout=120,
                       what=f"{w} finished the study")
        done = sorted(int(n) for n in os.listdir(work / "done"))
        assert done == list(range(60))
        restarts = [e for e in d.events if e.get("event") == "restart"]
        rules = {e["rule"] for e in restarts}
        assert "recycle.max_trials" in rules and "restart_when_blocked" in rules, rules
        assert any(e.get("event") == "block" for e in d.events)
        brake = next(e for e in restarts if e["rule"] == "restart_when_blocked")
        assert "only a restart gives leaked memory back" in brake["message"]
        assert not [e for e in d.events if e.get("kernel_oom")]
        assert memcg.oom_kills() == 0
    finally:
        d.stop()


def test_admission_closes_under_pressure_and_a_waiting_trial_starts_after_release(tmp_path, memcg):
    """A worker over its block rule has its gate closed; its next trial waits; once its memory falls below
    the release threshold the gate reopens and the waiting trial starts."""
    control = tmp_path / "want"
    control.write_text("0")
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"g": f"""
        name: g
        command: {helper_cmd("worker_gate.py", str(control))}
        limits: {{memory: 400MiB}}
        rules:
          - {{name: hold, when: "worker.memory > 50%", action: block, release: "worker.memory < 25%"}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        d.worker_pids("g-0")
        control.write_text("250")
        block = d.event("block", timeout=20)
        assert block["rule"] == "hold"
        waiting = d.wait_for(lambda e: e.get("event") == "output" and "start" in str(e.get("line")), timeout=5,
                             what="a trial that started before the gate closed")
        last = int(waiting["line"].split()[1])
        control.write_text("0")
        d.event("release", timeout=20)
        resumed = d.wait_for(lambda e: e.get("event") == "output" and "start" in str(e.get("line"))
                             and int(e["line"].split()[1]) > last, timeout=10, what="a trial after release")
        assert resumed["line"].endswith("start")
    finally:
        d.stop()


def test_brake_restarts_a_worker_after_n_refusals(tmp_path, memcg):
    """restart_when_blocked.refusals: 3 — a worker whose trials keep being refused admission by its own rule
    is restarted after the third refusal, and the restart says why."""
    control = tmp_path / "want"
    control.write_text("250")
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"g": f"""
        name: g
        command: {helper_cmd("worker_gate.py", str(control), "--retry-timeout", "0.3")}
        limits: {{memory: 400MiB}}
        rules:
          - {{name: hold, when: "worker.memory > 50%", action: block, release: "worker.memory < 25%"}}
        restart_when_blocked: {{refusals: 3}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        first = d.worker_pids("g-0")[0]
        d.event("block", timeout=20)
        restart = d.event("restart", timeout=20)
        assert restart["rule"] == "restart_when_blocked" and restart["value"] >= 3
        assert "3 trials refused in a row" in restart["message"]
        control.write_text("0")
        assert d.worker_pids("g-0")[0] != first
    finally:
        d.stop()


def test_a_trial_past_its_timeout_is_terminated_as_stuck(tmp_path):
    """trial_timeout: a trial that sleeps past it is terminated, and the event says stuck."""
    script = tmp_path / "stuck.py"
    script.write_text("import time, memguard.client as mg\nprint('pids', 0, flush=True)\n"
                      "with mg.trial(name='sleepy'):\n    time.sleep(60)\n")
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"s": f"""
        name: s
        command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]
        trial_timeout: 1s
        grace: 2s
        restart: {{policy: never}}
        """})
    d = Daemon(cfg)
    try:
        term = d.event("terminate", timeout=15)
        assert term["rule"] == "trial_timeout" and "stuck" in term["message"] and "sleepy" in term["message"]
        ev = d.event("exit", worker="s-0")
        assert "stuck" in ev["message"]
    finally:
        d.stop()
