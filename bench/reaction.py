#!/usr/bin/env python3
"""memguard reaction benchmark: how far below its threshold a fast hog gets.

Run as root from the repository root::

    sudo make bench            # or: sudo .venv/bin/python bench/reaction.py

Everything that takes memory runs inside a memory cgroup this script
creates under its own memory cgroup (cgroup v1 ``memory`` hierarchy, or
cgroup2 with the memory controller), with a hard limit of 6 GiB: whatever
happens, the kernel keeps it inside those 6 GiB. A 2 GiB file written to
tmpfs (/dev/shm) by a process placed in that cgroup leaves about 4 GiB
available; memguard runs inside the cgroup (``scope: auto`` picks the
cgroup) with one system rule ``memory.available < 2GiB`` and one worker,
the hog (bench/hog.py), which on a go signal allocates at 1 or 2 GB/s.
Just before the go, this script touches and frees 3 GiB outside the
cgroup (see warm_up()), then samples the cgroup's figures from its own
process, outside the cgroup, every ~0.3 ms and records the lowest
available memory, the moment available first fell below 2 GiB, the
moment the hog exited (pidfd), the hog's real rate and the kernel OOM
kills. A second part measures the daemon's CPU use idle and while memory
is held just above the threshold. A fresh cgroup, balloon and daemon
serve each run.

The ``ladder`` action runs two rules at the same threshold instead of
one: a graceful rule that acts on the trend (``within: 2s``: terminate as
soon as available memory, falling at its recent rate, will cross 2 GiB
within 500 ms; ``--within``) and the last resort (``kill`` on the level). The graceful rule
wins a run when its SIGTERM stops the hog before the last resort fires.
``--rates bursty`` (with numbers, e.g. ``1,2,bursty``) adds a bursty
allocator: 256 MiB at full speed, then 200 ms of nothing, over and over.

See docs/benchmarks.md for what the figures mean. Results go to
bench/results/reaction-<date>.json and a summary to standard output.
Exit status: 0 done, 1 a run failed to complete, 2 refused to run.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import json
import mmap
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LIMIT = 6 * GiB                 # the cgroup's hard limit
HEADROOM_AT_START = 4 * GiB     # available memory left by the balloon
BALLOON = LIMIT - HEADROOM_AT_START
THRESHOLD = 2 * GiB             # the system rule: memory.available < 2GiB
SAMPLE_SLEEP = 0.00025          # sampler pause between reads (select on the hog's pidfd)
# Available memory to hold at in the CPU part: 2.2 GiB (within 10 % of the threshold, so full ticks
# run every fast_poll_interval), 2.05 GiB, and 12 and 5 MiB above 2 GiB (the fast path at 2 ms and
# at its 1 ms floor).
HOLD_TARGETS = (int(2.2 * GiB), int(2.05 * GiB), 2 * GiB + 12 * MiB, 2 * GiB + 5 * MiB)
HOLD_RATE = 1e9
WARM_UP = 3 * GiB               # touched and freed outside the cgroup before each go (see warm_up)
LADDER_WITHIN = "500ms"         # the ladder's graceful rule: within 500 ms on the trend (--within)
BURSTY = -1.0                   # the bursty allocator, among the rates
BURST_BYTES = 256 * MiB         # ... takes 256 MiB at full speed
BURST_PAUSE_S = 0.2             # ... then pauses 200 ms (about 1 GB/s on average, 3-5 GB/s within a burst)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
HOG = REPO / "bench" / "hog.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEEP_TRACES = False             # --traces: keep the samples around each crossing in the results
WORKER_CGROUPS: str | None = None  # --worker-cgroups: memguard's worker_cgroups key (None: its default)


class Refused(Exception):
    """The benchmark cannot run safely here: exit status 2 with this message."""


class RunFailed(Exception):
    """One run did not complete (a deadline passed, the daemon refused to start...)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The memory cgroup


def _read(path: str, size: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _field(data: bytes, key: bytes) -> int:
    """The number after ``key`` and a space at the start of a line of ``data`` (a "kB" after it is ignored)."""
    data = b"\n" + data
    i = data.find(b"\n" + key + b" ")
    if i < 0:
        raise KeyError(key.decode())
    i += len(key) + 2
    j = data.find(b"\n", i)
    return int((data[i:j] if j >= 0 else data[i:]).split()[0])


class Cgroup:
    """A memory cgroup directory (v1 or v2) with the few figures the benchmark needs.

    The files read in the sampler's loop are kept open and re-read with
    one pread each.
    """

    def __init__(self, version: int, path: str) -> None:
        self.version = version
        self.path = path
        self._fds: dict[str, int] = {}
        self._oom_efd = -1
        self._oom_seen = 0
        if version == 1:
            self.usage_file, self.inactive_key = "memory.usage_in_bytes", b"total_inactive_file"
        else:
            self.usage_file, self.inactive_key = "memory.current", b"inactive_file"

    def _pread(self, name: str, size: int = 8192) -> bytes:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(f"{self.path}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, 0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._oom_efd >= 0:
            os.close(self._oom_efd)
            self._oom_efd = -1

    def usage(self) -> int:
        return int(self._pread(self.usage_file, 64))

    def inactive_file(self) -> int:
        return _field(self._pread("memory.stat"), self.inactive_key)

    def available(self) -> int:
        """limit - (usage - inactive file): the figure memguard's cgroup scope computes."""
        ws = self.usage() - self.inactive_file()
        return LIMIT - (ws if ws > 0 else 0)

    def watch_oom(self) -> None:
        """v1: count the OOM events of this cgroup's limit with an eventfd (cgroup.event_control).

        On v1 the ``oom_kill`` counter of ``memory.oom_control`` counts a kill
        in the cgroup the victim's memory belongs to, not up the tree, and
        memguard may give its worker a cgroup of its own below this one
        (and remove it when the worker exits). The OOM notification of
        this cgroup fires whenever its limit drives the kernel to OOM,
        wherever the victim lives.
        """
        if self.version != 1 or self._oom_efd >= 0:
            return
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ofd = os.open(f"{self.path}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _write(f"{self.path}/cgroup.event_control", f"{efd} {ofd}")
        except OSError:
            os.close(efd)
            return
        finally:
            os.close(ofd)
        self._oom_efd = efd

    def oom_events(self) -> int | None:
        """OOM notifications so far (v1 with watch_oom), None where not watched."""
        if self._oom_efd < 0:
            return None
        try:
            self._oom_seen += os.eventfd_read(self._oom_efd)
        except BlockingIOError:
            pass
        return self._oom_seen

    def counters(self) -> dict[str, int | None]:
        """OOM kills and events and the peak usage so far (deltas are what matter)."""
        if self.version == 1:
            return {"oom_kill": _field(_read(f"{self.path}/memory.oom_control"), b"oom_kill"),
                    "oom_events": self.oom_events(),
                    "peak_usage": int(_read(f"{self.path}/memory.max_usage_in_bytes"))}
        ev = _read(f"{self.path}/memory.events")  # hierarchical on v2
        out: dict[str, int | None] = {"oom_kill": _field(ev, b"oom_kill"), "oom_events": _field(ev, b"oom"),
                                      "peak_usage": None}
        if os.path.exists(f"{self.path}/memory.peak"):
            out["peak_usage"] = int(_read(f"{self.path}/memory.peak"))
        return out

    def reset_peak(self) -> None:
        if self.version == 1:
            _write(f"{self.path}/memory.max_usage_in_bytes", "0")

    def procs(self) -> list[int]:
        try:
            return [int(x) for x in _read(f"{self.path}/cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def set_limit(self, limit: int) -> None:
        """Set the hard limit and check that it holds (raises RunFailed otherwise)."""
        if self.version == 1:
            name = "memory.limit_in_bytes"
            _write(f"{self.path}/{name}", str(limit))
            # No swapping inside the cgroup either, where swap accounting exists.
            if os.path.exists(f"{self.path}/memory.memsw.limit_in_bytes"):
                _write(f"{self.path}/memory.memsw.limit_in_bytes", str(limit))
        else:
            name = "memory.max"
            _write(f"{self.path}/{name}", str(limit))
            if os.path.exists(f"{self.path}/memory.swap.max"):
                _write(f"{self.path}/memory.swap.max", "0")
        got = _read(f"{self.path}/{name}").strip()
        if not got.isdigit() or int(got) > limit:
            raise RunFailed(f"{self.path}/{name} reads {got!r} after writing {limit}: no hard limit, not running")


def _mountinfo() -> list[tuple[str, str, str, list[str]]]:
    out = []
    for line in _read("/proc/self/mountinfo", 1 << 20).decode("utf-8", "surrogateescape").splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
        except ValueError:
            continue
        root = parts[3].replace("\\040", " ")
        mnt = parts[4].replace("\\040", " ")
        out.append((parts[sep + 1], root, mnt, parts[sep + 3].split(",")))
    return out


def _under_mount(mnt: str, root: str, cg_path: str) -> str | None:
    if root != "/" and not (cg_path == root or cg_path.startswith(root.rstrip("/") + "/")):
        return None
    rel = cg_path if root == "/" else cg_path[len(root):]
    return os.path.normpath(mnt + "/" + rel.lstrip("/"))


def own_memory_cgroup() -> Cgroup:
    """The memory cgroup this script runs in: the v1 memory hierarchy if there is one, else cgroup2."""
    v1_path = v2_path = None
    for line in _read("/proc/self/cgroup").decode().splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _mountinfo()
    if v1_path is not None:
        for fstype, root, mnt, opts in mounts:
            if fstype == "cgroup" and "memory" in opts:
                d = _under_mount(mnt, root, v1_path)
                if d and os.path.exists(f"{d}/memory.usage_in_bytes"):
                    return Cgroup(1, d)
    if v2_path is not None:
        for fstype, root, mnt, _ in mounts:
            if fstype == "cgroup2":
                d = _under_mount(mnt, root, v2_path)
                try:
                    if d and b"memory" in _read(f"{d}/cgroup.controllers").split():
                        return Cgroup(2, d)
                except OSError:
                    pass
    raise Refused("no memory cgroup: /proc/self/cgroup names no mounted cgroup v1 'memory' hierarchy "
                  "and no cgroup2 directory with the memory controller")


def _v2_parent_for_children(own: Cgroup) -> Cgroup:
    """A cgroup2 directory, own or the nearest ancestor, whose children get the memory controller.

    A cgroup2 directory that holds processes cannot hand controllers to
    children (the "no internal processes" rule), so when this script's
    own cgroup has processes and memory is not yet delegated, the nearest
    ancestor that already delegates it is used instead.
    """
    d = own.path
    while True:
        control = f"{d}/cgroup.subtree_control"
        if b"memory" in _read(control).split():
            return Cgroup(2, d)
        if d == own.path:
            try:
                _write(control, "+memory")
                return Cgroup(2, d)
            except OSError:
                pass
        parent = os.path.dirname(d)
        if parent == d or not os.path.exists(f"{parent}/cgroup.controllers"):
            raise Refused(f"cannot get a cgroup2 memory cgroup: neither {own.path} nor an ancestor "
                          "delegates the memory controller to its children")
        d = parent


def subtree_dirs(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first."""
    return [d for d, _, _ in os.walk(path, topdown=False)] if os.path.isdir(path) else []


def subtree_procs(path: str) -> list[int]:
    out: list[int] = []
    for d in subtree_dirs(path):
        try:
            out += [int(x) for x in _read(f"{d}/cgroup.procs").split()]
        except OSError:
            pass
    return out


@dataclass
class Lab:
    """What one part of the benchmark started, so that :meth:`cleanup` can undo it."""

    parent: Cgroup
    name: str
    tmp: str
    cg: Cgroup | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    balloon: str | None = None
    fifo_fd: int = -1
    pidfds: list[int] = field(default_factory=list)
    files: list[Any] = field(default_factory=list)

    def create(self) -> Cgroup:
        path = f"{self.parent.path}/{self.name}"
        os.mkdir(path)
        self.cg = Cgroup(self.parent.version, path)
        self.cg.set_limit(LIMIT)
        self.cg.watch_oom()
        return self.cg

    def in_cgroup(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start argv inside the cgroup: a shell moves itself there, then execs argv."""
        assert self.cg is not None
        p = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', f"{self.cg.path}/cgroup.procs",
                              *argv], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def cleanup(self) -> list[str]:
        """Stop what was started, remove the balloon and the cgroup. Returns what could not be undone."""
        problems: list[str] = []
        if self.fifo_fd >= 0:
            os.close(self.fifo_fd)
            self.fifo_fd = -1
        for p in self.procs:  # the daemon first gets SIGTERM: it stops its workers itself
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self.cg is not None:
            # Whatever is left in the cgroup or below it (memguard may give
            # each worker a cgroup of its own) was started by this script:
            # SIGKILL each process through a pidfd.
            deadline = time.monotonic() + 10
            while (left := subtree_procs(self.cg.path)) and time.monotonic() < deadline:
                for pid in left:
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        continue
                    try:
                        # The pidfd pins the process: still in the cgroup now, it
                        # is the process listed, not another one that got its pid.
                        if pid in subtree_procs(self.cg.path):
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                    except OSError:
                        pass
                    finally:
                        os.close(fd)
                time.sleep(0.05)
            if left:
                problems.append(f"processes {left} still in {self.cg.path}")
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds.clear()
        for f in self.files:
            f.close()
        self.files.clear()
        if self.balloon is not None:
            try:
                os.unlink(self.balloon)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove {self.balloon}: {e}")
            self.balloon = None
        if self.cg is not None:
            self.cg.close()
            deadline = time.monotonic() + 10
            for d in subtree_dirs(self.cg.path):  # children first
                while True:
                    try:
                        os.rmdir(d)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        if time.monotonic() > deadline:
                            problems.append(f"cannot remove {d}: {e}")
                            break
                        time.sleep(0.1)
            self.cg = None
        return problems


# ---------------------------------------------------------------------------
# The daemon's log


class DaemonLog:
    """memguard's JSON log, read as it grows."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.junk: list[str] = []

    def poll(self) -> None:
        data = self.f.read()
        if not data:
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.junk.append(line.decode(errors="replace"))

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((e for e in self.events if pred(e)), None)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                 proc: subprocess.Popen | None = None) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            ev = self.find(pred)
            if ev is not None or time.monotonic() > deadline:
                return ev
            if proc is not None and proc.poll() is not None:
                self.poll()
                return self.find(pred)
            time.sleep(0.01)

    def close(self) -> None:
        self.f.close()


def wall_of(ev: dict[str, Any]) -> float:
    """An event's timestamp (local ISO time, as memguard writes it) as a Unix time."""
    return _dt.datetime.fromisoformat(ev["timestamp"]).timestamp()


# ---------------------------------------------------------------------------
# One daemon with its hog


def write_config(d: str, action: str) -> dict[str, str]:
    paths = {"dir": d, "config": f"{d}/memguard.yaml", "run": f"{d}/run", "pid": f"{d}/hog.pid",
             "fifo": f"{d}/go.fifo", "log": f"{d}/memguard.log", "err": f"{d}/memguard.err"}
    os.makedirs(f"{d}/workloads.d")
    os.mkfifo(paths["fifo"], 0o600)
    rule = {"name": f"bench-{action}", "when": "memory.available < 2GiB", "action": action}
    if action == "terminate":
        rule["grace"] = "1s"
    rules = [rule]
    if action == "ladder":
        rules = [{"name": "bench-ahead", "when": "memory.available < 2GiB", "within": LADDER_WITHIN,
                  "action": "terminate", "grace": "1s"},
                 {"name": "bench-last-resort", "when": "memory.available < 2GiB", "action": "kill"}]
    daemon = (
        "poll_interval: 1s\n"
        "fast_poll_interval: 100ms\n"
        "scope: auto\n"
        "workloads: workloads.d/\n"
        "log: {format: json, level: info}\n"
        f"state_dir: {json.dumps(d + '/state')}\n"  # incident records stay with the run, not in /var/lib
        + (f"worker_cgroups: {json.dumps(WORKER_CGROUPS)}\n" if WORKER_CGROUPS else "")
        + "rules:\n" + "".join(f"  - {json.dumps(r)}\n" for r in rules)
    )
    command = [sys.executable, "-I", str(HOG), "--pid-file", paths["pid"], "--fifo", paths["fifo"]]
    hog = (
        "name: hog\n"
        f"command: {json.dumps(command)}\n"
        "grace: 1s\n"
        "restart: {policy: never}\n"
    )
    Path(paths["config"]).write_text(daemon)
    Path(f"{d}/workloads.d/hog.yaml").write_text(hog)
    return paths


def memguard_argv() -> list[str]:
    exe = Path(sys.executable).parent / "memguard"
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "memguard"
    if not exe.exists():
        raise Refused(f"memguard is not installed next to {sys.executable} nor in {REPO}/.venv "
                      "(run `make bench`, which installs it)")
    return [str(exe)]


@dataclass
class Session:
    lab: Lab
    paths: dict[str, str]
    daemon: subprocess.Popen
    dlog: DaemonLog
    started: dict[str, Any]
    hog_pid: int
    hog_fd: int


def write_balloon(lab: Lab) -> None:
    """A process in the cgroup writes BALLOON bytes to tmpfs; the pages stay charged to the cgroup."""
    assert lab.cg is not None
    lab.balloon = f"/dev/shm/memguard-bench-{os.getpid()}-{lab.name}.balloon"
    code = ("import os,sys\n"
            "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_EXCL,0o600)\n"
            "n=int(sys.argv[2]);b=bytes(16<<20)\n"
            "while n>0:\n n-=os.write(fd,b[:min(n,len(b))])\n"
            "os.close(fd)\n")
    p = lab.in_cgroup([sys.executable, "-I", "-c", code, lab.balloon, str(BALLOON)])
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise RunFailed("writing the balloon took over 60 s") from None
    if rc != 0:
        raise RunFailed(f"the balloon writer failed (exit status {rc})")
    if lab.cg.usage() < BALLOON:
        raise RunFailed(f"the balloon is not charged to {lab.cg.path} (usage {lab.cg.usage()} bytes): "
                        "is /dev/shm a tmpfs?")


def start_session(lab: Lab, action: str) -> Session:
    cg = lab.create()
    write_balloon(lab)
    paths = write_config(lab.tmp, action)
    os.makedirs(paths["run"])
    with open(paths["log"], "wb") as out, open(paths["err"], "wb") as err:
        daemon = lab.in_cgroup([*memguard_argv(), "daemon", "--config", paths["config"], "--log-format", "json",
                                "--runtime-dir", paths["run"]], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    dlog = DaemonLog(paths["log"])
    lab.files.append(dlog)
    started = dlog.wait_for(lambda e: e.get("event") == "started", 20, daemon)
    if started is None:
        raise RunFailed(f"memguard did not log 'started' (exit status {daemon.poll()}): "
                        + Path(paths["err"]).read_text()[-2000:])
    if started.get("scope") != "cgroup":
        raise RunFailed(f"memguard guards {started.get('scope')!r}, not the cgroup: {started.get('message')}")
    deadline = time.monotonic() + 15
    while not os.path.exists(paths["pid"]):
        if time.monotonic() > deadline or daemon.poll() is not None:
            dlog.poll()
            raise RunFailed("the hog did not start: " + "; ".join(e.get("message", "") for e in dlog.events[-5:]))
        time.sleep(0.01)
    hog_pid = int(Path(paths["pid"]).read_text())
    hog_fd = os.pidfd_open(hog_pid)
    lab.pidfds.append(hog_fd)
    status = Path(f"/proc/{hog_pid}/status").read_text()
    ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
    if ppid != daemon.pid or hog_pid not in subtree_procs(cg.path):
        raise RunFailed(f"pid {hog_pid} from the pid file is not memguard's worker in {cg.path}")
    # The hog blocks opening the fifo until a writer comes; open it (non-blocking, so retry).
    deadline = time.monotonic() + 10
    while True:
        try:
            lab.fifo_fd = os.open(paths["fifo"], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RunFailed("the hog never opened its fifo") from None
            time.sleep(0.005)
    return Session(lab, paths, daemon, dlog, started, hog_pid, hog_fd)


def send_go(s: Session, **go: Any) -> None:
    os.write(s.lab.fifo_fd, (json.dumps(go) + "\n").encode())


def stop_daemon(s: Session) -> int | None:
    if s.daemon.poll() is None:
        s.daemon.send_signal(signal.SIGTERM)
    try:
        return s.daemon.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None  # cleanup() kills it


# ---------------------------------------------------------------------------
# Part 1: reaction to a hog


def warm_up(nbytes: int) -> float:
    """Touch and free ``nbytes`` in this process (outside the cgroup); returns the rate reached.

    In a virtual machine whose host backs guest memory lazily (or takes
    freed guest pages back, as with free page reporting) the first touch
    of a guest page costs a fault in the host too, and a hog cannot reach
    1-2 GB/s. Pages just freed are handed out again first, so touching
    and freeing a little more than the hog will take, just before the
    go, lets the hog run at its nominal rate. On bare metal this only
    costs a second.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    chunk = 64 * MiB
    t = time.monotonic()
    maps = [mmap.mmap(-1, chunk, flags=flags) for _ in range(nbytes // chunk)]
    dt = time.monotonic() - t
    for m in maps:
        m.close()
    return nbytes / dt


def vmstat_oom_kills() -> int:
    return _field(_read("/proc/vmstat"), b"oom_kill")


def reaction_run(parent: Cgroup, rate: float, action: str, rep: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="memguard-bench-")
    lab = Lab(parent, f"memguard-bench-{os.getpid()}-{action}-{int(rate / 1e9)}g-{rep}", tmp)
    try:
        s = start_session(lab, action)
        cg = lab.cg
        assert cg is not None
        time.sleep(0.5)  # let the daemon settle into its steady pace
        cg.reset_peak()
        before = cg.counters()
        vm_before = vmstat_oom_kills()
        avail_start = cg.available()

        # The sampler runs in this process, outside the cgroup.
        samples = 0
        min_avail, t_min = avail_start, None
        t_cross = gap_at_cross = None
        max_gap = 0.0
        timed_out = False
        wall_offset = time.time() - time.monotonic()
        warm_rate = warm_up(WARM_UP) if WARM_UP else None
        m0 = machine_cpu()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        if rate == BURSTY:
            send_go(s, rate=1e12, burst=BURST_BYTES, pause=BURST_PAUSE_S)
        else:
            send_go(s, rate=rate)
        t_go = last = time.monotonic()
        deadline = t_go + 20
        trace_t: list[float] = []
        trace_a: list[int] = []
        while True:
            a = cg.available()
            now = time.monotonic()
            trace_t.append(now)
            trace_a.append(a)
            samples += 1
            gap = now - last
            if gap > max_gap:
                max_gap = gap
            last = now
            if a < min_avail:
                min_avail, t_min = a, now
            if t_cross is None and a < THRESHOLD:
                t_cross, gap_at_cross = now, gap
            ready, _, _ = select.select([s.hog_fd], [], [], SAMPLE_SLEEP)
            if ready:
                t_exit = time.monotonic()
                break
            if now > deadline and not timed_out:
                timed_out = True
                signal.pidfd_send_signal(s.hog_fd, signal.SIGKILL)
                deadline = now + 10
            elif timed_out and now > deadline:
                raise RunFailed("the hog survived SIGKILL for 10 s")
        avail_after_exit = cg.available()
        crossing_sampled = t_cross is not None
        if t_cross is None and t_min is not None and min_avail < THRESHOLD + 16 * MiB:
            # Stopped within one sample of the threshold: no sample fell below
            # it. The lowest sample stands for the crossing.
            t_cross = t_min
        m1 = machine_cpu()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        sampler_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (t_exit - t_go)
        rate_last_100ms = gap_near_cross = None
        if t_cross is not None:
            ic = bisect.bisect_left(trace_t, t_cross)
            i0 = bisect.bisect_left(trace_t, t_cross - 0.1)
            if trace_t[ic] - trace_t[i0] > 0.05:
                rate_last_100ms = (trace_a[i0] - trace_a[ic]) / (trace_t[ic] - trace_t[i0])
            lo, hi = bisect.bisect_left(trace_t, t_cross - 0.05), bisect.bisect_left(trace_t, t_cross + 0.05)
            gap_near_cross = max((trace_t[i] - trace_t[i - 1] for i in range(max(lo, 1), min(hi, len(trace_t)))),
                                 default=None)
        after = cg.counters()
        vm_after = vmstat_oom_kills()

        exit_ev = s.dlog.wait_for(lambda e: e.get("event") == "exit" and e.get("worker") == "hog-0", 5, s.daemon)
        s.dlog.poll()
        decision = s.dlog.find(lambda e: e.get("event") in ("kill", "terminate", "escalate")
                               and e.get("worker") == "hog-0")
        last_resort = s.dlog.find(lambda e: e.get("event") in ("kill", "escalate") and e.get("worker") == "hog-0")
        daemon_rc = stop_daemon(s)
        s.dlog.poll()
        errors = [e for e in s.dlog.events if e.get("level") == "error"]

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 2)

        t_decision = None if decision is None else wall_of(decision) - wall_offset
        oom_kills = after["oom_kill"] - before["oom_kill"]  # type: ignore[operator]
        oom_events = None if after["oom_events"] is None else after["oom_events"] - before["oom_events"]  # type: ignore[operator]
        if oom_kills or oom_events:
            stopped_by = "kernel OOM killer"
        elif timed_out:
            stopped_by = "benchmark timeout (nobody stopped the hog)"
        elif decision is not None:
            stopped_by = "memguard"
        else:
            stopped_by = "unknown"
        rec = {
            "rate_bytes_per_s": rate, "action": action, "rep": rep,
            "pattern": "bursty" if rate == BURSTY else "ramp",
            "stopped_by": stopped_by,
            "first_rule": None if decision is None else decision.get("rule"),
            "within": LADDER_WITHIN if action == "ladder" else None,
            "available_at_decision_bytes": None if decision is None else decision.get("value"),
            "last_resort_fired": last_resort is not None,
            # The ladder's graceful rule won: its SIGTERM, on the trend, stopped the hog before the last resort.
            "graceful_won": (action == "ladder" and decision is not None and decision.get("rule") == "bench-ahead"
                             and last_resort is None and stopped_by == "memguard"),
            "warm_up_rate_bytes_per_s": None if warm_rate is None else round(warm_rate),
            "available_at_go_bytes": avail_start,
            "hog_rate_go_to_crossing_bytes_per_s": None if t_cross is None
            else round((avail_start - THRESHOLD) / (t_cross - t_go)),
            "hog_rate_last_100ms_bytes_per_s": None if rate_last_100ms is None else round(rate_last_100ms),
            "min_available_bytes": min_avail,
            "below_threshold_mib": round((THRESHOLD - min_avail) / MiB, 2),
            "go_to_crossing_ms": ms(t_go, t_cross),
            "crossing_sampled": crossing_sampled,
            "crossing_to_decision_ms": ms(t_cross, t_decision),
            "crossing_to_min_ms": ms(t_cross, t_min),
            "crossing_to_exit_ms": ms(t_cross, t_exit),
            "decision_to_exit_ms": ms(t_decision, t_exit),
            "available_after_exit_bytes": avail_after_exit,
            "oom_kills_cgroup": oom_kills,
            "oom_events_cgroup": oom_events,
            "oom_kills_vmstat": vm_after - vm_before,  # host-wide: counts OOM kills anywhere on the machine
            "machine_busy_percent": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100, 1),
            "sampler_cpu_percent": round(sampler_cpu * 100, 1),
            "peak_usage_bytes": after["peak_usage"],
            # Cross-check of the sampled minimum that no sampling gap can hide:
            # the limit less the kernel's peak-usage watermark (reset at the go).
            "min_available_from_peak_bytes": None if after["peak_usage"] is None
            else LIMIT - after["peak_usage"],
            "limit_reached": None if after["peak_usage"] is None else after["peak_usage"] >= LIMIT - MiB,
            "samples": samples,
            "mean_sample_interval_ms": round((t_exit - t_go) / samples * 1000, 3),
            "max_sample_gap_ms": round(max_gap * 1000, 3),
            "sample_gap_at_crossing_ms": None if gap_at_cross is None else round(gap_at_cross * 1000, 3),
            "max_sample_gap_near_crossing_ms": None if gap_near_cross is None else round(gap_near_cross * 1000, 3),
            "daemon_event": None if decision is None else {
                k: decision.get(k) for k in ("event", "worker", "pid", "rule", "when", "value", "threshold",
                                             "signal_sent", "message", "timestamp")},
            "exit_event": None if exit_ev is None else {
                k: exit_ev.get(k) for k in ("cause", "returncode", "reason", "ran_for_s")},
            "trace": None if not KEEP_TRACES or t_cross is None else {
                "t_ms_from_crossing": [round((t - t_cross) * 1000, 3) for t in trace_t if t >= t_cross - 0.2],
                "available_mib": [round(a / MiB, 2) for t, a in zip(trace_t, trace_a) if t >= t_cross - 0.2]},
            "daemon_scope": s.started.get("scope_description"),
            "daemon_cgroups_note": next((e.get("message") for e in s.dlog.events if e.get("event") == "cgroups"), None),
            "daemon_exit_status": daemon_rc,
            "daemon_errors": [e.get("message") for e in errors],
        }
        return rec
    finally:
        problems = lab.cleanup()
        for p in problems:
            log(f"cleanup: {p}")
        subprocess.run(["rm", "-rf", tmp], check=False)


# ---------------------------------------------------------------------------
# Part 2: the daemon's CPU use


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []


def cpu_reading(pid: int) -> tuple[float, float, int]:
    """(utime+stime seconds, summed per-thread run time seconds from schedstat, times scheduled)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat[stat.rindex(b")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    run_ns = 0
    slices = 0
    for tid in _tasks(pid):
        try:
            a = _read(f"/proc/{pid}/task/{tid}/schedstat").split()
        except OSError:
            continue
        run_ns += int(a[0])
        slices += int(a[2])
    return ticks / CLK_TCK, run_ns / 1e9, slices


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    v = [int(x) for x in _read("/proc/stat", 4096).split(b"\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


def measure_cpu(pid: int, seconds: float, during: Callable[[], None] | None = None,
                other: int | None = None) -> dict[str, float]:
    """The CPU use of ``pid`` (all its threads) over ``seconds``; ``other``: a second process (the sentinel).

    ``machine_busy_percent`` is the whole machine's (all CPUs') busy share
    meanwhile: the load of everything else that ran.
    """
    m0 = machine_cpu()
    c0, r0, n0 = cpu_reading(pid)
    o0 = cpu_reading(other)[1] if other is not None else 0.0
    t0 = time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        if during is not None:
            during()
        time.sleep(min(0.05, end - now))
    c1, r1, n1 = cpu_reading(pid)
    o1 = cpu_reading(other)[1] if other is not None else 0.0
    m1 = machine_cpu()
    wall = time.monotonic() - t0
    out = {
        "seconds": round(wall, 3),
        "cpu_percent_stat": round((c1 - c0) / wall * 100, 3),
        "cpu_percent_schedstat": round((r1 - r0) / wall * 100, 3),
        "wakeups_per_s": round((n1 - n0) / wall, 1),
        "machine_busy_percent": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100, 1),
    }
    if other is not None:
        out["sentinel_cpu_percent_schedstat"] = round((o1 - o0) / wall * 100, 4)
    return out


def sentinel_pid(s: Session) -> int | None:
    kids: list[int] = []
    for tid in _tasks(s.daemon.pid):
        try:
            kids += [int(x) for x in _read(f"/proc/{s.daemon.pid}/task/{tid}/children").split()]
        except OSError:
            pass
    others = [k for k in kids if k != s.hog_pid]
    return others[0] if len(others) == 1 else None


def cpu_part(parent: Cgroup, idle_s: float, hold_s: float) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="memguard-bench-")
    lab = Lab(parent, f"memguard-bench-{os.getpid()}-cpu", tmp)
    try:
        s = start_session(lab, "kill")
        cg = lab.cg
        assert cg is not None
        time.sleep(3)  # start-up done, the hog blocked on its fifo
        out: dict[str, Any] = {}
        sent = sentinel_pid(s)
        avail = cg.available()
        log(f"CPU, idle: {avail / GiB:.2f} GiB available, {idle_s:.0f} s")
        out["idle"] = {"available_bytes": avail, "daemon": measure_cpu(s.daemon.pid, idle_s, other=sent)}
        held = 0
        out["hold"] = []
        for target in HOLD_TARGETS:
            avail = cg.available()
            held += avail - target
            n_holding = sum(1 for e in s.dlog.events if e.get("event") == "output"
                            and str(e.get("line", "")).startswith("holding"))
            send_go(s, rate=HOLD_RATE, stop_at=held)
            ev = s.dlog.wait_for(lambda e, n=n_holding: e.get("event") == "output"
                                 and str(e.get("line", "")).startswith("holding")
                                 and sum(1 for x in s.dlog.events if x.get("event") == "output"
                                         and str(x.get("line", "")).startswith("holding")) > n, 15, s.daemon)
            if ev is None:
                raise RunFailed(f"the hog did not reach {target / GiB:.2f} GiB available")
            time.sleep(1)
            seen: list[int] = []
            log(f"CPU, holding at {cg.available() / GiB:.3f} GiB available, {hold_s:.0f} s")
            m = measure_cpu(s.daemon.pid, hold_s, lambda: seen.append(cg.available()), other=sent)
            fired = [e.get("message") for e in s.dlog.events if e.get("event") in ("kill", "terminate")]
            headroom = min(seen) - THRESHOLD
            out["hold"].append({
                "target_available_bytes": target,
                "available_min_bytes": min(seen), "available_max_bytes": max(seen),
                "headroom_mib": round(headroom / MiB, 1),
                "expected_fast_path_interval_ms": round(headroom / (6000 * MiB) * 1000, 2),
                "daemon": m, "rule_fired": fired,
            })
            if fired or s.daemon.poll() is not None:
                break
        stop_daemon(s)
        return out
    finally:
        for p in lab.cleanup():
            log(f"cleanup: {p}")
        subprocess.run(["rm", "-rf", tmp], check=False)


# ---------------------------------------------------------------------------
# Checks, summary, main


def preflight() -> Cgroup:
    if os.geteuid() != 0:
        raise Refused("run as root (sudo make bench): the benchmark creates a memory cgroup")
    if sys.platform != "linux":
        raise Refused("Linux only")
    own = own_memory_cgroup()
    parent = own if own.version == 1 else _v2_parent_for_children(own)
    probe = f"{parent.path}/memguard-bench-{os.getpid()}-probe"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise Refused(f"cannot create a memory cgroup under {parent.path}: {e.strerror}") from None
    shm = next((m for m in _mountinfo() if m[2] == "/dev/shm"), None)
    if shm is None or shm[0] != "tmpfs":
        raise Refused("/dev/shm is not a tmpfs mount: the balloon needs one")
    st = os.statvfs("/dev/shm")
    if st.f_bavail * st.f_frsize < BALLOON + GiB:
        raise Refused(f"/dev/shm has less than {(BALLOON + GiB) // GiB} GiB free")
    avail = _field(_read("/proc/meminfo"), b"MemAvailable:") * KiB
    need = LIMIT + WARM_UP + 2 * GiB
    if avail < need:
        raise Refused(f"the host has {avail / GiB:.1f} GiB available; the benchmark needs {need // GiB} GiB "
                      f"(a {LIMIT // GiB} GiB cgroup, {WARM_UP // GiB} GiB of warm-up outside it, a margin)")
    if not HOG.exists():
        raise Refused(f"{HOG} is missing")
    memguard_argv()
    return parent


def machine() -> dict[str, Any]:
    model = ""
    for line in _read("/proc/cpuinfo", 1 << 20).decode().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    version = subprocess.run([*memguard_argv(), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": platform.release(), "python": platform.python_version(), "cpu": model,
        "cpus": os.cpu_count(), "mem_total_bytes": _field(_read("/proc/meminfo"), b"MemTotal:") * KiB,
        "memguard": version,
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled").decode().strip()
        if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") else None,
    }


def source_state() -> dict[str, Any]:
    """Which memguard the daemon runs: its package directory and, in a git checkout, the commit and changes."""
    r = subprocess.run([sys.executable, "-c", "import memguard, os; print(os.path.dirname(memguard.__file__))"],
                       capture_output=True, text=True)
    pkg = r.stdout.strip()
    out: dict[str, Any] = {"package_dir": pkg}
    if not pkg:
        return out

    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", pkg, *a], capture_output=True, text=True)
        return p.stdout.rstrip("\n") if p.returncode == 0 else ""

    head = git("rev-parse", "HEAD")
    if head:
        out["commit"] = head
        out["package_commit"] = git("log", "-1", "--format=%H", "--", ".")  # last commit touching the package
        changed = git("status", "--porcelain", "--", ".")
        out["uncommitted_files"] = changed.splitlines()
        if changed:
            import hashlib
            h = hashlib.sha256(git("diff", "HEAD", "--", ".").encode())
            for line in changed.splitlines():
                if line.startswith("??"):
                    f = os.path.join(git("rev-parse", "--show-toplevel"), line[3:])
                    if os.path.isfile(f):
                        h.update(Path(f).read_bytes())
            out["changes_sha256"] = h.hexdigest()[:16]
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["rate_bytes_per_s"], r["action"]), []).append(r)
    rows = []
    for (rate, action), rs in sorted(groups.items()):
        def col(key: str) -> list[float]:
            return [r[key] for r in rs if r.get(key) is not None]

        def med(key: str) -> float | None:
            v = col(key)
            return round(statistics.median(v), 2) if v else None

        def worst(key: str, hi: bool = True) -> float | None:
            v = col(key)
            return (max(v) if hi else min(v)) if v else None

        rows.append({
            "rate_gb_per_s": rate / 1e9, "action": action, "runs": len(rs),
            "pattern": rs[0].get("pattern", "ramp"),
            "graceful_won": sum(1 for r in rs if r.get("graceful_won")),
            "available_at_decision_mib_median": None if not [r for r in rs if r.get("available_at_decision_bytes")]
            else round(statistics.median(r["available_at_decision_bytes"] for r in rs
                                         if r.get("available_at_decision_bytes")) / MiB, 1),
            "stopped_by_memguard": sum(1 for r in rs if r["stopped_by"] == "memguard"),
            "min_available_mib_median": None if med("min_available_bytes") is None
            else round(med("min_available_bytes") / MiB, 1),
            "min_available_mib_worst": None if worst("min_available_bytes", False) is None
            else round(worst("min_available_bytes", False) / MiB, 1),
            "below_threshold_mib_median": med("below_threshold_mib"),
            "below_threshold_mib_worst": worst("below_threshold_mib"),
            "crossing_to_decision_ms_median": med("crossing_to_decision_ms"),
            "crossing_to_decision_ms_worst": worst("crossing_to_decision_ms"),
            "crossing_to_min_ms_median": med("crossing_to_min_ms"),
            "crossing_to_min_ms_worst": worst("crossing_to_min_ms"),
            "hog_rate_last_100ms_gb_per_s_median": None if med("hog_rate_last_100ms_bytes_per_s") is None
            else round(med("hog_rate_last_100ms_bytes_per_s") / 1e9, 2),
            "hog_rate_last_100ms_gb_per_s_min": None if worst("hog_rate_last_100ms_bytes_per_s", False) is None
            else round(worst("hog_rate_last_100ms_bytes_per_s", False) / 1e9, 2),
            "crossing_to_exit_ms_median": med("crossing_to_exit_ms"),
            "crossing_to_exit_ms_worst": worst("crossing_to_exit_ms"),
            "oom_kills_cgroup_total": sum(max(r["oom_kills_cgroup"], r["oom_events_cgroup"] or 0) for r in rs),
            "oom_kills_vmstat_total": sum(r["oom_kills_vmstat"] for r in rs),
        })
    return rows


def print_summary(rows: list[dict[str, Any]], cpu: dict[str, Any] | None) -> None:
    if rows:
        _print_table(rows)
    if cpu:
        _print_cpu(cpu)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| rate (measured in the last 100 ms before the crossing: median / lowest) | action | runs "
          "| stopped by memguard | min available, MiB (median / worst) | "
          "below 2 GiB, MiB (median / worst) | crossing → decision, ms | crossing → min, ms | "
          "crossing → exit, ms | kernel OOM kills (cgroup / host-wide vmstat) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shown = "bursty (256 MiB, 200 ms pauses)" if r.get("pattern") == "bursty" else f"{r['rate_gb_per_s']:g} GB/s"
        action = r["action"] + (f" (graceful won {r['graceful_won']}, median decision at "
                                f"{r['available_at_decision_mib_median']} MiB available)" if r["action"] == "ladder" else "")
        print(f"| {shown} ({r['hog_rate_last_100ms_gb_per_s_median']} / "
              f"{r['hog_rate_last_100ms_gb_per_s_min']}) | {action} | {r['runs']} | {r['stopped_by_memguard']} | "
              f"{r['min_available_mib_median']} / {r['min_available_mib_worst']} | "
              f"{r['below_threshold_mib_median']} / {r['below_threshold_mib_worst']} | "
              f"{r['crossing_to_decision_ms_median']} / {r['crossing_to_decision_ms_worst']} | "
              f"{r['crossing_to_min_ms_median']} / {r['crossing_to_min_ms_worst']} | "
              f"{r['crossing_to_exit_ms_median']} / {r['crossing_to_exit_ms_worst']} | "
              f"{r['oom_kills_cgroup_total']} / {r['oom_kills_vmstat_total']} |")


def _print_cpu(cpu: dict[str, Any]) -> None:
    idle = cpu["idle"]["daemon"]
    print(f"\ndaemon CPU idle ({cpu['idle']['available_bytes'] / GiB:.2f} GiB available): "
          f"{idle['cpu_percent_schedstat']} % of a core (utime+stime: {idle['cpu_percent_stat']} %), "
          f"{idle['wakeups_per_s']} wake-ups/s; machine busy {idle['machine_busy_percent']} %")
    for h in cpu["hold"]:
        d = h["daemon"]
        print(f"daemon CPU holding {h['available_min_bytes'] / GiB:.3f} GiB available "
              f"({h['headroom_mib']} MiB above the threshold): {d['cpu_percent_schedstat']} % of a core "
              f"(utime+stime: {d['cpu_percent_stat']} %), {d['wakeups_per_s']} wake-ups/s; "
              f"machine busy {d['machine_busy_percent']} %")


def summarize_files(files: list[str]) -> int:
    runs: list[dict[str, Any]] = []
    cpus: list[dict[str, Any]] = []
    for f in files:
        d = json.loads(Path(f).read_text())
        runs += d["runs"]
        src = d.get("source", {})
        print(f"{f}: {d['date']}, {len(d['runs'])} runs, memguard {src.get('commit', '?')[:10]}"
              + (" + uncommitted changes" if src.get("uncommitted_files") else "")
              + (" (source changed during the run)" if d.get("source_changed_during_run") else ""))
        if d.get("cpu"):
            cpus.append(d["cpu"])
    rows = summarize(runs)
    print_summary(rows, None)
    for c in cpus:
        print_summary([], c)
    return 0


_interrupted = False


def _raise_interrupt(signum: int, frame: Any) -> None:
    """The first SIGINT/SIGTERM/SIGHUP interrupts the benchmark; later ones wait for its clean-up."""
    global _interrupted
    if _interrupted:
        print("reaction.py: cleaning up (every step has a deadline); please wait", file=sys.stderr, flush=True)
        return
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


def _rate_text(rate: float) -> str:
    return "bursty" if rate == BURSTY else f"{rate / 1e9:g} GB/s"


def main() -> int:
    global LADDER_WITHIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="1,2",
                    help="GB/s, comma-separated, and 'bursty' for the bursty allocator (default 1,2)")
    ap.add_argument("--actions", default="kill,terminate",
                    help="kill, terminate, warn (a control run: nobody stops the hog, the kernel "
                         "OOM-kills it at the cgroup limit), or ladder (a graceful rule on the trend, within 2s, "
                         "and the last resort, both at 2 GiB); default kill,terminate")
    ap.add_argument("--reps", type=int, default=3, help="runs per rate and action (default 3)")
    ap.add_argument("--within", default=LADDER_WITHIN,
                    help=f"the ladder's graceful rule acts this far ahead on the trend (default {LADDER_WITHIN})")
    ap.add_argument("--idle-seconds", type=float, default=20)
    ap.add_argument("--hold-seconds", type=float, default=10)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="do not touch and free 3 GiB outside the cgroup before each go (see warm_up())")
    ap.add_argument("--worker-cgroups", choices=("auto", "on", "off"),
                    help="set memguard's worker_cgroups key (default: leave it out, memguard's default applies); "
                         "off: memguard measures the hog by its process tree")
    ap.add_argument("--traces", action="store_true",
                    help="keep every sample from 200 ms before each crossing to the hog's exit in the results")
    ap.add_argument("--out", help="result file (default bench/results/reaction-<date>.json)")
    ap.add_argument("--summarize", nargs="+", metavar="RESULT.json",
                    help="run nothing: print one table over the runs of these result files (no root needed)")
    args = ap.parse_args()
    if args.summarize:
        return summarize_files(args.summarize)
    rates = [BURSTY if x.strip() == "bursty" else float(x) * 1e9 for x in args.rates.split(",")]
    actions = args.actions.split(",")
    for a in actions:
        if a not in ("kill", "terminate", "warn", "ladder"):
            ap.error(f"unknown action {a!r}")

    global WARM_UP, KEEP_TRACES, WORKER_CGROUPS
    LADDER_WITHIN = args.within
    if args.no_warm_up:
        WARM_UP = 0
    KEEP_TRACES = args.traces
    WORKER_CGROUPS = args.worker_cgroups
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)  # cleanup runs in `finally` blocks
    try:
        parent = preflight()
    except Refused as e:
        print(f"reaction.py: refusing to run: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "loadavg_at_start": _read("/proc/loadavg").decode().strip(),
        "setup": {"ladder_within": LADDER_WITHIN, "cgroup_version": parent.version, "parent_cgroup": parent.path, "limit_bytes": LIMIT,
                  "balloon_bytes": BALLOON, "threshold_bytes": THRESHOLD, "sample_sleep_s": SAMPLE_SLEEP,
                  "hog_chunk_bytes": 4 << 20, "warm_up_bytes": WARM_UP, "worker_cgroups": WORKER_CGROUPS},
        "runs": [], "failures": [],
        "source": source_state(),
    }
    if result["source"].get("uncommitted_files"):
        log(f"memguard from {result['source']['package_dir']} with uncommitted changes: "
            + ", ".join(x[3:] for x in result["source"]["uncommitted_files"]))
    log(f"cgroup v{parent.version} under {parent.path}; limit {LIMIT // GiB} GiB, balloon {BALLOON // GiB} GiB")
    try:
        for rep in range(1, args.reps + 1):
            for rate in rates:
                for action in actions:
                    try:
                        r = reaction_run(parent, rate, action, rep)
                    except RunFailed as e:
                        log(f"{_rate_text(rate)} {action} #{rep}: FAILED: {e}")
                        result["failures"].append({"rate_bytes_per_s": rate, "action": action, "rep": rep,
                                                   "error": str(e)})
                        continue
                    result["runs"].append(r)
                    log(f"{_rate_text(rate)} {action} #{rep}: {r['stopped_by']}"
                        + (f" (first rule {r['first_rule']}, graceful won: {r['graceful_won']})"
                           if action == "ladder" else "") + "; min available "
                        f"{r['min_available_bytes'] / MiB:.1f} MiB ({r['below_threshold_mib']:+.1f} MiB below 2 GiB); "
                        f"crossing -> decision {r['crossing_to_decision_ms']} ms, -> exit {r['crossing_to_exit_ms']} ms; "
                        f"kernel OOM kills in the cgroup {max(r['oom_kills_cgroup'], r['oom_events_cgroup'] or 0)}")
        if not args.no_cpu:
            try:
                result["cpu"] = cpu_part(parent, args.idle_seconds, args.hold_seconds)
            except RunFailed as e:
                log(f"CPU part: FAILED: {e}")
                result["failures"].append({"part": "cpu", "error": str(e)})
    except KeyboardInterrupt:
        log("interrupted: cleaned up; partial results follow")
        result["interrupted"] = True
    if {k: v for k, v in source_state().items() if k != "commit"} != \
            {k: v for k, v in result["source"].items() if k != "commit"}:
        log("WARNING: memguard's source changed while the benchmark ran; the figures mix versions")
        result["source_changed_during_run"] = True
    result["summary"] = summarize(result["runs"])
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["loadavg_at_end"] = _read("/proc/loadavg").decode().strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"reaction-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result["summary"], result.get("cpu"))
    log(f"results in {out} ({result['elapsed_s']} s)")
    return 1 if result["failures"] or result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
