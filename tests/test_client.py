"""memguard.client against a real ControlServer and a real admission file.

The server runs on its own asyncio loop in a thread (plain asyncio.run);
the client under test runs in this process, so the peer pid the server
sees is this process's. Waits are on queues and events with deadlines,
never on sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

import memguard.client as mg
from controlkit import DEADLINE_S, ServerThread
from memguard.model import TrialEvent

MG_VARS = ("MEMGUARD_SOCKET", "MEMGUARD_TOKEN", "MEMGUARD_WORKER", "MEMGUARD_ADMISSION_FILE",
           "MEMGUARD_MEMORY_LIMIT", "MEMGUARD_GPU_MEMORY_LIMIT", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in MG_VARS:
        monkeypatch.delenv(k, raising=False)
    yield
    mg.default_client().close()


@pytest.fixture
def memguard_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Iterator[tuple[ServerThread, Path]]:
    """A running control server and this process's environment set up as a worker's."""
    srv = ServerThread(str(tmp_path / "run" / "control.sock"), identify=lambda w, pid: pid == os.getpid()).start()
    gate = tmp_path / "run" / "admission-trials-0"
    gate.write_text("open\n")
    monkeypatch.setenv("MEMGUARD_SOCKET", srv.path)
    monkeypatch.setenv("MEMGUARD_TOKEN", srv.token)
    monkeypatch.setenv("MEMGUARD_WORKER", "trials-0")
    monkeypatch.setenv("MEMGUARD_ADMISSION_FILE", str(gate))
    yield srv, gate
    mg.default_client().close()
    srv.stop()


def _set_gate(gate: Path, text: str) -> None:
    tmp = gate.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, gate)


def _drain(srv: ServerThread) -> list[TrialEvent]:
    """Everything the server received before a marker report sent now (reports travel in order)."""
    assert mg.default_client()._send("reclaimed", detail="test-marker")
    out = []
    while True:
        ev = srv.next_event()
        if ev.kind == "reclaimed" and ev.detail == "test-marker":
            return out
        out.append(ev)


# ---------------------------------------------------------------------------


def test_outside_memguard_everything_is_a_no_op(clean_env: None) -> None:
    """Without MEMGUARD_* in the environment trial() (context manager and decorator) just runs the
    code, exceptions pass through unchanged, heartbeat() sends nothing, budget() is all None, and no
    thread is started."""
    threads = threading.active_count()
    assert not mg.under_memguard() and mg.worker_name() is None
    with mg.trial("t") as t:
        assert t is not None

    @mg.trial
    def f(x: int) -> int:
        return x + 1

    @mg.trial("named", wait_timeout=1)
    def g() -> str:
        return "g"

    assert f(1) == 2 and g() == "g" and f.__name__ == "f"
    with pytest.raises(ValueError, match="boom"):
        with mg.trial():
            raise ValueError("boom")
    assert mg.heartbeat() is False
    cb = mg.on_reclaim(lambda: None)
    assert callable(cb)
    mg._callbacks.remove(cb)
    assert mg.budget() == {"memory_limit_bytes": None, "gpu_memory_limit_bytes": None, "cuda_visible_devices": None}
    assert mg.admission() == (True, "")
    assert mg.wait_for_admission() == 0.0
    assert threading.active_count() == threads


def test_budget_reads_the_environment(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """budget() gives the memory limits in bytes and the visible GPUs from the worker's environment."""
    monkeypatch.setenv("MEMGUARD_MEMORY_LIMIT", str(8 * 1024**3))
    monkeypatch.setenv("MEMGUARD_GPU_MEMORY_LIMIT", "1000")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert mg.budget() == {"memory_limit_bytes": 8 * 1024**3, "gpu_memory_limit_bytes": 1000,
                           "cuda_visible_devices": "1"}


def test_trial_reports_start_and_end(memguard_env: tuple[ServerThread, Path]) -> None:
    """Under memguard, a trial reports trial_start and trial_end (ok true) with its name; the decorator
    form reports too; an exception inside, KeyboardInterrupt included, reports ok false with the
    exception in the detail and is re-raised."""
    srv, _ = memguard_env
    assert mg.under_memguard() and mg.worker_name() == "trials-0"
    with mg.trial("trial-1"):
        pass
    ev = [srv.next_event(), srv.next_event()]
    assert [(e.kind, e.name, e.ok, e.worker) for e in ev] == [("start", "trial-1", None, "trials-0"),
                                                             ("end", "trial-1", True, "trials-0")]

    @mg.trial
    def work() -> int:
        return 7

    assert work() == 7
    assert [(e.kind, e.ok) for e in (srv.next_event(), srv.next_event())] == [("start", None), ("end", True)]
    with pytest.raises(ValueError):
        with mg.trial("trial-2"):
            raise ValueError("boom")
    srv.next_event()
    end = srv.next_event()
    assert (end.kind, end.ok, end.name, end.detail) == ("end", False, "trial-2", "ValueError: boom")
    with pytest.raises(KeyboardInterrupt):
        with mg.trial("trial-3"):
            raise KeyboardInterrupt
    srv.next_event()
    end = srv.next_event()
    assert (end.kind, end.ok) == ("end", False) and end.detail.startswith("KeyboardInterrupt")


def test_closed_gate_waits_reports_refused_once_and_proceeds_when_opened(memguard_env: tuple[ServerThread, Path]) -> None:
    """With the admission file closed, trial() waits (its body does not run), reports `refused` once
    with memguard's reason, and starts as soon as the file says open: the server sees exactly
    refused, start, end."""
    srv, gate = memguard_env
    _set_gate(gate, "closed: rule hold-trials: worker.memory 7.1GiB > 85%\n")
    entered = threading.Event()
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with mg.trial("trial-9"):
                entered.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    refused = srv.next_event()
    assert (refused.kind, refused.name) == ("refused", "trial-9")
    assert refused.detail == "rule hold-trials: worker.memory 7.1GiB > 85%"
    assert not entered.is_set()
    _set_gate(gate, "open\n")
    assert entered.wait(DEADLINE_S)
    t.join(DEADLINE_S)
    assert errors == []
    rest = _drain(srv)
    assert [e.kind for e in rest] == ["start", "end"]


def test_wait_timeout_raises_admission_timeout(memguard_env: tuple[ServerThread, Path]) -> None:
    """A gate that stays closed past wait_timeout raises AdmissionTimeout (a MemguardError) naming the
    worker and memguard's reason; the trial is never reported as started."""
    srv, gate = memguard_env
    _set_gate(gate, "closed: memory.available < 15%\n")
    with pytest.raises(mg.AdmissionTimeout) as info:
        with mg.trial("trial-4", wait_timeout=0.3):
            raise AssertionError("the body ran although the gate was closed")
    assert isinstance(info.value, mg.MemguardError)
    assert "trials-0" in str(info.value) and "memory.available < 15%" in str(info.value)
    assert info.value.waited_s >= 0.3
    assert [e.kind for e in [srv.next_event(), *_drain(srv)]] == ["refused"]


def test_heartbeat_is_rate_limited(memguard_env: tuple[ServerThread, Path]) -> None:
    """Two heartbeats within a second send one message."""
    srv, _ = memguard_env
    assert mg.heartbeat() is True
    assert mg.heartbeat() is False
    assert srv.next_event().kind == "heartbeat"
    assert _drain(srv) == []


def test_reclaim_push_runs_callbacks_and_reports(memguard_env: tuple[ServerThread, Path]) -> None:
    """A reclaim pushed by the server runs gc and the registered callbacks on a background thread, a
    failing callback is caught and named in the detail, and `reclaimed` is reported; the worker's
    own thread is never disturbed."""
    srv, _ = memguard_env
    client = mg.Client()
    ran = threading.Event()
    where: list[str] = []

    def release_cache() -> None:
        where.append(threading.current_thread().name)
        ran.set()

    def broken() -> None:
        raise RuntimeError("cannot free")

    client.on_reclaim(release_cache)
    client.on_reclaim(broken)
    try:
        assert srv.call(srv.server.send_reclaim, "trials-0", "rule reclaim-early") == 1
        assert ran.wait(DEADLINE_S)
        ev = srv.next_event()
        assert ev.kind == "reclaimed"
        assert "gc collected" in ev.detail and "2 callback(s)" in ev.detail
        assert "broken: RuntimeError: cannot free" in ev.detail
        assert where == ["memguard-reclaim"]
    finally:
        client.close()


def test_socket_gone_degrades_to_the_admission_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    clean_env: None) -> None:
    """With MEMGUARD_SOCKET pointing at nothing (memguard restarting), trials still run, the closed
    gate still holds them and releases them when opened, and nothing raises."""
    gate = tmp_path / "gate"
    gate.write_text("closed: restarting\n")
    monkeypatch.setenv("MEMGUARD_SOCKET", str(tmp_path / "missing.sock"))
    monkeypatch.setenv("MEMGUARD_TOKEN", "x" * 32)
    monkeypatch.setenv("MEMGUARD_WORKER", "trials-0")
    monkeypatch.setenv("MEMGUARD_ADMISSION_FILE", str(gate))
    with pytest.raises(mg.AdmissionTimeout):
        with mg.trial(wait_timeout=0.2):
            pass
    _set_gate(gate, "open\n")
    with mg.trial("t"):
        mg.heartbeat()
    assert mg.heartbeat() is False


def test_admin_request_round_trip(memguard_env: tuple[ServerThread, Path], tmp_path: Path) -> None:
    """admin_request() sends one admin op and returns the daemon's reply; an unreachable socket raises
    ControlUnavailable."""
    srv, _ = memguard_env
    reply = mg.admin_request("status", srv.path)
    assert reply == {"ok": True, "workers": {"trials-0": "running"}, "id": 1}
    assert srv.admin == [{"op": "status"}]
    with pytest.raises(mg.ControlUnavailable):
        mg.admin_request("status", str(tmp_path / "nothing.sock"), timeout_s=1)


def test_importing_the_client_loads_only_the_standard_library() -> None:
    """`import memguard.client` in a fresh interpreter adds no third-party module (psutil, structlog,
    yaml, ...): every newly loaded top-level module is in sys.stdlib_module_names or is memguard."""
    code = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        import memguard.client
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        print(" ".join(sorted(m for m in new if m not in sys.stdlib_module_names and m != "memguard")))
        print(" ".join(sorted(m for m in new if m.startswith("memguard"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    foreign, ours = out.stdout.split("\n")[:2]
    assert foreign == "", f"memguard.client imported third-party modules: {foreign}"
    assert ours == "memguard"
    code2 = "import sys, memguard.client; print(sorted(m for m in sys.modules if m.startswith('memguard')))"
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=60, check=True)
    assert out2.stdout.strip() == "['memguard', 'memguard.client', 'memguard.paths']"  # paths: standard library only
