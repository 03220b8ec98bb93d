"""What ``memguard COMMAND --help`` says beyond the options: a description, examples, defaults.

:func:`apply` dresses the parser :func:`memguard.cli.build_parser` built:
every subcommand gets the :class:`Formatter` (descriptions and examples
keep their line breaks, options show their defaults) and, where its parser
has none of its own, the description and epilog below. The same texts
feed the man page (:mod:`memguard.commands.manpage`), so ``--help`` and
``man memguard`` say the same.
"""

from __future__ import annotations

import argparse

__all__ = ["Formatter", "DESCRIPTIONS", "EPILOGS", "MAIN_EPILOG", "apply", "subparsers"]


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; an option's default appended to its help when it has a
    meaningful one (not None, False or empty) and the help does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in text and "default" not in text.lower()
                and default not in (None, False, "", argparse.SUPPRESS) and default != []):
            text += " (default: %(default)s)"
        return text


MAIN_EPILOG = """\
examples:
  memguard check /etc/memguard
  sudo systemctl enable --now memguard
  memguard ctl status
  memguard events --since today
  memguard run --memory-max 8GiB -- python3 train.py

`memguard COMMAND --help` describes each command; `man memguard` all of them.
Configuration reference: docs/policy.md; the service: docs/service.md."""

DESCRIPTIONS: dict[str, str] = {
    "init": """\
Run a command as a container's PID 1 under memguard: reap zombies, forward
signals, stop the command gracefully before the container's memory limit
(with the reason in /dev/termination-log) and exit with its status.""",
    "daemon": """\
Run the supervisor in the foreground: start the workers of the configuration,
watch memory (RAM, swap, pressure, GPU) and each worker's process tree, and act
on the rules: block new work, ask workers to reclaim, terminate, kill, restart.
Under systemd it notifies READY, feeds the watchdog and logs to the journal.

Signals: SIGHUP reloads the configuration (a broken one is refused whole and
the running one stays); SIGTERM or SIGINT stops every worker, then exits.""",
    "run": """\
Run one command under memguard's ladder without a daemon: in a cgroup of its
own where one can be made, with a memory limit, a timeout, and the rules of a
workload file if given. Output and exit status pass through (128 + N when
killed by signal N); a summary of what happened is printed at the end.""",
    "ctl": """\
Ask the running daemon over its control socket: `status` lists the workers,
`reload` re-reads the configuration (like SIGHUP), `stop`/`start`/`restart`
act on one worker. Needs root, the daemon's own user, or membership of the
group memguard.

The socket: --socket, else $MEMGUARD_SOCKET, else the first that exists of
this user's own daemon's socket ($XDG_RUNTIME_DIR/memguard/control.sock or
/tmp/memguard-UID/control.sock) and root's /run/memguard/control.sock.""",
    "check": """\
Validate a daemon file, a workload file, or a configuration directory (its
memguard.yaml and workloads.d/) without starting anything. Every problem is
reported with its file, line and key; exit status 1 when there is any.""",
    "events": """\
Show memguard's events from the systemd journal, one line each (or JSON lines):
its decisions with the rule, the value and the threshold, worker exits and
restarts, reloads, and systemd's own lines about the unit. Filters become
journal matches. Reading the system journal needs root or membership of the
group systemd-journal (or adm).""",
    "install": """\
Set memguard up as a systemd service: the unit in /usr/local/lib/systemd/system
(ExecStart pointing at this memguard), a default configuration in /etc/memguard
where there is none (an existing one is never overwritten), the journal message
catalog, the man page and shell completions; then reload systemd and say what
to do next. Local changes to the unit belong in a drop-in
(systemctl edit memguard), which /etc/systemd/system keeps.""",
    "completion": """\
Print a completion script for bash or zsh, made from memguard's own command
line (its commands, options and choices). `memguard install` installs both;
to load one by hand:""",
}

EPILOGS: dict[str, str] = {
    "top": """\
examples:
  memguard top                        # the local daemon, refreshed every second
  memguard top --sort memory --filter trials
  memguard top --once --ascii         # one plain frame, e.g. in a bug report

keys: q quit, s sort, / filter, r restart and x stop the selected worker (administrators, after y).
docs: docs/top.md.""",
    "health": """\
examples:
  memguard health                     # "OK: 4 running, 0 failed" and exit 0
  memguard health --window 30m

exit status: 0 healthy, 1 a problem (a failed worker, a recent kernel OOM kill, a system rule
firing), 2 unknown (no daemon to ask): node-problem-detector's custom plugin contract (docs/fleet.md).""",
    "init": """\
examples:
  ENTRYPOINT ["memguard", "init", "--"]        # in a Dockerfile; CMD is the job
  memguard init --stop-at 90% -- python3 train.py

memguard runs as the container's PID 1: it reaps zombies, forwards signals, stops the job before the
container's memory limit and exits with the job's status (docs/fleet.md).""",
    "diagnose": """\
examples:
  memguard diagnose                         # the latest deaths on this machine
  memguard diagnose trials-0                # a worker's last death
  memguard diagnose 31337                   # a process, by pid
  memguard diagnose trainer                 # a container, by name or id prefix
  memguard diagnose --log train.log --exit-code 137 --json

exit status: 0 a diagnosis was printed (whatever its cause), 2 nothing could be diagnosed.
causes: docs/incidents.md.""",
    "incidents": """\
examples:
  memguard incidents list
  memguard incidents show 2026-11-28T10-31-07-trials-0
  memguard incidents export 2026-11-28T10-31-07-trials-0 --output incident.png

records: /var/lib/memguard/incidents for the service (StateDirectory=memguard).""",
    "daemon": """\
examples:
  memguard daemon                                     # the service's configuration
  memguard daemon -c config/demo/memguard.yaml        # the demo, as any user
  memguard daemon --dry-run --log-level debug         # decide and log, signal nothing

Run as root it listens on /run/memguard/control.sock; as another user on
$XDG_RUNTIME_DIR/memguard/control.sock, or /tmp/memguard-UID/control.sock
without a login session. The `started` event names the socket.

exit status: 0 stopped cleanly; 78 the configuration has errors (EX_CONFIG:
systemd does not restart it); 2 a wrong command line.""",
    "run": """\
examples:
  memguard run --memory-max 8GiB -- python3 features.py
  memguard run --memory-max 8GiB --timeout 2h --require-free 16GiB -- ./train.sh
  memguard run --policy workloads.d/trials.yaml -- python3 study.py

exit status: the command's own; 128 + N when it was killed by signal N;
75 when --require-free was not met (EX_TEMPFAIL: try again later); 127 when
it could not be started; 2 a wrong command line.""",
    "ctl": """\
examples:
  memguard ctl status
  memguard ctl status --json | jq '.workers[] | .memory_bytes'
  memguard ctl restart trials-0
  memguard ctl reload
  memguard ctl --socket /srv/mg/control.sock status

exit status: 0 the daemon did it; 1 it refused, or could not be reached.""",
    "check": """\
examples:
  memguard check /etc/memguard
  memguard check /etc/memguard/workloads.d/trials.yaml
  sudo memguard check /etc/memguard && sudo systemctl reload memguard

exit status: 0 valid; 1 errors (each printed as FILE:LINE: KEY: problem).""",
    "events": """\
examples:
  memguard events                             # everything, one line each
  memguard events -n 20 -f                    # the last 20, then follow
  memguard events --since "1h ago" --worker trials-0
  memguard events --event terminate,kill --json | jq .value
  memguard events -D /var/log/journal/copied  # journal files from another machine

Not allowed to read the journal? Add yourself to the group systemd-journal
(sudo usermod -aG systemd-journal $USER, then log in again) or use sudo.""",
    "install": """\
examples:
  sudo memguard install                       # install, keep any configuration
  memguard install --dry-run                  # what it would do
  memguard install --root /tmp/pkgroot        # into a tree, for packaging

Files: /usr/local/lib/systemd/system/memguard.service, /etc/memguard/,
/usr/local/lib/systemd/catalog/memguard.catalog,
/usr/local/share/man/man8/memguard.8,
/usr/local/share/bash-completion/completions/memguard,
/usr/local/share/zsh/site-functions/_memguard.""",
    "completion": """\
  source <(memguard completion bash)                      # bash, this shell
  memguard completion zsh > ~/.zfunc/_memguard            # zsh, with ~/.zfunc in fpath

examples:
  memguard completion bash > /etc/bash_completion.d/memguard""",
}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def apply(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give the main parser its epilog and every subcommand its formatter, description and examples (a
    parser's own description or epilog is kept)."""
    parser.formatter_class = Formatter
    if parser.epilog is None:
        parser.epilog = MAIN_EPILOG
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and action.metavar is None:
            action.metavar = "COMMAND"
    for name, sub in subparsers(parser).items():
        sub.formatter_class = Formatter
        if not sub.description and name in DESCRIPTIONS:
            sub.description = DESCRIPTIONS[name]
        if sub.epilog is None and name in EPILOGS:
            sub.epilog = EPILOGS[name]
    return parser
