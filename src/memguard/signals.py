"""The vocabulary of ``when:`` expressions: every signal, its unit and scope.

A signal in a **system** rule is read from the scope (host or cgroup); a
signal in a **worker** rule is read per worker. Worker rules may also use
system signals (``worker.memory > 50% and memory.available < 10%``).

``percent_of`` names what a percentage is a percentage of; ``None`` with
``percent_ok`` means the signal is itself a percentage (PSI).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

__all__ = ["SignalSpec", "SIGNALS", "suggest"]


@dataclass(frozen=True)
class SignalSpec:
    name: str
    scope: str  # "system" | "worker"
    unit: str  # "bytes" | "seconds" | "percent" | "count" | "bytes_per_second"
    percent_of: str | None
    percent_ok: bool
    doc: str

    @property
    def expects(self) -> str:
        if self.unit == "bytes":
            what = "expected a size such as 2GiB"
            return what + (" or a percentage such as 10%" if self.percent_ok else "")
        if self.unit == "seconds":
            return "expected a duration such as 30s or 12h"
        if self.unit == "percent":
            return "expected a percentage such as 20 or 20%"
        if self.unit == "bytes_per_second":
            return "expected a rate such as 10MiB/s or 500MiB/m"
        return "expected a number"


def _s(name: str, scope: str, unit: str, percent_of: str | None, doc: str, percent_ok: bool | None = None) -> SignalSpec:
    ok = percent_ok if percent_ok is not None else (percent_of is not None or unit == "percent")
    return SignalSpec(name, scope, unit, percent_of, ok, doc)


SIGNALS: dict[str, SignalSpec] = {
    s.name: s
    for s in [
        _s("memory.available", "system", "bytes", "memory.total",
           "Memory the scope can still use before it is out: MemAvailable on a host; "
           "limit minus working set (usage less inactive file cache) in a cgroup."),
        _s("memory.used", "system", "bytes", "memory.total", "memory.total minus memory.available."),
        _s("swap.used", "system", "bytes", "swap.total", "Swap in use (host scope: SwapTotal - SwapFree)."),
        _s("swap.free", "system", "bytes", "swap.total", "Swap still free. Unknown where the scope has no swap figure."),
        _s("psi.some_avg10", "system", "percent", None,
           "Share of the last 10 s in which at least one task stalled on memory (PSI 'some')."),
        _s("psi.some_avg60", "system", "percent", None, "PSI 'some' averaged over 60 s."),
        _s("psi.full_avg10", "system", "percent", None,
           "Share of the last 10 s in which all non-idle tasks stalled on memory (PSI 'full': thrashing)."),
        _s("psi.full_avg60", "system", "percent", None, "PSI 'full' averaged over 60 s."),
        _s("psi.some_avg1", "system", "percent", None,
           "Share of about the last second in which at least one task stalled on memory, computed by memguard "
           "from the kernel's total stall time: follows a thrash within a second, where avg10 takes ten. "
           "Read at every full tick, and at once when the kernel's PSI trigger fires."),
        _s("psi.full_avg1", "system", "percent", None,
           "Share of about the last second in which all non-idle tasks stalled on memory (see psi.some_avg1)."),
        _s("memory.fill_rate", "system", "bytes_per_second", None,
           "How fast the scope's available memory fell over the last second, from every reading (fast and "
           "full); negative while memory is being freed. Unknown until readings span 50 ms."),
        _s("gpu.used", "system", "bytes", "gpu.total",
           "GPU memory in use on a device (NVML). `gpu.used` holds when any device matches; `gpu[0].used` "
           "names one device (`gpu[0:1].used` a MIG device). A percentage is of that device's total."),
        _s("gpu.free", "system", "bytes", "gpu.total",
           "GPU memory free on a device; `gpu.free` any device, `gpu[N].free` one."),
        _s("worker.gpu_memory", "worker", "bytes", "limits.gpu_memory",
           "GPU memory used by the worker's whole process tree, all devices (NVML per-process figures; a "
           "child's allocations count for the worker). A percentage is of the workload's limits.gpu_memory."),
        _s("worker.memory", "worker", "bytes", "limits.memory",
           "The worker's whole process tree, each shared page counted once (PSS), or its cgroup's working set. "
           "A percentage is of the workload's limits.memory."),
        _s("worker.age", "worker", "seconds", None, "Time since this incarnation of the worker started."),
        _s("worker.processes", "worker", "count", None, "Processes in the worker's tree."),
        _s("worker.restarts", "worker", "count", None,
           "Restarts of this worker slot inside the restart budget's window."),
        _s("worker.trials", "worker", "count", None,
           "Trials this incarnation has finished (reported by memguard.client)."),
        _s("worker.trial_age", "worker", "seconds", None,
           "Time since the running trial started; unknown while no trial runs."),
        _s("worker.blocked_for", "worker", "seconds", None,
           "Time the worker's admission has been closed; 0 while open."),
        _s("worker.refusals", "worker", "count", None,
           "Trials in a row that had to wait because admission was closed."),
        _s("worker.growth", "worker", "bytes_per_second", None,
           "Slope of worker.memory over the workload's growth window (least squares): a leak shows as a "
           "steady positive rate, e.g. worker.growth > 5MiB/m. Unknown until half a window of samples."),
        _s("worker.cpu", "worker", "percent", None,
           "CPU used by the worker's whole tree, in percent of one core (200% is two cores busy), averaged "
           "over the last 10 s of full samples. With for:, every such average over that time held: "
           "worker.cpu < 1% for 10m stops a job that has slept for ten minutes (a deadlock)."),
        _s("worker.idle", "worker", "seconds", None,
           "Time since the worker's tree last used CPU (1% of a core or more between two samples) or read "
           "or wrote anything (files, pipes, sockets). Unknown where its counters cannot be read."),
        _s("worker.quiet", "worker", "seconds", None,
           "Time since the worker last showed progress: a line of output, a heartbeat (memguard.client), or "
           "any read or write. A job spinning at 100% CPU without any of these is stuck: "
           "worker.quiet > 30m. Unknown where its I/O counter cannot be read."),
    ]
}


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest known name to a typo, or None."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None
