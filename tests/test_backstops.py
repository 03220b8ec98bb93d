"""Kernel backstops: per-worker cgroups, OOM attribution, whole-tree kills, OOM scores, protected processes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from daemonkit import HELPERS, Daemon, is_gone, make_cgroup, wait_gone, worker_cmd, write_config

GiB = 1024**3
MiB = 1024**2


def tree_cmd(*args: str) -> str:
    return json.dumps([sys.executable, str(HELPERS / "worker_tree.py"), *args])


@pytest.fixture
def memcg():
    cg = make_cgroup(2 * GiB)
    yield cg
    cg.cleanup()


def test_worker_past_its_limit_is_oom_killed_inside_its_own_cgroup(tmp_path, memcg):
    """A worker with limits.memory 256MiB allocating past it is OOM-killed by the kernel inside its own
    cgroup; memguard reports the kernel OOM kill with the worker's name and limit; the other worker and
    the daemon are untouched."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {
        "hog": f"name: hog\ncommand: {worker_cmd('--rate', '300')}\nlimits: {{memory: 256MiB}}\n"
               "restart: {policy: never}\n",
        "calm": f"name: calm\ncommand: {worker_cmd()}\n",
    })
    d = Daemon(cfg, cgroup=memcg)
    try:
        assert "per-worker cgroups" in d.event("cgroups")["message"]
        calm = d.worker_pids("calm-0")[0]
        d.worker_pids("hog-0")
        ev = d.event("exit", worker="hog-0", timeout=20)
        assert ev["cause"] == "host_oom" and ev["kernel_oom"] is True
        assert "256MiB" in ev["message"] and "cgroup" in ev["message"]
        assert not is_gone(calm) and not is_gone(d.pid)
        assert memcg.oom_kills() == 0  # the kill happened in the worker's cgroup, not memguard's scope
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("cgroups", ["on", "off"])
def test_forked_tree_counts_shared_memory_once(tmp_path, memcg, cgroups):
    """A worker that touches 400 MB and then forks 4 readers is counted about once (within 20 %), not five
    times, with per-worker cgroups (working set) and without (PSS summed over the tree)."""
    cfg = write_config(tmp_path, f"scope: host\nworkloads: workloads.d/\nworker_cgroups: {cgroups}\n", {"t": f"""
        name: t
        command: {tree_cmd("fork4", "400")}
        rules:
          - {{name: measured, when: "worker.memory > 100MiB and worker.processes >= 5", action: warn}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        pids = d.worker_pids("t-0", timeout=30)
        assert len(pids) == 5
        ev = d.event("warn", timeout=20)
        assert ev["signal"] == "worker.memory"
        assert 0.8 * 400 * MiB <= ev["value"] <= 1.2 * 400 * MiB, ev["value"] / MiB
    finally:
        d.stop()


@pytest.mark.parametrize("cgroups", ["on", "off"])
def test_grandchild_that_escaped_with_setsid_is_killed_with_the_worker(tmp_path, memcg, cgroups):
    """A worker whose grandchild called setsid() and keeps allocating is stopped entirely when memguard
    kills the worker: the grandchild is gone too (cgroup kill, or the recorded tree without cgroups)."""
    cfg = write_config(tmp_path, f"scope: host\nworkloads: workloads.d/\nworker_cgroups: {cgroups}\n", {"e": f"""
        name: e
        command: {tree_cmd("escape", "200")}
        limits: {{memory: 1GiB}}
        rules:
          - {{name: too-big, when: "worker.memory > 120MiB", action: kill}}
        restart: {{policy: never}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    pids: list[int] = []
    try:
        pids = d.worker_pids("e-0", timeout=30)
        main, child, grand = pids
        sessions = d.wait_for(lambda e: e.get("event") == "output" and e.get("worker") == "e-0"
                              and str(e.get("line", "")).startswith("sessions "), 30, what="sessions of e-0")
        main_sid, grand_sid = (int(x) for x in sessions["line"].split()[1:])
        assert grand_sid == grand != main_sid  # the grandchild escaped into a session of its own
        kill = d.event("kill", timeout=30)
        assert kill["worker"] == "e-0"
        d.event("exit", worker="e-0")
        assert wait_gone(pids, 2.0) == []
    finally:
        d.stop()
        for p in pids:
            if not is_gone(p):
                os.kill(p, 9)


def test_oom_scores_workers_high_memguard_low(tmp_path):
    """Workers get the configured oom_score_adj (so the kernel picks them, never sshd or memguard);
    memguard's own is lower: -900 where it may lower it (CAP_SYS_RESOURCE), its inherited value otherwise,
    with a warning saying so."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\noom_score_adj: -900\n", {
        "w": f"name: w\ncommand: {worker_cmd('--fork', '1')}\noom_score_adj: 700\n"})
    d = Daemon(cfg)
    try:
        main, child = d.worker_pids("w-0")
        for pid in (main, child):
            assert open(f"/proc/{pid}/oom_score_adj").read().strip() == "700"
        own = int(open(f"/proc/{d.pid}/oom_score_adj").read())
        assert own < 700
        cap_eff = int([ln for ln in open("/proc/self/status") if ln.startswith("CapEff")][0].split()[1], 16)
        if cap_eff & (1 << 24):  # CAP_SYS_RESOURCE
            assert own == -900
        else:
            assert "oom_score_adj" in d.event("self_protection")["message"]
    finally:
        d.stop()


def test_protected_process_is_never_signalled_even_when_largest(tmp_path, memcg):
    """Under a system kill rule, a worker running a `protect:`ed program is never chosen even though it is
    the largest; the smaller unprotected worker is the victim."""
    cfg = write_config(tmp_path, """
        scope: host
        workloads: workloads.d/
        protect: [guarded-prog]
        rules:
          - {name: squeeze, when: "memory.used > 1MiB", for: 1500ms, action: kill}
        """, {
        "big": f"""
            name: big
            command: [bash, -c, 'exec -a guarded-prog {sys.executable} {HELPERS / "worker_mem.py"} --rate 100 --max 300']
            priority: 0
            restart: {{policy: never}}
            """,
        "small": f"""
            name: small
            command: {worker_cmd()}
            priority: 0
            restart: {{policy: never}}
            """,
    })
    d = Daemon(cfg, cgroup=memcg)
    try:
        big = d.worker_pids("big-0")[0]
        kill = d.event("kill", timeout=20)
        assert kill["worker"] == "small-0"
        assert not is_gone(big)
        refused_or_spared = [e for e in d.events if e.get("worker") == "big-0" and e.get("event") == "kill"]
        assert refused_or_spared == []
    finally:
        d.stop()


def _run(argv: list[str], cgroup=None, timeout: float = 60, stdin_closed: bool = False,
         **kw) -> subprocess.CompletedProcess:
    from daemonkit import MEMGUARD, REPO

    cmd = MEMGUARD + ["run", *argv]
    if stdin_closed:  # memguard starts with descriptor 0 closed
        cmd = ["sh", "-c", 'exec "$@" <&-', "sh", *cmd]
    if cgroup is not None:
        cmd = cgroup.wrap(cmd)
    # memguard run alone: a daemon that may run on this machine (/run/memguard/control.sock) is not asked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env["MEMGUARD_SOCKET"] = "/nonexistent/memguard-test/control.sock"
    return subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=timeout, env=env, **{"text": True, **kw})


def test_run_require_free_refuses_with_exit_75():
    """`memguard run --require-free` with more than the machine has exits 75 before starting, naming what is
    free and what was asked."""
    res = _run(["--require-free", "100TiB", "--", "true"])
    assert res.returncode == 75
    assert "100TiB required" in res.stderr and "available" in res.stderr and "not starting true" in res.stderr


def test_run_timeout_stops_the_command_and_says_so():
    """`memguard run --timeout 1s -- sleep 30` ends within a few seconds, non-zero, and the summary says
    timeout."""
    import time

    t0 = time.monotonic()
    res = _run(["--timeout", "1s", "--grace", "2s", "--", "sleep", "30"])
    took = time.monotonic() - t0
    assert res.returncode == 128 + 15 and took < 8
    assert "rule timeout" in res.stderr and "exit code 143" in res.stderr


def test_run_memory_max_stops_an_allocator_and_says_why(memcg):
    """`memguard run --memory-max 200MiB -- <allocator>` is stopped with exit code 137 and the summary says
    why (the kernel at its cgroup limit, or memguard's memory-max rule); output passes through."""
    res = _run(["--memory-max", "200MiB", "--", sys.executable, str(HELPERS / "worker_mem.py"), "--rate", "300"],
               cgroup=memcg)
    assert res.returncode == 137, res.stderr
    assert res.stdout.startswith("pids ")
    assert ("kernel OOM killer at its cgroup limit 200MiB" in res.stderr) or ("rule memory-max" in res.stderr)
    assert "peak memory" in res.stderr


def test_run_passes_the_exit_code_and_output_through():
    """A command exiting 3 makes `memguard run` exit 3, with its stdout and stderr passed through."""
    res = _run(["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
    assert res.returncode == 3 and res.stdout == "out\n" and res.stderr.startswith("err\n")


def test_run_passes_standard_input_through():
    """`producer | memguard run -- consumer`: the job reads what is piped into memguard, to its end (a
    daemon's workers read /dev/null; a run job in a shell pipeline must not silently get nothing)."""
    data = "".join(f"row {i}\n" for i in range(20000))  # more than a pipe holds
    res = _run(["-q", "--", "sh", "-c", "cat; echo done"], input=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data + "done\n"


def test_run_copies_the_jobs_output_byte_for_byte():
    """Binary output with NUL bytes, CR LF, a 200 KiB line and no final newline reaches memguard run's
    standard output unchanged (memguard reads the job's lines for itself, but does not pass on its own
    split, decoded, truncated copy of them)."""
    data = b"a\0b\r\n\xff\xfe" + bytes(range(256)) * 800 + b"x" * 200_000 + b"\nno final newline"
    res = _run(["-q", "--", sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
               input=data, text=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data


def test_run_job_gets_sigpipe_when_its_reader_goes():
    """`memguard run -- yes | head -n 2`: once head has gone, the job is stopped by SIGPIPE as without
    memguard (exit 128 + 13), instead of writing on forever into a pipe nobody reads."""
    from daemonkit import MEMGUARD, REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env["MEMGUARD_SOCKET"] = "/nonexistent/memguard-test/control.sock"
    shell = subprocess.Popen(["bash", "-c", 'set -o pipefail; "$@" | head -n 2; echo "${PIPESTATUS[0]}" >&2', "sh",
                              *MEMGUARD, "run", "-q", "--", "yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=60)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)  # the pipeline, should memguard run not have ended
        except ProcessLookupError:
            pass
    assert out == "y\ny\n"
    assert err.strip().splitlines()[-1] == str(128 + signal.SIGPIPE), err


def test_run_keeps_guarding_while_nobody_reads_the_jobs_output():
    """A reader that stops reading (a paused pager) holds up the copy of the job's output, not memguard:
    with `memguard run --timeout 2s -- yes` and its stdout left unread, the timeout still stops the job (the
    decision is on stderr); the output is then read whole and memguard run exits 143 as the job did."""
    from daemonkit import MEMGUARD, REPO

    deadline_s = 30.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env["MEMGUARD_SOCKET"] = "/nonexistent/memguard-test/control.sock"
    p = subprocess.Popen(MEMGUARD + ["run", "--timeout", "2s", "--grace", "1s", "--", "yes"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    try:
        assert p.stderr is not None and p.stdout is not None
        err = b""
        deadline = time.monotonic() + deadline_s
        while b"rule timeout" not in err:  # stdout is not read meanwhile
            left = deadline - time.monotonic()
            assert left > 0, f"no timeout decision while stdout was unread: {err!r}"
            if select.select([p.stderr], [], [], left)[0]:
                chunk = os.read(p.stderr.fileno(), 65536)
                assert chunk, f"memguard run's stderr ended: {err!r}"
                err += chunk
        out, rest = p.communicate(timeout=deadline_s)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, err + rest
    assert out.startswith(b"y\ny\n") and set(out) == {ord("y"), ord("\n")}


def test_run_passes_ctrl_c_to_the_job_and_stops_it_on_sigterm():
    """SIGINT to `memguard run` (a terminal's Ctrl-C) reaches the job as SIGINT: a Python job gets its
    KeyboardInterrupt and runs its handler, and memguard run exits 130 as the job did. SIGTERM still stops the
    job through the ladder (its SIGTERM, and the summary says memguard stopped it)."""
    from daemonkit import MEMGUARD, REPO

    job = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('job: SIGTERM', flush=True), sys.exit(7)))\n"
           "try:\n    print('ready', flush=True); time.sleep(60)\n"
           "except KeyboardInterrupt:\n    print('job: KeyboardInterrupt, saved', flush=True); raise\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env["MEMGUARD_SOCKET"] = "/nonexistent/memguard-test/control.sock"
    for sig, line, code in ((signal.SIGINT, "job: KeyboardInterrupt, saved", 128 + signal.SIGINT),
                            (signal.SIGTERM, "job: SIGTERM", 7)):
        p = subprocess.Popen(MEMGUARD + ["run", "--", sys.executable, "-c", job], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        try:
            assert p.stdout.readline() == "ready\n"
            p.send_signal(sig)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert out == line + "\n", (out, err)
        assert p.returncode == code, err
        if sig == signal.SIGTERM:
            assert "stopped by memguard" in err, err


def test_run_with_its_standard_input_closed_gives_the_job_dev_null():
    """memguard started with descriptor 0 closed gives its job /dev/null, not whatever file or socket of
    memguard's own took descriptor 0 since."""
    res = _run(["-q", "--", "sh", "-c", "readlink /proc/self/fd/0"], stdin_closed=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "/dev/null\n"


def test_opt_in_unmanaged_process_is_chosen_and_stopped(tmp_path, memcg):
    """With `unmanaged:` matching a hand-started job, a system rule stops that job (the largest candidate,
    identified by pid and start time), while memguard's own small worker keeps running."""
    import uuid

    token = f"hand-started-{uuid.uuid4().hex[:8]}"
    job = subprocess.Popen(memcg.wrap(["bash", "-c", f'exec -a "{token}" "$0" "$@"', sys.executable,
                                       str(HELPERS / "worker_mem.py"), "--rate", "200", "--max", "300"]),
                           stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().startswith("pids ")
        cfg = write_config(tmp_path, f"""
            scope: host
            workloads: workloads.d/
            unmanaged:
              - {{name: by-hand, cmdline: "{token}", priority: 0}}
            rules:
              - {{name: squeeze, when: "memory.used > 1MiB", for: 2s, action: terminate, grace: 2s}}
            """, {"small": f"name: small\ncommand: {worker_cmd()}\npriority: 0\n"})
        d = Daemon(cfg, cgroup=memcg)
        try:
            small = d.worker_pids("small-0")[0]
            ev = d.event("terminate", timeout=20)
            assert ev["pid"] == job.pid and ev.get("unmanaged") is True and "by-hand" in ev["message"]
            assert job.wait(10) == -15
            gone = d.wait_for(lambda e: e.get("event") == "exit" and e.get("unmanaged") is True, timeout=10,
                              what="the unmanaged victim's exit")
            assert str(job.pid) in gone["message"]
            assert not is_gone(small)
        finally:
            d.stop()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_metrics_textfile_counts_kernel_oom_kills_and_actions(tmp_path, memcg):
    """With metrics_file set, the Prometheus textfile holds per-worker memory, the actions taken and the kernel
    OOM kills memguard attributed (here: a worker killed at its cgroup limit)."""
    prom = tmp_path / "memguard.prom"
    cfg = write_config(tmp_path, f"scope: host\nworkloads: workloads.d/\nmetrics_file: {prom}\n", {
        "hog": f"name: hog\ncommand: {worker_cmd('--rate', '300')}\nlimits: {{memory: 128MiB}}\n"
               "restart: {policy: never}\n",
        "calm": f"name: calm\ncommand: {worker_cmd()}\n"})
    d = Daemon(cfg, cgroup=memcg)
    try:
        assert d.event("exit", worker="hog-0", timeout=20)["kernel_oom"] is True
    finally:
        assert d.stop() == 0  # the textfile is written after every full tick and once more at exit
    text = prom.read_text()
    assert 'memguard_kernel_oom_kills_total{workload="hog"} 1' in text
    assert 'memguard_worker_up{workload="calm",worker="calm-0"}' in text
    assert "# TYPE memguard_actions_total counter" in text


@pytest.mark.root
def test_double_forked_descendants_without_cgroups_are_counted_and_never_survive(tmp_path, memcg):
    """worker_cgroups: off. Each worker double-forks a setsid grandchild that allocates 150 MiB and is an
    orphan from its first instant (adopted by memguard, a child subreaper). The grandchild counts in its
    worker's memory (a rule on worker.memory > 120 MiB fires), dies when its worker is restarted, and none
    of the workers' descendants survives any of 10 SIGKILLs of the daemon (zombies count as dead)."""
    from memguard.client import admin_request

    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\nworker_cgroups: off\n", {"d": f"""
        name: d
        replicas: 2
        command: {tree_cmd("doublefork", "150")}
        limits: {{memory: 1GiB}}
        rules:
          - {{name: counted, when: "worker.memory > 120MiB", action: warn}}
        """})
    sock = str(tmp_path / "run" / "control.sock")
    d = Daemon(cfg, cgroup=memcg)
    try:
        main, grand = d.worker_pids("d-0", timeout=30)
        assert os.getsid(grand) != os.getsid(main)  # another session: not in the worker's group either
        with open(f"/proc/{grand}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == d.pid  # its parent: memguard adopted it
        warn = d.event("warn", worker="d-0", timeout=30)
        assert warn["value"] > 120 * 1024**2  # the orphan's 150 MiB count for its worker
        reply = admin_request("restart", sock, worker="d-0")
        assert reply["ok"], reply
        assert wait_gone([main, grand], 10.0) == []
    finally:
        d.stop()
    for round_ in range(10):
        d = Daemon(cfg, cgroup=memcg)
        pids: list[int] = []
        try:
            for worker in ("d-0", "d-1"):
                pids += d.worker_pids(worker, timeout=30)
            d.kill()
            left = wait_gone(pids, 5.0)
            assert left == [], f"round {round_}: {left} survived a SIGKILL of the daemon"
        finally:
            d.kill()
            for p in pids:
                if not is_gone(p):
                    os.kill(p, 9)


def _memory_limit_of(pid: int) -> int:
    """The memory limit of the cgroup ``pid`` runs in (v1 memory.limit_in_bytes or v2 memory.max)."""
    from memguard.sense.cgroup import find_own_cgroup

    cg = find_own_cgroup(pid)
    assert cg is not None, pid
    limit = cg.limit_bytes()
    assert isinstance(limit, int), limit
    return limit


@pytest.mark.root
def test_two_memguard_runs_from_one_cgroup_keep_their_own_limits_and_lives(memcg):
    """Two `memguard run` jobs started from the same cgroup get a cgroup each: each has its own --memory-max,
    and the shorter job's end (its memguard cleaning up) leaves the other job running."""
    from daemonkit import MEMGUARD, REPO

    def start(limit: str) -> subprocess.Popen:  # each job runs until its standard input closes
        return subprocess.Popen(memcg.wrap(MEMGUARD + ["run", "-q", "--memory-max", limit, "--", "sh", "-c",
                                                       "echo $$; read _ || true"]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    long_job, short_job = start("300MiB"), start("100MiB")
    try:
        long_pid, short_pid = int(long_job.stdout.readline()), int(short_job.stdout.readline())
        assert (_memory_limit_of(long_pid), _memory_limit_of(short_pid)) == (300 * MiB, 100 * MiB)
        short_job.stdin.close()  # the short job ends now, while the long one runs
        assert short_job.wait(30) == 0
        assert wait_gone([long_pid], 1.0) == [long_pid]  # still running after the short job's memguard left
        assert long_job.poll() is None
    finally:
        long_job.terminate()
        long_job.wait(30)


@pytest.mark.root
def test_two_daemons_in_one_cgroup_never_touch_each_others_workers(tmp_path, memcg):
    """Two daemons started in the same cgroup: SIGKILL of one ends its own workers only, and when it is
    started again it removes the cgroups its dead instance left, not the other daemon's."""
    def daemon(name: str):
        d = tmp_path / name
        d.mkdir()
        cfg = write_config(d, "scope: host\nworkloads: workloads.d/\n", {"w": f"""
            name: w
            command: {worker_cmd()}
            limits: {{memory: 256MiB}}
            """})
        return Daemon(cfg, cgroup=memcg)

    a, b = daemon("a"), daemon("b")
    try:
        a_pid, b_pid = a.worker_pids("w-0")[0], b.worker_pids("w-0")[0]
        a_dirs = {p.name for p in memcg.path.iterdir() if p.name.startswith("memguard.")}
        assert len(a_dirs) == 2  # one instance directory each
        a.kill()
        assert wait_gone([a_pid], 5.0) == []
        assert wait_gone([b_pid], 1.0) == [b_pid]  # b's worker lives on
        a2 = Daemon(a.config, cgroup=memcg)
        try:
            a2.worker_pids("w-0")
            left = {p.name for p in memcg.path.iterdir() if p.name.startswith("memguard.")}
            assert f"memguard.{a.pid}." not in " ".join(left)  # the dead instance's directory is gone
            assert len(left) == 2 and not is_gone(b_pid)
        finally:
            a2.stop()
    finally:
        a.kill()
        b.stop()
