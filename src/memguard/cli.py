"""The ``memguard`` command: ``daemon``, ``check``, ``install``, ``events``. The only place that calls
``asyncio.run``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from . import __version__

__all__ = ["main"]


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import check_path

    policy, issues = check_path(args.path)
    if issues:
        for issue in issues:
            print(str(issue), file=sys.stderr)
        print(f"memguard check: {len(issues)} error(s) in {args.path}", file=sys.stderr)
        return 1
    if policy is not None:
        workers = sum(w.replicas for w in policy.workloads)
        print(f"{args.path}: OK: {len(policy.workloads)} workload(s), {workers} worker(s), "
              f"{len(policy.rules)} system rule(s), "
              f"{sum(len(w.rules) for w in policy.workloads)} workload rule(s)")
    else:
        print(f"{args.path}: OK")
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .compose import build_daemon
    from .config import ConfigError, load_config
    from .report.log import configure_logging
    from .sense.cgroup import ScopeError

    try:
        policy = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        print(f"memguard: {len(e.errors)} error(s) in the configuration; not starting", file=sys.stderr)
        return 2
    if args.dry_run:
        policy = replace(policy, dry_run=True)
    if args.runtime_dir:
        policy = replace(policy, runtime_dir=args.runtime_dir)
    configure_logging(args.log_format or policy.log_format, args.log_level or policy.log_level)
    try:
        daemon = build_daemon(policy, os.path.abspath(args.config))
    except ScopeError as e:
        print(f"memguard: {e}", file=sys.stderr)
        return 2
    return asyncio.run(daemon.run())


def _size(text: str) -> int:
    from .units import UnitError, parse_size

    try:
        return parse_size(int(text) if text.isdigit() else text)
    except UnitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    from .units import UnitError, parse_duration

    try:
        return parse_duration(text)
    except UnitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_ctl(args: argparse.Namespace) -> int:
    import json

    from .client import ControlUnavailable, admin_request

    fields = {"worker": args.worker} if args.worker else {}
    if args.op in ("stop", "start", "restart") and not args.worker:
        print(f"memguard ctl {args.op}: name the worker, e.g. memguard ctl {args.op} trials-0", file=sys.stderr)
        return 2
    try:
        reply = admin_request(args.op, args.socket, **fields)
    except ControlUnavailable as e:
        print(f"memguard ctl: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif args.op == "status" and reply.get("ok"):
        print(reply.get("status", ""))
        for name, w in reply.get("workers", {}).items():
            mem = w.get("memory_bytes")
            from .units import format_size

            shown = format_size(mem) if isinstance(mem, (int, float)) else "-"
            print(f"  {name:<20} {w['phase']:<9} pid {str(w.get('pid') or '-'):<8} admission {w['admission']:<7}"
                  f" memory {shown:<9} trials {w.get('trials', 0):<5} {w.get('last_exit') or ''}")
    else:
        print(reply.get("error") or ("ok" if reply.get("ok") else json.dumps(reply)))
    return 0 if reply.get("ok") else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_job

    return asyncio.run(run_job(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memguard", description="A memory supervisor for ML machines.")
    parser.add_argument("--version", action="version", version=f"memguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="run the supervisor in the foreground")
    d.add_argument("--config", "-c", default="/etc/memguard/memguard.yaml", help="the daemon file")
    d.add_argument("--dry-run", action="store_true", help="decide and log, but send no signal")
    d.add_argument("--log-format", choices=["auto", "console", "json", "journald"], help="overrides log.format")
    d.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level")
    d.add_argument("--runtime-dir", help="overrides runtime_dir (admission files, control socket)")
    d.set_defaults(func=_cmd_daemon)

    r = sub.add_parser("run", help="run one command under memguard's ladder, without the daemon",
                       usage="memguard run [options] -- CMD [ARGS...]")
    r.add_argument("--memory-max", type=_size, help="hard memory limit of the command (and its children)")
    r.add_argument("--memory-high", type=_size, help="throttle point below the hard limit (cgroup v2)")
    r.add_argument("--timeout", type=_duration, help="stop the command after this long (SIGTERM, then SIGKILL)")
    r.add_argument("--grace", type=_duration, default=10.0, help="time between SIGTERM and SIGKILL (default 10s)")
    r.add_argument("--require-free", type=_size,
                   help="refuse to start (exit 75) unless this much memory is available")
    r.add_argument("--policy", help="a workload YAML file whose rules apply to the command")
    r.add_argument("--quiet", "-q", action="store_true", help="no decisions and no summary on stderr")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    r.set_defaults(func=_cmd_run)

    k = sub.add_parser("ctl", help="ask the running daemon: status, reload, stop/start/restart a worker")
    k.add_argument("op", choices=["status", "reload", "stop", "start", "restart"])
    k.add_argument("worker", nargs="?", help="the worker, for stop/start/restart (e.g. trials-0)")
    k.add_argument("--socket", help="control socket (default: $MEMGUARD_SOCKET or /run/memguard/control.sock)")
    k.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    k.set_defaults(func=_cmd_ctl)

    c = sub.add_parser("check", help="validate a config file or directory; exit 1 on errors")
    c.add_argument("path")
    c.set_defaults(func=_cmd_check)

    from .commands import events, health, init, install, top

    install.add_parser(sub)
    events.add_parser(sub)
    top.add_parser(sub)
    health.add_parser(sub)
    init.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
