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
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from ..model import (Adoptable, Exited, Event, GpuDeviceReading, LiveSnapshot, Observation, Pressure, PressureEvent,
                     ProcessSample, ProtectedProcess, Reading, ScopeMemory, Unknown, WorkerSample, is_known)
from ..policy import DaemonPolicy
from ..threads import CHECK, LoopOwned, OwnershipError, on_owner_thread
from .cgroup import MemoryCgroup, ScopeReader, choose_scope
from .gpu import GpuProblem, GpuReading, GpuStart, ThreadedSensor, attribute_all, host_pid_map
from .host import host_scope
from .jetson import make_gpu_sensor
from .procs import Adopted, NameCache, children_reader, find_adopted, sample_tree
from .psi import PSI_MEMORY_PATH, PsiTrigger, RecentPressure, read_pressure_totals
from .unmanaged import scan_matches, scan_protected

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
    protected: tuple[ProtectedProcess, ...] = ()
    adoptable: tuple[Adoptable, ...] = ()


#: Processes matching ``protect:`` are looked for on every 10th full reading (10 s at the relaxed pace):
#: a protected daemon rarely restarts, and the children of one (sshd's sessions) inherit its OOM score.
PROTECT_SCAN_EVERY = 10


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
                    use_children_files: bool | None = None) -> tuple[dict[str, WorkerSample], Adopted]:
    """Each live worker measured: its tree walked (from the recorded members, and the orphans memguard
    adopted from it, too), its memory read from its own cgroup where it has one (exact, cheap) or summed
    over the tree (PSS) otherwise. Also returns the adopted orphans that belong to no running worker.
    Reads ``/proc`` and cgroup files only; meant for the reader thread."""
    cache = cache or _ReaderCache()
    children = children_reader(use_children_files)
    protect_set = frozenset(protect)
    live = {name: (lw.pid, lw.incarnation) for name, lw in snapshot.workers.items()}
    adopted = find_adopted(snapshot.instance, live, set(snapshot.own) | {p for p, _ in live.values()}, children)
    out: dict[str, WorkerSample] = {}
    seen: set[tuple[int, int]] = set()
    for name, lw in snapshot.workers.items():
        members = lw.members + tuple(adopted.members.get(name, ()))
        s = sample_tree(name, lw.pid, lw.start, members, protect_set, children=children,
                        measure=lw.cgroup is None, names=cache.names)
        seen.update(s.members)
        if lw.cgroup is not None:
            memory: Reading
            processes = s.processes
            try:
                cg = cache.cgroup(lw.cgroup)
                memory = cg.working_set_bytes()
                processes = max(processes, len(cg.pids()))
            except (OSError, RuntimeError) as e:
                memory = Unknown(f"the worker's cgroup {lw.cgroup} is unreadable: {e}")
            s = replace(s, memory_bytes=memory, processes=processes, source="cgroup")
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
        self._recent = RecentPressure()
        self._samples = 0
        self._trigger: PsiTrigger | None = None
        self._trigger_fired = False
        self._clock = clock

    @on_owner_thread
    def configure(self, policy: DaemonPolicy) -> str | None:
        """Take a reloaded policy; returns a sentence when the scope changed (for the log)."""
        old, self.policy = self.policy, policy
        if policy.scope != old.scope:
            self.scope = choose_scope(policy.scope)
            self._last_full_scope = None
            self._recent = RecentPressure()
            if self._trigger is not None and self._post is not None:
                self._disarm()
                self.watch(self._post)
            return f"now guarding {self.scope.description}"
        return None

    # ------------------------------------------------------------------ PSI trigger

    _post: Callable[[Any], None] | None = None

    def _pressure_path(self) -> str:
        cg = self.scope.cgroup
        path = cg.pressure_path() if self.scope.kind == "cgroup" and cg is not None else None
        return path or PSI_MEMORY_PATH

    @on_owner_thread
    def watch(self, post: Callable[[Any], None]) -> str:
        """Arm a kernel PSI trigger on the scope's pressure file: when tasks stall on memory past its
        threshold, ``post`` gets a :class:`~memguard.model.PressureEvent` (waking the daemon at once) and
        the next reading re-reads the pressure. Returns a sentence for the log (armed, or why not)."""
        self._post = post
        path = self._pressure_path()
        try:
            trigger = PsiTrigger(path)
        except OSError as e:
            return (f"no PSI trigger on {path} ({e.strerror or e}): pressure is read at every full tick "
                    f"instead")
        try:
            asyncio.get_running_loop().add_reader(trigger.fileno(), self._on_trigger)
        except (RuntimeError, OSError) as e:
            trigger.close()
            return f"no PSI trigger on {path} ({e}): pressure is read at every full tick instead"
        self._trigger = trigger
        return f"PSI trigger armed on {path} ({trigger.spec}: stall microseconds within a window)"

    def _on_trigger(self) -> None:
        trigger = self._trigger
        if trigger is None:
            return
        fired = trigger.fired()
        if fired is None:
            self._disarm()
            return
        if fired and self._post is not None:
            self._trigger_fired = True
            import time

            self._post(PressureEvent((self._clock or time.monotonic)()))

    def _disarm(self) -> None:
        if self._trigger is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._trigger.fileno())
            except (RuntimeError, ValueError, OSError):
                pass
            self._trigger.close()
            self._trigger = None

    def _read_pressure(self, now: float) -> Pressure:
        pressure, totals = read_pressure_totals(self._pressure_path())
        some, full = self._recent.add(now, totals)
        return replace(pressure, some_avg1=some, full_avg1=full)

    def describe(self) -> dict[str, str]:
        """What is guarded, for the start-up line."""
        return {"kind": self.scope.kind, "description": self.scope.description}

    @on_owner_thread
    async def start(self) -> GpuStart | None:
        """Start GPU sensing (off the loop: NVML start-up can take seconds); None when the policy turned it off."""
        if self.gpu is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, self.gpu.start)

    @on_owner_thread
    def close(self) -> None:
        self._disarm()
        self._reader.shutdown(wait=False, cancel_futures=True)
        if self.gpu is not None:
            self.gpu.close()

    # ------------------------------------------------------------------ full ticks

    @on_owner_thread
    async def sample(self, snapshot: LiveSnapshot) -> Sample:
        """The slow part of a full tick, off the loop; the loop keeps ticking while it runs."""
        loop = asyncio.get_running_loop()
        policy = self.policy
        cache = self._cache
        scan_protect = bool(policy.protect) and self._samples % PROTECT_SCAN_EVERY == 0
        self._samples += 1

        def read() -> tuple[dict[str, WorkerSample], tuple[ProcessSample, ...], Adopted,
                            tuple[ProtectedProcess, ...], tuple[Adoptable, ...]]:
            cache.claim()
            workers, adopted = measure_workers(snapshot, policy.protect, cache)
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
                      protected, adoptable)

    @on_owner_thread
    def full(self, sample: Sample, events: tuple[Event, ...], now: float) -> Observation:
        """A full tick's observation: ``sample`` plus the scope and PSI, read now."""
        self._last = sample
        self._trigger_fired = False
        self._pressure = self._read_pressure(now)
        scope = self.scope()
        self._last_full_scope = scope
        return Observation(at=now, scope=scope, pressure=self._pressure, workers=sample.workers,
                           events=events, full=True, unmanaged=sample.unmanaged, gpus=sample.gpus,
                           strays=sample.strays, unattributed=sample.unattributed, protected=sample.protected,
                           adoptable=sample.adoptable)

    # ------------------------------------------------------------------ fast ticks

    @on_owner_thread
    def fast(self, events: tuple[Event, ...], now: float) -> Observation:
        """A fast tick's observation: the scope's memory re-read, everything else from the last full tick."""
        exits = any(isinstance(ev, Exited) for ev in events)
        scope = self.scope() if exits or self._last_full_scope is None else self._fast_scope(self._last_full_scope)
        if self._trigger_fired:  # the kernel said tasks stall: the pressure figures are read now, not later
            self._trigger_fired = False
            self._pressure = self._read_pressure(now)
        last = self._last
        return Observation(at=now, scope=scope, pressure=self._pressure, workers=last.workers,
                           events=events, full=False, unmanaged=last.unmanaged, gpus=last.gpus)

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
