"""``memguard run``: one job under the same ladder, without a daemon.

    memguard run --memory-max 8GiB --timeout 2h --require-free 16GiB -- python3 features.py

The job runs in a cgroup of its own where memguard may create one (its
``--memory-max`` is then the kernel's hard limit too), under its
``--policy`` rules if given; memguard passes the job's output and exit code
through (128 + the signal when it was killed) and prints a one-screen
summary at the end: peak memory, duration, what memguard did and why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

from .config import ConfigError, load_workload_file
from .daemon import Daemon
from .expr import parse_expr
from .model import Action, Exited, Notice, Reclaim, SetAdmission, Signal, WorkerEvent, is_known
from .policy import ActionKind, DaemonPolicy, Rule, WorkloadPolicy
from .sense.cgroup import choose_scope
from .units import format_duration, format_size

__all__ = ["run_command", "EX_TEMPFAIL"]

EX_TEMPFAIL = 75  # sysexits.h: try again later (not enough memory free right now)


class RunSession(Daemon):
    """A daemon with one worker, raw output passthrough, and a summary of what happened."""

    def __init__(self, policy: DaemonPolicy, quiet: bool = False) -> None:
        super().__init__(policy, None)
        self.stop_when_done = True
        self.quiet = quiet
        self.peak = 0
        self.exit: Exited | None = None
        self.spawn_error: str | None = None
        self.decisions: list[str] = []
        self.started = time.monotonic()

    def _on_output(self, worker: str, stream: str, line: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write(line + "\n")
        out.flush()

    def _on_event(self, ev: WorkerEvent) -> None:
        super()._on_event(ev)
        if isinstance(ev, Exited):
            self.exit = self.pending[-1] if self.pending and isinstance(self.pending[-1], Exited) else ev

    def _report(self, action: Action, dry_run: bool) -> None:
        if isinstance(action, (Signal, SetAdmission, Reclaim)):
            text = f"{action.event}: {action.reason}"
            if action.explain is not None:
                text += f" [{action.explain.display}]"
            self.decisions.append(text)
            if not self.quiet:
                print(f"memguard: {text}", file=sys.stderr, flush=True)
        elif isinstance(action, Notice) and action.event == "spawn_failed":
            self.spawn_error = action.reason
        elif isinstance(action, Notice) and action.event == "exit":
            self.exit_reason = action.reason

    def _sample_workers(self):
        samples = super()._sample_workers()
        for s in samples.values():
            if is_known(s.memory_bytes):
                self.peak = max(self.peak, int(s.memory_bytes))
        return samples

    def exit_code(self) -> int:
        if self.exit is None:
            return 127 if self.spawn_error else 1
        if self.exit.signal is not None:
            return 128 + self.exit.signal
        return int(self.exit.returncode or 0)

    def summary(self, argv: list[str]) -> str:
        took = time.monotonic() - self.started
        lines = ["", f"memguard run: {' '.join(argv)}"]
        if self.spawn_error:
            lines.append(f"  did not start: {self.spawn_error}")
        lines.append(f"  duration      {format_duration(took)}")
        lines.append(f"  peak memory   {format_size(self.peak)}" + (
            f" of {format_size(self.limit)} allowed" if self.limit else ""))
        lines.append(f"  exit          {getattr(self, 'exit_reason', 'unknown')} -> exit code {self.exit_code()}")
        if self.decisions:
            lines.append("  memguard did:")
            lines += [f"    - {d}" for d in self.decisions]
        else:
            lines.append("  memguard did: nothing (no rule fired)")
        return "\n".join(lines)


def _workload(args: Any) -> WorkloadPolicy:
    if args.policy:
        wl = load_workload_file(args.policy)
        if args.cmd:
            wl = replace(wl, command=tuple(args.cmd))
    else:
        wl = WorkloadPolicy(name="run", command=tuple(args.cmd))
    limits = wl.limits
    if args.memory_max is not None:
        limits = replace(limits, memory_bytes=args.memory_max)
    if args.memory_high is not None:
        limits = replace(limits, memory_high_bytes=args.memory_high)
    rules = list(wl.rules)
    if limits.memory_bytes is not None:
        text = "worker.memory >= 100%"
        rules.append(Rule(name="memory-max", when=parse_expr(text), when_text=text, action=ActionKind.KILL,
                          scope="worker", source="--memory-max"))
    if args.timeout is not None:
        text = f"worker.age > {args.timeout:g}s"
        rules.append(Rule(name="timeout", when=parse_expr(text), when_text=text, action=ActionKind.TERMINATE,
                          scope="worker", source="--timeout", grace_s=args.grace))
    return replace(wl, replicas=1, limits=limits, rules=tuple(rules),
                   restart=replace(wl.restart, mode="never"),
                   working_dir=wl.working_dir or os.getcwd())


def run_command(args: Any) -> int:
    if not args.cmd and not args.policy:
        print("memguard run: nothing to run: give a command after --, or --policy FILE", file=sys.stderr)
        return 2
    try:
        wl = _workload(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.require_free is not None:
        scope = choose_scope("auto")
        reading = scope()
        avail = reading.available_bytes
        if not is_known(avail) or avail < args.require_free:
            shown = format_size(avail) if is_known(avail) else "an unknown amount"
            print(f"memguard run: not starting {' '.join(wl.command)}: {shown} available in the "
                  f"{scope.kind} scope ({scope.description}), {format_size(args.require_free)} required "
                  f"(--require-free). Exit code {EX_TEMPFAIL}: try again when memory is free.", file=sys.stderr)
            return EX_TEMPFAIL
    runtime = tempfile.mkdtemp(prefix="memguard-run-")
    policy = DaemonPolicy(workloads=(wl,), scope="auto", runtime_dir=runtime, poll_interval_s=0.5,
                          fast_poll_interval_s=0.1, mlock=False,
                          worker_cgroups="auto" if os.geteuid() == 0 else "off")
    from .report.log import configure_logging

    configure_logging("console", "error", stream=sys.stderr)
    session = RunSession(policy, quiet=args.quiet)
    session.limit = wl.limits.memory_bytes
    try:
        asyncio.run(session.run())
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if not args.quiet:
        print(session.summary(list(wl.command)), file=sys.stderr)
    return session.exit_code()
