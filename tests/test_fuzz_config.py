"""Fuzzing the configuration loader and ``memguard check``: a clean error or acceptance, never anything else.

Three generators, each with a fixed example budget (derandomized, no
example database: every run tries the same inputs):

- **mutation**: the shipped configurations (config/, config/demo/,
  src/memguard/data/, examples/optuna/, tests/configs/good/) with bytes
  flipped, ranges deleted or duplicated, lines swapped, and hostile
  snippets inserted (deep nesting, numbers of hundreds of digits, NUL
  bytes, invalid UTF-8, YAML tags, aliases, merge keys);
- **structure**: the same files loaded, one value anywhere in them
  replaced by a hostile value of any YAML type, and dumped again: valid
  YAML with wrong content;
- **vocabulary**: mappings built from memguard's own keys with values from
  the same hostile pool, nested at random.

Every input must either load or be refused with issues that name a file
and say what was expected; the error boundary's own "the file is refused"
message (an unexpected exception caught) counts as a failure. Each input
must finish within a generous time guard (2 s: a guard against a hang,
not a benchmark) and, for the largest ones, within a memory guard.
Finally ``memguard check`` runs as a subprocess on mutated files, under a
memory limit: no traceback, exit status 0 or 1.

Minimal inputs that once crashed the loader are kept as regression files
in tests/configs/broken/fuzz/ and checked in test_config.py.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memguard.config import (DAEMON_KEYS, RULE_KEYS, WORKLOAD_KEYS, ConfigError, ConfigIssue, check_config,
                             load_config, load_workload_file)
from memguard.policy import DaemonPolicy
from memguard.units import MAX_DURATION_S, MAX_SIZE_BYTES

REPO = Path(__file__).resolve().parent.parent
SEED_DIRS = [REPO / "config", REPO / "config" / "demo", REPO / "src" / "memguard" / "data",
             REPO / "examples" / "optuna", REPO / "tests" / "configs" / "good"]


def _seeds() -> tuple[list[bytes], list[bytes]]:
    """(daemon files, workload files) of the shipped configurations."""
    daemons, workloads = [], []
    for d in SEED_DIRS:
        daemons.append((d / "memguard.yaml").read_bytes())
        for p in sorted((d / "workloads.d").iterdir()):
            if p.suffix in (".yaml", ".yml"):
                workloads.append(p.read_bytes())
    return daemons, workloads


DAEMON_SEEDS, WORKLOAD_SEEDS = _seeds()
ALL_SEEDS = DAEMON_SEEDS + WORKLOAD_SEEDS

TIME_GUARD_S = 2.0  # per input: generous; the worst input within the bounds takes well under a second
FUZZ_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> Any:
    """A fixed, derandomized budget: every run tries the same inputs (about 5-50 ms each)."""
    return settings(max_examples=examples, **FUZZ_SETTINGS)  # type: ignore[arg-type]

# Snippets that broke YAML loaders and parsers somewhere: deep nesting, huge
# numbers, control bytes, bad encodings, tags, aliases, merges, odd floats.
HOSTILE_SNIPPETS: list[bytes] = [
    b"[" * 1000, b"{" * 1000, b"- " * 300, b"(" * 1000, b"9" * 500, b"9" * 5000, b"1" + b"0" * 400 + b"MiB",
    b"\x00", b"\xff\xfe", b"\xc3(", b"\t", b"\r", b"\x1b[31m", b"\xe2\x80\xae",
    b"!!python/object/apply:os.system ['true']", b"!!binary ====", b"!foo", b"!!set {a, b}", b"!!omap [a: 1]",
    b"&a [*a]", b"*undefined", b"<<: *a", b"<<: [1, 2]", b"&a ", b"*a", b"? [a, b]\n: c",
    b"1e400", b"-.inf", b".nan", b"0x" + b"f" * 100, b"0o777", b"1:2:3:4:5:6:7:8:9", b"2001-13-45",
    b"---\n", b"...\n", b"%YAML 1.1\n---\n", b"'", b'"', b"{", b"}", b"]", b": ", b"~", b"|\n", b">-\n",
    b'"\\x00"', b'"\\uD800"', b"\xef\xbb\xbf", "ü名".encode(), b"worker.memory > " + b"9" * 300 + b"GiB",
]

HOSTILE_TEXT = [
    "9" * 400 + "MiB", "9" * 400 + "s", "1e400", "-1", "0", "0s", "-5s", "nan", "inf", "1.5", "8GiBB", "0x10",
    "(" * 1000 + "worker.memory > 1GiB" + ")" * 1000, "worker.memory > " + "9" * 300 + "GiB",
    "worker.memory > 5% and " * 300 + "worker.age > 1s", "memory.available < 10%", "SIGSTOP", "SIGKILL", "99",
    "1s..0s", "0/0s", "99999999999/1s", "~/x", "", " ", "\t", "a\x00b", "ü名", "x" * 300_000, "[", "*", "&",
    "on", "off", "auto", "GPU-" + "a" * 500, "(" * 100, "1:2:3", "1" * 5000 + "/1s",
]


HUGE_INT = "HUGEINTEGER"  # dumped as a plain scalar, then replaced by 5000 digits (no Python int holds it printably)


def _hostile_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.sampled_from(HOSTILE_TEXT),
        st.integers(min_value=-(10**80), max_value=10**80),
        st.sampled_from([HUGE_INT, "-" + HUGE_INT, 2**63, 2**64, -1, 0, 1]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.text(max_size=40),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(list(DAEMON_KEYS + WORKLOAD_KEYS + RULE_KEYS)), st.text(max_size=8)),
                        inner, max_size=4),
    ), max_leaves=12)


def _mutate(data: bytes, rnd: random.Random, rounds: int) -> bytes:
    """Byte- and line-level mutations of a YAML file."""
    buf = bytearray(data)
    for _ in range(rounds):
        op = rnd.randrange(7)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a byte
            buf[min(pos, len(buf) - 1)] = rnd.randrange(256)
        elif op == 1:  # insert a hostile snippet
            buf[pos:pos] = rnd.choice(HOSTILE_SNIPPETS)
        elif op == 2 and buf:  # delete a range
            buf[pos:pos + rnd.randrange(1, 40)] = b""
        elif op == 3:  # duplicate a range
            chunk = bytes(buf[pos:pos + rnd.randrange(1, 80)])
            buf[pos:pos] = chunk * rnd.randrange(1, 4)
        elif op == 4:  # swap two lines
            lines = bytes(buf).split(b"\n")
            if len(lines) > 1:
                i, j = rnd.randrange(len(lines)), rnd.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
                buf = bytearray(b"\n".join(lines))
        elif op == 5:  # replace a value after a colon with a hostile snippet
            colon = bytes(buf).find(b": ", pos)
            if colon >= 0:
                end = bytes(buf).find(b"\n", colon)
                end = len(buf) if end < 0 else end
                buf[colon + 2:end] = rnd.choice(HOSTILE_SNIPPETS)
        else:  # change indentation of a line
            start = bytes(buf).rfind(b"\n", 0, pos) + 1
            buf[start:start] = b" " * rnd.randrange(1, 5)
    return bytes(buf)


def _replace_somewhere(doc: Any, rnd: random.Random, value: Any) -> Any:
    """``doc`` with one value (or the whole document) replaced by ``value``."""
    if not isinstance(doc, (dict, list)) or not doc or rnd.random() < 0.15:
        return value
    if isinstance(doc, dict):
        key = rnd.choice(list(doc))
        out = dict(doc)
        out[key] = _replace_somewhere(doc[key], rnd, value)
        return out
    i = rnd.randrange(len(doc))
    out_list = list(doc)
    out_list[i] = _replace_somewhere(doc[i], rnd, value)
    return out_list


def _dump(doc: Any) -> bytes:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, width=1 << 20).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
        text = yaml.safe_dump(str(doc)[:1000]).encode("utf-8", "surrogatepass")
    return text.replace(HUGE_INT.encode(), b"9" * 5000)


# --------------------------------------------------------------------------
# The oracle


def _refused_by_the_boundary(issue: ConfigIssue) -> bool:
    """An issue made by the last-resort guard: an unexpected exception inside the loader."""
    return "the file is refused" in issue.message


def assert_clean(target: Path, *, workload_file: bool = False) -> None:
    """check_config and load_config on ``target``: acceptance or clean issues, in time, nothing else."""
    t0 = time.perf_counter()
    result = check_config(target, host_checks=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < TIME_GUARD_S, f"check took {elapsed:.2f}s on {target}"
    for issue in result.errors + result.warnings:
        assert not _refused_by_the_boundary(issue), f"an exception escaped a reader: {issue}"
        assert issue.file and issue.message and issue.line >= 0, issue
        str(issue)
    json.dumps(result.as_dict())
    if result.policy is not None:
        assert not result.errors
        _assert_policy_in_bounds(result.policy)
    else:
        assert result.errors, "no policy and no error"
    loader = load_workload_file if workload_file else load_config
    try:
        loaded = loader(target)
    except ConfigError as e:
        assert e.errors and not any(_refused_by_the_boundary(i) for i in e.errors), str(e)
    else:
        assert loaded is not None


def _assert_policy_in_bounds(policy: DaemonPolicy) -> None:
    """Whatever is accepted holds finite numbers within memguard's bounds."""
    from memguard.expr import comparisons

    def rules_ok(rules: Any) -> None:
        for r in rules:
            for expr in (r.when, r.release):
                if expr is None:
                    continue
                for c in comparisons(expr):
                    assert math.isfinite(c.threshold) and 0 <= c.threshold <= MAX_SIZE_BYTES, c

    rules_ok(policy.rules)
    for w in policy.workloads:
        rules_ok(w.rules)
        for v in (w.limits.memory_bytes, w.limits.swap_bytes, w.limits.memory_high_bytes, w.limits.gpu_memory_bytes):
            assert v is None or 0 <= v <= MAX_SIZE_BYTES
        for v in (w.grace_s, w.limits.runtime_s, w.restart.budget_window_s, w.restart.backoff_max_s,
                  w.trial_timeout_s, w.heartbeat_timeout_s, w.growth_window_s, w.recycle.max_age_s):
            assert v is None or (math.isfinite(v) and 0 <= v <= MAX_DURATION_S)
    assert 0 < policy.poll_interval_s <= MAX_DURATION_S


def _write_tree(root: Path, daemon: bytes, workloads: list[bytes]) -> Path:
    if root.exists():
        shutil.rmtree(root)
    (root / "workloads.d").mkdir(parents=True)
    (root / "memguard.yaml").write_bytes(daemon)
    for i, w in enumerate(workloads):
        (root / "workloads.d" / f"w{i}.yaml").write_bytes(w)
    return root / "memguard.yaml"


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="memguard-fuzz-") as d:
        yield Path(d)


# --------------------------------------------------------------------------
# In-process fuzz


@fuzz(400)
@given(seed=st.integers(0, len(ALL_SEEDS) - 1), rnd=st.randoms(use_true_random=False), rounds=st.integers(1, 6))
def test_mutated_workload_files_load_or_fail_cleanly(scratch: Path, seed: int, rnd: random.Random,
                                                     rounds: int) -> None:
    """Mutated shipped files, read as workload files: loaded, or refused with file, line and expectation."""
    p = scratch / "one" / "w.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(_mutate(ALL_SEEDS[seed], rnd, rounds))
    assert_clean(p, workload_file=True)


@fuzz(100)
@given(daemon=st.integers(0, len(DAEMON_SEEDS) - 1), rnd=st.randoms(use_true_random=False),
       which=st.integers(-1, len(WORKLOAD_SEEDS) - 1), rounds=st.integers(1, 4))
def test_mutated_configurations_load_or_fail_cleanly(scratch: Path, daemon: int, rnd: random.Random, which: int,
                                                     rounds: int) -> None:
    """A whole configuration (daemon file and every workload seed), one file mutated: never an escape."""
    d = DAEMON_SEEDS[daemon].replace(b"workloads: /etc/memguard/workloads.d", b"workloads: workloads.d/")
    ws = list(WORKLOAD_SEEDS)
    if which < 0:
        d = _mutate(d, rnd, rounds)
    else:
        ws[which] = _mutate(ws[which], rnd, rounds)
    target = _write_tree(scratch / "tree", d, ws)
    assert_clean(target)
    assert_clean(target.parent)


@fuzz(200)
@given(seed=st.integers(0, len(ALL_SEEDS) - 1), rnd=st.randoms(use_true_random=False), value=_hostile_values())
def test_hostile_values_anywhere_load_or_fail_cleanly(scratch: Path, seed: int, rnd: random.Random,
                                                      value: Any) -> None:
    """Valid YAML, one value anywhere replaced by a hostile one of any type: never an escape."""
    doc = yaml.safe_load(ALL_SEEDS[seed])
    p = scratch / "one" / "w.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(_dump(_replace_somewhere(doc, rnd, value)))
    assert_clean(p, workload_file=seed >= len(DAEMON_SEEDS))


@fuzz(100)
@given(doc=st.dictionaries(st.sampled_from(list(WORKLOAD_KEYS + DAEMON_KEYS)), _hostile_values(), max_size=8),
       as_workload=st.booleans())
def test_vocabulary_with_hostile_values_loads_or_fails_cleanly(scratch: Path, doc: dict[str, Any],
                                                               as_workload: bool) -> None:
    """memguard's own keys with hostile values of any type: never an escape."""
    if as_workload:
        doc = {"command": ["python3"], **doc}
    p = scratch / "one" / "w.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(_dump(doc))
    assert_clean(p, workload_file=as_workload)


@fuzz(40)
@given(snippet=st.sampled_from(HOSTILE_SNIPPETS), repeat=st.sampled_from([1, 1000, 100_000]),
       where=st.sampled_from(["value", "key", "top", "rule"]))
def test_large_hostile_inputs_stay_within_time_and_memory(scratch: Path, snippet: bytes, repeat: int,
                                                          where: str) -> None:
    """Hostile snippets repeated up to 100 000 times: refused within the time guard and 64 MiB of Python memory."""
    body = snippet * repeat
    text = {
        "value": b"command: [python3]\nlimits: {memory: " + body + b"}\n",
        "key": b"command: [python3]\n" + body + b": 1\n",
        "top": body,
        "rule": b"command: [python3]\nrules:\n  - {when: \"" + body + b"\", action: block}\n",
    }[where]
    p = scratch / "one" / "w.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(text)
    tracemalloc.start()
    try:
        assert_clean(p, workload_file=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, f"{peak / 2**20:.0f} MiB for a {len(text)}-byte file"


# --------------------------------------------------------------------------
# memguard check as a subprocess


def _memguard_check(args: list[str], memory_limit_bytes: int = 1024 * 1024 * 1024) -> subprocess.CompletedProcess:
    """``memguard check ARGS`` in a child limited to ``memory_limit_bytes`` of address space."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    code = "import sys; from memguard.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "check", *args], capture_output=True, timeout=60,
                          preexec_fn=limit)


def test_check_cli_on_mutated_files_never_shows_a_traceback(scratch: Path) -> None:
    """memguard check on three dozen mutated files (one by one, and as directories): exit 0 or 1, no traceback."""
    rnd = random.Random(20240917)
    runs: list[list[str]] = []
    for i in range(12):
        p = scratch / "cli" / f"single{i}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_mutate(rnd.choice(ALL_SEEDS), rnd, rnd.randrange(1, 6)))
        runs.append(["--no-host-checks", str(p)])
    for j in range(3):
        d = scratch / "cli" / f"dir{j}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            (d / f"m{i}.yaml").write_bytes(_mutate(rnd.choice(ALL_SEEDS), rnd, rnd.randrange(1, 6)))
        runs.append(["--no-host-checks", str(d)])
        runs.append(["--json", "--no-host-checks", str(d)])
    for args in runs:
        proc = _memguard_check(args)
        out = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
        assert "Traceback" not in out, f"memguard check {args}:\n{out}"
        assert proc.returncode in (0, 1), f"memguard check {args} exited {proc.returncode}:\n{out}"
        assert "the file is refused" not in out, out
        if "--json" in args:
            doc = json.loads(proc.stdout)
            assert doc["ok"] is (proc.returncode == 0)
