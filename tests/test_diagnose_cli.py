"""``memguard diagnose --log FILE``: the command run as a real subprocess on log files written from the corpus.

Exit status 0 when a diagnosis is printed, 2 when nothing could be diagnosed (documented in
commands/diagnose.py and docs/incidents.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MEMGUARD = [sys.executable, "-m", "memguard.cli"]
CORPUS = {e["id"]: e for e in yaml.safe_load(
    (Path(__file__).resolve().parent / "corpus" / "exit_messages.yaml").read_text(encoding="utf-8"))}


def diagnose(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMGUARD, "diagnose", *args], input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=60)


def write_log(tmp_path: Path, entry_id: str) -> Path:
    path = tmp_path / f"{entry_id}.log"
    path.write_text(CORPUS[entry_id]["text"], encoding="utf-8")
    return path


@pytest.mark.parametrize("entry_id, status_args, cause", [
    ("pytorch-2.1-total-capacty", [], "gpu_oom"),
    ("ollama-cudamalloc-gallocr", ["--exit-code", "1"], "gpu_oom"),
    ("slurm-oom-kill-event-and-shell-killed", ["--exit-code", "137"], "host_oom"),
    ("kubernetes-describe-oomkilled", ["--signal", "KILL"], "host_oom"),
    ("torch-save-errno-28-windows", ["--exit-code", "1"], "disk_full"),
    ("nccl-watchdog-timeout-pytorch-2.5", ["--signal", "SIGABRT"], "timeout"),
    ("pycharm-exit-code-137-plain", ["--exit-code", "137"], "killed"),
    ("tensorflow-bfc-not-a-failure-jetson", ["--exit-code", "1"], "exit"),
    ("fairseq-ray-skipping-batch", ["--exit-code", "0"], "none"),
])
def test_json_cause_and_evidence_lines(tmp_path, entry_id, status_args, cause):
    """--json prints one object with the documented fields; evidence_lines point at the quoted lines in the file."""
    log = write_log(tmp_path, entry_id)
    proc = diagnose("--log", str(log), "--json", *status_args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1
    got = json.loads(out[0])
    assert {"cause", "detail", "recommendation", "evidence", "exit_code", "signal", "limit_bytes",
            "evidence_lines", "log"} <= set(got)
    assert got["cause"] == cause
    file_lines = log.read_text(encoding="utf-8").splitlines()
    assert len(got["evidence_lines"]) == len(got["evidence"])
    for number, quoted in zip(got["evidence_lines"], got["evidence"]):
        assert number >= 1
        assert quoted.rstrip("…").lstrip("…")[:40] in file_lines[number - 1]


def test_human_output(tmp_path):
    """Without --json: cause, what, status, evidence with file:line, and the advice, as lines for people."""
    log = write_log(tmp_path, "pytorch-rocm-hip-out-of-memory")
    proc = diagnose("--log", str(log))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["cause:", "gpu_oom"]
    assert any(line.startswith("status:") and "unknown" in line for line in lines)
    assert any(line.startswith("evidence:") and f"{log}:1" in line and "HIP out of memory" in line for line in lines)
    assert any(line.startswith("do:") for line in lines)


def test_standard_input_and_exit_status(tmp_path):
    """'-' reads standard input; --exit-code 0 makes any text cause none; --oom-killed and --memory-limit reach the
    verdict."""
    text = CORPUS["llama.cpp-cuda-error-2"]["text"].encode()
    proc = diagnose("--log", "-", "--json", "--exit-code", "0", stdin=text)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cause"] == "none"
    proc = diagnose("--log", "-", "--json", "--signal", "9", "--oom-killed", "--memory-limit", "16GiB", stdin=text)
    got = json.loads(proc.stdout)
    assert (got["cause"], got["signal"], got["limit_bytes"], got["log"]) == ("host_oom", 9, 16 << 30, "stdin")


def test_a_long_log_is_read_from_its_end(tmp_path):
    """Only the end of a big log is read: the OOM near the end is found, its line counted from the end."""
    log = tmp_path / "big.log"
    log.write_text("progress line\n" * 50_000 + "MemoryError\n" + "teardown\n" * 3, encoding="utf-8")
    got = json.loads(diagnose("--log", str(log), "--json", "--max-bytes", "4096").stdout)
    assert got["cause"] == "host_oom" and got["evidence_lines"] == [-4]
    got = json.loads(diagnose("--log", str(log), "--json", "--lines", "2").stdout)
    assert got["cause"] == "unknown"


def test_binary_garbage_is_read_not_rejected(tmp_path):
    """A log with invalid UTF-8 and NUL bytes is decoded with replacement and diagnosed."""
    log = tmp_path / "garbage.log"
    log.write_bytes(b"\x00\xff\xfe\x80 junk\nRuntimeError: CUDA error: out of memory\n\x00")
    proc = diagnose("--log", str(log), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["cause"] == "gpu_oom"


@pytest.mark.parametrize("args, message", [
    (["--log", "/nonexistent/train.log"], "cannot read /nonexistent/train.log"),
    (["--log", "."], "cannot read"),
    (["--log", "x.log", "--signal", "NOPE"], "no signal named NOPE"),
    (["--log", "x.log", "--lines", "0"], "--lines must be 1 or more"),
    (["--log", "x.log", "--memory-limit", "lots"], "expected a size"),
    (["--latest", "0"], "--latest must be 1 or more"),
    (["--dir", "none", "trials-0"], "no recorded death of 'trials-0': no incident record in none names it"),
    (["--dir", "none", "99999999"], "no recorded death of process 99999999"),  # beyond any pid_max
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    """A missing or unreadable file, a bad option, or no record of the target anywhere: exit 2, one line on
    stderr saying why, no traceback."""
    (tmp_path / "x.log").write_text("MemoryError\n", encoding="utf-8")
    proc = subprocess.run([*MEMGUARD, "diagnose", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def _records(tmp_path):
    """Two records in a store: memguard's own stop of trials-0 and a failing exit of etl-0 (newer)."""
    import time

    from memguard.model import Exited, Explanation, Signal
    from memguard.report.incidents import IncidentStore, complete_action, incident_for_action, incident_from_exit

    store = IncidentStore(tmp_path / "incidents")
    ex = Explanation("host-low", "memory.available < 10%", "memory.available", 1.2e9, 1.6e9, "bytes",
                     "memory.available 1.1GiB (7.5% of 15.6GiB) < 10% (1.6GiB)")
    now = time.time()
    own = incident_for_action(Signal("trials-0", "trials", 4242, 3, 15, "terminate", "rule host-low", ex),
                              wall=now - 60, monotonic=1.0, boot_id="b", command=["python", "t.py"])
    store.write(complete_action(own, wall=now - 59, signal=15))
    failed = incident_from_exit(Exited("etl-0", 1, 4343, 2.0, returncode=1,
                                       last_lines=("OSError: [Errno 28] No space left on device",)),
                                wall=now - 30, boot_id="b", workload="etl")
    store.write(failed)
    return store, own, failed


def test_diagnose_a_worker_and_the_latest_deaths_from_the_records(tmp_path):
    """`memguard diagnose WORKER --json` answers from the incident records with the documented fields; without
    a target the recorded deaths come newest first; an incident id and a pid find the same record."""
    store, own, failed = _records(tmp_path)
    proc = diagnose("--dir", str(store.dir), "trials-0", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["cause"], got["signal"], got["signal_name"], got["exit_code"]) == ("host_oom", 15, "SIGTERM", None)
    assert got["incident"] == own.id and got["worker"] == "trials-0" and got["pid"] == 4242
    assert got["evidence"] and "rule host-low" in got["evidence"][0] and "memguard stopped it" in \
        got["recommendation"]
    for target in (own.id[:18], "4242"):
        assert json.loads(diagnose("--dir", str(store.dir), target, "--json").stdout)["incident"] == own.id
    proc = diagnose("--dir", str(store.dir), "--json", "--latest", "50")
    ids = [json.loads(line).get("incident") for line in proc.stdout.splitlines()]
    ours = [i for i in ids if i in (own.id, failed.id)]
    assert ours == [failed.id, own.id]  # newest first (kernel log kills on this machine may come between)
    text = diagnose("--dir", str(store.dir), "etl-0").stdout
    assert text.startswith(f"incident {failed.id}") and "cause:     disk_full" in text
