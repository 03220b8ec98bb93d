"""The observer port: builds every :class:`~memguard.model.Observation` the daemon steps on.

Two kinds of tick read the machine:

* a **full** tick measures what is slow to measure: each worker's whole
  process tree (or its cgroup), the opt-in unmanaged processes, the GPUs
  and who uses them. :meth:`Observer.sample` does that work off the event
  loop, from an immutable :class:`~memguard.model.LiveSnapshot` taken on
  the loop: the tree walks and cgroup reads run in one dedicated reader
  thread (which owns the caches they use), NVML calls in the GPU sensor's
  own thread. The values come back to the loop, where :meth:`Observer.full`
  adds the scope's memory and PSI, read last so the decision sees the
  freshest figure;
* a **fast** tick (:meth:`Observer.fast`) re-reads only what can change
  fast between full ticks: the scope's memory usage. Limits, swap and the
  OOM counter come from the last full reading, except when a worker exit
  is waiting: its OOM counter tells a kernel kill from another SIGKILL.

Nothing here changes the machine, and nothing logs: GPU problems travel in
the sample for the reporter to tell once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Mapping, Sequence

from ..model import (Adoptable, Exited, Event, GpuDeviceReading, LiveSnapshot, Observation, Pressure, ProcessSample,
                     ProtectedProcess, Reading, ScopeMemory, Unknown, WatchPlan, WorkerSample, is_known)
from ..policy import DaemonPolicy
from ..threads import CHECK, LoopOwned, OwnershipError, on_owner_thread
from .cgroup import MemoryCgroup, ScopeReader, choose_scope
from .gpu import GpuProblem, GpuReading, GpuStart, ThreadedSensor, attribute_all, host_pid_map
from .host import host_scope
from .jetson import make_gpu_sensor
from .procs import Adopted, NameCache, children_reader, find_adopted, sample_tree, tree_resident_bytes
from .psi import PSI_MEMORY_PATH, RecentPressure, read_pressure_totals
from .unmanaged import scan_matches, scan_protected
from .watch import CgroupProbe, Crossing, HostProbe, Target, Watcher

__all__ = ["Observer", "Sample", "measure_workers", "gpu_observation"]


@dataclass(frozen=True)
class Sample:
    """What a full tick measured off the loop: workers, unmanaged processes, GPUs (and their problems)."""

    workers: Mapping[str, WorkerSample] = field(default_factory=dict)
    unmanaged: tuple[ProcessSample, ...] = ()
    gpus: tuple[GpuDeviceReading, ...] = ()
    gpu_problems: tuple[GpuProblem, ...] = ()
    strays: tuple[tuple[int, int, str, int], ...] = ()
    unattributed: tuple[tuple[int, int], ...] = ()
    # Each cgroup worker's inactive file cache at this sample (usage less working set), and its cgroup:
    # what a re-read of its usage at the moment of acting needs to give its working set.
    cached_bytes: Mapping[str, float] = field(default_factory=dict)
    cgroups: Mapping[str, str] = field(default_factory=dict)
    protected: tuple[ProtectedProcess, ...] = ()
    adoptable: tuple[Adoptable, ...] = ()


#: Processes matching ``protect:`` are looked for at a full reading at least every 10 s (every 10th at the
#: default poll interval, each one when the full tick is quiet): a protected daemon rarely restarts, and the
#: children of one (sshd's sessions) inherit its OOM score.
PROTECT_SCAN_S = 10.0


def _workers_reading(policy: DaemonPolicy, signals: frozenset[str]) -> frozenset[str]:
    """The workers whose rules read any of ``signals``."""
    return frozenset(n for wl in policy.workloads if wl.signals & signals for n in wl.worker_names())


def _reads_worker_memory(policy: DaemonPolicy) -> frozenset[str]:
    """The workers whose rules read their own memory (worker.memory, worker.growth): PSS is for them."""
    return _workers_reading(policy, _MEMORY_SIGNALS)


def _reads_io(policy: DaemonPolicy) -> frozenset[str]:
    """The workers whose rules read their I/O counters (worker.idle, worker.quiet): /proc/<pid>/io is for them."""
    return _workers_reading(policy, _IO_SIGNALS)


def _managed_names(policy: DaemonPolicy) -> frozenset[str]:
    return frozenset(n for wl in policy.workloads for n in wl.worker_names())


_MEMORY_SIGNALS = frozenset({"worker.memory", "worker.growth"})
_IO_SIGNALS = frozenset({"worker.idle", "worker.quiet"})


# A crossing read by the watcher less than 5 ms ago stands for the scope's reading of the tick it causes.
_CROSSING_FRESH_S = 0.005


class _Fresh:
    """Re-reads each worker's memory at the moment of acting, on the loop: its cgroup's usage (one pread of
    a file opened at the full tick) less the cache the last sample saw, or the resident figure of its known
    processes. Kept lean: with 200 workers this is on the path from a crossing to the signal."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}  # cgroup path -> its usage file, open
        self.plan: list[tuple[str, int, float]] = []  # (worker, fd, cache bytes) for the last sample

    def prepare(self, sample: "Sample") -> None:
        """Open each worker cgroup's usage file now, at the full tick: the moment of acting only reads."""
        paths = set(sample.cgroups.values())
        for path in [p for p in self.fds if p not in paths]:
            _close(self.fds.pop(path))
        plan = []
        for name, path in sample.cgroups.items():
            fd = self.fds.get(path)
            if fd is None:
                try:
                    fd = self.fds[path] = os.open(f"{path}/memory.usage_in_bytes" if _is_v1(path)
                                                  else f"{path}/memory.current", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
            plan.append((name, fd, sample.cached_bytes.get(name, 0.0)))
        self.plan = plan

    def read(self, sample: "Sample") -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        pread = os.pread
        for name, fd, cached in self.plan:
            try:
                usage = int(pread(fd, 64, 0))
            except (OSError, ValueError):
                continue
            out[name] = usage - cached if usage > cached else 0.0
        for name, ws in sample.workers.items():
            if name not in sample.cgroups and ws.members:
                m = tree_resident_bytes(p for p, _ in ws.members)
                if m is not None:
                    out[name] = m
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            _close(fd)
        self.fds = {}
        self.plan = []


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _is_v1(path: str) -> bool:
    return os.path.exists(f"{path}/memory.usage_in_bytes")


class _ReaderCache:
    """State the reader thread keeps between samples: open cgroup files, process names.

    Owned by the reader thread alone (checked like loop-owned objects).
    """

    def __init__(self) -> None:
        self.owner: int | None = None
        self.cgroups: dict[str, MemoryCgroup] = {}
        self.names: NameCache = {}

    def claim(self) -> None:
        here = threading.get_ident()
        if self.owner is None:
            self.owner = here
        elif CHECK and self.owner != here:
            raise OwnershipError("the observer's reader cache was used outside its reader thread")

    def cgroup(self, path: str) -> MemoryCgroup:
        cg = self.cgroups.get(path)
        if cg is None:
            cg = self.cgroups[path] = MemoryCgroup.from_path(path)
        return cg

    def keep(self, paths: set[str], live: set[tuple[int, int]]) -> None:
        """Drop what no longer exists: cgroups not in ``paths``, names of processes not in ``live``."""
        for path in [p for p in self.cgroups if p not in paths]:
            self.cgroups.pop(path).close()
        if len(self.names) > 4 * max(len(live), 256):
            self.names = {k: v for k, v in self.names.items() if k in live}


def measure_workers(snapshot: LiveSnapshot, protect: Sequence[str], cache: _ReaderCache | None = None,
                    use_children_files: bool | None = None, pss: Collection[str] | None = None,
                    cached: dict[str, float] | None = None,
                    io: Collection[str] | None = None) -> tuple[dict[str, WorkerSample], Adopted]:
    """Each live worker measured: its processes found (its cgroup's list where it has one, else a walk of
    its tree from the recorded members and the orphans memguard adopted from it), its memory read from its
    own cgroup where it has one (exact, cheap) or summed over the tree otherwise: PSS for the workers in
    ``pss`` (None: all), whose rules read their memory, the cheap resident figure for the others. Also
    returns the adopted orphans that belong to no running worker; ``cached`` receives each cgroup worker's
    inactive file cache (usage less working set). ``io`` (None: all): the workers whose I/O counters are
    read (their rules read ``worker.idle`` or ``worker.quiet``). Reads ``/proc`` and cgroup files only; meant
    for the reader thread."""
    cache = cache or _ReaderCache()
    children = children_reader(use_children_files)
    protect_set = frozenset(protect)
    live = {name: (lw.pid, lw.incarnation) for name, lw in snapshot.workers.items()}
    adopted = find_adopted(snapshot.instance, live, set(snapshot.own) | {p for p, _ in live.values()}, children)
    out: dict[str, WorkerSample] = {}
    seen: set[tuple[int, int]] = set()
    for name, lw in snapshot.workers.items():
        members = lw.members + tuple(adopted.members.get(name, ()))
        cg: MemoryCgroup | None = None
        pids: list[int] | None = None
        failed: Exception | None = None
        if lw.cgroup is not None:
            try:
                cg = cache.cgroup(lw.cgroup)
                pids = cg.pids()
            except (OSError, RuntimeError) as e:
                failed = e
        measure: bool | str = False if lw.cgroup is not None else ("pss" if pss is None or name in pss else "rss")
        s = sample_tree(name, lw.pid, lw.start, members, protect_set, children=children,
                        measure=measure, names=cache.names, pids=pids, io=io is None or name in io)
        seen.update(s.members)
        if lw.cgroup is not None:
            memory: Reading
            if cg is None or failed is not None:
                memory = Unknown(f"the worker's cgroup {lw.cgroup} is unreadable: {failed}")
            else:
                usage, memory = cg.usage_and_working_set()
                if cached is not None and is_known(usage) and is_known(memory):
                    cached[name] = float(usage) - float(memory)
            s = replace(s, memory_bytes=memory, source="cgroup")
        out[name] = s
    cache.keep({lw.cgroup for lw in snapshot.workers.values() if lw.cgroup}, seen)
    return out, adopted


def gpu_observation(reading: GpuReading, samples: Mapping[str, WorkerSample],
                    pid_map: Any = None) -> tuple[tuple[GpuDeviceReading, ...], dict[str, WorkerSample]]:
    """Turn an NVML reading into the model's values: device figures, and each worker's GPU memory
    (its whole tree's, from the members each sample found)."""
    devices = tuple(GpuDeviceReading(d.index, d.total_bytes, d.used_bytes, d.free_bytes,
                                     d.name if isinstance(d.name, str) else "",
                                     d.uuid if isinstance(d.uuid, str) else "") for d in reading.devices)
    out = dict(samples)
    if not reading.devices:
        return devices, out
    trees = {name: [pid for pid, _ in s.members] or [s.pid] for name, s in samples.items()}
    att = attribute_all(reading, trees, pid_map)
    for name, sample in samples.items():
        wg = att.workers.get(name)
        if wg is not None:
            out[name] = replace(sample, gpu_memory_bytes=wg.total_bytes, gpu_per_device=dict(wg.per_device))
    return devices, out


class Observer(LoopOwned):
    """The real observer: the scope (host or cgroup), PSI, process trees, cgroups, GPUs, unmanaged."""

    def __init__(self, policy: DaemonPolicy, *, gpu: ThreadedSensor | None = None,
                 scope: ScopeReader | None = None, clock: Callable[[], float] | None = None) -> None:
        self._claim_thread()
        self.policy = policy
        self.scope: ScopeReader = scope or choose_scope(policy.scope)
        self.gpu = gpu if gpu is not None else make_gpu_sensor(policy.gpu)
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memguard-reader")
        self._cache = _ReaderCache()
        self._last_full_scope: ScopeMemory | None = None
        self._pressure = Pressure()
        self._last: Sample = Sample()
        self._pss = _reads_worker_memory(policy)
        self._io = _reads_io(policy)
        self._managed = _managed_names(policy)
        self._fresh = _Fresh()
        self._wake: Callable[[], None] | None = None
        self._watcher: Watcher | None = None
        self.clock = clock or time.monotonic
        self._recent = RecentPressure()
        self._protect_scanned: float | None = None

    @on_owner_thread
    def configure(self, policy: DaemonPolicy) -> str | None:
        """Take a reloaded policy; returns a sentence when the scope changed (for the log)."""
        old, self.policy = self.policy, policy
        self._pss = _reads_worker_memory(policy)
        self._io = _reads_io(policy)
        self._managed = _managed_names(policy)
        if policy.protect != old.protect:
            self._protect_scanned = None  # new names: looked for at the next full reading
        if policy.scope != old.scope:
            self.scope = choose_scope(policy.scope)
            self._last_full_scope = None
            self._recent = RecentPressure()
            if self._watcher is not None and self._wake is not None:
                self._watcher.close()
                self._watcher = self._make_watcher()
                self._watcher.start(self._wake)
            return f"now guarding {self.scope.description}"
        return None

    # ------------------------------------------------------------------ between ticks

    def _make_watcher(self) -> Watcher:
        cg = self.scope.cgroup
        if self.scope.kind == "cgroup" and cg is not None:
            probe: CgroupProbe | HostProbe = CgroupProbe(cg.path, cg.version)
            psi = cg.pressure_path()
        else:
            probe, psi = HostProbe(), PSI_MEMORY_PATH
        return Watcher(probe, psi_path=psi)

    @on_owner_thread
    def watch(self, plan: WatchPlan) -> None:
        """Hand the watcher the band to watch until the next tick (see :mod:`memguard.sense.watch`)."""
        if self._watcher is None:
            return
        last = self._last_full_scope
        total = float(last.total_bytes) if (last is not None and last.kind == "cgroup"
                                            and is_known(last.total_bytes)) else None
        self._watcher.watch(Target(plan, total))

    def watch_stats(self) -> dict[str, object]:
        """What the watcher did: reads, kernel wake-ups, crossings (for the status reply and the benchmark)."""
        return self._watcher.stats() if self._watcher is not None else {"mode": "off"}

    def _pressure_path(self) -> str:
        cg = self.scope.cgroup
        path = cg.pressure_path() if self.scope.kind == "cgroup" and cg is not None else None
        return path or PSI_MEMORY_PATH

    def _read_pressure(self, now: float) -> Pressure:
        """The scope's PSI figures, with the 1 s averages memguard keeps from the kernel's stall totals."""
        pressure, totals = read_pressure_totals(self._pressure_path())
        some, full = self._recent.add(now, totals)
        return replace(pressure, some_avg1=some, full_avg1=full)

    def _readings(self) -> tuple[tuple[float, float], ...]:
        """The watcher's readings since the last tick, on this observer's clock."""
        if self._watcher is None:
            return ()
        got = self._watcher.recent()
        if not got:
            return ()
        shift = self.clock() - time.monotonic()
        return tuple((t + shift, a) for t, a in got) if shift else got

    def describe(self) -> dict[str, str]:
        """What is guarded, for the start-up line."""
        return {"kind": self.scope.kind, "description": self.scope.description}

    @on_owner_thread
    async def start(self, wake: Callable[[], None] | None = None) -> GpuStart | None:
        """Start the watcher (``wake`` is called on the loop when it sees a crossing) and GPU sensing (off the
        loop: NVML start-up can take seconds); returns None when the policy turned GPU sensing off."""
        loop = asyncio.get_running_loop()
        if wake is not None:
            self._wake = lambda: loop.call_soon_threadsafe(wake)
            self._watcher = self._make_watcher()
            self._watcher.start(self._wake)
        if self.gpu is None:
            return None
        return await loop.run_in_executor(None, self.gpu.start)

    @on_owner_thread
    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._fresh.close()
        if self.gpu is not None:
            self.gpu.close()

    # ------------------------------------------------------------------ full ticks

    @on_owner_thread
    async def sample(self, snapshot: LiveSnapshot) -> Sample:
        """The slow part of a full tick, off the loop; the loop keeps ticking while it runs."""
        loop = asyncio.get_running_loop()
        policy = self.policy
        cache = self._cache

        # Ad-hoc workers (``memguard run`` joining) bring rules of their own: PSS for them too.
        adhoc = {name for name in snapshot.workers if name not in self._managed}
        pss, io = self._pss | adhoc, self._io | adhoc
        cached: dict[str, float] = {}
        now = self.clock()
        scan_protect = bool(policy.protect) and (self._protect_scanned is None
                                                 or now - self._protect_scanned >= PROTECT_SCAN_S)
        if scan_protect:
            self._protect_scanned = now

        def read() -> tuple[dict[str, WorkerSample], tuple[ProcessSample, ...], Adopted,
                            tuple[ProtectedProcess, ...], tuple[Adoptable, ...]]:
            cache.claim()
            workers, adopted = measure_workers(snapshot, policy.protect, cache, pss=pss, cached=cached, io=io)
            unmanaged: tuple[ProcessSample, ...] = ()
            adoptable: tuple[Adoptable, ...] = ()
            if policy.unmanaged:
                exclude = {pid for s in workers.values() for pid, _ in s.members} | set(snapshot.own)
                exclude |= {p[0] for p in adopted.leftovers} | {p for p, _ in adopted.unmarked}
                unmanaged, adoptable = scan_matches(policy.unmanaged, exclude, policy.protect)
            protected = scan_protected(policy.protect) if scan_protect else ()
            return workers, unmanaged, adopted, protected, adoptable

        trees = loop.run_in_executor(self._reader, read)
        reading = None
        if self.gpu is not None and self.gpu.enabled:
            reading = await self.gpu.read_async()
        workers, unmanaged, adopted, protected, adoptable = await trees
        gpus: tuple[GpuDeviceReading, ...] = ()
        problems: tuple[GpuProblem, ...] = ()
        if reading is not None:
            pids = [pid for s in workers.values() for pid, _ in s.members]
            gpus, workers = gpu_observation(reading, workers, host_pid_map(pids))
            problems = tuple(reading.problems)
        return Sample(workers, unmanaged, gpus, problems, tuple(adopted.leftovers), tuple(adopted.unmarked),
                      cached, {name: lw.cgroup for name, lw in snapshot.workers.items() if lw.cgroup},
                      protected, adoptable)

    @on_owner_thread
    def full(self, sample: Sample, events: tuple[Event, ...], now: float) -> Observation:
        """A full tick's observation: ``sample`` plus the scope and PSI, read now."""
        self._last = sample
        self._fresh.prepare(sample)
        self._pressure = self._read_pressure(now)
        scope = self.scope()
        self._last_full_scope = scope
        return Observation(at=now, scope=scope, pressure=self._pressure, workers=sample.workers,
                           events=events, full=True, unmanaged=sample.unmanaged, gpus=sample.gpus,
                           strays=sample.strays, unattributed=sample.unattributed, protected=sample.protected,
                           adoptable=sample.adoptable, readings=self._readings())

    # ------------------------------------------------------------------ fast ticks

    @on_owner_thread
    def fast(self, events: tuple[Event, ...], now: float) -> Observation:
        """A fast tick's observation: the scope's memory re-read, everything else from the last full tick.

        After the watcher saw a crossing of a threshold whose rule stops a
        victim, each worker's memory is re-read too (the victim is ranked on
        figures of this moment); after a PSI trigger, the pressure.
        """
        crossing: Crossing | None = self._watcher.take() if self._watcher is not None else None
        exits = any(isinstance(ev, Exited) for ev in events)
        last_scope = self._last_full_scope
        if exits or last_scope is None:
            scope = self.scope()
        elif (crossing is not None and crossing.available is not None and not crossing.psi
              and self.clock() - crossing.at < _CROSSING_FRESH_S):
            # The watcher read the scope exactly (usage and memory.stat) an instant ago: act on that reading
            # rather than read it again (with many worker cgroups below, memory.stat costs a walk of them).
            scope = replace(last_scope, available_bytes=int(crossing.available))
        else:
            scope = self._fast_scope(last_scope)
        last = self._last
        fresh: Mapping[str, Reading] = {}
        if crossing is not None:
            if crossing.stop:
                fresh = self._fresh.read(last)
            if crossing.psi:  # the kernel said tasks stall: the pressure figures are read now, not later
                self._pressure = self._read_pressure(now)
        return Observation(at=now, scope=scope, pressure=self._pressure, workers=last.workers,
                           events=events, full=False, unmanaged=last.unmanaged, gpus=last.gpus,
                           worker_memory=fresh, readings=self._readings())

    def _fast_scope(self, last: ScopeMemory) -> ScopeMemory:
        """Only what moves fast (usage, working set); the host's /proc/vmstat is skipped (two thirds of a
        host read's cost)."""
        if self.scope.kind == "host":
            return host_scope(oom_kills=False)
        cg = self.scope.cgroup
        total = last.total_bytes
        if cg is None or last.kind != "cgroup" or not is_known(total):
            return self.scope()
        ws = cg.working_set_bytes()
        avail = (total - ws if total > ws else 0) if is_known(ws) else ws
        return replace(last, available_bytes=avail)
