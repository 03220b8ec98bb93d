"""Drive memguard's GpuSensor over the real pynvml module, one JSON command per line.

Run by tests/nvmlkit.py in a child process whose LD_LIBRARY_PATH leads
pynvml's dlopen("libnvidia-ml.so.1") to the C stand-in, and whose
PYTHONPATH may put an older nvidia-ml-py first. Each line on stdin is a
command; each answer is one line of JSON on stdout:

    {"op": "start", "timeout_s": 2.0, "start_timeout_s": 10.0}  -> the GpuStart
    {"op": "read"} / {"op": "read_async"}                       -> the GpuReading
    {"op": "wait_idle", "timeout": 20}                          -> {"idle": bool}
    {"op": "attribute", "trees": {"w-0": [pid, ...]}}           -> the last reading's attribution
    {"op": "binding"}                                           -> which pynvml is loaded
    {"op": "close"}                                             -> {}
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from memguard.model import Unknown
from memguard.sense.gpu import GpuReading, GpuSensor, GpuStart, attribute_all


def enc(value: Any) -> Any:
    if isinstance(value, Unknown):
        return {"unknown": value.reason}
    if isinstance(value, Mapping):
        return {str(k): enc(v) for k, v in value.items()}
    return value


def reading(r: GpuReading) -> dict:
    return {
        "devices": [{"index": d.index, "uuid": enc(d.uuid), "name": enc(d.name), "total": enc(d.total_bytes),
                     "used": enc(d.used_bytes), "free": enc(d.free_bytes), "processes": enc(d.processes),
                     "mig": d.mig} for d in r.devices],
        "problems": [{"device": p.device, "kind": p.kind, "message": p.message, "elapsed_s": p.elapsed_s,
                      "key": list(p.key)} for p in r.problems],
    }


def start(s: GpuStart) -> dict:
    return {"enabled": s.enabled, "reason": s.reason, "jetson": s.jetson,
            "devices": reading(GpuReading(s.devices))["devices"]}


def main() -> None:
    sensor: GpuSensor | None = None
    last = GpuReading()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "start":
                sensor = GpuSensor(timeout_s=cmd.get("timeout_s", 2.0),
                                   start_timeout_s=cmd.get("start_timeout_s", 20.0),
                                   tegra_release_path=cmd.get("tegra_release_path", "/nonexistent"))
                out: Any = start(sensor.start())
            elif op in ("read", "read_async"):
                assert sensor is not None
                last = sensor.read() if op == "read" else asyncio.run(sensor.read_async())
                out = reading(last)
            elif op == "wait_idle":
                assert sensor is not None
                out = {"idle": sensor.wait_idle(cmd.get("timeout", 20.0))}
            elif op == "attribute":
                att = attribute_all(last, {k: list(v) for k, v in cmd["trees"].items()})
                out = {w: {"total": enc(g.total_bytes), "per_device": enc(g.per_device), "pids": list(g.pids)}
                       for w, g in [*att.workers.items(), ("(unattributed)", att.unattributed)]}
            elif op == "binding":
                import pynvml

                from memguard.sense.gpu import _binding_version

                out = {"file": pynvml.__file__, "version": _binding_version(),
                       "mismatch_error": hasattr(pynvml, "NVMLLibraryMismatchError")}
            elif op == "close":
                if sensor is not None:
                    sensor.close()
                out = {}
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception:
            out = {"error": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
