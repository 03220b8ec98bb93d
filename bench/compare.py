#!/usr/bin/env python3
"""memguard, earlyoom and nohang side by side, in one harness: reaction, CPU and memory.

Run as root from the repository root (``apt-get install earlyoom nohang lxcfs``
first; none of them is started as a system service: this script runs each one
itself, inside the test cgroup and a PID namespace of its own, and stops it)::

    sudo .venv/bin/python bench/compare.py                      # everything (about 25 minutes)
    sudo .venv/bin/python bench/compare.py --part reaction --guards memguard --workers 0,200

Every guard runs in a memory cgroup of 6 GiB that this script creates, with
2 GiB held by a balloon process (private anonymous memory, outside the
guard's PID namespace, so no guard can choose it) and the rule "below
2 GiB available, SIGKILL the hog" (earlyoom ``-M 2097152,2097152``, nohang
``hard_threshold_min_mem = 2048 M``, memguard ``memory.available < 2GiB,
action kill``). The guards see the cgroup as their "host":

* ``memguard`` (cgroup scope): memguard's production set-up in a memory
  cgroup; it reads the cgroup's own files and waits on kernel thresholds.
* ``memguard-host``, ``earlyoom``, ``nohang``: each in a PID and mount
  namespace where ``/proc`` shows only its own processes and
  ``/proc/meminfo`` is lxcfs's view of the cgroup (MemTotal = the 6 GiB
  limit, MemAvailable = limit - usage + page cache): host scope, on a host
  of 6 GiB, without filling the real host. A FUSE read costs more than a
  kernel one; lxcfs's own CPU is reported beside.

The hog (bench/hog.py; oom_score_adj 500 like memguard's workers, so the
peers choose it by oom_score) allocates at 2 GB/s, linearly or in bursts of
256 MiB, with 0, 50 or 200 idle workers (``sleep``) beside it. The sampler
(this process, outside the cgroup) reads the cgroup every ~0.3 ms: how far
below 2 GiB available memory got, and whether the kernel OOM killer had to
act. The CPU part measures each guard idle (2 idle workers, 2 GiB above the
threshold) and holding 10 MiB above it, from the per-thread schedstat run
times; the memory part its RSS and PSS, helpers included.

Results: bench/results/compare-<date>.json and tables on standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reaction as R  # noqa: E402  (the cgroup, lab and CPU helpers)

MiB, GiB = R.MiB, R.GiB
THRESHOLD = 2 * GiB
BALLOON = 2 * GiB
HOLD_ABOVE = 10 * MiB
GUARDS = ("memguard", "memguard-host", "earlyoom", "nohang")
SAMPLE_SLEEP = 0.00025

log = R.log


# ---------------------------------------------------------------------------
# lxcfs: a per-cgroup /proc/meminfo


class Lxcfs:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="memguard-bench-lxcfs-")
        self.proc = subprocess.Popen(["lxcfs", "-f", "-u", "-p", f"{self.dir}.pid", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.meminfo):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise R.Refused("lxcfs did not start (is /dev/fuse there?)")
            time.sleep(0.05)

    @property
    def meminfo(self) -> str:
        return f"{self.dir}/proc/meminfo"

    def close(self) -> None:
        subprocess.run(["umount", "-l", self.dir], capture_output=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.unlink(f"{self.dir}.pid")
        except OSError:
            pass


# ---------------------------------------------------------------------------
# One guard with its hog


def ns_wrap(argv: list[str], lxcfs: Lxcfs, before: str = "") -> list[str]:
    """argv as PID 1 of a new PID and mount namespace whose /proc/meminfo is lxcfs's view."""
    script = f"mount --bind {lxcfs.meminfo} /proc/meminfo || exit 97; {before} exec \"$@\""
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--mount-proc",
            "sh", "-c", script, "sh", *argv]


def hog_argv(tmp: str) -> list[str]:
    return [sys.executable, "-I", str(R.HOG), "--pid-file", f"{tmp}/hog.pid", "--fifo", f"{tmp}/go.fifo"]


def memguard_config(tmp: str, scope: str, idle: int) -> str:
    os.makedirs(f"{tmp}/workloads.d", exist_ok=True)
    Path(f"{tmp}/memguard.yaml").write_text(
        "poll_interval: 1s\nfast_poll_interval: 100ms\n"
        f"scope: {scope}\nworkloads: workloads.d/\nlog: {{format: json, level: info}}\n"
        f"state_dir: {json.dumps(tmp + '/state')}\n"  # incident records stay with the run, not in /var/lib
        'rules:\n  - {"name": "bench-kill", "when": "memory.available < 2GiB", "action": "kill"}\n')
    Path(f"{tmp}/workloads.d/hog.yaml").write_text(
        f"name: hog\ncommand: {json.dumps(hog_argv(tmp))}\ngrace: 1s\nrestart: {{policy: never}}\n")
    if idle:
        Path(f"{tmp}/workloads.d/idle.yaml").write_text(
            f"name: idle\nreplicas: {idle}\ncommand: [\"sleep\", \"1000000\"]\nrestart: {{policy: never}}\n")
    return f"{tmp}/memguard.yaml"


def nohang_config(tmp: str) -> str:
    text = Path("/etc/nohang/nohang.conf").read_text()
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ("soft_threshold_min_mem", "hard_threshold_min_mem"):
            line = f"{key} = 2048 M"
        elif key in ("warning_threshold_min_mem",):
            line = f"{key} = 1 %"
        elif key == "low_memory_warnings_enabled":
            line = "low_memory_warnings_enabled = False"
        out.append(line)
    Path(f"{tmp}/nohang.conf").write_text("\n".join(out) + "\n")
    return f"{tmp}/nohang.conf"


class Session:
    """A guard, its hog and its idle workers in a fresh 6 GiB cgroup with a 2 GiB balloon."""

    def __init__(self, parent: R.Cgroup, guard: str, idle: int, lxcfs: Lxcfs | None, tag: str) -> None:
        self.guard = guard
        self.tmp = tempfile.mkdtemp(prefix="memguard-bench-")
        self.lab = R.Lab(parent, f"memguard-cmp-{os.getpid()}-{tag}", self.tmp)
        self.idle = idle
        self.lxcfs = lxcfs
        self.proc: subprocess.Popen | None = None
        self.guard_pid = 0
        self.hog_pid = 0
        self.hog_fd = -1
        self.out = open(f"{self.tmp}/guard.out", "wb")

    def start(self) -> None:
        cg = self.lab.create()
        self._balloon()
        os.mkfifo(f"{self.tmp}/go.fifo", 0o600)
        guard = self.guard
        if guard.startswith("memguard"):
            scope = "cgroup" if guard == "memguard" else "host"
            cfg = memguard_config(self.tmp, scope, self.idle)
            argv = [str(Path(sys.executable).parent / "memguard"), "daemon", "--config", cfg, "--log-format",
                    "json", "--runtime-dir", f"{self.tmp}/run"]
            if guard == "memguard-host":
                assert self.lxcfs is not None
                argv = ns_wrap(argv, self.lxcfs)
        else:
            assert self.lxcfs is not None
            tool = (["earlyoom", "-M", "2097152,2097152", "-r", "0"] if guard == "earlyoom"
                    else ["nohang", "--monitor", "-c", nohang_config(self.tmp)])
            hog = " ".join(f"'{a}'" for a in hog_argv(self.tmp))
            idle = f"for i in $(seq {self.idle}); do sleep 1000000 & done; " if self.idle else ""
            argv = ns_wrap(tool, self.lxcfs, before=f"{idle}{hog} & ")
        self.proc = self.lab.in_cgroup(argv, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._find_processes(cg)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.lab.fifo_fd = os.open(f"{self.tmp}/go.fifo", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise R.RunFailed("the hog never opened its fifo") from None
                time.sleep(0.005)
        if not guard.startswith("memguard"):
            Path(f"/proc/{self.hog_pid}/oom_score_adj").write_text("500")  # as memguard gives its workers
        time.sleep(2.0)  # the guard settles (memguard: workers measured, thresholds armed)

    def _balloon(self) -> None:
        code = ("import mmap,os,signal\n"
                f"m=mmap.mmap(-1,{BALLOON},flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)\n"
                f"m.madvise(mmap.MADV_POPULATE_WRITE) if hasattr(mmap,'MADV_POPULATE_WRITE') else m.write(b'x'*{BALLOON})\n"
                "print('held',flush=True)\nsignal.pause()\n")
        p = self.lab.in_cgroup([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE)
        assert p.stdout is not None
        r, _, _ = select.select([p.stdout], [], [], 60)
        if not r or not p.stdout.readline().startswith(b"held"):
            raise R.RunFailed("the balloon did not fill")

    def _find_processes(self, cg: R.Cgroup) -> None:
        """The hog and the guard, by host pid (the hog may live in a PID namespace: found by command line)."""
        assert self.proc is not None
        deadline = time.monotonic() + 60
        want_idle = self.idle
        while True:
            procs = R.subtree_procs(cg.path)
            cmd = {p: _cmdline(p) for p in procs}
            hogs = [p for p, c in cmd.items() if str(R.HOG) in c and f"{self.tmp}/hog.pid" in c
                    and not c.startswith(("sh ", "unshare "))]
            sleeps = sum(1 for c in cmd.values() if c.startswith("sleep"))
            names = {"memguard": "daemon", "memguard-host": "daemon", "earlyoom": "earlyoom",
                     "nohang": "nohang"}
            guards = [p for p, c in cmd.items() if names[self.guard] in c and "unshare" not in c
                      and not c.startswith("sh ") and str(R.HOG) not in c]
            if hogs and guards and sleeps >= want_idle:
                self.hog_pid = hogs[0]
                self.guard_pid = min(guards)
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise R.RunFailed(f"{self.guard} did not start its hog and workers: "
                                  + Path(f"{self.tmp}/guard.out").read_bytes()[-1500:].decode(errors="replace"))
            time.sleep(0.05)
        self.hog_fd = os.pidfd_open(self.hog_pid)
        self.lab.pidfds.append(self.hog_fd)

    def helpers(self) -> list[int]:
        """The guard's helper processes (memguard's sentinel)."""
        out = []
        for tid in R._tasks(self.guard_pid):
            try:
                out += [int(x) for x in R._read(f"/proc/{self.guard_pid}/task/{tid}/children").split()]
            except OSError:
                pass
        return [p for p in out if "sentinel" in _cmdline(p)]

    def go(self, **go: Any) -> None:
        os.write(self.lab.fifo_fd, (json.dumps(go) + "\n").encode())

    def close(self) -> None:
        for p in self.lab.cleanup():
            log(f"cleanup: {p}")
        self.out.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return R._read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Reaction


def reaction(parent: R.Cgroup, guard: str, idle: int, shape: str, rate: float, rep: int,
             lxcfs: Lxcfs | None) -> dict[str, Any]:
    s = Session(parent, guard, idle, lxcfs, f"{guard}-{idle}-{shape}-{rep}")
    try:
        s.start()
        cg = s.lab.cg
        assert cg is not None
        cg.reset_peak()
        before = cg.counters()
        avail_start = cg.available()
        R.warm_up(R.WARM_UP)
        m0 = R.machine_cpu()
        s.go(rate=rate, **({"burst": 256 * MiB} if shape == "bursty" else {}))
        t_go = time.monotonic()
        min_avail, t_cross, t_min, timed_out = avail_start, None, None, False
        samples = []
        deadline = t_go + 20
        while True:
            a = cg.available()
            now = time.monotonic()
            samples.append((now, a))
            if a < min_avail:
                min_avail, t_min = a, now
            if t_cross is None and a < THRESHOLD:
                t_cross = now
            if select.select([s.hog_fd], [], [], SAMPLE_SLEEP)[0]:
                t_exit = time.monotonic()
                break
            if now > deadline and not timed_out:
                timed_out = True
                signal.pidfd_send_signal(s.hog_fd, signal.SIGKILL)
                deadline = now + 10
            elif timed_out and now > deadline:
                raise R.RunFailed("the hog survived SIGKILL for 10 s")
        m1 = R.machine_cpu()
        after = cg.counters()
        oom = max(after["oom_kill"] - before["oom_kill"],  # type: ignore[operator]
                  (after["oom_events"] or 0) - (before["oom_events"] or 0))  # type: ignore[operator]
        stopped_by = "kernel OOM killer" if oom else ("timeout" if timed_out else guard)
        rate_near = None
        if t_cross is not None:
            early = [(t, a) for t, a in samples if t_cross - 0.1 <= t <= t_cross]
            if len(early) > 1 and early[-1][0] - early[0][0] > 0.05:
                rate_near = (early[0][1] - early[-1][1]) / (early[-1][0] - early[0][0])
        return {
            "guard": guard, "idle_workers": idle, "hog": shape, "rate_bytes_per_s": rate, "rep": rep,
            "stopped_by": stopped_by, "available_at_go_bytes": avail_start,
            "min_available_bytes": min_avail, "below_threshold_mib": round((THRESHOLD - min_avail) / MiB, 2),
            "min_available_from_peak_bytes": None if after["peak_usage"] is None
            else R.LIMIT - after["peak_usage"],
            "crossing_to_min_ms": None if t_cross is None or t_min is None else round((t_min - t_cross) * 1000, 2),
            "crossing_to_exit_ms": None if t_cross is None else round((t_exit - t_cross) * 1000, 2),
            "hog_rate_last_100ms_bytes_per_s": None if rate_near is None else round(rate_near),
            "oom_kills_cgroup": oom,
            "machine_busy_percent": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100, 1),
            "loadavg": R._read("/proc/loadavg").decode().split()[0],
            "guard_output_tail": Path(f"{s.tmp}/guard.out").read_bytes()[-1500:].decode(errors="replace")
            if not s.guard.startswith("memguard") else None,
        }
    finally:
        s.close()


# ---------------------------------------------------------------------------
# CPU and memory


def footprint(pids: list[int]) -> dict[str, float]:
    rss = pss = 0
    for p in pids:
        try:
            for line in R._read(f"/proc/{p}/status").decode().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for line in R._read(f"/proc/{p}/smaps_rollup").decode().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)}


def cpu_of(pids: list[int], seconds: float, beside: list[int] = ()) -> dict[str, Any]:
    """CPU use of ``pids`` (all threads) over ``seconds``; ``beside`` (lxcfs) is measured in the same window."""
    m0 = R.machine_cpu()
    r0 = [R.cpu_reading(p) for p in pids]
    b0 = [R.cpu_reading(p) for p in beside]
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    r1 = [R.cpu_reading(p) for p in pids]
    b1 = [R.cpu_reading(p) for p in beside]
    m1 = R.machine_cpu()
    run = sum(b[1] - a[1] for a, b in zip(r0, r1))
    slices = sum(b[2] - a[2] for a, b in zip(r0, r1))
    out: dict[str, Any] = {"cpu_percent": round(run / wall * 100, 4), "wakeups_per_s": round(slices / wall, 1),
                           "machine_busy_percent": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100, 1),
                           "loadavg": R._read("/proc/loadavg").decode().split()[0]}
    if beside:
        out["lxcfs_cpu_percent"] = round(sum(b[1] - a[1] for a, b in zip(b0, b1)) / wall * 100, 4)
    return out


def cpu_part(parent: R.Cgroup, guard: str, idle: int, lxcfs: Lxcfs | None, idle_s: float,
             hold_s: float) -> dict[str, Any]:
    s = Session(parent, guard, idle, lxcfs, f"cpu-{guard}-{idle}")
    try:
        s.start()
        cg = s.lab.cg
        assert cg is not None
        pids = [s.guard_pid] + s.helpers()
        lx = [lxcfs.proc.pid] if lxcfs is not None and guard != "memguard" else []
        out: dict[str, Any] = {"guard": guard, "workers": idle + 1, "processes": pids,
                               "footprint": footprint(pids), "footprint_guard_only": footprint(pids[:1])}
        log(f"CPU {guard} ({idle + 1} workers): idle, {cg.available() / GiB:.2f} GiB available, {idle_s:.0f} s")
        out["idle"] = cpu_of(pids, idle_s, lx)
        # Hold 10 MiB above the threshold: most of the way first, then the rest measured (the hog's page
        # tables and the guard's own growth take a few MiB beside what the hog is asked for).
        first = cg.available() - (THRESHOLD + HOLD_ABOVE) - 16 * MiB
        s.go(rate=1e9, stop_at=first)
        _wait_holding(s, 1)
        time.sleep(1.0)
        extra = cg.available() - (THRESHOLD + HOLD_ABOVE)
        if extra > 0:
            s.go(rate=1e9, stop_at=first + extra)
            _wait_holding(s, 2)
        time.sleep(1.0)
        avail = cg.available()
        log(f"CPU {guard} ({idle + 1} workers): holding {(avail - THRESHOLD) / MiB:.1f} MiB above, {hold_s:.0f} s")
        out["hold"] = cpu_of(pids, hold_s, lx)
        out["hold"]["headroom_mib"] = round((avail - THRESHOLD) / MiB, 1)
        out["hog_alive_after_hold"] = not select.select([s.hog_fd], [], [], 0)[0]
        return out
    finally:
        s.close()


def _wait_holding(s: Session, n: int) -> None:
    """Until the hog said 'holding' ``n`` times (memguard logs its workers' output as JSON events, the
    peers' namespace passes it through: either way it is in the guard's output)."""
    deadline = time.monotonic() + 30
    while Path(f"{s.tmp}/guard.out").read_bytes().count(b"holding") < n:
        if time.monotonic() > deadline:
            raise R.RunFailed("the hog did not reach its hold")
        time.sleep(0.05)


# ---------------------------------------------------------------------------


def preflight(guards: list[str]) -> R.Cgroup:
    parent = R.preflight()
    for tool in ("earlyoom", "nohang"):
        if tool in guards and shutil.which(tool) is None:
            raise R.Refused(f"{tool} is not installed (apt-get install earlyoom nohang lxcfs)")
    if any(g != "memguard" for g in guards) and (shutil.which("lxcfs") is None or shutil.which("unshare") is None):
        raise R.Refused("lxcfs and unshare are needed for host scope and the peers (apt-get install lxcfs)")
    return parent


def versions() -> dict[str, str]:
    out = {}
    for tool, argv in (("earlyoom", ["earlyoom", "-v"]), ("nohang", ["nohang", "--version"])):
        if shutil.which(tool):
            r = subprocess.run(argv, capture_output=True, text=True)
            lines = [x for x in (r.stdout + r.stderr).splitlines() if tool in x.lower() and "warning" not in x.lower()]
            out[tool] = lines[-1].strip() if lines else "?"
            deb = subprocess.run(["dpkg-query", "-W", "-f=${Version}", tool], capture_output=True, text=True)
            if deb.returncode == 0:
                out[tool] += f" (Debian package {deb.stdout.strip()})"
    out["memguard"] = subprocess.run([str(Path(sys.executable).parent / "memguard"), "--version"],
                                     capture_output=True, text=True).stdout.strip()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "reaction", "cpu"), default="all")
    ap.add_argument("--guards", default=",".join(GUARDS))
    ap.add_argument("--workers", default="0,50,200", help="idle workers beside the hog (reaction)")
    ap.add_argument("--cpu-workers", default="1,50,200", help="memguard's worker counts in the CPU part")
    ap.add_argument("--shapes", default="linear,bursty")
    ap.add_argument("--rate", type=float, default=2.0, help="GB/s (default 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--hold-seconds", type=float, default=15)
    ap.add_argument("--out")
    args = ap.parse_args()
    guards = args.guards.split(",")
    try:
        parent = preflight(guards)
    except R.Refused as e:
        print(f"compare.py: refusing to run: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, R._raise_interrupt)
    lxcfs = Lxcfs() if any(g != "memguard" for g in guards) else None
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": R.machine(),
                              "versions": versions(), "source": R.source_state(),
                              "loadavg_at_start": R._read("/proc/loadavg").decode().strip(),
                              "runs": [], "cpu": [], "failures": []}
    try:
        if args.part in ("all", "reaction"):
            for rep in range(1, args.reps + 1):
                for shape in args.shapes.split(","):
                    for idle in (int(x) for x in args.workers.split(",")):
                        for guard in guards:
                            if guard != "memguard" and guard != "memguard-host" and idle not in (0, 200):
                                continue  # the peers scan every process: 0 and 200 tell their cost
                            try:
                                r = reaction(parent, guard, idle, shape, args.rate * 1e9, rep, lxcfs)
                            except R.RunFailed as e:
                                log(f"{guard} {shape} {idle} #{rep}: FAILED: {e}")
                                result["failures"].append({"guard": guard, "idle": idle, "shape": shape,
                                                           "error": str(e)})
                                continue
                            result["runs"].append(r)
                            log(f"{guard:13s} {shape:6s} {idle:3d} idle #{rep}: {r['stopped_by']}, "
                                f"{r['below_threshold_mib']:+.1f} MiB past the threshold, load {r['loadavg']}")
        if args.part in ("all", "cpu"):
            for guard in guards:
                counts = [int(x) for x in args.cpu_workers.split(",")] if guard.startswith("memguard") else [1]
                for n in counts:
                    try:
                        result["cpu"].append(cpu_part(parent, guard, n - 1, lxcfs, args.idle_seconds,
                                                      args.hold_seconds))
                    except R.RunFailed as e:
                        log(f"CPU {guard} {n}: FAILED: {e}")
                        result["failures"].append({"part": "cpu", "guard": guard, "workers": n, "error": str(e)})
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        if lxcfs is not None:
            lxcfs.close()
    result["loadavg_at_end"] = R._read("/proc/loadavg").decode().strip()
    result["summary"] = summarize(result["runs"])
    out = Path(args.out) if args.out else R.RESULTS / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    R.RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    log(f"results in {out}")
    return 1 if result["failures"] or result.get("interrupted") else 0


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["guard"], r["hog"], r["idle_workers"]), []).append(r)
    rows = []
    for (guard, shape, idle), rs in sorted(groups.items()):
        below = [r["below_threshold_mib"] for r in rs]
        rows.append({"guard": guard, "hog": shape, "idle_workers": idle, "runs": len(rs),
                     "stopped_by_guard": sum(1 for r in rs if r["stopped_by"] == guard),
                     "below_mib_median": round(statistics.median(below), 1), "below_mib_worst": max(below),
                     "oom_kills": sum(r["oom_kills_cgroup"] for r in rs),
                     "loadavg": [r["loadavg"] for r in rs]})
    return rows


def print_tables(result: dict[str, Any]) -> None:
    if result["summary"]:
        print("\n| guard | hog | idle workers | runs | stopped by the guard | MiB past 2 GiB (median / worst) "
              "| kernel OOM kills | load average |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["summary"]:
            print(f"| {r['guard']} | {r['hog']} | {r['idle_workers']} | {r['runs']} | {r['stopped_by_guard']} | "
                  f"{r['below_mib_median']} / {r['below_mib_worst']} | {r['oom_kills']} | "
                  f"{', '.join(r['loadavg'])} |")
    if result["cpu"]:
        print("\n| guard | workers | idle: CPU % of a core | wake-ups/s | held 10 MiB above: CPU % | wake-ups/s "
              "| RSS MiB (all processes) | PSS MiB | load |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in result["cpu"]:
            print(f"| {c['guard']} | {c['workers']} | {c['idle']['cpu_percent']} | {c['idle']['wakeups_per_s']} | "
                  f"{c['hold']['cpu_percent']} | {c['hold']['wakeups_per_s']} | {c['footprint']['rss_mib']} | "
                  f"{c['footprint']['pss_mib']} | {c['idle']['loadavg']}, {c['hold']['loadavg']} |")


if __name__ == "__main__":
    sys.exit(main())
