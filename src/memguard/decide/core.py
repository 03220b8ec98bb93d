"""The functional core: ``step(state, observation, policy, now) -> (state, actions)``.

No I/O, no clock, no asyncio, no logging: everything it needs comes in as
arguments, everything it decides goes out as values. Durations are
computed from the ``now`` it is given, so tests drive it in virtual time.
``step`` is the core's only entry point: what the daemon is asked to do
(apply the configuration, shut down, an operator's request) arrives as a
command among the observation's events, like everything else.

One step, in order:

1. commands: apply the policy (start, reload), shut down, operator requests;
2. note kernel OOM kills the scope counted since the last step;
3. apply what the actor reported (spawned, failed to spawn, exited, trials);
4. take the full tick's samples (memory, protection, growth history);
5. SIGKILL workers whose grace period ran out;
6. follow a stopping unmanaged victim (gone, or due for SIGKILL);
7. worker rules, each worker against its own limits (and its trial checks);
8. system rules, with one victim at a time (post-action delay);
9. open or close admission gates whose rules changed;
10. start workers whose (back-off) time has come.
"""

from __future__ import annotations

import math
import zlib
from .state import evolve as replace  # dataclasses.replace without re-running __init__ (see evolve)
from typing import Mapping

from ..diagnose import diagnose_exit
from ..model import (
    Action,
    SIGKILL,
    SIGTERM,
    Exited,
    Explanation,
    GateNotSet,
    NotDone,
    Notice,
    Observation,
    Operator,
    ProcessSample,
    Ranked,
    Reclaim,
    Reconcile,
    SetAdmission,
    Shutdown,
    Signal,
    SignalProcess,
    Spawn,
    Spawned,
    SpawnFailed,
    TrialEvent,
    is_known,
    signal_name,
)
from ..policy import ActionKind, DaemonPolicy, Rule, RuleKey, WorkloadPolicy
from ..units import format_duration, format_size
from .adhoc import take_adhoc
from .evaluate import Context, evaluate
from .progress import take_progress
from .rules import BRAKE_ANSWER_S, RUNTIME_RULE, changes_between_full_ticks, system_context, worker_context, worker_rules
from .trend import note as note_trend, rule_explain, rule_holds
from .state import CoreState, Incarnation, Phase, ProcessStop, RuleState, StopState, WorkerState, check_transition

__all__ = ["step", "all_stopped"]

_ALIVE = (Phase.STARTING, Phase.RUNNING, Phase.STOPPING)
# Stops someone asked for, not decided by a rule or limit: carried out even in dry run.
_LIFECYCLE_REASONS = frozenset({"shutdown", "operator", "removed", "config changed"})
# Restarts the configuration or an operator asked for: counted in restart.planned, never a failure.
# (limits.runtime is planned too: its stop carries planned=True, though its reason is "rule".)
_PLANNED_REASONS = frozenset({"recycle", "brake", "operator", "config changed"})


class _Step:
    """Mutable scratch space for one step; the result is frozen again."""

    def __init__(self, state: CoreState, policy: DaemonPolicy, now: float) -> None:
        self.policy = policy
        self.now = now
        self.workers: dict[str, WorkerState] = dict(state.workers)
        self.system_rules: dict[str, RuleState] = dict(state.system_rules)
        self.victim = state.victim
        self.victim_severity = state.victim_severity
        self.delay_until = state.delay_until
        self.shutting_down = state.shutting_down
        self.oom_kills = state.oom_kills
        self.process_stop = state.process_stop
        self.trend = state.trend
        self.queue = state.queue
        self.promises = dict(state.promises)
        self.fresh: Mapping[str, object] = {}  # workers' memory re-read at this tick (victim ranking)
        self.actions: list[Action] = []
        self.oom_delta = 0
        self.oom_known = False  # this step's observation had the scope's OOM counter

    def freeze(self) -> CoreState:
        return CoreState(
            workers=self.workers,
            system_rules=self.system_rules,
            victim=self.victim,
            victim_severity=self.victim_severity,
            delay_until=self.delay_until,
            shutting_down=self.shutting_down,
            oom_kills=self.oom_kills,
            process_stop=self.process_stop,
            trend=self.trend,
            queue=self.queue,
            promises=self.promises,
        )

    def emit(self, action: Action) -> None:
        self.actions.append(action)

    def set(self, w: WorkerState, **changes: object) -> WorkerState:
        """Change the slot (phase, restart bookkeeping, or ``inc`` replaced whole); checked transition."""
        new = replace(w, **changes)
        check_transition(w.phase, new.phase)
        self.workers[w.name] = new
        return new

    def update(self, w: WorkerState, **changes: object) -> WorkerState:
        """Change fields of the worker's current incarnation."""
        new = replace(w, inc=replace(w.inc, **changes))
        self.workers[w.name] = new
        return new

    def workload(self, w: WorkerState) -> WorkloadPolicy:
        wl = w.adhoc if w.adhoc is not None else self.policy.workload(w.workload)
        if wl is None:  # removed by a reload while it still runs: keep its last known shape
            return WorkloadPolicy(name=w.workload, command=("",))
        return wl


# ---------------------------------------------------------------------------
# Public entry points


def step(state: CoreState, obs: Observation, policy: DaemonPolicy, now: float) -> tuple[CoreState, list[Action]]:
    s = _Step(state, policy, now)
    for at, value in obs.readings:  # the watcher's readings since the last tick, then this tick's
        if (not s.trend or at > s.trend[-1][0]) and at < obs.at:
            s.trend = note_trend(s.trend, at, value)
    s.trend = note_trend(s.trend, obs.at, obs.scope.available_bytes)
    _commands(s, obs)
    _note_kernel_oom(s, obs)
    _apply_events(s, obs)
    _take_samples(s, obs)
    take_adhoc(s, obs)
    take_progress(s.workers, obs)
    _expire_grace(s)
    _follow_process_stop(s, obs)
    if not s.shutting_down:
        system_ctx = system_context(obs, s.trend)
        touched = _event_workers(obs) if not obs.full else frozenset()
        for name in sorted(s.workers):
            w = s.workers[name]
            if obs.full or name in touched or _rules_due(s, w):
                _worker_rules(s, w, system_ctx, obs)
            elif w.phase == Phase.RUNNING:
                _trial_checks(s, w, s.workload(w), system_ctx)  # timeouts and recycling are due by time
        _system_rules(s, system_ctx, obs)
    _admission(s)
    _start_due(s)
    return s.freeze(), s.actions


def all_stopped(state: CoreState) -> bool:
    """No worker of the daemon's own runs any more (ad-hoc workers are not the daemon's to stop)."""
    return not any(w.phase in _ALIVE and w.adhoc is None for w in state.workers.values())


# ---------------------------------------------------------------------------
# 1. Commands


def _commands(s: _Step, obs: Observation) -> None:
    for ev in obs.events:
        if isinstance(ev, Reconcile):
            _reconcile(s, ev.reason)
        elif isinstance(ev, Shutdown):
            _begin_shutdown(s)
        elif isinstance(ev, Operator):
            _operator(s, ev.op, ev.worker)


def _reconcile(s: _Step, reason: str) -> None:
    """Make the worker slots match the policy (at start and on reload).

    New slots start now; slots of removed workloads or replicas stop for
    good; a worker started with a different command, environment, user or
    limits restarts; failed and stopped workers get a fresh start (a reload
    is the operator saying "try again"). Rule timers of unchanged rules
    carry over; those of removed rules are dropped.
    """
    policy, now = s.policy, s.now
    wanted: dict[str, tuple[WorkloadPolicy, int]] = {}
    for wl in policy.workloads:
        for i, name in enumerate(wl.worker_names()):
            wanted[name] = (wl, i)
    for wl in policy.workloads:
        if wl.brake.refusals is not None:
            s.emit(Notice("deprecated", level="warning", workload=wl.name,
                          reason=(f"{wl.source or wl.name}: restart_when_blocked.refusals is ignored: a trial waits "
                                  f"at a closed gate instead of being refused, so it never counted anything. The "
                                  f"brake now asks the worker to give memory back and restarts it if that did not "
                                  f"bring its memory back (ceiling: restart_when_blocked.after "
                                  f"{format_duration(wl.brake.after_s)})")))
    keep_system = {r.key for r in policy.rules}
    s.system_rules = {k: v for k, v in s.system_rules.items() if k in keep_system}
    for name, w in list(s.workers.items()):
        if name in wanted or w.adhoc is not None:
            continue
        if w.phase in (Phase.RUNNING, Phase.STARTING):
            _begin_stop(s, w, event="stop", reason="removed", then="remove", severity=ActionKind.TERMINATE.severity)
        elif w.phase == Phase.STOPPING:
            if w.stop is not None:
                s.update(w, stop=replace(w.stop, then="remove"))
        else:
            del s.workers[name]
    for name, (wl, i) in wanted.items():
        w = s.workers.get(name)
        if w is None:
            s.workers[name] = WorkerState(name=name, workload=wl.name, replica=i, spawn_at=now, spec=wl.spec_key())
            continue
        if w.stop is not None and w.stop.then == "remove":
            # Removed by an earlier reload, back before it finished stopping: it stays
            # (restarts with the new spec) instead of disappearing with its exit.
            w = s.update(w, stop=replace(w.stop, then="restart"))
        keep = {r.key for r in worker_rules(wl)}
        w = s.update(w, rules={k: v for k, v in w.rules.items() if k in keep})
        if reason == "reload" and (w.phase == Phase.FAILED or (w.phase == Phase.STOPPED and w.spec != wl.spec_key())):
            # A failed worker gets a fresh start (the reload is the operator saying "try again"); a stopped
            # one only if what it runs changed: one that finished its work stays finished.
            s.set(w, phase=Phase.PENDING, spawn_at=now, restarts=(), backoff_s=0.0, spec=wl.spec_key())
        elif w.phase == Phase.RUNNING and w.spec != wl.spec_key():
            _begin_stop(s, w, event="restart", reason="config changed", then="restart",
                        severity=ActionKind.RESTART.severity)
        elif w.phase == Phase.PENDING:
            s.workers[name] = replace(w, spec=wl.spec_key())


def _begin_shutdown(s: _Step) -> None:
    """Stop every worker for good: stop signal now, SIGKILL after each workload's grace."""
    s.shutting_down = True
    for name in sorted(s.workers):
        w = s.workers[name]
        if w.adhoc is not None:
            continue  # not the daemon's: it runs on (its memguard run, or its owner, stops it)
        if w.phase == Phase.RUNNING:
            _begin_stop(s, w, event="stop", reason="shutdown", then="stay", severity=ActionKind.TERMINATE.severity)
        elif w.phase == Phase.STOPPING and w.stop is not None:
            s.update(w, stop=replace(w.stop, then="stay"))
        elif w.phase == Phase.PENDING:
            s.set(w, phase=Phase.STOPPED, last_exit="never started (shutdown)")


def _operator(s: _Step, op: str, worker: str) -> None:
    """An administrator's ``stop``, ``start`` or ``restart`` of one worker (unknown names are ignored)."""
    w = s.workers.get(worker)
    if w is None or s.shutting_down:
        return
    if op == "start":
        if w.phase in (Phase.STOPPED, Phase.FAILED):
            s.set(w, phase=Phase.PENDING, spawn_at=s.now, restarts=(), backoff_s=0.0)
    elif op == "stop":
        if w.phase == Phase.RUNNING:
            _begin_stop(s, w, event="stop", reason="operator", then="stay", severity=ActionKind.TERMINATE.severity)
        elif w.phase == Phase.PENDING:
            s.set(w, phase=Phase.STOPPED, last_exit="stopped by the operator")
        elif w.phase == Phase.STARTING:
            _begin_stop(s, w, event="stop", reason="operator", then="stay", severity=ActionKind.TERMINATE.severity)
        elif w.phase == Phase.STOPPING and w.stop is not None:
            s.update(w, stop=replace(w.stop, then="stay"))
    elif op == "restart":
        if w.phase == Phase.RUNNING:
            _begin_stop(s, w, event="restart", reason="operator", then="restart", severity=ActionKind.RESTART.severity)
        elif w.phase in (Phase.STOPPED, Phase.FAILED, Phase.PENDING):
            s.set(w, phase=Phase.PENDING, spawn_at=s.now, restarts=(), backoff_s=0.0)


# ---------------------------------------------------------------------------
# 3. Events from the actor


def _apply_events(s: _Step, obs: Observation) -> None:
    for ev in obs.events:
        if isinstance(ev, NotDone) and ev.worker is None:
            ps = s.process_stop
            if ps is not None and ps.pid == ev.pid:
                s.process_stop = None
                s.delay_until = ev.at + s.policy.post_action_delay_s
            continue
        if not isinstance(ev, (Spawned, SpawnFailed, Exited, TrialEvent, NotDone, GateNotSet)):
            continue  # commands were applied first
        w = s.workers.get(ev.worker)
        if w is None or ev.incarnation != w.incarnation:
            continue  # about a slot or an incarnation that no longer exists
        if isinstance(ev, Spawned):
            if w.phase != Phase.STARTING:
                continue
            w = s.set(w, phase=Phase.RUNNING, inc=replace(w.inc, pid=ev.pid, started_at=ev.at))
            pending = w.stop
            if s.shutting_down:
                _begin_stop(s, w, event="stop", reason="shutdown", then="stay",
                            severity=ActionKind.TERMINATE.severity)
            elif pending is not None:
                # A stop asked for while it was starting (operator, reload): carried out now it has a pid.
                _begin_stop(s, w, event=pending.event, reason=pending.reason, then=pending.then,
                            severity=pending.severity, rule=pending.rule, explain=pending.explain,
                            system=pending.system, rule_key=pending.rule_key, planned=pending.planned)
        elif isinstance(ev, SpawnFailed):
            if w.phase != Phase.STARTING:
                continue
            s.emit(Notice("spawn_failed", level="error", worker=w.name, workload=w.workload,
                          reason=ev.error, fields={"incarnation": ev.incarnation}))
            _after_exit(s, w, ran_for=0.0, detail=ev.error, failed=True)
        elif isinstance(ev, Exited):
            if w.phase not in (Phase.RUNNING, Phase.STOPPING) or ev.pid != w.pid:
                continue
            _on_exit(s, w, ev)
        elif isinstance(ev, TrialEvent):
            if w.phase not in (Phase.RUNNING, Phase.STOPPING):
                continue
            _on_trial(s, w, ev)
        elif isinstance(ev, NotDone):
            _not_done(s, w, ev)
        elif isinstance(ev, GateNotSet):
            if w.phase in (Phase.RUNNING, Phase.STARTING) and w.admission_open == ev.open:
                # The file still says the opposite: believe it (status tells the truth), try again later.
                s.update(w, admission_open=not ev.open, gate_retry_at=ev.at + GATE_RETRY_S,
                         blocked_since=None if not ev.open else (w.blocked_since or ev.at))


def _not_done(s: _Step, w: WorkerState, ev: NotDone) -> None:
    """The stop was not carried out: the worker runs on; the rule that asked waits before acting again."""
    stop = w.stop
    if w.phase != Phase.STOPPING or stop is None or ev.pid != w.pid or stop.reason in _LIFECYCLE_REASONS:
        return
    quiet = ev.at + s.policy.post_action_delay_s
    rules = dict(w.rules)
    if stop.rule_key is not None:
        rules[stop.rule_key] = replace(rules.get(stop.rule_key, RuleState()), quiet_until=quiet, pending_since=None)
    inc = replace(w.inc, stop=None, rules=rules)
    if stop.reason in ("recycle", "brake"):
        # Not carried out (dry run, or protected): the recycle or the brake starts over after the delay.
        inc = replace(inc, draining_since=None, drain_explain=None, brake_asked_at=None, reclaimed_at=None,
                      brake_verdict=None, planned_wait_until=quiet)
    s.set(w, phase=Phase.RUNNING, inc=inc)
    if s.victim == (w.name, w.incarnation):
        s.delay_until = quiet


def _on_trial(s: _Step, w: WorkerState, ev: TrialEvent) -> None:
    """A report of the worker's client: a trial claimed, named, ended or withdrawn, a heartbeat, a reclaim done.

    A client claims a trial (``start``, no name) *before* it creates it and
    then looks at its gate again: a gate that closed meanwhile is answered
    with ``withdrawn``, so no trial is created behind a closed gate, and a
    recycle or brake restart never cuts a trial whose claim crossed the
    closing. The trial's name follows in a second ``start`` once it exists.
    """
    if ev.kind == "start":
        if w.trial_started_at is not None and w.trial_name is None and ev.name is not None:
            s.update(w, trial_name=ev.name, last_heartbeat=ev.at)  # the claimed trial now has a name
        else:
            s.update(w, trial_started_at=ev.at, trial_name=ev.name, last_heartbeat=ev.at, refusals=0)
    elif ev.kind == "end":
        ran = ev.at - w.trial_started_at if w.trial_started_at is not None else None
        s.update(w, trial_started_at=None, trial_name=None, last_heartbeat=ev.at, trials=w.trials + 1,
                 last_trial_end=ev.at)
        if ev.ok is False:
            s.emit(Notice("trial_failed", level="warning", worker=w.name, workload=w.workload, pid=w.pid,
                          reason=f"trial {ev.name or w.trials + 1} failed" + (f": {ev.detail}" if ev.detail else ""),
                          fields={"trial": ev.name, "ran_for_s": round(ran, 3) if ran is not None else None}))
    elif ev.kind == "withdrawn":
        # The gate closed between the claim and the trial: nothing was created, nothing is counted.
        if w.trial_started_at is not None:
            s.update(w, trial_started_at=None, trial_name=None, last_trial_end=ev.at)
    elif ev.kind == "heartbeat":
        s.update(w, last_heartbeat=ev.at)
    elif ev.kind == "refused":
        s.update(w, refusals=w.refusals + 1)
    elif ev.kind == "requeued":
        s.emit(Notice("trial_requeued", level="warning", worker=w.name, workload=w.workload, pid=w.pid,
                      reason=ev.detail or f"trial {ev.name} was failed and requeued", fields={"trial": ev.name}))
    elif ev.kind == "reclaimed":
        s.emit(Notice("reclaimed", worker=w.name, workload=w.workload, pid=w.pid,
                      reason="the worker ran its reclaim callbacks" + (f": {ev.detail}" if ev.detail else "")))
        if w.brake_asked_at is not None and w.reclaimed_at is None and ev.at >= w.brake_asked_at:
            s.update(w, reclaimed_at=ev.at, fulls_since_reclaimed=0)


def _on_exit(s: _Step, w: WorkerState, ev: Exited) -> None:
    """Explain an exit (cause from the documented vocabulary, the lines that say so, what to do), then
    decide what follows. The exit status decides whether it failed; the output, what kind of failure."""
    ran_for = max(0.0, ev.at - (w.started_at if w.started_at is not None else ev.at))
    stop = w.stop
    wl = s.workload(w)
    fields: dict[str, object] = {"ran_for_s": round(ran_for, 3), "incarnation": w.incarnation}
    if ev.returncode is not None:
        fields["returncode"] = ev.returncode
    if ev.signal is not None:
        fields["exit_signal"] = signal_name(ev.signal)
    kernel_oom: bool | None = ev.kernel_oom
    if kernel_oom is None and ev.signal == SIGKILL and s.oom_known:
        kernel_oom = s.oom_delta > 0  # the scope's OOM counter rose, or certainly did not
    v = diagnose_exit(ev.returncode, ev.signal, ev.last_lines, kernel_oom=kernel_oom,
                      limit_bytes=wl.limits.memory_bytes)
    if v.main is not None:
        fields.update(oom_line=v.main.line, oom_source=v.main.source)
        if v.main.gpu is not None:
            fields["gpu"] = v.main.gpu
        if v.main.requested_bytes is not None:
            fields["requested_bytes"] = v.main.requested_bytes
    if stop is not None and stop.rule == RUNTIME_RULE and stop.reason == "rule":
        # Still running past limits.runtime: a failure (a stuck job), stopped with the stop signal and
        # grace; the restart policy, with its backoff and budget, decides what follows.
        cause, failed = "timeout", True
        detail = (f"stopped by memguard ({stop.event}): still running past limits.runtime "
                  f"{format_duration(wl.limits.runtime_s or 0)}")
    elif stop is not None:
        cause, failed = "stopped", False
        detail = (f"stopped by memguard ({stop.event}, rule {stop.rule})" if stop.rule and stop.reason == "rule"
                  else f"stopped by memguard ({stop.event}, {stop.reason}: {stop.rule})" if stop.rule
                  else f"stopped by memguard ({stop.event}, {stop.reason})")
    elif kernel_oom and v.cause == "host_oom":
        cause, failed = v.cause, True
        detail = "killed by the kernel OOM killer" + (
            f" {ev.oom_detail}" if ev.oom_detail else "" if ev.kernel_oom else " (the scope's OOM kill counter rose)")
    else:
        cause, failed, detail = v.cause, v.failed, v.detail
        if not failed and v.main is not None:
            fields["recovered"] = True  # it printed an OOM and went on: information, not a failure
    fields["cause"] = cause
    if kernel_oom:
        fields["kernel_oom"] = True
    if cause == "timeout" and stop is not None:
        fields["recommendation"] = ("it ran past limits.runtime: if it hung, a progress rule (worker.cpu, "
                                    "worker.idle, worker.quiet) stops it sooner; if it needs longer, raise "
                                    "limits.runtime")
    elif failed and v.recommendation:
        fields["recommendation"] = v.recommendation
    if v.evidence and (failed or fields.get("recovered")):
        fields["evidence"] = list(v.evidence)
    if ev.leftovers:
        fields["leftovers_killed"] = ev.leftovers
    if failed and ev.last_lines:
        fields["last_lines"] = list(ev.last_lines[-5:])
    if w.trial_started_at is not None:
        fields["trial"] = w.trial_name
    s.emit(Notice("exit", level="warning" if failed else "info", worker=w.name, workload=w.workload, pid=ev.pid,
                  reason=detail, explain=stop.explain if stop else None, fields=fields))
    if w.trial_started_at is not None and (ev.signal == SIGKILL or failed):
        # Killed outright: the worker could not record the trial's end, so its study still shows it running.
        name = w.trial_name or "(not yet named)"
        s.emit(Notice("trial_interrupted", level="warning", worker=w.name, workload=w.workload, pid=ev.pid,
                      reason=(f"trial {name} was running when it ended ({detail}); the next start of "
                              f"{w.name} fails it and asks for it again (memguard.integrations.optuna)"),
                      fields={"trial": w.trial_name, "ran_for_s": round(max(0.0, ev.at - w.trial_started_at), 3)}))
    if s.victim == (w.name, w.incarnation):
        s.delay_until = ev.at + s.policy.post_action_delay_s
    _after_exit(s, w, ran_for=ran_for, detail=detail, failed=failed, by_memguard=stop is not None)


def _after_exit(s: _Step, w: WorkerState, *, ran_for: float, detail: str, failed: bool,
                by_memguard: bool = False) -> None:
    """Decide what follows an exit: stay stopped, restart now, restart after backoff, or fail.

    A planned restart (the stop said so, or a clean exit under ``always``) is
    counted in ``restart.planned`` and never fails the slot; anything else is
    a failure and spends ``restart.budget``.
    """
    wl = s.workload(w)
    stop = w.stop
    # The incarnation ended: its record is replaced whole (nothing of it survives into the next start).
    base = dict(inc=Incarnation(number=w.incarnation), last_exit=detail)
    if stop is not None and stop.then == "remove":
        del s.workers[w.name]
        return
    if s.shutting_down or (stop is not None and stop.then == "stay"):
        s.set(w, phase=Phase.STOPPED, **base)
        return
    restart_now = stop is not None and stop.then == "restart"
    finished = not failed and not by_memguard  # it exited cleanly on its own: its work is done
    if not restart_now:
        mode = wl.restart.mode
        if mode == "never" or (mode == "on-failure" and finished):
            s.set(w, phase=Phase.STOPPED, **base)
            if finished:
                s.emit(Notice("completed", worker=w.name, workload=w.workload,
                              reason="exited 0 on its own; restart policy on-failure leaves it stopped"))
            return
    rp = wl.restart
    window = rp.budget_window_s
    recent = tuple(t for t in w.restarts if s.now - t < window)
    planned = (stop is not None and stop.planned) or finished
    lo, hi = rp.backoff_min_s, rp.backoff_max_s
    if planned:
        done = tuple(t for t in w.planned if s.now - t < rp.planned_window_s) + (s.now,)
        delay = 0.0 if restart_now else (w.backoff_s or lo) if ran_for < hi else lo
        next_backoff = lo if restart_now else min(max(delay * 2, lo), hi)
        s.set(w, phase=Phase.PENDING, spawn_at=s.now + delay, backoff_s=next_backoff, restarts=recent,
              planned=done, **base)
        s.emit(Notice("restart_scheduled", worker=w.name, workload=w.workload,
                      reason=f"planned restart in {format_duration(delay)} after: {detail}",
                      fields={"delay_s": delay, "planned": True, "planned_in_window": len(done),
                              "restarts_in_window": len(recent),
                              "budget": f"{rp.budget_count}/{format_duration(window)}"}))
        return
    if len(recent) >= rp.budget_count:
        s.set(w, phase=Phase.FAILED, restarts=recent, **base)
        s.emit(Notice("failed", level="error", worker=w.name, workload=w.workload,
                      reason=(f"restart budget spent: {len(recent)} failures in the last "
                              f"{format_duration(window)} (restart.budget {rp.budget_count}/"
                              f"{format_duration(window)}; planned restarts are not counted); last exit: "
                              f"{detail}. It stays failed until a reload or an operator start."),
                      fields={"restarts": len(recent)}))
        return
    backoff = w.backoff_s or lo
    if ran_for >= hi:
        backoff = lo  # it ran long enough: this is not a crash loop
    delay = 0.0 if restart_now else backoff
    next_backoff = lo if restart_now else min(max(backoff * 2, lo), hi)
    s.set(w, phase=Phase.PENDING, spawn_at=s.now + delay, backoff_s=next_backoff, restarts=recent + (s.now,), **base)
    s.emit(Notice("restart_scheduled", worker=w.name, workload=w.workload,
                  reason=f"restart in {format_duration(delay)} after: {detail}",
                  fields={"delay_s": delay, "planned": False, "restarts_in_window": len(recent) + 1,
                          "budget": f"{rp.budget_count}/{format_duration(window)}"}))


# ---------------------------------------------------------------------------
# 2, 4, 5. Kernel OOM counter, samples, grace expiry


def _note_kernel_oom(s: _Step, obs: Observation) -> None:
    now_count = obs.scope.oom_kills
    if is_known(now_count) and is_known(s.oom_kills):
        s.oom_known = True
        s.oom_delta = max(0, int(now_count) - int(s.oom_kills))
        if s.oom_delta:
            s.emit(Notice("kernel_oom_kill", level="error",
                          reason=(f"the kernel OOM killer killed {s.oom_delta} process(es) in the "
                                  f"{obs.scope.kind} scope"),
                          fields={"oom_kills": int(now_count), "scope": obs.scope.kind}))
    if is_known(now_count):
        s.oom_kills = now_count


def _take_samples(s: _Step, obs: Observation) -> None:
    if not obs.full:
        # A fast tick that crossed a stop threshold re-read each worker's memory: victims are ranked on it
        # (the workers' state keeps the full tick's figures; nothing is copied for 200 workers here).
        s.fresh = obs.worker_memory
        return
    for name, w in list(s.workers.items()):
        sample = obs.workers.get(name)
        if w.phase in (Phase.RUNNING, Phase.STOPPING) and sample is not None and sample.pid == w.pid:
            history = w.history
            if is_known(sample.memory_bytes):
                # The history feeds worker.growth, the worker.memory trend (within:) and status sparklines.
                # Points leave from the front only: drop the expired ones, then one C-level slice and append.
                window = s.workload(w).growth_window_s
                cut = 0
                while cut < len(history) and obs.at - history[cut][0] > window:
                    cut += 1
                history = history[cut:] + ((obs.at, float(sample.memory_bytes)),)
            w = s.update(w, sample=sample, memory=sample.memory_bytes, history=history)
            if w.reclaimed_at is not None and w.brake_verdict is None:
                s.update(w, fulls_since_reclaimed=w.fulls_since_reclaimed + 1)


def _expire_grace(s: _Step) -> None:
    for name in sorted(s.workers):
        w = s.workers[name]
        stop = w.stop
        if w.phase != Phase.STOPPING or stop is None or stop.kill_at is None or s.now < stop.kill_at:
            continue
        if w.sample is not None and w.sample.protected:
            continue
        s.update(w, stop=replace(stop, kill_at=None))
        s.emit(Signal(worker=w.name, workload=w.workload, pid=w.pid or 0, incarnation=w.incarnation,
                      signum=SIGKILL, event="escalate",
                      reason=(f"still running {format_duration(s.now - stop.requested_at)} after the stop "
                              f"signal; grace period over, SIGKILL"),
                      explain=stop.explain, lifecycle=stop.reason in _LIFECYCLE_REASONS))


# ---------------------------------------------------------------------------
# 7. Worker rules


def _event_workers(obs: Observation) -> frozenset[str]:
    """Workers an event of this tick is about (a trial report, a spawn, an exit...)."""
    return frozenset(w for ev in obs.events if isinstance(w := getattr(ev, "worker", None), str))


def _rules_due(s: _Step, w: WorkerState) -> bool:
    """Must the worker's rules run on this fast tick? Only if they read something a fast tick changes, or a
    rule's ``for:`` or quiet period may run out now: the others would give the last full tick's answers."""
    if w.phase not in (Phase.RUNNING, Phase.STOPPING):
        return False
    if any(rs.pending_since is not None or 0 < rs.quiet_until <= s.now for rs in w.rules.values()):
        return True
    return changes_between_full_ticks(s.workload(w))


def _track(rs: RuleState, holds: bool | None, rule: Rule, now: float) -> tuple[RuleState, bool]:
    """Advance a not-active rule's ``for:`` timer; returns (state, fires now)."""
    if holds is True:
        since = rs.pending_since if rs.pending_since is not None else now
        if now - since >= rule.for_s and now >= rs.quiet_until:
            return replace(rs, pending_since=since), True
        return replace(rs, pending_since=since), False
    if holds is False:
        return replace(rs, pending_since=None), False
    return rs, False  # unknown: neither advances nor resets


def _releases(rule: Rule, ctx: Context, holds: bool | None) -> bool:
    """Invariant 4: release only past the hysteresis band, and only on a definite reading."""
    if rule.release is not None:
        return evaluate(rule.release, ctx) is True
    return holds is False


def _worker_rules(s: _Step, w: WorkerState, system: Context, obs: Observation) -> None:
    if w.phase not in (Phase.RUNNING, Phase.STOPPING):
        return
    wl = s.workload(w)
    ctx = worker_context(w, wl, system, s.now)
    states = dict(w.rules)
    for rule in worker_rules(wl):
        rs = states.get(rule.key, RuleState())
        holds = rule_holds(rule, ctx)
        if rs.active:
            if _releases(rule, ctx, holds):
                states[rule.key] = RuleState()
                if rule.action == ActionKind.WARN:
                    s.emit(Notice("warn_cleared", worker=w.name, workload=w.workload, pid=w.pid,
                                  reason=f"rule {rule.name} released", explain=rs.explain))
            continue
        rs, fires = _track(rs, holds, rule, s.now)
        states[rule.key] = rs
        if not fires:
            continue
        ex = rule_explain(rule, ctx)
        current = s.workers[w.name]
        if rule.action.is_level:
            states[rule.key] = RuleState(active=True, explain=ex)
            if rule.action == ActionKind.WARN:
                s.emit(Notice("warn", level="warning", worker=w.name, workload=w.workload, pid=w.pid,
                              reason=f"rule {rule.name}: {ex.display}", explain=ex))
            continue
        if rule.action == ActionKind.RECLAIM:
            states[rule.key] = RuleState(quiet_until=s.now + wl.reclaim_interval_s, explain=ex)
            if w.phase == Phase.RUNNING and w.pid is not None:
                s.emit(Reclaim(worker=w.name, workload=w.workload, pid=w.pid, incarnation=w.incarnation,
                               reason=f"rule {rule.name}: asking the worker to give memory back", explain=ex))
            continue
        # A stop action: reset the timer (a new incarnation starts clean anyway).
        states[rule.key] = RuleState(explain=ex)
        s.update(current, rules=dict(states))
        _stop_for_rule(s, s.workers[w.name], rule, ex, system_rule=False)
        states = dict(s.workers[w.name].rules) if w.name in s.workers else states
    if w.name in s.workers:
        s.update(s.workers[w.name], rules=states)
        _trial_checks(s, s.workers[w.name], wl, ctx)


# 5 s between two tries to write a gate file that could not be written (a full or read-only runtime
# directory): the failure is reported once by the actor, and the decision is not re-logged every tick.
GATE_RETRY_S = 5.0

# After closing a worker's gate for recycling, how long to wait before
# trusting "no trial runs": a client that read the gate just before it
# closed reports its trial start within milliseconds on the same machine.
DRAIN_SETTLE_S = 0.2


def _jitter(name: str, incarnation: int) -> float:
    """A fixed number in [0, 1) per incarnation: spreads replicas without a random generator."""
    return (zlib.crc32(f"{name}/{incarnation}".encode()) & 0xFFFFFFFF) / 2**32


def _builtin(name: str, when: str, signal: str, value: float, threshold: float | None, unit: str, display: str,
             source: str) -> Explanation:
    return Explanation(rule=name, when=when, signal=signal, value=value, threshold=threshold, unit=unit,
                       display=display, source=source)


def _trial_checks(s: _Step, w: WorkerState, wl: WorkloadPolicy, ctx: Context) -> None:
    """Stuck trials, the brake, and recycling at a trial boundary: built-in rules of the workload."""
    if w.phase != Phase.RUNNING or w.started_at is None:
        return
    now = s.now
    in_trial = w.trial_started_at is not None
    if in_trial and wl.trial_timeout_s is not None and now - w.trial_started_at >= wl.trial_timeout_s:
        age = now - w.trial_started_at
        ex = _builtin("trial_timeout", f"worker.trial_age > {format_duration(wl.trial_timeout_s)}", "worker.trial_age",
                      age, wl.trial_timeout_s, "seconds",
                      f"trial {w.trial_name or w.trials + 1} running {format_duration(age)} > trial_timeout "
                      f"{format_duration(wl.trial_timeout_s)}", wl.source)
        _begin_stop(s, w, event="terminate", reason="stuck", then="policy", severity=ActionKind.TERMINATE.severity,
                    rule="trial_timeout", explain=ex)
        return
    if (in_trial and wl.heartbeat_timeout_s is not None and w.last_heartbeat is not None
            and now - w.last_heartbeat >= wl.heartbeat_timeout_s):
        quiet = now - w.last_heartbeat
        ex = _builtin("heartbeat_timeout", f"no heartbeat for {format_duration(wl.heartbeat_timeout_s)}",
                      "worker.heartbeat_age", quiet, wl.heartbeat_timeout_s, "seconds",
                      f"no heartbeat for {format_duration(quiet)} > heartbeat_timeout "
                      f"{format_duration(wl.heartbeat_timeout_s)} (trial {w.trial_name or w.trials + 1})", wl.source)
        _begin_stop(s, w, event="terminate", reason="stuck", then="policy", severity=ActionKind.TERMINATE.severity,
                    rule="heartbeat_timeout", explain=ex)
        return
    if in_trial:
        return  # recycling and the brake act only between trials
    if _brake(s, w, wl):
        return  # the brake, not recycling, decides when a worker held by its own memory restarts
    _recycle(s, w, wl)


def _planned_room(w: WorkerState, wl: WorkloadPolicy, now: float) -> float | None:
    """None when restart.planned has room for one more planned restart now; else when it will."""
    rp = wl.restart
    recent = [t for t in w.planned if now - t < rp.planned_window_s]
    if len(recent) < rp.planned_count:
        return None
    return min(recent) + rp.planned_window_s


def _planned_may_go(s: _Step, w: WorkerState, wl: WorkloadPolicy, what: str) -> bool:
    """May a planned restart (``what``: recycle, brake) be carried out now? Says once why it waits."""
    now = s.now
    if now < w.planned_wait_until:
        return False
    room = _planned_room(w, wl, now)
    if room is None:
        return True
    if not w.inc.planned_waiting:
        rp = wl.restart
        s.emit(Notice("restart_postponed", worker=w.name, workload=w.workload, pid=w.pid,
                      reason=(f"{what} restart waits {format_duration(room - now)}: {rp.planned_count} planned "
                              f"restarts in the last {format_duration(rp.planned_window_s)} (restart.planned "
                              f"{rp.planned_count}/{format_duration(rp.planned_window_s)}); never counted as a "
                              f"failure"),
                      fields={"until_s": round(room - now, 3)}))
    s.update(w, planned_wait_until=room, planned_waiting=True)
    return False


def _own_blocking_rule(w: WorkerState, wl: WorkloadPolicy) -> Rule | None:
    """The first of the worker's own block rules in force (its gate is held by its own memory)."""
    for r in wl.rules:
        if r.action == ActionKind.BLOCK and (rs := w.rules.get(r.key)) is not None and rs.active:
            return r
    return None


def _brake(s: _Step, w: WorkerState, wl: WorkloadPolicy) -> bool:
    """restart_when_blocked, between trials. True while the brake holds the worker (recycling waits).

    One round per closing of the gate by the worker's own memory: ask it to
    reclaim once; when it answers, take two more full readings (the first
    may have been measured before the answer, the second was not); if its
    own block rule has not released on them, its memory did not come back:
    restart it. A reclaim nobody answers is judged on the memory after
    ``BRAKE_ANSWER_S``; ``after`` is the ceiling on the wait whatever the
    evidence. Unknown memory decides nothing (invariant 1), only the ceiling.
    """
    brake = wl.brake
    if not brake.enabled:
        return False
    rule = _own_blocking_rule(w, wl)
    if rule is None or w.admission_open or w.blocked_since is None:
        if w.brake_asked_at is not None or w.brake_verdict is not None:
            # The gate opened (the reclaim worked) or was never the worker's own doing: the round is over.
            s.update(w, brake_asked_at=None, brake_memory=w.memory, reclaimed_at=None, fulls_since_reclaimed=0,
                     brake_verdict=None,
                     planned_wait_until=0.0 if w.planned_wait_until == math.inf else w.planned_wait_until)
        return False
    now = s.now
    if now < w.planned_wait_until:
        return True
    mem = w.memory
    held = f"rule {rule.name}" + (f" (release: {rule.release_text})" if rule.release_text else "")
    if w.brake_verdict is None:
        if w.brake_asked_at is None:
            ex = w.rules[rule.key].explain
            s.update(w, brake_asked_at=now, brake_memory=mem, reclaimed_at=None, fulls_since_reclaimed=0)
            if w.pid is not None:
                s.emit(Reclaim(worker=w.name, workload=w.workload, pid=w.pid, incarnation=w.incarnation,
                               reason=(f"restart_when_blocked: its own memory holds its gate closed, {held}; "
                                       f"asking it to give memory back before deciding whether it must restart"),
                               explain=ex))
            return True
        waited = now - max(w.blocked_since, w.last_trial_end if w.last_trial_end is not None else -math.inf)
        answered = w.reclaimed_at is not None and w.fulls_since_reclaimed >= 2
        silent = w.reclaimed_at is None and now - w.brake_asked_at >= min(BRAKE_ANSWER_S, brake.after_s)
        if (answered or silent) and is_known(mem):
            before = w.brake_memory
            was = format_size(float(before)) if is_known(before) else "unknown"
            how = (f"the worker's reclaim took its memory from {was} to {format_size(float(mem))}" if answered else
                   f"no answer to the reclaim request within {format_duration(min(BRAKE_ANSWER_S, brake.after_s))} "
                   f"(memory {was} then, {format_size(float(mem))} now)")
            verdict = _builtin("restart_when_blocked", f"worker.memory still holds the gate after a reclaim ({held})",
                               "worker.memory", float(mem), None, "bytes",
                               f"{how}, not enough to release {held}: only a restart gives leaked "
                               f"memory back", wl.source)
        elif waited >= brake.after_s:
            verdict = _builtin("restart_when_blocked", f"worker.blocked_for >= {format_duration(brake.after_s)}",
                               "worker.blocked_for", waited, brake.after_s, "seconds",
                               f"waited {format_duration(waited)} at a gate its own memory holds closed, {held} "
                               f"(restart_when_blocked.after {format_duration(brake.after_s)})", wl.source)
        else:
            return True
        if w.trials == 0 and w.refusals > 0:
            # Its client waits at the gate before its first trial ended: its size at start holds the gate,
            # and a new process would start at that size too.
            s.update(w, brake_verdict=verdict, planned_wait_until=math.inf)
            s.emit(Notice("brake_futile", level="error", worker=w.name, workload=w.workload, pid=w.pid,
                          reason=(f"its own memory ({format_size(float(mem)) if is_known(mem) else 'unknown'}) "
                                  f"holds its gate closed before it finished a single trial, {held}: a restart "
                                  f"would start it at the same size, so restart_when_blocked leaves it waiting. "
                                  f"Raise the rule's threshold above the worker's size at start."),
                          explain=verdict))
            return True
        w = s.update(w, brake_verdict=verdict)
    if not _planned_may_go(s, w, wl, "brake"):
        return True
    _begin_stop(s, w, event="restart", reason="brake", then="restart", severity=ActionKind.RESTART.severity,
                rule="restart_when_blocked", explain=w.brake_verdict, planned=True)
    return True


def _recycle(s: _Step, w: WorkerState, wl: WorkloadPolicy) -> None:
    """recycle.max_trials and recycle.max_age: close the gate, then restart between two trials."""
    now = s.now
    if w.draining_since is not None:
        # The gate closed for recycling; a trial whose start crossed the closing is over by now
        # (trial starts reach memguard within milliseconds): restart between trials.
        if now - w.draining_since >= DRAIN_SETTLE_S:
            ex = w.drain_explain
            _begin_stop(s, w, event="restart", reason="recycle", then="restart",
                        severity=ActionKind.RESTART.severity, rule=ex.rule if ex else "recycle", explain=ex,
                        planned=True)
        return
    rc = wl.recycle
    ex = None
    if rc.max_trials is not None and w.trials >= rc.max_trials:
        ex = _builtin("recycle.max_trials", f"worker.trials >= {rc.max_trials}", "worker.trials", float(w.trials),
                      float(rc.max_trials), "count", f"{w.trials} trials done >= recycle.max_trials {rc.max_trials}",
                      wl.source)
    elif rc.max_age_s is not None:
        limit = rc.max_age_s * (1.0 - rc.jitter * _jitter(w.name, w.incarnation))
        age = now - w.started_at
        if age >= limit:
            ex = _builtin("recycle.max_age", f"worker.age >= {format_duration(limit)}", "worker.age", age, limit,
                          "seconds", f"age {format_duration(age)} >= recycle.max_age {format_duration(rc.max_age_s)} "
                          f"(less {rc.jitter:.0%} jitter: {format_duration(limit)})", wl.source)
    if ex is not None and _planned_may_go(s, w, wl, "recycle"):
        # Close the gate first, so no new trial starts; restart once the boundary is certain.
        s.update(w, draining_since=now, drain_explain=ex)


def _own_block(w: WorkerState, wl: WorkloadPolicy) -> bool:
    """Is the worker's gate held by one of its own (worker) block rules?"""
    return any(r.action == ActionKind.BLOCK and (rs := w.rules.get(r.key)) is not None and rs.active
               for r in wl.rules)


def _stop_for_rule(s: _Step, w: WorkerState, rule: Rule, ex: Explanation, *, system_rule: bool) -> bool:
    """Carry a stop action of ``rule`` out on ``w``; escalate if it is already stopping. True if acted."""
    action = rule.action
    if w.sample is None:
        return False  # not measured yet: whether it is protected is unknown (invariant 6 before 1)
    if w.sample.protected:
        s.emit(Notice("refused", level="warning", worker=w.name, workload=w.workload, pid=w.pid,
                      reason=f"rule {rule.name} wants to {action.value} a protected process; never signalled",
                      explain=ex))
        return False
    if w.phase == Phase.STOPPING:
        stop = w.stop
        if stop is None or action.severity <= stop.severity or stop.kill_at is None:
            return False
        if action == ActionKind.KILL:
            s.update(w, stop=replace(stop, kill_at=None, severity=action.severity, rule=rule.name, explain=ex))
            s.emit(Signal(worker=w.name, workload=w.workload, pid=w.pid or 0, incarnation=w.incarnation,
                          signum=SIGKILL, event="kill", reason=f"harder rule {rule.name} fired during the grace period",
                          explain=ex))
            return True
        return False
    if w.phase != Phase.RUNNING:
        return False
    then = "restart" if action == ActionKind.RESTART else "policy"
    _begin_stop(s, w, event=action.value, reason="rule", then=then, severity=action.severity,
                rule=rule.name, explain=ex, grace_s=rule.grace_s, system=system_rule,
                rule_key=None if system_rule else rule.key)
    return True


def _begin_stop(s: _Step, w: WorkerState, *, event: str, reason: str, then: str, severity: int,
                rule: str | None = None, explain: Explanation | None = None, grace_s: float | None = None,
                system: bool = False, rule_key: RuleKey | None = None, planned: bool | None = None) -> None:
    wl = s.workload(w)
    grace = wl.grace_s if grace_s is None else grace_s
    if planned is None:
        planned = reason in _PLANNED_REASONS
    if w.phase == Phase.STARTING:
        # No pid yet: remember the wish; the Spawned event turns it into a stop.
        s.update(w, stop=StopState(event=event, reason=reason, then=then, requested_at=s.now,
                                   kill_at=s.now + grace, severity=severity, rule=rule, explain=explain,
                                   system=system, rule_key=rule_key, planned=planned))
        return
    protected = w.sample is not None and w.sample.protected
    kill_now = event == "kill"
    stop = StopState(event=event, reason=reason, then=then, requested_at=s.now,
                     kill_at=None if kill_now else s.now + grace, severity=severity, rule=rule,
                     explain=explain, system=system, rule_key=rule_key, planned=planned)
    s.set(w, phase=Phase.STOPPING, inc=replace(w.inc, stop=stop))
    if protected:
        s.emit(Notice("refused", level="warning", worker=w.name, workload=w.workload, pid=w.pid,
                      reason=f"{event} ({reason}) of a protected process; never signalled", explain=explain))
        return
    signum = SIGKILL if kill_now else wl.stop_signal
    if kill_now:
        why = f"rule {rule}: SIGKILL at once" if rule else "SIGKILL"
    else:
        why = (f"{signal_name(signum)} now, SIGKILL after {format_duration(grace)}"
               + ((f" (rule {rule})" if reason == "rule" else f" ({reason}: {rule})") if rule else f" ({reason})"))
    if then == "restart":
        why += "; restarts at once"
    s.emit(Signal(worker=w.name, workload=w.workload, pid=w.pid or 0, incarnation=w.incarnation, signum=signum,
                  event=event, reason=why, explain=explain, lifecycle=reason in _LIFECYCLE_REASONS))


# ---------------------------------------------------------------------------
# 6, 8. Unmanaged victims, system rules and victim choice


def _follow_process_stop(s: _Step, obs: Observation) -> None:
    """An unmanaged victim: gone (its memory is back) or due for SIGKILL after its grace."""
    ps = s.process_stop
    if ps is None:
        return
    if obs.full and not any(p.pid == ps.pid and p.start == ps.start for p in obs.unmanaged):
        s.process_stop = None
        s.delay_until = obs.at + s.policy.post_action_delay_s
        s.emit(Notice("exit", worker=None, pid=ps.pid, reason=f"unmanaged process {ps.name} (pid {ps.pid}) is gone",
                      explain=ps.explain, fields={"cause": "stopped", "unmanaged": True}))
        return
    if ps.kill_at is not None and s.now >= ps.kill_at:
        s.process_stop = replace(ps, kill_at=None)
        s.emit(SignalProcess(pid=ps.pid, start=ps.start, name=ps.name, signum=SIGKILL, event="escalate",
                             reason=f"still running {format_duration(s.now - ps.requested_at)} after SIGTERM; "
                                    f"grace period over, SIGKILL", explain=ps.explain))


def _victim_locked(s: _Step) -> bool:
    """Invariant 3: the last victim's memory is still being freed."""
    if s.process_stop is not None:
        return True
    if s.victim is not None:
        name, inc = s.victim
        w = s.workers.get(name)
        if w is not None and w.incarnation == inc and w.phase == Phase.STOPPING:
            return True
    return s.now < s.delay_until


def _memory_now(s: _Step, w: WorkerState) -> object:
    """The worker's memory as read at this tick when it was re-read (a stop crossing), else the full tick's."""
    m = s.fresh.get(w.name)
    return m if m is not None and is_known(m) else w.memory


def _rank(s: _Step, gpu_device: str | None = None) -> list[WorkerState]:
    """Victim order under system pressure: lowest priority first, then the largest.

    Under GPU pressure (``gpu_device``: the device whose reading fired the
    rule, "*" for any) "largest" is the GPU memory held on that device.
    """
    def size(w: WorkerState) -> float:
        if gpu_device is None:
            m = _memory_now(s, w)
            return float(m) if is_known(m) else -1.0
        if w.sample is None:
            return -1.0
        v = w.sample.gpu_memory_bytes if gpu_device == "*" else w.sample.gpu_per_device.get(gpu_device, 0)
        return float(v) if is_known(v) else -1.0

    def key(w: WorkerState) -> tuple:
        return (s.workload(w).priority, -size(w), w.name)

    # A worker not measured yet cannot be shown to be unprotected: never a candidate.
    return sorted((w for w in s.workers.values()
                   if w.phase == Phase.RUNNING and w.sample is not None and not w.sample.protected), key=key)


#: How many of a system rule's candidates its explanation names, in victim order (the incident record's ranking).
RANKING_MAX = 8


def _ranked(s: _Step, candidates: list[WorkerState]) -> tuple[Ranked, ...]:
    """The first candidates as the decision saw them (memory re-read at a stop crossing where it was)."""
    out = []
    for w in candidates[:RANKING_MAX]:
        mem = _memory_now(s, w)
        gpu = w.sample.gpu_memory_bytes if w.sample is not None else None
        out.append(Ranked(w.name, w.pid, s.workload(w).priority, int(mem) if is_known(mem) else None,
                          int(gpu) if is_known(gpu) and gpu else None))
    return tuple(out)


def _system_rules(s: _Step, ctx: Context, obs: Observation) -> None:
    # Hardest first, so that a kill rule takes the victim before a terminate rule would.
    for rule in sorted(s.policy.rules, key=lambda r: -r.action.severity):
        rs = s.system_rules.get(rule.key, RuleState())
        holds = rule_holds(rule, ctx)
        if rs.active:
            if _releases(rule, ctx, holds):
                s.system_rules[rule.key] = RuleState()
                if rule.action == ActionKind.WARN:
                    s.emit(Notice("warn_cleared", reason=f"rule {rule.name} released", explain=rs.explain))
            continue
        rs, fires = _track(rs, holds, rule, s.now)
        s.system_rules[rule.key] = rs
        if not fires:
            continue
        ex = rule_explain(rule, ctx)
        if rule.action.is_level:
            s.system_rules[rule.key] = RuleState(active=True, explain=ex)
            if rule.action == ActionKind.WARN:
                s.emit(Notice("warn", level="warning", reason=f"rule {rule.name}: {ex.display}", explain=ex))
            continue
        _system_stop(s, rule, rs, ex, obs)


def _system_stop(s: _Step, rule: Rule, rs: RuleState, ex: Explanation, obs: Observation) -> None:
    severity = rule.action.severity
    if _victim_locked(s):
        if severity <= s.victim_severity:
            return  # stays pending; fires once the delay is over, if it still holds
        ps = s.process_stop
        if ps is not None and rule.action == ActionKind.KILL and ps.kill_at is not None:
            s.process_stop = replace(ps, kill_at=None, severity=severity)
            s.victim_severity = severity
            s.system_rules[rule.key] = RuleState(explain=ex)
            s.emit(SignalProcess(pid=ps.pid, start=ps.start, name=ps.name, signum=SIGKILL, event="kill",
                                 reason=f"harder rule {rule.name} fired during the grace period", explain=ex))
            return
        # A harder rule: escalate on the victim still dying, or choose another.
        if s.victim is not None:
            w = s.workers.get(s.victim[0])
            if w is not None and w.phase == Phase.STOPPING and w.incarnation == s.victim[1]:
                if _stop_for_rule(s, w, rule, ex, system_rule=True):
                    s.victim_severity = severity
                    s.system_rules[rule.key] = RuleState(explain=ex)
                    return
    gpu_device = ex.gpu_device
    candidates = _rank(s, gpu_device)
    ex = replace(ex, ranking=_ranked(s, candidates))
    procs = [] if gpu_device is not None else sorted((p for p in obs.unmanaged if is_known(p.memory_bytes)),
                   key=lambda p: (p.priority, -float(p.memory_bytes), p.pid))
    best_proc = procs[0] if procs else None
    if best_proc is not None and (not candidates or (best_proc.priority, -float(best_proc.memory_bytes)) < (
            s.workload(candidates[0]).priority,
            -(float(m) if is_known(m := _memory_now(s, candidates[0])) else -1.0))):
        _stop_process(s, best_proc, rule, ex, len(candidates) + len(procs))
        return
    if not candidates:
        s.system_rules[rule.key] = RuleState(quiet_until=s.now + s.policy.post_action_delay_s,
                                             explain=ex)
        s.emit(Notice("no_victim", level="error",
                      reason=f"rule {rule.name} fired ({ex.display}) but no running, unprotected worker is left to "
                             f"{rule.action.value}", explain=ex))
        return
    victim = candidates[0]
    wl = s.workload(victim)
    if gpu_device is not None and victim.sample is not None:
        g = (victim.sample.gpu_memory_bytes if gpu_device == "*"
             else victim.sample.gpu_per_device.get(gpu_device, 0))
        where = "all GPUs" if gpu_device == "*" else f"GPU {gpu_device}"
        mem = f"GPU memory {format_size(float(g)) if is_known(g) else 'unknown'} on {where}"
    else:
        now_mem = _memory_now(s, victim)
        mem = "memory " + (format_size(float(now_mem)) if is_known(now_mem) else "unknown")
    detail = (f"{ex.display}; victim {victim.name} (priority {wl.priority}, {mem}, "
              f"largest of {len(candidates)} candidate(s) at that priority)")
    ex = replace(ex, display=detail)
    _stop_for_rule(s, victim, rule, ex, system_rule=True)
    s.victim = (victim.name, victim.incarnation)
    s.victim_severity = severity
    s.delay_until = math.inf  # set to exit time + delay when the victim is reaped
    s.system_rules[rule.key] = RuleState(explain=ex)


def _stop_process(s: _Step, p: ProcessSample, rule: Rule, ex: Explanation, n: int) -> None:
    """Stop an unmanaged process chosen as the victim: SIGTERM and grace, or SIGKILL at once."""
    ex = replace(ex, display=(f"{ex.display}; victim unmanaged process {p.name} (pid {p.pid}, user {p.user}, "
                              f"matched {p.matcher!r}, priority {p.priority}, memory "
                              f"{format_size(float(p.memory_bytes))}, largest of {n} candidate(s))"))
    kill_now = rule.action == ActionKind.KILL
    grace = rule.grace_s if rule.grace_s is not None else 10.0
    s.process_stop = ProcessStop(pid=p.pid, start=p.start, name=p.name, requested_at=s.now,
                                 kill_at=None if kill_now else s.now + grace, severity=rule.action.severity,
                                 explain=ex)
    s.victim = None
    s.victim_severity = rule.action.severity
    s.delay_until = math.inf
    s.system_rules[rule.key] = RuleState(explain=ex)
    s.emit(SignalProcess(pid=p.pid, start=p.start, name=p.name, signum=SIGKILL if kill_now else SIGTERM,
                         event=rule.action.value if rule.action != ActionKind.RESTART else "terminate",
                         reason=(f"rule {rule.name}: SIGKILL at once" if kill_now else
                                 f"rule {rule.name}: SIGTERM now, SIGKILL after {format_duration(grace)}"),
                         explain=ex))


# ---------------------------------------------------------------------------
# 9-10. Admission and starts


def _admission(s: _Step) -> None:
    system_block = [rs for r in s.policy.rules
                    if r.action == ActionKind.BLOCK and (rs := s.system_rules.get(r.key)) is not None and rs.active]
    for name in sorted(s.workers):
        w = s.workers[name]
        if w.phase not in (Phase.RUNNING, Phase.STARTING):
            continue
        if w.admission_open and not system_block and w.draining_since is None and not any(
                rs.active for rs in w.rules.values()):
            continue  # open, and nothing is holding it closed: nothing to do
        wl = s.workload(w)
        blocking = [rs for r in worker_rules(wl)
                    if r.action == ActionKind.BLOCK and (rs := w.rules.get(r.key)) is not None and rs.active]
        blocking = blocking + system_block
        want_open = not blocking and w.draining_since is None
        if want_open == w.admission_open or s.now < w.gate_retry_at:
            continue
        s.update(w, admission_open=want_open, blocked_since=None if want_open else s.now)
        if want_open:
            s.emit(SetAdmission(worker=name, workload=w.workload, open=True, event="release",
                                reason="every block rule released; admission open"))
        elif not blocking:
            s.emit(SetAdmission(worker=name, workload=w.workload, open=False, event="drain",
                                reason="admission closed: recycling at the next trial boundary",
                                explain=w.drain_explain))
        else:
            ex = blocking[0].explain
            s.emit(SetAdmission(worker=name, workload=w.workload, open=False, event="block",
                                reason=f"admission closed: new trials wait (rule {ex.rule if ex else '?'})",
                                explain=ex))


def _start_due(s: _Step) -> None:
    if s.shutting_down:
        return
    for name in sorted(s.workers):
        w = s.workers[name]
        if w.phase != Phase.PENDING or s.now < w.spawn_at:
            continue
        wl = s.policy.workload(w.workload)
        if wl is None:
            continue
        first = w.incarnation == 0
        w = s.set(w, phase=Phase.STARTING, inc=Incarnation(number=w.incarnation + 1), spec=wl.spec_key())
        s.emit(Spawn(worker=name, workload=w.workload, incarnation=w.incarnation, restart=not first,
                     reason="start" if first else f"restart #{w.incarnation - 1} (after: {w.last_exit})"))
