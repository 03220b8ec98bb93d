"""Ad-hoc workers and the admission queue: jobs memguard did not start.

**Ad-hoc workers.** A job started by hand with ``memguard run`` next to a
running daemon tells the daemon about itself, and a process matched by an
``unmanaged:`` entry that has rules is adopted: either way the actor
reports a :class:`~memguard.model.Joined` and the core opens a worker slot
of a second kind (``WorkerState.adhoc`` holds its policy). From then on it
is a worker like the others: measured as a whole tree, counted in the
scope's figures, ranked as a victim of system rules (by its priority, then
its size), subject to its own rules and progress signals, and named in
every event. It differs in three ways: memguard never starts it (it joins
``running``), never restarts it (its restart policy is ``never``), and does
not stop it when the daemon stops or reloads (it is not the daemon's). When
its process ends the slot is removed.

**The admission queue.** ``memguard run --wait-free 20GiB`` asks to start
once 20 GiB are available *and not promised to an earlier job*
(:class:`~memguard.model.AdmitRequest`). Requests wait in arrival order; at
each step the oldest is granted while the scope's available memory, less
what is still promised to jobs already admitted, covers it (no overtaking:
a small job does not starve a large one). A promise shrinks as its job's
worker grows into it and ends with the job (or with its request, if it
gives up before joining). A request that must not wait (``--require-free``
with a daemon) is answered at once: granted only if nobody waits and the
memory is there. Every answer is an :class:`~memguard.model.Admit` that
the actor hands to the waiting job.

Pure functions of values: no I/O, no clock.
"""

from __future__ import annotations

from .state import evolve as replace  # dataclasses.replace without re-running __init__ (see evolve)
from typing import Any

from ..model import Admit, AdmitCancel, AdmitRequest, Joined, Notice, Observation, is_known
from ..units import format_size
from .state import Incarnation, Phase, Promise, Ticket, WorkerState

__all__ = ["take_adhoc", "outstanding", "MAX_QUEUE"]

#: At most this many jobs wait at once; more are refused (a script gone wrong must not grow the queue
#: without bound). 256: far more jobs than any machine runs at once.
MAX_QUEUE = 256

_ALIVE = (Phase.RUNNING, Phase.STOPPING)


def outstanding(p: Promise, workers: dict[str, WorkerState]) -> float:
    """Bytes still promised to an admitted job: all of it before it joined, less what its worker holds."""
    if p.worker is None:
        return float(p.need_bytes)
    w = workers.get(p.worker)
    if w is None or w.phase not in _ALIVE:
        return 0.0
    return max(0.0, p.need_bytes - float(w.memory)) if is_known(w.memory) else float(p.need_bytes)


def take_adhoc(s: Any, obs: Observation) -> None:
    """Joins, departures, admission requests and grants for one step. ``s`` is the core's step scratch
    (``workers``, ``queue``, ``promises``, ``now``, ``emit``)."""
    for ev in obs.events:
        if isinstance(ev, Joined):
            _join(s, ev)
        elif isinstance(ev, AdmitRequest):
            _request(s, ev, obs)
        elif isinstance(ev, AdmitCancel):
            _cancel(s, ev)
    _leave(s)
    new = [t for t in s.queue if t.since == s.now]
    _grant(s, obs)
    # Jobs that could not be admitted at once are told where they stand (in the log).
    avail, promised = obs.scope.available_bytes, _promised(s)
    for t in new:
        if t in s.queue:
            s.emit(Notice("queued", reason=(f"{t.name} waits for {format_size(t.need_bytes)} "
                                            f"({_figures(avail, promised)}; place {s.queue.index(t) + 1} in the "
                                            f"queue)"),
                          fields={"ticket": t.ticket, "job": t.name, "need_bytes": t.need_bytes,
                                  "position": s.queue.index(t) + 1, "promised_bytes": promised}))


def _join(s: Any, ev: Joined) -> None:
    old = s.workers.get(ev.worker)
    if old is not None and (old.adhoc is None or old.phase in _ALIVE):
        return  # a name already in use (a duplicate join): the first one stands
    pol = ev.policy
    s.workers[ev.worker] = WorkerState(name=ev.worker, workload=pol.name, replica=0, phase=Phase.RUNNING,
                                       spec=pol.spec_key(), adhoc=pol,
                                       inc=Incarnation(number=1, pid=ev.pid, started_at=ev.at))
    promise = s.promises.get(ev.ticket) if ev.ticket else None
    if promise is not None and promise.worker is None:
        s.promises[ev.ticket] = replace(promise, worker=ev.worker)
    what = "a job started with memguard run" if ev.origin == "run" else "a process matched by unmanaged:"
    limit = f", limit {format_size(pol.limits.memory_bytes)}" if pol.limits.memory_bytes else ""
    s.emit(Notice("joined", worker=ev.worker, workload=pol.name, pid=ev.pid,
                  reason=(f"{what} (pid {ev.pid}: {' '.join(pol.command)[:200]}) joined as ad-hoc worker "
                          f"{ev.worker}: measured, ranked as a victim (priority {pol.priority}{limit}) and "
                          f"named in events; never restarted"
                          + (f"; {len(pol.rules)} rule(s) of its own" if pol.rules else "")),
                  fields={"adhoc": True, "origin": ev.origin, "command": list(pol.command),
                          "ticket": ev.ticket, "priority": pol.priority}))


def _leave(s: Any) -> None:
    """Ad-hoc slots whose process has ended leave (their exit was reported); so do their promises."""
    for name in sorted(s.workers):
        w = s.workers[name]
        if w.adhoc is not None and w.phase not in _ALIVE:
            del s.workers[name]
    for ticket, p in list(s.promises.items()):
        if p.worker is not None and p.worker not in s.workers:
            del s.promises[ticket]


def _promised(s: Any) -> float:
    return sum(outstanding(p, s.workers) for p in s.promises.values())


def _figures(avail: object, promised: float) -> str:
    shown = format_size(float(avail)) if is_known(avail) else "an unknown amount"  # type: ignore[arg-type]
    return f"{shown} available, {format_size(promised)} promised to admitted jobs"


def _answer(s: Any, t: Ticket, granted: bool, avail: object, promised: float, why: str) -> None:
    s.emit(Admit("admitted" if granted else "admission_refused", level="info" if granted else "warning",
                 reason=why, ticket=t.ticket, granted=granted,
                 available_bytes=float(avail) if is_known(avail) else None,  # type: ignore[arg-type]
                 promised_bytes=promised, waited_s=max(0.0, s.now - t.since),
                 fields={"ticket": t.ticket, "job": t.name, "need_bytes": t.need_bytes,
                         "available_bytes": float(avail) if is_known(avail) else None,  # type: ignore[arg-type]
                         "promised_bytes": promised, "waited_s": round(max(0.0, s.now - t.since), 3)}))


def _request(s: Any, ev: AdmitRequest, obs: Observation) -> None:
    t = Ticket(ev.ticket, ev.need_bytes, ev.name, ev.at)
    if any(q.ticket == ev.ticket for q in s.queue) or ev.ticket in s.promises:
        return
    avail = obs.scope.available_bytes
    promised = _promised(s)
    if not ev.wait:
        fits = is_known(avail) and float(avail) - promised >= ev.need_bytes  # type: ignore[arg-type]
        if fits and not s.queue:
            s.promises[ev.ticket] = Promise(ev.ticket, ev.need_bytes, ev.name, s.now)
            _answer(s, t, True, avail, promised, f"{ev.name}: {format_size(ev.need_bytes)} admitted at once "
                                                  f"({_figures(avail, promised)})")
        else:
            why = (f"{len(s.queue)} earlier job(s) wait for memory" if fits else
                   f"{format_size(ev.need_bytes)} needed")
            _answer(s, t, False, avail, promised, f"{ev.name}: not admitted: {_figures(avail, promised)}; {why}")
        return
    if len(s.queue) >= MAX_QUEUE:
        _answer(s, t, False, avail, promised, f"{ev.name}: not admitted: {MAX_QUEUE} jobs already wait")
        return
    s.queue = s.queue + (replace(t, since=s.now),)


def _cancel(s: Any, ev: AdmitCancel) -> None:
    before = len(s.queue)
    s.queue = tuple(q for q in s.queue if q.ticket != ev.ticket)
    p = s.promises.get(ev.ticket)
    if p is not None and p.worker is None:
        del s.promises[ev.ticket]
    if len(s.queue) < before:
        s.emit(Notice("queue_left", reason=f"ticket {ev.ticket} left the queue" + (f": {ev.reason}" if ev.reason
                                                                                    else ""),
                      fields={"ticket": ev.ticket}))


def _grant(s: Any, obs: Observation) -> None:
    """Admit waiting jobs in arrival order while the memory not promised covers the oldest."""
    avail = obs.scope.available_bytes
    if not s.queue or not is_known(avail):
        return  # an unknown reading admits nobody
    promised = _promised(s)
    while s.queue:
        head = s.queue[0]
        if float(avail) - promised < head.need_bytes:  # type: ignore[arg-type]
            return
        s.queue = s.queue[1:]
        s.promises[head.ticket] = Promise(head.ticket, head.need_bytes, head.name, s.now)
        waited = max(0.0, s.now - head.since)
        _answer(s, head, True, avail, promised,
                f"{head.name}: {format_size(head.need_bytes)} admitted"
                + (f" after waiting {waited:.1f}s" if waited else " at once") + f" ({_figures(avail, promised)})")
        promised += head.need_bytes
