"""The configuration loader: YAML policy files in, frozen policy objects out.

A daemon file (``memguard.yaml``) names a directory of workload files, one
YAML file per workload. Both are read with ``yaml.compose`` so every node
keeps its line, and the node tree is walked by hand: every key is known or
an error (a typo must never silently disable a guard), every value is
checked for its type and unit, and every problem of every file is collected
before anything is reported. Each problem is a :class:`ConfigIssue`::

    config/workloads.d/trials.yaml:12: rules[1].grace: expected a duration such as 100ms, 5s, 10m or 12h, got '20'

Public API: :func:`load_config`, :func:`load_workload_file`,
:func:`check_config`, :func:`check_path`, :class:`ConfigError`,
:class:`ConfigIssue`, :class:`CheckResult`, and the key tables
(:data:`DAEMON_SECTION`, :data:`WORKLOAD_SECTION`) that
:mod:`memguard.schema` turns into a JSON Schema.

One error boundary
------------------
Whatever the files hold, :func:`load_config` returns a policy or raises
:class:`ConfigError`, and :func:`check_config` returns; no other exception
leaves this module. Three layers make it so:

1. Bounds, checked before the work they bound (see "Bounds" below): file
   size and count, YAML nesting depth, list lengths, number lengths,
   expression length and depth, and the range of every size, duration and
   count. Each is refused with a message that names the bound.
2. Every value parser runs inside :meth:`_File.value`, which turns any
   exception into an issue at that key ("expected ..., got ...").
3. Each file is read inside a guard that turns anything left (a defect in
   this module) into an issue on that file, and the public functions are
   guarded the same way.

Loading is a pure function of the files (no host lookups, no global
state), so it is safe to run in a worker thread. :func:`check_config`
adds the checks against the machine it runs on (users, groups,
directories, commands, GPU sensing, cgroup version) unless told not to.

Defaults are never repeated here: they are read from the dataclasses of
:mod:`memguard.policy`.

Relative paths (``workloads``, ``runtime_dir``, ``working_dir``) resolve
against the directory of the file that names them, and are stored absolute,
so the daemon may change its working directory and still reload.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shlex
import signal as _signal
import stat
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .expr import MAX_EXPR_CHARS, MAX_EXPR_DEPTH, Comparison, Expr, ExprError, comparisons, parse_expr
from .overlap import find_overlap
from .policy import (ALERT_LEVELS, ActionKind, AlertHook, Brake, DaemonPolicy, Limits, Recycle, RestartPolicy, Rule,
                     UnmanagedMatch,
                     WorkloadPolicy)
from .signals import SIGNALS, suggest
from .units import (DURATION_EXPECTED, DURATION_UNITS, MAX_DURATION_S, MAX_NUMBER_CHARS, MAX_SIZE_BYTES,
                    SIZE_EXPECTED, SIZE_UNITS, UnitError, format_duration, format_size, parse_duration,
                    parse_percent, parse_size)

__all__ = [
    "ConfigIssue",
    "ConfigError",
    "CheckResult",
    "load_config",
    "load_workload_file",
    "check_config",
    "check_path",
    "YAML_SUFFIXES",
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_CONFIG_FILE",
    "DAEMON_KEYS",
    "WORKLOAD_KEYS",
    "RULE_KEYS",
    "DAEMON_SECTION",
    "WORKLOAD_SECTION",
    "Kind",
    "Key",
    "Section",
    "ListOf",
    "MapOf",
    "MAX_FILE_BYTES",
    "MAX_TOTAL_BYTES",
    "MAX_WORKLOAD_FILES",
    "MAX_NODES",
    "MAX_VISITS",
    "MAX_YAML_DEPTH",
    "MAX_LIST_ITEMS",
    "MAX_RULES",
    "MAX_REPLICAS",
    "MAX_ISSUES_PER_FILE",
]

T = TypeVar("T")

YAML_SUFFIXES = (".yaml", ".yml")

DEFAULT_CONFIG_DIR = "/etc/memguard"
"""Where a packaged memguard keeps its configuration: ``memguard check``
checks it when given no path."""
DEFAULT_CONFIG_FILE = os.path.join(DEFAULT_CONFIG_DIR, "memguard.yaml")
"""The daemon file ``memguard daemon`` reads when given no ``--config``."""

# --------------------------------------------------------------------------
# Bounds. Each is far past what a real configuration needs and close enough
# that the worst input within it is read in well under a second; each is
# refused with a message naming it. docs/policy.md ("Bounds") lists them.

MAX_FILE_BYTES = 256 * 1024
"""256 KiB per file. The shipped files are 1-3 KiB and a workload with a
hundred rules is about 10 KiB; PyYAML's pure-Python reader (the one that
keeps line numbers and can be depth-bounded) takes about 0.4 s for 256 KiB
on a slow core."""

MAX_TOTAL_BYTES = 1024 * 1024
"""1 MiB for all files of one configuration together. With
:data:`MAX_NODES`, a reload even of a hostile configuration is read in
about a second of CPU at most (bench/config_parse.py)."""

MAX_NODES = 20_000
"""YAML values (scalars, lists, mappings, aliases) in one configuration, all
files together. A workload file has 30 to 100 and a daemon file about as
many, so this holds a couple of hundred workloads; PyYAML's pure-Python
composer takes about 20 us per value, and a file of nothing but
one-character list items (130 000 in 256 KiB) would otherwise take 3 s."""

MAX_VISITS = 200_000
"""Entries of lists and mappings the loader walks in one configuration.
Aliases let one small file name the same large mapping many times; each
visit is cheap (a few microseconds), this caps their sum."""

MAX_WORKLOAD_FILES = 256
"""Workload files read from one ``workloads:`` directory. Each workload
runs up to :data:`MAX_REPLICAS` workers; 256 kinds of worker on one machine
is far past any real setup, and the bound keeps a directory full of junk
from being read at all."""

MAX_YAML_DEPTH = 32
"""Levels of nesting (mappings and lists inside each other). memguard's
files use at most four (file, ``rules``, a rule, a value); the bound
keeps PyYAML's recursive composer (three Python frames per level) far
from the recursion limit, also in a worker thread."""

MAX_LIST_ITEMS = 1024
"""Entries of one list or mapping (``command``, ``environment``,
``protect``, ``gpus``, ``unmanaged``). Aliases can repeat one entry
cheaply; this bounds the work they can cause."""

MAX_RULES = 128
"""Rules in one file. Every rule is evaluated for every worker on every
tick, up to a thousand ticks a second on the fast path; shipped policies
have two to four."""

MAX_REPLICAS = 1024
"""Workers of one workload. Each is a process tree memguard measures every
tick."""

MAX_PRIORITY = 1_000_000
"""``priority`` only orders victims; a million steps either way orders
anything, and keeps the number readable in logs."""

MAX_COUNT = 1_000_000
"""Counts a person writes (restart budget, refusals, trials per
incarnation): a million is past any run of one worker."""

MAX_ARG_BYTES = 128 * 1024 - 1
"""The longest command word or environment value: the kernel refuses a
single argument or variable of 128 KiB or more (MAX_ARG_STRLEN), so the
worker could never start."""

MAX_PATH_BYTES = 4095
"""The longest path: the kernel's PATH_MAX is 4096 bytes with the final NUL."""

MAX_NAME_CHARS = 64
"""The longest workload name. Worker names (``NAME-3``) end up in file
names, cgroup directory names, log fields and metric labels."""

MAX_TEXT_CHARS = 1024
"""The longest other text (rule names, process names, regular
expressions, user names): readable in one log line."""

MAX_ISSUES_PER_FILE = 100
"""Problems reported per file; past it one more line says how many were
left out. A file of nonsense would otherwise produce thousands of lines
(and a control-socket reply to match)."""

# --------------------------------------------------------------------------
# Choices

SCOPES = ("auto", "host", "cgroup")
LOG_FORMATS = ("auto", "console", "json", "journald")
LOG_LEVELS = ("debug", "info", "warning", "error")
RESTART_MODES = ("on-failure", "always", "never")
ACTIONS = tuple(a.value for a in ActionKind)
# Actions that wait for a grace period between the stop signal and SIGKILL.
GRACE_ACTIONS = (ActionKind.TERMINATE, ActionKind.RESTART)

_WORKLOAD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$", re.ASCII)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$", re.ASCII)
# POSIX-ish user/group names (no leading '-'; a trailing '$' for machine accounts) or a numeric id.
_ACCOUNT = re.compile(r"^(?:[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*\$?)$", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


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
        file, path = _printable(self.file), _printable(self.path)
        where = f"{file}:{self.line}" if self.line > 0 else file
        return f"{where}: {path}: {self.message}" if path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        """The issue for JSON: ``file``, ``line``, ``key`` and ``message``."""
        return {"file": self.file, "line": self.line, "key": self.path, "message": self.message}


def _printable(text: str) -> str:
    """``text`` with control characters (and undecodable bytes of file names) escaped: one line, no terminal codes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class ConfigError(Exception):
    """The configuration has problems; ``errors`` lists all of them, of all files."""

    def __init__(self, errors: Iterable[ConfigIssue]) -> None:
        self.errors: list[ConfigIssue] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def __reduce__(self) -> tuple:
        return (ConfigError, (self.errors,))


class CheckResult(NamedTuple):
    """What :func:`check_config` found: unpacks as ``policy, errors, warnings``.

    ``policy`` is None when there are errors. Warnings never make a
    configuration invalid: they name settings that will have no effect on
    this machine.
    """

    policy: DaemonPolicy | None
    errors: list[ConfigIssue]
    warnings: list[ConfigIssue]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, int] | None:
        """Counts of what the configuration runs, or None when it has errors."""
        if self.policy is None:
            return None
        p = self.policy
        return {
            "workloads": len(p.workloads),
            "workers": sum(w.replicas for w in p.workloads),
            "system_rules": len(p.rules),
            "workload_rules": sum(len(w.rules) for w in p.workloads),
        }

    def as_dict(self) -> dict[str, object]:
        """The result for ``memguard check --json``."""
        return {
            "ok": self.ok,
            "errors": [e.as_dict() for e in self.errors],
            "warnings": [w.as_dict() for w in self.warnings],
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------
# Describing values in messages

_SHOWN_CHARS = 80  # user text quoted in a message is cut to this length


def _clip(text: str) -> str:
    """Quoted user text, cut short when long: a 200 KiB value must not make a 200 KiB message."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS - 20]!r}... ({len(text)} characters)"


def _describe(value: object) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the number {_number(value)}" if abs(value) < 10**MAX_NUMBER_CHARS else _number(value)
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (_Unsupported, _Unreadable)):
        return repr(value)
    return f"a {type(value).__name__}"


def _number(n: int) -> str:
    """An int for a message (str() of an int of thousands of digits raises ValueError)."""
    return str(n) if abs(n) < 10**MAX_NUMBER_CHARS else f"a number of more than {MAX_NUMBER_CHARS} digits"


def _describe_node(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a value"


def _choice_error(value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    msg = f"expected one of {', '.join(choices)}, got {_describe(value)}"
    if isinstance(value, str) and len(value) <= MAX_TEXT_CHARS:
        hint = suggest(value, choices)
        if hint:
            msg += f" (did you mean {hint!r}?)"
    return msg


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_text(key: str) -> str:
    """A user's key as part of a key path: as written when short and printable, else quoted and cut short."""
    return key if len(key) <= _SHOWN_CHARS and key.isprintable() else _clip(key)


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


def _p_size_nonneg(v: object) -> int:
    return parse_size(v)


_RATE_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_EXPECTED = "a size per second such as 6000MiB (or 6000MiB/s)"


def _p_rate(v: object) -> float:
    """A rate in bytes per second: a size (per second) or SIZE/s, SIZE/m, SIZE/h."""
    per = 1.0
    size: object = v
    if isinstance(v, str) and "/" in v:
        size, _, unit = v.rpartition("/")
        if unit.strip() not in _RATE_PER:
            raise ValueError(f"expected {_RATE_EXPECTED}, got {_describe(v)}")
        per = _RATE_PER[unit.strip()]
    try:
        n = parse_size(size)
    except UnitError as e:
        if "at most" in str(e):
            raise
        raise ValueError(f"expected {_RATE_EXPECTED}, got {_describe(v)}") from None
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
            raise ValueError(f"expected a whole number of at least {lo}, got {_number(v)}")
        if hi is not None and v > hi:
            raise ValueError(f"expected a whole number of at most {hi}, got {_number(v)}")
        return v

    return parse


def _p_choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if not isinstance(v, str) or v not in choices:
            raise ValueError(_choice_error(v, choices))
        return v

    return parse


def _p_text(what: str = "a string", max_chars: int = MAX_TEXT_CHARS) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if not isinstance(v, str):
            raise ValueError(f"expected {what}, got {_describe(v)}")
        if not v.strip():
            raise ValueError(f"expected {what}, got an empty string")
        if len(v) > max_chars:
            raise ValueError(f"expected {what} of at most {max_chars} characters, got {_describe(v)}")
        return v

    return parse


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _p_path(what: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        text = _p_text(what, max_chars=MAX_PATH_BYTES)(v)
        if "\0" in text:
            raise ValueError(f"expected {what}, got a path with a NUL character")
        if _utf8_len(text) > MAX_PATH_BYTES:
            raise ValueError(f"expected {what} of at most {MAX_PATH_BYTES} bytes (PATH_MAX), got {_describe(v)}")
        if text.startswith("~"):
            raise ValueError(f"expected {what}; '~' is not expanded, write the full path, got {_describe(v)}")
        return text

    return parse


def _p_workload_name(v: object) -> str:
    if not isinstance(v, str) or not _WORKLOAD_NAME.match(v):
        raise ValueError(
            f"expected a workload name made of letters, digits, '_', '.' and '-', got {_describe(v)}"
        )
    if len(v) > MAX_NAME_CHARS:
        raise ValueError(f"expected a workload name of at most {MAX_NAME_CHARS} characters, got {_describe(v)}")
    return v


def _p_account(kind: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 - 1:
            return str(v)
        if not isinstance(v, str) or not _ACCOUNT.match(v) or len(v) > MAX_TEXT_CHARS \
                or (v.isdigit() and int(v) >= 2**32 - 1):
            raise ValueError(f"expected a {kind} name such as ml, or a numeric id, got {_describe(v)}")
        return v

    return parse


_SIGNAL_EXPECTED = "expected a signal name or number such as SIGTERM, SIGINT, TERM or 15"


def _p_signal(v: object) -> int:
    num: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        num = v
    elif isinstance(v, str) and len(v) <= 32:
        text = v.strip().upper()
        if _DIGITS.fullmatch(text):
            num = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            try:
                num = int(_signal.Signals[name])
            except KeyError:
                names = [s.name for s in _signal.Signals]
                hint = suggest(name, names)
                raise ValueError(
                    f"{_SIGNAL_EXPECTED}, got {_describe(v)}" + (f" (did you mean {hint!r}?)" if hint else "")
                ) from None
    if num is None or num not in _signal.valid_signals():
        raise ValueError(f"{_SIGNAL_EXPECTED}, got {_describe(v)}")
    if num == int(_signal.SIGSTOP):
        raise ValueError("SIGSTOP only pauses a process and cannot stop a worker; use SIGTERM or SIGINT")
    return num


_BACKOFF_EXPECTED = "expected a backoff range such as 1s..60s (or one duration such as 5s)"


def _p_backoff(v: object) -> tuple[float, float]:
    if not isinstance(v, str):
        raise ValueError(f"{_BACKOFF_EXPECTED}, got {_describe(v)}")
    lo_text, sep, hi_text = v.partition("..")
    try:
        lo = parse_duration(lo_text)
        hi = parse_duration(hi_text) if sep else lo
    except UnitError as e:
        if "at most" in str(e):
            raise
        raise ValueError(f"{_BACKOFF_EXPECTED}, got {_describe(v)}") from None
    if hi < lo:
        raise ValueError(f"the backoff minimum {lo_text.strip()} is longer than its maximum {hi_text.strip()}")
    if lo <= 0:
        raise ValueError(f"expected a backoff minimum greater than zero (a wait that doubles from 0 stays 0), "
                         f"got {_describe(v)}")
    return lo, hi


_BUDGET_EXPECTED = "expected a restart budget such as 10/10m (at most 10 restarts in 10 minutes)"


def _p_budget(v: object) -> tuple[int, float]:
    if not isinstance(v, str):
        raise ValueError(f"{_BUDGET_EXPECTED}, got {_describe(v)}")
    count_text, sep, window_text = v.partition("/")
    count_text = count_text.strip()
    if not sep or not _DIGITS.fullmatch(count_text):
        raise ValueError(f"{_BUDGET_EXPECTED}, got {_describe(v)}")
    if len(count_text) > len(str(MAX_COUNT)) or int(count_text) > MAX_COUNT:
        raise ValueError(f"expected a restart budget of at most {MAX_COUNT} restarts, got {_describe(v)}")
    count = int(count_text)
    if count < 1:
        raise ValueError(f"expected a restart budget of at least 1 restart, got {_describe(v)}")
    try:
        window = parse_duration(window_text)
    except UnitError as e:
        if "at most" in str(e):
            raise
        raise ValueError(f"{_BUDGET_EXPECTED}, got {_describe(v)}") from None
    if window <= 0:
        raise ValueError(f"expected a budget window greater than zero, got {_describe(v)}")
    return count, window


def _p_regex(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a regular expression, got {_describe(v)}")
    if len(v) > MAX_TEXT_CHARS:
        raise ValueError(f"expected a regular expression of at most {MAX_TEXT_CHARS} characters, got {_describe(v)}")
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"expected a regular expression, got {_describe(v)}: {e}") from None
    except (RecursionError, OverflowError, MemoryError):
        raise ValueError(f"expected a regular expression, got {_describe(v)}: too deeply nested or a "
                         "repetition count too large") from None
    return v


def _p_gpu(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1024:
        return str(v)
    if isinstance(v, str) and len(v) <= 128 and re.fullmatch(r"[0-9]{1,4}|(GPU|MIG)-[0-9A-Za-z/-]+", v, re.ASCII):
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


_MAX_CORES = 4096  # Linux's largest NR_CPUS in distribution kernels (x86_64 MAXSMP: 8192); past any machine


def _p_cores(v: object) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= _MAX_CORES:
        return float(v)
    raise UnitError(f"expected a number of cores such as 2 or 0.5 (at most {_MAX_CORES}), got {_describe(v)}")


def _p_fraction(v: object) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        pct = parse_percent(v)
        if pct > 100:
            raise UnitError(f"expected a percentage between 0% and 100%, got {_describe(v)}")
        return pct / 100.0
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1:
        return float(v)
    raise UnitError(f"expected a fraction such as 10% or 0.1, got {_describe(v)}")


def _p_expression(v: object) -> str:
    """Only the form: a rule's when/release is parsed by :func:`_read_expr` with its scope."""
    return _p_text("an expression such as \"memory.available < 10%\"", MAX_EXPR_CHARS)(v)


# --------------------------------------------------------------------------
# The vocabulary of the files: one table per section. The loader takes the
# allowed keys and every scalar's parser from these tables, and
# memguard.schema turns the same tables into a JSON Schema, so the two
# cannot drift apart. Order is the order of the documentation.


@dataclass(frozen=True)
class Kind:
    """A kind of scalar: how the loader reads it, what a message says it expects, its JSON Schema."""

    parse: Callable[[object], Any]
    expected: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class ListOf:
    """A list (YAML sequence) of scalars of one kind or of mappings of one section."""

    item: "Kind | Section"
    what: str
    min_items: int = 0
    max_items: int = MAX_LIST_ITEMS


@dataclass(frozen=True)
class MapOf:
    """A mapping with free keys (matching ``key_pattern``) and values of one kind."""

    value: Kind
    key_pattern: str
    what: str
    max_items: int = MAX_LIST_ITEMS


@dataclass(frozen=True)
class Key:
    """One key of a section: the kind of its value and one line for people and editors."""

    kind: "Kind | Section | ListOf | MapOf"
    doc: str
    required: bool = False


@dataclass(frozen=True)
class Section:
    """A mapping with known keys; any other key is an error. ``scalar``: a scalar the key may hold instead
    (``restart_when_blocked: true``)."""

    keys: Mapping[str, Key]
    what: str  # "a mapping such as {format: auto, level: info}"
    scalar: "Kind | None" = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.keys)


def _ci(word: str) -> str:
    """``word`` as a case-insensitive ECMA-262 pattern (JSON Schema patterns take no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


def _units_pattern(units: Iterable[str]) -> str:
    return "|".join(_ci(u) for u in sorted(units, key=len, reverse=True))


_NUMBER_PATTERN = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)"
SIZE_PATTERN = rf"^\s*{_NUMBER_PATTERN}\s*({_units_pattern(SIZE_UNITS)})?\s*$"
DURATION_PATTERN = rf"^\s*{_NUMBER_PATTERN}\s*({_units_pattern(DURATION_UNITS)})\s*$"
_DURATION_INNER = DURATION_PATTERN[1:-1]
_SIZE_INNER = SIZE_PATTERN[1:-1]


def _kind(parse: Callable[[object], Any], expected: str, schema: Mapping[str, Any]) -> Kind:
    return Kind(parse, expected, MappingProxyType(dict(schema)))


def _k_duration(minimum: str) -> Kind:
    strict = minimum == "> 0"
    return _kind(_p_duration(0.0, strict=strict), DURATION_EXPECTED, {
        "type": "string", "pattern": DURATION_PATTERN, "maxLength": MAX_NUMBER_CHARS,
        "description": f"A duration {minimum}, at most {format_duration(MAX_DURATION_S)}: 100ms, 5s, 10m, 12h, 1d.",
    })


_SIZE_SCHEMA = {"anyOf": [
    {"type": "integer", "minimum": 0, "maximum": MAX_SIZE_BYTES},
    {"type": "string", "pattern": SIZE_PATTERN, "maxLength": MAX_NUMBER_CHARS},
], "description": "A size, at most 1EiB: 512MiB, 8GiB (binary), 500MB (decimal), or a whole number of bytes."}

K_DURATION = _k_duration(">= 0")
K_DURATION_POSITIVE = _k_duration("> 0")


def _p_recorder_window(v: object) -> float:
    s = parse_duration(v)
    if not RECORDER_WINDOW_MIN_S <= s <= RECORDER_WINDOW_MAX_S:
        raise ValueError(f"expected a duration from 10s to 1h, got {_describe(v)}")
    return s


# The flight recorder's window: under 10 s an incident shows no "before"; past 1 h its rings hold
# 4 MiB per 100 workers and a record's timeline grows past what a picture can show.
RECORDER_WINDOW_MIN_S, RECORDER_WINDOW_MAX_S = 10.0, 3600.0
K_RECORDER_WINDOW = _kind(_p_recorder_window, "a duration from 10s to 1h", {
    "type": "string", "pattern": DURATION_PATTERN, "maxLength": MAX_NUMBER_CHARS,
    "description": "A duration from 10s to 1h: 5m, 10m, 30m."})
K_SIZE = _kind(_p_size_nonneg, SIZE_EXPECTED, _SIZE_SCHEMA)
K_SIZE_POSITIVE = _kind(_p_size_positive, SIZE_EXPECTED, _SIZE_SCHEMA)
K_RATE = _kind(_p_rate, "a size per second", {"anyOf": [
    {"type": "integer", "minimum": 1, "maximum": MAX_SIZE_BYTES},
    {"type": "string", "pattern": rf"^{_SIZE_INNER}(/\s*[smh])?\s*$", "maxLength": MAX_NUMBER_CHARS + 2},
], "description": "A rate: a size per second (6000MiB or 6000MiB/s), per minute (/m) or per hour (/h)."})
K_BOOL = _kind(_p_bool, "true or false", {"type": "boolean"})
K_TRISTATE = _kind(_p_tristate, "auto, on or off", {"anyOf": [{"enum": ["auto", "on", "off"]}, {"type": "boolean"}]})
K_AUTOOFF = _kind(_p_autooff, "auto or off", {"anyOf": [{"enum": ["auto", "off"]}, {"const": False}]})
K_OOM_SCORE = _kind(_p_int(-1000, 1000), "a whole number from -1000 to 1000",
                    {"type": "integer", "minimum": -1000, "maximum": 1000})
K_PRIORITY = _kind(_p_int(-MAX_PRIORITY, MAX_PRIORITY), "a whole number",
                   {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY})
K_REPLICAS = _kind(_p_int(1, MAX_REPLICAS), "a whole number", {"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS})


def _k_count(what: str) -> Kind:
    return _kind(_p_int(1, MAX_COUNT), what, {"type": "integer", "minimum": 1, "maximum": MAX_COUNT})


def _k_choice(choices: tuple[str, ...], what: str) -> Kind:
    return _kind(_p_choice(choices), what, {"enum": list(choices)})


def _k_text(what: str, max_chars: int = MAX_TEXT_CHARS) -> Kind:
    return _kind(_p_text(what, max_chars), what,
                 {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": r"\S"})


def _k_path(what: str) -> Kind:
    return _kind(_p_path(what), what, {"type": "string", "minLength": 1, "maxLength": MAX_PATH_BYTES,
                                       "pattern": r"^[^~]"})


def _k_account(kind: str) -> Kind:
    return _kind(_p_account(kind), f"a {kind} name", {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 2**32 - 2},
        {"type": "string", "pattern": _ACCOUNT.pattern, "maxLength": MAX_TEXT_CHARS},
    ]})


K_SCOPE = _k_choice(SCOPES, "a scope")
K_ACTION = _k_choice(ACTIONS, "an action")
K_EXPRESSION = _kind(_p_expression, "an expression", {
    "type": "string", "minLength": 1, "maxLength": MAX_EXPR_CHARS,
    "description": "SIGNAL OP VALUE joined by and/or, with parentheses (at most "
                   f"{MAX_EXPR_DEPTH} deep), e.g. \"worker.memory > 85%\". Signals: "
                   + ", ".join(SIGNALS) + ".",
})
K_REGEX = _kind(_p_regex, "a regular expression", {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS,
                                                    "format": "regex"})
K_SIGNAL = _kind(_p_signal, "a signal", {"anyOf": [
    {"type": "integer", "minimum": 1, "maximum": 64},
    {"type": "string", "pattern": r"^\s*([sS][iI][gG])?[A-Za-z0-9+]{2,12}\s*$"},
]})
K_BACKOFF = _kind(_p_backoff, "a backoff range", {
    "type": "string", "pattern": rf"^{_DURATION_INNER}(\.\.{_DURATION_INNER})?$",
    "description": "MIN..MAX durations (1s..60s), or one duration for a fixed wait."})
K_BUDGET = _kind(_p_budget, "a restart budget", {
    "type": "string", "pattern": rf"^\s*[0-9]{{1,7}}\s*/{_DURATION_INNER}$",
    "description": "COUNT/WINDOW: at most COUNT restarts in WINDOW, e.g. 10/10m."})
K_CORES = _kind(_p_cores, "a number of cores such as 2 or 0.5",
                {"type": "number", "exclusiveMinimum": 0, "maximum": _MAX_CORES})
K_FRACTION = _kind(_p_fraction, "a fraction such as 10%", {"anyOf": [
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*%\s*$"},
]})
K_GPU = _kind(_p_gpu, "a GPU index or UUID", {"anyOf": [
    {"type": "integer", "minimum": 0, "maximum": 1023},
    {"type": "string", "pattern": r"^([0-9]{1,4}|(GPU|MIG)-[0-9A-Za-z/-]+)$", "maxLength": 128},
]})
K_WORKLOAD_NAME = _kind(_p_workload_name, "a workload name", {
    "type": "string", "pattern": _WORKLOAD_NAME.pattern, "maxLength": MAX_NAME_CHARS})
K_COMMAND_WORD = _kind(_p_text("a non-empty string", MAX_ARG_BYTES), "a non-empty string",
                       {"type": "string", "minLength": 1, "maxLength": MAX_ARG_BYTES})
K_ENV_VALUE = _kind(_p_text("a string", MAX_ARG_BYTES), "a string", {"type": "string", "maxLength": MAX_ARG_BYTES})

LOG_SECTION = Section({
    "format": Key(_k_choice(LOG_FORMATS, "a log format"),
                  "auto: journald under systemd with the journal as output, a console on a terminal, else JSON."),
    "level": Key(_k_choice(LOG_LEVELS, "a log level"), "Lowest level logged."),
}, "a mapping such as {format: auto, level: info}")

_RULE_EXAMPLE = 'a rule such as {when: "memory.available < 10%", action: block}'
RULE_SECTION = Section({
    "name": Key(_k_text("a rule name"), "The name used in logs and events (default rules[N])."),
    "when": Key(K_EXPRESSION, "The condition, e.g. \"memory.available < 10%\".", required=True),
    "for": Key(K_DURATION, "How long when must hold before the rule fires."),
    "action": Key(K_ACTION, "What to do when the rule fires, mildest first.", required=True),
    "release": Key(K_EXPRESSION, "For block and warn: the condition that ends the action; it must be false "
                                 "whenever when is true."),
    "grace": Key(K_DURATION, "For terminate and restart: time between the stop signal and SIGKILL."),
    "within": Key(K_DURATION_POSITIVE, "Also fire when, at the recent rate, when will hold within this long "
                                       "(memory.available falling, memory.used or worker.memory rising)."),
}, _RULE_EXAMPLE)

UNMANAGED_SECTION = Section({
    "name": Key(_k_text("a name"), "A label for the entry."),
    "cmdline": Key(K_REGEX, "A regular expression searched in the command line."),
    "user": Key(_k_text("a user name"), "The user the processes run as."),
    "cgroup": Key(K_REGEX, "A regular expression searched in /proc/PID/cgroup."),
    "priority": Key(K_PRIORITY, "Ranks them with the workers as victims (lower first)."),
    "rules": Key(ListOf(RULE_SECTION, f"a list of rules, e.g. - {_RULE_EXAMPLE}", max_items=MAX_RULES),
                 "Worker rules for each matched process: with rules, a match is adopted as an ad-hoc worker "
                 "(its tree measured, its progress signals and these rules applied)."),
}, "a mapping such as {cmdline: 'polars', user: alice}")

_RULES = ListOf(RULE_SECTION, f"a list of rules, e.g. - {_RULE_EXAMPLE}", max_items=MAX_RULES)

# alerts: and metrics: (docs/alerts.md, docs/fleet.md)
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})$")
_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


def _p_listen(v: object) -> str:
    m = _LISTEN.match(v) if isinstance(v, str) and len(v) <= MAX_TEXT_CHARS else None
    if m is None or not 0 <= int(m.group("port")) < 65536:  # 0: any free port (the log says which)
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9464 (or [::1]:9464), got {_describe(v)}")
    return v  # type: ignore[return-value]


def _p_url(v: object) -> str:
    if isinstance(v, str) and len(v) <= MAX_PATH_BYTES and _URL.fullmatch(v):
        return v
    raise ValueError(f"expected an http:// or https:// URL such as http://127.0.0.1:9000/memguard, "
                     f"got {_describe(v)}")


def _p_header_value(v: object) -> str:
    if isinstance(v, str) and len(v) <= MAX_TEXT_CHARS and "\n" not in v and "\r" not in v:
        return v
    raise ValueError(f"expected a one-line header value, got {_describe(v)}")


METRICS_SECTION = Section({
    "listen": Key(_kind(_p_listen, "HOST:PORT", {"type": "string", "maxLength": MAX_TEXT_CHARS,
                                                 "pattern": _LISTEN.pattern}),
                  "Serve /metrics (Prometheus text format) on this address, e.g. 127.0.0.1:9464."),
}, "a mapping such as {listen: 127.0.0.1:9464}")

ALERT_SECTION = Section({
    "name": Key(_k_text("a name"), "A label for the hook in memguard's own events."),
    "webhook": Key(_kind(_p_url, "a URL", {"type": "string", "pattern": r"^https?://", "maxLength": MAX_PATH_BYTES}),
                   "POST each event there as JSON (with a Slack-compatible text field)."),
    "exec": Key(ListOf(K_COMMAND_WORD, "a command as a list such as [/usr/local/bin/page-me]", min_items=1),
                "Run this command per event: the event in MEMGUARD_* variables, JSON on standard input."),
    "events": Key(ListOf(_k_text("an event kind"), "a list of events such as [kill, failed]"),
                  "Only these event kinds (or exit causes); all when absent."),
    "severity": Key(_k_choice(ALERT_LEVELS, "a level"), "Only events at this level or above."),
    "dedup": Key(K_DURATION, "The same kind, worker, pid and rule within this window is sent once."),
    "min_interval": Key(K_DURATION, "At least this long between two sends of this hook."),
    "max_per_hour": Key(_kind(_p_int(1, 3600), "a whole number from 1 to 3600",
                              {"type": "integer", "minimum": 1, "maximum": 3600}), "At most this many sends an hour."),
    "timeout": Key(K_DURATION_POSITIVE, "A send (or the command) taking longer is abandoned (killed)."),
    "retries": Key(_kind(_p_int(0, 10), "a whole number from 0 to 10",
                         {"type": "integer", "minimum": 0, "maximum": 10}), "Tries after a failed send."),
    "backoff": Key(K_DURATION, "The wait before the first retry; it doubles."),
    "headers": Key(MapOf(_kind(_p_header_value, "a one-line string", {"type": "string"}), _HEADER_NAME.pattern,
                         "a mapping such as {Authorization: 'Bearer ...'}"), "HTTP headers of a webhook."),
}, "a mapping such as {webhook: 'http://127.0.0.1:9000/memguard', events: [kill, failed]}")

DAEMON_SECTION = Section({
    "poll_interval": Key(K_DURATION_POSITIVE, "How often memory is read while no rule is near its threshold."),
    "fast_poll_interval": Key(K_DURATION_POSITIVE, "How often memory is read near a threshold."),
    "min_fast_path_interval": Key(K_DURATION_POSITIVE, "The shortest pause between reads on the fast path."),
    "scope": Key(K_SCOPE, "What system rules watch: the host, or memguard's memory cgroup."),
    "workloads": Key(_k_path("a directory path such as workloads.d/"),
                     "The workload directory, relative to this file."),
    "dry_run": Key(K_BOOL, "Decide and log, but send no signal and close no gate."),
    "protect": Key(ListOf(_k_text("a process name"), "a list of process names such as [sshd, systemd-journald]"),
                   "Workers whose tree holds one of these processes are never signalled."),
    "post_action_delay": Key(K_DURATION, "After a victim exits, the wait before a rule no harder chooses another."),
    "max_fill_rate": Key(K_RATE, "The fastest rate memory is assumed to fill (paces the fast path)."),
    "runtime_dir": Key(_k_path("a directory path"), "Admission files and the control socket."),
    "log": Key(LOG_SECTION, "Log format and level."),
    "rules": Key(_RULES, "System rules: they may use only system signals."),
    "worker_cgroups": Key(K_TRISTATE, "A memory cgroup per worker incarnation: auto, on or off."),
    "oom_score_adj": Key(K_OOM_SCORE, "memguard's own OOM score."),
    "mlock": Key(K_BOOL, "Lock memguard's pages in RAM."),
    "unmanaged": Key(ListOf(UNMANAGED_SECTION, "a list such as [{cmdline: 'python.*polars', user: alice}]"),
                     "Processes memguard does not own that system rules may choose as victims."),
    "gpu": Key(K_AUTOOFF, "GPU memory sensing through NVML: auto or off."),
    "metrics_file": Key(_k_path("a file path such as /var/lib/node_exporter/memguard.prom"),
                        "A Prometheus textfile rewritten after each full tick."),
    "metrics": Key(METRICS_SECTION, "Metrics over HTTP, for Prometheus to scrape."),
    "alerts": Key(ListOf(ALERT_SECTION, "a list such as [{webhook: 'http://127.0.0.1:9000/memguard', "
                                        "events: [kill, failed]}]"), "Hooks told of events: webhooks and commands."),
    "state_dir": Key(_k_path("a directory path such as /var/lib/memguard"),
                     "Incident records and the kernel log position (default: systemd's StateDirectory)."),
    "recorder_window": Key(K_RECORDER_WINDOW, "How far back the flight recorder remembers (default 10m)."),
}, "a mapping of keys such as 'poll_interval: 1s'")

LIMITS_SECTION = Section({
    "memory": Key(K_SIZE_POSITIVE, "The memory one worker may use: the base of worker.memory percentages."),
    "runtime": Key(K_DURATION_POSITIVE, "A worker running longer is restarted."),
    "memory_high": Key(K_SIZE_POSITIVE, "cgroup v2 throttle point (memory.high), not above limits.memory."),
    "swap": Key(K_SIZE, "Swap the worker's cgroup may use."),
    "cpu": Key(K_CORES, "CPU quota of the worker's cgroup, in cores (cgroup v2)."),
    "gpu_memory": Key(K_SIZE_POSITIVE, "The worker's GPU memory budget: the base of worker.gpu_memory percentages."),
}, "a mapping such as {memory: 8GiB, runtime: 12h}")

RESTART_SECTION = Section({
    "policy": Key(_k_choice(RESTART_MODES, "a restart policy"), "When a stopped worker is started again."),
    "backoff": Key(K_BACKOFF, "Wait before a restart: doubles from MIN up to MAX."),
    "budget": Key(K_BUDGET, "At most COUNT failures (crashes, kernel OOM kills, stops by a rule) within WINDOW, "
                            "then the worker is failed."),
    "planned": Key(K_BUDGET, "At most COUNT planned restarts (recycle, the brake, limits.runtime, an operator) "
                             "within WINDOW; more wait for room, they never fail a worker."),
}, "a mapping such as {policy: on-failure, backoff: 1s..60s, budget: 10/10m}")

BRAKE_SECTION = Section({
    "after": Key(K_DURATION_POSITIVE, "The longest a worker waits at a gate its own memory holds closed before it "
                                      "is restarted (the reclaim evidence usually decides far sooner)."),
    "refusals": Key(_k_count("a whole number of refusals"), "Deprecated and ignored (a trial waits once at the "
                                                            "gate; it is not refused again and again)."),
}, "true, false or a mapping such as {after: 30s}", scalar=K_BOOL)

RECYCLE_SECTION = Section({
    "max_trials": Key(_k_count("a whole number of trials"), "Restart after this many trials, between trials."),
    "max_age": Key(K_DURATION_POSITIVE, "Restart once this old, between trials."),
    "jitter": Key(K_FRACTION, "Each incarnation recycles up to this fraction earlier than max_age."),
}, "a mapping such as {max_trials: 50, max_age: 60m}")

_COMMAND_EXAMPLE = "a list of strings such as [python3, train.py]"

WORKLOAD_SECTION = Section({
    "name": Key(K_WORKLOAD_NAME, "The workload's name (default: the file name); workers are NAME-0, NAME-1, ..."),
    "command": Key(ListOf(K_COMMAND_WORD, _COMMAND_EXAMPLE, min_items=1),
                   "The program and its arguments, as a list; no shell is involved.", required=True),
    "replicas": Key(K_REPLICAS, "How many workers run this command."),
    "priority": Key(K_PRIORITY, "Under system rules, lower priority is chosen first as a victim."),
    "user": Key(_k_account("user"), "User the workers run as."),
    "group": Key(_k_account("group"), "Group the workers run as."),
    "working_dir": Key(_k_path("a directory path"), "Directory the workers start in, relative to this file."),
    "environment": Key(MapOf(K_ENV_VALUE, _ENV_NAME.pattern, 'a mapping of variables such as {OMP_NUM_THREADS: "4"}'),
                       "Variables added to the workers' environment; values are strings."),
    "limits": Key(LIMITS_SECTION, "Memory, runtime, swap, CPU and GPU memory limits of one worker."),
    "grace": Key(K_DURATION, "Default time between the stop signal and SIGKILL."),
    "stop_signal": Key(K_SIGNAL, "The signal that asks a worker to stop (not SIGSTOP)."),
    "rules": Key(_RULES, "Worker rules, evaluated for each worker of the workload."),
    "restart": Key(RESTART_SECTION, "Restart policy, backoff and budget."),
    "restart_when_blocked": Key(BRAKE_SECTION, "Restart a worker its own block rule holds for long."),
    "recycle": Key(RECYCLE_SECTION, "Restart a worker at a trial boundary after a number of trials or an age."),
    "trial_timeout": Key(K_DURATION_POSITIVE, "A trial running longer is stuck: the worker is terminated."),
    "heartbeat_timeout": Key(K_DURATION_POSITIVE, "A trial silent longer is stuck: the worker is terminated."),
    "growth_window": Key(K_DURATION_POSITIVE, "The window over which worker.growth is computed."),
    "reclaim_interval": Key(K_DURATION, "Least time between two reclaim requests of one rule to one worker."),
    "oom_score_adj": Key(K_OOM_SCORE, "The workers' OOM score."),
    "gpus": Key(ListOf(K_GPU, "a list of GPU indexes or UUIDs such as [0, 1]"),
                "Devices the workload is pinned to (CUDA_VISIBLE_DEVICES)."),
}, "a mapping of keys such as 'name: trials'")

DAEMON_KEYS = DAEMON_SECTION.names
UNMANAGED_KEYS = UNMANAGED_SECTION.names
WORKLOAD_KEYS = WORKLOAD_SECTION.names
RULE_KEYS = RULE_SECTION.names
LOG_KEYS = LOG_SECTION.names
LIMITS_KEYS = LIMITS_SECTION.names
RESTART_KEYS = RESTART_SECTION.names
BRAKE_KEYS = BRAKE_SECTION.names
RECYCLE_KEYS = RECYCLE_SECTION.names


# --------------------------------------------------------------------------
# Reading one file


class _Unsupported:
    """A scalar with a YAML tag memguard does not read (``!foo 5``)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"a value with the unsupported YAML tag {_clip(self.tag)}"


class _Unreadable:
    """A scalar YAML could not turn into a value (a number too long to read, a date that is no date)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


class _Bad:
    """A value that was present but wrong (its error is already recorded)."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()

_Entries = dict  # key -> (key node, value node)


class _PastBound(yaml.MarkedYAMLError):
    """Nesting past :data:`MAX_YAML_DEPTH`, or more values than :data:`MAX_NODES`."""


class _Budget:
    """What is left of the bounds shared by all files of one configuration."""

    def __init__(self) -> None:
        self.bytes = MAX_TOTAL_BYTES
        self.nodes = MAX_NODES
        self.visits = MAX_VISITS


class _Loader(yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, composing at most :data:`MAX_YAML_DEPTH` levels deep
    and at most the budget's number of nodes.

    The composer recurses once per level; refusing the level past the
    bound as soon as its first event arrives means no input reaches
    Python's recursion limit. Events are produced on demand, so nothing
    past the refused point is scanned.
    """

    def __init__(self, stream: str, budget: _Budget | None = None) -> None:
        super().__init__(stream)
        self._depth = 0
        self._budget = budget if budget is not None else _Budget()

    def compose_node(self, parent: Node | None, index: object) -> Node:  # type: ignore[override]
        self._budget.nodes -= 1
        if self._budget.nodes < 0:
            raise _PastBound(None, None, f"more than {MAX_NODES} YAML values in this configuration (a real one has "
                                       "a few hundred)", self.peek_event().start_mark)
        if not self.check_event(SequenceStartEvent, MappingStartEvent):
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        if self._depth >= MAX_YAML_DEPTH:
            raise _PastBound(None, None, f"lists and mappings nested deeper than {MAX_YAML_DEPTH} levels "
                                       "(memguard's files need at most four)", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


class _FileTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit


class _NotRegular(Exception):
    pass


def _read_bounded(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO or a device named as a config file
    must not hang or stream forever), checked to be a regular file on the
    open descriptor, and read no further than ``limit + 1`` bytes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular()
        if st.st_size > limit:
            raise _FileTooLarge(st.st_size, limit)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # the file grew while it was read
            raise _FileTooLarge(got, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _File:
    """Reads one YAML file's node tree and records its issues (and warnings).

    ``path`` is what is opened, ``display`` how messages name it.
    ``host`` is set when the checks against this machine run.
    """

    def __init__(self, display: str, host: "_Host | None" = None, budget: _Budget | None = None) -> None:
        self.display = display
        self.budget = budget if budget is not None else _Budget()
        try:
            self.dir = os.path.dirname(os.path.abspath(display))
        except OSError:  # the current directory was removed: relative paths stay relative
            self.dir = os.path.dirname(display)
        self.issues: list[ConfigIssue] = []
        self.n_issues = 0  # all issues, also those past MAX_ISSUES_PER_FILE that are not kept
        self.warnings: list[ConfigIssue] = []
        self.root: Node | None = None
        self.size = 0
        self.host = host
        self.gpu_refs: list[tuple[int, str, str]] = []  # (line, key path, expression) of rules on GPU signals
        self.memory_high_refs: list[tuple[int, str]] = []  # (line, key path) of limits.memory_high
        self._constructor = SafeConstructor()

    # -- reading --------------------------------------------------------

    def load(self) -> Node | None:
        """Read and compose the file; report unreadable files, bounds and YAML syntax errors.

        The file's bytes and nodes are taken from the configuration's budget.
        """
        limit = min(MAX_FILE_BYTES, max(self.budget.bytes, 0))
        try:
            data = _read_bounded(self.display, limit)
        except FileNotFoundError:
            self.issue(0, "", "no such file")
            return None
        except IsADirectoryError:
            self.issue(0, "", "expected a YAML file, got a directory")
            return None
        except _NotRegular:
            self.issue(0, "", "expected a YAML file, got a special file (a device, FIFO or socket)")
            return None
        except _FileTooLarge as e:
            if e.limit < MAX_FILE_BYTES:
                self.issue(0, "", f"the files of this configuration together are larger than "
                                  f"{format_size(MAX_TOTAL_BYTES)}, the most memguard reads for one configuration")
            else:
                self.issue(0, "", f"the file is {format_size(e.size)}; the largest memguard reads is "
                                  f"{format_size(MAX_FILE_BYTES)} (a configuration file is a few KiB)")
            return None
        except OSError as e:
            self.issue(0, "", f"cannot be read: {e.strerror or e}")
            return None
        self.size = len(data)
        self.budget.bytes -= self.size
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.issue(data.count(b"\n", 0, e.start) + 1, "", "is not UTF-8 text")
            return None
        try:
            loader = _Loader(text, self.budget)
            try:
                root = loader.get_single_node()
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 0
            what = _clip_text(e.problem or "syntax error")
            if e.context:
                what = f"{_clip_text(e.context)}, {what}"
                if e.context_mark is not None and e.problem_mark is not None \
                        and e.context_mark.line != e.problem_mark.line:
                    what += f" (started at line {e.context_mark.line + 1})"
            self.issue(line, "", f"invalid YAML: {what}")
            return None
        except yaml.reader.ReaderError as e:
            line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else 0
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
            self.issue(line, "", f"invalid YAML: the character {char} is not allowed in YAML text")
            return None
        except yaml.YAMLError as e:
            self.issue(0, "", f"invalid YAML: {_clip_text(str(e))}")
            return None
        if root is None:
            self.issue(1, "", "the file is empty: expected a mapping of keys such as 'name: value'")
            return None
        self.root = root
        return root

    # -- recording ------------------------------------------------------

    def issue(self, where: Node | int, path: str, message: str) -> None:
        self.n_issues += 1
        if len(self.issues) < MAX_ISSUES_PER_FILE:
            line = where if isinstance(where, int) else where.start_mark.line + 1
            self.issues.append(ConfigIssue(self.display, line, path, message))

    def warn(self, where: Node | int, path: str, message: str) -> None:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        if len(self.warnings) < MAX_ISSUES_PER_FILE:
            self.warnings.append(ConfigIssue(self.display, line, path, message))

    def reported(self) -> list[ConfigIssue]:
        """The issues in line order, with one more saying how many were left out."""
        out = sorted(self.issues, key=lambda i: i.line)
        if self.n_issues > len(self.issues):
            out.append(ConfigIssue(self.display, 0, "", f"{self.n_issues - len(self.issues)} more problem(s) in "
                                                        f"this file not shown (at most {MAX_ISSUES_PER_FILE} "
                                                        "are reported per file)"))
        return out

    def source(self, node: Node) -> str:
        return f"{self.display}:{node.start_mark.line + 1}"

    # -- node helpers ---------------------------------------------------

    def construct(self, node: ScalarNode) -> object:
        """The Python value of a scalar, or a marker saying why it has none; never raises.

        Numbers longer than :data:`~memguard.units.MAX_NUMBER_CHARS` are
        not converted at all: PyYAML turns ``1:2:3:...`` (base 60) and
        thousands of digits into integers at quadratic cost, and Python
        refuses to convert more than 4300 digits.
        """
        if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            return _Unreadable(f"a number of {len(node.value)} characters (the longest memguard reads is "
                               f"{MAX_NUMBER_CHARS})")
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            return _Unsupported(node.tag)
        except Exception as e:  # a date with month 13, and the like
            return _Unreadable(f"a value YAML cannot read as {node.tag.rpartition(':')[2]} ({_clip_text(str(e))})")

    @staticmethod
    def is_null(node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def _pairs(self, node: MappingNode, seen: set[int] | None = None, depth: int = 0) -> list[tuple[Node, Node]]:
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
                    if not isinstance(src, MappingNode):
                        self.issue(src, "<<", f"expected a mapping to merge, got {_describe_node(src)}")
                    elif depth >= MAX_YAML_DEPTH:
                        self.issue(src, "<<", f"merges nested deeper than {MAX_YAML_DEPTH} levels")
                    else:
                        merged.extend(self._pairs(src, seen, depth + 1))
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
        max_items: int = MAX_LIST_ITEMS,
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
        pairs = self._pairs(node)
        if not self.visit(node, path, len(pairs)):
            return None
        if len(pairs) > max_items:
            self.issue(node, path, f"expected {what}, got a mapping of {len(pairs)} entries; "
                                   f"at most {max_items} are read")
            return None
        out: _Entries = {}
        for knode, vnode in pairs:
            key = self.construct(knode) if isinstance(knode, ScalarNode) else None
            if not isinstance(key, str):
                shown = _describe(key) if isinstance(knode, ScalarNode) else _describe_node(knode)
                self.issue(knode, path, f"expected a key name, got {shown}")
                continue
            kpath = _join(path, _key_text(key))
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.issue(knode, kpath, f"duplicate key {_clip(key)} (first given at line {first}); give it once")
                continue
            if allowed is not None and key not in allowed:
                shown = self._unknown_key(key, allowed, elsewhere) if len(self.issues) < MAX_ISSUES_PER_FILE \
                    else "unknown key"  # not reported: spare the suggestion
                self.issue(knode, kpath, shown)
                continue
            out[key] = (knode, vnode)
        return out

    @staticmethod
    def _unknown_key(key: str, allowed: tuple[str, ...], elsewhere: Mapping[str, str] | None) -> str:
        msg = f"unknown key {_clip(key)}"
        if elsewhere and key in elsewhere:
            return f"{msg}: {elsewhere[key]}"
        hint = suggest(key, allowed) if len(key) <= _SHOWN_CHARS else None
        if hint:
            return f"{msg} (did you mean {hint!r}?)"
        return f"{msg}; known keys here: {', '.join(allowed)}"

    def sequence(self, node: Node, path: str, what: str, max_items: int = MAX_LIST_ITEMS) -> list[Node] | None:
        """Read a list node; a null node reads as an empty list. None if ``node`` is no list."""
        if self.is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            got = _describe(self.construct(node)) if isinstance(node, ScalarNode) else _describe_node(node)
            self.issue(node, path, f"expected {what}, got {got}")
            return None
        if len(node.value) > max_items:
            self.issue(node, path, f"expected {what}, got a list of {len(node.value)} items; "
                                   f"at most {max_items} are read")
            return None
        if not self.visit(node, path, len(node.value)):
            return None
        return list(node.value)

    def visit(self, node: Node, path: str, n: int) -> bool:
        """Take ``n`` entries from the budget of :data:`MAX_VISITS`; False (and an issue) past it."""
        self.budget.visits -= n
        if self.budget.visits >= 0:
            return True
        if self.budget.visits + n >= 0:  # the first to go past: say it once
            self.issue(node, path, f"more than {MAX_VISITS} entries to check in this configuration (aliases "
                                   "repeating large values?); the rest is not read")
        return False

    def value(self, node: Node, path: str, parse: Callable[[object], T], expected: str) -> T:
        """Read a scalar and convert it with ``parse``; returns BAD after recording an error.

        This is the error boundary of every value: whatever ``parse``
        raises becomes an issue at ``path`` saying what was expected.
        """
        if not isinstance(node, ScalarNode):
            self.issue(node, path, f"expected {expected}, got {_describe_node(node)}")
            return BAD
        raw = self.construct(node)
        try:
            return parse(raw)
        except (UnitError, ValueError) as e:
            self.issue(node, path, str(e))
        except Exception:
            self.issue(node, path, f"expected {expected}, got {_describe(raw)}")
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

    def field(self, entries: _Entries, section: Section, key: str, path: str) -> Any:
        """The value of a scalar key of ``section``, read with the kind its table gives: None when absent."""
        kind = section.keys[key].kind
        assert isinstance(kind, Kind), f"{key} is not a scalar key"
        return self.get(entries, key, path, kind.parse, kind.expected)

    def line_of(self, entries: _Entries, key: str) -> int | None:
        return entries[key][1].start_mark.line + 1 if key in entries else None


def _clip_text(text: str) -> str:
    """Text (not quoted) cut short for a message."""
    return text if len(text) <= 200 else text[:180] + f"... ({len(text)} characters)"


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


_RULE_ELSEWHERE = {
    "fire": "did you mean 'when'?",
    "if": "did you mean 'when'?",
    "then": "did you mean 'action'?",
    "stop_signal": "a rule has no stop signal; set stop_signal on the workload",
    "limits": "limits belong to the workload, not to a rule",
}


def _read_rules(f: _File, node: Node, scope: str, prefix: str = "") -> list[_RuleDraft]:
    """Read a ``rules:`` list of scope "system" or "worker" (``prefix``: where the list sits, for messages)."""
    spec = _RULES
    items = f.sequence(node, f"{prefix}rules", spec.what, max_items=spec.max_items)
    if items is None:
        return []
    drafts: list[_RuleDraft] = []
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"{prefix}rules[{i}]"
        before = f.n_issues
        entries = f.mapping(item, path, RULE_KEYS, what=_RULE_EXAMPLE, elsewhere=_RULE_ELSEWHERE)
        if entries is None:
            continue
        name = f.field(entries, RULE_SECTION, "name", path)
        if _ok(name):
            if name in names:
                f.issue(entries["name"][1], f"{path}.name",
                        f"rule name {_clip(name)} is already used by the rule at line {names[name]}")
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
            action = f.field(entries, RULE_SECTION, "action", path)
            action = ActionKind(action) if _ok(action) else None

        for_s = f.field(entries, RULE_SECTION, "for", path)
        release_text: Any = None
        release: Expr | None = None
        if "release" in entries:
            release_text, release = _read_expr(f, entries["release"][1], f"{path}.release", scope)
            if action is not None and not action.is_level and release is not None:
                f.warn(entries["release"][0], f"{path}.release",
                       f"release has no effect on action {action.value}: only block and warn hold until "
                       "released; a stopping action ends when the worker stops")

        within_s = f.field(entries, RULE_SECTION, "within", path)
        if "within" in entries and when is not None and _ok(within_s) and not _has_trend(when):
            f.warn(entries["within"][0], f"{path}.within",
                   "within has no effect here: only memory.available falling (<, <=), memory.used or "
                   "worker.memory rising (>, >=) move with a trend; the other readings are taken as they are")
        grace_s = f.field(entries, RULE_SECTION, "grace", path)
        if "grace" in entries and action is not None and action not in GRACE_ACTIONS:
            f.issue(entries["grace"][0], f"{path}.grace",
                    f"grace has no meaning for action {action.value}: only terminate and restart wait "
                    "a grace period between the stop signal and SIGKILL")

        for key, expr in (("when", when), ("release", release)):
            if expr is not None and any(c.signal.startswith("gpu.") or c.signal == "worker.gpu_memory"
                                        for c in comparisons(expr)):
                f.gpu_refs.append((entries[key][1].start_mark.line + 1, f"{path}.{key}", str(entries[key][1].value)))

        rule = None
        if f.n_issues == before and when is not None and action is not None:
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
                within_s=within_s if _ok(within_s) else None,
            )
        drafts.append(_RuleDraft(i, item, entries, rule))
    return drafts


def _has_trend(expr: Expr) -> bool:
    """Does ``expr`` compare a reading that moves with a trend, in the direction of filling (decide.trend)?"""
    for c in comparisons(expr):
        if c.signal == "memory.available" and c.op in ("<", "<="):
            return True
        if c.signal in ("memory.used", "worker.memory") and c.op in (">", ">="):
            return True
    return False


def _check_releases(f: _File, drafts: list[_RuleDraft], bases: Mapping[str, float]) -> None:
    """A release that can hold while when holds makes a block or warn rule flap: an error, with a reading."""
    for d in drafts:
        r = d.rule
        if r is None or r.release is None or not r.action.is_level:
            continue
        why = find_overlap(r.when, r.release, bases)
        if why:
            f.issue(d.entries["release"][1], f"rules[{d.index}].release",
                    f"{_clip(r.release_text or '')} overlaps when {_clip(r.when_text)}: {why}")


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


_BARE_NUMBER_END = re.compile(r"(?:^|[\s<>=!])([0-9]+(?:\.[0-9]*)?|\.[0-9]+)$", re.ASCII)


def _comparison_problem(c: Comparison) -> str | None:
    """Comparisons that parse but cannot mean what was written: a guard that never fires."""
    spec = SIGNALS.get(c.signal)
    if spec is None:
        return None
    m = _BARE_NUMBER_END.search(c.text[-80:])
    if spec.unit == "bytes" and c.unit == "bytes" and m and c.threshold != 0:
        n = m.group(1)
        pct = f" or a percent sign ({n}%)" if float(n) <= 100 and spec.percent_ok else ""
        return (f"{_clip(c.text)} compares a size with a bare number, which would mean {n} bytes: "
                f"add a unit ({n}MiB, {n}GiB){pct}")
    if c.unit == "percent" and c.threshold > 100 and spec.percent_of != "limits.memory" and c.signal != "worker.cpu":
        return f"{_clip(c.text)} is decided in advance: {c.signal} is never above 100%"
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


def _read_command(f: _File, node: Node) -> tuple[str, ...] | None:
    spec = WORKLOAD_SECTION.keys["command"].kind
    assert isinstance(spec, ListOf) and isinstance(spec.item, Kind)
    if f.is_null(node):
        f.issue(node, "command", f"expected {_COMMAND_EXAMPLE}, got nothing")
        return None
    if isinstance(node, ScalarNode) and isinstance(f.construct(node), str):
        text = str(f.construct(node))
        if len(text) > MAX_TEXT_CHARS:
            f.issue(node, "command", f"expected {_COMMAND_EXAMPLE}, got the single string {_clip(text)}: "
                                     "write it as a list")
            return None
        try:
            words = shlex.split(text)
        except ValueError:
            words = text.split()
        shown = yaml.safe_dump(words or ["python3", "train.py"], default_flow_style=True, width=1 << 30).strip()
        f.issue(node, "command",
                f"expected {_COMMAND_EXAMPLE}, got the single string {text!r}: "
                f"write it as a list, e.g. command: {shown}")
        return None
    items = f.sequence(node, "command", _COMMAND_EXAMPLE, max_items=spec.max_items)
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
                shown_value = item.value if len(item.value) <= _SHOWN_CHARS else item.value[:_SHOWN_CHARS] + "..."
                f.issue(item, path, f"expected a string, got {_describe(v)}: put it in quotes, e.g. \"{shown_value}\"")
                ok = False
                continue
        s = f.value(item, path, spec.item.parse, spec.item.expected)
        if s is BAD:
            ok = False
        elif "\0" in s:
            f.issue(item, path, "expected a string without NUL characters (the kernel cannot pass them)")
            ok = False
        else:
            out.append(s)
    return tuple(out) if ok else None


def _read_environment(f: _File, node: Node) -> tuple[tuple[str, str], ...] | None:
    spec = WORKLOAD_SECTION.keys["environment"].kind
    assert isinstance(spec, MapOf)
    entries = f.mapping(node, "environment", None, what=spec.what, max_items=spec.max_items)
    if entries is None:
        return None
    out: list[tuple[str, str]] = []
    ok = True
    for key, (knode, vnode) in entries.items():
        path = f"environment.{_key_text(key)}"
        if not _ENV_NAME.match(key) or len(key) > MAX_TEXT_CHARS:
            f.issue(knode, path, f"expected a variable name of letters, digits and '_', got {_clip(key)}")
            ok = False
            continue
        if isinstance(vnode, ScalarNode):
            v = f.construct(vnode)
            if not isinstance(v, str):
                if v is None:
                    f.issue(vnode, path, f'expected a string, got nothing: write {key}: "" for an empty value')
                elif len(vnode.value) <= _SHOWN_CHARS:
                    f.issue(vnode, path, f'expected a string, got {_describe(v)}: write it in quotes: '
                                         f'{key}: "{vnode.value}"')
                else:
                    f.issue(vnode, path, f"expected a string, got {_describe(v)}: write it in quotes")
                ok = False
                continue
            if len(v) > MAX_ARG_BYTES or _utf8_len(v) > MAX_ARG_BYTES:
                f.issue(vnode, path, f"expected a value of at most {MAX_ARG_BYTES} bytes (the kernel's "
                                     "MAX_ARG_STRLEN), got a longer one")
                ok = False
                continue
            if "\0" in v:
                f.issue(vnode, path, "expected a string without NUL characters (the kernel cannot pass them)")
                ok = False
                continue
            out.append((key, v))
        else:
            f.issue(vnode, path, f"expected a string, got {_describe_node(vnode)}")
            ok = False
    return tuple(sorted(out)) if ok else None


def _read_limits(f: _File, node: Node) -> tuple[Limits | None, bool]:
    """The limits (None on error) and whether limits.memory is set."""
    S = LIMITS_SECTION
    entries = f.mapping(node, "limits", S.names, what=S.what)
    if entries is None:
        return None, True  # do not pile a second error on the rules
    memory = f.field(entries, S, "memory", "limits")
    runtime = f.field(entries, S, "runtime", "limits")
    high = f.field(entries, S, "memory_high", "limits")
    swap = f.field(entries, S, "swap", "limits")
    cpu = f.field(entries, S, "cpu", "limits")
    gpu_memory = f.field(entries, S, "gpu_memory", "limits")
    has_memory = "memory" in entries
    if "memory_high" in entries:
        f.memory_high_refs.append((entries["memory_high"][0].start_mark.line + 1, "limits.memory_high"))
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


def _read_unmanaged(f: "_File", node: Node) -> tuple[UnmanagedMatch, ...] | None:
    spec = DAEMON_SECTION.keys["unmanaged"].kind
    assert isinstance(spec, ListOf)
    S = UNMANAGED_SECTION
    items = f.sequence(node, "unmanaged", spec.what, max_items=spec.max_items)
    if items is None:
        return None
    out = []
    bad = False
    for i, item in enumerate(items):
        path = f"unmanaged[{i}]"
        entries = f.mapping(item, path, S.names, what=S.what)
        if entries is None:
            bad = True
            continue
        cmdline = f.field(entries, S, "cmdline", path)
        user = f.field(entries, S, "user", path)
        cgroup = f.field(entries, S, "cgroup", path)
        priority = f.field(entries, S, "priority", path)
        name = f.field(entries, S, "name", path)
        if BAD in (cmdline, user, cgroup, priority, name):
            bad = True
            continue
        if cmdline is None and user is None and cgroup is None:
            f.issue(item, path, "expected at least one of cmdline:, user:, cgroup: (matching every process is "
                                "never what you want)")
            bad = True
            continue
        rules: tuple[Rule, ...] = ()
        if "rules" in entries:
            before = f.n_issues
            drafts = _read_rules(f, entries["rules"][1], "worker", prefix=f"{path}.")
            for d in drafts:
                for key in ("when", "release"):
                    expr = d.rule.when if d.rule is not None and key == "when" else (
                        d.rule.release if d.rule is not None else None)
                    if expr is not None and any(c.unit == "percent" and c.signal == "worker.memory"
                                                for c in comparisons(expr)):
                        f.issue(d.entries[key][1], f"{path}.rules[{d.index}].{key}",
                                "a percentage of worker.memory is of limits.memory, which a matched process does "
                                "not have: compare with a size such as 6GiB")
            if f.n_issues != before or any(d.rule is None for d in drafts):
                bad = True
                continue
            rules = tuple(d.rule for d in drafts if d.rule is not None)
        out.append(UnmanagedMatch(cmdline=cmdline, user=user, cgroup=cgroup, priority=priority or 0,
                                  name=name or f"unmanaged[{i}]", rules=rules))
    return None if bad else tuple(out)


def _read_restart(f: _File, node: Node) -> RestartPolicy | None:
    S = RESTART_SECTION
    entries = f.mapping(node, "restart", S.names, what=S.what)
    if entries is None:
        return None
    base = RestartPolicy()
    mode = f.field(entries, S, "policy", "restart")
    backoff = f.field(entries, S, "backoff", "restart")
    budget = f.field(entries, S, "budget", "restart")
    planned = f.field(entries, S, "planned", "restart")
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
    S = BRAKE_SECTION
    if isinstance(node, ScalarNode) and not f.is_null(node):
        assert S.scalar is not None
        on = f.value(node, "restart_when_blocked", S.scalar.parse, S.what)
        return None if on is BAD else Brake(enabled=on)
    entries = f.mapping(node, "restart_when_blocked", S.names, what=S.what)
    if entries is None:
        return None
    refusals = f.field(entries, S, "refusals", "restart_when_blocked")
    after = f.field(entries, S, "after", "restart_when_blocked")
    if BAD in (refusals, after):
        return None
    if refusals is None and after is None:
        f.issue(node, "restart_when_blocked", "expected after: (a duration), e.g. {after: 30s}, or true")
        return None
    return Brake(enabled=True, after_s=after if after is not None else Brake().after_s, refusals=refusals)


def _read_recycle(f: _File, node: Node) -> Recycle | None:
    S = RECYCLE_SECTION
    entries = f.mapping(node, "recycle", S.names, what=S.what)
    if entries is None:
        return None
    max_trials = f.field(entries, S, "max_trials", "recycle")
    max_age = f.field(entries, S, "max_age", "recycle")
    jitter = f.field(entries, S, "jitter", "recycle")
    if BAD in (max_trials, max_age, jitter):
        return None
    if max_trials is None and max_age is None:
        f.issue(node, "recycle", "expected max_trials:, max_age: or both, e.g. {max_trials: 50, max_age: 60m}")
        return None
    return Recycle(max_trials=max_trials, max_age_s=max_age,
                   jitter=jitter if jitter is not None else Recycle().jitter)


def _read_list(f: _File, entries: _Entries, section: Section, key: str) -> tuple[str, ...] | None:
    """A list of scalars of one kind (``protect``, ``gpus``): () when absent, None when wrong."""
    if key not in entries:
        return ()
    spec = section.keys[key].kind
    assert isinstance(spec, ListOf) and isinstance(spec.item, Kind)
    items = f.sequence(entries[key][1], key, spec.what, max_items=spec.max_items)
    if items is None:
        return None
    vals = [f.value(n, f"{key}[{i}]", spec.item.parse, spec.item.expected) for i, n in enumerate(items)]
    return None if BAD in vals else tuple(vals)


def _read_workload(f: _File, root: Node) -> WorkloadPolicy | None:
    """Build a WorkloadPolicy from a composed workload file; None when it has errors."""
    S = WORKLOAD_SECTION
    before = f.n_issues
    entries = f.mapping(root, "", S.names, what=S.what, elsewhere=_WORKLOAD_ELSEWHERE)
    if entries is None:
        return None

    if "name" in entries:
        name = f.field(entries, S, "name", "")
    else:
        stem = os.path.splitext(os.path.basename(f.display))[0]
        if _WORKLOAD_NAME.match(stem) and len(stem) <= MAX_NAME_CHARS:
            name = stem
        else:
            f.issue(root, "name", f"missing, and the file name {_clip(stem)} cannot serve as one: "
                                  f"set name: to letters, digits, '_', '.' and '-' (at most {MAX_NAME_CHARS})")
            name = BAD

    command = None
    if "command" not in entries:
        f.issue(root, "command", f"missing: every workload needs a command, {_COMMAND_EXAMPLE}")
    else:
        command = _read_command(f, entries["command"][1])

    replicas = f.field(entries, S, "replicas", "")
    priority = f.field(entries, S, "priority", "")
    user = f.field(entries, S, "user", "")
    group = f.field(entries, S, "group", "")
    working_dir = f.field(entries, S, "working_dir", "")
    environment = _read_environment(f, entries["environment"][1]) if "environment" in entries else ()
    limits, has_memory = _read_limits(f, entries["limits"][1]) if "limits" in entries else (Limits(), False)
    grace = f.field(entries, S, "grace", "")
    stop_signal = f.field(entries, S, "stop_signal", "")
    restart = _read_restart(f, entries["restart"][1]) if "restart" in entries else RestartPolicy()
    drafts = _read_rules(f, entries["rules"][1], "worker") if "rules" in entries else []
    brake = _read_brake(f, entries["restart_when_blocked"][1]) if "restart_when_blocked" in entries else Brake()
    recycle = _read_recycle(f, entries["recycle"][1]) if "recycle" in entries else Recycle()
    trial_timeout = f.field(entries, S, "trial_timeout", "")
    heartbeat_timeout = f.field(entries, S, "heartbeat_timeout", "")
    growth_window = f.field(entries, S, "growth_window", "")
    reclaim_interval = f.field(entries, S, "reclaim_interval", "")
    oom_adj = f.field(entries, S, "oom_score_adj", "")
    gpus = _read_list(f, entries, S, "gpus")

    # A percentage of worker.gpu_memory is a percentage of limits.gpu_memory.
    if limits is not None and limits.gpu_memory_bytes is None:
        for d in drafts:
            if d.rule is None:
                continue
            for c in comparisons(d.rule.when):
                if c.signal == "worker.gpu_memory" and c.unit == "percent":
                    f.issue(d.entries["when"][1], f"rules[{d.index}].when",
                            f"{_clip(c.text)} is a percentage of limits.gpu_memory, which this workload does not "
                            "set: set limits.gpu_memory, or compare with a size such as 6GiB")
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
                                f"{_clip(c.text)} is a percentage of limits.memory, which this workload does not "
                                "set: set limits.memory, or compare with a size such as 6GiB")
                        break
    if limits is not None:
        bases = {k: float(v) for k, v in (("limits.memory", limits.memory_bytes),
                                          ("limits.gpu_memory", limits.gpu_memory_bytes)) if v is not None}
        _check_releases(f, drafts, bases)

    abs_working_dir = _resolve(f.dir, working_dir) if _ok(working_dir) else None
    if f.host is not None and f.n_issues == before and command is not None:
        _host_checks(f, entries, command, user, group, abs_working_dir, environment or ())

    if f.n_issues != before or command is None or name is BAD:
        return None
    return WorkloadPolicy(
        name=name,
        command=command,
        replicas=replicas if replicas is not None else _default(WorkloadPolicy, "replicas"),
        priority=priority if priority is not None else _default(WorkloadPolicy, "priority"),
        user=user,
        group=group,
        working_dir=abs_working_dir,
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


class _DaemonRead(NamedTuple):
    """What a daemon file gave: its DaemonPolicy fields (None when it has errors), the
    workload directory (relative to the current directory, or absolute where the file
    gave it so), the node that named it, and the settings warnings depend on."""

    fields: dict[str, Any] | None
    workloads_dir: str | None
    workloads_node: Node | None
    gpu: str
    worker_cgroups: str


def _read_daemon(f: _File, root: Node) -> _DaemonRead:
    """Read a composed daemon file."""
    S = DAEMON_SECTION
    before = f.n_issues
    entries = f.mapping(root, "", S.names, what=S.what, elsewhere=_DAEMON_ELSEWHERE)
    base = DaemonPolicy()
    if entries is None:
        return _DaemonRead(None, None, None, base.gpu, base.worker_cgroups)
    poll = f.field(entries, S, "poll_interval", "")
    fast = f.field(entries, S, "fast_poll_interval", "")
    min_fast = f.field(entries, S, "min_fast_path_interval", "")
    scope = f.field(entries, S, "scope", "")
    workloads = f.field(entries, S, "workloads", "")
    dry_run = f.field(entries, S, "dry_run", "")
    delay = f.field(entries, S, "post_action_delay", "")
    fill = f.field(entries, S, "max_fill_rate", "")
    runtime_dir = f.field(entries, S, "runtime_dir", "")
    worker_cgroups = f.field(entries, S, "worker_cgroups", "")
    own_oom = f.field(entries, S, "oom_score_adj", "")
    mlock = f.field(entries, S, "mlock", "")
    gpu = f.field(entries, S, "gpu", "")
    metrics_file = f.field(entries, S, "metrics_file", "")
    state_dir = f.field(entries, S, "state_dir", "")
    recorder_window = f.field(entries, S, "recorder_window", "")
    unmanaged = _read_unmanaged(f, entries["unmanaged"][1]) if "unmanaged" in entries else ()
    protect = _read_list(f, entries, S, "protect")
    alerts = _read_alerts(f, entries["alerts"][1]) if "alerts" in entries else ()
    metrics_listen = None
    if "metrics" in entries:
        got = f.mapping(entries["metrics"][1], "metrics", METRICS_SECTION.names, what=METRICS_SECTION.what)
        metrics_listen = f.field(got, METRICS_SECTION, "listen", "metrics") if got is not None else None

    log_format = log_level = None
    if "log" in entries:
        log = f.mapping(entries["log"][1], "log", LOG_KEYS, what=LOG_SECTION.what)
        if log is not None:
            log_format = f.field(log, LOG_SECTION, "format", "log")
            log_level = f.field(log, LOG_SECTION, "level", "log")

    drafts = _read_rules(f, entries["rules"][1], "system") if "rules" in entries else []
    _check_releases(f, drafts, {})

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
    eff_gpu = gpu if _ok(gpu) else base.gpu
    eff_cgroups = worker_cgroups if _ok(worker_cgroups) else base.worker_cgroups
    if f.n_issues != before:
        return _DaemonRead(None, shown_dir, wnode, eff_gpu, eff_cgroups)
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
        metrics_listen=metrics_listen if _ok(metrics_listen) else base.metrics_listen,
        alerts=alerts or (),
        state_dir=_resolve(f.dir, state_dir) if state_dir is not None else base.state_dir,
        recorder_window_s=recorder_window if recorder_window is not None else base.recorder_window_s,
        source=f"{f.display}:1",
    )
    return _DaemonRead(fields, shown_dir, wnode, eff_gpu, eff_cgroups)


def _read_alerts(f: _File, node: Node) -> tuple[AlertHook, ...] | None:
    """``alerts:``: a list of hooks, each exactly one of a webhook and a command."""
    spec = DAEMON_SECTION.keys["alerts"].kind
    assert isinstance(spec, ListOf)
    S = ALERT_SECTION
    items = f.sequence(node, "alerts", spec.what, max_items=spec.max_items)
    if items is None:
        return None
    out: list[AlertHook] = []
    bad = False
    d = AlertHook(name="")
    for i, item in enumerate(items):
        path = f"alerts[{i}]"
        before = f.n_issues
        entries = f.mapping(item, path, S.names, what=S.what)
        if entries is None:
            bad = True
            continue
        vals = {k: f.field(entries, S, k, path) for k in ("name", "webhook", "severity", "dedup", "min_interval",
                                                           "max_per_hour", "timeout", "retries", "backoff")}
        argv = _read_list(f, entries, S, "exec")
        events = _read_list(f, entries, S, "events")
        headers: tuple[tuple[str, str], ...] = ()
        if "headers" in entries:
            spec_h = S.keys["headers"].kind
            assert isinstance(spec_h, MapOf)
            got = f.mapping(entries["headers"][1], f"{path}.headers", None, what=spec_h.what)
            pairs = []
            for k, (knode, vnode) in (got or {}).items():
                if not _HEADER_NAME.fullmatch(str(k)):
                    f.issue(knode, f"{path}.headers", f"header {_clip_text(str(k))!r}: expected a header name "
                                                      "(letters, digits, -)")
                    continue
                pairs.append((str(k), f.value(vnode, f"{path}.headers.{k}", spec_h.value.parse,
                                              spec_h.value.expected)))
            headers = tuple((k, v) for k, v in pairs if v is not BAD)
        if ("webhook" in entries) == ("exec" in entries):
            f.issue(item, path, "give exactly one of webhook: (a URL) or exec: (a command as a list)")
        if f.n_issues != before or BAD in vals.values() or argv is None or events is None:
            bad = True
            continue
        out.append(AlertHook(
            name=vals["name"] or path, webhook=vals["webhook"], exec=argv or (), events=events or (),
            severity=vals["severity"] if vals["severity"] is not None else d.severity,
            dedup_s=vals["dedup"] if vals["dedup"] is not None else d.dedup_s,
            min_interval_s=vals["min_interval"] if vals["min_interval"] is not None else d.min_interval_s,
            max_per_hour=vals["max_per_hour"] if vals["max_per_hour"] is not None else d.max_per_hour,
            timeout_s=vals["timeout"] if vals["timeout"] is not None else d.timeout_s,
            retries=vals["retries"] if vals["retries"] is not None else d.retries,
            backoff_s=vals["backoff"] if vals["backoff"] is not None else d.backoff_s,
            headers=headers, source=f.source(item)))
    return None if bad else tuple(out)


# --------------------------------------------------------------------------
# Checks against the machine `memguard check` runs on. Only check_config
# makes them (load_config stays a pure function of the files); they say
# what would fail when a worker starts here, and what would have no effect.

_GPU_PROBE_TIMEOUT_S = 10.0  # NVML start-up without persistence mode takes seconds per GPU; check should not hang


class _Host:
    """Facts about this machine, each looked up once, the way the daemon will look them up."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self._gpu: tuple[str | None] | None = None
        self._cgroup: tuple[int | None] | None = None

    @staticmethod
    def user_problem(user: str, group: str | None) -> str | None:
        """Why ``user`` cannot run a worker here, or None (as act.children resolves it)."""
        import pwd

        try:
            if user.isdigit():
                pwd.getpwuid(int(user))
            else:
                pwd.getpwnam(user)
        except KeyError:
            if user.isdigit():
                if group is not None:
                    return None  # a bare uid with an explicit group runs as is
                return (f"user id {user} has no entry in this machine's user database, so it has no primary group: "
                        "add the user, or give group:")
            return f"user {user!r} does not exist on this machine (add it, or check with --no-host-checks elsewhere)"
        except (OverflowError, ValueError):
            return f"user id {user} is out of range"
        return None

    @staticmethod
    def group_problem(group: str) -> str | None:
        import grp

        if group.isdigit():
            return None  # a bare gid is used as is
        try:
            grp.getgrnam(group)
        except KeyError:
            return f"group {group!r} does not exist on this machine (add it, or check with --no-host-checks elsewhere)"
        return None

    @staticmethod
    def dir_problem(path: str) -> str | None:
        if os.path.isdir(path):
            return None
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        return f"the working directory {path} {what}"

    def command_problem(self, cmd: str, env: Mapping[str, str], cwd: str | None) -> str | None:
        """Why ``cmd`` would not start here: found the way execvp() will find it (act.children does the same)."""
        try:
            base = cwd or os.getcwd()
        except OSError:
            base = "/"
        if "/" in cmd:
            path = cmd if os.path.isabs(cmd) else os.path.join(base, cmd)
            if not os.path.exists(path):
                return f"the command {cmd!r} does not exist" + (f" (relative to {base})" if not os.path.isabs(cmd)
                                                                else "")
            if os.path.isdir(path) or not os.access(path, os.X_OK):
                return f"the command {cmd!r} is not executable"
            return None
        search = env.get("PATH", self.environ.get("PATH", os.defpath))
        dirs = [d if os.path.isabs(d) else os.path.join(base, d or ".") for d in search.split(os.pathsep)]
        import shutil

        if shutil.which(cmd, path=os.pathsep.join(dirs)) is None:
            return f"the command {cmd!r} is not found in PATH={_clip_text(search)}"
        return None

    def gpu_off_reason(self) -> str | None:
        """Why GPU sensing would be off here (one sentence), or None when NVML answers."""
        if self._gpu is None:
            reason: str | None
            try:
                from .sense.gpu import GpuSensor

                sensor = GpuSensor(start_timeout_s=_GPU_PROBE_TIMEOUT_S)
                try:
                    started = sensor.start()
                finally:
                    sensor.close()
                reason = None if started.enabled else (started.reason or "NVML is not available")
            except Exception as e:  # a broken binding: sensing would be off as well
                reason = f"NVML start-up failed: {_clip_text(str(e))}"
            self._gpu = (reason,)
        return self._gpu[0]

    def cgroup_version(self) -> int | None:
        """The version of the memory cgroup hierarchy here (1 or 2), or None without one."""
        if self._cgroup is None:
            try:
                from .sense.cgroup import find_own_cgroup

                own = find_own_cgroup()
                self._cgroup = (own.version if own is not None else None,)
            except Exception:
                self._cgroup = (None,)
        return self._cgroup[0]


def _host_checks(f: _File, entries: _Entries, command: tuple[str, ...], user: Any, group: Any,
                 working_dir: str | None, environment: tuple[tuple[str, str], ...]) -> None:
    """Errors for what would fail when a worker of this workload starts on this machine."""
    host = f.host
    assert host is not None
    if _ok(user) and (problem := host.user_problem(user, group if _ok(group) else None)):
        f.issue(entries["user"][1], "user", problem)
    if _ok(group) and (problem := host.group_problem(group)):
        f.issue(entries["group"][1], "group", problem)
    if working_dir is not None and (problem := host.dir_problem(working_dir)):
        f.issue(entries["working_dir"][1], "working_dir", problem)
        return  # the command is looked up relative to it
    problem = host.command_problem(command[0], dict(environment), working_dir)
    if problem:
        node = entries["command"][1]
        first = node.value[0] if isinstance(node, SequenceNode) and node.value else node
        f.issue(first, "command[0]", problem)


# --------------------------------------------------------------------------
# Putting files together


class _TooManyFiles(Exception):
    def __init__(self, count: int) -> None:
        self.count = count


def _yaml_files(directory: str, limit: int = MAX_WORKLOAD_FILES) -> list[str]:
    """The ``*.yaml`` and ``*.yml`` files of a directory (not hidden ones), sorted by file name.

    Raises :class:`_TooManyFiles` past ``limit`` names, before looking at any of them.
    """
    names = sorted(n for n in os.listdir(directory) if n.endswith(YAML_SUFFIXES) and not n.startswith("."))
    if len(names) > limit:
        files = [n for n in names[:limit + 1] if os.path.isfile(os.path.join(directory, n))]
        if len(files) > limit:
            raise _TooManyFiles(len(names))
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))]


def _display(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.fspath(path))


def _internal(e: BaseException) -> str:
    """A defect of this module met while reading a file: what the user sees instead of a traceback."""
    if isinstance(e, RecursionError):
        what = "the file is nested too deeply to read"
    elif isinstance(e, MemoryError):
        what = "reading the file ran out of memory"
    else:
        what = f"memguard failed to read it ({type(e).__name__}: {_clip_text(str(e))}); please report this"
    return f"cannot be read: {what}; the file is refused"


class _Session:
    """All files of one load or check: their issues in file order, their warnings."""

    def __init__(self, host: _Host | None = None) -> None:
        self.files: list[_File] = []
        self.host = host
        self._cache: dict[str, _File] = {}
        self.budget = _Budget()
        self.gpu_setting: tuple[str, str] | None = None  # (value, daemon file) of the daemon's gpu:
        self.cgroups_setting: tuple[str, str] | None = None  # (value, daemon file) of worker_cgroups:

    def read(self, display: str) -> _File:
        """Read and compose a file once; it is reported only once :meth:`open` names it."""
        f = self._cache.get(display)
        if f is None:
            f = _File(display, self.host, self.budget)
            try:
                f.load()
            except Exception as e:
                f.issue(0, "", _internal(e))
                f.root = None
            self._cache[display] = f
        return f

    def open(self, display: str) -> _File:
        f = self.read(display)
        if f not in self.files:
            self.files.append(f)
        return f

    @property
    def issues(self) -> list[ConfigIssue]:
        out: list[ConfigIssue] = []
        for f in self.files:
            out.extend(f.reported())
        return out

    def workloads(self, paths: list[str]) -> list[WorkloadPolicy]:
        """Load workload files and check their names are unique across them."""
        out: list[WorkloadPolicy] = []
        first: dict[str, str] = {}
        for p in paths:
            f = self.open(p)
            if f.root is None:
                continue
            try:
                w = _read_workload(f, f.root)
                # Uniqueness of names, also for files with other errors.
                name_node = _top_key(f, "name")
                name = w.name if w is not None else _plain_name(f, name_node)
            except Exception as e:
                f.issue(0, "", _internal(e))
                continue
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
        try:
            got = _read_daemon(f, f.root)
        except Exception as e:
            f.issue(0, "", _internal(e))
            return None
        if self.gpu_setting is None:
            self.gpu_setting = (got.gpu, f.display)
            self.cgroups_setting = (got.worker_cgroups, f.display)
        wdir, wnode = got.workloads_dir, got.workloads_node
        workloads: list[WorkloadPolicy] = []
        if wdir is not None and wnode is not None:
            if not os.path.isdir(wdir):
                what = "is not a directory" if os.path.exists(wdir) else "does not exist"
                f.issue(wnode, "workloads", f"the workload directory {wdir} {what}")
            else:
                me = os.path.realpath(path)
                try:
                    paths = [p for p in _yaml_files(wdir, MAX_WORKLOAD_FILES + 1) if os.path.realpath(p) != me]
                except OSError as e:
                    f.issue(wnode, "workloads", f"the workload directory {wdir} cannot be read: {e.strerror or e}")
                    paths = []
                except _TooManyFiles as e:
                    paths = [""] * e.count
                if len(paths) > MAX_WORKLOAD_FILES:
                    f.issue(wnode, "workloads", f"the workload directory {wdir} holds {len(paths)} YAML files; "
                                                f"memguard reads at most {MAX_WORKLOAD_FILES}")
                    paths = []
                workloads = self.workloads(paths)
        if got.fields is None or self.issues:
            return None
        return DaemonPolicy(**got.fields, workloads=tuple(workloads))

    def warnings(self) -> list[ConfigIssue]:
        """What will have no effect: rules on GPU signals without GPU sensing, memory_high without cgroup v2."""
        out: list[ConfigIssue] = []
        gpu_reason = None
        if any(f.gpu_refs for f in self.files):
            if self.gpu_setting is not None and self.gpu_setting[0] == "off":
                gpu_reason = f"GPU sensing is off (gpu: off in {self.gpu_setting[1]})"
            elif self.host is not None:
                why = self.host.gpu_off_reason()
                gpu_reason = f"GPU sensing is off on this machine: {why}" if why else None
        high_reason = None
        if any(f.memory_high_refs for f in self.files):
            if self.cgroups_setting is not None and self.cgroups_setting[0] == "off":
                high_reason = (f"workers get no cgroup of their own (worker_cgroups: off in {self.cgroups_setting[1]}),"
                               " so limits.memory_high is ignored")
            elif self.host is not None and self.host.cgroup_version() == 1:
                high_reason = ("this machine has the cgroup v1 memory controller; memguard can set memory.high only "
                               "on cgroup v2, so limits.memory_high is ignored here")
        for f in self.files:
            out.extend(f.warnings)
            if gpu_reason:
                for line, path, _text in f.gpu_refs:
                    out.append(ConfigIssue(f.display, line, path, f"{gpu_reason}; this rule's GPU readings stay "
                                                                  "unknown and it never fires"))
            if high_reason:
                for line, path in f.memory_high_refs:
                    out.append(ConfigIssue(f.display, line, path, high_reason))
        return out


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
        return stem if _WORKLOAD_NAME.match(stem) and len(stem) <= MAX_NAME_CHARS else None
    if isinstance(node, ScalarNode):
        v = f.construct(node)
        return v if isinstance(v, str) and _WORKLOAD_NAME.match(v) and len(v) <= MAX_NAME_CHARS else None
    return None


def _is_workload_root(root: Node | None) -> bool:
    """A workload file has ``command:``; failing that, more workload-only keys than daemon-only keys."""
    if not isinstance(root, MappingNode):
        return False
    keys = [k.value for k, _ in root.value[:MAX_LIST_ITEMS] if isinstance(k, ScalarNode)]
    if "command" in keys:
        return True
    workload_only = set(WORKLOAD_KEYS) - set(DAEMON_KEYS)
    daemon_only = set(DAEMON_KEYS) - set(WORKLOAD_KEYS)
    keys = [k for k in keys if len(k) <= _SHOWN_CHARS]
    w = sum(1 for k in keys if k in workload_only or suggest(k, workload_only))
    d = sum(1 for k in keys if k in daemon_only or suggest(k, daemon_only))
    return w > d


def _check(s: _Session, p: str) -> tuple[DaemonPolicy | None, list[ConfigIssue]]:
    """check_config's walk: a directory, a workload file or a daemon file."""
    if os.path.isdir(p):
        try:
            files = _yaml_files(p, MAX_WORKLOAD_FILES + 1)
        except OSError as e:
            return None, [ConfigIssue(p, 0, "", f"cannot be read: {e.strerror or e}")]
        except _TooManyFiles as e:
            return None, [ConfigIssue(p, 0, "", f"{e.count} YAML files in this directory; memguard reads at "
                                                f"most {MAX_WORKLOAD_FILES} workload files and a daemon file")]
        if not files:
            return None, [ConfigIssue(p, 0, "", "no *.yaml or *.yml files in this directory")]
        daemon_files = [x for x in files if not _is_workload_root(s.read(x).root)]
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
    if not os.path.lexists(p):
        return None, [ConfigIssue(p, 0, "", "no such file or directory")]
    if _is_workload_root(s.read(p).root):
        workloads = s.workloads([p])
        issues = s.issues
        return (None, issues) if issues else (DaemonPolicy(workloads=tuple(workloads)), [])
    policy = s.daemon(p)
    issues = s.issues
    return (None, issues) if issues or policy is None else (policy, [])


def _fatal(path: object, e: BaseException) -> ConfigIssue:
    """The issue for a failure outside any one file (a defect; never a traceback)."""
    try:
        shown = _display(path)  # type: ignore[arg-type]
    except Exception:
        shown = repr(path)
    return ConfigIssue(shown, 0, "", _internal(e))


# --------------------------------------------------------------------------
# Public API


def load_config(path: str | os.PathLike[str]) -> DaemonPolicy:
    """Load a daemon file and all workload files of its ``workloads:`` directory.

    Raises :class:`ConfigError` listing every problem of every file, and no
    other exception, whatever the files hold. A pure function of the files
    (no lookups on this machine, no shared state): safe to call from a
    worker thread. Worst case, bounded by :data:`MAX_TOTAL_BYTES`, is about
    two seconds of CPU.
    """
    try:
        s = _Session()
        policy = s.daemon(_display(path))
        issues = s.issues
    except Exception as e:
        raise ConfigError([_fatal(path, e)]) from None
    if issues or policy is None:
        raise ConfigError(issues)
    return policy


def load_workload_file(path: str | os.PathLike[str]) -> WorkloadPolicy:
    """Load one workload file (for ``memguard run --policy FILE``); raises :class:`ConfigError` only."""
    try:
        s = _Session()
        workloads = s.workloads([_display(path)])
        issues = s.issues
    except Exception as e:
        raise ConfigError([_fatal(path, e)]) from None
    if issues or not workloads:
        raise ConfigError(issues)
    return workloads[0]


def check_config(path: str | os.PathLike[str], *, host_checks: bool = True) -> CheckResult:
    """Validate a daemon file, a workload file or a directory; never raises.

    - a daemon file: the whole configuration, its workloads included;
    - a workload file (one with ``command:``): that file alone;
    - a directory: every ``*.yaml``/``*.yml`` file in it. Daemon files among
      them are validated with their workload directories; workload files not
      loaded by a daemon file are validated together (names unique).

    Everything :func:`load_config` refuses is an error here too. With
    ``host_checks`` (the default) these are errors as well, for this
    machine: a workload's ``user``/``group`` that does not exist, a
    ``working_dir`` that is missing, a command that is not found (through
    ``PATH`` from its environment, relative to ``working_dir``) or not
    executable. Warnings (never errors) name settings without effect: a
    ``release`` on a stopping action; rules on GPU signals while GPU
    sensing is off (``gpu: off``, or with host checks, no NVML here);
    ``limits.memory_high`` with ``worker_cgroups: off`` or, with host
    checks, on cgroup v1.

    The policy of a daemon file is what :func:`load_config` returns; where
    only workload files were checked it is a default ``DaemonPolicy``
    holding those workloads, with ``source`` empty. A directory with
    several daemon files returns the first one's policy (by file name).
    """
    try:
        s = _Session(_Host() if host_checks else None)
        policy, errors = _check(s, _display(path))
        warnings = s.warnings()
    except Exception as e:
        return CheckResult(None, [_fatal(path, e)], [])
    return CheckResult(policy if not errors else None, errors, warnings)


def check_path(path: str | os.PathLike[str]) -> tuple[DaemonPolicy | None, list[ConfigIssue]]:
    """:func:`check_config` without host checks and warnings: ``(policy, [])`` or ``(None, errors)``."""
    result = check_config(path, host_checks=False)
    return result.policy, result.errors
