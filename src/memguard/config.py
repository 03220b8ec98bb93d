"""The configuration loader: YAML policy files in, frozen policy objects out.

A daemon file (``memguard.yaml``) names a directory of workload files, one
YAML file per workload. Both are read with ``yaml.compose`` so every node
keeps its line, and the node tree is walked by hand: every key is known or
an error (a typo must never silently disable a guard), every value is
checked for its type and unit, and every problem of every file is collected
before anything is reported. Each problem is a :class:`ConfigIssue`::

    config/workloads.d/trials.yaml:12: rules[1].grace: expected a duration such as 100ms, 5s, 10m or 12h, got '20'

Public API: :func:`load_config`, :func:`load_workload_file`,
:func:`check_path`, :class:`ConfigError`, :class:`ConfigIssue`.

Defaults are never repeated here: they are read from the dataclasses of
:mod:`memguard.policy`.

Relative paths (``workloads``, ``runtime_dir``, ``working_dir``) resolve
against the directory of the file that names them, and are stored absolute,
so the daemon may change its working directory and still reload.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal as _signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .expr import Comparison, Expr, ExprError, comparisons, parse_expr
from .policy import (ActionKind, Brake, DaemonPolicy, Limits, Recycle, RestartPolicy, Rule, UnmanagedMatch,
                     WorkloadPolicy)
from .signals import SIGNALS, suggest
from .units import (DURATION_EXPECTED, SIZE_EXPECTED, UnitError, format_duration, parse_duration, parse_percent,
                    parse_size)

__all__ = [
    "ConfigIssue",
    "ConfigError",
    "load_config",
    "load_workload_file",
    "check_path",
    "YAML_SUFFIXES",
    "DAEMON_KEYS",
    "WORKLOAD_KEYS",
    "RULE_KEYS",
]

T = TypeVar("T")

YAML_SUFFIXES = (".yaml", ".yml")

# --------------------------------------------------------------------------
# The vocabulary of the files. Order is the order of the documentation.

DAEMON_KEYS = (
    "poll_interval",
    "fast_poll_interval",
    "min_fast_path_interval",
    "scope",
    "workloads",
    "dry_run",
    "protect",
    "post_action_delay",
    "max_fill_rate",
    "runtime_dir",
    "log",
    "rules",
    "worker_cgroups",
    "oom_score_adj",
    "mlock",
    "unmanaged",
    "gpu",
    "metrics_file",
)
UNMANAGED_KEYS = ("name", "cmdline", "user", "cgroup", "priority")
WORKLOAD_KEYS = (
    "name",
    "command",
    "replicas",
    "priority",
    "user",
    "group",
    "working_dir",
    "environment",
    "limits",
    "grace",
    "stop_signal",
    "rules",
    "restart",
    "restart_when_blocked",
    "recycle",
    "trial_timeout",
    "heartbeat_timeout",
    "growth_window",
    "reclaim_interval",
    "oom_score_adj",
    "gpus",
)
RULE_KEYS = ("name", "when", "for", "action", "release", "grace")
LOG_KEYS = ("format", "level")
LIMITS_KEYS = ("memory", "runtime", "memory_high", "swap", "cpu", "gpu_memory")
RESTART_KEYS = ("policy", "backoff", "budget", "planned")
BRAKE_KEYS = ("refusals", "after")
RECYCLE_KEYS = ("max_trials", "max_age", "jitter")

SCOPES = ("auto", "host", "cgroup")
LOG_FORMATS = ("auto", "console", "json", "journald")
LOG_LEVELS = ("debug", "info", "warning", "error")
RESTART_MODES = ("on-failure", "always", "never")
ACTIONS = tuple(a.value for a in ActionKind)
# Actions that wait for a grace period between the stop signal and SIGKILL.
GRACE_ACTIONS = (ActionKind.TERMINATE, ActionKind.RESTART)

MAX_REPLICAS = 1024
_WORKLOAD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# POSIX-ish user/group names (no leading '-'; a trailing '$' for machine accounts) or a numeric id.
_ACCOUNT = re.compile(r"^(?:[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*\$?)$")

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _default(cls: type, name: str) -> Any:
    """The dataclass default of ``cls.name`` (policy.py is the one place defaults live)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no default for {name!r}")


# --------------------------------------------------------------------------
# Issues


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file: where (file, 1-based line, key path) and what was expected.

    ``line`` is 0 when the problem has no line (a file that cannot be read);
    ``path`` is "" when it concerns the whole file.
    """

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line > 0 else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration has problems; ``errors`` lists all of them, of all files."""

    def __init__(self, errors: Iterable[ConfigIssue]) -> None:
        self.errors: list[ConfigIssue] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __reduce__(self) -> tuple:
        return (ConfigError, (self.errors,))


# --------------------------------------------------------------------------
# Describing values in messages


def _describe(value: object) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, _Unsupported):
        return repr(value)
    return f"a {type(value).__name__} ({value})"


def _describe_node(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a value"


def _choice_error(value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    msg = f"expected one of {', '.join(choices)}, got {_describe(value)}"
    if isinstance(value, str):
        hint = suggest(value, choices)
        if hint:
            msg += f" (did you mean {hint!r}?)"
    return msg


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------
# Scalar parsers: each takes a constructed YAML scalar and returns the value or
# raises ValueError whose message says what was expected.


def _p_duration(minimum: float = 0.0, strict: bool = False) -> Callable[[object], float]:
    def parse(v: object) -> float:
        s = parse_duration(v)
        if s < minimum or (strict and s <= minimum):
            if strict and minimum == 0:
                raise ValueError(f"expected a duration greater than zero, got {_describe(v)}")
            raise ValueError(f"expected a duration of at least {minimum:g}s, got {_describe(v)}")
        return s

    return parse


def _p_size_positive(v: object) -> int:
    n = parse_size(v)
    if n <= 0:
        raise ValueError(f"expected a size greater than zero, got {_describe(v)}")
    return n


_RATE_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _p_rate(v: object) -> float:
    """A rate in bytes per second: a size (per second) or SIZE/s, SIZE/m, SIZE/h."""
    per = 1.0
    size: object = v
    if isinstance(v, str) and "/" in v:
        size, _, unit = v.rpartition("/")
        if unit.strip() not in _RATE_PER:
            raise ValueError(f"expected a size per second such as 6000MiB (or 6000MiB/s), got {_describe(v)}")
        per = _RATE_PER[unit.strip()]
    try:
        n = parse_size(size)
    except UnitError:
        raise ValueError(f"expected a size per second such as 6000MiB (or 6000MiB/s), got {_describe(v)}") from None
    if n <= 0:
        raise ValueError(f"expected a rate greater than zero, got {_describe(v)}")
    return n / per


def _p_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_describe(v)}")
    return v


def _p_int(lo: int | None = None, hi: int | None = None) -> Callable[[object], int]:
    def parse(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a whole number, got {_describe(v)}")
        if lo is not None and v < lo:
            raise ValueError(f"expected a whole number of at least {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"expected a whole number of at most {hi}, got {v}")
        return v

    return parse


def _p_choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if not isinstance(v, str) or v not in choices:
            raise ValueError(_choice_error(v, choices))
        return v

    return parse


def _p_text(what: str = "a string") -> Callable[[object], str]:
    def parse(v: object) -> str:
        if not isinstance(v, str):
            raise ValueError(f"expected {what}, got {_describe(v)}")
        if not v.strip():
            raise ValueError(f"expected {what}, got an empty string")
        return v

    return parse


def _p_path(what: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        text = _p_text(what)(v)
        if text.startswith("~"):
            raise ValueError(f"expected {what}; '~' is not expanded, write the full path, got {_describe(v)}")
        return text

    return parse


def _p_workload_name(v: object) -> str:
    if not isinstance(v, str) or not _WORKLOAD_NAME.match(v):
        raise ValueError(
            f"expected a workload name made of letters, digits, '_', '.' and '-', got {_describe(v)}"
        )
    return v


def _p_account(kind: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return str(v)
        if not isinstance(v, str) or not _ACCOUNT.match(v):
            raise ValueError(f"expected a {kind} name such as ml, or a numeric id, got {_describe(v)}")
        return v

    return parse


def _p_signal(v: object) -> int:
    expected = "expected a signal name or number such as SIGTERM, SIGINT, TERM or 15"
    num: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        num = v
    elif isinstance(v, str):
        text = v.strip().upper()
        if text.isdigit():
            num = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            try:
                num = int(_signal.Signals[name])
            except KeyError:
                names = [s.name for s in _signal.Signals]
                hint = suggest(name, names)
                raise ValueError(
                    f"{expected}, got {_describe(v)}" + (f" (did you mean {hint!r}?)" if hint else "")
                ) from None
    if num is None or num not in _signal.valid_signals():
        raise ValueError(f"{expected}, got {_describe(v)}")
    if num == int(_signal.SIGSTOP):
        raise ValueError("SIGSTOP only pauses a process and cannot stop a worker; use SIGTERM or SIGINT")
    return num


def _p_backoff(v: object) -> tuple[float, float]:
    expected = "expected a backoff range such as 1s..60s (or one duration such as 5s)"
    if not isinstance(v, str):
        raise ValueError(f"{expected}, got {_describe(v)}")
    lo_text, sep, hi_text = v.partition("..")
    try:
        lo = parse_duration(lo_text)
        hi = parse_duration(hi_text) if sep else lo
    except UnitError:
        raise ValueError(f"{expected}, got {_describe(v)}") from None
    if hi < lo:
        raise ValueError(f"the backoff minimum {lo_text.strip()} is longer than its maximum {hi_text.strip()}")
    if lo <= 0:
        raise ValueError(f"expected a backoff minimum greater than zero (a wait that doubles from 0 stays 0), "
                         f"got {_describe(v)}")
    return lo, hi


def _p_budget(v: object) -> tuple[int, float]:
    expected = "expected a restart budget such as 10/10m (at most 10 restarts in 10 minutes)"
    if not isinstance(v, str):
        raise ValueError(f"{expected}, got {_describe(v)}")
    count_text, sep, window_text = v.partition("/")
    count_text = count_text.strip()
    if not sep or not count_text.isdigit():
        raise ValueError(f"{expected}, got {_describe(v)}")
    count = int(count_text)
    if count < 1:
        raise ValueError(f"expected a restart budget of at least 1 restart, got {_describe(v)}")
    try:
        window = parse_duration(window_text)
    except UnitError:
        raise ValueError(f"{expected}, got {_describe(v)}") from None
    if window <= 0:
        raise ValueError(f"expected a budget window greater than zero, got {_describe(v)}")
    return count, window


# --------------------------------------------------------------------------
# One file being read


class _Unsupported:
    """A scalar with a YAML tag memguard does not read (``!foo 5``)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"a value with the unsupported YAML tag {self.tag}"


class _Bad:
    """A value that was present but wrong (its error is already recorded)."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()

_Entries = dict  # key -> (key node, value node)


class _File:
    """Reads one YAML file's node tree and records its issues."""

    def __init__(self, display: str) -> None:
        self.display = display
        self.dir = os.path.dirname(os.path.abspath(display))
        self.issues: list[ConfigIssue] = []
        self.root: Node | None = None
        self._constructor = SafeConstructor()

    # -- reading --------------------------------------------------------

    def load(self) -> Node | None:
        """Read and compose the file; report unreadable files and YAML syntax errors."""
        try:
            with open(self.display, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            self.issue(0, "", "no such file")
            return None
        except IsADirectoryError:
            self.issue(0, "", "expected a YAML file, got a directory")
            return None
        except OSError as e:
            self.issue(0, "", f"cannot be read: {e.strerror or e}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.issue(data.count(b"\n", 0, e.start) + 1, "", "is not UTF-8 text")
            return None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 0
            what = e.problem or "syntax error"
            if e.context:
                what = f"{e.context}, {what}"
                if e.context_mark is not None and e.problem_mark is not None \
                        and e.context_mark.line != e.problem_mark.line:
                    what += f" (started at line {e.context_mark.line + 1})"
            self.issue(line, "", f"invalid YAML: {what}")
            return None
        except yaml.YAMLError as e:
            self.issue(0, "", f"invalid YAML: {e}")
            return None
        if root is None:
            self.issue(1, "", "the file is empty: expected a mapping of keys such as 'name: value'")
            return None
        self.root = root
        return root

    # -- recording ------------------------------------------------------

    def issue(self, where: Node | int, path: str, message: str) -> None:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        self.issues.append(ConfigIssue(self.display, line, path, message))

    def source(self, node: Node) -> str:
        return f"{self.display}:{node.start_mark.line + 1}"

    # -- node helpers ---------------------------------------------------

    def construct(self, node: ScalarNode) -> object:
        """The Python value of a scalar (an :class:`_Unsupported` for an unknown YAML tag)."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            return _Unsupported(node.tag)

    @staticmethod
    def is_null(node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def _pairs(self, node: MappingNode, seen: set[int] | None = None) -> list[tuple[Node, Node]]:
        """The key/value pairs of a mapping with ``<<`` merges applied (explicit keys win)."""
        seen = seen if seen is not None else set()
        if id(node) in seen:
            return []
        seen.add(id(node))
        explicit: list[tuple[Node, Node]] = []
        merged: list[tuple[Node, Node]] = []
        for k, v in node.value:
            if k.tag == _MERGE_TAG:
                sources = v.value if isinstance(v, SequenceNode) else [v]
                for src in sources:
                    if isinstance(src, MappingNode):
                        merged.extend(self._pairs(src, seen))
                    else:
                        self.issue(src, "<<", f"expected a mapping to merge, got {_describe_node(src)}")
            else:
                explicit.append((k, v))
        names = {k.value for k, _ in explicit if isinstance(k, ScalarNode)}
        out = list(explicit)
        for k, v in merged:
            if isinstance(k, ScalarNode) and k.value not in names:
                names.add(k.value)
                out.append((k, v))
        return out

    def mapping(
        self,
        node: Node,
        path: str,
        allowed: tuple[str, ...] | None,
        *,
        what: str = "a mapping of keys",
        elsewhere: Mapping[str, str] | None = None,
    ) -> _Entries | None:
        """Read a mapping node: unknown and duplicate keys are errors. ``allowed=None`` takes any key.

        A null node reads as an empty mapping. Returns None if ``node`` is no mapping.
        """
        if self.is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            got = _describe(self.construct(node)) if isinstance(node, ScalarNode) else _describe_node(node)
            self.issue(node, path, f"expected {what}, got {got}")
            return None
        out: _Entries = {}
        for knode, vnode in self._pairs(node):
            key = self.construct(knode) if isinstance(knode, ScalarNode) else None
            if not isinstance(key, str):
                shown = _describe(key) if isinstance(knode, ScalarNode) else _describe_node(knode)
                self.issue(knode, path, f"expected a key name, got {shown}")
                continue
            kpath = _join(path, key)
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.issue(knode, kpath, f"duplicate key {key!r} (first given at line {first}); give it once")
                continue
            if allowed is not None and key not in allowed:
                self.issue(knode, kpath, self._unknown_key(key, allowed, elsewhere))
                continue
            out[key] = (knode, vnode)
        return out

    @staticmethod
    def _unknown_key(key: str, allowed: tuple[str, ...], elsewhere: Mapping[str, str] | None) -> str:
        msg = f"unknown key {key!r}"
        if elsewhere and key in elsewhere:
            return f"{msg}: {elsewhere[key]}"
        hint = suggest(key, allowed)
        if hint:
            return f"{msg} (did you mean {hint!r}?)"
        return f"{msg}; known keys here: {', '.join(allowed)}"

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        """Read a list node; a null node reads as an empty list. None if ``node`` is no list."""
        if self.is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            got = _describe(self.construct(node)) if isinstance(node, ScalarNode) else _describe_node(node)
            self.issue(node, path, f"expected {what}, got {got}")
            return None
        return list(node.value)

    def value(self, node: Node, path: str, parse: Callable[[object], T], expected: str) -> T:
        """Read a scalar and convert it with ``parse``; returns BAD after recording an error."""
        if not isinstance(node, ScalarNode):
            self.issue(node, path, f"expected {expected}, got {_describe_node(node)}")
            return BAD
        raw = self.construct(node)
        try:
            return parse(raw)
        except (UnitError, ValueError) as e:
            self.issue(node, path, str(e))
            return BAD

    def get(
        self,
        entries: _Entries,
        key: str,
        path: str,
        parse: Callable[[object], T],
        expected: str,
    ) -> T | None:
        """The parsed value of an optional key: None when absent, BAD when wrong."""
        if key not in entries:
            return None
        return self.value(entries[key][1], _join(path, key), parse, expected)

    def line_of(self, entries: _Entries, key: str) -> int | None:
        return entries[key][1].start_mark.line + 1 if key in entries else None


def _ok(v: object) -> bool:
    """Present and valid."""
    return v is not None and v is not BAD


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, path))


# --------------------------------------------------------------------------
# Rules


@dataclass
class _RuleDraft:
    """A rule read from a file, before the checks that need the rest of the file."""

    index: int
    node: Node
    entries: _Entries
    rule: Rule | None  # None when the rule itself has errors


_RULE_EXAMPLE = 'a rule such as {when: "memory.available < 10%", action: block}'
_RULE_ELSEWHERE = {
    "fire": "did you mean 'when'?",
    "if": "did you mean 'when'?",
    "then": "did you mean 'action'?",
    "stop_signal": "a rule has no stop signal; set stop_signal on the workload",
    "limits": "limits belong to the workload, not to a rule",
}


def _read_rules(f: _File, node: Node, scope: str) -> list[_RuleDraft]:
    """Read a ``rules:`` list of scope "system" or "worker"."""
    items = f.sequence(node, "rules", f"a list of rules, e.g. - {_RULE_EXAMPLE}")
    if items is None:
        return []
    drafts: list[_RuleDraft] = []
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"rules[{i}]"
        before = len(f.issues)
        entries = f.mapping(item, path, RULE_KEYS, what=_RULE_EXAMPLE, elsewhere=_RULE_ELSEWHERE)
        if entries is None:
            continue
        name = f.get(entries, "name", path, _p_text("a rule name"), "a rule name")
        if _ok(name):
            if name in names:
                f.issue(entries["name"][1], f"{path}.name",
                        f"rule name {name!r} is already used by the rule at line {names[name]}")
            else:
                names[name] = entries["name"][1].start_mark.line + 1

        when_text: Any = None
        when: Expr | None = None
        if "when" not in entries:
            f.issue(item, f"{path}.when", 'missing: every rule needs a condition, e.g. when: "memory.available < 10%"')
        else:
            when_text, when = _read_expr(f, entries["when"][1], f"{path}.when", scope)

        action = None
        if "action" not in entries:
            f.issue(item, f"{path}.action", f"missing: every rule needs an action, one of {', '.join(ACTIONS)}")
        else:
            action = f.value(entries["action"][1], f"{path}.action", _p_choice(ACTIONS), "an action")
            action = ActionKind(action) if _ok(action) else None

        for_s = f.get(entries, "for", path, _p_duration(0.0), DURATION_EXPECTED)
        release_text: Any = None
        release: Expr | None = None
        if "release" in entries:
            release_text, release = _read_expr(f, entries["release"][1], f"{path}.release", scope)

        grace_s = f.get(entries, "grace", path, _p_duration(0.0), DURATION_EXPECTED)
        if "grace" in entries and action is not None and action not in GRACE_ACTIONS:
            f.issue(entries["grace"][0], f"{path}.grace",
                    f"grace has no meaning for action {action.value}: only terminate and restart wait "
                    "a grace period between the stop signal and SIGKILL")

        rule = None
        if len(f.issues) == before and when is not None and action is not None:
            rule = Rule(
                name=name if _ok(name) else f"rules[{i}]",
                when=when,
                when_text=when_text,
                action=action,
                scope=scope,
                for_s=for_s if _ok(for_s) else _default(Rule, "for_s"),
                release=release,
                release_text=release_text,
                grace_s=grace_s if _ok(grace_s) else _default(Rule, "grace_s"),
                source=f.source(item),
            )
        drafts.append(_RuleDraft(i, item, entries, rule))
    return drafts


def _read_expr(f: _File, node: Node, path: str, scope: str) -> tuple[str | None, Expr | None]:
    if not isinstance(node, ScalarNode):
        f.issue(node, path, f'expected an expression such as "memory.available < 10%", got {_describe_node(node)}')
        return None, None
    text = f.construct(node)
    try:
        expr = parse_expr(text, scope)
    except ExprError as e:
        f.issue(node, path, str(e))
        return None, None
    problems = [p for p in (_comparison_problem(c) for c in comparisons(expr)) if p]
    if problems:
        for p in problems:
            f.issue(node, path, p)
        return None, None
    return str(text), expr


_BARE_NUMBER_END = re.compile(r"(?:^|[\s<>=!])([0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")


def _comparison_problem(c: Comparison) -> str | None:
    """Comparisons that parse but cannot mean what was written: a guard that never fires."""
    spec = SIGNALS.get(c.signal)
    if spec is None:
        return None
    m = _BARE_NUMBER_END.search(c.text)
    if spec.unit == "bytes" and c.unit == "bytes" and m and c.threshold != 0:
        n = m.group(1)
        pct = f" or a percent sign ({n}%)" if float(n) <= 100 and spec.percent_ok else ""
        return (f"{c.text!r} compares a size with a bare number, which would mean {n} bytes: "
                f"add a unit ({n}MiB, {n}GiB){pct}")
    if c.unit == "percent" and c.threshold > 100 and spec.percent_of != "limits.memory":
        return f"{c.text!r} is decided in advance: {c.signal} is never above 100%"
    return None


# --------------------------------------------------------------------------
# Workload files

_WORKLOAD_ELSEWHERE = {k: "it belongs in the daemon file (memguard.yaml)" for k in DAEMON_KEYS if k not in WORKLOAD_KEYS}
_WORKLOAD_ELSEWHERE.update({
    "when": "rule keys belong in an entry of rules:",
    "action": "rule keys belong in an entry of rules:",
    "release": "rule keys belong in an entry of rules:",
    "memory": "did you mean limits.memory?",
    "runtime": "did you mean limits.runtime?",
    "backoff": "did you mean restart.backoff?",
    "budget": "did you mean restart.budget?",
    "env": "did you mean 'environment'?",
    "cwd": "did you mean 'working_dir'?",
    "directory": "did you mean 'working_dir'?",
})
_DAEMON_ELSEWHERE = {k: "it belongs in a workload file (in the directory named by workloads:)"
                     for k in WORKLOAD_KEYS if k not in DAEMON_KEYS}
_DAEMON_ELSEWHERE.update({
    "when": "rule keys belong in an entry of rules:",
    "action": "rule keys belong in an entry of rules:",
    "release": "rule keys belong in an entry of rules:",
    "format": "did you mean log.format?",
    "level": "did you mean log.level?",
    "log_level": "did you mean log.level?",
    "log_format": "did you mean log.format?",
})

_COMMAND_EXAMPLE = "a list of strings such as [python3, train.py]"


def _read_command(f: _File, node: Node) -> tuple[str, ...] | None:
    if f.is_null(node):
        f.issue(node, "command", f"expected {_COMMAND_EXAMPLE}, got nothing")
        return None
    if isinstance(node, ScalarNode) and isinstance(f.construct(node), str):
        text = f.construct(node)
        try:
            words = shlex.split(text)
        except ValueError:
            words = text.split()
        shown = yaml.safe_dump(words or ["python3", "train.py"], default_flow_style=True, width=1 << 30).strip()
        f.issue(node, "command",
                f"expected {_COMMAND_EXAMPLE}, got the single string {text!r}: "
                f"write it as a list, e.g. command: {shown}")
        return None
    items = f.sequence(node, "command", _COMMAND_EXAMPLE)
    if items is None:
        return None
    if not items:
        f.issue(node, "command", f"expected {_COMMAND_EXAMPLE}, got an empty list")
        return None
    out: list[str] = []
    ok = True
    for i, item in enumerate(items):
        path = f"command[{i}]"
        if isinstance(item, ScalarNode):
            v = f.construct(item)
            if not isinstance(v, str) and v is not None:
                f.issue(item, path, f"expected a string, got {_describe(v)}: put it in quotes, e.g. \"{item.value}\"")
                ok = False
                continue
        s = f.value(item, path, _p_text("a non-empty string"), "a non-empty string")
        if s is BAD:
            ok = False
        else:
            out.append(s)
    return tuple(out) if ok else None


def _read_environment(f: _File, node: Node) -> tuple[tuple[str, str], ...] | None:
    entries = f.mapping(node, "environment", None, what='a mapping of variables such as {OMP_NUM_THREADS: "4"}')
    if entries is None:
        return None
    out: list[tuple[str, str]] = []
    ok = True
    for key, (knode, vnode) in entries.items():
        path = f"environment.{key}"
        if not _ENV_NAME.match(key):
            f.issue(knode, path, f"expected a variable name of letters, digits and '_', got {key!r}")
            ok = False
            continue
        if isinstance(vnode, ScalarNode):
            v = f.construct(vnode)
            if not isinstance(v, str):
                if v is None:
                    f.issue(vnode, path, f'expected a string, got nothing: write {key}: "" for an empty value')
                else:
                    f.issue(vnode, path, f'expected a string, got {_describe(v)}: write it in quotes: '
                                         f'{key}: "{vnode.value}"')
                ok = False
                continue
            out.append((key, v))
        else:
            f.issue(vnode, path, f"expected a string, got {_describe_node(vnode)}")
            ok = False
    return tuple(sorted(out)) if ok else None


def _read_limits(f: _File, node: Node) -> tuple[Limits | None, bool]:
    """The limits (None on error) and whether limits.memory is set."""
    entries = f.mapping(node, "limits", LIMITS_KEYS, what="a mapping such as {memory: 8GiB, runtime: 12h}")
    if entries is None:
        return None, True  # do not pile a second error on the rules
    memory = f.get(entries, "memory", "limits", _p_size_positive, SIZE_EXPECTED)
    runtime = f.get(entries, "runtime", "limits", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    high = f.get(entries, "memory_high", "limits", _p_size_positive, SIZE_EXPECTED)
    swap = f.get(entries, "swap", "limits", _p_size_nonneg, SIZE_EXPECTED)
    cpu = f.get(entries, "cpu", "limits", _p_cores, "a number of cores such as 2 or 0.5")
    gpu_memory = f.get(entries, "gpu_memory", "limits", _p_size_positive, SIZE_EXPECTED)
    has_memory = "memory" in entries
    if BAD in (memory, runtime, high, swap, cpu, gpu_memory):
        return None, has_memory
    if high is not None and memory is not None and high > memory:
        f.issue(entries["memory_high"][1], "limits.memory_high",
                "must not be above limits.memory (the throttle point comes before the hard limit)")
        return None, has_memory
    base = Limits()
    return Limits(
        memory_bytes=memory if memory is not None else base.memory_bytes,
        runtime_s=runtime if runtime is not None else base.runtime_s,
        memory_high_bytes=high,
        swap_bytes=swap,
        cpu=cpu,
        gpu_memory_bytes=gpu_memory,
    ), has_memory


def _p_regex(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a regular expression, got {_describe(v)}")
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"expected a regular expression, got {v!r}: {e}") from None
    return v


def _read_unmanaged(f: "_File", node: Node) -> tuple[UnmanagedMatch, ...] | None:
    items = f.sequence(node, "unmanaged", "a list such as [{cmdline: 'python.*polars', user: alice}]")
    if items is None:
        return None
    out = []
    bad = False
    for i, item in enumerate(items):
        path = f"unmanaged[{i}]"
        entries = f.mapping(item, path, UNMANAGED_KEYS, what="a mapping such as {cmdline: 'polars', user: alice}")
        if entries is None:
            bad = True
            continue
        cmdline = f.get(entries, "cmdline", path, _p_regex, "a regular expression")
        user = f.get(entries, "user", path, _p_text("a user name"), "a user name")
        cgroup = f.get(entries, "cgroup", path, _p_regex, "a regular expression")
        priority = f.get(entries, "priority", path, _p_int(), "a whole number")
        name = f.get(entries, "name", path, _p_text("a name"), "a name")
        if BAD in (cmdline, user, cgroup, priority, name):
            bad = True
            continue
        if cmdline is None and user is None and cgroup is None:
            f.issue(item, path, "expected at least one of cmdline:, user:, cgroup: (matching every process is "
                                "never what you want)")
            bad = True
            continue
        out.append(UnmanagedMatch(cmdline=cmdline, user=user, cgroup=cgroup, priority=priority or 0,
                                  name=name or f"unmanaged[{i}]"))
    return None if bad else tuple(out)


def _p_gpu(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return str(v)
    if isinstance(v, str) and re.fullmatch(r"[0-9]+|(GPU|MIG)-[0-9A-Za-z/-]+", v):
        return v
    raise ValueError(f"expected a GPU index such as 0 or a UUID such as GPU-5fa9..., got {_describe(v)}")


def _p_autooff(v: object) -> str:
    if v is False:
        return "off"
    return _p_choice(("auto", "off"))(v)


def _p_tristate(v: object) -> str:
    """auto, on or off; YAML reads a bare on/off/yes/no/true/false as a boolean, which is accepted too."""
    if isinstance(v, bool):
        return "on" if v else "off"
    return _p_choice(("auto", "on", "off"))(v)


def _p_size_nonneg(v: object) -> int:
    return parse_size(v)


def _p_cores(v: object) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 4096:
        return float(v)
    raise UnitError(f"expected a number of cores such as 2 or 0.5, got {v!r}")


def _read_restart(f: _File, node: Node) -> RestartPolicy | None:
    entries = f.mapping(node, "restart", RESTART_KEYS,
                        what="a mapping such as {policy: on-failure, backoff: 1s..60s, budget: 10/10m}")
    if entries is None:
        return None
    base = RestartPolicy()
    mode = f.get(entries, "policy", "restart", _p_choice(RESTART_MODES), "a restart policy")
    backoff = f.get(entries, "backoff", "restart", _p_backoff, "a backoff range")
    budget = f.get(entries, "budget", "restart", _p_budget, "a restart budget")
    planned = f.get(entries, "planned", "restart", _p_budget, "a planned-restart limit")
    if BAD in (mode, backoff, budget, planned):
        return None
    return RestartPolicy(
        mode=mode if mode is not None else base.mode,
        backoff_min_s=backoff[0] if backoff is not None else base.backoff_min_s,
        backoff_max_s=backoff[1] if backoff is not None else base.backoff_max_s,
        budget_count=budget[0] if budget is not None else base.budget_count,
        budget_window_s=budget[1] if budget is not None else base.budget_window_s,
        planned_count=planned[0] if planned is not None else base.planned_count,
        planned_window_s=planned[1] if planned is not None else base.planned_window_s,
    )


def _read_brake(f: _File, node: Node) -> Brake | None:
    """``restart_when_blocked: true``, ``false``, or ``{after: 30s}``; ``refusals`` is read but ignored
    (the core says so in the log), so files written for the old brake still load."""
    if isinstance(node, ScalarNode) and not f.is_null(node):
        on = f.value(node, "restart_when_blocked", _p_bool, "true, false or a mapping such as {after: 30s}")
        return None if on is BAD else Brake(enabled=on)
    entries = f.mapping(node, "restart_when_blocked", BRAKE_KEYS, what="true, false or a mapping such as {after: 30s}")
    if entries is None:
        return None
    refusals = f.get(entries, "refusals", "restart_when_blocked", _p_int(1, None), "a whole number of refusals")
    after = f.get(entries, "after", "restart_when_blocked", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    if BAD in (refusals, after):
        return None
    if refusals is None and after is None:
        f.issue(node, "restart_when_blocked", "expected after: (a duration), e.g. {after: 30s}, or true")
        return None
    return Brake(enabled=True, after_s=after if after is not None else Brake().after_s, refusals=refusals)


def _p_fraction(v: object) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        pct = parse_percent(v)
        if pct > 100:
            raise UnitError(f"expected a percentage between 0% and 100%, got {v!r}")
        return pct / 100.0
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1:
        return float(v)
    raise UnitError(f"expected a fraction such as 10% or 0.1, got {v!r}")


def _read_recycle(f: _File, node: Node) -> Recycle | None:
    entries = f.mapping(node, "recycle", RECYCLE_KEYS, what="a mapping such as {max_trials: 50, max_age: 60m}")
    if entries is None:
        return None
    max_trials = f.get(entries, "max_trials", "recycle", _p_int(1, None), "a whole number of trials")
    max_age = f.get(entries, "max_age", "recycle", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    jitter = f.get(entries, "jitter", "recycle", _p_fraction, "a fraction such as 10%")
    if BAD in (max_trials, max_age, jitter):
        return None
    if max_trials is None and max_age is None:
        f.issue(node, "recycle", "expected max_trials:, max_age: or both, e.g. {max_trials: 50, max_age: 60m}")
        return None
    return Recycle(max_trials=max_trials, max_age_s=max_age,
                   jitter=jitter if jitter is not None else Recycle().jitter)


def _read_workload(f: _File, root: Node) -> WorkloadPolicy | None:
    """Build a WorkloadPolicy from a composed workload file; None when it has errors."""
    before = len(f.issues)
    entries = f.mapping(root, "", WORKLOAD_KEYS, what="a mapping of keys such as 'name: trials'",
                        elsewhere=_WORKLOAD_ELSEWHERE)
    if entries is None:
        return None

    if "name" in entries:
        name = f.get(entries, "name", "", _p_workload_name, "a workload name")
    else:
        stem = os.path.splitext(os.path.basename(f.display))[0]
        if _WORKLOAD_NAME.match(stem):
            name = stem
        else:
            f.issue(root, "name", f"missing, and the file name {stem!r} cannot serve as one: "
                                  "set name: to letters, digits, '_', '.' and '-'")
            name = BAD

    command = None
    if "command" not in entries:
        f.issue(root, "command", f"missing: every workload needs a command, {_COMMAND_EXAMPLE}")
    else:
        command = _read_command(f, entries["command"][1])

    replicas = f.get(entries, "replicas", "", _p_int(1, MAX_REPLICAS), "a whole number")
    priority = f.get(entries, "priority", "", _p_int(), "a whole number")
    user = f.get(entries, "user", "", _p_account("user"), "a user name")
    group = f.get(entries, "group", "", _p_account("group"), "a group name")
    working_dir = f.get(entries, "working_dir", "", _p_path("a directory path"), "a directory path")
    environment = _read_environment(f, entries["environment"][1]) if "environment" in entries else ()
    limits, has_memory = _read_limits(f, entries["limits"][1]) if "limits" in entries else (Limits(), False)
    grace = f.get(entries, "grace", "", _p_duration(0.0), DURATION_EXPECTED)
    stop_signal = f.get(entries, "stop_signal", "", _p_signal, "a signal")
    restart = _read_restart(f, entries["restart"][1]) if "restart" in entries else RestartPolicy()
    drafts = _read_rules(f, entries["rules"][1], "worker") if "rules" in entries else []
    brake = _read_brake(f, entries["restart_when_blocked"][1]) if "restart_when_blocked" in entries else Brake()
    recycle = _read_recycle(f, entries["recycle"][1]) if "recycle" in entries else Recycle()
    trial_timeout = f.get(entries, "trial_timeout", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    heartbeat_timeout = f.get(entries, "heartbeat_timeout", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    growth_window = f.get(entries, "growth_window", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    reclaim_interval = f.get(entries, "reclaim_interval", "", _p_duration(0.0), DURATION_EXPECTED)
    oom_adj = f.get(entries, "oom_score_adj", "", _p_int(-1000, 1000), "a whole number from -1000 to 1000")
    gpus: tuple[str, ...] | None = ()
    if "gpus" in entries:
        items = f.sequence(entries["gpus"][1], "gpus", "a list of GPU indexes or UUIDs such as [0, 1]")
        if items is None:
            gpus = None
        else:
            vals = [f.value(n, f"gpus[{i}]", _p_gpu, "a GPU index or UUID") for i, n in enumerate(items)]
            gpus = None if BAD in vals else tuple(vals)

    # A percentage of worker.gpu_memory is a percentage of limits.gpu_memory.
    if limits is not None and limits.gpu_memory_bytes is None:
        for d in drafts:
            if d.rule is None:
                continue
            for c in comparisons(d.rule.when):
                if c.signal == "worker.gpu_memory" and c.unit == "percent":
                    f.issue(d.entries["when"][1], f"rules[{d.index}].when",
                            f"{c.text!r} is a percentage of limits.gpu_memory, which this workload does not set: "
                            "set limits.gpu_memory, or compare with a size such as 6GiB")
    # A percentage of worker.memory is a percentage of limits.memory.
    if not has_memory:
        for d in drafts:
            for key in ("when", "release"):
                if key not in d.entries or d.rule is None:
                    continue
                expr = d.rule.when if key == "when" else d.rule.release
                if expr is None:
                    continue
                for c in comparisons(expr):
                    spec = SIGNALS.get(c.signal)
                    if c.unit == "percent" and spec is not None and spec.percent_of == "limits.memory":
                        f.issue(d.entries[key][1], f"rules[{d.index}].{key}",
                                f"{c.text!r} is a percentage of limits.memory, which this workload does not set: "
                                f"set limits.memory, or compare with a size such as 6GiB")
                        break

    if len(f.issues) != before or command is None or name is BAD:
        return None
    return WorkloadPolicy(
        name=name,
        command=command,
        replicas=replicas if replicas is not None else _default(WorkloadPolicy, "replicas"),
        priority=priority if priority is not None else _default(WorkloadPolicy, "priority"),
        user=user,
        group=group,
        working_dir=_resolve(f.dir, working_dir) if working_dir is not None else None,
        environment=environment or (),
        limits=limits or Limits(),
        rules=tuple(d.rule for d in drafts if d.rule is not None),
        restart=restart or RestartPolicy(),
        grace_s=grace if grace is not None else _default(WorkloadPolicy, "grace_s"),
        stop_signal=stop_signal if stop_signal is not None else _default(WorkloadPolicy, "stop_signal"),
        oom_score_adj=oom_adj if oom_adj is not None else _default(WorkloadPolicy, "oom_score_adj"),
        gpus=gpus or (),
        brake=brake or Brake(),
        recycle=recycle or Recycle(),
        trial_timeout_s=trial_timeout,
        heartbeat_timeout_s=heartbeat_timeout,
        growth_window_s=growth_window if growth_window is not None else _default(WorkloadPolicy, "growth_window_s"),
        reclaim_interval_s=(reclaim_interval if reclaim_interval is not None
                            else _default(WorkloadPolicy, "reclaim_interval_s")),
        source=f"{f.display}:1",
    )


# --------------------------------------------------------------------------
# The daemon file


def _read_daemon(f: _File, root: Node) -> tuple[dict[str, Any] | None, str | None, Node | None]:
    """The DaemonPolicy fields of a composed daemon file (None when it has errors),
    the workload directory (as a path relative to the current directory, or
    absolute where the file gave it so) and the node that named it."""
    before = len(f.issues)
    entries = f.mapping(root, "", DAEMON_KEYS, what="a mapping of keys such as 'poll_interval: 1s'",
                        elsewhere=_DAEMON_ELSEWHERE)
    if entries is None:
        return None, None, None
    base = DaemonPolicy()
    poll = f.get(entries, "poll_interval", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    fast = f.get(entries, "fast_poll_interval", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    min_fast = f.get(entries, "min_fast_path_interval", "", _p_duration(0.0, strict=True), DURATION_EXPECTED)
    scope = f.get(entries, "scope", "", _p_choice(SCOPES), "a scope")
    workloads = f.get(entries, "workloads", "", _p_path("a directory path such as workloads.d/"), "a directory")
    dry_run = f.get(entries, "dry_run", "", _p_bool, "true or false")
    delay = f.get(entries, "post_action_delay", "", _p_duration(0.0), DURATION_EXPECTED)
    fill = f.get(entries, "max_fill_rate", "", _p_rate, "a size per second")
    runtime_dir = f.get(entries, "runtime_dir", "", _p_path("a directory path"), "a directory path")
    worker_cgroups = f.get(entries, "worker_cgroups", "", _p_tristate, "auto, on or off")
    own_oom = f.get(entries, "oom_score_adj", "", _p_int(-1000, 1000), "a whole number from -1000 to 1000")
    mlock = f.get(entries, "mlock", "", _p_bool, "true or false")
    gpu = f.get(entries, "gpu", "", _p_autooff, "auto or off")
    metrics_file = f.get(entries, "metrics_file", "", _p_path("a file path such as "
                                                              "/var/lib/node_exporter/memguard.prom"), "a file path")
    unmanaged = _read_unmanaged(f, entries["unmanaged"][1]) if "unmanaged" in entries else ()

    protect: tuple[str, ...] | None = ()
    if "protect" in entries:
        items = f.sequence(entries["protect"][1], "protect", "a list of process names such as [sshd, systemd-journald]")
        if items is None:
            protect = None
        else:
            names = [f.value(n, f"protect[{i}]", _p_text("a process name"), "a process name")
                     for i, n in enumerate(items)]
            protect = None if BAD in names else tuple(names)

    log_format = log_level = None
    if "log" in entries:
        log = f.mapping(entries["log"][1], "log", LOG_KEYS, what="a mapping such as {format: auto, level: info}")
        if log is not None:
            log_format = f.get(log, "format", "log", _p_choice(LOG_FORMATS), "a log format")
            log_level = f.get(log, "level", "log", _p_choice(LOG_LEVELS), "a log level")

    drafts = _read_rules(f, entries["rules"][1], "system") if "rules" in entries else []

    # poll_interval >= fast_poll_interval >= min_fast_path_interval > 0
    eff_poll = poll if _ok(poll) else base.poll_interval_s
    eff_fast = fast if _ok(fast) else base.fast_poll_interval_s
    eff_min = min_fast if _ok(min_fast) else base.min_fast_path_interval_s
    def shown(key: str, seconds: float) -> str:
        return f"{key} ({format_duration(seconds)}{'' if key in entries else ', the default'})"

    if BAD not in (poll, fast) and eff_fast > eff_poll:
        key = "fast_poll_interval" if "fast_poll_interval" in entries else "poll_interval"
        f.issue(entries[key][1], key, f"{shown('fast_poll_interval', eff_fast)} must not be longer than "
                                      f"{shown('poll_interval', eff_poll)}")
    if BAD not in (fast, min_fast) and eff_min > eff_fast:
        key = "min_fast_path_interval" if "min_fast_path_interval" in entries else "fast_poll_interval"
        f.issue(entries[key][1], key, f"{shown('min_fast_path_interval', eff_min)} must not be longer than "
                                      f"{shown('fast_poll_interval', eff_fast)}")

    # The workload directory as the user sees it (relative to the daemon file's
    # directory, for messages and sources) and as it is stored (absolute).
    shown_dir = _display(os.path.join(os.path.dirname(f.display), workloads)) if _ok(workloads) else None
    workloads_dir = _resolve(f.dir, workloads) if _ok(workloads) else None
    wnode = entries["workloads"][1] if "workloads" in entries else None
    if len(f.issues) != before:
        return None, shown_dir, wnode
    fields = dict(
        poll_interval_s=poll if poll is not None else base.poll_interval_s,
        fast_poll_interval_s=fast if fast is not None else base.fast_poll_interval_s,
        min_fast_path_interval_s=min_fast if min_fast is not None else base.min_fast_path_interval_s,
        scope=scope if scope is not None else base.scope,
        workloads_dir=workloads_dir,
        dry_run=dry_run if dry_run is not None else base.dry_run,
        protect=protect if protect is not None else base.protect,
        rules=tuple(d.rule for d in drafts if d.rule is not None),
        post_action_delay_s=delay if delay is not None else base.post_action_delay_s,
        max_fill_rate_bytes_per_s=fill if fill is not None else base.max_fill_rate_bytes_per_s,
        runtime_dir=_resolve(f.dir, runtime_dir) if runtime_dir is not None else base.runtime_dir,
        log_format=log_format if log_format is not None else base.log_format,
        log_level=log_level if log_level is not None else base.log_level,
        worker_cgroups=worker_cgroups if worker_cgroups is not None else base.worker_cgroups,
        oom_score_adj=own_oom if own_oom is not None else base.oom_score_adj,
        mlock=mlock if mlock is not None else base.mlock,
        unmanaged=unmanaged or (),
        gpu=gpu if gpu is not None else base.gpu,
        metrics_file=_resolve(f.dir, metrics_file) if metrics_file is not None else base.metrics_file,
        source=f"{f.display}:1",
    )
    return fields, shown_dir, wnode


# --------------------------------------------------------------------------
# Putting files together


def _yaml_files(directory: str) -> list[str]:
    """The ``*.yaml`` and ``*.yml`` files of a directory (not hidden ones), sorted by file name."""
    names = sorted(
        n for n in os.listdir(directory)
        if n.endswith(YAML_SUFFIXES) and not n.startswith(".")
        and os.path.isfile(os.path.join(directory, n))
    )
    return [os.path.join(directory, n) for n in names]


def _display(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.fspath(path))


class _Session:
    """All files of one load or check: their issues in file order."""

    def __init__(self) -> None:
        self.files: list[_File] = []

    def open(self, display: str) -> _File:
        f = _File(display)
        self.files.append(f)
        f.load()
        return f

    @property
    def issues(self) -> list[ConfigIssue]:
        out: list[ConfigIssue] = []
        for f in self.files:
            out.extend(sorted(f.issues, key=lambda i: i.line))
        return out

    def workloads(self, paths: list[str]) -> list[WorkloadPolicy]:
        """Load workload files and check their names are unique across them."""
        out: list[WorkloadPolicy] = []
        first: dict[str, str] = {}
        for p in paths:
            f = self.open(p)
            if f.root is None:
                continue
            w = _read_workload(f, f.root)
            # Uniqueness of names, also for files with other errors.
            name_node = _top_key(f, "name")
            name = w.name if w is not None else _plain_name(f, name_node)
            if name is None:
                continue
            if name in first:
                f.issue(name_node if name_node is not None else f.root, "name",
                        f"workload name {name!r} is already used by {first[name]}")
                w = None
            else:
                first[name] = f.source(name_node if name_node is not None else f.root)
            if w is not None:
                out.append(w)
        return out

    def daemon(self, path: str) -> DaemonPolicy | None:
        """Load a daemon file and every workload file of its workloads directory."""
        f = self.open(path)
        if f.root is None:
            return None
        fields, wdir, wnode = _read_daemon(f, f.root)
        workloads: list[WorkloadPolicy] = []
        if wdir is not None and wnode is not None:
            if not os.path.isdir(wdir):
                what = "is not a directory" if os.path.exists(wdir) else "does not exist"
                f.issue(wnode, "workloads", f"the workload directory {wdir} {what}")
            else:
                me = os.path.realpath(path)
                try:
                    paths = [p for p in _yaml_files(wdir) if os.path.realpath(p) != me]
                except OSError as e:
                    f.issue(wnode, "workloads", f"the workload directory {wdir} cannot be read: {e.strerror or e}")
                    paths = []
                workloads = self.workloads(paths)
        if fields is None or self.issues:
            return None
        return DaemonPolicy(**fields, workloads=tuple(workloads))


def _top_key(f: _File, key: str) -> Node | None:
    if not isinstance(f.root, MappingNode):
        return None
    for k, v in f.root.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return v
    return None


def _plain_name(f: _File, node: Node | None) -> str | None:
    if node is None:
        stem = os.path.splitext(os.path.basename(f.display))[0]
        return stem if _WORKLOAD_NAME.match(stem) else None
    if isinstance(node, ScalarNode):
        v = f.construct(node)
        return v if isinstance(v, str) and _WORKLOAD_NAME.match(v) else None
    return None


def _is_workload_root(root: Node | None) -> bool:
    """A workload file has ``command:``; failing that, more workload-only keys than daemon-only keys."""
    if not isinstance(root, MappingNode):
        return False
    keys = [k.value for k, _ in root.value if isinstance(k, ScalarNode)]
    if "command" in keys:
        return True
    workload_only = set(WORKLOAD_KEYS) - set(DAEMON_KEYS)
    daemon_only = set(DAEMON_KEYS) - set(WORKLOAD_KEYS)
    w = sum(1 for k in keys if k in workload_only or suggest(k, workload_only))
    d = sum(1 for k in keys if k in daemon_only or suggest(k, daemon_only))
    return w > d


def _peek_root(path: str) -> Node | None:
    """Compose a file only to tell which kind it is (errors are reported by the real load)."""
    try:
        with open(path, "rb") as fh:
            return yaml.compose(fh.read().decode("utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


# --------------------------------------------------------------------------
# Public API


def load_config(path: str | os.PathLike[str]) -> DaemonPolicy:
    """Load a daemon file and all workload files of its ``workloads:`` directory.

    Raises :class:`ConfigError` listing every problem of every file.
    """
    s = _Session()
    policy = s.daemon(_display(path))
    issues = s.issues
    if issues or policy is None:
        raise ConfigError(issues)
    return policy


def load_workload_file(path: str | os.PathLike[str]) -> WorkloadPolicy:
    """Load one workload file (for ``memguard run --policy FILE``); raises :class:`ConfigError`."""
    s = _Session()
    workloads = s.workloads([_display(path)])
    issues = s.issues
    if issues or not workloads:
        raise ConfigError(issues)
    return workloads[0]


def check_path(path: str | os.PathLike[str]) -> tuple[DaemonPolicy | None, list[ConfigIssue]]:
    """Validate a daemon file, a workload file or a directory; never raises for config problems.

    - a daemon file: the whole configuration, its workloads included;
    - a workload file (one with ``command:``): that file alone;
    - a directory: every ``*.yaml``/``*.yml`` file in it. Daemon files among
      them are validated with their workload directories; workload files not
      loaded by a daemon file are validated together (names unique).

    Returns ``(policy, [])`` when everything is valid, else ``(None, issues)``.
    The policy of a daemon file is what :func:`load_config` returns; where
    only workload files were checked it is a default ``DaemonPolicy`` holding
    those workloads, with ``source`` empty. A directory with several daemon
    files returns the first one's policy (by file name).
    """
    p = _display(path)
    s = _Session()
    if os.path.isdir(p):
        try:
            files = _yaml_files(p)
        except OSError as e:
            return None, [ConfigIssue(p, 0, "", f"cannot be read: {e.strerror or e}")]
        if not files:
            return None, [ConfigIssue(p, 0, "", "no *.yaml or *.yml files in this directory")]
        daemon_files = [x for x in files if not _is_workload_root(_peek_root(x))]
        policies = [s.daemon(x) for x in daemon_files]
        covered = {os.path.realpath(g.display) for g in s.files}
        loose = [x for x in files if x not in daemon_files and os.path.realpath(x) not in covered]
        loose_workloads = s.workloads(loose)
        issues = s.issues
        if issues:
            return None, issues
        if policies:
            return policies[0], []
        return DaemonPolicy(workloads=tuple(loose_workloads)), []
    if not os.path.exists(p):
        return None, [ConfigIssue(p, 0, "", "no such file or directory")]
    if _is_workload_root(_peek_root(p)):
        workloads = s.workloads([p])
        issues = s.issues
        return (None, issues) if issues else (DaemonPolicy(workloads=tuple(workloads)), [])
    policy = s.daemon(p)
    issues = s.issues
    return (None, issues) if issues or policy is None else (policy, [])
