"""The ``when:`` / ``release:`` language: a small, safe parser (no eval).

Grammar::

    expr       := and_expr ("or" and_expr)*
    and_expr   := atom ("and" atom)*
    atom       := "(" expr ")" | comparison
    comparison := SIGNAL OP VALUE
    SIGNAL     := name ("." name)*       e.g. memory.available, worker.memory
    OP         := "<" | "<=" | ">" | ">=" | "==" | "!="
    VALUE      := NUMBER [UNIT]          15%, 2GiB, 500MB, 30s, 12

Signals come from :data:`memguard.signals.SIGNALS`; the unit of the value
must suit the signal (a size for ``memory.available``, a duration for
``worker.age``). Parsing produces frozen AST nodes; evaluating them is the
decision core's job (three-valued: an Unknown reading makes a comparison
unknown, and unknown never fires a rule).

Whatever it is given, :func:`parse_expr` returns an expression or raises
:class:`ExprError`: tokenizing is one left-to-right pass, parsing is
recursive descent bounded to :data:`MAX_EXPR_DEPTH` levels of
parentheses, the text is at most :data:`MAX_EXPR_CHARS` characters, and
every value is finite and within its unit's bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from .signals import SIGNALS, SignalSpec, suggest
from .units import MAX_PERCENT, UnitError, format_duration, format_size, parse_duration, parse_size

__all__ = ["Comparison", "BoolOp", "Expr", "ExprError", "parse_expr", "comparisons", "MAX_EXPR_CHARS",
           "MAX_EXPR_DEPTH"]


class ExprError(ValueError):
    """A ``when:`` expression that does not parse; the message says where and what was expected."""


@dataclass(frozen=True)
class Comparison:
    """``signal op threshold``; ``threshold`` is in ``unit`` ("bytes", "percent", "seconds", "count")."""

    signal: str
    op: str
    threshold: float
    unit: str
    text: str
    device: str | None = None  # gpu[0].used -> "0"; None: any device

    def describe_threshold(self) -> str:
        if self.unit == "bytes":
            return format_size(self.threshold)
        if self.unit == "percent":
            return f"{self.threshold:g}%"
        if self.unit == "seconds":
            return format_duration(self.threshold)
        if self.unit == "bytes_per_second":
            return f"{format_size(self.threshold)}/s"
        return f"{self.threshold:g}"


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    args: tuple["Expr", ...]


Expr = Union[Comparison, BoolOp]

MAX_EXPR_CHARS = 4096
"""The longest ``when:``/``release:`` expression, in characters. The longest
rule a person writes and can still read is a few hundred characters (ten
comparisons); 4096 leaves room for generated rules while a refused
expression costs nothing to reject."""

MAX_EXPR_DEPTH = 32
"""The deepest nesting of parentheses. Real rules use one or two levels; the
bound keeps parsing, evaluating and explaining an expression (each walks
the tree recursively) far from Python's recursion limit, also in a
worker thread."""

_VALUE_CHARS = 64  # a value token longer than this is refused (units.MAX_NUMBER_CHARS)

# One token at a time, anchored at the current position: whitespace, then
# an operator, a parenthesis, a number with its unit, or a (dotted) name.
# Every alternative is linear in the length of what it matches.
_TOKEN = re.compile(
    r"\s*(?:(?P<op><=|>=|==|!=|<|>)|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[A-Za-z%]+(?:/[smh])?)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\[[0-9]+(?::[0-9]+)?\])?(?:\.[A-Za-z_][A-Za-z0-9_]*)*))",
    re.ASCII,
)
_SPACE = re.compile(r"\s*")
_OPS = {"<", "<=", ">", ">=", "==", "!="}

Token = tuple[str, str, int]  # (kind, text, 0-based column)


def _clip(text: str, limit: int = 40) -> str:
    """A token or name for a message: quoted, and cut short when long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens in one left-to-right pass: O(len(text)), no slicing of the rest."""
    tokens: list[Token] = []
    pos, end = 0, len(text)
    while True:
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= end:
            return tokens
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExprError(f"unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()


class _Parser:
    """Recursive descent whose depth is bounded by :data:`MAX_EXPR_DEPTH` (no RecursionError possible)."""

    def __init__(self, text: str, scope: str) -> None:
        self.text = text
        self.scope = scope
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise ExprError("the expression ends too early: expected SIGNAL OP VALUE, e.g. memory.available < 10%")
        self.i += 1
        return tok

    def parse(self) -> Expr:
        if not self.tokens:
            raise ExprError("empty expression: expected SIGNAL OP VALUE, e.g. memory.available < 10%")
        node = self.parse_or()
        tok = self.peek()
        if tok is not None:
            raise ExprError(f"unexpected {_clip(tok[1])} at column {tok[2] + 1}: expected 'and', 'or' or the end")
        return node

    def parse_or(self) -> Expr:
        args = [self.parse_and()]
        while (tok := self.peek()) is not None and tok[0] == "name" and tok[1] == "or":
            self.i += 1
            args.append(self.parse_and())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def parse_and(self) -> Expr:
        args = [self.parse_atom()]
        while (tok := self.peek()) is not None and tok[0] == "name" and tok[1] == "and":
            self.i += 1
            args.append(self.parse_atom())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def parse_atom(self) -> Expr:
        tok = self.take()
        if tok[0] == "lp":
            if self.depth >= MAX_EXPR_DEPTH:
                raise ExprError(f"parentheses nested deeper than {MAX_EXPR_DEPTH} levels at column {tok[2] + 1}: "
                                "write the condition flatter (and binds tighter than or)")
            self.depth += 1
            node = self.parse_or()
            self.depth -= 1
            close = self.take()
            if close[0] != "rp":
                raise ExprError(f"expected ')' at column {close[2] + 1}, got {_clip(close[1])}")
            return node
        if tok[0] != "name" or tok[1] in ("and", "or"):
            raise ExprError(f"expected a signal name at column {tok[2] + 1}, got {_clip(tok[1])}")
        name, start = tok[1], tok[2]
        device = None
        if "[" in name:
            head, _, rest = name.partition("[")
            device, _, tail = rest.partition("]")
            name = head + tail
            if head != "gpu":
                raise ExprError(f"only gpu signals take a device index, as in gpu[0].used; got {_clip(tok[1])}")
            if len(device) > 16:
                raise ExprError(f"{_clip(tok[1])} is not a GPU device index such as 0 or 0:1")
        spec = SIGNALS.get(name)
        if spec is None:
            hint = suggest(name, SIGNALS) if len(name) <= 64 else None
            raise ExprError(
                f"unknown signal {_clip(name)}" + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; known signals: {', '.join(sorted(SIGNALS))}"
            )
        if spec.scope == "worker" and self.scope == "system":
            raise ExprError(
                f"{name!r} is a worker signal; it can be used in a workload's rules, not in the daemon's system rules"
            )
        op = self.take()
        if op[0] != "op":
            raise ExprError(f"expected a comparison (<, <=, >, >=, ==, !=) after {name!r}, got {_clip(op[1])}")
        val = self.take()
        if val[0] != "num":
            raise ExprError(f"expected a value after '{name} {op[1]}', got {_clip(val[1])}")
        threshold, unit = _value(spec, name, val[1])
        text = self.text[start: val[2] + len(val[1])]
        return Comparison(name, op[1], threshold, unit, text, device)


_MAX_COUNT = 1e12  # counts (processes, restarts, trials, refusals): far past any real figure, exact as a float


def _value(spec: SignalSpec, name: str, raw: str) -> tuple[float, str]:
    """Read ``raw`` as a threshold for ``spec``: returns (number, unit), finite and within the unit's bounds."""
    if len(raw) > _VALUE_CHARS:
        raise ExprError(f"{_clip(raw)} is not a valid value for {name!r}: longer than {_VALUE_CHARS} characters")
    if raw.endswith("%"):
        if not spec.percent_ok:
            raise ExprError(f"{name!r} cannot be compared with a percentage ({raw!r}); {spec.expects}")
        try:
            pct = float(raw[:-1])
        except ValueError:
            raise ExprError(f"{raw!r} is not a percentage; {spec.expects}") from None
        if pct > MAX_PERCENT:
            raise ExprError(f"{raw!r} is out of range for {name!r}: a percentage is at most {MAX_PERCENT:g}%")
        return pct, "percent"
    try:
        if spec.unit == "bytes":
            return float(parse_size(int(raw) if raw.isdigit() else raw)), "bytes"
        if spec.unit == "seconds":
            return parse_duration(raw), "seconds"
        if spec.unit == "bytes_per_second":
            size, _, per = raw.partition("/")
            if per not in ("s", "m", "h"):
                raise UnitError(raw)
            per_s = {"s": 1.0, "m": 60.0, "h": 3600.0}[per]
            return float(parse_size(int(size) if size.isdigit() else size)) / per_s, "bytes_per_second"
        if spec.unit == "percent":
            pct = float(raw)
            if pct > MAX_PERCENT:
                raise ExprError(f"{raw!r} is out of range for {name!r}: a percentage is at most {MAX_PERCENT:g}")
            return pct, "percent"
        if spec.unit == "count":
            count = float(raw)
            if count > _MAX_COUNT:
                raise ExprError(f"{raw!r} is out of range for {name!r}: a count is at most {_MAX_COUNT:.0e}")
            return count, "count"
    except UnitError as e:
        detail = str(e)
        if "at most" in detail:  # a size or duration past memguard's bounds: say which
            raise ExprError(f"{raw!r} is out of range for {name!r}: {detail}") from None
    except ValueError:
        pass
    raise ExprError(f"{_clip(raw)} is not a valid value for {name!r}; {spec.expects}")


def parse_expr(text: object, scope: str = "worker", *, max_chars: int | None = MAX_EXPR_CHARS) -> Expr:
    """Parse a ``when:``/``release:`` string. ``scope`` is "system" (daemon rules) or "worker".

    Raises :class:`ExprError` and nothing else, whatever ``text`` holds.
    Time and memory are linear in ``len(text)``; text longer than
    ``max_chars`` (:data:`MAX_EXPR_CHARS`; None: no bound, for measuring)
    is refused before it is read.
    """
    if not isinstance(text, str):
        raise ExprError(
            f"expected an expression in quotes, e.g. \"memory.available < 10%\", got {type(text).__name__}"
        )
    if max_chars is not None and len(text) > max_chars:
        raise ExprError(f"the expression is {len(text)} characters long; the longest memguard reads is "
                        f"{max_chars}: split the rule in two")
    return _Parser(text, scope).parse()


def comparisons(expr: Expr) -> list[Comparison]:
    """All comparisons of an expression, left to right (iterative: any depth)."""
    out: list[Comparison] = []
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Comparison):
            out.append(node)
        else:
            stack.extend(reversed(node.args))
    return out
