#!/usr/bin/env python3
"""What watching costs between ticks: the watcher's thread alone, polling or waiting on the kernel.

Runs memguard's watcher (:mod:`memguard.sense.watch`) in this process for
``--seconds`` with a band whose low edge is ``--headroom`` MiB below the
scope's available memory now (10 MiB: the "held just above a threshold"
case), and reports the process's CPU time over that window (nothing else
runs in it), the reads it made and the time per read:

* ``host``: polls ``/proc/meminfo`` (MemAvailable), as memguard does in host
  scope (no kernel notification exists for it);
* ``cgroup-poll``: polls a memory cgroup's usage (``memory.stat`` every
  100 ms), as on cgroup v2;
* ``cgroup-kernel``: cgroup v1 usage thresholds: no read until the kernel
  signals, a backstop read every ``max_interval`` (1 s).

The cgroup modes need root (a memory cgroup is created, with nothing in it);
``host`` does not. If the real host's available memory moves past the band
meanwhile, the watcher reports a crossing and this script hands it the band
again (counted).

    .venv/bin/python bench/watchcost.py --modes host
    sudo .venv/bin/python bench/watchcost.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from memguard.model import WatchPlan
from memguard.sense.watch import CgroupProbe, HostProbe, Target, Watcher

MiB = 1 << 20


def _cgroup() -> tuple[str, int] | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
            return str(Path("/sys/fs/cgroup/memory") / rel.lstrip("/")), 1
    return None


def run(mode: str, seconds: float, headroom: float) -> dict:
    cg_path = None
    if mode == "host":
        probe: HostProbe | CgroupProbe = HostProbe()
        total = None
        kernel = False
    else:
        found = _cgroup()
        if found is None or os.geteuid() != 0:
            raise SystemExit(f"{mode} needs root and a cgroup v1 memory hierarchy")
        cg_path = f"{found[0]}/memguard-watchcost-{uuid.uuid4().hex[:8]}"
        os.mkdir(cg_path)
        Path(f"{cg_path}/memory.limit_in_bytes").write_text(str(1 << 30))
        probe = CgroupProbe(cg_path, 1)
        total = float(1 << 30)
        kernel = mode == "cgroup-kernel"
    crossings = 0
    crossed = threading.Event()
    w = Watcher(probe, kernel_thresholds=kernel)
    w.start(crossed.set)

    def plan() -> None:
        avail = probe.read(total, precise=True) if isinstance(probe, CgroupProbe) else probe.read(total)
        assert avail is not None
        w.watch(Target(WatchPlan(low_bytes=avail - headroom * MiB, max_interval_s=1.0), total))

    try:
        plan()
        w.checked.wait(5)
        polls0 = w.polls
        c0 = time.process_time()
        t0 = time.monotonic()
        end = t0 + seconds
        while (left := end - time.monotonic()) > 0:
            if crossed.wait(left):
                crossed.clear()
                crossings += 1
                w.take()
                plan()
        wall = time.monotonic() - t0
        cpu = time.process_time() - c0
        polls = w.polls - polls0
        return {"mode": mode, "headroom_mib": headroom, "seconds": round(wall, 2),
                "cpu_percent": round(cpu / wall * 100, 4), "reads": polls, "reads_per_s": round(polls / wall, 1),
                "cpu_us_per_read": round(cpu / polls * 1e6, 1) if polls else None,
                "kernel_wakes": w.kernel_wakes, "crossings_replanned": crossings, "watch_mode": w.mode,
                "loadavg": Path("/proc/loadavg").read_text().split()[0]}
    finally:
        w.close()
        if cg_path is not None:
            os.rmdir(cg_path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="host,cgroup-poll,cgroup-kernel")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--headroom", type=float, default=10.0, help="MiB between the scope and the band's low edge")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for mode in args.modes.split(","):
        r = run(mode, args.seconds, args.headroom)
        rows.append(r)
        print(f"{mode:14s} {r['headroom_mib']:g} MiB above: {r['cpu_percent']} % of a core, {r['reads_per_s']} reads/s"
              f" ({r['cpu_us_per_read']} us CPU each), kernel wake-ups {r['kernel_wakes']}, load {r['loadavg']}",
              flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"watchcost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2) + "\n")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
