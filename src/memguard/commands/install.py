"""``memguard install``: set memguard up as a systemd service.

Puts the unit in ``/usr/local/lib/systemd/system/memguard.service`` (where
systemd.unit(5) has an administrator's own units; ``/etc/systemd/system``
stays free for drop-ins and overrides) with ExecStart pointing at the
memguard that runs this command (the console script next to this
interpreter, or ``<interpreter> -m memguard``), a default
``/etc/memguard/memguard.yaml`` and ``/etc/memguard/workloads.d/example.yaml``
where there are none (an existing configuration is never overwritten),
the journal message catalog (``/usr/local/lib/systemd/catalog/``, which
``journalctl --update-catalog`` reads besides /usr/lib/systemd/catalog/),
the man page memguard(8) and bash and zsh completions; then runs
``journalctl --update-catalog`` and ``systemctl daemon-reload`` and says
what to do next.

A unit an earlier memguard install left in ``/etc/systemd/system`` would
hide the new one (``/etc`` comes first); it is moved aside to
``memguard.service.bak`` when it is recognisably memguard's own, and
reported (kept) when it is not.

The files come from the package (``memguard/data/``; the man page and the
completions are made from the command line itself), so an installed wheel
can install itself. ``--root DIR`` installs into a directory tree instead
of ``/`` (for packaging and tests; implies ``--no-reload``), ``--dry-run``
prints the plan and touches nothing.
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

__all__ = ["add_parser", "run", "exec_start_argv", "systemd_quote", "render_unit", "plan_install", "UNIT_DIR",
           "LEGACY_UNIT_DIR", "CATALOG_DIR", "MAN_DIR", "BASH_COMPLETION_DIR", "ZSH_COMPLETION_DIR"]

UNIT_NAME = "memguard.service"
#: systemd.unit(5): "System units installed by the administrator" (the unit search path has it after /etc
#: and /run, before the distribution's /usr/lib).
UNIT_DIR = "usr/local/lib/systemd/system"
#: Where memguard install put the unit before; a unit there overrides UNIT_DIR.
LEGACY_UNIT_DIR = "etc/systemd/system"
#: journalctl --update-catalog reads /usr/local/lib/systemd/catalog/ and /usr/lib/systemd/catalog/.
CATALOG_DIR = "usr/local/lib/systemd/catalog"
CATALOG_FILE = "memguard.catalog"
MAN_DIR = "usr/local/share/man/man8"
#: bash-completion loads completions/<command> from each $XDG_DATA_DIRS entry (/usr/local/share first).
BASH_COMPLETION_DIR = "usr/local/share/bash-completion/completions"
#: Debian's and Fedora's zsh have /usr/local/share/zsh/site-functions in $fpath.
ZSH_COMPLETION_DIR = "usr/local/share/zsh/site-functions"
#: The first line of the packaged unit: how a unit written by memguard install is recognised.
UNIT_SIGNATURE = "# memguard as a systemd service."
CONFIG_DIR = "etc/memguard"
CONFIG_FILE = "memguard.yaml"
EXAMPLE_WORKLOAD = "workloads.d/example.yaml"
WORKLOAD_SUFFIXES = (".yaml", ".yml")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("install", help="install memguard as a systemd service (root)")
    p.add_argument("--root", "--prefix", dest="root", metavar="DIR", default="/",
                   help="install into this directory tree instead of / (implies --no-reload)")
    p.add_argument("--no-reload", action="store_true",
                   help="do not run `journalctl --update-catalog` and `systemctl daemon-reload`")
    p.add_argument("--dry-run", "-n", action="store_true", help="print what would be done; change nothing")
    p.add_argument("--exec", dest="exec_start", metavar="COMMAND",
                   help="the memguard command for ExecStart (default: the memguard running this command)")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------
# The unit


def exec_start_argv() -> list[str]:
    """The command that starts this very memguard: the console script beside the interpreter when there is
    one, else ``<interpreter> -m memguard``. The interpreter's path is kept as is (a virtual
    environment's ``bin/python`` is a symlink; resolving it would leave the environment)."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "memguard")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [python, "-m", "memguard"]


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
    action: str  # "create", "replace", "unchanged", "keep", "move" (aside, to path + ".bak")
    note: str = ""
    mode: int = 0o644
    backup: bool = False  # on "replace", keep the previous file as <name>.bak


def _has_workloads(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir()
                      if p.is_file() and p.suffix in WORKLOAD_SUFFIXES and not p.name.startswith("."))
    except OSError:
        return []


def _file_step(path: Path, content: str, note: str = "", backup: bool = False) -> Step:
    """Create, replace or leave a file memguard owns (not the configuration)."""
    if not path.exists():
        return Step(path, content, "create")
    if path.read_text(encoding="utf-8", errors="replace") == content:
        return Step(path, content, "unchanged")
    return Step(path, content, "replace", note, backup=backup)


def _legacy_unit_step(root: Path) -> Step | None:
    """A unit in /etc/systemd/system hides ours: moved aside when an earlier memguard install wrote it."""
    legacy = root / LEGACY_UNIT_DIR / UNIT_NAME
    if not legacy.is_file() or legacy.is_symlink():
        return None
    text = legacy.read_text(encoding="utf-8", errors="replace")
    if text.startswith(UNIT_SIGNATURE):
        return Step(legacy, "", "move",
                    f"an earlier memguard install wrote it; it would hide /{UNIT_DIR}/{UNIT_NAME}. Drop-ins "
                    f"in {LEGACY_UNIT_DIR}/{UNIT_NAME}.d/ still apply")
    return Step(legacy, "", "keep",
                f"not written by memguard install: it overrides /{UNIT_DIR}/{UNIT_NAME}; remove it to use "
                f"the installed unit, keeping local changes in a drop-in (systemctl edit memguard)")


def _generated() -> tuple[str, str, str]:
    """The man page and the completion scripts, made from this memguard's command line."""
    from ..cli import build_parser
    from . import completion, manpage

    parser = build_parser()
    return manpage.render(parser), completion.bash_script(parser), completion.zsh_script(parser)


def plan_install(root: Path, exec_argv: list[str]) -> list[Step]:
    config_dir = root / CONFIG_DIR
    unit_path = root / UNIT_DIR / UNIT_NAME
    unit = render_unit(exec_argv, "/" + CONFIG_DIR + "/" + CONFIG_FILE)
    steps: list[Step] = [_file_step(unit_path, unit, f"the previous unit is kept as {unit_path.name}.bak; "
                                                     "put local changes in a drop-in (systemctl edit memguard)",
                                    backup=True)]
    legacy = _legacy_unit_step(root)
    if legacy is not None:
        steps.append(legacy)

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

    man, bash, zsh = _generated()
    steps.append(_file_step(root / CATALOG_DIR / CATALOG_FILE, _data(CATALOG_FILE)))
    steps.append(_file_step(root / MAN_DIR / "memguard.8", man))
    steps.append(_file_step(root / BASH_COMPLETION_DIR / "memguard", bash))
    steps.append(_file_step(root / ZSH_COMPLETION_DIR / "_memguard", zsh))
    return steps


def _apply(step: Step) -> None:
    if step.action == "move":
        os.replace(step.path, step.path.with_name(step.path.name + ".bak"))
        return
    step.path.parent.mkdir(parents=True, exist_ok=True)
    if step.action == "replace" and step.backup:
        shutil.copy2(step.path, step.path.with_name(step.path.name + ".bak"))
    tmp = step.path.with_name(f".{step.path.name}.tmp{os.getpid()}")
    tmp.write_text(step.content, encoding="utf-8")
    os.chmod(tmp, step.mode)
    os.replace(tmp, step.path)


_VERB = {"create": "create   ", "replace": "replace  ", "unchanged": "unchanged", "keep": "keep     ",
         "move": "move aside"}


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
        verb = (dry if step.action in ("create", "replace", "move") else "") + _VERB[step.action]
        shown = f"{step.path} -> {step.path.name}.bak" if step.action == "move" else str(step.path)
        print(f"  {verb:<15} {shown}" + (f"  ({step.note})" if step.note else ""))
        if not args.dry_run and step.action in ("create", "replace", "move"):
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
    for argv in (["journalctl", "--update-catalog"], ["systemctl", "daemon-reload"]):
        shown = " ".join(argv)
        if args.no_reload or not system:
            print(f"  {'skip':<15} {shown}" + ("" if args.no_reload else " (not installing into /)"))
        elif args.dry_run:
            print(f"  {'would run':<15} {shown}")
        else:
            reload_ok = _run_systemd_tool(argv) and reload_ok

    if system:
        print("\nNext:\n"
              "  memguard check /etc/memguard        # after editing your workloads in /etc/memguard/workloads.d/\n"
              "  systemctl enable --now memguard     # start now and at every boot\n"
              "  systemctl status memguard\n"
              "  journalctl -u memguard -f           # everything memguard and its workers log\n"
              "  memguard events                     # memguard's decisions, one line each\n"
              "  man memguard")
    return 0 if reload_ok else 1


def _run_systemd_tool(argv: list[str]) -> bool:
    """``systemctl daemon-reload`` or ``journalctl --update-catalog``: skipped, saying why, where systemd
    is not there; False when it ran and failed."""
    shown = " ".join(argv)
    tool = shutil.which(argv[0])
    if tool is None:
        print(f"  {'skip':<15} {shown} ({argv[0]} not found: is this a systemd system?)")
        return True
    if argv[0] == "systemctl" and not os.path.isdir("/run/systemd/system"):
        print(f"  {'skip':<15} {shown} (systemd is not running as the init system here)")
        return True
    proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memguard install: {shown} failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return False
    print(f"  {'ran':<15} {shown}")
    return True
