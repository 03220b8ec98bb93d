"""``memguard init -- CMD``: memguard as PID 1 of a container, stopping CMD before the memory limit does.

    ENTRYPOINT ["memguard", "init", "--"]
    CMD ["python3", "train.py"]

Like tini it is a small init: it reaps every zombie of the container
(orphans are reparented to it), forwards the signals it receives to the
command's process group, and exits with the command's status (128 + the
signal when a signal ended it); the command reads the container's standard
input (``docker run -i``) and its output reaches the container's log byte
for byte. Unlike tini it also guards the container's
memory: it reads the container's memory cgroup (limit and working set, as
the kubelet does) and, as memory fills,

- at ``--stop-at`` (90 % of the limit by default) stops the command
  gracefully: its stop signal (SIGTERM), ``--grace`` to exit, then SIGKILL;
- at ``--kill-at`` (97 %) kills it at once, if it is still allocating;

so the command gets to flush and exit, and the container ends with a
reason instead of a bare 137 and ``OOMKilled: true``. The reason (which
rule, which reading, which threshold) goes to stderr and to
``/dev/termination-log``, where Kubernetes picks it up as the container's
termination message (``kubectl describe pod`` shows it).

Signals: SIGTERM (``docker stop``, a pod's deletion) stops the command
gracefully through the same ladder (stop signal, grace, SIGKILL); SIGINT,
SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH and the job-control signals
are passed on to the command's process group as they are.

The command runs with ``restart: never`` (the orchestrator restarts
containers). ``--policy FILE`` reads a workload file for its rules and
limits (``worker.memory``, ``worker.growth``...), as ``memguard run`` does.
Without a memory limit on the container there is nothing to guard: it
says so once and is a plain init.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from typing import Any

from ..expr import parse_expr
from ..policy import ActionKind, DaemonPolicy, Rule, WorkloadPolicy
from ..act.children import Stdio
from ..run import RunReporter, run_passing_signals

__all__ = ["add_parser", "run", "init_policy", "InitReporter", "termination_message", "FORWARDED"]

#: Where Kubernetes reads a container's termination message (terminationMessagePath's default).
TERMINATION_LOG = "/dev/termination-log"
#: Kubernetes keeps the first 4096 bytes of a termination message.
TERMINATION_MAX = 4096
#: 90 %: stop gracefully with a tenth of the limit left, room for the command to flush and exit.
DEFAULT_STOP_AT = 90.0
#: 97 %: a command still allocating during its grace period is killed before the kernel's OOM killer acts.
DEFAULT_KILL_AT = 97.0
#: 10 s: supervisord's stopwaitsecs and docker stop's own default; Kubernetes gives 30 s before SIGKILL.
DEFAULT_GRACE_S = 10.0
#: 0.25 s between full readings; the fast path re-reads the cgroup as often as the headroom demands.
POLL_INTERVAL_S = 0.25
#: Signals passed on to the command as they are (tini's list, less SIGTERM, which goes through the ladder).
FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH",
                                                "SIGCONT", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGALRM")
                  if hasattr(signal, n))


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cli import _duration, _size

    p = sub.add_parser("init", help="run as a container's PID 1: reap, forward signals, stop CMD before the "
                                    "memory limit", usage="memguard init [options] -- CMD [ARGS...]")
    p.add_argument("--stop-at", type=_percent, default=DEFAULT_STOP_AT, metavar="PERCENT",
                   help=f"stop CMD gracefully when this much of the limit is used (default {DEFAULT_STOP_AT:g}%%)")
    p.add_argument("--kill-at", type=_percent, default=DEFAULT_KILL_AT, metavar="PERCENT",
                   help=f"kill CMD at once past this (default {DEFAULT_KILL_AT:g}%%)")
    p.add_argument("--grace", type=_duration, default=DEFAULT_GRACE_S, metavar="DURATION",
                   help=f"time between the stop signal and SIGKILL (default {DEFAULT_GRACE_S:g}s)")
    p.add_argument("--memory-max", type=_size, help="a limit of CMD's own below the container's "
                                                    "(worker.memory >= 100%% kills it)")
    p.add_argument("--policy", help="a workload YAML file whose rules and limits apply to CMD")
    p.add_argument("--termination-log", default=None, metavar="PATH",
                   help=f"where the reason of a stop is written (default {TERMINATION_LOG} where it exists)")
    p.add_argument("--quiet", "-q", action="store_true", help="no decisions and no summary on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(func=run)
    return p


def _percent(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        pct = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 90%, got {text!r}") from None
    if not 0 < pct < 100:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {text!r}")
    return pct


def _rule(name: str, text: str, action: ActionKind, grace_s: float | None = None) -> Rule:
    return Rule(name=name, when=parse_expr(text, "system"), when_text=text, action=action, scope="system",
                source="memguard init", grace_s=grace_s)


def init_policy(args: Any, workload: WorkloadPolicy, *, guarded: bool, runtime_dir: str) -> DaemonPolicy:
    """The daemon policy of ``memguard init``: one worker, never restarted, and (in a container with a
    memory limit) the two system rules of --stop-at and --kill-at."""
    rules: tuple[Rule, ...] = ()
    if guarded:
        rules = (_rule("stop-at", f"memory.available < {100.0 - args.stop_at:g}%", ActionKind.TERMINATE, args.grace),
                 _rule("kill-at", f"memory.available < {100.0 - args.kill_at:g}%", ActionKind.KILL))
    wl = replace(workload, grace_s=args.grace)
    return DaemonPolicy(workloads=(wl,), rules=rules, scope="cgroup" if guarded else "host", runtime_dir=runtime_dir,
                        poll_interval_s=POLL_INTERVAL_S, fast_poll_interval_s=0.05, mlock=False,
                        worker_cgroups="auto", post_action_delay_s=1.0)


class InitReporter(RunReporter):
    """``memguard run``'s reporter, plus what memguard init must know at the end: why the command stopped."""

    def __init__(self, quiet: bool = False) -> None:
        super().__init__(quiet=quiet)
        self.stopped_by_rule: list[str] = []
        self.kernel_oom = False

    def decisions(self, actions: Any, dry_run: bool) -> None:
        from ..model import Notice, Signal

        actions = list(actions)
        for a in actions:
            if isinstance(a, Signal) and not a.lifecycle and a.event in ("terminate", "kill", "escalate", "restart"):
                why = f"{a.event} ({'SIGKILL' if a.signum == signal.SIGKILL else signal.Signals(a.signum).name})"
                if a.explain is not None:
                    why += f": rule {a.explain.rule}: {a.explain.display}"
                else:
                    why += f": {a.reason}"
                self.stopped_by_rule.append(why)
            elif isinstance(a, Notice) and a.event == "exit" and a.fields.get("kernel_oom"):
                self.kernel_oom = True
        super().decisions(actions, dry_run)

    def exit_code(self) -> int:
        code = super().exit_code()
        return 1 if code == 0 and self.stopped_by_rule else code  # stopped for memory: its work is not done

    def summary(self, argv: list[str], limit: int | None) -> str:
        return super().summary(argv, limit).replace("memguard run:", "memguard init:", 1)


def termination_message(argv: list[str], reporter: InitReporter, code: int, limit: str) -> str | None:
    """The sentence for /dev/termination-log: why memguard stopped the command (None: it did not)."""
    cmd = " ".join(argv)
    if reporter.stopped_by_rule:
        steps = "; then ".join(reporter.stopped_by_rule)
        return (f"memguard stopped {cmd} before the container's memory limit ({limit}): {steps}. "
                f"It exited: {reporter.exit_reason}; exit code {code}.")
    if reporter.kernel_oom:
        return (f"{cmd} was killed by the kernel OOM killer at the container's memory limit ({limit}) before "
                f"memguard could stop it: {reporter.exit_reason}; exit code {code}. Lower --stop-at or give the "
                "container more memory.")
    return None


def _write_termination_log(path: str | None, message: str) -> str | None:
    """Write the message where Kubernetes reads it; the path written, or None."""
    target = path or (TERMINATION_LOG if os.path.exists(TERMINATION_LOG) else None)
    if target is None:
        return None
    data = message.encode("utf-8", "replace")[:TERMINATION_MAX]
    try:
        with open(target, "wb") as f:
            f.write(data)
    except OSError as e:
        print(f"memguard init: cannot write {target}: {e.strerror or e}", file=sys.stderr)
        return None
    return target


async def run_init(args: Any) -> int:
    from ..compose import build_daemon
    from ..config import ConfigError
    from ..run import _workload
    from ..sense.cgroup import ScopeError, choose_scope
    from ..units import format_size

    if not args.cmd and not args.policy:
        print("memguard init: nothing to run: give a command after --, or --policy FILE", file=sys.stderr)
        return 2
    if args.kill_at <= args.stop_at:
        print(f"memguard init: --kill-at ({args.kill_at:g}%) must be above --stop-at ({args.stop_at:g}%)",
              file=sys.stderr)
        return 2
    try:
        args.timeout, args.memory_high, args.require_free = None, None, None
        wl = _workload(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    wl = replace(wl, name="init", working_dir=wl.working_dir or os.getcwd())
    try:
        scope = choose_scope("auto")
    except ScopeError as e:
        print(f"memguard init: {e}", file=sys.stderr)
        scope = None
    guarded = scope is not None and scope.kind == "cgroup"
    limit = format_size(scope().total_bytes) if guarded and scope is not None else "none"
    if not args.quiet:
        if guarded:
            print(f"memguard init: guarding {scope.description}; stop at {args.stop_at:g}%, kill at "
                  f"{args.kill_at:g}%", file=sys.stderr)
        else:
            print("memguard init: this container has no memory limit (docker --memory, resources.limits.memory): "
                  "nothing to guard; reaping and forwarding signals only", file=sys.stderr)
    runtime = tempfile.mkdtemp(prefix="memguard-init-")
    reporter = InitReporter(quiet=args.quiet)
    try:
        daemon = build_daemon(init_policy(args, wl, guarded=guarded, runtime_dir=runtime), reporter=reporter,
                              one_shot=True, sentinel=False, stdio=Stdio.own())
        code = await run_passing_signals(daemon, reporter, "init-0", FORWARDED)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if code != 0:
        return code
    code = reporter.exit_code()
    message = termination_message(list(wl.command), reporter, code, limit)
    if message is not None:
        print(f"memguard init: {message}", file=sys.stderr)
        _write_termination_log(args.termination_log, message)
    if not args.quiet:
        print(reporter.summary(list(wl.command), wl.limits.memory_bytes), file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    return asyncio.run(run_init(args))
