"""``memguard install``: set memguard up as a systemd service.

Puts the unit in ``/etc/systemd/system/memguard.service`` with ExecStart
pointing at the memguard that runs this command (the console script next
to this interpreter, or ``<interpreter> -m memguard.cli``), a default
``/etc/memguard/memguard.yaml`` and ``/etc/memguard/workloads.d/example.yaml``
where there are none (an existing configuration is never overwritten),
then runs ``systemctl daemon-reload`` and says what to do next.

The files come from the package (``memguard/data/``), so an installed
wheel can install itself. ``--root DIR`` installs into a directory tree
instead of ``/`` (for packaging and tests; implies ``--no-reload``),
``--dry-run`` prints the plan and touches nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["add_parser", "run", "exec_start_argv", "systemd_quote", "render_unit", "plan_install"]

UNIT_NAME = "memguard.service"
UNIT_DIR = "etc/systemd/system"
CONFIG_DIR = "etc/memguard"
CONFIG_FILE = "memguard.yaml"
EXAMPLE_WORKLOAD = "workloads.d/example.yaml"
WORKLOAD_SUFFIXES = (".yaml", ".yml")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "install",
        help="install memguard as a systemd service (root)",
        description="Install the systemd unit, a default configuration where there is none, and reload systemd.",
    )
    p.add_argument("--root", "--prefix", dest="root", metavar="DIR", default="/",
                   help="install into this directory tree instead of / (implies --no-reload)")
    p.add_argument("--no-reload", action="store_true", help="do not run `systemctl daemon-reload`")
    p.add_argument("--dry-run", "-n", action="store_true", help="print what would be done; change nothing")
    p.add_argument("--exec", dest="exec_start", metavar="COMMAND",
                   help="the memguard command for ExecStart (default: the memguard running this command)")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------
# The unit


def exec_start_argv() -> list[str]:
    """The command that starts this very memguard: the console script beside the interpreter when there is
    one, else ``<interpreter> -m memguard.cli``. The interpreter's path is kept as is (a virtual
    environment's ``bin/python`` is a symlink; resolving it would leave the environment)."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "memguard")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [python, "-m", "memguard.cli"]


def systemd_quote(arg: str) -> str:
    """One word of an Exec*= line: quoted when it holds white space or quotes; ``%`` and ``$`` escaped so
    systemd takes them literally."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\n\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _data(name: str) -> str:
    return resources.files("memguard").joinpath("data", name).read_text(encoding="utf-8")


def render_unit(exec_argv: list[str], config_path: str = "/etc/memguard/memguard.yaml") -> str:
    """The packaged unit with its ExecStart= replaced by ``exec_argv daemon --config config_path``."""
    line = "ExecStart=" + " ".join(systemd_quote(a) for a in [*exec_argv, "daemon", "--config", config_path])
    out, replaced = [], False
    for raw in _data(UNIT_NAME).splitlines(keepends=True):
        if raw.startswith("ExecStart="):
            out.append(line + "\n")
            replaced = True
        else:
            out.append(raw)
    if not replaced:  # pragma: no cover - the packaged unit has one
        raise RuntimeError("the packaged unit has no ExecStart= line")
    return "".join(out)


# --------------------------------------------------------------------------
# The plan


@dataclass
class Step:
    path: Path
    content: str
    action: str  # "create", "replace", "unchanged", "keep"
    note: str = ""
    mode: int = 0o644


def _has_workloads(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir()
                      if p.is_file() and p.suffix in WORKLOAD_SUFFIXES and not p.name.startswith("."))
    except OSError:
        return []


def plan_install(root: Path, exec_argv: list[str]) -> list[Step]:
    config_dir = root / CONFIG_DIR
    unit_path = root / UNIT_DIR / UNIT_NAME
    unit = render_unit(exec_argv, "/" + CONFIG_DIR + "/" + CONFIG_FILE)
    steps: list[Step] = []

    if not unit_path.exists():
        steps.append(Step(unit_path, unit, "create"))
    elif unit_path.read_text(encoding="utf-8", errors="replace") == unit:
        steps.append(Step(unit_path, unit, "unchanged"))
    else:
        steps.append(Step(unit_path, unit, "replace",
                          f"the previous unit is kept as {unit_path.name}.bak; "
                          "put local changes in a drop-in (systemctl edit memguard)"))

    config = config_dir / CONFIG_FILE
    if config.exists():
        steps.append(Step(config, "", "keep", "an existing configuration is never overwritten"))
    else:
        steps.append(Step(config, _data(CONFIG_FILE), "create"))

    example = config_dir / EXAMPLE_WORKLOAD
    present = _has_workloads(example.parent)
    if example.exists():
        steps.append(Step(example, "", "keep", "an existing configuration is never overwritten"))
    elif present:
        steps.append(Step(example, "", "keep",
                          f"not added: workloads.d/ already holds {', '.join(present)}"))
    else:
        steps.append(Step(example, _data(EXAMPLE_WORKLOAD), "create",
                          "an example: edit it (command, user, working_dir) or remove it before starting"))
    return steps


def _apply(step: Step) -> None:
    step.path.parent.mkdir(parents=True, exist_ok=True)
    if step.action == "replace":
        shutil.copy2(step.path, step.path.with_name(step.path.name + ".bak"))
    tmp = step.path.with_name(f".{step.path.name}.tmp{os.getpid()}")
    tmp.write_text(step.content, encoding="utf-8")
    os.chmod(tmp, step.mode)
    os.replace(tmp, step.path)


_VERB = {"create": "create   ", "replace": "replace  ", "unchanged": "unchanged", "keep": "keep     "}


def run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    system = root == Path("/")
    if system and os.geteuid() != 0 and not args.dry_run:
        print("memguard install: must run as root (or use --root DIR, or --dry-run to see the plan)",
              file=sys.stderr)
        return 1
    exec_argv = exec_start_argv()
    if args.exec_start:
        import shlex

        exec_argv = shlex.split(args.exec_start)
    steps = plan_install(root, exec_argv)
    dry = "would " if args.dry_run else ""
    print(f"memguard install{' (dry run: nothing is changed)' if args.dry_run else ''} into {root}:")
    for step in steps:
        verb = (dry if step.action in ("create", "replace") else "") + _VERB[step.action]
        print(f"  {verb:<15} {step.path}" + (f"  ({step.note})" if step.note else ""))
        if not args.dry_run and step.action in ("create", "replace"):
            try:
                _apply(step)
            except OSError as e:
                print(f"memguard install: cannot write {step.path}: {e}", file=sys.stderr)
                return 1
    unit_step = steps[0]
    exec_line = next(line for line in unit_step.content.splitlines() if line.startswith("ExecStart="))
    print(f"  {'':<15} {exec_line}")

    config_dir = root / CONFIG_DIR
    if not args.dry_run and (config_dir / CONFIG_FILE).exists():
        from ..config import check_path

        _, issues = check_path(str(config_dir / CONFIG_FILE))
        if issues:
            print(f"  the configuration in {config_dir} has {len(issues)} error(s); memguard will not start "
                  "until they are fixed:")
            for issue in issues[:20]:
                print(f"    {issue}")
        else:
            print(f"  {'check':<15} {config_dir / CONFIG_FILE}: OK")

    reload_ok = True
    if args.no_reload or not system:
        print(f"  {'skip':<15} systemctl daemon-reload" + ("" if args.no_reload else " (not installing into /)"))
    elif args.dry_run:
        print(f"  {'would run':<15} systemctl daemon-reload")
    else:
        reload_ok = _daemon_reload()

    if system:
        print("\nNext:\n"
              "  memguard check /etc/memguard        # after editing your workloads in /etc/memguard/workloads.d/\n"
              "  systemctl enable --now memguard     # start now and at every boot\n"
              "  systemctl status memguard\n"
              "  journalctl -u memguard -f           # everything memguard and its workers log\n"
              "  memguard events                     # memguard's decisions, one line each\n"
              "See docs/service.md.")
    return 0 if reload_ok else 1


def _daemon_reload() -> bool:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        print(f"  {'skip':<15} systemctl daemon-reload (systemctl not found: is this a systemd system?)")
        return True
    if not os.path.isdir("/run/systemd/system"):
        print(f"  {'skip':<15} systemctl daemon-reload (systemd is not running as the init system here)")
        return True
    proc = subprocess.run([systemctl, "daemon-reload"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memguard install: systemctl daemon-reload failed ({proc.returncode}): {proc.stderr.strip()}",
              file=sys.stderr)
        return False
    print(f"  {'ran':<15} systemctl daemon-reload")
    return True
