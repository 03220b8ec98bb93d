"""The whole daemon in-process, over fake ports in virtual time: no root, no processes, no real clock.

What runs is the production pump (memguard.daemon.Daemon): pacing, the fast
path, the inbox, admin replies, reload and shutdown. Only the ports at its
edges are fakes (memguard.testing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from memguard.config import ConfigError, ConfigIssue
from memguard.daemon import Daemon
from memguard.model import Signal, Spawn
from memguard.policy import DaemonPolicy
from memguard.report.reporter import Reporter
from memguard.testing import FakeEffects, FakeObserver, GiB, InlineExecutor, MiB, RecordingLog, VirtualClock

from corekit import rule, workload


class Rig:
    """A daemon over fakes, running as a task; tests move virtual time with ``advance``."""

    def __init__(self, policy: DaemonPolicy, *, load=None, capture_signals: bool = False, effects=FakeEffects,
                 **reporter) -> None:
        self.clock = VirtualClock()
        self.observer = FakeObserver()
        self.effects = effects(clock=self.clock.now)
        self.log = RecordingLog()
        self.daemon = Daemon(policy, self.observer, self.effects, Reporter(log=self.log, clock=self.clock.now,
                                                                           **reporter), self.clock,
                             load_config=load, capture_signals=capture_signals, executor=InlineExecutor())
        self.task: asyncio.Task | None = None

    async def start(self) -> "Rig":
        self.task = asyncio.ensure_future(self.daemon.run())
        await self.clock.advance(0.0)
        return self

    async def advance(self, seconds: float) -> None:
        await self.clock.advance(seconds)
        if self.task is not None and self.task.done() and self.task.exception() is not None:
            raise self.task.exception()

    def phase(self, worker: str) -> str:
        return self.daemon.state.workers[worker].phase.value


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def policy(*wls, rules=(), **kw) -> DaemonPolicy:
    return DaemonPolicy(workloads=tuple(wls), rules=tuple(rules), **kw)


def test_workers_start_and_are_measured_on_full_ticks():
    """At start the daemon spawns one process per replica, they become running, and full ticks measure
    them: at the relaxed pace (about one sample per poll interval) while a rule reads a worker's memory,
    and only every QUIET_FULL_TICK_S when no rule reads anything only a full tick measures."""
    from memguard.decide.pacing import QUIET_FULL_TICK_S

    async def main():
        rig = await Rig(policy(workload("w", replicas=2, rules=(rule("worker.memory > 4GiB", "restart"),)))).start()
        await rig.advance(0.5)
        assert sorted(a.worker for a in rig.effects.actions if isinstance(a, Spawn)) == ["w-0", "w-1"]
        assert rig.phase("w-0") == "running" and rig.phase("w-1") == "running"
        before = rig.observer.samples
        await rig.advance(10.0)
        assert 8 <= rig.observer.samples - before <= 12
        assert rig.daemon.state.workers["w-0"].memory == 100 * MiB

        quiet = await Rig(policy(workload("w", replicas=2))).start()
        await quiet.advance(0.5)
        before = quiet.observer.samples
        await quiet.advance(3 * QUIET_FULL_TICK_S)
        assert 2 <= quiet.observer.samples - before <= 4
    run(main())


def test_fast_path_acts_between_full_ticks():
    """With 2 GiB to a kill threshold the fast path re-reads the scope every few hundred ms; a crossing
    is acted on (SIGKILL of the largest worker) by a fast tick, before the next full tick runs."""
    async def main():
        pol = policy(workload("w", replicas=2), rules=[rule("memory.available < 2GiB", "kill", "system")])
        rig = await Rig(pol).start()
        rig.observer.memory = {"w-0": 300 * MiB, "w-1": 900 * MiB}
        await rig.advance(2.0)  # measured: the victim ranking has its sizes
        assert not rig.effects.signals
        rig.observer.available = 4 * GiB
        await rig.advance(1.0)
        samples = rig.observer.samples
        fast = rig.observer.fast_reads
        rig.observer.available = int(1.5 * GiB)  # a hog crossed the threshold between two full ticks
        await rig.advance(0.0)  # the crossing wakes the daemon at once: no time passes
        kills = [s for s in rig.effects.signals if s.signum == signal.SIGKILL]
        assert [k.worker for k in kills] == ["w-1"], rig.effects.signals
        assert rig.observer.fast_reads > fast
        assert rig.observer.samples == samples, "the kill waited for a full tick"
    run(main())


def test_exit_is_enriched_and_reported():
    """An exit the effects port reports as a kernel OOM kill at the worker's cgroup limit is explained in
    the log (cause, limit, last lines) and the worker is restarted after its backoff."""
    async def main():
        rig = await Rig(policy(workload("w"))).start()
        await rig.advance(1.0)
        rig.effects.exit("w-0", signal=signal.SIGKILL, kernel_oom=True,
                         oom_detail="at its cgroup limit 256MiB (limits.memory)", last_lines=("allocating",))
        await rig.advance(0.01)
        exits = rig.log.named("exit", worker="w-0")
        assert len(exits) == 1 and exits[0]["cause"] == "host_oom" and exits[0]["kernel_oom"] is True
        assert "killed by the kernel OOM killer at its cgroup limit 256MiB" in exits[0]["message"]
        assert exits[0]["last_lines"] == ["allocating"] and exits[0]["level"] == "warning"
        assert rig.phase("w-0") == "pending"
        await rig.advance(1.5)
        assert [a.incarnation for a in rig.effects.actions if isinstance(a, Spawn)] == [1, 2]
        assert rig.daemon.reporter.kernel_oom_kills == 1
    run(main())


def test_exit_zero_after_a_printed_oom_is_not_a_failure():
    """A worker that printed a CUDA OOM, recovered and exited 0 has finished its work: it is not
    restarted (restart: on-failure) and the OOM line is kept as information."""
    async def main():
        rig = await Rig(policy(workload("w"))).start()
        await rig.advance(1.0)
        rig.effects.exit("w-0", returncode=0, last_lines=(
            "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "retrying with batch 8",
            "done"))
        await rig.advance(10.0)
        exit_ev = rig.log.named("exit", worker="w-0")[0]
        assert exit_ev["cause"] == "none" and exit_ev.get("recovered") is True
        assert rig.phase("w-0") == "stopped"
        assert [a for a in rig.effects.actions if isinstance(a, Spawn)][-1].incarnation == 1
    run(main())


def test_admin_restart_is_answered_after_the_tick_that_acted():
    """An operator's restart over the control socket becomes an event of the next tick; its reply comes
    after that tick, when the stop signal has been sent, and says the worker is stopping."""
    async def main():
        rig = await Rig(policy(workload("w"))).start()
        await rig.advance(1.0)
        rig.effects.dies_on = set()  # it takes its time to exit
        reply = rig.daemon.admin({"op": "restart", "worker": "w-0"})
        assert not reply.done() and not rig.effects.signals
        await rig.advance(0.0)
        assert reply.done() and reply.result() == {"ok": True, "phase": "stopping"}
        assert [(s.worker, s.event, s.signum) for s in rig.effects.signals] == [("w-0", "restart", signal.SIGTERM)]
        unknown = rig.daemon.admin({"op": "stop", "worker": "nope"})
        status = rig.daemon.admin({"op": "status"})
        await rig.advance(0.0)
        assert unknown.result() == {"ok": False, "error": "no worker named 'nope'"}
        assert status.result()["workers"]["w-0"]["phase"] == "stopping"
    run(main())


def test_reload_with_a_broken_file_keeps_the_running_policy():
    """A reload whose file does not parse is refused with every error reported (and returned to
    `ctl reload`); the running policy and its workers stay. A good reload then applies the new one."""
    good = policy(workload("w"))
    state = {"next": None}

    def load():
        if state["next"] is None:
            raise ConfigError([ConfigIssue("/etc/memguard/memguard.yaml", 3, "limits.memory", "a size, e.g. 2GiB")])
        return state["next"]

    async def main():
        rig = await Rig(good, load=load).start()
        await rig.advance(1.0)
        reply = rig.daemon.admin({"op": "reload"})
        await rig.advance(0.1)
        assert reply.done() and reply.result()["ok"] is False
        assert reply.result()["errors"][0]["key"] == "limits.memory"
        assert rig.daemon.policy is good and rig.phase("w-0") == "running"
        assert rig.log.named("reload_failed") and rig.log.named("config_error", key="limits.memory")
        state["next"] = policy(workload("w"), workload("extra"))
        reply = rig.daemon.admin({"op": "reload"})
        await rig.advance(0.5)
        assert reply.result() == {"ok": True}
        assert rig.phase("extra-0") == "running" and rig.phase("w-0") == "running"
        assert rig.log.named("reloaded")
    run(main())


def test_sigterm_stops_every_worker_and_the_daemon_exits_restoring_handlers():
    """SIGTERM to the daemon stops every worker (stop signal, then SIGKILL after the grace for one that
    ignores it), run() returns 0 once all are stopped, and the original signal handlers are back."""
    async def main():
        original = signal.getsignal(signal.SIGTERM)
        rig = await Rig(policy(workload("w", replicas=2, grace_s=3.0)), capture_signals=True).start()
        await rig.advance(1.0)
        rig.effects.dies_on = {signal.SIGKILL}  # both ignore SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)  # the real signal is delivered to the loop's handler
        await rig.advance(0.01)
        assert sorted((s.worker, s.signum) for s in rig.effects.signals) == [("w-0", signal.SIGTERM),
                                                                             ("w-1", signal.SIGTERM)]
        await rig.advance(3.1)
        assert sorted(s.worker for s in rig.effects.signals if s.signum == signal.SIGKILL) == ["w-0", "w-1"]
        await rig.advance(0.1)
        assert rig.task.done() and rig.task.result() == 0
        assert rig.effects.closed and rig.log.named("stopped")
        assert signal.getsignal(signal.SIGTERM) is original
    run(main())


def test_dry_run_decides_but_still_stops_when_asked():
    """In dry run a rule's kill is decided and logged as not done, nothing is signalled, and the worker is
    seen running on (the decision is repeated after the post-action delay, not every tick); a stop the
    operator asks for is still carried out (a dry-run daemon must stop when systemd asks)."""
    async def main():
        pol = policy(workload("w", rules=(rule("worker.memory > 100%", "kill"),)), dry_run=True)
        rig = await Rig(pol).start()
        rig.observer.memory = {"w-0": 2 * GiB}
        await rig.advance(2.0)
        kills = rig.log.named("kill", worker="w-0")
        assert kills and kills[0]["dry_run"] is True and kills[0]["message"].startswith("DRY RUN")
        assert not rig.effects.signals
        assert rig.phase("w-0") == "running"
        await rig.advance(8.0)  # 10 s in: decided again once per post-action delay (5 s), no more
        assert 2 <= len(rig.log.named("kill", worker="w-0")) <= 3
        reply = rig.daemon.admin({"op": "stop", "worker": "w-0"})
        await rig.advance(0.1)
        assert reply.result()["ok"] is True
        assert [(s.event, s.lifecycle) for s in rig.effects.signals] == [("stop", True)]
        assert rig.phase("w-0") == "stopped"
    run(main())


def _flushed(rig: Rig) -> None:
    """Every incident write the reporter queued so far is done (its thread), and its answers are queued."""
    assert rig.daemon.reporter.incidents.writer.flush(10.0)


def test_own_stop_is_recorded_before_the_effects_send_the_signal(tmp_path):
    """memguard's own kill is on disk (a pending incident naming the worker, its command, the rule and the
    numbers) when the effects port is asked to send it, and nothing else comes between: its journal entry and
    the kill's log line (in that order) are written after the signal; after the exit the record is completed
    with what the signal did and carries the recorder's timeline."""
    from memguard.report.incidents import IncidentStore
    from memguard.report.recorder import FlightRecorder

    store = IncidentStore(tmp_path / "incidents")
    on_disk_at_signal: list = []
    logged_at_signal: list = []
    logs: list = []

    class Watching(FakeEffects):
        def execute(self, actions, policy, obs=None):
            for a in actions:
                if isinstance(a, Signal):
                    on_disk_at_signal.append([(i.pid, i.state, i.how.get("signal_name")) for i in store.list()])
                    logged_at_signal.append([e["event"] for e in logs[0].events if e["event"] in ("incident", "kill")])
            return super().execute(actions, policy, obs)

    async def main():
        pol = policy(workload("w", rules=(rule("worker.memory > 100%", "kill", name="over-limit"),)))
        rig = Rig(pol, effects=Watching, incidents=store, recorder=FlightRecorder(60))
        logs.append(rig.log)
        await rig.start()
        await rig.advance(2.0)
        pid = rig.effects.pid("w-0")
        # The reporter's writer thread is held: what is on disk at the signal was written on the loop, in time.
        held = threading.Event()
        rig.daemon.reporter.incidents.writer.submit("test", lambda: held.wait(30))
        rig.observer.memory = {"w-0": 2 * GiB}
        await rig.advance(0.5)  # the kill comes at the next full tick; the restart only after its 1 s back-off
        held.set()
        assert [s.event for s in rig.effects.signals] == ["kill"]
        assert on_disk_at_signal == [[(pid, "pending", "SIGKILL")]]
        assert logged_at_signal == [[]]  # the lines come after the act
        names = [e["event"] for e in rig.log.events]
        assert names.index("incident") < names.index("kill")
        rig.observer.memory = {}  # the next incarnation stays small
        _flushed(rig)
        await rig.advance(6.0)  # the exit completes it; 5 s later the seconds after are appended
        _flushed(rig)
        [inc] = store.list()
        assert inc.state == "complete" and inc.cause == "host_oom" and inc.source == "memguard"
        assert inc.what["worker"] == "w-0" and inc.what["command"] == ["python3", "worker.py"]
        assert inc.why["rule"] == "over-limit" and inc.why["value"] == 2 * GiB and inc.why["threshold"] == GiB
        assert inc.outcome["signal_name"] == "SIGKILL"
        assert inc.timeline is not None and inc.timeline["full"]["worker[w-0].memory_bytes"][-1] == 2 * GiB
        assert any(m["event"] == "kill" for m in inc.timeline["marks"])
        assert inc.after is not None
        assert len(rig.log.named("incident")) == 1  # the exit that followed is the same death, not a second
        await rig.advance(0.1)
    run(main())


def test_a_failing_exit_is_one_incident_and_a_clean_one_none(tmp_path):
    """A worker killed by the kernel OOM killer is one incident carrying the core's verdict (host_oom, the
    limit, the evidence) and one journal entry; a worker that exits 0 leaves no incident."""
    from memguard.report.incidents import IncidentStore
    from memguard.report.recorder import FlightRecorder

    store = IncidentStore(tmp_path / "incidents")

    async def main():
        rig = await Rig(policy(workload("w", replicas=2)), incidents=store, recorder=FlightRecorder(60)).start()
        await rig.advance(2.0)
        pid = rig.effects.pid("w-0")
        rig.effects.exit("w-0", signal=signal.SIGKILL, kernel_oom=True, oom_detail="at its cgroup limit 1GiB",
                         last_lines=("step 812", "allocating"))
        rig.effects.exit("w-1", returncode=0)
        await rig.advance(0.1)
        _flushed(rig)
        await rig.advance(0.1)
        [inc] = store.list()
        assert inc.pid == pid and inc.cause == "host_oom" and inc.source == "exit"
        assert inc.how["signal_name"] == "SIGKILL" and inc.how["oom"]["limit_bytes"] == GiB
        assert "kernel OOM killer" in inc.summary and inc.why["recommendation"]
        assert inc.evidence[-1] == "allocating" and inc.timeline is not None
        [entry] = rig.log.named("incident")
        assert entry["incident"] == inc.id and entry["worker"] == "w-0" and entry["cause"] == "host_oom"
    run(main())


def test_dry_run_records_no_stop_but_still_records_failures(tmp_path):
    """In a dry run memguard's decisions send nothing, so they leave no incident; a worker that fails on its
    own is still one."""
    from memguard.report.incidents import IncidentStore

    store = IncidentStore(tmp_path / "incidents")

    async def main():
        pol = policy(workload("w", rules=(rule("worker.memory > 100%", "kill"),)), dry_run=True)
        rig = await Rig(pol, incidents=store).start()
        await rig.advance(1.0)
        rig.observer.memory = {"w-0": 2 * GiB}
        await rig.advance(1.5)
        assert rig.log.named("kill", worker="w-0") and not rig.effects.signals
        rig.effects.exit("w-0", returncode=1, last_lines=("OSError: [Errno 28] No space left on device",))
        await rig.advance(0.1)
        _flushed(rig)
        await rig.advance(0.1)
        assert [(i.cause, i.source) for i in store.list()] == [("disk_full", "exit")]
    run(main())


@pytest.mark.parametrize("bad", ["log", "metrics", "incidents", "recorder"])
def test_a_failing_sink_never_stops_guarding(bad, tmp_path):
    """A log whose writes raise, a metrics file or an incident store that cannot be written, a flight recorder
    that raises: counted and said once; the daemon keeps deciding and acting (a worker over its limit is still
    killed)."""
    class Broken(RecordingLog):
        def _log(self, level, event, **fields):
            raise OSError(28, "No space left on device")

    async def main():
        from memguard.report.metrics import Metrics

        pol = policy(workload("w", rules=(rule("worker.memory > 100%", "kill"),)))
        rig = Rig(pol)
        if bad == "log":
            rig.daemon.reporter = Reporter(log=Broken())
        elif bad == "incidents":
            from memguard.report.incidents import IncidentStore

            (tmp_path / "file").write_text("not a directory")
            rig.daemon.reporter = Reporter(log=rig.log, incidents=IncidentStore(tmp_path / "file" / "incidents"))
        elif bad == "recorder":
            class BrokenRecorder:
                latest_at = None

                def record(self, obs):
                    raise MemoryError("recorder")

            rig.daemon.reporter = Reporter(log=rig.log, recorder=BrokenRecorder())
        else:
            rig.daemon.reporter = Reporter(log=rig.log, metrics=Metrics(str(tmp_path / "no" / "such" / "dir.prom"),
                                                                       "test"))
        await rig.start()
        await rig.advance(1.0)
        rig.observer.memory = {"w-0": 2 * GiB}
        await rig.advance(1.5)
        assert [s.event for s in rig.effects.signals][:1] == ["kill"]  # (its restart may be killed again)
        assert rig.daemon.reporter.sink_failures.get(bad, 0) >= 1
        if bad != "log":
            assert len(rig.log.named("sink_error", sink=bad)) == 1
    run(main())


def test_a_gate_that_cannot_be_written_leaves_status_truthful_and_is_retried_without_spam():
    """When a worker's admission gate cannot be written, the core believes the file (status says the gate is
    open, as the file does), the block is tried again every few seconds rather than every tick, and once the
    file can be written the gate closes."""
    async def main():
        pol = policy(workload("w", rules=(rule("worker.memory > 50%", "block", release="worker.memory < 30%"),)))
        rig = await Rig(pol).start()
        await rig.advance(1.0)
        rig.effects.fail_gates.add("w-0")
        rig.observer.memory = {"w-0": 800 * MiB}
        await rig.advance(10.0)
        status = rig.daemon.admin({"op": "status"})
        await rig.advance(0.0)
        assert status.result()["workers"]["w-0"]["admission"] == "open"
        tries = [a for a in rig.effects.actions if getattr(a, "event", "") == "block"]
        assert 2 <= len(tries) <= 3, len(tries)  # one try per 5 s, not one per tick
        rig.effects.fail_gates.clear()
        await rig.advance(6.0)
        assert rig.effects.gates["w-0"] is False and not rig.daemon.state.workers["w-0"].admission_open
    run(main())


def test_effects_report_a_gate_file_they_cannot_write_once(tmp_path):
    """The real effects port: a gate file that cannot be replaced (a directory stands in its way) gives one
    admission_error notice and a GateNotSet for the core; when it can be written again, one recovery notice."""
    from memguard.act.effects import Effects
    from memguard.model import GateNotSet, SetAdmission

    class Inbox:
        def __init__(self):
            self.items = []

        def post(self, item):
            self.items.append(item)

    effects = Effects(runtime_dir=str(tmp_path / "run"))
    effects._inbox = Inbox()
    os.makedirs(effects.admission_file("w-0") + "/in-the-way")
    pol = policy(workload("w"))
    close = SetAdmission("w-0", "w", False, "block", "test")
    notes = effects.execute([close], pol) + effects.execute([close], pol)
    assert [n.event for n in notes] == ["admission_error"]
    assert [type(i) for i in effects._inbox.items] == [GateNotSet, GateNotSet]
    assert effects._inbox.items[0].open is False
    import shutil

    shutil.rmtree(effects.admission_file("w-0"))
    notes = effects.execute([close], pol)
    assert [n.event for n in notes] == ["admission_recovered"]
    with open(effects.admission_file("w-0")) as f:
        assert f.read().startswith("closed")


def test_holding_near_a_threshold_with_200_workers_costs_reads_not_ticks():
    """With 200 workers and the scope held 10 MiB above a kill threshold, the observer reads the scope on
    the plan's pace (every ~1.7 ms: 10 MiB / 6000 MiB/s) but the daemon does not tick for it: no fast tick,
    so no step and no worker rule runs; full ticks keep their quiet pace. A crossing then ticks at once."""
    async def main():
        clock = VirtualClock()
        observer = FakeObserver(clock=clock)
        effects = FakeEffects(clock=clock.now)
        log = RecordingLog()
        pol = policy(workload("w", replicas=200, rules=(rule("worker.memory > 4GiB", "restart"),)),
                     rules=[rule("memory.available < 2GiB", "kill", "system")])
        daemon = Daemon(pol, observer, effects, Reporter(log=log), clock, capture_signals=False,
                        executor=InlineExecutor())
        task = asyncio.ensure_future(daemon.run())
        await clock.advance(2.0)  # started and measured
        assert sum(1 for w in daemon.state.workers.values() if w.sample is not None) == 200
        observer.available = 2 * GiB + 10 * MiB
        await clock.advance(0.0)
        ticks, checks = dict(daemon.ticks), observer.fast_checks
        await clock.advance(0.5)
        assert observer.fast_checks - checks >= 200, observer.fast_checks - checks
        assert daemon.ticks["fast"] == ticks["fast"], "a reading inside the band made a tick"
        assert daemon.ticks["full"] - ticks["full"] <= 1
        observer.available = 2 * GiB - 2 * MiB
        await clock.advance(0.0)
        assert daemon.ticks["fast"] > ticks["fast"]  # the crossing's tick (and the exit's that follows)
        assert [s.event for s in effects.signals] == ["kill"]
        task.cancel()
    run(main())


def test_the_victim_is_ranked_on_figures_read_at_the_moment_of_acting():
    """At the last full tick w-0 held 900 MiB and w-1 300 MiB; since then w-1 grew to 1.4 GiB and w-0 shrank.
    The fast tick that crosses the kill threshold re-reads both (once) and kills w-1, and the kill's
    explanation quotes the figure of that moment, not the stale one."""
    async def main():
        pol = policy(workload("w", replicas=2), rules=[rule("memory.available < 2GiB", "kill", "system")])
        rig = await Rig(pol).start()
        rig.observer.memory = {"w-0": 900 * MiB, "w-1": 300 * MiB}
        await rig.advance(2.0)
        assert rig.daemon.state.workers["w-1"].memory == 300 * MiB
        rig.observer.fresh_memory = {"w-0": 100 * MiB, "w-1": int(1.4 * GiB)}
        samples = rig.observer.samples
        rig.observer.available = int(1.5 * GiB)
        await rig.advance(0.0)
        assert rig.observer.samples == samples, "a full tick measured them: this test would prove nothing"
        kills = [s for s in rig.effects.signals if s.signum == signal.SIGKILL]
        assert [k.worker for k in kills] == ["w-1"], rig.effects.signals
        assert "1.4GiB" in kills[0].explain.display and rig.observer.fresh_reads == 1
    run(main())
