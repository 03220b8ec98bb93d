#!/usr/bin/env python3
"""What one full tick costs, in CPU time, as the number of processes grows.

Starts W workers of P processes each (a main process and P-1 children, all
``sleep``), measures them the way the daemon's reader thread does
(:func:`memguard.sense.observer.measure_workers`), then runs the core's
``step`` and the pacing (:func:`~memguard.decide.pacing.next_wake`,
:func:`~memguard.decide.pacing.watch_plan`) on the result: the whole work of
a full tick but the log lines. CPU time is the thread's own
(``time.thread_time``), median of ``--reps`` ticks after one warm-up tick.

Two set-ups: with a memory cgroup per worker (root, cgroup v1 or v2 with the
memory controller: what ``worker_cgroups: auto`` gives), and without (the
tree walked through ``/proc/<pid>/task/*/children``, memory summed over it).
Without cgroups the memory is PSS (``smaps_rollup``) for workers whose
rules read their memory, the resident figure (``status``) for the others;
``--pss`` measures the PSS case.

    sudo .venv/bin/python bench/fulltick.py                    # 100, 250, 500 processes
    .venv/bin/python bench/fulltick.py --no-cgroups --sizes 500
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from memguard.decide.core import step
from memguard.decide.pacing import next_wake, watch_plan
from memguard.decide.state import CoreState
from memguard.expr import parse_expr
from memguard.model import (LiveSnapshot, LiveWorker, Observation, Pressure, Reconcile, ScopeMemory, Spawned)
from memguard.policy import ActionKind, DaemonPolicy, Rule, WorkloadPolicy
from memguard.sense.observer import _ReaderCache, measure_workers
from memguard.sense.procs import process_start_time

GiB = 1 << 30


def _cgroup_root() -> tuple[Path, int] | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
            return Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), 1
    return None


def start_workers(n: int, per: int, root: Path | None) -> list[tuple[str, int, Path | None, list[int]]]:
    """n workers of ``per`` processes: a shell that starts per-1 sleeps and waits (all sleeping)."""
    out = []
    for i in range(n):
        cg = None
        if root is not None:
            cg = root / f"w{i}"
            cg.mkdir()
        script = f"for i in $(seq {per - 1}); do sleep 1000 & done; " + ("exec sleep 1000" if per == 1 else "wait")
        argv = ["sh", "-c", script]
        if cg is not None:
            argv = ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *argv]
        p = subprocess.Popen(argv, start_new_session=True)
        out.append((f"w-{i}", p.pid, cg, [p.pid]))
    deadline = time.monotonic() + 60
    for name, pid, cg, _ in out:  # wait until each tree is complete
        while True:
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                kids = []
            if len(kids) >= per - 1 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    return out


def stop_workers(workers: list[tuple[str, int, Path | None, list[int]]], root: Path | None) -> None:
    for _, pid, _, _ in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _, pid, _, _ in workers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if root is not None:
        for d in sorted(root.glob("w*")):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        root.rmdir()


def measure(n: int, per: int, cgroups: bool, reps: int, pss: bool) -> dict:
    root = None
    if cgroups:
        found = _cgroup_root()
        if found is None or os.geteuid() != 0:
            raise SystemExit("cgroups need root and a v1 memory hierarchy here; use --no-cgroups")
        root = found[0] / f"memguard-fulltick-{uuid.uuid4().hex[:8]}"
        root.mkdir()
    workers = start_workers(n, per, root)
    try:
        rule_when = "worker.memory > 4GiB" if pss else "worker.age > 1d"
        rules = (Rule(name="r", when=parse_expr(rule_when, "worker"), when_text=rule_when,
                      action=ActionKind.RESTART, scope="worker"),)
        wl = WorkloadPolicy(name="w", command=("sleep",), replicas=n, rules=rules)
        system = (Rule(name="s", when=parse_expr("memory.available < 2GiB", "system"),
                       when_text="memory.available < 2GiB", action=ActionKind.KILL, scope="system"),)
        policy = DaemonPolicy(workloads=(wl,), rules=system, protect=("sshd", "systemd"))
        snapshot = LiveSnapshot({name: LiveWorker(name, 1, pid, process_start_time(pid) or 0, (),
                                                  str(cg) if cg is not None else None)
                                 for name, pid, cg, _ in workers}, frozenset(), "bench")
        scope = ScopeMemory("host", 24 * GiB, 20 * GiB, 0, 0, 0)
        state = CoreState()
        state, _ = step(state, Observation(at=0.0, scope=scope, events=(Reconcile("start"),)), policy, 0.0)
        spawned = tuple(Spawned(name, 1, pid, 0.0) for name, pid, _, _ in workers)
        state, _ = step(state, Observation(at=0.0, scope=scope, events=spawned), policy, 0.0)
        cache = _ReaderCache()
        cache.claim()
        pss_for = {name for name, *_ in workers} if pss else set()
        times, reads = [], []
        now = 1.0
        for i in range(reps + 1):
            t0 = time.thread_time()
            # As the daemon reads them for these rules: no rule reads worker.idle or worker.quiet, no /proc/<pid>/io.
            samples, _ = measure_workers(snapshot, policy.protect, cache, pss=pss_for, io=set())
            t1 = time.thread_time()
            obs = Observation(at=now, scope=scope, pressure=Pressure(), workers=samples, full=True)
            state, _ = step(state, obs, policy, now)
            next_wake(state, obs, policy, now, now, True)
            watch_plan(state, obs, policy)
            t2 = time.thread_time()
            if i:
                times.append((t2 - t0) * 1000)
                reads.append((t1 - t0) * 1000)
            now += 1.0
        procs = sum(s.processes for s in samples.values())
        return {"workers": n, "processes": procs, "cgroups": cgroups, "pss": pss,
                "full_tick_cpu_ms": round(statistics.median(times), 2),
                "reading_cpu_ms": round(statistics.median(reads), 2),
                "per_process_us": round(statistics.median(times) / procs * 1000, 1)}
    finally:
        stop_workers(workers, root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,250,500", help="process counts (default 100,250,500)")
    ap.add_argument("--per-worker", type=int, default=5, help="processes per worker (default 5)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-cgroups", action="store_true", help="only the set-up without worker cgroups")
    ap.add_argument("--pss", action="store_true", help="without cgroups, read PSS (a rule reads worker.memory)")
    ap.add_argument("--out", help="result file (JSON)")
    args = ap.parse_args()
    rows = []
    modes = [False] if args.no_cgroups or os.geteuid() != 0 else [True, False]
    for size in (int(x) for x in args.sizes.split(",")):
        for cg in modes:
            for pss in ([False, True] if args.pss and not cg else [False]):
                r = measure(size // args.per_worker, args.per_worker, cg, args.reps, pss)
                rows.append(r)
                print(f"{r['processes']:4d} processes in {r['workers']:3d} workers, "
                      f"{'cgroups' if cg else 'no cgroups, ' + ('PSS' if pss else 'resident')}: "
                      f"full tick {r['full_tick_cpu_ms']} ms CPU (reading {r['reading_cpu_ms']} ms), "
                      f"{r['per_process_us']} us per process", flush=True)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": Path("/proc/loadavg").read_text().strip(),
              "python": sys.version.split()[0], "rows": rows}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"fulltick-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
