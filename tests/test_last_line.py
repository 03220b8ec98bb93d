"""The box's last line, with real processes: jobs started by hand, bursts, swap thrash, hangs, a protected sshd.

Each test replays a part of a real incident (a 62 GB VM where hand-started Polars jobs grew to 98 % of RAM,
thrashed swap, hung for hours and locked everyone out of SSH) at small scale, in memory cgroups the test
creates. The figures each test measures are printed (``pytest -s``) and quoted in
docs/recipes/data-pipeline.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import daemonkit
from daemonkit import HELPERS, MEMGUARD, REPO, Daemon, is_gone, make_cgroup, wait_gone, write_config

GiB = 1024**3
MiB = 1024**2
PY = sys.executable


# ---------------------------------------------------------------------------
# helpers


class Proc:
    """A helper process started in a cgroup; its stdout lines are read by a thread into a list."""

    def __init__(self, argv: list[str], cgroup: daemonkit.TestCgroup | None = None, env: dict | None = None,
                 stderr: bool = False) -> None:
        if cgroup is not None:
            argv = cgroup.wrap(argv)
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr else None,
                                  text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        self.err: list[str] = []
        self._new = threading.Condition()
        self._open = 2 if stderr else 1  # streams not yet read to their end
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines), daemon=True).start()
        if stderr:
            threading.Thread(target=self._read, args=(self.p.stderr, self.err), daemon=True).start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._new:
                into.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._open -= 1
            self._new.notify_all()

    def drain(self, timeout: float = 20.0) -> None:
        """Wait until every stream was read to its end (the process and whatever shares its pipes are gone),
        so that ``lines`` and ``err`` hold all the process wrote."""
        deadline = time.monotonic() + timeout
        with self._new:
            while self._open:
                left = deadline - time.monotonic()
                assert left > 0, "the process's output did not end"
                self._new.wait(left)

    def wait_line(self, pattern: str, timeout: float = 20.0, stream: str = "out") -> str:
        into = self.lines if stream == "out" else self.err
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in into:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self._open:  # past the deadline, or every stream ended
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {into[-10:]}")
                self._new.wait(min(left, 0.5))

    @property
    def pid(self) -> int:
        return int(self.wait_line(r"^pid \d+").split()[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            return self.p.wait(5)


def wait_exit(pid: int, timeout: float) -> bool:
    return not wait_gone([pid], timeout)


def daemon_in(tmp: Path, text: str, cgroup: daemonkit.TestCgroup | None, workloads: dict | None = None) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    return Daemon(write_config(tmp, text, workloads or {}), cgroup=cgroup)


def _own_cgroup_name(cg: daemonkit.TestCgroup) -> str:
    return cg.path.name


# ---------------------------------------------------------------------------
# 1. A protected process next to a bursty job started by hand


BURSTY_RUNS = 10
CONTROL_RUNS = 3


@pytest.fixture
def box():
    cg = make_cgroup(1 * GiB)
    yield cg
    cg.cleanup()


def _bursty_runs(tmp: Path, box: daemonkit.TestCgroup, runs: int, within: str) -> tuple[list[dict], list[dict]]:
    """``runs`` bursty jobs one after the other next to sshd, under a daemon whose graceful rule has ``within``
    (or none); returns what decided each run, and memguard's OOM-protection events."""
    cfg = f"""
        poll_interval: 1s
        fast_poll_interval: 100ms
        scope: auto
        post_action_delay: 500ms
        protect: [sshd]
        log: {{format: json, level: info}}
        unmanaged:
          - {{name: bursty, cmdline: "bursty\\\\.py", cgroup: "{box.path.name}"}}
        rules:
          - {{name: graceful, when: "memory.available < 10%", for: 1s, {within} action: terminate, grace: 2s}}
          - {{name: last-resort, when: "memory.available < 5%", action: kill}}
        """
    d = daemon_in(tmp, cfg, box)
    sshd = Proc([PY, str(HELPERS / "protected.py"), "--name", "sshd"], box)
    results = []
    try:
        assert d.event("started")["scope"] == "cgroup"
        sshd_pid = sshd.pid
        kills_before = box.oom_kills()
        for run in range(runs):
            # 64 MiB at full speed, then 150 ms of nothing: about 400 MB/s on average, in bursts that cross
            # the 5 % between the two rules' thresholds (51 MiB) at once.
            job = Proc([PY, str(HELPERS / "bursty.py"), "--burst", "64", "--pause", "0.15"], box)
            pid = job.pid
            first = d.wait_for(lambda e: e.get("event") in ("terminate", "kill") and e.get("pid") == pid,
                               timeout=30, what=f"memguard's decision on the job (run {run + 1})")
            assert wait_exit(pid, 15), "the job outlived memguard's decision"
            job.stop()
            kernel = box.oom_kills() - kills_before
            kills_before += kernel
            results.append({"first": first["rule"], "available_at_decision_mib": round(first["value"] / MiB, 1),
                            "kernel_oom_kills": kernel})
            assert not is_gone(sshd_pid), f"sshd died in run {run + 1}: {results}"
            assert d.proc.poll() is None, "memguard died"
            d.wait_for(lambda e: e.get("event") == "exit" and e.get("pid") == pid, timeout=15,
                       what="the job's exit noticed")
        protect = [e for e in d.events if e.get("event") in ("oom_protect", "oom_protect_refused")]
    finally:
        sshd.stop(signal.SIGKILL)
        d.stop()
    return results, protect


def test_protected_process_survives_a_bursty_hand_started_job_every_time(tmp_path, box):
    """In a 1 GiB cgroup, a process named sshd (protected) lives next to memguard while a job started by hand
    (matched by unmanaged:) grows in 64 MiB bursts at full speed, ten times over. Every time sshd survives,
    the job is stopped and the kernel's OOM killer hits nothing but the job; in most runs memguard's graceful
    rule (below 10 % for 1 s, within 3 s on the trend) acts before the last resort (below 5 %). In a control
    without within, the bursts beat the graceful rule and the last resort acts first. memguard gives sshd
    the lowest OOM score it may set, or says once that the kernel refuses (no CAP_SYS_RESOURCE)."""
    results, protect = _bursty_runs(tmp_path / "within", box, BURSTY_RUNS, "within: 3s,")
    control, _ = _bursty_runs(tmp_path / "level", box, CONTROL_RUNS, "")
    graceful = sum(1 for r in results if r["first"] == "graceful")
    graceful_control = sum(1 for r in control if r["first"] == "graceful")
    print(f"\nbursty job x{BURSTY_RUNS}: graceful rule first in {graceful} (without within: {graceful_control} of "
          f"{CONTROL_RUNS}); kernel OOM kills {sum(r['kernel_oom_kills'] for r in results + control)} (of the "
          f"job only); sshd survived every run; {protect[0]['event'] if protect else 'no protection event'}; "
          f"available at the decision, MiB: {[r['available_at_decision_mib'] for r in results]}")
    assert protect, "memguard neither protected sshd from the kernel nor said why it could not"
    assert len([e for e in protect if e["event"] == "oom_protect_refused"]) <= 1, "said more than once"
    assert graceful > BURSTY_RUNS // 2, results
    assert graceful_control < CONTROL_RUNS, ("the control shows nothing: the level rule wins without within",
                                            control)


# ---------------------------------------------------------------------------
# 2. Swap: a job thrashing next to a latency probe


@pytest.fixture
def swapfile():
    """A 1 GiB swap file on /var/tmp, on for the test and always off and removed after it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a swap file")
    if not (shutil.which("mkswap") and shutil.which("swapon") and shutil.which("swapoff")):
        pytest.skip("mkswap/swapon/swapoff are not installed")
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("the kernel has no PSI (/proc/pressure/memory)")
    path = Path("/var/tmp") / f"memguard-test-{uuid.uuid4().hex[:8]}.swap"
    on = False
    try:
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, GiB)
        path.chmod(0o600)
        r = subprocess.run(["mkswap", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mkswap failed: {r.stderr.strip()}")
        r = subprocess.run(["swapon", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"swapon refused a swap file here: {r.stderr.strip()}")
        on = True
        yield path
    finally:
        if on:
            deadline = time.monotonic() + 60
            while subprocess.run(["swapoff", str(path)], capture_output=True).returncode != 0:
                # Pages of processes just killed are still being freed (ENOMEM for a moment): try again.
                assert time.monotonic() < deadline, f"cannot turn swap file {path} off"
                time.sleep(0.2)
        path.unlink(missing_ok=True)


def _swap_box() -> daemonkit.TestCgroup:
    """384 MiB of RAM and up to 1 GiB of swap for a job and a probe."""
    cg = make_cgroup(384 * MiB)
    if cg.version == 1:
        memsw = cg.path / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            cg.cleanup()
            pytest.skip("cgroup v1 without swap accounting (memory.memsw.*)")
        memsw.write_text(str(384 * MiB + GiB))
    else:
        (cg.path / "memory.swap.max").write_text(str(GiB))
    return cg


def _thrash(box: daemonkit.TestCgroup, seconds: float | None, on_job=None) -> tuple[float, str]:
    """A probe (64 MiB, touched every 0.5 s, named sshd) and a job growing into swap at 150 MiB/s to 900 MiB
    while walking over all it holds. ``seconds``: let it run that long, or until it ends (the kernel's OOM
    killer ends a long thrash); else ``on_job(pid)`` waits for someone to stop it. Returns the probe's worst
    stall (infinity if the probe itself was killed) and what ended the job."""
    probe = Proc([PY, str(HELPERS / "latency_probe.py"), "--hold", "64", "--period", "0.5", "--name", "sshd"], box)
    job = None
    try:
        probe.pid
        kills = box.oom_kills()
        job = Proc([PY, str(HELPERS / "thrash_job.py"), "--rate", "150", "--max", "900"], box)
        pid = job.pid
        began = time.monotonic()
        if seconds is not None:
            ended = wait_exit(pid, seconds)
            how = (f"the kernel's OOM killer after {time.monotonic() - began:.1f} s" if ended
                   else f"the test after {seconds:g} s")
        else:
            on_job(pid)
            how = f"memguard after {time.monotonic() - began:.1f} s"
        job.stop(signal.SIGKILL)
        if probe.stop(signal.SIGTERM) != 0:
            return float("inf"), how + f"; the probe was killed too ({box.oom_kills() - kills} kernel OOM kills)"
        return float(probe.wait_line(r"^max_stall ").split()[1]), how
    finally:
        if job is not None:
            job.stop(signal.SIGKILL)
        probe.stop(signal.SIGKILL)


def test_swap_thrash_is_stopped_by_the_default_rules_before_logins_stall(tmp_path, swapfile):
    """With a swap file, a job in a 384 MiB cgroup grows into swap while walking over everything it holds
    (a working set past RAM): the cgroup thrashes and a probe next to it (a stand-in for sshd: 64 MiB
    touched every 0.5 s) stalls for seconds. memguard, guarding the host with the default system rules of
    the shipped memguard.yaml, sees the stalls through PSI (memguard's 2 s average, woken by a kernel PSI
    trigger) long before available memory runs short, and stops the job while the probe's worst stall stays
    under 1 s. The same run without memguard is the control: the job is not ended by itself within 12 s (so
    it was memguard that ended it above); its probe stall is printed beside, a figure for the docs, not a
    claim (on a VM whose swap is fast it is of the same order, and comparing two noisy stalls flaked)."""
    default = (REPO / "src" / "memguard" / "data" / "memguard.yaml").read_text()
    rules = default[default.index("\nrules:") + 1:]
    dcg = make_cgroup(512 * MiB)  # memguard itself, in a cgroup of its own
    box = _swap_box()
    try:
        cfg = (f"poll_interval: 1s\nfast_poll_interval: 100ms\nscope: host\npost_action_delay: 1s\n"
               f"protect: [sshd]\nlog: {{format: json, level: debug}}\n"
               f"unmanaged:\n  - {{name: job, cmdline: 'thrash_job[.]py', cgroup: '{box.path.name}'}}\n" + rules)
        d = daemon_in(tmp_path, cfg, dcg)
        try:
            assert d.event("started")["scope"] == "host"
            trigger = d.event("psi_trigger")["message"]
            decided: dict = {}

            def memguard_stops(pid: int) -> None:
                decided.update(d.wait_for(lambda e: e.get("event") in ("terminate", "kill") and e.get("pid") == pid,
                                          timeout=60, what="memguard's decision on the thrashing job"))
                assert wait_exit(pid, 30)

            with_mg, how_with = _thrash(box, None, memguard_stops)
        finally:
            d.stop()
    finally:
        box.cleanup()
        dcg.cleanup()
    box = _swap_box()  # a fresh cgroup: nothing of the first run is charged to it
    try:
        without, how_without = _thrash(box, 12.0)
    finally:
        box.cleanup()
    print(f"\nswap thrash: probe's worst stall with memguard {with_mg:.2f} s (job stopped by {how_with}: rule "
          f"{decided.get('rule')}, {decided.get('message')}); without memguard {without:.2f} s (job ended by "
          f"{how_without}); {trigger}")
    assert decided["signal"].startswith("psi."), decided
    assert with_mg < 1.0, (with_mg, how_with)
    assert not how_without.startswith("memguard"), how_without  # the control ran alone


# ---------------------------------------------------------------------------
# 3. Hangs: a deadlock at 0 % CPU, a spin at 100 % CPU without progress


def test_hung_jobs_are_stopped_by_progress_rules_with_an_event_that_says_why(tmp_path):
    """Below every memory threshold: a worker that deadlocks (every thread asleep on a lock: 0 % CPU) is
    stopped by {worker.cpu < 1%, for: 3s}; a worker spinning at 100 % CPU with no output and no I/O is stopped
    by {worker.quiet > 5s and worker.cpu > 30%}; a hand-started process matched by an unmanaged: entry with
    the same deadlock rule is adopted as an ad-hoc worker and stopped too. Each stop's event names the rule,
    the reading and its value; the exits are reported. (On cgroup v1, the deadlocked workload's
    limits.memory_high is said to be ignored, once.)"""
    cg = make_cgroup(1 * GiB)
    hand = None
    try:
        bursty = str(HELPERS / "bursty.py")
        cfg = f"""
            poll_interval: 500ms
            scope: auto
            workloads: workloads.d/
            log: {{format: json, level: info}}
            unmanaged:
              - name: by-hand
                cmdline: "bursty\\\\.py .*--name byhand"
                cgroup: "{cg.path.name}"
                rules:
                  - {{name: deadlock, when: "worker.cpu < 1%", for: 3s, action: terminate, grace: 2s}}
            rules:
              - {{name: last-resort, when: "memory.available < 5%", action: kill}}
            """
        workloads = {
            "hang": f"""
                command: {json.dumps([PY, bursty, "--burst", "32", "--max", "64", "--then", "hang"])}
                restart: {{policy: never}}
                limits: {{memory: 512MiB, memory_high: 400MiB}}
                rules:
                  - {{name: deadlock, when: "worker.cpu < 1%", for: 3s, action: terminate, grace: 2s}}
                """,
            "spin": f"""
                command: {json.dumps([PY, bursty, "--burst", "32", "--max", "64", "--then", "spin"])}
                restart: {{policy: never}}
                rules:
                  - {{name: spinning, when: "worker.quiet > 5s and worker.cpu > 30%", action: terminate, grace: 2s}}
                """,
        }
        d = daemon_in(tmp_path, cfg, cg, workloads)
        try:
            d.event("started")
            hand = Proc([PY, bursty, "--burst", "32", "--max", "64", "--then", "hang", "--name", "byhand"], cg)
            hand_pid = hand.pid
            hang = d.wait_for(lambda e: e.get("event") == "terminate" and e.get("worker") == "hang-0", timeout=60,
                              what="the deadlocked worker stopped")
            spin = d.wait_for(lambda e: e.get("event") == "terminate" and e.get("worker") == "spin-0", timeout=60,
                              what="the spinning worker stopped")
            joined = d.wait_for(lambda e: e.get("event") == "joined" and e.get("pid") == hand_pid, timeout=30,
                                what="the hand-started job adopted")
            adopted = d.wait_for(lambda e: e.get("event") == "terminate" and e.get("worker") == joined["worker"],
                                 timeout=60, what="the adopted job stopped")
            for ev in (hang, spin, adopted):
                d.wait_for(lambda e, w=ev["worker"]: e.get("event") == "exit" and e.get("worker") == w, timeout=20,
                           what=f"exit of {ev['worker']}")
        finally:
            d.stop()
    finally:
        if hand is not None:
            hand.stop(signal.SIGKILL)
        cg.cleanup()
    assert hang["rule"] == "deadlock" and hang["signal"] == "worker.cpu" and hang["value"] < 1.0
    assert "worker.cpu" in hang["message"] and "deadlock" in hang["message"]
    assert spin["rule"] == "spinning" and spin["signal"] == "worker.quiet" and spin["value"] > 5
    assert adopted["rule"] == "deadlock" and adopted["signal"] == "worker.cpu"
    assert joined["origin"] == "unmanaged" and joined["worker"] == f"by-hand-{hand_pid}"
    high = [e for e in d.events if e.get("event") == "memory_high_ignored"]
    if cg.version == 1:  # memory.high is a cgroup v2 setting: said once, at the workload's first start
        assert len(high) == 1 and "cgroup v1" in high[0]["message"] and high[0]["workload"] == "hang"
    else:
        assert not high
    print(f"\nhangs: {hang['message']}\n       {spin['message']}\n       {adopted['message']}")


# ---------------------------------------------------------------------------
# 4. memguard run next to a daemon: the admission queue


def _run(cg: daemonkit.TestCgroup, socket: str, *args: str) -> Proc:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return Proc(MEMGUARD + ["run", "--socket", socket, *args], cg, env=env, stderr=True)


def test_memguard_run_jobs_wait_for_memory_one_after_the_other(tmp_path):
    """With a daemon guarding a 1 GiB cgroup, two `memguard run --wait-free 600MiB` jobs that each take
    500 MiB (together they do not fit) run one after the other: the first is admitted, joins the daemon as
    an ad-hoc worker named in its events, grows, holds its memory 3 s and exits; the second, started while
    the first runs, waits in the daemon's queue (its place and the memory promised to the first are in the
    'queued' event) and starts only after the first has ended; both joined, both exit 0."""
    cg = make_cgroup(1 * GiB)
    first = second = None
    try:
        d = daemon_in(tmp_path, """
            poll_interval: 500ms
            scope: auto
            log: {format: json, level: info}
            rules:
              - {name: last-resort, when: "memory.available < 3%", action: kill}
            """, cg)
        try:
            d.event("started")
            sock = str(tmp_path / "run" / "control.sock")
            job = [PY, str(HELPERS / "bursty.py"), "--burst", "100", "--max", "500", "--pause", "0.1",
                   "--then", "exit", "--hold-s", "3"]
            first = _run(cg, sock, "--wait-free", "600MiB", "--name", "first", "--", *job)
            j1 = d.event("joined", timeout=30)
            assert j1["worker"].startswith("first-") and j1["adhoc"] is True
            second = _run(cg, sock, "--wait-free", "600MiB", "--name", "second", "--", *job)
            queued = d.event("queued", timeout=30)
            assert first.p.wait(60) == 0 and second.p.wait(60) == 0
            j2 = d.wait_for(lambda e: e.get("event") == "joined" and e.get("worker", "").startswith("second-"),
                            timeout=30, what="the second job joined")
            for j in (j1, j2):
                d.wait_for(lambda e, w=j["worker"]: e.get("event") == "exit" and e.get("worker") == w, timeout=30,
                           what=f"exit of {j['worker']}")
            admitted = [e for e in d.events if e.get("event") == "admitted"]
        finally:
            d.stop()
    finally:
        for p in (first, second):
            if p is not None:
                p.stop(signal.SIGKILL)
        cg.cleanup()
    first_end = float(first.wait_line(r"^exiting ").split()[1])
    second_start = float(second.wait_line(r"^pid ").split()[2])
    assert second_start > first_end, "the second job started while the first still held its memory"
    assert [a["job"] for a in admitted] == ["first", "second"] and admitted[1]["waited_s"] > 0
    second.wait_line(r"joined the memguard daemon as ad-hoc worker second-", stream="err")
    print(f"\nmemguard run queue: {queued['message']}; then {admitted[1]['message']}; the second job started "
          f"{second_start - first_end:.2f} s after the first ended")


def test_wait_free_without_a_daemon_waits_for_memory_alone(tmp_path):
    """Without a daemon (nothing listens on the socket), `memguard run --wait-free` waits until the scope
    has that much available: in a 1 GiB cgroup where a balloon holds 700 MiB, a job asking for 500 MiB
    waits (and says so), starts once the balloon is gone and exits 0; with --wait-timeout it gives up
    with exit code 75."""
    cg = make_cgroup(1 * GiB)
    balloon = job = None
    try:
        balloon = Proc([PY, str(HELPERS / "bursty.py"), "--burst", "100", "--max", "700", "--pause", "0"], cg)
        balloon.wait_line(r"^grown 700")
        nowhere = str(tmp_path / "no-daemon.sock")
        timeout = _run(cg, nowhere, "--wait-free", "500MiB", "--wait-timeout", "1s", "--", PY, "-c", "pass")
        assert timeout.p.wait(30) == 75
        timeout.drain()
        assert any("--wait-timeout" in line for line in timeout.err), timeout.err
        job = _run(cg, nowhere, "--wait-free", "500MiB", "--", PY, "-c", "print('job ran')")
        job.wait_line(r"waiting for 500MiB free", stream="err")
        assert job.p.poll() is None and "job ran" not in job.lines
        balloon.stop(signal.SIGKILL)
        assert job.p.wait(30) == 0
        job.drain()
        assert "job ran" in job.lines
    finally:
        for p in (balloon, job):
            if p is not None:
                p.stop(signal.SIGKILL)
        cg.cleanup()
