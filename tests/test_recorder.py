"""The flight recorder: bounded memory, spikes kept, fast ticks apart from full ticks, marks and thresholds.

Driven with Observation values at virtual times (the recorder has no clock).
"""

from __future__ import annotations

import json

import pytest

from memguard.model import (
    UNKNOWN,
    Exited,
    Explanation,
    GpuDeviceReading,
    Notice,
    Observation,
    Pressure,
    ScopeMemory,
    SetAdmission,
    Signal,
    Spawned,
    TrialEvent,
    WorkerSample,
)
from memguard.report.recorder import FlightRecorder

GiB = 1 << 30


def obs(at: float, avail: float, *, full: bool = True, workers: dict | None = None, psi: float = 0.0,
        gpus: tuple = (), events: tuple = ()) -> Observation:
    ws = {name: WorkerSample(worker=name, pid=100 + i, memory_bytes=mem, gpu_memory_bytes=UNKNOWN)
          for i, (name, mem) in enumerate((workers or {}).items())}
    return Observation(at=at, scope=ScopeMemory("host", 16 * GiB, avail, 2 * GiB, GiB, 3),
                       pressure=Pressure(psi, psi / 2, psi / 4, psi / 8), workers=ws, full=full, gpus=gpus,
                       events=events)


def test_memory_is_bounded_whatever_runs() -> None:
    """The rings never grow past their capacity: an hour of 10 Hz ticks costs what the first window cost."""
    r = FlightRecorder(window_s=60)
    for i in range(600):  # one window of 10 Hz fast ticks, a full tick each second
        r.record(obs(i / 10, 8 * GiB, full=i % 10 == 0, workers={"w-0": GiB, "w-1": 2 * GiB}))
    size = r.nbytes()
    for i in range(600, 36000):
        r.record(obs(i / 10, 8 * GiB, full=i % 10 == 0, workers={"w-0": GiB, "w-1": 2 * GiB}))
    assert r.nbytes() == size
    tl = r.timeline(window_s=3600)
    assert len(tl["scope"]["t"]) == r.scope.capacity and len(tl["full"]["t"]) == r.full.capacity
    assert tl["scope"]["t"][0] >= -60.5  # nothing older than the window survives


def test_a_spike_between_slots_is_kept() -> None:
    """Fast ticks inside one half-second slot are merged keeping the worst: a 50 ms dip of available memory
    and a pressure peak survive even when the slot's last tick is calm."""
    r = FlightRecorder(window_s=60)
    r.record(obs(10.0, 8 * GiB))
    r.record(obs(10.05, 1 * GiB, full=False, psi=40.0))
    r.record(obs(10.10, 7 * GiB, full=False))
    r.record(obs(10.6, 7 * GiB, full=False))
    tl = r.timeline(window_s=5, around=10.6)
    assert tl["scope"]["available_bytes"] == [1 * GiB, 7 * GiB]
    assert tl["scope"]["psi_some_avg10"] == [40.0, 0.0]
    assert tl["scope"]["used_bytes"] == [15 * GiB, 9 * GiB]  # derived: total - available


def test_workers_come_from_full_ticks_only() -> None:
    """A fast tick carries the last full tick's (stale) worker samples: they are not recorded again."""
    r = FlightRecorder(window_s=60)
    r.record(obs(1.0, 8 * GiB, workers={"w-0": GiB}))
    r.record(obs(2.0, 8 * GiB, full=False, workers={"w-0": GiB}))
    r.record(obs(3.0, 8 * GiB, workers={"w-0": 2 * GiB}))
    tl = r.timeline(window_s=10, around=3.0)
    assert tl["full"]["t"] == [-2.0, 0.0]
    assert tl["full"]["worker[w-0].memory_bytes"] == [GiB, 2 * GiB]
    assert tl["worker_summary"]["w-0"] == {"peak_bytes": 2 * GiB, "last_bytes": 2 * GiB,
                                           "growth_bytes_per_s": GiB / 2}
    assert len(tl["scope"]["t"]) == 3


def test_unknown_readings_are_null() -> None:
    """An Unknown reading is NaN inside and null in the timeline, never a number."""
    r = FlightRecorder(window_s=60)
    r.record(Observation(at=1.0, scope=ScopeMemory("host", UNKNOWN, UNKNOWN)))
    r.record(obs(2.0, 4 * GiB))
    tl = r.timeline(window_s=10, around=2.0)
    assert tl["scope"]["available_bytes"] == [None, 4 * GiB]
    json.dumps(tl, allow_nan=False)  # strict JSON: no NaN anywhere


def test_marks_thresholds_and_gpus() -> None:
    """Decisions become marks with their rule's numbers; the rule's threshold is drawn on its series; trial and
    lifecycle events are marks too; GPUs get used and total series."""
    r = FlightRecorder(window_s=60)
    ex = Explanation(rule="host-low", when="memory.available < 10%", signal="memory.available",
                     value=1.2 * GiB, threshold=1.6 * GiB, unit="bytes", display="memory.available 1.2GiB < 10%")
    gpu = (GpuDeviceReading("0", 80 * GiB, 70 * GiB, 10 * GiB),)
    r.record(obs(1.0, 8 * GiB, workers={"w-0": GiB}, gpus=gpu,
                 events=(Spawned("w-0", 1, 100, 1.0), TrialEvent("w-0", 1, "start", 1.0, name="t1"))))
    r.record(obs(2.0, 8 * GiB, workers={"w-0": GiB}, gpus=gpu))
    r.record_actions(2.0, [Signal("w-0", "w", 100, 1, 15, "terminate", "rule host-low", ex),
                           SetAdmission("w-1", "w", False, "block", "pressure"),
                           Notice("debug-only", level="debug")])
    r.record(obs(3.0, 8 * GiB, events=(Exited("w-0", 1, 100, 3.0, signal=15),)))
    tl = r.timeline(window_s=10, around=3.0)
    events = [(m["event"], m.get("worker")) for m in tl["marks"]]
    assert events == [("spawned", "w-0"), ("trial", "w-0"), ("terminate", "w-0"), ("block", "w-1"),
                      ("exited", "w-0")]
    term = tl["marks"][2]
    assert term["rule"] == "host-low" and term["sent"] == "SIGTERM" and term["t"] == -1.0
    assert tl["thresholds"] == [{"series": "scope.available_bytes", "value": 1.6 * GiB, "label": "host-low",
                                 "signal": "memory.available"}]
    assert tl["full"]["worker[w-0].trial"][:2] == [1, 1]
    assert tl["full"]["gpu[0].used_bytes"] == [70 * GiB, 70 * GiB, None]  # the last tick had no GPU reading


def test_gone_workers_are_dropped_and_the_biggest_are_shown() -> None:
    """A worker gone for a whole window loses its columns; the timeline shows the workers with the highest peaks."""
    r = FlightRecorder(window_s=10)
    r.record(obs(0.0, 8 * GiB, workers={f"w-{i}": i * GiB for i in range(12)}))
    for t in range(1, 40):
        r.record(obs(float(t), 8 * GiB, workers={"w-11": 11 * GiB, "w-3": 3 * GiB}))
    assert not any(n.startswith("worker[w-5]") for n in r.full.cols)
    r2 = FlightRecorder(window_s=60)
    r2.record(obs(1.0, 8 * GiB, workers={f"w-{i}": i * GiB for i in range(12)}))
    assert r2.timeline(window_s=10, around=1.0, max_workers=3)["workers"] == ["w-10", "w-11", "w-9"]
    assert r2.timeline(window_s=10, around=1.0, workers=["w-1"])["workers"] == ["w-1"]


def test_after_window() -> None:
    """The seconds after an incident come from the same rings (appended to the record later)."""
    r = FlightRecorder(window_s=60)
    for t in range(10):
        r.record(obs(float(t), (8 - t * 0.5) * GiB))
    tl = r.timeline(window_s=0, around=5.0, after_s=3.0)
    assert tl["scope"]["t"] == [0.0, 1.0, 2.0, 3.0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        FlightRecorder(window_s=0)
