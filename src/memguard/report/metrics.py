"""Prometheus metrics as a textfile (node_exporter's textfile collector), written atomically.

memguard listens on no port: with ``metrics_file:`` set it rewrites one
``.prom`` file after each full tick (temp file + rename, so a scrape never
sees half a file). Names follow Prometheus conventions: a ``memguard_``
prefix, base units (bytes, seconds), ``_total`` for counters, labels by
workload, worker and GPU index, never by pid.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Mapping

from ..model import Action, Observation, Reclaim, SetAdmission, Signal, SignalProcess, Spawn, is_known

__all__ = ["Metrics"]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self, path: str, version: str) -> None:
        self.path = path
        self.version = version
        self.actions: Counter[tuple[str, str]] = Counter()  # (workload, action)
        self.kernel_oom_kills = 0
        self.restarts: Counter[tuple[str, str]] = Counter()  # (workload, worker)

    def count(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, (Signal, SetAdmission, Reclaim)):
                self.actions[(a.workload, a.event)] += 1
            elif isinstance(a, SignalProcess):
                self.actions[("(unmanaged)", a.event)] += 1
            elif isinstance(a, Spawn) and a.restart:
                self.restarts[(a.workload, a.worker)] += 1

    def render(self, obs: Observation | None, workers: Mapping[str, object]) -> str:
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
            gpus = [(g, g.used_bytes) for g in obs.gpus if is_known(g.used_bytes)]
            if gpus:
                metric("memguard_gpu_memory_used_bytes", "gauge", "GPU memory in use per device.",
                       [({"gpu": g.index}, float(v)) for g, v in gpus])
                metric("memguard_gpu_memory_total_bytes", "gauge", "GPU memory per device.",
                       [({"gpu": g.index}, float(g.total_bytes)) for g, _ in gpus if is_known(g.total_bytes)])
        up, mem, gmem, admission = [], [], [], []
        for name, w in sorted(workers.items()):
            labels = {"workload": getattr(w, "workload"), "worker": name}
            phase = getattr(w, "phase").value
            up.append((labels, 1.0 if phase == "running" else 0.0))
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
        if gmem:
            metric("memguard_worker_gpu_memory_bytes", "gauge", "GPU memory of the worker's whole tree.", gmem)
        metric("memguard_actions_total", "counter", "Actions memguard took, by workload and action.",
               [({"workload": wl, "action": act}, float(n)) for (wl, act), n in sorted(self.actions.items())])
        metric("memguard_worker_restarts_total", "counter", "Restarts of each worker slot.",
               [({"workload": wl, "worker": w}, float(n)) for (wl, w), n in sorted(self.restarts.items())])
        metric("memguard_kernel_oom_kills_total", "counter",
               "Workers killed by the kernel OOM killer (attributed through their cgroup or the scope's counter).",
               [({}, float(self.kernel_oom_kills))])
        return "\n".join(lines) + "\n"

    def write(self, obs: Observation | None, workers: Mapping[str, object]) -> None:
        """Replace the file atomically (temp file + rename); a failed write leaves no temp file behind."""
        text = self.render(obs, workers)
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

