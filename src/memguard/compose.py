"""Composing the real daemon: the observer, effects and reporter ports over this machine.

``memguard daemon`` and ``memguard run`` both build their daemon here; they
differ only in the reporter (and ``run``'s one-shot mode). Tests build the
same :class:`~memguard.daemon.Daemon` over fakes instead.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .act.children import Stdio
from .act.effects import Effects
from .act.hooks import run_hook
from .clock import MonotonicClock
from .daemon import Daemon
from .paths import daemon_runtime_dir
from .policy import DaemonPolicy
from .report.deaths import DeathWatch
from .report.incidents import IncidentStore, default_state_dir
from .report.metrics import Metrics
from .report.outlets import Outlets
from .report.recorder import FlightRecorder
from .report.reporter import Reporter
from .sense.containers import DockerClient
from .sense.kmsg import KmsgUnavailable, read_boot_id
from .sense.observer import Observer

__all__ = ["build_daemon", "incident_sinks"]


def build_daemon(policy: DaemonPolicy, config_path: str | None = None, *, reporter: Any = None,
                 one_shot: bool = False, sentinel: bool = True, stdio: Stdio | None = None) -> Daemon:
    """The daemon over the real ports. Raises ScopeError when the asked-for scope cannot be guarded.
    ``stdio``: the workers' standard streams lead to memguard's own (``memguard run``), see :class:`Stdio`."""
    runtime = daemon_runtime_dir(configured=policy.runtime_dir)
    policy = replace(policy, runtime_dir=runtime)
    observer = Observer(policy)
    effects = Effects(runtime_dir=runtime, worker_cgroups=policy.worker_cgroups, oom_score_adj=policy.oom_score_adj,
                      mlock=policy.mlock, sentinel=sentinel, stdio=stdio)
    clock = MonotonicClock()
    if reporter is None:
        # Always a Metrics: /metrics may be turned on by a reload; without file or listener it only counts.
        reporter = Reporter(metrics=Metrics(policy.metrics_file, __version__), outlets=Outlets(run_exec=run_hook),
                            clock=clock.now, **incident_sinks(policy))
    return Daemon(policy, observer, effects, reporter, clock, one_shot=one_shot,
                  load_config=None if config_path is None else functools.partial(_load, config_path))


def incident_sinks(policy: DaemonPolicy) -> dict[str, Any]:
    """The reporter's post-mortem sinks: the flight recorder, the incident store under the state directory, and
    the death watch over the kernel log (resumed from the saved position) and the container runtime.

    Never raises: a kernel log that cannot be read is said at start (``deaths_problem``) and the rest works.
    """
    state = Path(policy.state_dir) if policy.state_dir else default_state_dir()
    store = IncidentStore(state / "incidents")
    recorder = FlightRecorder(policy.recorder_window_s)
    problem = None
    try:
        reader = DeathWatch.open_reader(store)
    except KmsgUnavailable as e:
        reader, problem = None, str(e.strerror or e)
    boot = reader.boot_id if reader is not None else read_boot_id()
    deaths = DeathWatch(store, reader=reader, recorder=recorder, docker=DockerClient(),
                        boot_id=boot if isinstance(boot, str) and boot else None)
    return {"incidents": store, "recorder": recorder, "deaths": deaths, "deaths_problem": problem,
            "boot_id": deaths.boot_id}


def _load(path: str) -> DaemonPolicy:
    from .config import load_config

    return load_config(path)
