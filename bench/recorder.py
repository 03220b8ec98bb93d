#!/usr/bin/env python3
"""What the flight recorder costs: memory held and CPU time per tick, and what an incident record costs.

Run from the repository root (no root needed)::

    .venv/bin/python bench/recorder.py            # or: make bench-recorder

For 10 and 100 workers (and 2 GPUs), it fills a recorder with a full
window (default 10 minutes) of ticks as the daemon makes them: one full
tick a second, and fast ticks at 10 Hz (a machine near a threshold: the
worst case; a calm machine makes only the full ticks), with the marks deque
full. Then it measures:

- memory: the rings' arrays (``FlightRecorder.nbytes()``) and everything the
  recorder holds, as ``tracemalloc`` counts it (arrays, column dicts, marks);
- CPU: the median time of one ``record()`` call on a full ring, for a fast
  tick and a full tick, and of ``record_actions()`` with one decision;
- an incident: the time of ``timeline(300 s)``, the size of the JSON record
  it makes, and the time of ``IncidentStore.write`` with and without fsync
  (the store in a temporary directory on the filesystem of /tmp); and the
  write of a pending record without its timeline (what the daemon writes
  before a signal).

Figures go to standard output as a table and to
``bench/results/recorder-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from memguard.model import (  # noqa: E402
    UNKNOWN,
    Explanation,
    GpuDeviceReading,
    Observation,
    Pressure,
    ScopeMemory,
    Signal,
    WorkerSample,
)
from memguard.report.incidents import Incident, IncidentStore, incident_id  # noqa: E402
from memguard.report.recorder import FlightRecorder  # noqa: E402

GiB = 1 << 30


def observation(at: float, workers: int, gpus: int, full: bool, n: int) -> Observation:
    ws = {}
    if full:
        ws = {f"w-{i}": WorkerSample(f"w-{i}", 1000 + i, float((1 + i % 7) * GiB + n * 4096),
                                     gpu_memory_bytes=float(GiB) if i % 2 else UNKNOWN) for i in range(workers)}
    g = tuple(GpuDeviceReading(str(k), 80 * GiB, 40 * GiB + n, 40 * GiB - n) for k in range(gpus)) if full else ()
    return Observation(at=at, scope=ScopeMemory("host", 64 * GiB, 20 * GiB - n * 1000, 8 * GiB, 8 * GiB, 0),
                       pressure=Pressure(1.5, 1.0, 0.2, 0.1), workers=ws, full=full, gpus=g)


def fill(rec: FlightRecorder, workers: int, gpus: int, seconds: float, fast_hz: float) -> float:
    """Tick the recorder for ``seconds`` of virtual time; returns the last time."""
    step = 1.0 / fast_hz if fast_hz > 0 else 1.0
    n = 0
    t = 0.0
    while t < seconds:
        full = abs(t - round(t)) < step / 2
        rec.record(observation(t, workers, gpus, full, n))
        n += 1
        t = n * step
    # The marks deque full, each with its own sentence (as real decisions have).
    for k in range(rec.marks.maxlen or 0):
        ex = Explanation("host-low", "memory.available < 10%", "memory.available", 6e9 - k, 6.4e9, "bytes",
                         f"memory.available {5.6 - k / 1e4:.4f}GiB (8.7% of 64GiB) < 10% (6.4GiB) [{k}]")
        rec.record_actions(t - k * 0.1, [Signal(f"w-{k % 10}", "w", 1000 + k, 1, 15, "terminate",
                                                f"rule host-low #{k}", ex)])
    return t


def measure(workers: int, gpus: int, window_s: float, fast_hz: float, reps: int) -> dict:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    rec = FlightRecorder(window_s=window_s)
    t = fill(rec, workers, gpus, window_s * 1.2, fast_hz)
    gc.collect()
    after = tracemalloc.take_snapshot()
    traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.stop()

    fast_obs = [observation(t + 1000 + k * 0.1, workers, gpus, False, k) for k in range(reps)]
    full_obs = [observation(t + 2000 + k, workers, gpus, True, k) for k in range(reps)]

    def timed(fn, items) -> float:
        ts = []
        for it in items:
            t0 = time.perf_counter_ns()
            fn(it)
            ts.append(time.perf_counter_ns() - t0)
        return statistics.median(ts) / 1000.0

    fast_us = timed(rec.record, fast_obs)
    full_us = timed(rec.record, full_obs)
    ex = Explanation("host-low", "memory.available < 10%", "memory.available", 6e9, 6.4e9, "bytes", "x")
    act = [Signal("w-0", "w", 1000, 1, 15, "terminate", "rule host-low", ex)]
    actions_us = timed(lambda at: rec.record_actions(at, act), [t + 3000 + k for k in range(reps)])
    around = rec.latest_at
    tl_times = []
    for _ in range(20):
        t0 = time.perf_counter_ns()
        tl = rec.timeline(300.0, around=around)
        tl_times.append(time.perf_counter_ns() - t0)
    timeline_ms = statistics.median(tl_times) / 1e6
    inc = Incident(id=incident_id(time.time(), "bench"), key="bench", cause="host_oom", summary="bench",
                   wall=time.time(), timeline=tl)
    record_bytes = len(inc.to_json(indent=1))
    pending = Incident(id=incident_id(time.time(), "pending"), key="pending", cause="host_oom", summary="bench",
                       wall=time.time(), state="pending",
                       what={"pid": 1000, "command": ["python", "train.py", "--epochs", "90"], "worker": "w-0"},
                       how={"signal": 15, "signal_name": "SIGTERM", "sent_by": "memguard"},
                       why={"rule": "host-low", "when": "memory.available < 10%", "value": 6e9, "threshold": 6.4e9,
                            "ranking": [{"worker": f"w-{i}", "memory_bytes": (1 + i % 7) * GiB} for i in range(10)]})
    pending_bytes = len(pending.to_json())
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        store = IncidentStore(d)
        p_times = []
        for k in range(20):
            i1 = Incident(**{**pending.to_dict(), "id": incident_id(time.time(), f"p{k}"), "key": f"p{k}"})
            t0 = time.perf_counter_ns()
            store.write(i1, durable=False, prune=False)
            p_times.append(time.perf_counter_ns() - t0)
        w_times, wd_times = [], []
        for k in range(10):
            i2 = Incident(**{**inc.to_dict(), "id": incident_id(time.time(), f"b{k}"), "key": f"b{k}"})
            t0 = time.perf_counter_ns()
            store.write(i2, durable=False, prune=False)
            w_times.append(time.perf_counter_ns() - t0)
            i3 = Incident(**{**inc.to_dict(), "id": incident_id(time.time(), f"d{k}"), "key": f"d{k}"})
            t0 = time.perf_counter_ns()
            store.write(i3, durable=True, prune=False)
            wd_times.append(time.perf_counter_ns() - t0)
    return {
        "workers": workers, "gpus": gpus, "window_s": window_s, "fast_hz": fast_hz,
        "scope_slots": rec.scope.capacity, "full_slots": rec.full.capacity,
        "columns": len(rec.full.cols) + len(rec.scope.cols), "marks": len(rec.marks),
        "array_bytes": rec.nbytes(), "traced_bytes": traced,
        "record_fast_us": round(fast_us, 1), "record_full_us": round(full_us, 1),
        "record_actions_us": round(actions_us, 1),
        # One full tick a second, the other ticks of the second fast ones.
        "cpu_percent": round((full_us + max(0.0, fast_hz - 1) * fast_us) / 1e6 * 100, 4),
        "timeline_300s_ms": round(timeline_ms, 2), "incident_json_bytes": record_bytes,
        "pending_json_bytes": pending_bytes,
        "pending_write_ms": round(statistics.median(p_times) / 1e6, 3),
        "write_ms": round(statistics.median(w_times) / 1e6, 2),
        "write_fsync_ms": round(statistics.median(wd_times) / 1e6, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="10,100", help="worker counts to measure (default 10,100)")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs per tick (default 2)")
    ap.add_argument("--window", type=float, default=600.0, help="recorder window, seconds (default 600)")
    ap.add_argument("--fast-hz", type=float, default=10.0, help="fast ticks per second (default 10)")
    ap.add_argument("--reps", type=int, default=2000, help="timed calls per figure (default 2000)")
    ap.add_argument("--out", help="result file (default bench/results/recorder-<date>.json)")
    args = ap.parse_args()
    rows = [measure(int(w), args.gpus, args.window, args.fast_hz, args.reps) for w in args.workers.split(",")]
    print(f"flight recorder, {args.window:g} s window, full ticks at 1 Hz, fast ticks at {args.fast_hz:g} Hz, "
          f"{args.gpus} GPUs, marks deque full; Python {platform.python_version()} on {platform.machine()}")
    head = ("workers", "arrays", "traced", "fast tick", "full tick", "CPU", "timeline 300s", "record", "write",
            "write+fsync", "pending write")
    print("  ".join(f"{h:>13}" for h in head))
    for r in rows:
        cells = (r["workers"], f"{r['array_bytes'] / 1024:.0f} KiB", f"{r['traced_bytes'] / 1024:.0f} KiB",
                 f"{r['record_fast_us']:.1f} us", f"{r['record_full_us']:.1f} us",
                 f"{r['cpu_percent']:.3f} %", f"{r['timeline_300s_ms']:.1f} ms",
                 f"{r['incident_json_bytes'] / 1024:.0f} KiB", f"{r['write_ms']:.2f} ms", f"{r['write_fsync_ms']:.2f} ms",
                 f"{r['pending_write_ms']:.2f} ms")
        print("  ".join(f"{c!s:>13}" for c in cells))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"recorder-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                               "cpus": os.cpu_count(), "kernel": platform.release(), "rows": rows}, indent=2) + "\n")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
