"""The daemon's incident records: what the reporter writes when something dies, and when.

:class:`IncidentSink` is the incidents half of the
:class:`~memguard.report.reporter.Reporter`. It writes one record
(:mod:`memguard.report.incidents`) per death:

- **memguard's own stop** (a :class:`~memguard.model.Signal` a rule or a
  limit decided, or a :class:`~memguard.model.SignalProcess` of an
  unmanaged victim; not the stops of a shutdown, a reload or an operator):
  written, ``pending``, by :meth:`own_stop` while the reporter logs the
  decision, which the daemon does *before* its effects send the signal. The
  write is a rename without ``fsync``: once it returns the record survives
  the daemon (a SIGKILL right after leaves it whole); only a machine crash
  needs the ``fsync``, done right after the signal, off the loop, with the
  flight recorder's timeline. The worker's exit completes the record (what
  the signal did); an escalation (SIGKILL after the grace) is added to it.
- **a worker's abnormal exit** (the core's exit notice with a failing
  cause): one record, with the notice's verdict (cause, the lines that say
  so, the advice) and the timeline before it. A kernel OOM kill of the
  worker seen in the kernel log is the same death: the two end in one
  record (:meth:`IncidentStore.record` merges by the process's key).
- **the kernel's OOM kills anywhere on the box, and containers' deaths**:
  :class:`~memguard.report.deaths.DeathWatch`, started with the daemon.

Each incident gets one log (journald) entry, event ``incident``, when it is
first written; a later merge into it (the kernel's view of an exit already
recorded) adds detail to the file, not a second entry.

Everything slow (``fsync``, merges that read the directory, completions)
runs in one writer thread, in the order it was asked for, so the loop never
waits on a disk and a record's updates never overtake its first write.
Nothing here raises into the daemon: a failure is handed to ``failed``
(the reporter says it once) and guarding goes on.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..decide.state import CoreState
from ..model import Action, Exited, NotDone, Notice, Observation, Signal, SignalProcess, signal_name
from ..policy import DaemonPolicy
from ..sense.containers import cgroup_of_pid, cmdline_of_pid
from .deaths import AFTER_S, TIMELINE_S, DeathWatch
from .incidents import CAUSES, Incident, IncidentStore, complete_action, incident_for_action, incident_from_exit
from .recorder import FlightRecorder

__all__ = ["IncidentSink", "FLUSH_S", "STALE_NOTE"]

FLUSH_S = 5.0
"""At stop, the longest wait (seconds) for record writes still queued: an
fsync takes milliseconds; a disk that takes longer must not hold the exit."""

MAX_ANNOUNCED = 4096
"""Incident ids remembered as already logged (one journal entry each); the
oldest are forgotten first. Merges arrive within minutes of the first write."""

MAX_PENDING = 1024
"""Records of memguard's own stops waiting for their exit, at most (the oldest forgotten first; a stop is
normally followed by its exit within the grace period)."""

STALE_SCAN = 200
"""Newest records looked at, at start, for stops a previous instance left pending (it died within seconds of
writing them, so they are among the newest)."""

STALE_NOTE = ("memguard stopped before it saw the outcome of its signal (the record was written before the "
              "signal was sent)")

FAILING = frozenset(CAUSES) - {"none"}


@dataclass
class _Pending:
    """A record of memguard's own stop waiting for the process to exit."""

    id: str
    monotonic: float


class _Writer:
    """One thread doing the store's slow work in the order asked; results are handed back to the loop.

    Without a running loop (a caller outside asyncio) the work is done at once.
    """

    def __init__(self, failed: Callable[[str, BaseException], None]) -> None:
        self._failed = failed
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, sink: str, fn: Callable[[], Any], then: Callable[[Any], None] | None = None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - no sink failure stops guarding
                self._failed(sink, e)
                return
            if then is not None:
                then(result)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memguard-incidents", daemon=True)
            self._thread.start()
        self._queue.put((loop, sink, fn, then))

    def flush(self, timeout: float = FLUSH_S) -> bool:
        """Wait (blocking) until everything queued so far is written; True if it was within ``timeout``."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            loop, sink, fn, then = item
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the loop, said once there
                callback: tuple[Any, ...] = (self._failed, sink, e)
            else:
                callback = (then, result) if then is not None else ()
            if callback:
                try:
                    loop.call_soon_threadsafe(*callback)
                except RuntimeError:  # the loop is closed: the daemon is exiting
                    pass

    def close(self, timeout: float = FLUSH_S) -> bool:
        """Finish what is queued (at most ``timeout`` seconds); True if everything was written."""
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        self._thread = None
        return done


class IncidentSink:
    """Incident records for the reporter. Use from the event loop (the reporter's thread).

    ``announce(incident, path)`` logs the one entry of a new incident;
    ``failed(sink, error)`` reports a failing sink; ``say(event, message,
    level=..., **fields)`` any other line (the kernel log's gaps, what is
    followed at start).
    """

    def __init__(self, store: IncidentStore, *, recorder: FlightRecorder | None = None,
                 deaths: DeathWatch | None = None, boot_id: str | None = None,
                 announce: Callable[[Incident, str], None], failed: Callable[[str, BaseException], None],
                 say: Callable[..., None], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, after_s: float = AFTER_S,
                 timeline_s: float = TIMELINE_S) -> None:
        self.store = store
        self.recorder = recorder
        self.deaths = deaths
        self.boot_id = boot_id or (deaths.boot_id if deaths is not None else None)
        self._announce_cb = announce
        self._failed = failed
        self._say = say
        self._clock = clock
        self._wall = wall
        self.after_s = after_s
        self.timeline_s = timeline_s
        self.policy: DaemonPolicy | None = None
        self.writer = _Writer(failed)
        self._pending: dict[int, _Pending] = {}
        self._exits: list[Notice] = []
        self._afters: list[tuple[float, str, float]] = []  # (due, incident id, around) on the daemon's clock
        self._before: dict[int, tuple[Any, Any]] = {}  # id(action) -> (action, record to announce): this tick's
        self._finish: list[tuple[str, float]] = []  # own stops written this tick: timeline and fsync after the signal
        self._announced: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cgroups: dict[int, str] = {}  # worker pid -> its memory cgroup, read once while it runs
        self.started_wall: float | None = None
        if deaths is not None:
            deaths.on_incident = self.announce
            deaths.on_gap = lambda gap: say("kmsg_gap", gap.describe(), level="warning")
            deaths.on_error = lambda error: failed("deaths", error)

    # ------------------------------------------------------------------ start, stop

    def start(self, policy: DaemonPolicy) -> None:
        """At the daemon's start: follow the kernel log and the container runtime; close what a previous
        instance left pending."""
        self.policy = policy
        self.started_wall = self._wall()
        followed = []
        if self.deaths is not None:
            if self.deaths.reader is not None:
                self.deaths.start()
                followed.append("the kernel log")
            if self.deaths.follow_containers() is not None and self.deaths.docker is not None:
                followed.append(f"container events at {self.deaths.docker.socket_path}")
        self._say("incidents", f"incident records in {self.store.dir}" +
                  (f"; following {' and '.join(followed)}" if followed else ""), dir=str(self.store.dir))
        since = self.started_wall
        self.writer.submit("incidents", lambda: self._close_stale(since))

    def stop(self) -> bool:
        if self.deaths is not None:
            self.deaths.stop()
            self.deaths.stop_containers()
        return self.writer.close()

    def _close_stale(self, before: float) -> int:
        """Records of memguard's own stops a previous instance wrote and never completed (it died): among the
        newest :data:`STALE_SCAN` records, not the whole store (a start must not read 64 MiB of JSON)."""
        n = 0
        for inc in self.store.pending(STALE_SCAN):
            if inc.source == "memguard" and inc.wall < before:
                self.store.amend(inc.id, lambda i: complete_action(i, wall=self._wall(), note=STALE_NOTE))
                n += 1
        return n

    # ------------------------------------------------------------------ what the core decided

    def before(self, action: Action, dry_run: bool = False) -> None:
        """Before the effects act: memguard's own stop written down (not in a dry run: nothing is sent, nothing
        dies), so a daemon that dies right after the signal still leaves it. Its log line waits for
        :meth:`decided`, after the signal: nothing but the record stands between the decision and the act."""
        if isinstance(action, (Signal, SignalProcess)) and self._own(action, dry_run):
            self._before[id(action)] = (action, self.own_stop(action, announce=False))

    def decided(self, action: Action, dry_run: bool = False) -> None:
        """The decision logged: the journal entry of a record :meth:`before` wrote (or, for an action it was not
        shown, the record written and announced now); an exit, kept for the end of the tick."""
        if isinstance(action, (Signal, SignalProcess)):
            early = self._before.pop(id(action), None)
            if early is not None and early[0] is action:
                if early[1] is not None:
                    self.announce(*early[1])
            elif self._own(action, dry_run):
                self.own_stop(action)
        elif isinstance(action, Notice) and action.event == "exit":
            self._exit_notice(action)

    @staticmethod
    def _own(action: Signal | SignalProcess, dry_run: bool) -> bool:
        return not dry_run and not getattr(action, "lifecycle", False) and action.pid > 0

    def own_stop(self, action: Signal | SignalProcess, announce: bool = True) -> Any:
        """memguard's own signal written down (pending until the exit completes it): the record, announced in
        the journal; with ``announce=False`` (record, path) to announce later, or None."""
        pid = action.pid
        pend = self._pending.get(pid)
        if pend is not None:  # an escalation of a stop already written down
            step = {"signal": action.signum, "signal_name": signal_name(action.signum), "event": action.event,
                    "reason": action.reason, "wall": self._wall()}
            self.writer.submit("incidents", lambda: self.store.amend(pend.id, lambda i: _escalated(i, step)))
            return None
        wall, mono = self._wall(), self._clock()
        command: Any = None
        user = None
        if isinstance(action, Signal):
            wl = self.policy.workload(action.workload) if self.policy is not None else None
            if wl is not None:
                command, user = list(wl.command), wl.user
        else:
            got = cmdline_of_pid(pid)
            command = got if isinstance(got, list) else None
        cgroup = self._cgroups.get(pid)
        if cgroup is None:
            got_cg = cgroup_of_pid(pid)
            cgroup = got_cg if isinstance(got_cg, str) else None
        inc = incident_for_action(action, wall=wall, monotonic=mono, boot_id=self.boot_id, command=command,
                                  user=user, cgroup=cgroup, ranking=self._ranking(action))
        try:
            path = self.store.write(inc, durable=False, prune=False)
        except Exception as e:  # noqa: BLE001 - the signal goes out whether or not its record could be written
            self._failed("incidents", e)
            return None
        self._pending[pid] = _Pending(inc.id, mono)
        while len(self._pending) > MAX_PENDING:  # a stop whose exit never came: its record stays pending
            del self._pending[next(iter(self._pending))]
        self._finish.append((inc.id, mono))
        if not announce:
            return inc, str(path)
        self.announce(inc, str(path))
        return inc

    @staticmethod
    def _ranking(action: Signal | SignalProcess) -> list[dict[str, Any]]:
        """The workers a system rule chose among, in the victim order the core used (its explanation carries
        them); none for a worker's own rule or limit: nobody else was a candidate."""
        ranking = action.explain.ranking if action.explain is not None else ()
        return [{k: v for k, v in (("worker", r.worker), ("pid", r.pid), ("priority", r.priority),
                                   ("memory_bytes", r.memory_bytes), ("gpu_memory_bytes", r.gpu_memory_bytes))
                 if v is not None} for r in ranking]

    def _exit_notice(self, n: Notice) -> None:
        pend = self._pending.pop(n.pid, None) if n.pid is not None else None
        if pend is not None:  # the outcome of memguard's own signal
            rc = n.fields.get("returncode")
            sig = _signum(n.fields.get("exit_signal"))
            wall, note = self._wall(), n.reason
            self.writer.submit("incidents", lambda: self.store.complete(
                pend.id, wall=wall, returncode=rc if isinstance(rc, int) else None, signal=sig, note=note))
            return
        if n.worker is not None and n.fields.get("cause") in FAILING:
            self._exits.append(n)

    # ------------------------------------------------------------------ after each tick

    def ticked(self, obs: Observation, state: CoreState) -> None:
        """After the tick (its observation recorded, its signals sent): finish this tick's records."""
        self._before.clear()  # every action of the tick was logged by now
        if obs.full:
            for name, w in obs.workers.items():
                if w.pid not in self._cgroups:
                    got = cgroup_of_pid(w.pid)
                    if isinstance(got, str):
                        self._cgroups[w.pid] = got
        for ev in obs.events:
            if isinstance(ev, NotDone) and ev.pid in self._pending:
                pend = self._pending.pop(ev.pid)
                wall, note = self._wall(), f"not carried out: {ev.reason}"
                self.writer.submit("incidents", lambda pend=pend, wall=wall, note=note: self.store.complete(
                    pend.id, wall=wall, note=note))
        finish, self._finish = self._finish, []
        for inc_id, mono in finish:
            tl = self._timeline(mono)
            self.writer.submit("incidents", (lambda i=inc_id, tl=tl: self.store.update(i, timeline=tl)) if tl
                               else (lambda i=inc_id: self.store.make_durable(i)))
            self._afters.append((mono + self.after_s, inc_id, mono))
        exits, self._exits = self._exits, []
        if exits:
            exited = {(e.worker, e.pid): e for e in obs.events if isinstance(e, Exited)}
            for n in exits:
                self._exit_incident(n, exited.get((n.worker, n.pid)), obs.at)
        if self._afters:
            self._due_afters(obs.at)
        live = {w.pid for w in obs.workers.values()} | set(self._pending)
        if obs.full and len(self._cgroups) > len(live):
            self._cgroups = {p: c for p, c in self._cgroups.items() if p in live}

    def _exit_incident(self, n: Notice, ev: Exited | None, now: float) -> None:
        f = n.fields
        if ev is None:  # the core saw an exit this tick; rebuild it from its notice
            ev = Exited(worker=str(n.worker), incarnation=int(f.get("incarnation", 0) or 0), pid=int(n.pid or 0),
                        at=now, returncode=f.get("returncode") if isinstance(f.get("returncode"), int) else None,
                        signal=_signum(f.get("exit_signal")), kernel_oom=bool(f.get("kernel_oom")) or None,
                        last_lines=tuple(str(x) for x in f.get("last_lines", ()) or ()))
        if f.get("kernel_oom") and not ev.kernel_oom:  # the core saw the scope's OOM counter rise with it
            ev = replace(ev, kernel_oom=True)
        wl = self.policy.workload(n.workload) if self.policy is not None and n.workload else None
        mono_now, wall_now = self._clock(), self._wall()
        inc = incident_from_exit(
            ev, wall=wall_now - max(0.0, mono_now - ev.at), boot_id=self.boot_id, workload=n.workload,
            command=list(wl.command) if wl is not None else None, user=wl.user if wl is not None else None,
            cgroup=self._cgroups.pop(ev.pid, None), limit_bytes=wl.limits.memory_bytes if wl is not None else None,
            timeline=self._timeline(ev.at))
        # The core's verdict (memguard.diagnose.diagnose_exit) is the one the log gave: the record says the same.
        cause = str(f.get("cause"))
        why = dict(inc.why, text=n.reason)
        if f.get("recommendation"):
            why["recommendation"] = f["recommendation"]
        evidence = list(dict.fromkeys([str(x) for x in f.get("evidence", ()) or ()] + inc.evidence))
        inc = replace(inc, cause=cause if cause in CAUSES else "exit", why=why, evidence=evidence,
                      summary=f"{n.worker} (pid {ev.pid}) exited: {n.reason}")
        around = ev.at

        def written(got: Incident) -> None:
            self.announce(got, str(self.store.path_of(got.id)))
            self._afters.append((around + self.after_s, got.id, around))

        self.writer.submit("incidents", lambda: self.store.record(inc), written)

    def _due_afters(self, now: float) -> None:
        due = [a for a in self._afters if a[0] <= now]
        if not due:
            return
        self._afters = [a for a in self._afters if a[0] > now]
        for _, inc_id, around in due:
            if self.recorder is None:
                continue
            tl = self.recorder.timeline(0.0, around=around, after_s=self.after_s)
            self.writer.submit("incidents", lambda i=inc_id, tl=tl: self.store.append_after(i, tl))

    def _timeline(self, around: float) -> dict[str, Any] | None:
        if self.recorder is None or self.recorder.latest_at is None:
            return None
        tl = self.recorder.timeline(self.timeline_s, around=around)
        return tl if tl["scope"]["t"] or tl["full"]["t"] else None

    # ------------------------------------------------------------------ one journal entry per incident

    def announce(self, inc: Incident, path: str) -> None:
        if inc.id in self._announced:
            return
        self._announced[inc.id] = None
        while len(self._announced) > MAX_ANNOUNCED:
            self._announced.popitem(last=False)
        self._announce_cb(inc, path)


def _escalated(inc: Incident, step: dict[str, Any]) -> Incident:
    how = dict(inc.how)
    how["escalations"] = list(how.get("escalations", [])) + [step]
    return replace(inc, how=how)


def _signum(name: object) -> int | None:
    if isinstance(name, int):
        return name
    if not isinstance(name, str):
        return None
    import signal as _signal

    try:
        return int(_signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return None


def announced_fields(inc: Incident, path: str) -> dict[str, Any]:
    """The fields of an incident's log entry: the record's (:meth:`Incident.log_fields`) and its source."""
    out = inc.log_fields(path)
    out["origin"] = inc.source
    if inc.state == "pending":
        out["state"] = "pending"
    return out

