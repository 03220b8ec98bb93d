#!/usr/bin/env python3
"""memguard trials benchmark: a leaking Optuna search in a small box, with and without memguard.

Run as root from the repository root::

    sudo .venv/bin/python bench/trials.py

The first incident, scaled down: two Optuna workers share one SQLite study
and run ``examples/optuna/objective.py``, whose every trial keeps
``LEAK`` MiB for ever (a module-global list) and trains for 0.2 s. Both run
inside a memory cgroup this script creates, with a hard limit of 1.25 GiB
(the box). For each leak rate, two runs of ``--seconds`` each:

* **without memguard**: each worker runs under a shell loop that starts it
  again when it dies (the watchdog the incident wished it had); when the
  box is full the kernel's OOM killer ends a worker, and its trial stays
  RUNNING in the study. At the end of the run each worker gets SIGINT, as
  memguard would stop it, so a trial left RUNNING is one the kernel cut;
* **with memguard**: ``memguard daemon`` in the box runs the workers with
  the recipe's workload (docs/recipes/hyperparameter-search.md) scaled to
  512 MiB per worker: reclaim at 60 %, block at 75 % (release 60 %),
  ``restart_when_blocked: true``, ``recycle: {max_trials: 50}``,
  ``stop_signal: SIGINT``.

Measured per run: COMPLETE trials per minute (the study's own count over
the run), the share of each worker's time its gate was closed (from
memguard's ``block``/``release``/``exit`` events), kernel OOM kills (the
box's counter and memguard's per-worker exits), trials left RUNNING at the
end, memguard's brake and recycle restarts, and workers marked failed.

See docs/benchmarks.md for the figures. Results go to
bench/results/trials-<date>.json and a table to standard output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

MiB, GiB = 1 << 20, 1 << 30
BOX = int(1.25 * GiB)          # the box: a memory cgroup with this hard limit
WORKER_BUDGET = "512MiB"       # limits.memory of each worker under memguard
TRIAL_SECONDS = 0.2            # "training" time of one trial
REPO = Path(__file__).resolve().parent.parent
OBJECTIVE = REPO / "examples" / "optuna" / "objective.py"
RESULTS = REPO / "bench" / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Box:
    """A memory cgroup below ours (v1 memory hierarchy, or cgroup2 with the memory controller)."""

    def __init__(self, limit: int) -> None:
        self.path, self.version = self._create()
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / name).write_text(str(limit))
        swap = self.path / ("memory.memsw.limit_in_bytes" if self.version == 1 else "memory.swap.max")
        if swap.exists():
            try:
                swap.write_text(str(limit) if self.version == 1 else "0")
            except OSError:
                pass

    @staticmethod
    def _create() -> tuple[Path, int]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            if "memory" in ctrl.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
                p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / f"memguard-bench-{uuid.uuid4().hex[:8]}"
                p.mkdir()
                return p, 1
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                p = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / f"memguard-bench-{uuid.uuid4().hex[:8]}"
                p.mkdir()
                return p, 2
        raise SystemExit("no memory cgroup controller found")

    def wrap(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "sh", *argv]

    def oom_kills(self) -> int:
        """Kernel OOM kills in the box and every cgroup below it (memguard's per-worker cgroups)."""
        total = 0
        for d in [self.path, *(p for p in self.path.rglob("*") if p.is_dir())]:
            f = d / ("memory.oom_control" if self.version == 1 else "memory.events")
            try:
                for line in f.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        total += int(value)
            except OSError:
                pass
        return total

    def cleanup(self) -> None:
        dirs = sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [self.path]
        for d in dirs:
            for _ in range(100):
                try:
                    pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)  # only what this script started lives here
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            try:
                d.rmdir()
            except OSError:
                pass


def _wait_empty(box: Box, timeout: float) -> None:
    """Until no process is left in the box (the workers recorded their interrupted trials), or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not (box.path / "cgroup.procs").read_text().split():
                return
        except OSError:
            return
        time.sleep(0.1)


def study_counts(url: str) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="memguard-optuna", storage=url)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def worker_env(url: str, leak: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMGUARD_")}
    env.update(PYTHONUNBUFFERED="1", STUDY_STORAGE=url, N_TRIALS="100000", LEAK_MIB_PER_TRIAL=str(leak),
               TRIAL_SECONDS=str(TRIAL_SECONDS))
    return env


def run_without(tmp: Path, leak: int, seconds: float) -> dict[str, Any]:
    """Two workers under restart loops, in the box; the kernel is the only guard."""
    url = f"sqlite:///{tmp / 'study.db'}"
    box = Box(BOX)
    loop = f'while true; do "{sys.executable}" "{OBJECTIVE}" >/dev/null 2>&1; sleep 1; done'
    procs = [subprocess.Popen(box.wrap(["sh", "-c", loop]), env=worker_env(url, leak), start_new_session=True)
             for _ in range(2)]
    try:
        time.sleep(seconds)
    finally:
        for p in procs:
            p.kill()  # the restart loop first, then its worker the way memguard would stop it
            p.wait()
            os.killpg(p.pid, signal.SIGINT)
        _wait_empty(box, 30.0)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ooms = box.oom_kills()
        box.cleanup()
    counts = study_counts(url)
    return {"mode": "without", "leak_mib": leak, "seconds": seconds, "complete": counts.get("COMPLETE", 0),
            "trials_per_min": 60.0 * counts.get("COMPLETE", 0) / seconds, "oom_kills": ooms,
            "left_running": counts.get("RUNNING", 0), "blocked_fraction": None, "brake_restarts": 0,
            "recycles": 0, "failed_workers": 0, "states": counts}


WORKLOAD = """\
name: study
command: [{python}, {objective}]
replicas: 2
environment: {env}
limits: {{memory: {budget}}}
stop_signal: SIGINT
grace: 10s
rules:
  - {{name: reclaim-early, when: "worker.memory > 60%", action: reclaim}}
  - {{name: hold-trials, when: "worker.memory > 75%", action: block, release: "worker.memory < 60%"}}
  - {{name: over-budget, when: "worker.memory > 95%", for: 5s, action: terminate}}
restart_when_blocked: true
recycle: {{max_trials: 50, max_age: 60m}}
restart: {{policy: on-failure, backoff: 1s..60s, budget: 20/1h}}
"""


def _ts(e: dict[str, Any]) -> float:
    return _dt.datetime.fromisoformat(e["timestamp"]).timestamp()


def blocked_fraction(events: list[dict[str, Any]], worker: str, start: float, end: float) -> float:
    total, since = 0.0, None
    for e in events:
        if e.get("worker") != worker or "timestamp" not in e:
            continue
        if e.get("event") == "block" and since is None:
            since = _ts(e)
        elif e.get("event") in ("release", "exit") and since is not None:
            total += _ts(e) - since
            since = None
    if since is not None:
        total += end - since
    return total / max(1e-9, end - start)


def run_with(tmp: Path, leak: int, seconds: float) -> dict[str, Any]:
    """memguard in the box, running the two workers."""
    url = f"sqlite:///{tmp / 'study.db'}"
    (tmp / "workloads.d").mkdir()
    env = {k: v for k, v in worker_env(url, leak).items()
           if k in ("PYTHONUNBUFFERED", "STUDY_STORAGE", "N_TRIALS", "LEAK_MIB_PER_TRIAL", "TRIAL_SECONDS")}
    (tmp / "workloads.d" / "study.yaml").write_text(WORKLOAD.format(
        python=json.dumps(sys.executable), objective=json.dumps(str(OBJECTIVE)), env=json.dumps(env),
        budget=WORKER_BUDGET))
    (tmp / "memguard.yaml").write_text("scope: auto\nworkloads: workloads.d/\n")
    box = Box(BOX)
    argv = [sys.executable, "-m", "memguard.cli", "daemon", "--config", str(tmp / "memguard.yaml"),
            "--log-format", "json", "--runtime-dir", str(tmp / "run")]
    daemon = subprocess.Popen(box.wrap(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                              start_new_session=True)
    events: list[dict[str, Any]] = []

    def read() -> None:
        assert daemon.stdout is not None
        for raw in daemon.stdout:
            try:
                events.append(json.loads(raw))
            except ValueError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.time()
    try:
        time.sleep(seconds)
    finally:
        end = time.time()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        reader.join(10)
        ooms = box.oom_kills()
        box.cleanup()
    counts = study_counts(url)
    restarts = [e for e in events if e.get("event") == "restart" and _ts(e) <= end]
    return {"mode": "with", "leak_mib": leak, "seconds": seconds, "complete": counts.get("COMPLETE", 0),
            "trials_per_min": 60.0 * counts.get("COMPLETE", 0) / seconds,
            "oom_kills": max(ooms, sum(1 for e in events if e.get("cause") == "kernel_oom")),
            "left_running": counts.get("RUNNING", 0),
            "blocked_fraction": max(blocked_fraction(events, w, start, end) for w in ("study-0", "study-1")),
            "brake_restarts": sum(1 for e in restarts if e.get("rule") == "restart_when_blocked"),
            "recycles": sum(1 for e in restarts if str(e.get("rule", "")).startswith("recycle")),
            "failed_workers": sum(1 for e in events if e.get("event") == "failed"), "states": counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaks", default="2,8,32", help="MiB kept by every trial, comma-separated (default 2,8,32)")
    ap.add_argument("--seconds", type=float, default=90.0, help="length of each run (default 90)")
    ap.add_argument("--modes", default="without,with")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("bench/trials.py needs root (it creates a memory cgroup)")
        return 2
    runs = []
    for leak in [int(x) for x in args.leaks.split(",")]:
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory(prefix="memguard-bench-") as d:
                log(f"leak {leak} MiB/trial, {mode} memguard, {args.seconds:g} s ...")
                r = (run_with if mode == "with" else run_without)(Path(d), leak, args.seconds)
                log(f"  {r['complete']} trials, {r['trials_per_min']:.0f}/min, OOM kills {r['oom_kills']}, "
                    f"RUNNING left {r['left_running']}")
                runs.append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trials-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"host": platform.node(), "kernel": platform.release(), "box_bytes": BOX,
                               "worker_budget": WORKER_BUDGET, "trial_seconds": TRIAL_SECONDS, "runs": runs},
                              indent=1))
    print("| leak / trial | memguard | trials / min | max blocked | kernel OOM kills | RUNNING left | "
          "brake restarts | recycles | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        blocked = "n/a" if r["blocked_fraction"] is None else f"{100 * r['blocked_fraction']:.1f} %"
        print(f"| {r['leak_mib']} MiB | {r['mode']} | {r['trials_per_min']:.0f} | {blocked} | {r['oom_kills']} | "
              f"{r['left_running']} | {r['brake_restarts']} | {r['recycles']} | {r['failed_workers']} |")
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
