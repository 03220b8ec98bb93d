"""The decision core, driven in virtual time with a simulated actor."""

from __future__ import annotations

import dataclasses

from memguard.decide.pacing import QUIET_FULL_TICK_S, next_full_tick, watch_plan
from memguard.decide.state import Phase
from memguard.model import UNKNOWN, Notice, SetAdmission, Signal, Spawn
from memguard.policy import RestartPolicy

from corekit import GiB, MiB, SIGKILL, SIGTERM, Sim, daemon, rule, scope, signals, workload


def test_start_spawns_every_replica():
    """The Reconcile command at start asks for one process per replica, and Spawned makes them running."""
    sim = Sim(daemon(workload("trials", replicas=2)))
    actions = sim.start()
    assert [a.worker for a in actions if isinstance(a, Spawn)] == ["trials-0", "trials-1"]
    sim.tick(0.1)
    assert {w.phase for w in sim.state.workers.values()} == {Phase.RUNNING}


def test_terminate_after_sustained_breach_then_sigkill_after_grace_then_restart():
    """A worker over its limit for `for:` gets SIGTERM, SIGKILL exactly at grace, then restarts after backoff."""
    wl = workload(rules=(rule("worker.memory > 100%", "terminate", for_s=2.0, grace_s=5.0),), memory=GiB)
    sim = Sim(daemon(wl))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = 1.2 * GiB
    assert signals(sim.run(1.9, 0.1)) == []  # not yet sustained for 2 s
    acts = sim.run(0.3, 0.1)
    term = signals(acts)
    assert len(term) == 1 and term[0].signum == SIGTERM and term[0].event == "terminate"
    assert term[0].explain is not None and term[0].explain.signal == "worker.memory"
    assert term[0].explain.value == 1.2 * GiB and term[0].explain.threshold == GiB
    t_term = [t for t, a in sim.log if a is term[0]][0]
    acts = sim.run(4.8, 0.1)
    assert signals(acts) == []  # no SIGKILL inside the grace period
    acts = sim.run(0.4, 0.1)
    kill = signals(acts)
    assert len(kill) == 1 and kill[0].signum == SIGKILL and kill[0].event == "escalate"
    assert [t for t, a in sim.log if a is kill[0]][0] >= t_term + 5.0 - 1e-9
    sim.exit("w-0", sig=SIGKILL)
    acts = sim.tick(0.1)
    exits = [a for a in acts if isinstance(a, Notice) and a.event == "exit"]
    assert exits and exits[0].fields["cause"] == "stopped"
    assert sim.state.workers["w-0"].phase == Phase.PENDING
    acts = sim.run(1.1, 0.1)  # backoff 1 s
    assert [a for a in acts if isinstance(a, Spawn)]


def test_block_holds_until_release_band():
    """A block rule closes admission at 85 % and reopens only below the release (75 %), not at 80 %."""
    wl = workload(rules=(rule("worker.memory > 85%", "block", release="worker.memory < 75%"),), memory=GiB)
    sim = Sim(daemon(wl))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = 0.9 * GiB
    acts = sim.tick(0.1)
    closes = [a for a in acts if isinstance(a, SetAdmission)]
    assert len(closes) == 1 and closes[0].open is False and closes[0].event == "block"
    sim.memory["w-0"] = 0.8 * GiB  # inside the band: stays closed
    assert [a for a in sim.run(1, 0.1) if isinstance(a, SetAdmission)] == []
    sim.memory["w-0"] = 0.7 * GiB
    opens = [a for a in sim.tick(0.1) if isinstance(a, SetAdmission)]
    assert len(opens) == 1 and opens[0].open is True


def test_system_victim_is_lowest_priority_then_largest():
    """Under system pressure the victim is the lowest-priority worker, the largest among equals."""
    cheap = workload("cheap", replicas=2, priority=0)
    precious = workload("precious", replicas=1, priority=10)
    sim = Sim(daemon(cheap, precious, rules=(rule("memory.available < 10%", "terminate", "system"),)))
    sim.start()
    sim.tick(0.1)
    sim.memory.update({"cheap-0": 1 * GiB, "cheap-1": 3 * GiB, "precious-0": 8 * GiB})
    sim.tick(0.1)  # samples taken
    sim.available = 1 * GiB
    acts = signals(sim.tick(0.1))
    assert [a.worker for a in acts] == ["cheap-1"]
    assert "victim cheap-1" in acts[0].explain.display
    # the explanation carries the ranking the choice was made on (the incident record copies it)
    assert [(r.worker, r.priority, r.memory_bytes) for r in acts[0].explain.ranking] == [
        ("cheap-1", 0, 3 * GiB), ("cheap-0", 0, 1 * GiB), ("precious-0", 10, 8 * GiB)]


def test_a_workers_own_rule_names_no_ranking():
    """A worker's own rule chooses nobody among others: its explanation has no ranking."""
    sim = Sim(daemon(workload("w", rules=(rule("worker.memory > 1GiB", "terminate"),))))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = 2 * GiB
    acts = signals(sim.run(2, 0.1))
    assert acts and acts[0].explain.ranking == ()


def test_post_action_delay_one_victim_at_a_time_unless_harder_rule():
    """No second victim while the first is dying or within post_action_delay; a harder rule acts anyway."""
    wl = workload("w", replicas=3)
    term = rule("memory.available < 10%", "terminate", "system", grace_s=30.0)
    kill = rule("memory.available < 3%", "kill", "system")
    sim = Sim(daemon(wl, rules=(term, kill), post_action_delay_s=5.0))
    sim.start()
    sim.tick(0.1)
    sim.memory.update({"w-0": 3 * GiB, "w-1": 2 * GiB, "w-2": 1 * GiB})
    sim.tick(0.1)
    sim.available = 2 * GiB  # ~8 %: terminate fires
    first = signals(sim.tick(0.1))
    assert [(a.worker, a.signum) for a in first] == [("w-0", SIGTERM)]
    assert signals(sim.run(2, 0.1)) == []  # still dying: no second victim
    sim.exit("w-0", sig=SIGTERM)
    sim.memory["w-0"] = 100 * MiB  # its restart starts small
    sim.tick(0.1)
    assert signals(sim.run(4.5, 0.1)) == []  # inside the post-action delay
    sim.available = int(0.5 * GiB)  # ~2 %: the harder kill rule acts inside the delay
    hard = signals(sim.tick(0.1))
    assert [(a.worker, a.signum) for a in hard] == [("w-1", SIGKILL)]


def test_harder_rule_escalates_the_victim_still_in_grace():
    """A kill rule firing while the terminate victim is in its grace period SIGKILLs that same victim."""
    wl = workload("w", replicas=2)
    sim = Sim(daemon(wl, rules=(rule("memory.available < 10%", "terminate", "system", grace_s=30.0),
                                rule("memory.available < 3%", "kill", "system"))))
    sim.start()
    sim.tick(0.1)
    sim.memory.update({"w-0": 3 * GiB, "w-1": 1 * GiB})
    sim.tick(0.1)
    sim.available = 2 * GiB
    assert [(a.worker, a.signum) for a in signals(sim.tick(0.1))] == [("w-0", SIGTERM)]
    sim.available = int(0.5 * GiB)
    assert [(a.worker, a.signum) for a in signals(sim.tick(0.1))] == [("w-0", SIGKILL)]


def test_restart_budget_marks_worker_failed():
    """Past `budget` restarts in the window the worker is failed, an error event says so, and no more spawns."""
    wl = workload(restart=RestartPolicy(backoff_min_s=1, backoff_max_s=1, budget_count=3, budget_window_s=600))
    sim = Sim(daemon(wl))
    sim.start()
    spawns = 1
    for _ in range(6):
        sim.tick(0.1)
        sim.exit("w-0", returncode=1)
        acts = sim.run(1.2, 0.1)
        spawns += sum(isinstance(a, Spawn) for a in acts)
    assert spawns == 4  # first start + 3 restarts
    assert sim.state.workers["w-0"].phase == Phase.FAILED
    failed = [a for _, a in sim.log if isinstance(a, Notice) and a.event == "failed"]
    assert len(failed) == 1 and "budget" in failed[0].reason


def test_backoff_doubles_and_caps():
    """Quick crashes restart after 1, 2, 4, 4 s (capped at backoff max)."""
    wl = workload(restart=RestartPolicy(backoff_min_s=1, backoff_max_s=4, budget_count=100, budget_window_s=600))
    sim = Sim(daemon(wl))
    sim.start()
    delays = []
    for _ in range(4):
        sim.tick(0.1)
        sim.exit("w-0", returncode=2)
        sim.tick(0.0)
        delays.append(sim.state.workers["w-0"].spawn_at - sim.now)
        for _ in range(100):  # at most 10 s of virtual time: a missing restart fails, it cannot hang
            if any(isinstance(a, Spawn) for a in sim.tick(0.1)):
                break
        else:
            raise AssertionError("no restart within 10 s of virtual time")
    assert [round(d) for d in delays] == [1, 2, 4, 4]


def test_exit_zero_with_on_failure_is_completed():
    """A worker that exits 0 on its own under restart policy on-failure is not restarted."""
    sim = Sim(daemon(workload()))
    sim.start()
    sim.tick(0.1)
    sim.exit("w-0", returncode=0)
    acts = sim.run(5, 0.1)
    assert not any(isinstance(a, Spawn) for a in acts)
    assert sim.state.workers["w-0"].phase == Phase.STOPPED
    assert any(isinstance(a, Notice) and a.event == "completed" for a in acts)


def test_unknown_memory_never_fires():
    """A worker whose memory cannot be read is never signalled or blocked by memory rules."""
    wl = workload(rules=(rule("worker.memory > 50%", "block", release="worker.memory < 40%"),
                         rule("worker.memory > 90%", "kill")))
    sim = Sim(daemon(wl, rules=(rule("memory.available < 10%", "kill", "system"),)))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = UNKNOWN
    sim.available = UNKNOWN
    acts = sim.run(10, 0.1)
    assert signals(acts) == [] and not [a for a in acts if isinstance(a, SetAdmission)]


def test_unknown_does_not_release_a_block():
    """A block in force stays in force while the reading is Unknown (no release on unknown)."""
    wl = workload(rules=(rule("worker.memory > 50%", "block", release="worker.memory < 40%"),))
    sim = Sim(daemon(wl))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = 0.6 * GiB
    sim.tick(0.1)
    sim.memory["w-0"] = UNKNOWN
    assert not [a for a in sim.run(3, 0.1) if isinstance(a, SetAdmission)]
    assert sim.state.workers["w-0"].admission_open is False


def test_protected_worker_is_never_signalled():
    """A worker whose tree holds a protected process is refused as a victim and never signalled."""
    wl = workload(rules=(rule("worker.memory > 50%", "kill"),))
    sim = Sim(daemon(wl, rules=(rule("memory.available < 10%", "kill", "system"),)))
    sim.start()
    sim.tick(0.1)
    sim.protected.add("w-0")
    sim.memory["w-0"] = 0.9 * GiB
    sim.available = GiB // 2
    acts = sim.run(3, 0.1)
    assert signals(acts) == []
    assert any(isinstance(a, Notice) and a.event in ("refused", "no_victim") for a in acts)


def test_kernel_oom_classification_from_scope_counter():
    """A SIGKILL memguard did not send, while the scope's OOM counter rose, is classified kernel_oom."""
    sim = Sim(daemon(workload()))
    sim.start()
    sim.tick(0.1)
    sim.oom_kills = 1
    sim.exit("w-0", sig=SIGKILL)
    acts = sim.tick(0.1)
    exit_notice = [a for a in acts if isinstance(a, Notice) and a.event == "exit"][0]
    assert exit_notice.fields["cause"] == "host_oom" and exit_notice.fields["kernel_oom"] is True
    assert any(isinstance(a, Notice) and a.event == "kernel_oom_kill" for a in acts)


def test_runtime_limit_stops_as_a_failure_and_restarts_after_the_backoff():
    """limits.runtime stops the worker (stop signal, then SIGKILL after its grace), explained as a rule; the
    exit is a failure (cause timeout, level warning, with advice) and the restart policy restarts it after
    its backoff, not at once, counting the restart in the budget: past the budget it is failed. With
    restart: never it stays stopped."""
    restart = RestartPolicy(backoff_min_s=30.0, backoff_max_s=60.0, budget_count=1, budget_window_s=600.0)
    sim = Sim(daemon(workload(runtime_s=60.0, grace_s=2.0, restart=restart)))
    sim.start()
    sim.tick(0.1)
    acts = sim.run(60.5, 0.5)
    sig = signals(acts)
    assert len(sig) == 1 and sig[0].event == "terminate" and sig[0].signum == SIGTERM
    assert sig[0].explain.rule == "limits.runtime"
    sim.exit("w-0", sig=SIGTERM)
    acts = sim.tick(0.1)
    exit_notice = [a for a in acts if isinstance(a, Notice) and a.event == "exit"][0]
    assert exit_notice.level == "warning" and exit_notice.fields["cause"] == "timeout"
    assert "past limits.runtime 1m" in exit_notice.reason and "recommendation" in exit_notice.fields
    assert not any(isinstance(a, Spawn) for a in acts), "restarted at once, ignoring the backoff"
    assert sim.state.workers["w-0"].phase.value == "pending"
    acts = sim.run(30.0, 0.5)
    assert any(isinstance(a, Spawn) for a in acts)
    acts = sim.run(61.0, 0.5)
    sim.exit("w-0", sig=SIGTERM)
    acts = sim.tick(0.1)
    assert sim.state.workers["w-0"].phase.value == "failed"
    assert any(isinstance(a, Notice) and a.event == "failed" for a in acts)

    never = Sim(daemon(workload(runtime_s=60.0, grace_s=2.0, restart=RestartPolicy(mode="never"))))
    never.start()
    never.tick(0.1)
    never.run(60.5, 0.5)
    never.exit("w-0", sig=SIGTERM)
    never.tick(0.1)
    assert never.state.workers["w-0"].phase.value == "stopped"


def test_shutdown_stops_everything_and_kills_stragglers():
    """A Shutdown command sends the stop signal to all, SIGKILL after grace, and nothing restarts."""
    from memguard.decide.core import all_stopped
    from memguard.model import Shutdown

    sim = Sim(daemon(workload(replicas=2, grace_s=3.0)))
    sim.start()
    sim.tick(0.1)
    acts = sim.command(Shutdown("SIGTERM"))
    assert sorted((a.worker, a.signum) for a in signals(acts)) == [("w-0", SIGTERM), ("w-1", SIGTERM)]
    sim.exit("w-0", sig=SIGTERM)
    acts = sim.run(3.1, 0.1)
    assert [(a.worker, a.signum) for a in signals(acts)] == [("w-1", SIGKILL)]
    sim.exit("w-1", sig=SIGKILL)
    acts = sim.tick(0.1)
    assert not any(isinstance(a, Spawn) for a in acts)
    assert all_stopped(sim.state)


def test_reload_restarts_changed_and_stops_removed():
    """On reload a changed command restarts its workers; a removed workload's workers stop for good."""
    from memguard.model import Reconcile

    a, b = workload("a"), workload("b")
    sim = Sim(daemon(a, b))
    sim.start()
    sim.tick(0.1)
    a2 = dataclasses.replace(a, command=("python3", "other.py"))
    sim.policy = daemon(a2)
    acts = sim.command(Reconcile("reload"))
    got = sorted((s.worker, s.event) for s in signals(acts))
    assert got == [("a-0", "restart"), ("b-0", "stop")]
    sim.exit("b-0", sig=SIGTERM)
    sim.exit("a-0", sig=SIGTERM)
    acts = sim.tick(0.1)
    assert "b-0" not in sim.state.workers
    assert [s.worker for s in acts if isinstance(s, Spawn)] == ["a-0"]


def test_pacing_quiet_when_watched_and_fast_path_headroom():
    """A rule on the scope's memory alone is watched between ticks: far from it or near it the full tick stays
    quiet (the watcher, not the full tick, follows the scope); the plan's low threshold is the rule's, and its
    polling pace scales with the headroom. A rule on a worker's memory near its threshold makes full ticks
    fast again."""
    pol = daemon(workload(), rules=(rule("memory.available < 2GiB", "kill", "system"),))
    sim = Sim(pol)
    sim.start()
    sim.tick(0.1)
    obs = sim.observe()
    assert next_full_tick(sim.state, obs, pol, sim.now) == QUIET_FULL_TICK_S
    sim.available = int(2.1 * GiB)
    obs = sim.observe()
    assert next_full_tick(sim.state, obs, pol, sim.now) == QUIET_FULL_TICK_S
    plan = watch_plan(sim.state, obs, pol)
    assert plan.low_bytes == 2 * GiB and plan.high_bytes is None and plan.stop
    far = plan.interval(int(2.1 * GiB))
    near = plan.interval(2 * GiB + 6 * MiB)
    assert near < far and near <= 0.002
    assert near >= pol.min_fast_path_interval_s
    assert plan.outside(2 * GiB) and not plan.outside(2 * GiB + 1)

    worker_rule = daemon(workload(rules=(rule("worker.memory > 900MiB", "restart"),)))
    sim = Sim(worker_rule)
    sim.start()
    sim.tick(0.1)
    obs = sim.observe()
    assert next_full_tick(sim.state, obs, worker_rule, sim.now) == worker_rule.poll_interval_s
    sim.memory["w-0"] = 850 * MiB
    sim.tick(0.1)
    obs = sim.observe()
    assert next_full_tick(sim.state, obs, worker_rule, sim.now) == worker_rule.fast_poll_interval_s


def test_fast_path_tick_uses_scope_reading_and_acts_at_once():
    """A light (fast-path) observation crossing a kill threshold produces SIGKILL in that very step."""
    from memguard.decide.core import step
    from memguard.model import Observation

    pol = daemon(workload(), rules=(rule("memory.available < 2GiB", "kill", "system"),))
    sim = Sim(pol)
    sim.start()
    sim.tick(0.1)
    sim.tick(0.1)
    light = Observation(at=sim.now, scope=sim.observe().scope.__class__(
        kind="host", total_bytes=24 * GiB, available_bytes=GiB), workers={}, full=False)
    state, acts = step(sim.state, light, pol, sim.now + 0.001)
    assert [(a.worker, a.signum) for a in acts if isinstance(a, Signal)] == [("w-0", SIGKILL)]


# ---------------------------------------------------------------------------
# Trials: the brake, recycling, stuck trials, reclaim, growth

from memguard.model import Reclaim  # noqa: E402
from memguard.policy import Recycle  # noqa: E402


# The brake (restart_when_blocked) is tested in test_trials.py.


def test_recycle_after_max_trials_at_the_trial_boundary():
    """recycle.max_trials closes the gate after the Nth trial ends, then restarts the worker between trials,
    never while one runs."""
    sim = Sim(daemon(workload(recycle=Recycle(max_trials=3))))
    sim.start()
    sim.tick(0.1)
    for i in range(2):
        sim.trial("w-0", "start")
        sim.tick(1)
        sim.trial("w-0", "end", ok=True)
        assert signals(sim.tick(0.1)) == []
    sim.trial("w-0", "start")
    assert signals(sim.tick(1)) == []
    sim.trial("w-0", "end", ok=True)
    acts = sim.tick(0.1)
    assert signals(acts) == []  # first the gate closes, so no new trial starts
    assert [(a.event, a.open) for a in acts if isinstance(a, SetAdmission)] == [("drain", False)]
    sig = signals(sim.run(0.3, 0.1))
    assert [s.event for s in sig] == ["restart"] and sig[0].explain.rule == "recycle.max_trials"
    sim.exit("w-0", sig=SIGTERM)
    assert any(isinstance(a, Spawn) for a in sim.tick(0.1))  # at once, no backoff


def test_recycle_max_age_is_jittered_per_replica_and_waits_for_the_trial():
    """recycle.max_age: replicas recycle at different ages (within the jitter), each between trials."""
    sim = Sim(daemon(workload(replicas=2, recycle=Recycle(max_age_s=100, jitter=0.2))))
    sim.start()
    sim.tick(0.1)
    when = {}
    for _ in range(1100):
        for a in signals(sim.tick(0.1)):
            when.setdefault(a.worker, sim.now)
    assert set(when) == {"w-0", "w-1"}
    assert all(80 <= t <= 100.8 for t in when.values()) and when["w-0"] != when["w-1"]


def test_trial_timeout_terminates_a_stuck_trial():
    """trial_timeout: a trial running past it is terminated with reason stuck."""
    sim = Sim(daemon(workload(trial_timeout_s=60)))
    sim.start()
    sim.tick(0.1)
    sim.trial("w-0", "start", name="trial-7")
    assert signals(sim.run(59, 1.0)) == []
    sig = signals(sim.run(2, 0.5))
    assert [s.event for s in sig] == ["terminate"] and sig[0].explain.rule == "trial_timeout"
    assert sim.state.workers["w-0"].stop.reason == "stuck" and "trial-7" in sig[0].explain.display


def test_heartbeat_timeout_terminates_a_silent_trial():
    """heartbeat_timeout: heartbeats keep a long trial alive; silence past the timeout is stuck."""
    sim = Sim(daemon(workload(heartbeat_timeout_s=10)))
    sim.start()
    sim.tick(0.1)
    sim.trial("w-0", "start")
    for _ in range(5):
        sim.run(8, 1.0)
        sim.trial("w-0", "heartbeat")
    assert signals(sim.tick(0.1)) == []
    sig = signals(sim.run(11, 1.0))
    assert [s.explain.rule for s in sig] == ["heartbeat_timeout"]


def test_reclaim_asks_the_worker_then_waits_its_interval():
    """A reclaim rule sends one Reclaim to the worker, then none until reclaim_interval has passed."""
    wl = workload(rules=(rule("worker.memory > 70%", "reclaim"),), reclaim_interval_s=30.0)
    sim = Sim(daemon(wl))
    sim.start()
    sim.tick(0.1)
    sim.memory["w-0"] = 0.8 * GiB
    acts = sim.run(29, 1.0)
    assert len([a for a in acts if isinstance(a, Reclaim)]) == 1
    acts = sim.run(2, 1.0)
    assert len([a for a in acts if isinstance(a, Reclaim)]) == 1


def test_growth_rate_catches_a_leak_before_the_limit():
    """worker.growth: a steady 2 MiB/s leak is seen as ~2 MiB/s and recycles the worker long before its limit."""
    wl = workload(rules=(rule("worker.growth > 1MiB/s", "restart", for_s=10, name="leak"),), memory=8 * GiB,
                  growth_window_s=60)
    sim = Sim(daemon(wl))
    sim.memory["w-0"] = 200 * MiB
    sim.start()
    sim.tick(0.1)
    fired = []
    for i in range(120):
        sim.memory["w-0"] = 200 * MiB + i * 2 * MiB
        fired += signals(sim.tick(1.0))
        if fired:
            break
    assert fired and fired[0].explain.rule == "leak"
    assert 1.8 * MiB < fired[0].explain.value < 2.2 * MiB
    assert 39 <= sim.now <= 45  # half a window of samples, then `for: 10s`


def test_a_worker_not_measured_yet_is_never_a_victim():
    """Before its first sample a worker's protection is unknown, so no rule may signal it."""
    from memguard.decide.core import step
    from memguard.model import Observation, Spawned

    pol = daemon(workload(), rules=(rule("memory.available < 10%", "kill", "system"),))
    sim = Sim(pol)
    sim.start()
    obs = Observation(at=0.1, scope=sim.observe().scope.__class__(kind="host", total_bytes=24 * GiB,
                                                                   available_bytes=GiB),
                      workers={}, events=(Spawned("w-0", 1, 1001, 0.05),))
    state, acts = step(sim.state, obs, pol, 0.1)
    assert signals(acts) == []
    assert any(getattr(a, "event", "") == "no_victim" for a in acts)


def test_a_trial_that_slipped_in_while_draining_delays_the_recycle_until_it_ends():
    """If a trial start crosses the closing of the gate, recycling waits for that trial's end."""
    sim = Sim(daemon(workload(recycle=Recycle(max_trials=1))))
    sim.start()
    sim.tick(0.1)
    sim.trial("w-0", "start")
    sim.tick(0.1)
    sim.trial("w-0", "end", ok=True)
    sim.tick(0.1)  # gate closes (drain)
    sim.trial("w-0", "start")  # read the gate just before it closed
    assert signals(sim.run(2, 0.1)) == []
    sim.trial("w-0", "end", ok=True)
    assert [s.event for s in signals(sim.run(0.4, 0.1))] == ["restart"]


def test_unmanaged_victim_gets_sigterm_then_sigkill_after_grace_and_holds_the_lock():
    """An opt-in unmanaged process larger than every worker is the victim: SIGTERM, SIGKILL only after the
    rule's grace, no second victim while it lives; once it is gone the post-action delay applies."""
    from memguard.decide.core import step
    from memguard.model import Observation, ProcessSample, SignalProcess

    pol = daemon(workload(), rules=(rule("memory.available < 10%", "terminate", "system", grace_s=3.0),),
                 post_action_delay_s=5.0)
    sim = Sim(pol)
    sim.start()
    sim.tick(0.1)
    hog = ProcessSample(pid=4242, start=777, name="polars-job", user="alice", memory_bytes=10 * GiB,
                        matcher="by-hand")

    def tick(dt: float, procs: tuple) -> list:
        sim.now += dt
        base = sim.observe()
        obs = Observation(at=sim.now, scope=scope(available=GiB), workers=base.workers, events=base.events,
                          unmanaged=procs)
        sim.state, acts = step(sim.state, obs, pol, sim.now)
        sim._absorb(acts)
        return acts

    first = [a for a in tick(0.1, (hog,)) if isinstance(a, (SignalProcess, Signal))]
    assert [(type(a).__name__, a.signum) for a in first] == [("SignalProcess", SIGTERM)]
    assert "unmanaged process polars-job" in first[0].explain.display
    quiet = []
    for _ in range(28):
        quiet += [a for a in tick(0.1, (hog,)) if isinstance(a, (SignalProcess, Signal))]
    assert quiet == []  # still in its grace: no SIGKILL, and no worker chosen meanwhile
    late = [a for a in tick(0.2, (hog,)) if isinstance(a, SignalProcess)]
    assert [(a.signum, a.event) for a in late] == [(SIGKILL, "escalate")]
    tick(0.1, ())  # gone
    assert [a for a in tick(4.0, ()) if isinstance(a, Signal)] == []  # post-action delay
    assert [a.worker for a in tick(1.2, ()) if isinstance(a, Signal)] == ["w-0"]


def test_reload_replicas_down_and_up_within_a_grace_period_keeps_every_replica():
    """replicas 2 -> 1 -> 2 while the removed replica is still stopping: it is not lost, it restarts as soon
    as it exits; and 2 -> 1 -> 2 after it exited brings it back as a new slot. Every order ends with 2."""
    from memguard.model import Reconcile

    two, one = workload("w", replicas=2, grace_s=30.0), workload("w", replicas=1, grace_s=30.0)
    for exit_before_second_reload in (False, True):
        sim = Sim(daemon(two))
        sim.start()
        sim.tick(0.1)
        sim.policy = daemon(one)
        acts = sim.command(Reconcile("reload"))
        assert [(s.worker, s.event) for s in signals(acts)] == [("w-1", "stop")]
        if exit_before_second_reload:
            sim.exit("w-1", sig=SIGTERM)
            sim.tick(0.1)
            assert "w-1" not in sim.state.workers
        sim.policy = daemon(two)
        acts = sim.command(Reconcile("reload"))
        if not exit_before_second_reload:
            sim.exit("w-1", sig=SIGTERM)  # the stop asked by the first reload completes now
        acts += sim.run(2.0)
        assert any(isinstance(a, Spawn) and a.worker == "w-1" for a in acts), exit_before_second_reload
        assert sorted(w.phase.value for w in sim.state.workers.values()) == ["running", "running"]


def test_a_fast_tick_with_200_workers_does_not_run_their_rules(monkeypatch):
    """On a fast tick (only the scope's memory was re-read) the rules of 200 workers that read only what full
    ticks measure give the last full tick's answers: they are not run, and the system rule's kill is decided
    on the figures re-read at that moment (the largest fresh worker is the victim). A full tick runs them."""
    import memguard.decide.core as core
    from memguard.model import Observation

    pol = daemon(workload(replicas=200, rules=(rule("worker.memory > 4GiB", "restart"),)),
                 rules=(rule("memory.available < 2GiB", "kill", "system"),))
    sim = Sim(pol)
    sim.start()
    sim.tick(0.1)
    sim.tick(0.1)  # measured
    calls = []
    real = core._worker_rules
    monkeypatch.setattr(core, "_worker_rules", lambda s, w, ctx, obs: (calls.append(w.name), real(s, w, ctx, obs)))
    last = sim.observe()
    fast = Observation(at=sim.now + 0.01, scope=scope(int(1.5 * GiB)), workers=last.workers, full=False,
                       worker_memory={"w-17": 900 * MiB})
    state, actions = core.step(sim.state, fast, pol, sim.now + 0.01)
    assert calls == []
    assert [(s.worker, s.event) for s in signals(actions)] == [("w-17", "kill")]
    core.step(sim.state, sim.observe(), pol, sim.now + 0.02)
    assert len(calls) == 200
