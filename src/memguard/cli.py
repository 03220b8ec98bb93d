"""The ``memguard`` command: ``daemon``, ``run``, ``ctl``, ``check``, ``schema``, ``diagnose``, ``incidents``,
``events``, ``install``, ``completion``. The only place that calls ``asyncio.run``. Descriptions and examples for
``--help`` (and the man page) are in :mod:`memguard.commands.helptext`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .config import CheckResult

__all__ = ["main"]


def _cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the configuration is valid (warnings print but do not fail), 1 on errors."""
    from .config import check_config

    for stream in (sys.stdout, sys.stderr):  # paths and values may hold anything: never fail on printing them
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    result = check_config(args.path, host_checks=not args.no_host_checks)
    try:
        return _print_check(args, result)
    except OSError:  # stdout or stderr closed or a broken pipe: the exit status still tells
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
        except (OSError, ValueError):
            pass
        return 0 if result.ok else 1


def _print_check(args: argparse.Namespace, result: CheckResult) -> int:
    import json

    if args.json:
        doc = {"path": args.path, "host_checks": not args.no_host_checks, **result.as_dict()}
        print(json.dumps(doc, indent=2))
        return 0 if result.ok else 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.errors:
        for issue in result.errors:
            print(str(issue), file=sys.stderr)
        print(f"memguard check: {len(result.errors)} error(s) in {args.path}", file=sys.stderr)
        return 1
    summary = result.summary()
    if summary is not None:
        print(f"{args.path}: OK: {summary['workloads']} workload(s), {summary['workers']} worker(s), "
              f"{summary['system_rules']} system rule(s), {summary['workload_rules']} workload rule(s)"
              + (f", {len(result.warnings)} warning(s)" if result.warnings else ""))
    else:
        print(f"{args.path}: OK")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .schema import daemon_schema, workload_schema

    doc = daemon_schema() if args.kind == "daemon" else workload_schema()
    print(json.dumps(doc, indent=2))
    return 0


EX_CONFIG = 78
"""sysexits.h: the configuration is wrong. systemd names it CONFIG, and the unit's
RestartPreventExitStatus keeps it from restarting onto the same file."""


# Modules the daemon never needs, which asyncio and structlog would load if they can (about 4 MiB for
# OpenSSL, 6 MiB for rich's pretty tracebacks): the daemon writes its own log lines, and speaks TLS only
# to https:// webhooks. Marked absent before anything imports them; other commands are unaffected.
_DAEMON_SKIPS = ("rich", "better_exceptions")


def _cmd_daemon(args: argparse.Namespace) -> int:
    for name in _DAEMON_SKIPS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    from dataclasses import replace

    from .config import ConfigError, load_config

    try:
        policy = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        print(f"memguard: {len(e.errors)} error(s) in the configuration; not starting "
              f"(exit {EX_CONFIG}, EX_CONFIG: fix them, then check with: memguard check {args.config})",
              file=sys.stderr)
        return EX_CONFIG
    if not any(h.webhook and h.webhook.startswith("https:") for h in policy.alerts):
        # No TLS to speak at start: OpenSSL stays out (an https:// webhook added by a later reload is told,
        # at its first alert, to take effect after a restart).
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    for pretty in ("rich", "better_exceptions"):
        # structlog loads either, where installed, to draw tracebacks: megabytes a daemon keeps for nothing
        # (its rare tracebacks are plain text in the journal).
        sys.modules.setdefault(pretty, None)  # type: ignore[arg-type]
    from .compose import build_daemon
    from .report.log import configure_logging
    from .sense.cgroup import ScopeError

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
    import asyncio

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
        for e in reply.get("errors") or ():  # a refused reload: every error, file:line: key: message
            if isinstance(e, dict):
                where = f"{e.get('file')}:{e.get('line')}" if e.get("line") else str(e.get("file") or "")
                print("  " + ": ".join(p for p in (where, str(e.get("key") or ""), str(e.get("message"))) if p))
    return 0 if reply.get("ok") else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_job

    import asyncio

    return asyncio.run(run_job(args))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``only="daemon"`` builds just the daemon's subcommand (the service's start: the
    other commands' modules, the incident store, the exit classifier, stay out of the daemon's memory)."""
    from .config import DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_FILE

    parser = argparse.ArgumentParser(prog="memguard", description="A memory supervisor for ML machines.")
    parser.add_argument("--version", action="version", version=f"memguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="run the supervisor in the foreground")
    d.add_argument("--config", "-c", default=DEFAULT_CONFIG_FILE, help="the daemon file (YAML)")
    d.add_argument("--dry-run", action="store_true", help="decide and log, but send no signal")
    d.add_argument("--log-format", choices=["auto", "console", "json", "journald"], help="overrides log.format")
    d.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level")
    d.add_argument("--runtime-dir", metavar="DIR",
                   help="overrides runtime_dir (admission files, control socket; default: /run/memguard for "
                        "root, else $XDG_RUNTIME_DIR/memguard or /tmp/memguard-UID)")
    d.set_defaults(func=_cmd_daemon)
    if only == "daemon":
        return parser

    r = sub.add_parser("run", help="run one command under memguard's ladder (joining the daemon if one runs)",
                       usage="memguard run [options] -- CMD [ARGS...]")
    r.add_argument("--memory-max", type=_size, help="hard memory limit of the command (and its children)")
    r.add_argument("--memory-high", type=_size, help="throttle point below the hard limit (cgroup v2)")
    r.add_argument("--timeout", type=_duration, help="stop the command after this long (SIGTERM, then SIGKILL)")
    r.add_argument("--grace", type=_duration, default=10.0, help="time between SIGTERM and SIGKILL (default 10s)")
    r.add_argument("--require-free", type=_size,
                   help="refuse to start (exit 75) unless this much memory is available (and, with a daemon, not "
                        "promised to jobs admitted before)")
    r.add_argument("--wait-free", type=_size,
                   help="wait until this much memory is available (with a daemon: in its queue, first come first "
                        "served, not counting memory promised to jobs admitted before), then start")
    r.add_argument("--wait-timeout", type=_duration,
                   help="with --wait-free: give up (exit 75) after waiting this long (default: wait as long as it "
                        "takes)")
    r.add_argument("--name", help="the job's name in the daemon's events (default: the command's name)")
    r.add_argument("--priority", type=int, default=0,
                   help="victim ranking among the daemon's workers: lower is chosen first (default 0)")
    r.add_argument("--socket", help="the daemon's control socket (default: $MEMGUARD_SOCKET or "
                                    "/run/memguard/control.sock); without a daemon the job runs alone")
    r.add_argument("--policy", help="a workload YAML file whose rules apply to the command")
    r.add_argument("--quiet", "-q", action="store_true", help="no decisions and no summary on stderr")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    r.set_defaults(func=_cmd_run)

    k = sub.add_parser("ctl", help="ask the running daemon: status, reload, stop/start/restart a worker")
    k.add_argument("op", choices=["status", "reload", "stop", "start", "restart"])
    k.add_argument("worker", nargs="?", help="the worker, for stop/start/restart (e.g. trials-0)")
    k.add_argument("--socket", metavar="PATH",
                   help="the daemon's control socket (default: $MEMGUARD_SOCKET, else this user's own daemon's, "
                        "else /run/memguard/control.sock)")
    k.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    k.set_defaults(func=_cmd_ctl)

    c = sub.add_parser(
        "check", help="validate a config file or directory; exit 1 on errors",
        description="Validate a daemon file, a workload file or a directory without starting anything. "
                    "Errors exit 1; warnings (settings without effect on this machine) print and exit 0.",
        epilog=f"examples:\n  memguard check\n  memguard check {DEFAULT_CONFIG_DIR}/workloads.d/trials.yaml\n"
               "  memguard check --no-host-checks --json staging/memguard.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("path", nargs="?", default=DEFAULT_CONFIG_DIR,
                   help=f"a daemon file, a workload file or a directory (default {DEFAULT_CONFIG_DIR})")
    c.add_argument("--no-host-checks", action="store_true",
                   help="do not check users, groups, working directories, commands, GPU and cgroups on this "
                        "machine (for a configuration meant for another one)")
    c.add_argument("--json", action="store_true",
                   help="print the result as JSON: ok, errors and warnings (file, line, key, message), summary")
    c.set_defaults(func=_cmd_check)

    sc = sub.add_parser(
        "schema", help="print a JSON Schema of the daemon file or of a workload file (for editors)",
        description="Print a JSON Schema (draft 2020-12) generated from the tables the loader uses. "
                    "Point an editor's YAML support at it for completion and validation.",
        epilog="examples:\n  memguard schema workload > memguard-workload.schema.json\n"
               "  memguard schema daemon > memguard.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("kind", nargs="?", choices=["daemon", "workload"], default="daemon",
                    help="which file (default daemon)")
    sc.set_defaults(func=_cmd_schema)

    from .commands import completion, diagnose, events, health, helptext, incidents, init, install, top

    install.add_parser(sub)
    diagnose.add_parser(sub)
    incidents.add_parser(sub)
    events.add_parser(sub)
    top.add_parser(sub)
    health.add_parser(sub)
    init.add_parser(sub)
    completion.add_parser(sub)
    return helptext.apply(parser)


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"memguard {__version__}")  # without building the parser, which imports every command
        return 0
    given = sys.argv[1:] if argv is None else argv
    lean = given[:1] == ["daemon"] and not {"-h", "--help"} & set(given)
    args = build_parser("daemon" if lean else None).parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    try:
        return int(args.func(args) or 0)
    finally:
        _settle_stdout()


def _settle_stdout() -> None:
    """A standard output that fails (closed, a pipe with no reader, a full disk) must not turn the exit
    status into the interpreter's 120 at shutdown: what could not be written is dropped."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
