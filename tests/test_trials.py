"""Trial-aware supervision: the two restart budgets, the brake, trial claims.

First the decision core in virtual time (corekit.Sim), then the whole
daemon in-process over fake ports (the pump provides the brake's fresh
reading), then the real daemon with the real client and real processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corekit import GiB, MiB, Sim, daemon, rule, signals, workload
from daemonkit import HELPERS, Daemon, make_cgroup, write_config
from memguard.decide.rules import BRAKE_ANSWER_S
from memguard.decide.state import Phase
from memguard.model import UNKNOWN, Notice, Reclaim, SetAdmission, Shutdown, Spawn, TrialEvent
from memguard.policy import Brake, Recycle, RestartPolicy


def notices(sim: Sim, event: str) -> list[Notice]:
    return [a for _, a in sim.log if isinstance(a, Notice) and a.event == event]


def spawns(sim: Sim, worker: str = "w-0") -> int:
    return sum(1 for _, a in sim.log if isinstance(a, Spawn) and a.worker == worker)


# ---------------------------------------------------------------------------
# Two budgets


def test_planned_restarts_never_spend_the_failure_budget():
    """A worker recycled after every trial, with a failure budget of 3: 2000 trials in virtual time, dozens
    of planned restarts, and the worker is never failed; restart.planned (5 in 10 s) paces the recycling and
    says so. Then 4 crashes in a row do fail it: the failure budget still holds."""
    wl = workload(recycle=Recycle(max_trials=1),
                  restart=RestartPolicy(backoff_min_s=0.1, backoff_max_s=1, budget_count=3, budget_window_s=600))
    sim = Sim(daemon(wl))
    sim.start()
    sim.tick(0.05)
    done = 0
    while done < 2000:
        w = sim.state.workers["w-0"]
        if w.phase == Phase.RUNNING and w.admission_open and w.trial_started_at is None:
            sim.trial("w-0", "start")
            sim.tick(0.01)
            sim.trial("w-0", "end", ok=True)
            done += 1
        for a in signals(sim.tick(0.05)):
            sim.exit("w-0", sig=a.signum)  # a recycled worker exits on its stop signal
    assert sim.state.workers["w-0"].phase == Phase.RUNNING
    assert not notices(sim, "failed")
    restarts = [a for _, a in sim.log if getattr(a, "event", "") == "restart"]
    assert len(restarts) > 3 * 10, len(restarts)  # ten times the failure budget
    assert notices(sim, "restart_postponed"), "restart.planned never had to pace the recycling"
    starts = [t for t, a in sim.log if isinstance(a, Spawn)]
    for i, t0 in enumerate(starts):
        assert len([t for t in starts[i:] if t - t0 < 10.0]) <= 5 + 1, "more planned restarts than restart.planned"
    for _ in range(4):
        sim.tick(0.05)
        sim.exit("w-0", returncode=1)
        sim.run(1.2, 0.1)
    assert sim.state.workers["w-0"].phase == Phase.FAILED
    assert "planned restarts are not counted" in notices(sim, "failed")[0].reason


def test_operator_restarts_and_clean_exits_are_planned_and_crashes_are_not():
    """An operator's restart and a clean exit under restart: always are counted in restart.planned and never
    fail the slot; a kernel OOM kill, a crash and a stop by a terminate rule spend restart.budget."""
    from memguard.model import Operator

    wl = workload(restart=RestartPolicy(mode="always", backoff_min_s=0.1, backoff_max_s=0.1, budget_count=2,
                                        budget_window_s=600),
                  rules=(rule("worker.memory > 100%", "terminate", name="over"),))
    sim = Sim(daemon(wl))
    sim.start()
    for _ in range(6):
        sim.run(0.3, 0.1)
        sim.command(Operator("restart", "w-0"))
        sim.exit("w-0", sig=15)
        sim.run(0.3, 0.1)
        sim.exit("w-0", returncode=0)
    sim.run(0.5, 0.1)
    w = sim.state.workers["w-0"]
    assert w.phase == Phase.RUNNING and w.restarts == () and len(w.planned) >= 5
    sim.exit("w-0", sig=9, kernel_oom=True)
    sim.run(0.5, 0.1)
    sim.exit("w-0", returncode=3)
    sim.run(0.5, 0.1)
    sim.memory["w-0"] = 2 * GiB
    for a in signals(sim.run(0.3, 0.1)):
        sim.exit("w-0", sig=a.signum)
    sim.run(0.5, 0.1)
    assert sim.state.workers["w-0"].phase == Phase.FAILED
    assert notices(sim, "failed")[0].fields["restarts"] == 2


# Hypothesis: trial reports, crashes, leaks and reclaim answers in any order.
ops = st.lists(st.one_of(
    st.tuples(st.just("trial"), st.floats(0.01, 2.0)),
    st.tuples(st.just("trial"), st.floats(0.01, 0.3)),
    st.tuples(st.just("trial"), st.floats(0.01, 0.3)),
    st.tuples(st.just("crash"), st.sampled_from([1, -9])),
    st.tuples(st.just("mem"), st.sampled_from([0.2, 0.5, 0.85, 0.95, None])),
    st.tuples(st.just("reclaimed"), st.just(0)),
    st.tuples(st.just("wait"), st.floats(0.05, 12.0)),
    st.tuples(st.just("wait"), st.floats(0.05, 1.0)),
), min_size=5, max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
@example([("trial", 0.05), ("wait", 0.5)] * 10)  # recycles back to back: restart.planned must pace them
def test_budgets_hold_for_any_mix_of_planned_restarts_and_failures(script):
    """Invariant 5 with two budgets: in any restart.budget window at most `budget` restarts follow failures,
    in any restart.planned window at most `planned` recycle or brake restarts are carried out, a slot is failed
    only after a failure, and a recycle or brake restart never signals a worker in the middle of a trial."""
    budget, window, planned, pwindow = 3, 60.0, 2, 10.0
    wl = workload(rules=(rule("worker.memory > 80%", "block", release="worker.memory < 50%", name="hold"),),
                  brake=Brake(enabled=True, after_s=20.0), recycle=Recycle(max_trials=1),
                  restart=RestartPolicy(backoff_min_s=0.2, backoff_max_s=1.0, budget_count=budget,
                                        budget_window_s=window, planned_count=planned, planned_window_s=pwindow))
    sim = Sim(daemon(wl))
    sim.start()
    failures: list[float] = []
    stops: list[tuple[float, str]] = []

    def tick(dt: float) -> None:
        for a in signals(sim.tick(dt)):
            w = sim.state.workers["w-0"]
            if a.event == "restart":
                assert w.trial_started_at is None, "a planned restart signalled a worker in a trial"
                stops.append((sim.now, w.stop.reason))
            sim.exit("w-0", sig=a.signum)

    for op in script:
        w = sim.state.workers["w-0"]
        running = w.phase == Phase.RUNNING
        if op[0] == "trial" and running and w.admission_open and w.trial_started_at is None:
            sim.trial("w-0", "start")
            steps = max(1, int(op[1] / 0.1))
            for _ in range(steps):
                tick(0.1)
            if sim.state.workers["w-0"].phase == Phase.RUNNING and sim.state.workers["w-0"].incarnation == w.incarnation:
                sim.trial("w-0", "end", ok=True)
        elif op[0] == "crash" and running:
            sim.exit("w-0", returncode=1 if op[1] == 1 else None, sig=9 if op[1] == -9 else None)
            failures.append(sim.now)
        elif op[0] == "mem":
            sim.memory["w-0"] = UNKNOWN if op[1] is None else op[1] * GiB
        elif op[0] == "reclaimed" and running:
            sim.trial("w-0", "reclaimed")
        elif op[0] == "wait":
            for _ in range(max(1, int(op[1] / 0.1))):
                tick(0.1)
        tick(0.1)
    planned_stops = [t for t, r in stops if r in ("recycle", "brake")]
    for i, t0 in enumerate(planned_stops):
        assert len([t for t in planned_stops[i:] if t - t0 < pwindow]) <= planned, planned_stops
    w = sim.state.workers["w-0"]
    for t0 in w.restarts:
        assert len([t for t in w.restarts if 0 <= t - t0 < window]) <= budget
    if w.phase == Phase.FAILED:
        assert len(failures) > budget


# ---------------------------------------------------------------------------
# The brake


def _braked(**extra):
    return workload(rules=(rule("worker.memory > 80%", "block", release="worker.memory < 50%", name="hold"),),
                    brake=Brake(enabled=True, after_s=30.0), **extra)


def _blocked_sim(**extra) -> Sim:
    sim = Sim(daemon(_braked(**extra)))
    sim.start()
    sim.tick(0.1)
    sim.trial("w-0", "start", name="trial-0")
    sim.tick(0.1)
    sim.trial("w-0", "end", name="trial-0", ok=True)
    sim.memory["w-0"] = 0.9 * GiB  # the trial leaked
    sim.tick(0.1)  # the block rule closes the gate
    assert sim.state.workers["w-0"].admission_open is False
    return sim


def test_brake_restarts_a_leaking_worker_right_after_its_reclaim_is_measured():
    """The gate closed by the worker's own memory: the brake asks for one reclaim at once; the worker answers
    (its memory did not move: a leak); two full readings later the worker is restarted, between trials, and
    the explanation gives the evidence. Nothing waits for a timer."""
    sim = _blocked_sim()
    acts = sim.tick(0.1)
    asks = [a for a in acts if isinstance(a, Reclaim)]
    assert len(asks) == 1 and "restart_when_blocked" in asks[0].reason
    assert signals(sim.run(1.0, 0.1)) == [] and not [a for a in sim.run(1.0, 0.1) if isinstance(a, Reclaim)]
    sim.trial("w-0", "reclaimed")
    assert signals(sim.tick(0.1)) == []  # this reading may have been taken before the answer
    sig = signals(sim.tick(0.1))
    assert [s.event for s in sig] == ["restart"] and sig[0].explain.rule == "restart_when_blocked"
    assert "reclaim took its memory from 922MiB to 922MiB, not enough to release rule hold" in sig[0].explain.display
    assert "only a restart gives leaked memory back" in sig[0].explain.display
    assert sim.state.workers["w-0"].stop.planned


def test_brake_lets_a_worker_whose_reclaim_worked_go_on_at_once():
    """Where reclaim gives memory back (a cache its callback drops), the gate opens at the first reading
    after the answer: the worker waited for its reclaim, not for reclaim_interval, and is not restarted."""
    sim = _blocked_sim()
    sim.tick(0.1)  # reclaim asked
    sim.tick(0.1)
    sim.memory["w-0"] = 0.3 * GiB
    sim.trial("w-0", "reclaimed")
    acts = sim.run(0.3, 0.1)
    assert [(a.event, a.open) for a in acts if isinstance(a, SetAdmission)] == [("release", True)]
    assert signals(acts) == [] and signals(sim.run(60, 1.0)) == []


def test_brake_judges_an_unanswered_reclaim_after_its_answer_time():
    """No answer to the reclaim (the worker does not listen): the memory as it is after BRAKE_ANSWER_S is the
    evidence; still over the release, the worker is restarted then, not at the 30 s ceiling."""
    sim = _blocked_sim()
    sim.tick(0.1)
    assert signals(sim.run(BRAKE_ANSWER_S - 0.5, 0.5)) == []
    sig = signals(sim.run(1.0, 0.1))
    assert [s.event for s in sig] == ["restart"] and "no answer to the reclaim request" in sig[0].explain.display


def test_brake_ceiling_acts_when_the_memory_cannot_be_read():
    """Unknown memory never decides (invariant 1): with the worker's reading unknown after its answer, only
    the ceiling (restart_when_blocked.after) restarts it, after 30 s of waiting at its gate."""
    sim = _blocked_sim()
    sim.tick(0.1)
    sim.memory["w-0"] = UNKNOWN
    sim.trial("w-0", "reclaimed")
    assert signals(sim.run(29, 0.5)) == []
    sig = signals(sim.run(1.5, 0.5))
    assert [s.explain.signal for s in sig] == ["worker.blocked_for"]


def test_brake_waits_for_a_trial_whose_claim_crossed_the_closing():
    """A trial claimed just as the gate closed runs to its end: the brake restarts the worker only after
    it, and a claim withdrawn (the client saw the gate closed) counts no trial and holds nothing up."""
    sim = _blocked_sim()
    sim.tick(0.1)
    sim.trial("w-0", "start")  # claimed before the close reached the worker
    sim.trial("w-0", "reclaimed")
    assert signals(sim.run(5, 0.1)) == []
    sim.trial("w-0", "start", name="trial-1")
    sim.tick(0.1)
    assert sim.state.workers["w-0"].trial_name == "trial-1"
    assert signals(sim.run(2, 0.1)) == []
    sim.trial("w-0", "end", name="trial-1", ok=True)
    assert [s.event for s in signals(sim.tick(0.1))] == ["restart"]
    sim = _blocked_sim()
    sim.trial("w-0", "start")
    sim.tick(0.1)
    sim.trial("w-0", "withdrawn")
    sim.tick(0.1)
    sim.trial("w-0", "reclaimed")
    assert [s.event for s in signals(sim.run(0.3, 0.1))] == ["restart"]
    assert sim.state.workers["w-0"].trials == 1


def test_brake_leaves_a_worker_too_big_before_its_first_trial_with_an_error():
    """A worker whose client waits at the gate before it finished a single trial is as big at start as it
    is now: a restart would not help, so the brake says so (an error) and does not restart it."""
    sim = Sim(daemon(_braked()))
    sim.start()
    sim.memory["w-0"] = 0.9 * GiB
    sim.tick(0.1)
    sim.tick(0.1)
    sim.trial("w-0", "refused")
    sim.tick(0.1)
    sim.trial("w-0", "reclaimed")
    assert signals(sim.run(120, 1.0)) == []
    assert len(notices(sim, "brake_futile")) == 1


def test_brake_restarts_are_paced_by_restart_planned():
    """Brake restarts past restart.planned wait for room in its window (said once), and are never failures."""
    sim = Sim(daemon(_braked(restart=RestartPolicy(planned_count=2, planned_window_s=60.0, budget_count=1))))
    sim.start()
    sim.tick(0.1)
    restarts = []
    for _ in range(4):
        sim.memory["w-0"] = 100 * MiB
        sim.run(0.3, 0.1)
        sim.trial("w-0", "start")
        sim.tick(0.1)
        sim.trial("w-0", "end", ok=True)
        sim.memory["w-0"] = 0.9 * GiB
        for _ in range(900):
            sig = signals(sim.tick(0.1))
            if sim.state.workers["w-0"].brake_asked_at is not None and sim.state.workers["w-0"].reclaimed_at is None:
                sim.trial("w-0", "reclaimed")
            if sig:
                restarts.append(sim.now)
                sim.exit("w-0", sig=sig[0].signum)
                break
    assert len(restarts) == 4 and restarts[2] - restarts[0] >= 60.0
    assert len(notices(sim, "restart_postponed")) >= 1 and not notices(sim, "failed")


def test_refusals_is_ignored_with_a_warning_and_the_brake_still_works():
    """A workload written for the old brake (restart_when_blocked: {refusals: 10}) loads; the log says the key
    is ignored and why, and the brake acts on evidence."""
    sim = Sim(daemon(dataclasses.replace(_braked(), brake=Brake(enabled=True, refusals=10))))
    acts = sim.start()
    dep = [a for a in acts if isinstance(a, Notice) and a.event == "deprecated"]
    assert len(dep) == 1 and "restart_when_blocked.refusals is ignored" in dep[0].reason


def test_a_trial_killed_outright_is_reported_for_requeue():
    """A worker SIGKILLed in the middle of a trial: the exit names the trial and a trial_interrupted notice says
    the next start fails and requeues it; the requeue report of that start is logged as trial_requeued."""
    sim = Sim(daemon(workload()))
    sim.start()
    sim.tick(0.1)
    sim.trial("w-0", "start")
    sim.trial("w-0", "start", name="trial-7")
    sim.tick(0.1)
    sim.exit("w-0", sig=9)
    sim.tick(0.1)
    assert notices(sim, "exit")[0].fields["trial"] == "trial-7"
    assert "trial trial-7 was running" in notices(sim, "trial_interrupted")[0].reason
    sim.run(2, 0.1)
    sim.pending.append(TrialEvent("w-0", 2, "requeued", sim.now, name="trial-7", detail="trial 7 ... queued again"))
    sim.tick(0.1)
    assert notices(sim, "trial_requeued")[0].fields["trial"] == "trial-7"


# ---------------------------------------------------------------------------
# The pump provides the reading after the reclaim


def test_the_daemons_pump_judges_the_brake_on_a_reading_taken_after_the_answer():
    """The whole daemon over fakes: a reading that was under way when the worker answered its reclaim still
    shows the old memory; the brake must not restart on it. The worker gave its memory back, the next reading
    sees it, and the gate opens with no restart."""
    from memguard.daemon import Daemon as Pump
    from memguard.policy import DaemonPolicy
    from memguard.report.reporter import Reporter
    from memguard.testing import FakeEffects, FakeObserver, RecordingLog, VirtualClock

    class SlowObserver(FakeObserver):
        """A full reading takes 50 ms and reports the memory as it was when it began."""

        def __init__(self, clock: VirtualClock) -> None:
            super().__init__()
            self.clock = clock
            self.begun = 0

        async def sample(self, snapshot):  # type: ignore[no-untyped-def]
            self.begun += 1
            frozen = dict(self.memory)
            await self.clock.sleep_until(self.clock.now() + 0.05, asyncio.Event())
            live, self.memory = self.memory, frozen
            try:
                return await super().sample(snapshot)
            finally:
                self.memory = live

    async def main():
        clock = VirtualClock()
        obs = SlowObserver(clock)
        fx = FakeEffects(clock=clock.now)
        pump = Pump(DaemonPolicy(workloads=(_braked(),)), obs, fx, Reporter(log=RecordingLog()), clock,
                    capture_signals=False)
        task = asyncio.ensure_future(pump.run())
        await clock.advance(1.0)
        inc = pump.state.workers["w-0"].incarnation
        pump.post(TrialEvent("w-0", inc, "start", clock.now(), name="trial-0"))
        await clock.advance(0.2)
        pump.post(TrialEvent("w-0", inc, "end", clock.now(), name="trial-0", ok=True))
        obs.memory["w-0"] = int(0.9 * GiB)
        await clock.run_until(lambda: bool(fx.reclaims), limit=5.0, step=0.001)
        begun = obs.begun
        await clock.run_until(lambda: obs.begun > begun, limit=1.0, step=0.001)  # a reading begins at 0.9 GiB
        obs.memory["w-0"] = 100 * MiB  # the reclaim gave the memory back...
        pump.post(TrialEvent("w-0", inc, "reclaimed", clock.now()))  # ...and the worker says so
        await clock.run_until(lambda: fx.gates.get("w-0") is True or bool(fx.signals), limit=2.0, step=0.001)
        assert not fx.signals, "restarted on a reading taken before the reclaim"
        assert fx.gates["w-0"] is True
        pump.post(Shutdown("test"))
        await clock.advance(1.0)
        await asyncio.wait_for(task, 5)

    asyncio.run(asyncio.wait_for(main(), 60))


# ---------------------------------------------------------------------------
# The real daemon


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


def test_an_old_brake_config_loads_and_the_brake_restarts_on_the_reclaims_evidence(tmp_path, memcg):
    """restart_when_blocked: {refusals: 3}, written for the old brake: the daemon starts, says the key is ignored,
    and when the worker's own 250 MB (which no gc can free) closes its gate, asks it once to reclaim, hears the
    real client's answer, measures again and restarts it, explaining with the memory before and after."""
    control = tmp_path / "want"
    control.write_text("250")
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"g": f"""
        name: g
        command: {helper_cmd("worker_gate.py", str(control))}
        limits: {{memory: 400MiB}}
        rules:
          - {{name: hold, when: "worker.memory > 50%", action: block, release: "worker.memory < 25%"}}
        restart_when_blocked: {{refusals: 3}}
        """})
    d = Daemon(cfg, cgroup=memcg)
    try:
        dep = d.event("deprecated", timeout=20)
        assert "restart_when_blocked.refusals is ignored" in dep["message"]
        first = d.worker_pids("g-0")[0]
        d.event("block", timeout=20)
        ask = d.wait_for(lambda e: e.get("event") == "reclaim" and "restart_when_blocked" in e.get("message", ""),
                         timeout=20, what="the brake's reclaim request")
        d.event("reclaimed", worker="g-0", timeout=20)
        restart = d.event("restart", timeout=20)
        assert restart["rule"] == "restart_when_blocked" and "reclaim took its memory from" in restart["message"]
        assert restart["timestamp"] >= ask["timestamp"]
        control.write_text("0")
        assert d.worker_pids("g-0")[0] != first
        assert not list(d.all("failed"))
    finally:
        d.stop()


def test_thousands_of_fast_trials_on_recycled_workers_and_no_worker_fails(tmp_path):
    """Two workers that leak nothing run 3000 trials of about 1 ms, recycled every 25 trials, with a failure
    budget of 3: the study completes (every trial exactly once), both workers exit 0, none is failed, and far
    more planned restarts than the failure budget were made (restart.planned paces them)."""
    work = tmp_path / "study"
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {"fast": f"""
        name: fast
        command: {helper_cmd("worker_fast_trials.py", str(work), "3000")}
        replicas: 2
        recycle: {{max_trials: 25}}
        restart: {{backoff: 100ms..1s, budget: 3/10m}}
        """})
    d = Daemon(cfg)
    try:
        for w in ("fast-0", "fast-1"):
            d.wait_for(lambda e, w=w: e.get("event") == "completed" and e.get("worker") == w, timeout=240,
                       what=f"{w} finished the study")
        done = sorted(int(n) for n in (work / "done").read_text().split())
        assert done == list(range(3000))
        recycles = [e for e in d.events if e.get("event") == "restart" and e.get("rule") == "recycle.max_trials"]
        assert len(recycles) > 3 * 3, len(recycles)
        assert not [e for e in d.events if e.get("event") == "failed"]
        planned = [e for e in d.events if e.get("event") == "restart_scheduled"]
        assert planned and all(e["planned"] for e in planned)
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
