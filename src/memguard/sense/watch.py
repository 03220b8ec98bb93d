"""The watcher: between ticks, the scope's available memory against the plan's band, in a thread of its own.

The daemon ticks (observes, decides, acts) only when something calls for
it. Between ticks this thread holds the :class:`~memguard.model.WatchPlan`
the last tick left (a band of byte thresholds) and wakes the daemon only
when the scope's available memory leaves the band, or a PSI trigger fires:

* where the kernel can tell (the scope is a cgroup v1 memory cgroup), it
  arms usage thresholds (:func:`~memguard.sense.notify.arm_usage_threshold`)
  at the usage that corresponds to the band's edges and blocks on them; it
  re-reads the scope only when the kernel signals and, as a backstop, every
  ``max_interval_s`` where the cgroup holds more than
  :data:`SMALL_CACHE_BYTES` of inactive file cache (the kernel counts
  usage; cached file pages becoming active, or reclaimed, move the working
  set without it), else every ``backstop_s``;
* elsewhere (host scope, cgroup v2) it polls, every ``headroom / max fill
  rate`` seconds. A poll is one ``pread`` of ``memory.usage_in_bytes`` /
  ``memory.current`` (``memory.stat``, which the kernel builds by walking
  the cgroup's subtree, only every :data:`STAT_REFRESH_S`, and once to
  confirm a crossing), or of ``/proc/meminfo`` for the host. No
  Observation is built and nothing is decided.

On a crossing it records a :class:`Crossing`, wakes the daemon through the
callback it was started with, and stays quiet until the next plan comes
(the tick that follows hands one over). The thread owns its files and
descriptors; the loop hands it immutable plans and takes crossings, under a
lock.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..model import WatchPlan
from .host import PinnedFile, field_int
from .notify import Waiter, arm_psi_trigger, arm_usage_threshold, drain_eventfd

__all__ = ["Watcher", "Crossing", "Target", "CgroupProbe", "HostProbe", "STAT_REFRESH_S", "ARM_MARGIN_BYTES",
           "LIMIT_SLACK_BYTES", "SMALL_CACHE_BYTES"]

# 100 ms between two reads of memory.stat while polling a cgroup: the inactive file cache it gives moves
# slowly next to what a hog allocates; usage alone is read at every poll.
STAT_REFRESH_S = 0.1
# A kernel threshold is armed 1 MiB before the band's edge: the kernel checks thresholds every 128 page
# events per CPU (512 KiB), so the notification comes at the edge, not after it.
ARM_MARGIN_BYTES = 1 << 20
# Within 64 MiB of the cgroup's limit the kernel reclaims the cgroup's cache instead of growing its usage,
# so a usage threshold no longer follows the working set: the watcher polls there.
LIMIT_SLACK_BYTES = 64 << 20
# Up to 16 MiB of inactive file cache, a usage threshold is armed as if there were none (see _arm_thresholds).
SMALL_CACHE_BYTES = 16 << 20
# The watcher's own fill rate, for rules on the trend: over the last second, from readings at least 50 ms
# apart (the core's trend, decide/trend.py, is built the same way); readings handed to the daemon are kept
# 10 ms apart, at most 256 between two ticks.
RATE_WINDOW_S = 1.0
RATE_MIN_SPAN_S = 0.05
READING_SPACING_S = 0.01
MAX_READINGS = 256


@dataclass(frozen=True)
class Crossing:
    """Why the watcher woke the daemon: the reading (None: unreadable), which edge, a PSI trigger."""

    available: float | None
    low: bool
    stop: bool
    psi: bool
    at: float


@dataclass(frozen=True)
class Target:
    """A plan with what the watcher needs of the last full reading: the scope's total (cgroup scope)."""

    plan: WatchPlan
    total: float | None = None


class HostProbe:
    """The host's MemAvailable from ``/proc/meminfo`` (its own fd: the watcher thread's)."""

    kind = "host"

    def __init__(self, path: str = "/proc/meminfo") -> None:
        self._file = PinnedFile(path, 4096)

    def read(self, total: float | None, precise: bool = False) -> float | None:
        try:
            data = self._file.read()
        except OSError:
            return None
        v = field_int(b"\n" + data, b"\nMemAvailable:")
        return None if v is None else float(v)

    def close(self) -> None:
        self._file.close()


class CgroupProbe:
    """A memory cgroup's available memory (total less working set) from its usage, and its inactive file
    cache from ``memory.stat`` when the reading must be exact or the figure is stale."""

    kind = "cgroup"

    def __init__(self, path: str, version: int) -> None:
        self.path = path
        self.version = version
        self._usage = PinnedFile(f"{path}/{'memory.current' if version == 2 else 'memory.usage_in_bytes'}", 64)
        self._stat = PinnedFile(f"{path}/memory.stat", 8192)
        self._key = b"\ninactive_file " if version == 2 else b"\ntotal_inactive_file "
        self.inactive: float | None = None
        self.usage: float | None = None
        self.fresh_stat = False  # the last read included memory.stat
        self._stat_at = -1e9

    def refresh_stat(self) -> bool:
        try:
            v = field_int(b"\n" + self._stat.read(), self._key)
        except OSError:
            return False
        if v is None:
            return False
        self.inactive = float(v)
        self._stat_at = time.monotonic()
        return True

    def read(self, total: float | None, precise: bool = False) -> float | None:
        if total is None:
            return None
        try:
            usage = float(int(self._usage.read()))
        except (OSError, ValueError):
            return None
        self.usage = usage
        self.fresh_stat = False
        if precise or self.inactive is None or time.monotonic() - self._stat_at >= STAT_REFRESH_S:
            if not self.refresh_stat():
                return None
            self.fresh_stat = True
        return self._available(total, usage)

    def _available(self, total: float, usage: float) -> float:
        ws = usage - (self.inactive or 0.0)
        ws = ws if ws > 0 else 0.0
        return total - ws if total > ws else 0.0

    def close(self) -> None:
        self._usage.close()
        self._stat.close()


class Watcher:
    """The watching thread (see the module text). ``notify`` is called from that thread on a crossing."""

    def __init__(self, probe: HostProbe | CgroupProbe, *, kernel_thresholds: bool | None = None,
                 psi_path: str | None = None) -> None:
        self.probe = probe
        self.psi_path = psi_path
        # Usage thresholds exist on cgroup v1 only.
        self.kernel_thresholds = (isinstance(probe, CgroupProbe) and probe.version == 1
                                  if kernel_thresholds is None else kernel_thresholds)
        self._lock = threading.Lock()
        self._target: Target | None = None
        self._paused = False
        self._crossing: Crossing | None = None
        self._closed = False
        self._notify: Callable[[], None] = lambda: None
        self._waiter = Waiter()
        self._thread: threading.Thread | None = None
        # Owned by the thread:
        self._efds: dict[int, str] = {}  # eventfd -> "low" | "high"
        self._armed_usage: dict[str, float] = {}
        self._armed_inactive: float | None = None
        self._psi_fds: dict[int, tuple[str, int, int]] = {}
        self._psi_armed: tuple = ()
        self._safe = False  # the armed low threshold ignores the cache (no backstop read needed)
        # Counters (read by stats() from the loop: plain ints, written by the thread only).
        self.polls = 0
        self.kernel_wakes = 0
        self.psi_wakes = 0
        self.crossings = 0
        self.rearms = 0
        self.mode = "idle"
        self.why_polling = ""
        self.psi = ""  # what became of the plan's PSI triggers: armed (where, what), or why not
        self._history: list[tuple[float, float]] = []  # the thread's readings over the rate window
        self._rate: float | None = None  # bytes/s by which available memory fell over it
        self._readings: list[tuple[float, float]] = []  # for the daemon (under the lock)
        self.checked = threading.Event()  # set after each read of the scope (tests wait on it)

    # ------------------------------------------------------------------ the loop's side

    def start(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._thread = threading.Thread(target=self._run, name="memguard-watch", daemon=True)
        self._thread.start()

    def watch(self, target: Target | None) -> None:
        """Hand over the plan until the next tick (any thread); wakes the thread and ends a pause."""
        with self._lock:
            self._target = target
            self._paused = False
        self._waiter.poke()

    def recent(self) -> tuple[tuple[float, float], ...]:
        """The readings (time.monotonic(), available bytes) made since the last call, oldest first."""
        with self._lock:
            out, self._readings = self._readings, []
        return tuple(out)

    def take(self) -> Crossing | None:
        """The crossing that woke the daemon, if any (cleared)."""
        with self._lock:
            c, self._crossing = self._crossing, None
        return c

    def stats(self) -> dict[str, object]:
        return {"mode": self.mode, "polls": self.polls, "kernel_wakes": self.kernel_wakes,
                "psi_wakes": self.psi_wakes, "crossings": self.crossings, "rearms": self.rearms,
                **({"why_polling": self.why_polling} if self.why_polling else {}),
                **({"psi": self.psi} if self.psi else {})}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._waiter.poke()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._disarm()
        self._disarm_psi()
        self._waiter.close()
        self.probe.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        armed: tuple | None = None
        target: Target | None = None
        next_read = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
                new, paused = self._target, self._paused
            if new is not target:
                target = new
                key = None if target is None else (target.plan.low_bytes, target.plan.high_bytes, target.total,
                                                   target.plan.psi)
                if key != armed:
                    self._arm_psi(target)
                    armed = key
                    self._armed_usage = {}  # thresholds follow at the first read
                next_read = 0.0
            if paused or target is None or (target.plan.low_bytes is None and target.plan.high_bytes is None
                                            and not self._psi_fds):
                self.mode = "idle" if target is None else self.mode
                self._waiter.wait(None)
                self._drain_all()
                continue
            now = time.monotonic()
            timeout = next_read - now
            fired = self._waiter.wait(timeout) if timeout > 0 else []
            psi = False
            for fd in fired:
                if fd in self._psi_fds:
                    psi = True
                    self.psi_wakes += 1
                elif fd in self._efds:
                    drain_eventfd(fd)
                    self.kernel_wakes += 1
            with self._lock:
                changed = self._target is not target or self._closed
            if changed:
                continue
            if not fired and time.monotonic() < next_read:
                continue  # a poke that changed nothing
            self._check(target, psi=psi)
            self.checked.set()
            if self._paused_now():
                continue
            avail_interval = target.plan.interval(self._last, self._rate)
            next_read = time.monotonic() + ((target.plan.backstop_s if self._safe else target.plan.max_interval_s)
                                            if self._kernel_covers(target)
                                            else (avail_interval if avail_interval is not None
                                                  else target.plan.max_interval_s))

    _last: float | None = None

    def _paused_now(self) -> bool:
        with self._lock:
            return self._paused

    def _check(self, target: Target, *, psi: bool) -> None:
        plan = target.plan
        self.polls += 1
        avail = self.probe.read(target.total)
        if avail is not None and not psi and plan.outside(avail) and isinstance(self.probe, CgroupProbe) \
                and not self.probe.fresh_stat:
            # The decision to wake (and the reading the tick acts on) rests on memory.stat too: read once
            # here, at the crossing, not at every poll near the edge (with many worker cgroups below the
            # scope, the kernel builds memory.stat by walking all of them).
            avail = self.probe.read(target.total, precise=True)
        self._last = avail
        trend = avail is not None and bool(plan.trends) and plan.trend_crossed(avail, self._note(avail))
        if trend and isinstance(self.probe, CgroupProbe) and not self.probe.fresh_stat:
            avail = self.probe.read(target.total, precise=True)  # confirmed on memory.stat, as a crossing is
            self._last = avail
            trend = avail is not None and plan.trend_crossed(avail, self._rate)
        if avail is None or psi or plan.outside(avail) or trend:
            low = avail is not None and (trend or (plan.low_bytes is not None and avail <= plan.low_bytes))
            crossing = Crossing(avail, low, low and plan.stop, psi, time.monotonic())
            with self._lock:
                if self._target is not target:
                    return  # a newer plan arrived meanwhile: judge the reading against it
                self._crossing = crossing
                self._paused = True
            self.crossings += 1
            self._notify()
            return
        self._arm_thresholds(target)

    def _note(self, avail: float) -> float | None:
        """Keep the reading (for the rate and for the daemon); the fill rate over the last second, or None."""
        now = time.monotonic()
        h = self._history
        if len(h) >= 2 and now - h[-2][0] < READING_SPACING_S:
            h.pop()  # the newest slot moves on until it is 10 ms past the one before
        h.append((now, avail))
        while len(h) > 2 and now - h[1][0] > RATE_WINDOW_S:
            h.pop(0)  # the window, plus the last reading before it
        with self._lock:
            r = self._readings
            if r and now - r[-1][0] < READING_SPACING_S:
                r[-1] = (now, avail)
            else:
                r.append((now, avail))
                if len(r) > MAX_READINGS:
                    del r[0]
        before = len(h) > 1 and now - h[0][0] > RATE_WINDOW_S  # h[0] is the last reading before the window
        oldest = h[1] if before else h[0]
        if before and now - oldest[0] < RATE_MIN_SPAN_S:
            oldest = h[0]  # a slow poll: the window holds only the newest reading
        span = now - oldest[0]
        self._rate = (oldest[1] - avail) / span if span >= RATE_MIN_SPAN_S else None
        return self._rate

    # ------------------------------------------------------------------ kernel thresholds

    def _kernel_covers(self, target: Target) -> bool:
        """Will the kernel signal the low edge? Only while usage is below the armed threshold: a threshold
        already passed (the wake came early, within the margin) signals again only after usage falls back,
        so until then the watcher polls. Never for a rule on the trend: the rate needs readings."""
        if target.plan.trends:
            return False
        if target.plan.low_bytes is None:
            return True
        armed = self._armed_usage.get("low")
        usage = getattr(self.probe, "usage", None)
        return armed is not None and usage is not None and usage < armed

    def _arm_thresholds(self, target: Target) -> None:
        """(Re)arm usage thresholds at the band's edges when they moved by more than the margin."""
        probe = self.probe
        if target.plan.trends:
            self._disarm()
            self.mode = "polling for a rule on the trend (within:)"
            return
        if not self.kernel_thresholds or not isinstance(probe, CgroupProbe) or target.total is None \
                or probe.inactive is None:
            self.mode = "polling"
            if not self.why_polling:
                self.why_polling = ("the kernel has no usage thresholds for this scope (host, or cgroup v2)"
                                    if not self.kernel_thresholds else "")
            return
        plan, total, inactive = target.plan, target.total, probe.inactive
        want: dict[str, float] = {}
        # With little inactive file cache the low threshold ignores it: usage reaches it no later than the
        # working set reaches the edge, whatever the cache does meanwhile, so no backstop read is needed.
        # With more, the cache is counted (or the kernel would wake early and the watcher poll), and a read
        # every max_interval_s catches cache that became active or was reclaimed since.
        self._safe = inactive <= SMALL_CACHE_BYTES
        if plan.low_bytes is not None:
            t = total - plan.low_bytes - ARM_MARGIN_BYTES + (0.0 if self._safe else inactive)
            if t <= total - LIMIT_SLACK_BYTES:
                want["low"] = t
        if plan.high_bytes is not None:
            want["high"] = total - plan.high_bytes + inactive + ARM_MARGIN_BYTES
        if want.keys() == self._armed_usage.keys() and all(
                abs(want[k] - self._armed_usage[k]) < ARM_MARGIN_BYTES / 2 for k in want):
            return
        self._disarm()
        for side, usage in want.items():
            efd = arm_usage_threshold(probe.path, int(usage))
            if isinstance(efd, str):
                self.why_polling = efd
                self.kernel_thresholds = False  # said once (stats); polling from now on
                self._disarm()
                self.mode = "polling"
                return
            self._efds[efd] = side
            self._waiter.add(efd)
        self._armed_usage = want
        self.rearms += 1
        self.mode = "kernel" if "low" in want or plan.low_bytes is None else "polling near the limit"

    def _disarm(self) -> None:
        for efd in list(self._efds):
            self._waiter.remove(efd)
            try:
                os.close(efd)  # closing the eventfd unregisters the threshold
            except OSError:
                pass
        self._efds = {}
        self._armed_usage = {}

    # ------------------------------------------------------------------ PSI triggers

    def _arm_psi(self, target: Target | None) -> None:
        want = () if target is None else target.plan.psi
        if self.psi_path is None:
            if want:
                self.psi = "no PSI file for the scope: pressure is read at every full tick instead"
            want = ()
        if want == self._psi_armed:
            return
        self._disarm_psi()
        told = []
        for kind, stall, window in want:
            fd = arm_psi_trigger(self.psi_path, kind, stall, window)  # type: ignore[arg-type]
            if isinstance(fd, int):
                self._psi_fds[fd] = (kind, stall, window)
                self._waiter.add(fd, priority=True)
                told.append(f"PSI trigger armed on {self.psi_path} ({kind} {stall} {window}: stall microseconds "
                            f"within a window)")
            else:
                told.append(f"no PSI trigger ({fd}): pressure is read at every full tick instead")
        if told:
            self.psi = "; ".join(told)
        self._psi_armed = want

    def _disarm_psi(self) -> None:
        for fd in list(self._psi_fds):
            self._waiter.remove(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        self._psi_fds = {}
        self._psi_armed = ()

    def _drain_all(self) -> None:
        for fd in list(self._efds):
            if drain_eventfd(fd):
                self.kernel_wakes += 1
