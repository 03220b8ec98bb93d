"""Progress: is a worker doing anything? ``worker.cpu``, ``worker.idle`` and ``worker.quiet``.

A job can hang without touching a memory threshold: all its threads asleep
in ``futex_wait`` (a deadlock: 0 % CPU for hours), or spinning at 100 % of
a core with nothing to show for it. Each full sample carries two counters
of the worker's whole tree (:class:`~memguard.model.WorkerSample`): CPU
seconds and bytes read or written through system calls. The core keeps,
per incarnation (reset at each start by construction):

* the recent CPU samples, for ``worker.cpu``: percent of one core over the
  last :data:`CPU_WINDOW_S` (Unknown until two samples 1 s apart);
* when the tree last used CPU (at least :data:`IDLE_CPU_PERCENT` of a core
  between two samples) or did I/O: ``worker.idle`` counts from there;
* when it last did I/O, wrote a line of output (a
  :class:`~memguard.model.Progress` event from the actor) or sent a
  heartbeat (memguard.client): ``worker.quiet`` counts from the latest.

A start counts as activity: a job that hangs at once is idle since its start.
A sample whose counters could not be read makes ``worker.idle`` and
``worker.quiet`` Unknown for the rest of the incarnation (a gap cannot be
shown to be idle), and unknown never escalates.

Pure functions of values: no I/O, no clock.
"""

from __future__ import annotations

from .state import evolve as replace  # dataclasses.replace without re-running __init__ (see evolve)

from ..model import IO_NOT_READ, Observation, Progress, Reading, Unknown, WorkerSample, is_known
from .state import Incarnation, Phase, WorkerState

__all__ = ["CPU_WINDOW_S", "IDLE_CPU_PERCENT", "take_progress", "cpu_percent", "idle_for", "quiet_for"]

# 10 s: ten samples at the relaxed pace; long enough to smooth a garbage collection or a scheduler
# hiccup, short enough that a rule's for: (minutes, for a hang) decides how long it must last.
CPU_WINDOW_S = 10.0
# 1 % of one core between two samples is "using CPU": a deadlocked process uses none, while a Python
# process's housekeeping threads (a heartbeat every second) stay well below it... or above it, which
# is then activity. 10 ms of CPU in a 1 s tick is one clock tick of the kernel's accounting.
IDLE_CPU_PERCENT = 1.0
# A CPU sample needs this much time since the one it is compared with (a rate over 1 ms is noise).
_MIN_SPAN_S = 1.0


def _absorb(inc: Incarnation, sample: WorkerSample, at: float) -> Incarnation:
    """The incarnation after one full sample of its tree."""
    cpu, io = sample.cpu_seconds, sample.io_bytes
    read_io = io is not IO_NOT_READ  # not read (no rule needs it) is not unreadable
    if not is_known(cpu) or (read_io and not is_known(io)):
        return replace(inc, progress_known=False)
    history = inc.cpu_history
    active = inc.active_at
    io_at = inc.io_at
    if history:
        t0, c0 = history[-1]
        dt = at - t0
        used = max(0.0, float(cpu) - c0)
        if dt > 0 and 100.0 * used / dt >= IDLE_CPU_PERCENT:
            active = at
    if read_io and (not is_known(inc.io_bytes) or float(io) > float(inc.io_bytes)):
        # More I/O than last time; or the first reading, at the start or once a reload added a rule on
        # worker.idle or worker.quiet: nothing is known of the I/O before it, so the I/O clock starts here
        # rather than the worker counting as idle (or quiet) since its start.
        active = at
        io_at = at
    kept = tuple(p for p in history if at - p[0] <= CPU_WINDOW_S)
    # One sample older than the window stays, so a slow tick still leaves a pair to compare.
    older = [p for p in history if at - p[0] > CPU_WINDOW_S]
    if older and (not kept or at - kept[0][0] < _MIN_SPAN_S):
        kept = (older[-1],) + kept
    kept += ((at, float(cpu)),)
    return replace(inc, cpu_history=kept, io_bytes=float(io) if read_io else inc.io_bytes, active_at=active,
                   io_at=io_at)


def take_progress(workers: dict[str, WorkerState], obs: Observation) -> None:
    """Note progress counters (full ticks) and output events in ``workers`` (changed in place)."""
    for ev in obs.events:
        if isinstance(ev, Progress):
            w = workers.get(ev.worker)
            if w is not None and w.incarnation == ev.incarnation and w.phase in (Phase.RUNNING, Phase.STOPPING):
                workers[w.name] = replace(w, inc=replace(w.inc, output_at=max(ev.at, w.output_at or ev.at)))
    if not obs.full:
        return
    for name, w in list(workers.items()):
        sample = obs.workers.get(name)
        if w.phase in (Phase.RUNNING, Phase.STOPPING) and sample is not None and sample.pid == w.pid:
            workers[name] = replace(w, inc=_absorb(w.inc, sample, obs.at))


def cpu_percent(w: WorkerState, now: float) -> Reading:
    """``worker.cpu``: percent of one core over the last :data:`CPU_WINDOW_S`."""
    history = w.cpu_history
    if len(history) < 2:
        return Unknown("not enough CPU samples yet")
    newest = history[-1]
    inside = [p for p in history[:-1] if newest[0] - p[0] <= CPU_WINDOW_S and newest[0] - p[0] >= _MIN_SPAN_S]
    oldest = inside[0] if inside else history[0]
    span = newest[0] - oldest[0]
    if span < _MIN_SPAN_S:
        return Unknown("not enough CPU samples yet")
    return 100.0 * max(0.0, newest[1] - oldest[1]) / span


def _since(w: WorkerState, *times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    if w.started_at is not None:
        known.append(w.started_at)
    return max(known) if known else None


def idle_for(w: WorkerState, now: float) -> Reading:
    """``worker.idle``: seconds since the tree last used CPU or did I/O (or started)."""
    if not w.inc.progress_known:
        return Unknown("the worker's CPU or I/O counters could not be read")
    if not w.cpu_history:
        return Unknown("not sampled yet")
    if not is_known(w.inc.io_bytes):  # a rule on it came with a reload: its I/O is read from the next sample
        return Unknown("the worker's I/O not read yet")
    since = _since(w, w.active_at)
    return Unknown("not started") if since is None else max(0.0, now - since)


def quiet_for(w: WorkerState, now: float) -> Reading:
    """``worker.quiet``: seconds since the last output line, heartbeat or I/O (or the start)."""
    if not w.inc.progress_known:
        return Unknown("the worker's I/O counter could not be read")
    if not w.cpu_history:
        return Unknown("not sampled yet")
    if not is_known(w.inc.io_bytes):
        return Unknown("the worker's I/O not read yet")
    since = _since(w, w.io_at, w.output_at, w.last_heartbeat)
    return Unknown("not started") if since is None else max(0.0, now - since)
