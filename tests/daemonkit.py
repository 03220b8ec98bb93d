"""Running the real daemon in tests: config files, a memory cgroup, the JSON event stream.

Waiting is always on something that happens (a line of the daemon's log,
a process's pidfd becoming readable), bounded by a deadline; never a sleep.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
MEMGUARD = [sys.executable, "-m", "memguard.cli"]


# ---------------------------------------------------------------------------
# Memory cgroups the tests create (v1 here, v2 on production distros)


class TestCgroup:
    """A memory-limited cgroup for one test; everything left in it is killed on cleanup."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this cgroup (the process moves itself in before exec)."""
        return ["sh", "-c", f'echo $$ > "{self.procs}" && exec "$@"', "sh", *argv]

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in self.procs.read_text().split()]
        except OSError:
            return []

    def cleanup(self) -> None:
        """Kill what is left in this cgroup and its children (all started by the test), remove them all."""
        dirs = sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [self.path]
        for d in dirs:
            for _ in range(50):
                try:
                    pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                wait_gone(pids, 2.0)
            try:
                d.rmdir()
            except OSError:
                pass


def _own_memory_cgroup() -> tuple[Path, int] | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            if base.is_dir():
                return base / rel.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::"):
            p = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            ctrl = Path("/sys/fs/cgroup/cgroup.controllers")
            if ctrl.exists() and "memory" in ctrl.read_text().split():
                return p, 2
    return None


def make_cgroup(limit_bytes: int) -> TestCgroup:
    """Create a memory cgroup below ours with a hard limit, or skip the test saying why."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    found = _own_memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup controller found (neither v1 nor v2)")
    parent, version = found
    path = parent / f"memguard-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {e}")
    cg = TestCgroup(path, version)
    try:
        if version == 1:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        else:
            (path / "memory.max").write_text(str(limit_bytes))
            (path / "memory.swap.max").write_text("0") if (path / "memory.swap.max").exists() else None
    except OSError as e:
        cg.cleanup()
        pytest.skip(f"cannot set a memory limit on {path}: {e}")
    return cg


# ---------------------------------------------------------------------------
# Processes


def is_gone(pid: int) -> bool:
    """True once pid has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds) until every pid has exited; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                pass
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        alive = {pid for pid in fds.values() if not is_gone(pid)}
        while alive:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                alive.discard(fds[fd])
            alive = {pid for pid in alive if not is_gone(pid)}
        return sorted(alive)
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------
# The daemon


def write_config(tmp: Path, daemon_yaml: str, workloads: dict[str, str]) -> Path:
    (tmp / "workloads.d").mkdir(exist_ok=True)
    cfg = tmp / "memguard.yaml"
    cfg.write_text(textwrap.dedent(daemon_yaml))
    for name, text in workloads.items():
        (tmp / "workloads.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return cfg


class Daemon:
    """``memguard daemon`` as a child process, its JSON events read by a thread into a queue."""

    def __init__(self, config: Path, *, cgroup: TestCgroup | None = None, extra: list[str] = (),
                 state_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        runtime = config.parent / "run"
        # Incident records and the kernel log position stay in the test's directory (as systemd's
        # StateDirectory= would pass it), never in the machine's /var/lib/memguard.
        self.state_dir = state_dir if state_dir is not None else config.parent / "state"
        argv = MEMGUARD + ["daemon", "--config", str(config), "--log-format", "json",
                           "--runtime-dir", str(runtime), *extra]
        if cgroup is not None:
            argv = cgroup.wrap(argv)
        env = dict(os.environ, PYTHONUNBUFFERED="1", STATE_DIRECTORY=str(self.state_dir), **(env or {}))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                                     start_new_session=True)
        self.events: list[dict] = []
        self.lines: queue.Queue[dict | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self._taken: set[int] = set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "unparsed", "line": raw.decode(errors="replace")}
            self.lines.put(ev)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace"))

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 20.0, what: str = "") -> dict:
        """The earliest event matching pred that no earlier wait returned, waiting for it if need be."""
        for i, ev in enumerate(self.events):
            if i not in self._taken and pred(ev):
                self._taken.add(i)
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}; "
                                     f"last events: {self.events[-12:]}; stderr: {''.join(self.stderr)[-2000:]}")
            try:
                ev = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                raise AssertionError(f"daemon exited ({self.proc.wait()}) while waiting for {what}; "
                                     f"last events: {self.events[-12:]}; stderr: {''.join(self.stderr)[-2000:]}")
            self.events.append(ev)
            if pred(ev):
                self._taken.add(len(self.events) - 1)
                return ev

    def event(self, name: str, timeout: float = 20.0, **match: object) -> dict:
        return self.wait_for(lambda e: e.get("event") == name and all(e.get(k) == v for k, v in match.items()),
                             timeout, what=f"{name} {match}")

    def all(self, name: str, **match: object) -> Iterator[dict]:
        return (e for e in self.events if e.get("event") == name and all(e.get(k) == v for k, v in match.items()))

    def worker_pids(self, worker: str, timeout: float = 20.0) -> list[int]:
        """The pids a worker_mem.py worker printed (main pid first)."""
        ev = self.wait_for(lambda e: e.get("event") == "output" and e.get("worker") == worker
                           and str(e.get("line", "")).startswith("pids "), timeout, what=f"pids of {worker}")
        return [int(x) for x in ev["line"].split()[1:]]

    @property
    def pid(self) -> int:
        """The daemon's own pid (the sh wrapper execs it, so it is the same process)."""
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def worker_cmd(*args: str) -> str:
    """A YAML flow list running tests/helpers/worker_mem.py with this interpreter."""
    return json.dumps([sys.executable, str(HELPERS / "worker_mem.py"), *args])
