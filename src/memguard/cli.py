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

    from .config import ConfigError, load_config
    from .daemon import Daemon
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
        daemon = Daemon(policy, os.path.abspath(args.config))
    except ScopeError as e:
        print(f"memguard: {e}", file=sys.stderr)
        return 2
    return asyncio.run(daemon.run())


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

    c = sub.add_parser("check", help="validate a config file or directory; exit 1 on errors")
    c.add_argument("path")
    c.set_defaults(func=_cmd_check)

    from .commands import events, install

    install.add_parser(sub)
    events.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
