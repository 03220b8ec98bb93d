"""The core in virtual time: rules on the trend (``within:``), progress signals, ad-hoc workers and the
admission queue. No processes, no clock: readings are scripted, time is injected."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from memguard.decide.pacing import next_full_tick, watch_plan
from memguard.decide.trend import fill_rate, note
from memguard.model import (IO_NOT_READ, Admit, AdmitCancel, AdmitRequest, Exited, Joined, Notice, Observation,
                            Progress, Reconcile)
from memguard.policy import RestartPolicy, WorkloadPolicy

from corekit import GiB, MiB, SIGKILL, SIGTERM, Sim, daemon, rule, scope, signals, workload


def _within(when: str, action: str, within_s: float, scope_: str = "system", **kw):
    return replace(rule(when, action, scope_, **kw), within_s=within_s)


# ---------------------------------------------------------------------------
# The trend


def test_fill_rate_is_the_fall_over_the_last_second():
    """The fill rate is the fall of available memory between the oldest reading of the last second and the
    newest: a steady 1 GiB/s ramp reads 1 GiB/s; a burst and the pause after it average out; readings
    spanning less than 50 ms give no rate (Unknown)."""
    h: tuple = ()
    for i in range(30):
        h = note(h, i * 0.05, 10 * GiB - i * 0.05 * GiB)
    assert abs(fill_rate(h, 29 * 0.05) - GiB) < 1
    assert h[0][0] >= 29 * 0.05 - 1.0 - 0.05, "the history is cut to the window"
    burst: tuple = ()
    avail = 8 * GiB
    for i in range(41):  # every 250 ms, 256 MiB in one 50 ms reading, then nothing: 1 GiB/s on average
        if i % 5 == 0:
            avail -= 256 * MiB
        burst = note(burst, i * 0.05, avail)
    assert 0.75 * GiB <= fill_rate(burst, 40 * 0.05) <= 1.25 * GiB
    short = note(note((), 0.0, GiB), 0.01, GiB - MiB)
    assert not isinstance(fill_rate(short, 0.01), float)


def test_within_rule_fires_on_the_trend_before_the_last_resort():
    """A graceful rule with within: 3s fires while memory.available is still far above its threshold but
    falls fast enough to cross it within 3 s; the kill rule at the same threshold has not fired when the
    graceful stop is sent, and the explanation names the rate and the time left. Without within, the same
    graceful rule (for: 3s) loses to the last resort."""
    graceful = _within("memory.available < 2GiB", "terminate", 3.0, name="ahead", grace_s=5.0)
    last = rule("memory.available < 2GiB", "kill", "system", name="last-resort")

    def ramp(rules) -> list:
        sim = Sim(daemon(workload("w", memory=None), rules=tuple(rules)))
        sim.start()
        sim.tick(0.1)
        sim.memory["w-0"] = 3 * GiB
        sim.tick(0.1)
        acts: list = []
        avail = 12.0 * GiB
        while avail > 0.5 * GiB and not any(s.signum == SIGKILL for s in signals(acts)):
            sim.available = int(avail)
            acts += sim.tick(0.05)
            avail -= 0.05 * 2 * GiB  # 2 GiB/s
        return acts

    acts = ramp([graceful, last])
    first = signals(acts)[0]
    assert first.signum == SIGTERM and first.explain.rule == "ahead", signals(acts)
    assert first.explain.value > 2 * GiB, "fired on the level, not the trend"
    assert "falling" in first.explain.display and "within 3s" in first.explain.display
    plain = replace(graceful, within_s=None, for_s=3.0)
    first = signals(ramp([plain, last]))[0]
    assert first.signum == SIGKILL and first.explain.rule == "last-resort"


def test_within_without_a_rate_is_the_plain_rule():
    """With no rate yet (a single reading) a within rule fires only when its condition holds now: an
    unknown trend never fires a rule on its own."""
    sim = Sim(daemon(workload("w", memory=None), rules=(_within("memory.available < 2GiB", "kill", 60.0),)))
    sim.available = 3 * GiB
    acts = sim.start()
    acts += sim.tick(0.1)
    assert not signals(acts)


def test_watch_plan_moves_a_within_rule_up_the_trend_and_drops_rules_while_a_victim_dies():
    """The watcher's band plans for the trend: a within rule goes to the plan's trends (its threshold and
    horizon, for the watcher to project its own readings' rate: falling 1 GiB/s, ``within: 2s`` on 2 GiB
    wakes the daemon near 4 GiB), a plain rule only to the band's low edge. Once a victim of a rule is dying
    (SIGKILL sent, not yet exited), rules no harder than it cannot act: nothing is watched for them, and
    full ticks run at the fast poll interval until the victim is gone."""
    plain = rule("memory.available < 2GiB", "kill", "system")
    ahead = _within("memory.available < 2GiB", "kill", 2.0)
    lows = {}
    for r in (plain, ahead):
        sim = Sim(daemon(workload("w", memory=None), rules=(r,)))
        avail = 6 * GiB
        sim.available = int(avail)
        sim.start()
        sim.tick(0.1)
        for _ in range(10):
            sim.available = int(avail)
            sim.tick(0.1)
            avail -= 0.1 * GiB
        plan = watch_plan(sim.state, Observation(at=sim.now, scope=scope(int(avail))), sim.policy)
        lows[r.within_s] = plan
    assert lows[None].low_bytes == 2 * GiB and lows[None].trends == ()
    assert lows[2.0].low_bytes == 2 * GiB and lows[2.0].trends == ((2 * GiB, 2.0),)
    ahead_plan = lows[2.0]
    assert not ahead_plan.trend_crossed(4.5 * GiB, GiB) and ahead_plan.trend_crossed(3.9 * GiB, GiB)
    assert not ahead_plan.trend_crossed(2.1 * GiB, None), "no rate: only the plain threshold"
    assert ahead_plan.interval(4.5 * GiB, GiB) < ahead_plan.interval(4.5 * GiB, None)
    sim = Sim(daemon(workload("w", memory=None), rules=(plain,)))
    sim.start()
    sim.tick(0.1)
    sim.available = GiB
    acts = sim.tick(0.1)
    assert [s.signum for s in signals(acts)] == [SIGKILL]
    obs = Observation(at=sim.now, scope=scope(3 * GiB))  # some memory back; the victim still dying
    assert watch_plan(sim.state, obs, sim.policy).low_bytes is None
    assert next_full_tick(sim.state, obs, sim.policy, sim.now) == sim.policy.fast_poll_interval_s


# ---------------------------------------------------------------------------
# Progress


@dataclass
class ProgressSim(Sim):
    """A Sim whose samples carry the tree's CPU seconds and I/O bytes."""

    cpu: dict = field(default_factory=dict)  # worker -> CPU seconds so far
    io: dict = field(default_factory=dict)

    def observe(self) -> Observation:
        obs = super().observe()
        workers = {n: replace(s, cpu_seconds=self.cpu.get(n, 0.0), io_bytes=self.io.get(n, 0))
                   for n, s in obs.workers.items()}
        return replace(obs, workers=workers)

    def run_busy(self, worker: str, seconds: float, cores: float, io_per_s: int = 0, dt: float = 1.0) -> list:
        out = []
        for _ in range(int(round(seconds / dt))):
            self.cpu[worker] = self.cpu.get(worker, 0.0) + cores * dt
            self.io[worker] = self.io.get(worker, 0) + io_per_s * dt
            out += self.tick(dt)
        return out


def test_a_deadlocked_worker_is_stopped_by_worker_cpu_and_the_event_says_why():
    """A worker that works (a core busy, I/O) and then hangs at 0 % CPU and no I/O, far from any memory
    threshold, is stopped by {when: worker.cpu < 1%, for: 60s} about 70 s after the hang (10 s for the
    average to fall, 60 s of for:), with worker.cpu in the explanation; worker.idle counts from the hang."""
    hang = rule("worker.cpu < 1%", "terminate", for_s=60.0, name="deadlock")
    sim = ProgressSim(daemon(workload("w", rules=(hang,))))
    sim.start()
    sim.tick(0.1)
    assert not signals(sim.run_busy("w-0", 120, cores=1.0, io_per_s=1 << 20))
    acts = sim.run_busy("w-0", 65, cores=0.0)
    assert not signals(acts)
    from memguard.decide.rules import system_context, worker_context
    w = sim.state.workers["w-0"]
    ctx = worker_context(w, sim.policy.workloads[0], system_context(sim.observe()), sim.now)
    assert 64 <= ctx.values["worker.idle"] <= 66 and ctx.values["worker.cpu"] == 0.0
    acts = sim.run_busy("w-0", 10, cores=0.0)
    sig = signals(acts)
    assert len(sig) == 1 and sig[0].signum == SIGTERM and sig[0].explain.rule == "deadlock"
    assert sig[0].explain.signal == "worker.cpu" and "worker.cpu 0.0%" in sig[0].explain.display


def test_a_spinning_worker_without_progress_is_caught_by_worker_quiet():
    """A worker at 100 % CPU that writes no output, sends no heartbeat and does no I/O is caught by
    {when: worker.quiet > 60s and worker.cpu > 50%}; one that prints a line now and then (a Progress event)
    or does I/O is not."""
    spin = rule("worker.quiet > 60s and worker.cpu > 50%", "terminate", name="spinning")
    sim = ProgressSim(daemon(workload("w", rules=(spin,)), ))
    sim.start()
    sim.tick(0.1)
    acts: list = []
    for _ in range(6):  # a line of output every 20 s: progress
        sim.pending.append(Progress("w-0", sim.incarnations["w-0"], "output", sim.now))
        acts += sim.run_busy("w-0", 20, cores=1.0)
    assert not signals(acts)
    acts = sim.run_busy("w-0", 120, cores=1.0, io_per_s=4096)  # I/O is progress too
    assert not signals(acts)
    acts = sim.run_busy("w-0", 70, cores=1.0)
    sig = signals(acts)
    assert sig and sig[0].signum == SIGTERM and sig[0].explain.rule == "spinning"
    assert sig[0].explain.signal == "worker.quiet"


class NoIoSim(ProgressSim):
    """Samples as the reader takes them for a worker no rule of which reads its I/O: CPU time, no I/O."""

    def observe(self) -> Observation:
        obs = super().observe()
        return replace(obs, workers={n: replace(s, io_bytes=IO_NOT_READ) for n, s in obs.workers.items()})


def test_io_not_read_is_not_unreadable_counters():
    """A worker whose I/O counters were not read (no rule reads worker.idle or worker.quiet: the reader
    skips /proc/<pid>/io) keeps worker.cpu: {when: worker.cpu < 1%, for: 60s} still stops it after a hang,
    where counters that could not be read would leave the rule unknown forever."""
    hang = rule("worker.cpu < 1%", "terminate", for_s=60.0, name="deadlock")
    sim = NoIoSim(daemon(workload("w", rules=(hang,))))
    sim.start()
    sim.tick(0.1)
    assert not signals(sim.run_busy("w-0", 60, cores=1.0))
    assert sim.state.workers["w-0"].inc.progress_known
    sig = signals(sim.run_busy("w-0", 80, cores=0.0))
    assert sig and sig[0].signum == SIGTERM and sig[0].explain.rule == "deadlock"


@dataclass
class LateIoSim(ProgressSim):
    """Samples without I/O (no rule reads it) until ``read_io`` is set, as after a reload that adds one."""

    read_io: bool = False

    def observe(self) -> Observation:
        obs = super().observe()
        if self.read_io:
            return obs
        return replace(obs, workers={n: replace(s, io_bytes=IO_NOT_READ) for n, s in obs.workers.items()})


def test_a_reload_adding_an_idle_rule_does_not_take_unread_io_for_idleness():
    """A worker doing steady I/O at 0 % CPU runs ten minutes under rules that never read its I/O; a reload
    adds {worker.idle > 60s}. Nothing is known of its I/O before the first reading, so the I/O clock starts
    there: the worker is not stopped as idle for ten minutes of unread I/O, and is stopped once its I/O
    really stops."""
    sim = LateIoSim(daemon(workload("w")))
    sim.start()
    sim.tick(0.1)
    assert not signals(sim.run_busy("w-0", 600, cores=0.0, io_per_s=1 << 20))
    sim.policy = daemon(workload("w", rules=(rule("worker.idle > 60s", "terminate", name="idle"),)))
    sim.command(Reconcile("reload"))
    sim.read_io = True
    assert not signals(sim.run_busy("w-0", 120, cores=0.0, io_per_s=1 << 20))
    sig = signals(sim.run_busy("w-0", 70, cores=0.0))
    assert sig and sig[0].signum == SIGTERM and sig[0].explain.rule == "idle"


def test_unreadable_counters_never_escalate():
    """A worker whose CPU or I/O counters cannot be read has unknown worker.idle and worker.quiet: a rule on
    them never fires (invariant 1)."""
    idle = rule("worker.idle > 10s", "kill", name="idle")
    sim = Sim(daemon(workload("w", rules=(idle,))))  # samples carry no counters
    sim.start()
    acts = sim.run(60, 1.0)
    assert not signals(acts)


# ---------------------------------------------------------------------------
# Ad-hoc workers and the admission queue


def _adhoc_policy(name: str = "job", priority: int = 0) -> WorkloadPolicy:
    return WorkloadPolicy(name=name, command=("python3", "job.py"), priority=priority,
                          restart=RestartPolicy(mode="never"))


def _events_of(acts, cls):
    return [a for a in acts if isinstance(a, cls)]


def test_an_adhoc_worker_joins_is_ranked_as_a_victim_and_leaves_when_it_exits():
    """A joined job becomes a running worker at once (named in the 'joined' event), is measured and chosen
    as the victim of a system rule when it is the largest, is not stopped by the daemon's shutdown or a
    reload, and its slot is removed once its exit is reported."""
    from memguard.model import Reconcile, Shutdown

    sim = Sim(daemon(workload("w"), rules=(rule("memory.available < 2GiB", "kill", "system"),)))
    sim.start()
    sim.tick(0.1)
    sim.pending.append(Joined("job-4242", _adhoc_policy(), 4242, 777, sim.now, origin="run"))
    acts = sim.tick(0.1)
    joined = [a for a in acts if isinstance(a, Notice) and a.event == "joined"]
    assert joined and joined[0].worker == "job-4242" and sim.state.workers["job-4242"].phase.value == "running"
    sim.pids["job-4242"], sim.incarnations["job-4242"] = 4242, 1
    sim.memory.update({"w-0": 100 * MiB, "job-4242": 3 * GiB})
    sim.command(Reconcile("reload"))
    assert sim.state.workers["job-4242"].phase.value == "running", "a reload stopped an ad-hoc worker"
    sim.tick(0.5)
    sim.available = GiB
    acts = sim.tick(0.1)
    kills = signals(acts)
    assert [(k.worker, k.signum) for k in kills] == [("job-4242", SIGKILL)]
    sim.pending.append(Exited("job-4242", 1, 4242, sim.now, signal=SIGKILL))
    del sim.pids["job-4242"]
    acts = sim.tick(0.1)
    assert "job-4242" not in sim.state.workers
    assert [a for a in acts if isinstance(a, Notice) and a.event == "exit" and a.worker == "job-4242"]
    sim.available = 20 * GiB
    sim.pending.append(Joined("job-5", _adhoc_policy(), 5, 5, sim.now))
    sim.tick(0.1)
    acts = sim.command(Shutdown("SIGTERM"))
    assert [s.worker for s in signals(acts)] == ["w-0"]
    from memguard.decide.core import all_stopped
    sim.exit("w-0", sig=SIGTERM)
    sim.tick(0.1)
    assert all_stopped(sim.state), "shutdown waits for an ad-hoc worker it does not stop"


def test_admission_queue_is_first_come_first_served_with_promises():
    """Two jobs that together do not fit: the first is admitted at once; the second waits while the first
    one's promise (less what its worker already holds) is not free, and is admitted once the first job has
    ended. A no-wait request behind a waiting job is refused; a cancelled ticket leaves the queue."""
    sim = Sim(daemon(workload("w", memory=None)))
    sim.available = 10 * GiB
    sim.start()
    sim.pending.append(AdmitRequest("t1", 6 * GiB, "job1", sim.now))
    acts = sim.tick(0.1)
    a1 = _events_of(acts, Admit)
    assert [(a.ticket, a.granted) for a in a1] == [("t1", True)]
    sim.pending.append(AdmitRequest("t2", 6 * GiB, "job2", sim.now))
    acts = sim.tick(0.1)
    assert not _events_of(acts, Admit) and [a for a in acts if a.event == "queued"]
    sim.pending.append(Joined("job1-1", _adhoc_policy("job1"), 11, 11, sim.now, ticket="t1"))
    sim.tick(0.1)
    sim.pids["job1-1"], sim.incarnations["job1-1"] = 11, 1
    for held in (1, 3, 5):  # the job grows into its promise: the free figure does not change
        sim.memory["job1-1"] = held * GiB
        sim.available = (10 - held) * GiB
        assert not _events_of(sim.tick(1.0), Admit)
    sim.pending.append(AdmitRequest("t3", GiB, "quick", sim.now, wait=False))
    refused = _events_of(sim.tick(0.1), Admit)
    assert [(a.ticket, a.granted) for a in refused] == [("t3", False)]
    sim.pending.append(Exited("job1-1", 1, 11, sim.now, returncode=0))
    del sim.pids["job1-1"]
    sim.available = 10 * GiB
    acts = sim.tick(0.1)
    granted = _events_of(acts, Admit)
    assert [(a.ticket, a.granted) for a in granted] == [("t2", True)] and granted[0].waited_s > 3
    sim.pending.append(AdmitRequest("t4", 8 * GiB, "big", sim.now))
    sim.tick(0.1)
    sim.pending.append(AdmitCancel("t4", sim.now, "gave up"))
    acts = sim.tick(0.1)
    assert not sim.state.queue and [a for a in acts if a.event == "queue_left"]


def test_an_unknown_reading_admits_nobody():
    """While the scope's available memory is unknown no waiting job is admitted."""
    from memguard.model import UNKNOWN

    sim = Sim(daemon(workload("w", memory=None)))
    sim.available = UNKNOWN
    sim.start()
    sim.pending.append(AdmitRequest("t1", GiB, "job", sim.now))
    assert not _events_of(sim.run(5, 0.5), Admit)
