"""``memguard run``: one job under the same ladder, with or without a daemon.

    memguard run --memory-max 8GiB --timeout 2h --wait-free 16GiB -- python3 features.py

The job runs in a cgroup of its own where memguard may create one (its
``--memory-max`` is then the kernel's hard limit too), under its
``--policy`` rules if given. The job stands in a shell pipeline as it would
alone: it reads memguard's standard input, its output is copied byte for
byte, its exit code passes through (128 + the signal when it was killed),
and Ctrl-C reaches it as SIGINT. memguard prints a one-screen summary at
the end: peak memory, duration, what memguard did and why.

When a memguard daemon runs on the machine (its control socket answers:
:mod:`memguard.runlink`), the job also joins it as an **ad-hoc worker**:
the daemon counts it, ranks it as a victim of its system rules and names it
in its events. ``--wait-free SIZE`` then waits in the daemon's admission
queue until SIZE is available *and not promised to a job admitted earlier*,
and ``--require-free SIZE`` asks the daemon the same question without
waiting. Without a daemon both look at the scope's available memory alone.
"""

from __future__ import annotations

import asyncio
import os
import signal as _signal
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable, Iterable

from .config import ConfigError, load_workload_file
from .expr import parse_expr
from .model import Action, Notice, Observation, Reclaim, SetAdmission, Signal, is_known
from .policy import ActionKind, DaemonPolicy, Rule, WorkloadPolicy
from .report.reporter import Reporter
from .sense.cgroup import choose_scope
from .units import duration_text, format_duration, format_size

__all__ = ["run_job", "RunReporter", "EX_TEMPFAIL", "WAIT_POLL_S", "RUN_FORWARDED", "run_passing_signals"]

EX_TEMPFAIL = 75  # sysexits.h: try again later (not enough memory free right now)
#: Without a daemon, --wait-free reads the scope's available memory every 0.5 s: a job waits at most
#: that long past the moment memory is free, for one small read.
WAIT_POLL_S = 0.5


class _Silent:
    """A logger that drops everything: a job's terminal shows its own output and memguard's decisions."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class RunReporter(Reporter):
    """The reporter of ``memguard run``: decisions on stderr, a summary (the job's output is copied by the
    child supervisor)."""

    def __init__(self, quiet: bool = False, on_started: Callable[[int], None] | None = None,
                 on_exit: Callable[[int | None, int | None], None] | None = None) -> None:
        super().__init__(log=_Silent())
        self.quiet = quiet
        self.on_started = on_started  # the job's pid, once, when it runs (to join a daemon)
        self.on_exit = on_exit  # (returncode, signal) when it has exited
        self._started = False
        self.peak = 0
        self.exit_reason = "unknown"
        self.returncode: int | None = None
        self.exit_signal: int | None = None
        self.spawn_error: str | None = None
        self.decisions_made: list[str] = []
        self.started_at = time.monotonic()

    def output(self, worker: str, stream: str, line: str) -> None:
        """The job's output reaches the terminal unsplit, byte for byte (:class:`~memguard.act.children.Stdio`);
        its lines only feed the last lines and progress."""

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
                if self.on_exit is not None:
                    self.on_exit(self.returncode, self.exit_signal)
            elif isinstance(action, Notice) and action.level == "error" and not self.quiet:
                print(f"memguard: {action.reason}", file=sys.stderr, flush=True)

    def daemon_did(self, push: dict[str, Any]) -> None:
        """What the machine's memguard daemon did to the job (pushed over the link)."""
        if push.get("event") != "signal":
            return
        text = f"daemon {push.get('action')}: {push.get('reason')}"
        if push.get("explain"):
            text += f" [{push.get('explain')}]"
        self.decisions_made.append(text)
        if not self.quiet:
            print(f"memguard: {text}", file=sys.stderr, flush=True)

    def tick(self, obs: Observation, state: Any) -> None:
        super().tick(obs, state)
        if not self._started and self.on_started is not None and obs.full:
            # After its first full sample: by then the job has entered its cgroup (it does so as it starts).
            for w in state.workers.values():
                sample = obs.workers.get(w.name)
                if w.pid is not None and w.phase.value == "running" and sample is not None and sample.pid == w.pid:
                    self._started = True
                    self.on_started(w.pid)
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


#: What ``memguard run`` passes on to its job as it is, as a terminal would have sent it to the job alone:
#: Ctrl-C and Ctrl-\\ (a Python job gets its KeyboardInterrupt and runs its ``finally``), a closed terminal, the
#: user signals, a resized window. SIGTERM stops the job through the ladder; job control (Ctrl-Z) is left to
#: the shell: the job runs in a session of its own.
RUN_FORWARDED = tuple(getattr(_signal, n) for n in ("SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH")
                      if hasattr(_signal, n))
#: Before the job runs (or once it has ended) these stop memguard itself: there is nobody to pass them to.
_STOP_WHEN_NO_JOB = ("SIGINT", "SIGQUIT", "SIGHUP")


async def run_passing_signals(daemon: Any, reporter: Reporter, worker: str, forwarded: Iterable[int]) -> int:
    """Run the one-shot ``daemon`` with its signals handled here instead of by the daemon: SIGTERM stops
    ``worker`` through the ladder (a Shutdown); the ``forwarded`` signals go to its process group as they are,
    or stop memguard when the worker is not running. Returns the daemon's exit code."""
    from .act.process import signal_group
    from .model import Shutdown

    def stop(signum: int) -> None:
        name = _signal.Signals(signum).name
        reporter.note("stopping", f"{name} received: stopping {worker}", signal=name)
        daemon.post(Shutdown(name))

    def forward(signum: int) -> None:
        live = daemon.effects.snapshot().workers.get(worker)
        if live is not None:
            signal_group(live.pid, live.start, signum)
        elif _signal.Signals(signum).name in _STOP_WHEN_NO_JOB:
            stop(signum)

    daemon.capture_signals = False
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(daemon.run())
    await asyncio.sleep(0)  # the daemon's run() has begun; now the handlers are ours
    installed = []
    try:
        for signum in (_signal.SIGTERM, *forwarded):
            try:
                loop.add_signal_handler(signum, stop if signum == _signal.SIGTERM else forward, signum)
                installed.append(signum)
            except (ValueError, RuntimeError, OSError):
                pass
        return await task
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _signum(name: str) -> int | None:
    try:
        return int(_signal.Signals[name])
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


def _say(args: Any, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"memguard run: {text}", file=sys.stderr, flush=True)


def _refuse(wl: WorkloadPolicy, why: str) -> int:
    print(f"memguard run: not starting {' '.join(wl.command)}: {why}. Exit code {EX_TEMPFAIL}: try again when "
          f"memory is free.", file=sys.stderr)
    return EX_TEMPFAIL


async def _link(args: Any) -> Any:
    """The running daemon's link, or None: no daemon, or this run is itself inside one of its workers (its
    tree is counted for that worker already)."""
    if os.environ.get("MEMGUARD_WORKER"):
        return None
    from .runlink import DaemonLink, daemon_socket

    return await DaemonLink.connect(daemon_socket(getattr(args, "socket", None)))


async def _admit(args: Any, wl: WorkloadPolicy, link: Any) -> tuple[int | None, str | None]:
    """Wait for (or check) free memory before the start: (exit code to stop with or None, ticket or None)."""
    name = getattr(args, "name", None) or " ".join(wl.command)[:200]
    wait_free, require_free = getattr(args, "wait_free", None), args.require_free
    if link is not None and (wait_free is not None or require_free is not None):
        need = wait_free if wait_free is not None else require_free
        if wait_free is not None:
            _say(args, f"waiting in memguard's queue for {format_size(need)} free and not promised to an "
                       f"earlier job ({link.path})")
        timeout = getattr(args, "wait_timeout", None) if wait_free is not None else 10.0
        began = time.monotonic()
        try:
            reply = await link.request("admit", need_bytes=int(need), name=name, wait=wait_free is not None,
                                       timeout=timeout)
        except asyncio.TimeoutError:
            return _refuse(wl, f"{format_size(need)} did not become free within --wait-timeout "
                               f"({format_size(need)} wanted)"), None
        except ConnectionError as e:
            _say(args, f"the memguard daemon went away ({e}); checking memory alone")
            link = None
        else:
            if str(reply.get("error", "")).startswith("unknown op"):
                _say(args, "the memguard daemon is older than this memguard run (no admission queue); checking "
                           "memory alone")
                link = None
            elif not reply.get("ok"):
                return _refuse(wl, f"the memguard daemon says: {reply.get('error')}"), None
            else:
                if wait_free is not None:
                    _say(args, f"admitted after {time.monotonic() - began:.1f}s: "
                               f"{format_size(reply.get('available_bytes') or 0)} available, "
                               f"{format_size(reply.get('promised_bytes') or 0)} promised to earlier jobs")
                return None, reply.get("ticket")
    scope = choose_scope("auto")
    if require_free is not None:
        avail = scope().available_bytes
        if not is_known(avail) or avail < require_free:
            shown = format_size(avail) if is_known(avail) else "an unknown amount"
            return _refuse(wl, f"{shown} available in the {scope.kind} scope ({scope.description}), "
                               f"{format_size(require_free)} required (--require-free)"), None
    if wait_free is not None:
        deadline = None if getattr(args, "wait_timeout", None) is None else time.monotonic() + args.wait_timeout
        said = False
        while True:
            avail = scope().available_bytes
            if is_known(avail) and avail >= wait_free:
                break
            if not said:
                shown = format_size(avail) if is_known(avail) else "an unknown amount"
                _say(args, f"waiting for {format_size(wait_free)} free in the {scope.kind} scope "
                           f"({scope.description}): {shown} available now (no memguard daemon: no queue)")
                said = True
            if deadline is not None and time.monotonic() >= deadline:
                return _refuse(wl, f"{format_size(wait_free)} did not become free within --wait-timeout"), None
            await asyncio.sleep(WAIT_POLL_S)
    return None, None


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
    link = await _link(args)
    try:
        return await _run(args, wl, link)
    finally:
        if link is not None:
            await link.close()


async def _run(args: Any, wl: WorkloadPolicy, link: Any) -> int:
    code, ticket = await _admit(args, wl, link)
    if code is not None:
        return code
    from .act.children import Stdio
    from .compose import build_daemon

    if wl.limits.memory_high_bytes is not None:
        _warn_memory_high(args, wl)
    runtime = tempfile.mkdtemp(prefix="memguard-run-")
    policy = DaemonPolicy(workloads=(wl,), scope="auto", runtime_dir=runtime, poll_interval_s=0.5,
                          fast_poll_interval_s=0.1, mlock=False,
                          worker_cgroups="auto" if os.geteuid() == 0 else "off")
    joined: dict[str, str] = {}
    holder: dict[str, Any] = {}

    def started(pid: int) -> None:
        if link is not None and not link.closed:
            cgroups = getattr(holder.get("daemon"), "effects", None)
            cgroups = getattr(cgroups, "cgroups", None)
            cgroup = cgroups.path(wl.worker_names()[0]) if cgroups is not None else None
            asyncio.ensure_future(_join(args, wl, link, pid, ticket, joined, cgroup))

    def exited(returncode: int | None, signum: int | None) -> None:
        if link is not None and "worker" in joined:
            link.send("exited", worker=joined["worker"], returncode=returncode, signal=signum)

    reporter = RunReporter(quiet=args.quiet, on_started=started, on_exit=exited)
    if link is not None:
        link.on_push = reporter.daemon_did
    try:
        holder["daemon"] = daemon = build_daemon(policy, reporter=reporter, one_shot=True, stdio=Stdio.own())
        code = await run_passing_signals(daemon, reporter, wl.worker_names()[0], RUN_FORWARDED)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    if code != 0:
        return code
    if not args.quiet:
        summary = reporter.summary(list(wl.command), wl.limits.memory_bytes)
        if "worker" in joined:
            summary += f"\n  daemon        joined {link.path} as ad-hoc worker {joined['worker']}"
        print(summary, file=sys.stderr)
    return reporter.exit_code()


async def _join(args: Any, wl: WorkloadPolicy, link: Any, pid: int, ticket: str | None,
                joined: dict[str, str], cgroup: str | None = None) -> None:
    """Register the running job with the daemon as an ad-hoc worker (measured through ``cgroup``, the job's
    own, where it has one)."""
    fields: dict[str, Any] = {"pid": pid, "command": list(wl.command), "priority": getattr(args, "priority", 0)}
    if cgroup is not None:
        fields["cgroup"] = cgroup
    if getattr(args, "name", None):
        fields["name"] = args.name
    if wl.limits.memory_bytes:
        fields["memory_max_bytes"] = int(wl.limits.memory_bytes)
    if ticket is not None:
        fields["ticket"] = ticket
    try:
        reply = await link.request("join", **fields)
    except (ConnectionError, asyncio.TimeoutError) as e:
        _say(args, f"could not join the memguard daemon ({e}); the job runs under this memguard alone")
        return
    if reply.get("ok"):
        joined["worker"] = str(reply.get("worker"))
        _say(args, f"joined the memguard daemon as ad-hoc worker {joined['worker']}"
                   + (f" ({reply['note']})" if reply.get("note") else ""))
    else:
        _say(args, f"the memguard daemon refused the job ({reply.get('error')}); it runs under this memguard alone")


def _warn_memory_high(args: Any, wl: WorkloadPolicy) -> None:
    """--memory-high is a cgroup v2 setting: said at start where it has no effect."""
    from .sense.cgroup import find_own_cgroup

    own = find_own_cgroup() if os.geteuid() == 0 else None
    version = own.version if own is not None else None
    if version == 2:
        return
    why = ("this machine has the cgroup v1 memory controller, which has no memory.high" if version == 1 else
           "the job gets no cgroup of its own here (memguard run as root creates one)")
    print(f"memguard run: warning: --memory-high {format_size(wl.limits.memory_high_bytes or 0)} is ignored: {why}; "
          f"--memory-max still applies", file=sys.stderr, flush=True)
