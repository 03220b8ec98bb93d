"""memguard's Optuna integration with real Optuna, a real SQLite study and real worker processes.

The worker (tests/helpers/optuna_worker.py) runs
``memguard.integrations.optuna.optimize``; chosen trials print a line and
wait on stdin, so the test signals the process exactly in the middle of a
trial (or between trials) without sleeping. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from controlkit import ServerThread  # noqa: E402
from memguard.integrations.optuna import _retry_callback  # noqa: E402

_RETRY = _retry_callback(1)


def retried_trial_number(trial: Any) -> int | None:
    """Optuna's own answer (RetryFailedTrialCallback.retried_trial_number, renamed in Optuna 4.9)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(_RETRY).retried_trial_number(trial)


def retry_history(trial: Any) -> list[int]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(_RETRY).retry_history(trial)

from daemonkit import Daemon, make_cgroup, wait_gone, write_config  # noqa: E402
from memguard.act.control import pid_in_tree  # noqa: E402

WORKER = str(Path(__file__).parent / "helpers" / "optuna_worker.py")
STUDY = "search"
PROC_DEADLINE_S = 60.0
GiB = 1024**3  # importing optuna and sqlalchemy takes a few seconds on a slow machine


class Worker:
    """One worker process; its stdout lines arrive in a queue."""

    def __init__(self, storage: str, n_trials: int, hold: str = "", env: dict[str, str] | None = None,
                 max_retry: int = 1) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
        full_env.update({"HOLD_CALLS": hold, "MAX_RETRY": str(max_retry), "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, WORKER, storage, STUDY, str(n_trials)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=full_env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._pumps = [threading.Thread(target=self._pump, daemon=True),
                       threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._pumps:
            t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, prefix: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=PROC_DEADLINE_S)
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r}; stderr:\n{''.join(self.stderr)}") from None
            if line is None:
                self.proc.wait(PROC_DEADLINE_S)
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {prefix!r}; "
                                     f"stderr:\n{''.join(self.stderr)}")
            if line.startswith(prefix):
                return line

    def in_trial(self) -> tuple[int, dict[str, Any]]:
        _, number, params = self.expect("in-trial ").split(" ", 2)
        return int(number), json.loads(params)

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self) -> int:
        rc = self.proc.wait(PROC_DEADLINE_S)
        if self.proc.stdin:
            self.proc.stdin.close()
        for t in self._pumps:
            t.join(PROC_DEADLINE_S)  # all of its output has been read
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(PROC_DEADLINE_S)


@pytest.fixture
def storage(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name=STUDY, storage=url)
    return url


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def trials(storage: str) -> list[Any]:
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def by_state(storage: str, state: TrialState) -> list[Any]:
    return [t for t in trials(storage) if t.state == state]


# ---------------------------------------------------------------------------


def test_sigint_mid_trial_fails_the_trial_and_requeues_it_once(storage: str, workers: list[Worker]) -> None:
    """SIGINT in the middle of a trial leaves that trial FAIL (not RUNNING) with the memguard_stopped
    attribute, queues one retry with the same parameters through Optuna's own retry callback (so
    retried_trial_number() names the original), and the process ends by SIGINT. When the retry is
    interrupted too (by SIGTERM this time) it is FAIL as well and not queued again: max_retry=1."""
    w = Worker(storage, n_trials=3, hold="2")
    workers.append(w)
    number, params = w.in_trial()
    assert number == 1
    w.proc.send_signal(signal.SIGINT)
    assert w.wait() == -signal.SIGINT
    err = "".join(w.stderr)
    assert "memguard: stopped by SIGINT; trial 1 failed and was requeued" in err
    assert "Traceback" not in err, err
    t = {tr.number: tr for tr in trials(storage)}
    assert t[0].state == TrialState.COMPLETE
    assert t[1].state == TrialState.FAIL
    assert t[1].user_attrs["memguard_stopped"] == "SIGINT" and t[1].user_attrs["memguard_started"] is True
    assert t[2].state == TrialState.WAITING
    assert retried_trial_number(t[2]) == 1 and retry_history(t[2]) == [1]
    assert t[2].params == params == t[1].params
    assert not by_state(storage, TrialState.RUNNING)

    w2 = Worker(storage, n_trials=3, hold="1")
    workers.append(w2)
    number, retried = w2.in_trial()
    assert number == 2 and retried == params  # the retry runs first, with the same parameters
    w2.proc.send_signal(signal.SIGTERM)
    assert w2.wait() != 0
    t = {tr.number: tr for tr in trials(storage)}
    assert t[2].state == TrialState.FAIL and t[2].user_attrs["memguard_stopped"] == "SIGTERM"
    assert not by_state(storage, TrialState.WAITING), "a retry was enqueued beyond max_retry"
    assert not by_state(storage, TrialState.RUNNING)


def test_study_completes_its_trials_across_a_restart(storage: str, workers: list[Worker]) -> None:
    """A worker interrupted by SIGINT in trial 2 of 5, then started again, finishes the study: exactly
    n_trials COMPLETE trials in all, the interrupted trial's retry among them with its parameters,
    nothing left RUNNING or WAITING, and the second process exits 0."""
    w = Worker(storage, n_trials=5, hold="3")
    workers.append(w)
    number, params = w.in_trial()
    assert number == 2
    w.proc.send_signal(signal.SIGINT)
    assert w.wait() == -signal.SIGINT
    assert len(by_state(storage, TrialState.COMPLETE)) == 2

    w2 = Worker(storage, n_trials=5)
    workers.append(w2)
    w2.expect("done")
    assert w2.wait() == 0
    complete = by_state(storage, TrialState.COMPLETE)
    assert len(complete) == 5
    retry = [t for t in complete if retried_trial_number(t) == 2]
    assert len(retry) == 1 and retry[0].params == params
    assert [t.number for t in by_state(storage, TrialState.FAIL)] == [2]
    assert not by_state(storage, TrialState.RUNNING) and not by_state(storage, TrialState.WAITING)

    w3 = Worker(storage, n_trials=5)  # the study is complete: a restarted worker exits at once
    workers.append(w3)
    w3.expect("done")
    assert w3.wait() == 0
    assert len(trials(storage)) == 6


def test_a_killed_workers_trial_is_failed_by_the_heartbeat_and_retried(storage: str, workers: list[Worker]) -> None:
    """SIGKILL mid-trial leaves the trial RUNNING (Optuna cannot record anything). With rdb_storage()'s
    heartbeat (1 s, grace 2 s) the restarted worker fails that stale trial at a later ask(), Optuna's
    retry callback enqueues it once with the same parameters, and the study still ends with exactly
    n_trials COMPLETE trials and nothing RUNNING."""
    w = Worker(storage, n_trials=10, hold="2", env={"HEARTBEAT_S": "1"})
    workers.append(w)
    number, params = w.in_trial()
    w.proc.send_signal(signal.SIGKILL)
    assert w.wait() == -signal.SIGKILL
    assert [t.number for t in by_state(storage, TrialState.RUNNING)] == [number]

    # The remaining trials, 0.8 s each, take three times the 2 s grace period (a margin for a loaded machine:
    # the stale trial is found at the first ask() made more than 2 s after its last heartbeat)
    w2 = Worker(storage, n_trials=10, env={"HEARTBEAT_S": "1", "TRIAL_SECONDS": "0.8"})
    workers.append(w2)
    w2.expect("done")
    assert w2.wait() == 0
    t = {tr.number: tr for tr in trials(storage)}
    assert t[number].state == TrialState.FAIL
    retried = [tr for tr in t.values() if tr.system_attrs.get("failed_trial") == number]
    assert len(retried) == 1 and retried[0].params == params
    assert len(by_state(storage, TrialState.COMPLETE)) == 10
    assert not by_state(storage, TrialState.RUNNING)


def test_stop_while_blocked_between_trials_touches_no_trial(storage: str, workers: list[Worker],
                                                            tmp_path: Path) -> None:
    """Under memguard (real control socket and admission file): the worker reports trial start and end;
    when memguard closes the gate, the worker waits *between* trials, reports `refused` once, and a
    SIGINT then ends it with no trial RUNNING or FAIL. Started again with the gate open, it finishes
    the study."""
    sock = str(tmp_path / "run" / "control.sock")
    gate = tmp_path / "run" / "gate"
    holder: dict[str, int] = {}
    srv = ServerThread(sock, identify=lambda w, pid: "pid" in holder and pid_in_tree(pid, holder["pid"])).start()
    try:
        gate.write_text("open\n")
        env = {"MEMGUARD_SOCKET": sock, "MEMGUARD_TOKEN": srv.token, "MEMGUARD_WORKER": "trials-0",
               "MEMGUARD_ADMISSION_FILE": str(gate)}
        w = Worker(storage, n_trials=4, hold="2", env=env)
        workers.append(w)
        holder["pid"] = w.proc.pid
        number, _ = w.in_trial()
        assert number == 1
        ev = [srv.next_event() for _ in range(5)]
        # Each trial is claimed before Optuna creates it (no name yet), then named, then ended.
        assert [(e.kind, e.name, e.ok) for e in ev] == [
            ("start", None, None), ("start", "trial-0", None), ("end", "trial-0", True),
            ("start", None, None), ("start", "trial-1", None)]
        gate.write_text("closed: rule hold-trials\n")
        w.release()  # trial 1 finishes; the next one must wait at the gate, before it is claimed
        assert [(e.kind, e.ok) for e in (srv.next_event(),)] == [("end", True)]
        refused = srv.next_event()
        assert (refused.kind, refused.detail) == ("refused", "rule hold-trials")
        w.proc.send_signal(signal.SIGINT)
        assert w.wait() == -signal.SIGINT
        assert [t.state for t in trials(storage)] == [TrialState.COMPLETE, TrialState.COMPLETE]
        assert srv.events.empty()
    finally:
        srv.stop()

    gate.write_text("open\n")
    w2 = Worker(storage, n_trials=4, env={"MEMGUARD_ADMISSION_FILE": str(gate)})
    workers.append(w2)
    w2.expect("done")
    assert w2.wait() == 0
    assert [t.state for t in trials(storage)] == [TrialState.COMPLETE] * 4


def test_memory_error_is_caught_and_the_worker_goes_on(tmp_path: Path) -> None:
    """optimize() uses catch=(MemoryError,): a trial raising MemoryError is FAIL, is not retried (it
    was not stopped by memguard), and the study still reaches n_trials COMPLETE trials. Runs in this
    process, outside memguard, where the integration is a plain Optuna loop."""
    from memguard.integrations.optuna import optimize

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'm.db'}")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def objective(trial: Any) -> float:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise MemoryError("pretend")
        return x

    optimize(study, objective, n_trials=3)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    assert TrialState.WAITING not in states
    assert {s: signal.getsignal(s) for s in before} == before, "signal handlers were not restored"
    with pytest.raises(ValueError, match="n_jobs"):
        optimize(study, objective, n_trials=3, n_jobs=2)


def test_a_stop_during_optunas_own_bookkeeping_is_held_until_the_loop_ends(tmp_path: Path) -> None:
    """A real SIGINT delivered while Optuna runs its callbacks (outside any objective) does not cut
    that work short: it is held, the loop stops after the trial, every trial is COMPLETE (none FAIL,
    RUNNING or requeued), and optimize() then raises KeyboardInterrupt. A later optimize() call starts
    clean and finishes the study."""
    from memguard.integrations.optuna import optimize

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'h.db'}")
    seen: list[int] = []

    def signal_self_after_trial_1(study: Any, trial: Any) -> None:
        seen.append(trial.number)
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled right here, at the next bytecode
            seen.append(-1)  # still running: the handler held the stop instead of raising

    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT"):
        optimize(study, lambda t: t.suggest_float("x", 0, 1), n_trials=5, callbacks=[signal_self_after_trial_1])
    assert seen == [0, 1, -1]
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 2
    optimize(study, lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 5


# ---------------------------------------------------------------------------
# the real daemon


def _daemon_with_control(cfg: Path) -> Daemon:
    """The real `memguard daemon`; skips the test while the daemon does not serve the control socket."""
    d = Daemon(cfg)
    d.event("started")
    d.event("spawn", timeout=30)
    if not (cfg.parent / "run" / "control.sock").exists():
        d.stop()
        pytest.skip("the daemon does not serve the control socket (runtime_dir/control.sock)")
    return d


@pytest.mark.slow
def test_daemon_restarts_a_leaking_blocked_worker_and_the_study_completes(tmp_path: Path, storage: str) -> None:
    """The first incident with memguard in charge: a worker leaking 40 MiB per trial is blocked by its
    own rule, and instead of refusing trials for ever it is restarted (restart_when_blocked) while it
    waits between trials; the study still reaches its n_trials COMPLETE trials, nothing is left
    RUNNING, and every trial a stop failed was requeued."""
    cfg = write_config(tmp_path, """
        poll_interval: 200ms
        scope: host
        workloads: workloads.d/
        """, {"study": f"""
        name: study
        command: {json.dumps([sys.executable, WORKER, storage, STUDY, "12"])}
        environment: {{LEAK_MIB: "40", TRIAL_SECONDS: "0.1", PYTHONUNBUFFERED: "1"}}
        limits: {{memory: 1GiB}}
        stop_signal: SIGINT
        grace: 10s
        rules:
          - {{name: hold-trials, when: "worker.memory > 300MiB", action: block, release: "worker.memory < 200MiB"}}
        restart_when_blocked: {{after: 2s}}
        restart: {{policy: on-failure, backoff: 100ms..1s, budget: 20/1m}}
        """})
    d = _daemon_with_control(cfg)
    try:
        block = d.event("block", worker="study-0", timeout=60)
        assert block["rule"] == "hold-trials"
        restart = d.wait_for(lambda e: e.get("event") == "restart" and e.get("rule") == "restart_when_blocked",
                             timeout=60, what="restart by restart_when_blocked")
        assert restart["signal_sent"] == "SIGINT"
        assert d.event("exit", worker="study-0", timeout=30)["cause"] == "stopped"
        done = d.wait_for(lambda e: e.get("event") == "exit" and e.get("returncode") == 0, timeout=120,
                          what="the worker exiting 0 once the study is complete")
        assert done["worker"] == "study-0"
    finally:
        assert d.stop() == 0
    assert len(by_state(storage, TrialState.COMPLETE)) >= 12
    assert not by_state(storage, TrialState.RUNNING) and not by_state(storage, TrialState.WAITING)
    retried = {retried_trial_number(t) for t in trials(storage)}
    for t in by_state(storage, TrialState.FAIL):
        assert "memguard_stopped" in t.user_attrs and t.number in retried, t


@pytest.mark.slow
def test_daemon_terminates_a_stuck_trial_which_is_failed_and_retried(tmp_path: Path, storage: str) -> None:
    """A trial that hangs past trial_timeout makes memguard stop the worker with SIGINT: the trial is
    recorded FAIL (not RUNNING), its parameters are requeued once, the worker is started again and the
    study completes its n_trials, the retry among them."""
    cfg = write_config(tmp_path, """
        poll_interval: 200ms
        scope: host
        workloads: workloads.d/
        """, {"study": f"""
        name: study
        command: {json.dumps([sys.executable, WORKER, storage, STUDY, "4"])}
        environment: {{HANG_CALLS: "2", PYTHONUNBUFFERED: "1"}}
        stop_signal: SIGINT
        grace: 10s
        trial_timeout: 2s
        restart: {{policy: on-failure, backoff: 100ms..1s, budget: 5/1m}}
        """})
    d = _daemon_with_control(cfg)
    try:
        stop = d.wait_for(lambda e: e.get("event") in ("terminate", "restart") and e.get("worker") == "study-0",
                          timeout=60, what="memguard stopping the stuck worker")
        assert stop["signal_sent"] == "SIGINT" and stop["rule"] == "trial_timeout"
        failed = d.event("trial_failed", worker="study-0", timeout=30)
        assert failed["trial"] == "trial-1"
        d.wait_for(lambda e: e.get("event") == "exit" and e.get("returncode") == 0, timeout=120,
                   what="the restarted worker exiting 0 once the study is complete")
    finally:
        assert d.stop() == 0
    t = {tr.number: tr for tr in trials(storage)}
    assert t[1].state == TrialState.FAIL and t[1].user_attrs["memguard_stopped"].startswith("SIGINT")
    retry = [tr for tr in t.values() if retried_trial_number(tr) == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t[1].params
    assert len(by_state(storage, TrialState.COMPLETE)) == 4
    assert not by_state(storage, TrialState.RUNNING)


def _blocked_seconds(events: list[dict], worker: str, end: float) -> float:
    """Seconds the worker's gate was closed: from each `block` to the next `release`, or its `exit`."""
    def at(e: dict) -> float:
        return datetime.fromisoformat(e["timestamp"]).timestamp()

    total, since = 0.0, None
    for e in events:
        if e.get("worker") != worker:
            continue
        if e.get("event") == "block" and since is None:
            since = at(e)
        elif e.get("event") in ("release", "exit") and since is not None:
            total += at(e) - since
            since = None
    return total + (end - since if since is not None else 0.0)


@pytest.mark.slow
def test_a_leaking_study_finishes_in_a_memory_limited_cgroup_with_workers_rarely_blocked(tmp_path: Path,
                                                                                         storage: str) -> None:
    """The incident replayed small: two Optuna workers share a study; each trial keeps 8 MiB for ever; each
    worker may use 320 MiB (its cgroup's hard limit), so without memguard each would be OOM-killed around
    its 28th trial. With block at 70 % and restart_when_blocked (defaults), all 60 trials finish, the kernel
    OOM killer never fires, the brake restarts workers on the reclaim's evidence, and each worker spends
    under 10 % of the wall time blocked (the old 2-minute timer left them blocked about 95 % of it)."""
    memcg = make_cgroup(int(1.5 * GiB))
    cfg = write_config(tmp_path, """
        scope: host
        workloads: workloads.d/
        """, {"study": f"""
        name: study
        command: {json.dumps([sys.executable, WORKER, storage, STUDY, "60"])}
        replicas: 2
        environment: {{LEAK_MIB: "8", TRIAL_SECONDS: "0.15", PYTHONUNBUFFERED: "1"}}
        limits: {{memory: 320MiB}}
        stop_signal: SIGINT
        rules:
          - {{name: hold-trials, when: "worker.memory > 70%", action: block, release: "worker.memory < 50%"}}
        restart_when_blocked: true
        restart: {{policy: on-failure, backoff: 200ms..2s, budget: 3/10m}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        start = d.event("started", timeout=30)
        for w in ("study-0", "study-1"):
            d.wait_for(lambda e, w=w: e.get("event") == "completed" and e.get("worker") == w, timeout=240,
                       what=f"{w} exiting 0 once the study is complete")
        end = datetime.fromisoformat(d.events[-1]["timestamp"]).timestamp()
        wall = end - datetime.fromisoformat(start["timestamp"]).timestamp()
        brakes = [e for e in d.events if e.get("event") == "restart" and e.get("rule") == "restart_when_blocked"]
        assert brakes and all("reclaim took its memory from" in e["message"] for e in brakes), brakes
        assert not [e for e in d.events if e.get("cause") == "kernel_oom" or e.get("event") == "failed"]
        assert memcg.oom_kills() == 0
        for w in ("study-0", "study-1"):
            blocked = _blocked_seconds(d.events, w, end)
            assert blocked < 0.10 * wall, f"{w} blocked {blocked:.1f} s of {wall:.1f} s"
    finally:
        d.stop()
        memcg.cleanup()
    assert len(by_state(storage, TrialState.COMPLETE)) >= 60
    assert not by_state(storage, TrialState.RUNNING)


@pytest.mark.slow
def test_memguard_killed_just_after_a_trial_starts_leaves_no_trial_running(tmp_path: Path, storage: str) -> None:
    """memguard is SIGKILLed right after a trial starts (its sentinel then kills the worker: the trial stays
    RUNNING, with no heartbeat row to go stale). Started again, the same worker's next start fails that trial
    and queues it again through Optuna's retry callback before it asks for a new one: at the end nothing is
    RUNNING, the study has its trials, and retried_trial_number() names the interrupted trial."""
    cfg = write_config(tmp_path, """
        scope: host
        workloads: workloads.d/
        """, {"study": f"""
        name: study
        command: {json.dumps([sys.executable, WORKER, storage, STUDY, "6"])}
        environment: {{HANG_ONCE: {json.dumps(str(tmp_path / "hung"))}, HEARTBEAT_S: "60", PYTHONUNBUFFERED: "1"}}
        stop_signal: SIGINT
        restart: {{policy: on-failure, backoff: 100ms..1s}}
        """})
    d = _daemon_with_control(cfg)
    try:
        hang = d.wait_for(lambda e: e.get("event") == "output" and str(e.get("line", "")).startswith("hanging "),
                          timeout=60, what="a trial that started")
        os.kill(d.proc.pid, signal.SIGKILL)
        late_ms = (time.monotonic() - float(hang["line"].split()[2])) * 1000
        d.proc.wait(10)
        number = int(hang["line"].split()[1])
    finally:
        d.stop()
    running = by_state(storage, TrialState.RUNNING)
    assert [t.number for t in running] == [number], f"killed {late_ms:.0f} ms after the trial began"
    owner = running[0].user_attrs["memguard_owner"]
    assert owner["worker"] == "study-0"
    assert wait_gone([owner["pid"]], 20.0) == [], "the sentinel did not end the worker with memguard"

    d2 = _daemon_with_control(cfg)
    try:
        requeued = d2.event("trial_requeued", worker="study-0", timeout=60)
        assert requeued["trial"] == f"trial-{number}" and "queued again" in requeued["message"]
        d2.wait_for(lambda e: e.get("event") == "completed" and e.get("worker") == "study-0", timeout=120,
                    what="the worker exiting 0 once the study is complete")
    finally:
        assert d2.stop() == 0
    t = {tr.number: tr for tr in trials(storage)}
    assert t[number].state == TrialState.FAIL
    retry = [tr for tr in t.values() if retried_trial_number(tr) == number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == t[number].params
    assert not by_state(storage, TrialState.RUNNING)
    assert len(by_state(storage, TrialState.COMPLETE)) == 6


def test_the_oldest_supported_optuna_passes_the_integration_tests(tmp_path: Path) -> None:
    """The integration uses only Optuna's public API, so it works on the oldest Optuna pyproject.toml allows as
    well as on the newest: this installs that release (from the package index, into a temporary directory)
    and runs the tests of stops, retries and trials left RUNNING against it."""
    import re
    import subprocess

    floor = re.search(r'"optuna>=([0-9.]+)"', (Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert floor is not None
    target = tmp_path / "optuna-old"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                          f"optuna=={floor.group(1)}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"optuna=={floor.group(1)} cannot be installed here: {pip.stderr.strip()[-300:]}")
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = subprocess.run([sys.executable, "-c", "import optuna; print(optuna.__version__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().startswith(floor.group(1)), probe.stdout + probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "sigint_mid_trial or memguard_killed or held_until"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
