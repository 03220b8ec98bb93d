"""The real daemon with real worker processes, real signals and a real memory cgroup."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from daemonkit import MEMGUARD, REPO, Daemon, is_gone, make_cgroup, wait_gone, worker_cmd, write_config

GiB = 1024**3
MiB = 1024**2


@pytest.fixture
def memcg():
    cg = make_cgroup(int(1.5 * GiB))
    yield cg
    cg.cleanup()


def test_runaway_worker_is_stopped_before_the_kernel_oom_killer(tmp_path, memcg):
    """memguard, inside a 1.5 GiB cgroup, stops a worker allocating ~200 MB/s before the kernel OOM
    killer fires (the cgroup's oom_kill counter stays 0), restarts it, and the event names the rule,
    the measured value and the threshold."""
    cfg = write_config(tmp_path, """
        poll_interval: 1s
        fast_poll_interval: 100ms
        scope: auto
        workloads: workloads.d/
        rules:
          - {name: relieve, when: "memory.available < 40%", action: terminate, grace: 2s}
          - {name: last-resort, when: "memory.available < 20%", action: kill}
        """, {"runaway": f"""
        name: runaway
        command: {worker_cmd("--rate", "200")}
        restart: {{backoff: 1s..2s, budget: 5/1m}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        started = d.event("started")
        assert started["scope"] == "cgroup", started
        d.worker_pids("runaway-0")
        act = d.wait_for(lambda e: e.get("event") in ("terminate", "kill") and e.get("worker") == "runaway-0",
                         timeout=30, what="terminate or kill of the runaway worker")
        assert act["rule"] in ("relieve", "last-resort")
        assert act["signal"] == "memory.available"
        limit = 1.5 * GiB
        assert act["threshold"] == pytest.approx(limit * (0.4 if act["rule"] == "relieve" else 0.2), rel=0.01)
        assert act["value"] < act["threshold"]
        assert "memory.available" in act["message"] and "%" in act["message"]
        exit_ev = d.event("exit", worker="runaway-0")
        assert exit_ev["cause"] == "stopped"
        d.wait_for(lambda e: e.get("event") == "spawn" and e.get("worker") == "runaway-0"
                   and e.get("incarnation") == 2, timeout=10, what="restart of runaway-0")
        assert memcg.oom_kills() == 0
    finally:
        assert d.stop() == 0
    assert memcg.oom_kills() == 0


def test_only_the_leaking_replica_is_terminated_and_restarted(tmp_path, memcg):
    """Of two replicas, the one leaking towards its limits.memory is terminated (before the kernel's hard
    limit in its own cgroup is reached) and restarted; the other keeps running with the same pid and is
    never signalled."""
    cfg = write_config(tmp_path, """
        scope: host
        workloads: workloads.d/
        """, {"pair": f"""
        name: pair
        command: {worker_cmd("--rate", "0")}
        replicas: 2
        environment: {{RATE_1: "20"}}
        limits: {{memory: 120MiB}}
        grace: 3s
        rules:
          - {{name: over-limit, when: "worker.memory > 75%", for: 300ms, action: terminate}}
        restart: {{backoff: 1s..1s, budget: 5/1m}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        steady = d.worker_pids("pair-0")[0]
        leaky = d.worker_pids("pair-1")[0]
        term = d.event("terminate", timeout=30)
        assert term["worker"] == "pair-1" and term["pid"] == leaky
        assert term["rule"] == "over-limit" and term["threshold"] == 90 * MiB and term["value"] > 90 * MiB
        d.event("exit", worker="pair-1")
        d.wait_for(lambda e: e.get("event") == "spawn" and e.get("worker") == "pair-1" and e.get("incarnation") == 2,
                   timeout=10, what="restart of pair-1")
        new_leaky = d.worker_pids("pair-1")[0]
        assert new_leaky != leaky
        assert not is_gone(steady)
        touched = [e for e in d.events if e.get("worker") == "pair-0"
                   and e.get("event") in ("terminate", "kill", "restart", "escalate", "exit", "block")]
        assert touched == []
    finally:
        d.stop()


def test_sigkill_of_the_daemon_takes_every_worker_down(tmp_path):
    """SIGKILL of the daemon: soon after (a 5 s deadline, generous for a loaded machine), no worker and no
    worker's child is alive."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"w": f"""
        name: w
        command: {worker_cmd("--fork", "1")}
        replicas: 2
        """})
    d = Daemon(cfg)
    pids: list[int] = []
    try:
        pids = d.worker_pids("w-0") + d.worker_pids("w-1")
        assert len(pids) == 4 and not any(is_gone(p) for p in pids)
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(5)
        left = wait_gone(pids, 5.0)
        assert left == [], f"still alive 5 s after the daemon's SIGKILL: {left}"
    finally:
        for p in pids:
            if not is_gone(p):
                os.kill(p, signal.SIGKILL)


def test_sigterm_stops_workers_gracefully_and_exits_zero(tmp_path):
    """SIGTERM: every worker gets its stop signal, a worker ignoring it is SIGKILLed after grace, exit 0."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {
        "polite": f"name: polite\ncommand: {worker_cmd()}\n",
        "stubborn": f"name: stubborn\ncommand: {worker_cmd('--sigterm', 'ignore')}\ngrace: 1s\n",
    })
    d = Daemon(cfg)
    polite = d.worker_pids("polite-0")[0]
    stubborn = d.worker_pids("stubborn-0")[0]
    assert d.stop() == 0
    assert is_gone(polite) and is_gone(stubborn)
    d.wait_for(lambda e: False if e.get("event") != "escalate" else e.get("worker") == "stubborn-0",
               timeout=5, what="SIGKILL of the stubborn worker")
    assert d.event("exit", worker="polite-0")["exit_signal"] == "SIGTERM"
    assert d.event("exit", worker="stubborn-0")["exit_signal"] == "SIGKILL"


def test_sighup_with_a_broken_file_keeps_the_running_policy(tmp_path):
    """A reload with a broken workload file logs each error with file:line and keeps the old policy
    (same workers, same pids); a fixed file is then applied (a new replica starts)."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {
        "w": f"name: w\ncommand: {worker_cmd()}\nreplicas: 1\n"})
    d = Daemon(cfg)
    try:
        pid = d.worker_pids("w-0")[0]
        wfile = tmp_path / "workloads.d" / "w.yaml"
        wfile.write_text(f"name: w\ncommand: {worker_cmd()}\nreplicas: 1\nlimts: {{memory: 1GiB}}\n")
        os.kill(d.pid, signal.SIGHUP)
        err = d.event("config_error")
        assert err["file"].endswith("w.yaml") and err["line"] == 4 and "limts" in err["message"]
        d.event("reload_failed")
        assert not is_gone(pid)
        wfile.write_text(f"name: w\ncommand: {worker_cmd()}\nreplicas: 2\n")
        os.kill(d.pid, signal.SIGHUP)
        d.event("reloaded")
        d.worker_pids("w-1")
        assert not is_gone(pid)  # same command: the running replica is left alone
    finally:
        d.stop()


def test_dry_run_decides_but_sends_no_signal(tmp_path, memcg):
    """In dry run the terminate decision is logged with dry_run, the worker keeps running with the same
    pid (nothing escalates to SIGKILL: the decision was not carried out), and a stop of the daemon still
    stops the worker and ends the daemon promptly."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\ndry_run: true\n", {"w": f"""
        name: w
        command: {worker_cmd("--rate", "50", "--max", "100")}
        limits: {{memory: 60MiB}}
        grace: 1s
        rules:
          - {{name: over, when: "worker.memory > 100%", action: terminate}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        pid = d.worker_pids("w-0")[0]
        term = d.event("terminate", timeout=20)
        assert term["dry_run"] is True and term["message"].startswith("DRY RUN")
        again = d.event("terminate", timeout=20)  # decided again after the post-action delay
        assert again["dry_run"] is True and again["pid"] == pid
        assert not is_gone(pid)
        assert not list(d.all("exit")) and not list(d.all("escalate"))
        assert d.stop(timeout=15) == 0
        assert is_gone(pid)
    finally:
        d.stop()


def test_check_command_reports_every_broken_file_with_line(tmp_path):
    """`memguard check` on a directory of broken configs prints file:line: key: what was expected for each
    and exits non-zero; on the demo config it exits 0."""
    broken = REPO / "tests" / "configs" / "broken"
    res = subprocess.run(MEMGUARD + ["check", str(broken)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ".yaml:" in ln]
    files = {ln.split(":")[0].rsplit("/", 1)[-1] for ln in lines}
    assert len(files) >= 5, res.stderr
    for ln in lines:
        assert ln.split(":")[1].isdigit(), ln  # file:LINE:
    ok = subprocess.run(MEMGUARD + ["check", str(REPO / "config" / "demo" / "memguard.yaml")],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr


def test_leftovers_of_an_exited_worker_are_killed(tmp_path):
    """When a worker's main process exits on its own, the processes it left behind in its group are
    killed with it (no orphan keeps holding memory), and the exit event counts them."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"w": """
        name: w
        command: [sh, -c, 'sleep 300 & echo pids $$ $!; exit 3']
        restart: {policy: never}
        """})
    d = Daemon(cfg)
    try:
        main, orphan = d.worker_pids("w-0")
        ev = d.event("exit", worker="w-0")
        assert ev["cause"] == "exit" and ev["returncode"] == 3
        assert ev["leftovers_killed"] == 1
        assert wait_gone([orphan], 2.0) == []
    finally:
        d.stop()


def test_ctl_status_stop_start_over_the_control_socket(tmp_path):
    """`memguard ctl` reaches the running daemon: status lists the worker, stop stops it for good (no
    restart), start brings it back, and an unknown worker is an error."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"w": f"name: w\ncommand: {worker_cmd()}\n"})
    d = Daemon(cfg)
    sock = str(tmp_path / "run" / "control.sock")

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(MEMGUARD + ["ctl", *args, "--socket", sock], capture_output=True, text=True, cwd=REPO)

    try:
        pid = d.worker_pids("w-0")[0]
        st = ctl("status")
        assert st.returncode == 0 and "w-0" in st.stdout and "running" in st.stdout and str(pid) in st.stdout
        assert ctl("stop", "w-0").returncode == 0
        d.event("exit", worker="w-0")
        assert "stopped" in ctl("status").stdout
        assert ctl("start", "w-0").returncode == 0
        assert d.worker_pids("w-0")[0] != pid
        bad = ctl("stop", "nope-0")
        assert bad.returncode == 1 and "no worker named" in bad.stdout
    finally:
        d.stop()
