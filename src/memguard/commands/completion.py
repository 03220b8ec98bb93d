"""``memguard completion bash|zsh``: shell completion scripts made from memguard's own parser.

The scripts are generated from :func:`memguard.cli.build_parser`, so every
command, option and choice the command line has is completed, and nothing
it does not have: there is no second list to keep in step. They are
static (completing costs no Python start per TAB, unlike argcomplete,
which would also be one more dependency). ``memguard install`` writes both
where bash-completion and zsh look for them; they can also be loaded by
hand (``source <(memguard completion bash)``).

Values: options and positionals with ``choices`` complete those; the ones
named in :data:`FILE_DESTS`/:data:`DIR_DESTS` complete paths; the command
after ``memguard run --`` completes as a command line of its own.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

__all__ = ["add_parser", "run", "bash_script", "zsh_script", "describe", "FILE_DESTS", "DIR_DESTS"]

SHELLS = ("bash", "zsh")
#: Values that are files (or a file or a directory).
FILE_DESTS = frozenset({"config", "path", "policy", "socket", "journalctl"})
#: Values that are directories.
DIR_DESTS = frozenset({"runtime_dir", "directory", "root"})


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh)")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..cli import build_parser

    parser = build_parser()
    sys.stdout.write(bash_script(parser) if args.shell == "bash" else zsh_script(parser))
    return 0


# --------------------------------------------------------------------------
# The parser, as data


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str]
    kind: str  # "file", "dir", "text", "" (no value)


@dataclass
class Positional:
    dest: str
    help: str
    choices: list[str]
    kind: str  # "file", "dir", "text", "command" (the rest of the line)
    optional: bool


@dataclass
class Command:
    name: str
    help: str
    options: list[Option] = field(default_factory=list)
    positionals: list[Positional] = field(default_factory=list)


def _kind(action: argparse.Action) -> str:
    if action.dest in FILE_DESTS:
        return "file"
    if action.dest in DIR_DESTS:
        return "dir"
    return "text"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    return " ".join(text.replace("%(default)s", str(action.default)).split())


def describe(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Command]]:
    """The main parser's options and each subcommand's options and positionals."""
    from .helptext import subparsers

    helps: dict[str, str] = {}
    main_options: list[Option] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
        elif action.option_strings:
            main_options.append(Option(list(action.option_strings), _help(action), False, [], ""))
    commands = []
    for name, sub in subparsers(parser).items():
        cmd = Command(name, " ".join(helps.get(name, "").split()))
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            choices = [str(c) for c in action.choices] if action.choices else []
            if action.option_strings:
                takes = action.nargs != 0
                cmd.options.append(Option(list(action.option_strings), _help(action), takes, choices,
                                          _kind(action) if takes else ""))
            else:
                rest = action.nargs == argparse.REMAINDER
                cmd.positionals.append(Positional(action.dest, _help(action), choices,
                                                  "command" if rest else _kind(action),
                                                  action.nargs in ("?", "*", argparse.REMAINDER)))
        commands.append(cmd)
    return main_options, commands


# --------------------------------------------------------------------------
# bash


def _words(items: list[str]) -> str:
    return " ".join(items)


def _bash_value(kind: str, choices: list[str]) -> str:
    if choices:
        return f'COMPREPLY=($(compgen -W "{_words(choices)}" -- "$cur"))'
    if kind == "file":
        return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
    if kind == "dir":
        return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur"))'
    return "COMPREPLY=()"


def bash_script(parser: argparse.ArgumentParser) -> str:
    main_options, commands = describe(parser)
    names = [c.name for c in commands]
    top = names + [f for o in main_options for f in o.flags]
    lines = [
        "# bash completion for memguard. Generated by `memguard completion bash`; do not edit.",
        "_memguard() {",
        "    local cur prev words cword",
        "    if declare -F _init_completion >/dev/null 2>&1; then",
        "        _init_completion || return",
        "    else",
        '        words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD',
        '        cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    fi",
        '    local cmd="" cmd_at=0 i',
        "    for ((i = 1; i < cword; i++)); do",
        '        case "${words[i]}" in',
        "            -*) ;;",
        '            *) cmd="${words[i]}"; cmd_at=$i; break ;;',
        "        esac",
        "    done",
        '    if [[ -z $cmd ]]; then',
        f'        COMPREPLY=($(compgen -W "{_words(top)}" -- "$cur"))',
        "        return",
        "    fi",
        "    # The positionals before the word being completed, options and their values left out.",
        "    local npos=0 skip=0 dd_at=0",
        "    for ((i = cmd_at + 1; i < cword; i++)); do",
        "        if ((skip)); then skip=0; continue; fi",
        '        case "${words[i]}" in',
        '            --) dd_at=$i; break ;;',
        "            -*) ;;",
        "            *) ((npos++)) ;;",
        "        esac",
        '        case "$cmd:${words[i]}" in',
    ]
    valued = sorted({f"{c.name}:{f}" for c in commands for o in c.options if o.takes_value for f in o.flags})
    if valued:
        lines.append(f"            {'|'.join(valued)}) skip=1 ;;")
    lines += [
        "        esac",
        "    done",
        '    case "$cmd" in',
    ]
    for c in commands:
        lines.append(f"    {c.name})")
        value_cases = [(o.flags, _bash_value(o.kind, o.choices)) for o in c.options if o.takes_value]
        if value_cases:
            lines.append('        case "$prev" in')
            for flags, action in value_cases:
                lines.append(f"            {'|'.join(flags)}) {action}; return ;;")
            lines.append("        esac")
        rest = next((p for p in c.positionals if p.kind == "command"), None)
        if rest is not None:
            # After `--`: the command's name, then its own arguments (files).
            lines += ["        if ((dd_at)); then",
                      "            if ((cword == dd_at + 1)); then COMPREPLY=($(compgen -c -- \"$cur\"))",
                      "            else compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- \"$cur\")); fi",
                      "            return",
                      "        fi"]
        flags = [f for o in c.options for f in o.flags]
        lines += ['        if [[ $cur == -* ]]; then',
                  f'            COMPREPLY=($(compgen -W "{_words(flags)}" -- "$cur")); return',
                  "        fi"]
        lines.append('        case "$npos" in')
        for n, p in enumerate(c.positionals):
            if p.kind == "command":
                lines.append('            *) COMPREPLY=($(compgen -W "--" -- "$cur")) ;;')
                break
            lines.append(f"            {n}) {_bash_value(p.kind, p.choices)} ;;")
        lines.append("        esac")
        lines.append("        ;;")
    lines += [
        "    esac",
        "}",
        "complete -F _memguard memguard",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# zsh


def _zq(text: str) -> str:
    """Text inside a single-quoted zsh word."""
    return text.replace("'", "'\\''")


def _zdesc(text: str) -> str:
    """An _arguments description: brackets and colons escaped."""
    return _zq(text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:"))


def _zaction(kind: str, choices: list[str]) -> str:
    if choices:
        return "(" + " ".join(_zq(c.replace(" ", "\\ ")) for c in choices) + ")"
    return {"file": "_files", "dir": "_files -/", "command": "_memguard_command"}.get(kind, " ")


def _zoption(o: Option) -> str:
    desc = _zdesc(o.help)
    exclusive = f"({' '.join(o.flags)})" if len(o.flags) > 1 else ""
    if o.takes_value:
        spec = f"[{desc}]:{_zdesc(o.flags[-1].lstrip('-'))}:{_zaction(o.kind, o.choices)}"
    else:
        spec = f"[{desc}]"
    if len(o.flags) > 1:
        return f"'{exclusive}'{{{','.join(o.flags)}}}'{spec}'"
    return f"'{o.flags[0]}{spec}'"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    main_options, commands = describe(parser)
    lines = [
        "#compdef memguard",
        "# zsh completion for memguard. Generated by `memguard completion zsh`; do not edit.",
        "",
        "# The command after `memguard run [options] --`: its name, then its own arguments.",
        "_memguard_command() {",
        "    if [[ $words[1] == -- ]]; then",
        "        shift words",
        "        (( CURRENT-- ))",
        "    fi",
        "    (( CURRENT > 0 )) && _normal",
        "}",
        "",
        "_memguard() {",
        '    local curcontext="$curcontext" state line ret=1',
        "    typeset -A opt_args",
        "    _arguments -C \\",
    ]
    for o in main_options:
        flags = f"{{{','.join(o.flags)}}}" if len(o.flags) > 1 else o.flags[0]
        lines.append(f"        '(- *)'{flags}'[{_zdesc(o.help)}]' \\")
    lines += [
        "        '1:command:->command' \\",
        "        '*::arg:->args' && ret=0",
        "    case $state in",
        "    command)",
        "        local -a commands",
        "        commands=(",
    ]
    for c in commands:
        lines.append(f"            '{_zq(c.name)}:{_zq(c.help.replace(':', chr(92) + ':'))}'")
    lines += [
        "        )",
        "        _describe -t commands 'memguard command' commands && ret=0",
        "        ;;",
        "    args)",
        "        case $line[1] in",
    ]
    for c in commands:
        specs = [_zoption(o) for o in c.options]
        for n, p in enumerate(c.positionals, start=1):
            desc = _zdesc(p.dest.replace("_", " "))
            if p.kind == "command":
                specs.append(f"'*::{desc}:{_zaction('command', [])}'")
            else:
                colon = "::" if p.optional else ":"
                specs.append(f"'{n}{colon}{desc}:{_zaction(p.kind, p.choices)}'")
        lines.append(f"        {c.name})")
        lines.append("            _arguments \\")
        for s in specs:
            lines.append(f"                {s} \\")
        lines.append("                && ret=0")
        lines.append("            ;;")
    lines += [
        "        esac",
        "        ;;",
        "    esac",
        "    return ret",
        "}",
        "",
        '_memguard "$@"',
        "",
    ]
    return "\n".join(lines)
