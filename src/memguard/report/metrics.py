"""Prometheus metrics: a textfile (node_exporter's textfile collector) and/or an HTTP endpoint.

With ``metrics_file:`` set memguard rewrites one ``.prom`` file after each
full tick (temp file + rename, so a scrape never sees half a file); with
``metrics: {listen: HOST:PORT}`` it serves the same text at /metrics
(:mod:`memguard.report.endpoint`), rendered at scrape time from the last
full tick's values and the counters. Names follow Prometheus conventions:
a ``memguard_`` prefix, base units (bytes, seconds), ``_total`` for
counters, labels by workload, worker, GPU index, cause, never by pid.
PSI is exported like node_exporter's ``node_pressure_*`` counters, so the
same ``rate()`` queries work on both.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Iterable, Mapping

from ..model import Action, Notice, Observation, Reclaim, SetAdmission, Signal, SignalProcess, Spawn, is_known

__all__ = ["Metrics"]


_PHASES = ("pending", "starting", "running", "stopping", "stopped", "failed")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


class Metrics:
    """The counters memguard keeps, and the text of every series. ``path`` None: no textfile (HTTP only)."""

    def __init__(self, path: str | None, version: str) -> None:
        self.path = path
        self.version = version
        self.actions: Counter[tuple[str, str]] = Counter()  # (workload, action)
        self.restarts: Counter[tuple[str, str]] = Counter()  # (workload, worker)
        self.oom_kills: Counter[str] = Counter()  # workload -> workers killed by the kernel OOM killer
        self.incidents: Counter[str] = Counter()  # cause -> incidents recorded
        self.alerts: Counter[tuple[str, str]] = Counter()  # (hook, outcome: sent|failed|suppressed)
        self.limits: dict[str, int] = {}  # workload -> limits.memory, bytes
        self._obs: Observation | None = None
        self._workers: Mapping[str, object] = {}
        self._wall: float | None = None

    @property
    def kernel_oom_kills(self) -> int:
        return sum(self.oom_kills.values())

    def configure(self, policy: object) -> None:
        """The limits of the (re)loaded policy's workloads."""
        self.limits = {w.name: w.limits.memory_bytes for w in getattr(policy, "workloads", ())
                       if w.limits.memory_bytes}

    def count(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, (Signal, SetAdmission, Reclaim)):
                self.actions[(a.workload, a.event)] += 1
            elif isinstance(a, SignalProcess):
                self.actions[("(unmanaged)", a.event)] += 1
            elif isinstance(a, Spawn) and a.restart:
                self.restarts[(a.workload, a.worker)] += 1
            elif isinstance(a, Notice) and a.event == "exit" and a.fields.get("kernel_oom"):
                self.oom_kills[a.workload or "(unknown)"] += 1

    def incident(self, cause: str) -> None:
        """One incident recorded, by its cause (``memguard_incidents_total{cause}``)."""
        self.incidents[cause] += 1

    def alert(self, hook: str, outcome: str) -> None:
        """One alert sent, failed for good, or held back (``memguard_alerts_total{hook,outcome}``)."""
        self.alerts[(hook, outcome)] += 1

    def latest(self, obs: Observation, workers: Mapping[str, object]) -> None:
        """After every tick: the current workers and readings, for /metrics (no file is written)."""
        self._obs, self._workers = obs, workers

    def text(self) -> str:
        """The metrics now: the last full tick's readings and every counter (what /metrics serves)."""
        return self.render(self._obs, self._workers, self._wall)

    def render(self, obs: Observation | None, workers: Mapping[str, object], wall: float | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(**labels)} {value:.17g}")

        metric("memguard_build_info", "gauge", "memguard's version.", [({"version": self.version}, 1)])
        if obs is not None:
            sc = obs.scope
            for name, value, help_ in (
                ("memguard_scope_memory_total_bytes", sc.total_bytes, "Memory of the guarded scope."),
                ("memguard_scope_memory_available_bytes", sc.available_bytes, "Memory the scope can still use."),
            ):
                if is_known(value):
                    metric(name, "gauge", help_, [({"scope": sc.kind}, float(value))])
            if is_known(obs.pressure.full_avg10):
                metric("memguard_memory_pressure_full_ratio", "gauge", "PSI memory 'full' avg10, as a ratio.",
                       [({}, float(obs.pressure.full_avg10) / 100.0)])
            for name, value, help_ in (
                ("memguard_memory_pressure_waiting_seconds_total", obs.pressure.some_total_s,
                 "Time at least one task of the scope waited for memory (PSI 'some' total)."),
                ("memguard_memory_pressure_stalled_seconds_total", obs.pressure.full_total_s,
                 "Time every non-idle task of the scope stalled on memory (PSI 'full' total)."),
            ):
                if is_known(value):
                    metric(name, "counter", help_, [({"scope": sc.kind}, float(value))])
            for name, value, help_ in (
                ("memguard_scope_swap_total_bytes", sc.swap_total_bytes, "Swap the scope may use."),
                ("memguard_scope_swap_free_bytes", sc.swap_free_bytes, "Swap the scope has left."),
            ):
                if is_known(value):
                    metric(name, "gauge", help_, [({"scope": sc.kind}, float(value))])
            if is_known(sc.oom_kills):
                metric("memguard_scope_oom_kills_total", "counter",
                       "Kernel OOM kills in the scope, workers or not (the kernel's own counter).",
                       [({"scope": sc.kind}, float(sc.oom_kills))])
            gpus = [(g, g.used_bytes) for g in obs.gpus if is_known(g.used_bytes)]
            if gpus:
                metric("memguard_gpu_memory_used_bytes", "gauge", "GPU memory in use per device.",
                       [({"gpu": g.index}, float(v)) for g, v in gpus])
                metric("memguard_gpu_memory_total_bytes", "gauge", "GPU memory per device.",
                       [({"gpu": g.index}, float(g.total_bytes)) for g, _ in gpus if is_known(g.total_bytes)])
        up, mem, gmem, admission, limit, state = [], [], [], [], [], []
        for name, w in sorted(workers.items()):
            labels = {"workload": getattr(w, "workload"), "worker": name}
            phase = getattr(w, "phase").value
            up.append((labels, 1.0 if phase == "running" else 0.0))
            state += [({**labels, "state": p}, 1.0 if phase == p else 0.0) for p in _PHASES]
            if labels["workload"] in self.limits:
                limit.append((labels, float(self.limits[labels["workload"]])))
            admission.append((labels, 1.0 if getattr(w, "admission_open") else 0.0))
            m = getattr(w, "memory")
            if phase == "running" and is_known(m):
                mem.append((labels, float(m)))
            sample = getattr(w, "sample")
            if phase == "running" and sample is not None and is_known(sample.gpu_memory_bytes):
                gmem.append((labels, float(sample.gpu_memory_bytes)))
        metric("memguard_worker_up", "gauge", "1 while the worker runs.", up)
        metric("memguard_worker_admission_open", "gauge", "1 while the worker's admission gate is open.", admission)
        metric("memguard_worker_memory_bytes", "gauge", "Memory of the worker's whole tree (PSS or cgroup).", mem)
        metric("memguard_worker_memory_limit_bytes", "gauge", "The worker's limits.memory (where its workload sets "
                                                              "one).", limit)
        metric("memguard_worker_state", "gauge", "1 for the worker's current state, 0 for the others.", state)
        if gmem:
            metric("memguard_worker_gpu_memory_bytes", "gauge", "GPU memory of the worker's whole tree.", gmem)
        metric("memguard_actions_total", "counter", "Actions memguard took, by workload and action.",
               [({"workload": wl, "action": act}, float(n)) for (wl, act), n in sorted(self.actions.items())])
        metric("memguard_worker_restarts_total", "counter", "Restarts of each worker slot.",
               [({"workload": wl, "worker": w}, float(n)) for (wl, w), n in sorted(self.restarts.items())])
        metric("memguard_kernel_oom_kills_total", "counter",
               "Workers killed by the kernel OOM killer, by workload (attributed through their cgroup or the "
               "scope's counter).",
               [({"workload": wl}, float(n)) for wl, n in sorted(self.oom_kills.items())])
        metric("memguard_incidents_total", "counter", "Incidents memguard recorded, by cause.",
               [({"cause": c}, float(n)) for c, n in sorted(self.incidents.items())])
        metric("memguard_alerts_total", "counter", "Alerts sent, failed for good or held back, by hook.",
               [({"hook": h, "outcome": o}, float(n)) for (h, o), n in sorted(self.alerts.items())])
        if wall is not None:
            metric("memguard_last_full_tick_timestamp_seconds", "gauge",
                   "When memguard last read everything (Unix time): a stale value means it is stuck or gone.",
                   [({}, wall)])
        return "\n".join(lines) + "\n"

    def write(self, obs: Observation | None, workers: Mapping[str, object]) -> None:
        """Keep this full tick's values for /metrics and replace the file atomically (temp file + rename);
        a failed write leaves no temp file behind."""
        self._obs, self._workers, self._wall = obs, workers, time.time()
        if self.path is None:
            return
        text = self.text()
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

