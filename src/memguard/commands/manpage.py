"""memguard(8), the man page, written in troff (man macros) from memguard's own parser.

The commands, their options and defaults come from
:func:`memguard.cli.build_parser`, their descriptions and examples from
:mod:`memguard.commands.helptext` (what ``--help`` prints), so the page
cannot drift from the command line. The sections a parser does not know
(files, environment, signals, exit status) are written here.

``memguard install`` renders it to /usr/local/share/man/man8/memguard.8;
``python -m memguard.commands.manpage`` prints it (for packagers).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys

from .. import __version__

__all__ = ["render", "escape"]

SECTION = "8"

FILES = [
    ("/etc/memguard/memguard.yaml", "The daemon file: polling, scope, system rules, logging. See docs/policy.md."),
    ("/etc/memguard/workloads.d/*.yaml", "One file per workload: its command, replicas, limits, rules, restart "
                                         "policy."),
    ("/run/memguard/control.sock", "The control socket of the service (root). A daemon run by another user "
                                   "listens on $XDG_RUNTIME_DIR/memguard/control.sock, or "
                                   "/tmp/memguard-UID/control.sock without a login session."),
    ("/run/memguard/admission/", "One admission file per worker: open, or closed with the reason."),
    ("/usr/local/lib/systemd/system/memguard.service", "The unit memguard install writes. Local changes go in "
                                                      "a drop-in: systemctl edit memguard."),
    ("/usr/local/lib/systemd/catalog/memguard.catalog", "What each of memguard's journal entries means and "
                                                       "what to do, for journalctl -x."),
]

ENVIRONMENT = [
    ("MEMGUARD_SOCKET", "The control socket memguard ctl talks to (--socket overrides it). memguard sets it in "
                        "every worker's environment, for memguard.client."),
    ("XDG_RUNTIME_DIR", "Where a daemon run by a user other than root puts its runtime directory "
                        "($XDG_RUNTIME_DIR/memguard), and where that user's memguard ctl looks first."),
    ("NOTIFY_SOCKET, WATCHDOG_USEC", "Set by systemd: memguard notifies READY, STATUS, RELOADING and STOPPING "
                                     "and feeds the watchdog. Workers never inherit them."),
    ("MEMGUARD_WORKER, MEMGUARD_TOKEN, MEMGUARD_ADMISSION_FILE, MEMGUARD_MEMORY_LIMIT",
     "Set in each worker's environment; read by memguard.client."),
]

SIGNALS = [
    ("SIGHUP", "Reload the configuration. One with errors is refused whole: the running configuration stays and "
               "every error is logged."),
    ("SIGTERM, SIGINT", "Stop every worker (its stop_signal, then SIGKILL after its grace), then exit 0."),
]

EXIT_STATUS = [
    ("0", "Success (daemon: stopped cleanly; check: valid)."),
    ("1", "check found errors; ctl was refused or could not reach the daemon; install failed."),
    ("2", "A wrong command line."),
    ("75", "run: --require-free was not met (EX_TEMPFAIL: try again later)."),
    ("78", "daemon: the configuration has errors (EX_CONFIG); the unit does not restart it."),
    ("128+N", "run: the command was killed by signal N."),
]

SEE_ALSO = ["systemctl(1)", "journalctl(1)", "systemd.service(5)", "systemd.exec(5)", "proc(5)",
            "earlyoom(1)"]


def escape(text: str) -> str:
    """Text for a troff line: backslashes and hyphen-minus escaped, a leading dot or quote guarded."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _para(text: str) -> list[str]:
    """Paragraphs of flowing text (blank-line separated), filled by troff."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        out.append(".PP")
        out.append(escape(" ".join(block.split())))
    return out


def _example_block(text: str) -> list[str]:
    """Lines kept as written (examples), in a no-fill block."""
    out = [".PP", ".nf", ".RS 4"]
    out += [escape(line) for line in text.strip("\n").splitlines()]
    out += [".RE", ".fi"]
    return out


def _epilog(text: str) -> list[str]:
    """An epilog: indented lines (examples) stay as written, the rest is filled."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        head = lines[0] if lines[0].rstrip().endswith(":") and not lines[0].startswith(" ") else None
        body = lines[1:] if head else lines
        if head:
            out += [".PP", f"\\fI{escape(head.rstrip(':'))}\\fR:"]
        if body and all(line.startswith("  ") for line in body):
            out += [".nf", ".RS 4"] + [escape(line[2:]) for line in body] + [".RE", ".fi"]
        elif body:
            out += ([] if head else [".PP"]) + [escape(" ".join(" ".join(body).split()))]
    return out


def _option_label(action: argparse.Action) -> str:
    flags = ", ".join(f"\\fB{escape(f)}\\fR" for f in action.option_strings)
    if action.nargs == 0:
        return flags
    if action.choices:
        value = "{" + ",".join(escape(str(c)) for c in action.choices) + "}"
    else:
        value = escape(action.metavar or action.dest.upper())
    return f"{flags} \\fI{value}\\fR"


def _option_help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default))
    default = action.default
    if ("default" not in text.lower() and default not in (None, False, argparse.SUPPRESS) and default != []
            and action.option_strings):
        text += f" (default: {default})"
    return escape(" ".join(text.split()))


def _command(name: str, sub: argparse.ArgumentParser, summary: str) -> list[str]:
    usage = " ".join(sub.format_usage().split())
    usage = usage[len("usage: "):] if usage.startswith("usage: ") else usage
    out = [f".SS \\fB{escape(name)}\\fR \\(em {escape(summary)}", ".PP", escape(usage)]
    if sub.description:
        desc = sub.description
        # A description ending in a colon introduces the examples below it (completion): keep it filled.
        out += _para(desc)
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            out += [".TP", _option_label(action), _option_help(action)]
        else:
            label = escape(action.metavar or action.dest)
            if action.choices:
                label = "{" + ",".join(escape(str(c)) for c in action.choices) + "}"
            out += [".TP", f"\\fI{label}\\fR", _option_help(action) or escape(action.dest)]
    if sub.epilog:
        out += _epilog(sub.epilog)
    return out


def _table(rows: list[tuple[str, str]], bold: bool = True) -> list[str]:
    out: list[str] = []
    font = "\\fB" if bold else "\\fI"
    for key, text in rows:
        out += [".TP", f"{font}{escape(key)}\\fR", escape(text)]
    return out


def render(parser: argparse.ArgumentParser | None = None, date: str | None = None) -> str:
    """The whole page. ``date`` (YYYY-MM-DD) defaults to $SOURCE_DATE_EPOCH's day, else today."""
    from . import helptext

    if parser is None:
        from ..cli import build_parser

        parser = build_parser()
    if date is None:
        import os

        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        day = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit() else \
            _dt.datetime.now(_dt.timezone.utc)
        date = day.strftime("%Y-%m-%d")
    summaries: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: " ".join((a.help or "").split()) for a in action._choices_actions}
    subs = helptext.subparsers(parser)
    out = [
        f'.TH MEMGUARD {SECTION} "{date}" "memguard {escape(__version__)}" "System Administration"',
        ".\\\" Generated by memguard.commands.manpage from memguard's command line; do not edit.",
        ".nh",
        ".ad l",
        ".SH NAME",
        "memguard \\- a memory supervisor for ML machines",
        ".SH SYNOPSIS",
        ".nf",
    ]
    for name in subs:
        out.append(f"\\fBmemguard\\fR \\fB{escape(name)}\\fR [\\fIoptions\\fR]"
                   + (" \\fB\\-\\-\\fR \\fICMD\\fR [\\fIARGS\\fR...]" if name == "run" else ""))
    out += ["\\fBmemguard\\fR \\fB\\-\\-version\\fR", ".fi", ".SH DESCRIPTION"]
    out += _para(
        "memguard owns the processes of ML workloads (training runs, hyperparameter trials, inference "
        "servers, data pipelines), watches the machine's memory (RAM, swap, pressure stall information, GPU "
        "memory) and each worker's whole process tree, and escalates before the machine falls over: it "
        "closes the admission of new work, asks workers to give memory back, terminates, kills and restarts "
        "them, one victim at a time, by rules written in YAML. Every decision is logged with the rule, the "
        "value and the threshold that caused it; under systemd each is a structured journal entry.")
    out += _para(
        "It runs as a systemd service (memguard install), or by hand as any user (memguard daemon), or "
        "around a single command (memguard run).")
    out.append(".SH COMMANDS")
    for name, sub in subs.items():
        out += _command(name, sub, summaries.get(name, ""))
    out.append(".SH FILES")
    out += _table(FILES, bold=False)
    out.append(".SH ENVIRONMENT")
    out += _table(ENVIRONMENT)
    out.append(".SH SIGNALS")
    out += _table(SIGNALS)
    out.append(".SH EXIT STATUS")
    out += _table(EXIT_STATUS)
    out.append(".SH EXAMPLES")
    out += _example_block(
        "sudo memguard install\n"
        "sudo $EDITOR /etc/memguard/workloads.d/trials.yaml\n"
        "sudo memguard check /etc/memguard\n"
        "sudo systemctl enable --now memguard\n"
        "memguard ctl status\n"
        "memguard events --since today --event terminate,kill\n"
        "journalctl -x -u memguard")
    out.append(".SH SEE ALSO")
    out.append(", ".join(f"\\fB{escape(ref.split('(')[0])}\\fR({ref.split('(')[1]}" for ref in SEE_ALSO))
    out += _para("The documentation in the source tree: README.md, docs/service.md (the unit and the "
                 "journal), docs/policy.md (every setting), docs/control.md (the control socket and "
                 "memguard.client).")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
