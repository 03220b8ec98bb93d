"""Fuzzing the ``when:``/``release:`` parser: an expression or an ExprError, nothing else, ever.

Generators (derandomized, fixed example budgets):

- **grammar**: well-formed expressions built from the real signals, each
  with a value of the right unit, joined by and/or with parentheses; they
  must parse, to the tree they were built from;
- **near-grammar**: the same with tokens dropped, doubled, swapped or
  replaced by junk, deep parentheses, numbers of hundreds of digits;
- **text**: arbitrary Unicode text and text drawn from the tokens' own
  alphabet.

Every input must give an expression or an :class:`ExprError`, within a
2 s guard, and every accepted threshold is finite and within its unit's
bounds. The overlap check (release against when) runs on every pair of
accepted expressions and must answer (a sentence or None) without raising.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memguard.expr import MAX_EXPR_CHARS, MAX_EXPR_DEPTH, BoolOp, Comparison, Expr, ExprError, comparisons, parse_expr
from memguard.overlap import find_overlap
from memguard.signals import SIGNALS
from memguard.units import MAX_DURATION_S, MAX_PERCENT, MAX_SIZE_BYTES, duration_text

TIME_GUARD_S = 2.0  # per input; a guard against a hang, not a benchmark
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALUES = {
    "bytes": ["0", "512MiB", "2GiB", "1.5G", "500MB", "10%", "100%", "120%"],
    "seconds": ["0s", "30s", "1.5h", "100ms", "1d"],
    "percent": ["0", "20", "20%", "99.5"],
    "count": ["0", "3", "10"],
    "bytes_per_second": ["5MiB/m", "1GiB/h", "10MiB/s"],
}
OPS = ["<", "<=", ">", ">=", "==", "!="]
JUNK = ["(", ")", "and", "or", "not", "<", ">=", "==", "=", "!", "%", "/", ".", "[", "]", "0:1", "gpu[0]", "9" * 300,
        "1e400", "-1", "ü", "\x00", "\t", "\n", "memory", "worker.", "GiBB", "1GiB/x", "(" * 100, ")" * 100]


def _check(text: str, scope: str = "worker") -> Expr | None:
    """Parse ``text``: an Expr with thresholds in bounds, or None for an ExprError; anything else fails."""
    t0 = time.perf_counter()
    try:
        expr = parse_expr(text, scope)
    except ExprError as e:
        assert str(e), "an ExprError says what is wrong"
        expr = None
    elapsed = time.perf_counter() - t0
    assert elapsed < TIME_GUARD_S, f"{elapsed:.2f}s for {text[:80]!r}"
    if expr is not None:
        for c in comparisons(expr):
            assert c.signal in SIGNALS and c.op in OPS
            assert math.isfinite(c.threshold) and c.threshold >= 0
            bound = {"bytes": MAX_SIZE_BYTES, "seconds": MAX_DURATION_S, "percent": MAX_PERCENT,
                     "bytes_per_second": MAX_SIZE_BYTES}.get(c.unit, 1e12)
            assert c.threshold <= bound, c
            assert c.text in text
    return expr


@st.composite
def comparison_text(draw: Any) -> str:
    name = draw(st.sampled_from(sorted(SIGNALS)))
    spec = SIGNALS[name]
    shown = name
    if name.startswith("gpu.") and draw(st.booleans()):
        shown = name.replace("gpu.", f"gpu[{draw(st.integers(0, 7))}].")
    values = [v for v in VALUES[spec.unit] if spec.percent_ok or not v.endswith("%")]
    return f"{shown} {draw(st.sampled_from(OPS))} {draw(st.sampled_from(values))}"


def expression_text() -> st.SearchStrategy[str]:
    return st.recursive(
        comparison_text(),
        lambda inner: st.one_of(
            st.builds(lambda a, b: f"{a} and {b}", inner, inner),
            st.builds(lambda a, b: f"{a} or {b}", inner, inner),
            st.builds(lambda a: f"({a})", inner),
        ),
        max_leaves=12,
    )


@FUZZ
@given(text=expression_text())
def test_well_formed_expressions_parse(text: str) -> None:
    """Every expression the grammar allows parses, with one comparison per comparison written."""
    expr = _check(text)
    if text.count("(") > MAX_EXPR_DEPTH:
        return  # may be refused for depth
    assert expr is not None, f"refused a well-formed expression: {text!r}"
    assert len(comparisons(expr)) == text.count(" and ") + text.count(" or ") + 1


@st.composite
def near_grammar(draw: Any) -> str:
    tokens = draw(expression_text()).replace("(", " ( ").replace(")", " ) ").split()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(len(tokens) - 1, 0)))
        if op == 0 and tokens:
            del tokens[i]
        elif op == 1:
            tokens.insert(i, draw(st.sampled_from(JUNK)))
        elif op == 2 and tokens:
            tokens.insert(i, tokens[i])
        elif tokens:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return draw(st.sampled_from([" ", "", "  "])).join(tokens)


@FUZZ
@given(text=near_grammar(), scope=st.sampled_from(["worker", "system"]))
def test_broken_expressions_raise_only_expr_error(text: str, scope: str) -> None:
    """Expressions with tokens dropped, doubled, swapped or replaced by junk: an Expr or an ExprError."""
    _check(text, scope)


ALPHABET = st.sampled_from(list("()<>=!%./[]:0123456789 abcdefghijklmnopqrstuvwxyz_GMKiBsmhd\t\n\x00ü"))


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.text(ALPHABET, max_size=300)))
def test_arbitrary_text_raises_only_expr_error(text: str) -> None:
    """Any Unicode text, and text made of the language's own characters: an Expr or an ExprError."""
    _check(text)


@settings(derandomize=True, database=None, deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(0, 5000), digits=st.integers(1, 6000), unit=st.sampled_from(["", "GiB", "%", "s", "MiB/s"]),
       name=st.sampled_from(["worker.memory", "worker.age", "psi.some_avg10", "worker.growth", "worker.restarts"]))
def test_deep_nesting_and_long_numbers_are_refused_cleanly(depth: int, digits: int, unit: str, name: str) -> None:
    """Up to 5000 nested parentheses and values of up to 6000 digits: refused (or accepted in bounds), never a crash."""
    text = "(" * depth + f"{name} > " + "9" * digits + unit + ")" * depth
    expr = _check(text)
    if depth > MAX_EXPR_DEPTH or len(text) > MAX_EXPR_CHARS:
        assert expr is None


@pytest.mark.parametrize("text", [
    "(" * 1000 + "worker.memory > 1GiB" + ")" * 1000,   # RecursionError before the depth bound
    "worker.memory > " + "9" * 400 + "MiB",              # OverflowError: float infinity to int
    "worker.memory > " + "9" * 5000,                     # ValueError: int() of more than 4300 digits
    "worker.memory > " + "9" * 400 + "%",                # an infinite percentage
    "worker.age > " + "9" * 400 + "s",                   # an infinite duration
    "worker.restarts > " + "9" * 400,                    # an infinite count
    "worker.growth > " + "9" * 400 + "MiB/s",            # an infinite rate
    "(worker.memory > 1GiB" * 40 + ")" * 40,             # depth 40
    "worker.memory > 1GiB and " * 200_000 + "worker.age > 1s",  # 5 MB: quadratic before
    "gpu[" + "9" * 5000 + "].used > 1GiB",               # a device index of 5000 digits
])
def test_regressions_raise_expr_error(text: str) -> None:
    """Inputs that crashed (or stalled) the parser before its bounds are refused with an ExprError."""
    with pytest.raises(ExprError):
        parse_expr(text)


def test_the_length_bound_and_the_depth_bound_are_exact() -> None:
    """MAX_EXPR_CHARS and MAX_EXPR_DEPTH are the largest accepted: one more is refused, and says so."""
    clause = "worker.memory > 1GiB"
    text = clause + " " * (MAX_EXPR_CHARS - len(clause))
    assert isinstance(parse_expr(text), Comparison)
    with pytest.raises(ExprError, match=f"longest memguard reads is {MAX_EXPR_CHARS}"):
        parse_expr(text + " ")
    deep = "(" * MAX_EXPR_DEPTH + clause + ")" * MAX_EXPR_DEPTH
    assert isinstance(parse_expr(deep), Comparison)
    with pytest.raises(ExprError, match=f"deeper than {MAX_EXPR_DEPTH} levels"):
        parse_expr("(" + deep + ")")


def test_without_the_length_bound_a_long_expression_still_parses() -> None:
    """The parser itself has no length limit: 40 000 comparisons parse (linearly; bench/config_parse.py times it)."""
    n = 40_000
    expr = parse_expr(" and ".join(["worker.memory > 1GiB"] * n), max_chars=None)
    assert isinstance(expr, BoolOp) and len(expr.args) == n


@settings(derandomize=True, database=None, deadline=None, max_examples=300,
          suppress_health_check=[HealthCheck.too_slow])
@given(when=expression_text(), release=expression_text(), limit=st.sampled_from([None, 2**30, 8 * 2**30]))
def test_overlap_check_answers_for_any_pair(when: str, release: str, limit: int | None) -> None:
    """find_overlap returns a sentence or None for any two expressions; a sentence names a reading."""
    w, r = _check(when), _check(release)
    if w is None or r is None:
        return
    bases = {"limits.memory": float(limit)} if limit else {}
    answer = find_overlap(w, r, bases)
    assert answer is None or ("both hold at once" in answer and "for example with" in answer)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(seconds=st.floats(min_value=0, max_value=MAX_DURATION_S, allow_nan=False))
def test_duration_text_reads_back_exactly_in_an_expression(seconds: float) -> None:
    """Every duration memguard accepts, written with duration_text, parses back in a rule: exactly from a
    millisecond up, to the nanosecond below (f"{s:g}s" would give '1.0368e+06s' for 12 days, which the
    language refuses)."""
    expr = parse_expr(f"worker.age > {duration_text(seconds)}")
    assert isinstance(expr, Comparison)
    assert expr.threshold == seconds if seconds >= 0.001 else abs(expr.threshold - seconds) <= 1e-9
