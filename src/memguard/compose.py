"""Composing the real daemon: the observer, effects and reporter ports over this machine.

``memguard daemon`` and ``memguard run`` both build their daemon here; they
differ only in the reporter (and ``run``'s one-shot mode). Tests build the
same :class:`~memguard.daemon.Daemon` over fakes instead.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from . import __version__
from .act.effects import Effects
from .act.hooks import run_hook
from .clock import MonotonicClock
from .daemon import Daemon
from .paths import daemon_runtime_dir
from .policy import DaemonPolicy
from .report.metrics import Metrics
from .report.outlets import Outlets
from .report.reporter import Reporter
from .sense.observer import Observer

__all__ = ["build_daemon"]


def build_daemon(policy: DaemonPolicy, config_path: str | None = None, *, reporter: Any = None,
                 one_shot: bool = False, sentinel: bool = True) -> Daemon:
    """The daemon over the real ports. Raises ScopeError when the asked-for scope cannot be guarded."""
    runtime = daemon_runtime_dir(configured=policy.runtime_dir)
    policy = replace(policy, runtime_dir=runtime)
    observer = Observer(policy)
    effects = Effects(runtime_dir=runtime, worker_cgroups=policy.worker_cgroups, oom_score_adj=policy.oom_score_adj,
                      mlock=policy.mlock, sentinel=sentinel)
    if reporter is None:
        # Always a Metrics: /metrics may be turned on by a reload; without file or listener it only counts.
        reporter = Reporter(metrics=Metrics(policy.metrics_file, __version__), outlets=Outlets(run_exec=run_hook))
    return Daemon(policy, observer, effects, reporter, MonotonicClock(), one_shot=one_shot,
                  load_config=None if config_path is None else functools.partial(_load, config_path))


def _load(path: str) -> DaemonPolicy:
    from .config import load_config

    return load_config(path)
