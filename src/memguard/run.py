"""``memguard run``: one job under the same ladder, without a daemon.

    memguard run --memory-max 8GiB --timeout 2h --require-free 16GiB -- python3 features.py

The job runs in a cgroup of its own where memguard may create one (its
``--memory-max`` is then the kernel's hard limit too), under its
``--policy`` rules if given; memguard passes the job's output and exit code
through (128 + the signal when it was killed) and prints a one-screen
summary at the end: peak memory, duration, what memguard did and why.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, Iterable

from .config import ConfigError, load_workload_file
from .expr import parse_expr
from .model import Action, Notice, Observation, Reclaim, SetAdmission, Signal, is_known
from .policy import ActionKind, DaemonPolicy, Rule, WorkloadPolicy
from .report.reporter import Reporter
from .sense.cgroup import choose_scope
from .units import duration_text, format_duration, format_size

__all__ = ["run_job", "RunReporter", "EX_TEMPFAIL"]

EX_TEMPFAIL = 75  # sysexits.h: try again later (not enough memory free right now)


class _Silent:
    """A logger that drops everything: a job's terminal shows its own output and memguard's decisions."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class RunReporter(Reporter):
    """The reporter of ``memguard run``: the job's output passed through, decisions on stderr, a summary."""

    def __init__(self, quiet: bool = False) -> None:
        super().__init__(log=_Silent())
        self.quiet = quiet
        self.peak = 0
        self.exit_reason = "unknown"
        self.returncode: int | None = None
        self.exit_signal: int | None = None
        self.spawn_error: str | None = None
        self.decisions_made: list[str] = []
        self.started_at = time.monotonic()

    def output(self, worker: str, stream: str, line: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            pass

    def decisions(self, actions: Iterable[Action], dry_run: bool) -> None:
        for action in actions:
            if isinstance(action, (Signal, SetAdmission, Reclaim)):
                text = f"{action.event}: {action.reason}"
                if action.explain is not None:
                    text += f" [{action.explain.display}]"
                self.decisions_made.append(text)
                if not self.quiet:
                    print(f"memguard: {text}", file=sys.stderr, flush=True)
            elif isinstance(action, Notice) and action.event == "spawn_failed":
                self.spawn_error = action.reason
            elif isinstance(action, Notice) and action.event == "exit":
                self.exit_reason = action.reason
                rc, sig = action.fields.get("returncode"), action.fields.get("exit_signal")
                self.returncode = rc if isinstance(rc, int) else None
                self.exit_signal = _signum(sig) if isinstance(sig, str) else None
            elif isinstance(action, Notice) and action.level == "error" and not self.quiet:
                print(f"memguard: {action.reason}", file=sys.stderr, flush=True)

    def tick(self, obs: Observation, state: Any) -> None:
        super().tick(obs, state)
        for s in obs.workers.values():
            if is_known(s.memory_bytes):
                self.peak = max(self.peak, int(s.memory_bytes))

    def exit_code(self) -> int:
        if self.returncode is None and self.exit_signal is None:
            return 127 if self.spawn_error else 1
        if self.exit_signal is not None:
            return 128 + self.exit_signal
        return int(self.returncode or 0)

    def summary(self, argv: list[str], limit: int | None) -> str:
        took = time.monotonic() - self.started_at
        lines = ["", f"memguard run: {' '.join(argv)}"]
        if self.spawn_error:
            lines.append(f"  did not start: {self.spawn_error}")
        lines.append(f"  duration      {format_duration(took)}")
        lines.append(f"  peak memory   {format_size(self.peak)}" + (
            f" of {format_size(limit)} allowed" if limit else ""))
        lines.append(f"  exit          {self.exit_reason} -> exit code {self.exit_code()}")
        if self.decisions_made:
            lines.append("  memguard did:")
            lines += [f"    - {d}" for d in self.decisions_made]
        else:
            lines.append("  memguard did: nothing (no rule fired)")
        return "\n".join(lines)


def _signum(name: str) -> int | None:
    import signal

    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


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
        text = f"worker.age > {duration_text(args.timeout)}"
        rules.append(Rule(name="timeout", when=parse_expr(text), when_text=text, action=ActionKind.TERMINATE,
                          scope="worker", source="--timeout", grace_s=args.grace))
    return replace(wl, replicas=1, limits=limits, rules=tuple(rules),
                   restart=replace(wl.restart, mode="never"),
                   working_dir=wl.working_dir or os.getcwd())


async def run_job(args: Any) -> int:
    """``memguard run``: the job under the ladder; returns its exit code (128 + the signal if killed)."""
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
    from .compose import build_daemon

    runtime = tempfile.mkdtemp(prefix="memguard-run-")
    policy = DaemonPolicy(workloads=(wl,), scope="auto", runtime_dir=runtime, poll_interval_s=0.5,
                          fast_poll_interval_s=0.1, mlock=False,
                          worker_cgroups="auto" if os.geteuid() == 0 else "off")
    reporter = RunReporter(quiet=args.quiet)
    try:
        code = await build_daemon(policy, reporter=reporter, one_shot=True).run()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if code != 0:
        return code
    if not args.quiet:
        print(reporter.summary(list(wl.command), wl.limits.memory_bytes), file=sys.stderr)
    return reporter.exit_code()
