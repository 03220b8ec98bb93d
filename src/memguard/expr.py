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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from .signals import SIGNALS, SignalSpec, suggest
from .units import UnitError, format_duration, format_size, parse_duration, parse_size

__all__ = ["Comparison", "BoolOp", "Expr", "ExprError", "parse_expr", "comparisons"]


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

_TOKEN = re.compile(
    r"\s*(?:(?P<op><=|>=|==|!=|<|>)|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[A-Za-z%]+(?:/[smh])?)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\[[0-9]+(?::[0-9]+)?\])?(?:\.[A-Za-z_][A-Za-z0-9_]*)*))"
)
_OPS = {"<", "<=", ">", ">=", "==", "!="}


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            col = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
            raise ExprError(f"unexpected character {text[col]!r} at column {col + 1}")
        kind = m.lastgroup or ""
        start = m.start(kind)
        tokens.append((kind, m.group(kind), start))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str, scope: str) -> None:
        self.text = text
        self.scope = scope
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
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
            raise ExprError(f"unexpected {tok[1]!r} at column {tok[2] + 1}: expected 'and', 'or' or the end")
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
            node = self.parse_or()
            close = self.take()
            if close[0] != "rp":
                raise ExprError(f"expected ')' at column {close[2] + 1}, got {close[1]!r}")
            return node
        if tok[0] != "name" or tok[1] in ("and", "or"):
            raise ExprError(f"expected a signal name at column {tok[2] + 1}, got {tok[1]!r}")
        name, start = tok[1], tok[2]
        device = None
        if "[" in name:
            head, _, rest = name.partition("[")
            device, _, tail = rest.partition("]")
            name = head + tail
            if head != "gpu":
                raise ExprError(f"only gpu signals take a device index, as in gpu[0].used; got {tok[1]!r}")
        spec = SIGNALS.get(name)
        if spec is None:
            hint = suggest(name, SIGNALS)
            raise ExprError(
                f"unknown signal {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; known signals: {', '.join(sorted(SIGNALS))}"
            )
        if spec.scope == "worker" and self.scope == "system":
            raise ExprError(
                f"{name!r} is a worker signal; it can be used in a workload's rules, not in the daemon's system rules"
            )
        op = self.take()
        if op[0] != "op":
            raise ExprError(f"expected a comparison (<, <=, >, >=, ==, !=) after {name!r}, got {op[1]!r}")
        val = self.take()
        if val[0] != "num":
            raise ExprError(f"expected a value after '{name} {op[1]}', got {val[1]!r}")
        threshold, unit = _value(spec, name, val[1])
        text = self.text[start: val[2] + len(val[1])]
        return Comparison(name, op[1], threshold, unit, text, device)


def _value(spec: SignalSpec, name: str, raw: str) -> tuple[float, str]:
    """Read ``raw`` as a threshold for ``spec``: returns (number, unit)."""
    if raw.endswith("%"):
        if not spec.percent_ok:
            raise ExprError(f"{name!r} cannot be compared with a percentage ({raw!r}); {spec.expects}")
        try:
            pct = float(raw[:-1])
        except ValueError:
            raise ExprError(f"{raw!r} is not a percentage; {spec.expects}") from None
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
        if spec.unit in ("percent", "count"):
            return float(raw), spec.unit
    except (UnitError, ValueError):
        pass
    raise ExprError(f"{raw!r} is not a valid value for {name!r}; {spec.expects}")


def parse_expr(text: object, scope: str = "worker") -> Expr:
    """Parse a ``when:``/``release:`` string. ``scope`` is "system" (daemon rules) or "worker"."""
    if not isinstance(text, str):
        raise ExprError(
            f"expected an expression in quotes, e.g. \"memory.available < 10%\", got {type(text).__name__}"
        )
    return _Parser(text, scope).parse()


def comparisons(expr: Expr) -> list[Comparison]:
    """All comparisons of an expression, left to right."""
    if isinstance(expr, Comparison):
        return [expr]
    out: list[Comparison] = []
    for arg in expr.args:
        out.extend(comparisons(arg))
    return out
