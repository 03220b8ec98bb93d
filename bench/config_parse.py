#!/usr/bin/env python3
"""How long memguard takes to read, or refuse, large and hostile configuration input.

Run from the repository root (no root needed)::

    .venv/bin/python bench/config_parse.py

Prints one line per case: what was parsed, its size, the best of three
wall-clock times, and the outcome (accepted, or the first error). Cases:

- ``when:`` expressions of 1 MB and 10 MB, as ``parse_expr`` sees them
  (refused at once: longer than MAX_EXPR_CHARS), and the same text parsed
  with the bound lifted, to show the tokenizer and parser are linear;
- 1000 nested parentheses (refused: deeper than MAX_EXPR_DEPTH);
- configuration files of 10 MB (refused from its size alone), and of
  MAX_FILE_BYTES (read in full: the worst case a file within the bound
  costs), for the daemon's ``load_config``;
- YAML nested 100000 levels deep, numbers of 5000 digits, and a file of
  one-character list items (the most YAML values per byte: stopped by
  MAX_NODES).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from memguard.config import MAX_FILE_BYTES, ConfigError, load_config  # noqa: E402
from memguard.expr import ExprError, parse_expr  # noqa: E402

CLAUSE = "worker.memory > 1GiB and "  # 25 characters


def best_of(n: int, fn: Callable[[], str]) -> tuple[float, str]:
    best = float("inf")
    outcome = ""
    for _ in range(n):
        t0 = time.perf_counter()
        outcome = fn()
        best = min(best, time.perf_counter() - t0)
    return best, outcome


def expr_case(text: str, max_chars: int | None) -> Callable[[], str]:
    def run() -> str:
        try:
            parse_expr(text, "worker", max_chars=max_chars)
            return "accepted"
        except ExprError as e:
            return f"refused: {str(e)[:90]}"

    return run


def config_case(directory: str, workload_text: str) -> Callable[[], str]:
    with open(os.path.join(directory, "memguard.yaml"), "w") as f:
        f.write("workloads: workloads.d/\n")
    os.makedirs(os.path.join(directory, "workloads.d"), exist_ok=True)
    with open(os.path.join(directory, "workloads.d", "w.yaml"), "w") as f:
        f.write(workload_text)

    def run() -> str:
        try:
            load_config(os.path.join(directory, "memguard.yaml"))
            return "accepted"
        except ConfigError as e:
            return f"refused ({len(e.errors)} error(s)): {str(e.errors[0].message)[:80]}"

    return run


def expression_of(n_bytes: int) -> str:
    return CLAUSE * (n_bytes // len(CLAUSE)) + "worker.memory > 1GiB"


def main() -> None:
    rows: list[tuple[str, int, float, str]] = []
    for size in (1_000_000, 10_000_000):
        text = expression_of(size)
        rows.append((f"when: of {size // 1_000_000} MB (bounded)", len(text), *best_of(3, expr_case(text, 4096))))
    for size in (100_000, 1_000_000, 10_000_000):
        text = expression_of(size)
        rows.append((f"when: of {size / 1e6:g} MB, bound lifted", len(text),
                     *best_of(3, expr_case(text, None))))
    deep = "(" * 1000 + "worker.memory > 1GiB" + ")" * 1000
    rows.append(("when: 1000 nested (", len(deep), *best_of(3, expr_case(deep, None))))

    with tempfile.TemporaryDirectory() as tmp:
        big = "command: [python3]\nenvironment:\n" + "".join(
            f'  V{i}: "{"x" * 40}"\n' for i in range(10_000_000 // 50))
        rows.append(("config file of 10 MB", len(big), *best_of(3, config_case(tmp, big))))
        lines = []
        i = 0
        while sum(map(len, lines)) < MAX_FILE_BYTES - 200:
            lines.append(f'  V{i}: "{"x" * 40}"\n')
            i += 1
        full = "command: [python3]\nenvironment:\n" + "".join(lines[:1000]) + "rules:\n" + "".join(
            f'  - {{when: "worker.memory > {n + 1}GiB and worker.age > 1h", action: warn}}\n' for n in range(128))
        pad = MAX_FILE_BYTES - len(full) - 10
        full += "# " + "x" * pad + "\n"
        rows.append((f"config file of {len(full)} B (rules, entries, comment)", len(full),
                     *best_of(3, config_case(tmp, full))))
        nest = "command: [python3]\nrules: " + "[" * 100_000 + "]" * 100_000 + "\n"
        rows.append(("YAML nested 100000 deep", len(nest), *best_of(3, config_case(tmp, nest))))
        dense = "command: [python3]\ngpus: [" + ",".join(["0"] * ((MAX_FILE_BYTES - 40) // 2)) + "]\n"
        rows.append(("256 KiB of one-character list items", len(dense), *best_of(3, config_case(tmp, dense))))
        digits = "command: [python3]\nreplicas: " + "9" * 5000 + "\nlimits: {memory: \"" + "9" * 400 + "MiB\"}\n"
        rows.append(("numbers of 5000 and 400 digits", len(digits), *best_of(3, config_case(tmp, digits))))

    for what, n, seconds, outcome in rows:
        print(f"{what:<52} {n:>10} B {seconds * 1000:>9.2f} ms  {outcome}")


if __name__ == "__main__":
    main()
