"""Nothing the machine does to memguard's output takes the guard down.

Each test starts the real daemon with its standard output broken on purpose
(closed, a pipe whose reader went away, a full device) and a worker that
grows past its rule. The worker reports on a FIFO ("started", "terminated"),
since the daemon's own log cannot be read: the daemon must still stop it,
stay up, and exit cleanly when told to.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemonkit import HELPERS, MEMGUARD, REPO, make_cgroup, write_config

DEADLINE_S = 30.0


class Fifo:
    """A FIFO the worker writes its reports to; read with deadlines."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.keep = os.open(path, os.O_WRONLY)  # a writer of our own: no EOF between the worker's reports
        self.buf = b""

    def line(self, timeout: float = DEADLINE_S) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing on {self.path} within {timeout}s (got {self.buf!r})")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.buf += os.read(self.fd, 4096)
                except BlockingIOError:
                    pass
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self.keep)
        os.close(self.fd)


def _config(tmp_path: Path, fifo: Path, extra: str = "") -> Path:
    worker = [sys.executable, str(HELPERS / "worker_mem.py"), "--rate", "60", "--max", "300",
              "--report", str(fifo)]
    import json

    return write_config(tmp_path, f"scope: host\nworker_cgroups: off\nlog: {{format: json}}\n{extra}"
                                  "workloads: workloads.d/\n", {"w": f"""
        name: w
        command: {json.dumps(worker)}
        limits: {{memory: 200MiB}}
        restart: {{policy: never}}
        rules:
          - {{name: over, when: "worker.memory > 40%", action: terminate}}
        """})


def _start(cfg: Path, memcg, stdout) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    argv = memcg.wrap(MEMGUARD + ["daemon", "--config", str(cfg), "--runtime-dir", str(cfg.parent / "run")])
    return subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _guards_then_stops(proc: subprocess.Popen, fifo: Fifo) -> None:
    started = fifo.line()
    assert started.startswith("started ")
    terminated = fifo.line()
    assert terminated == "terminated " + started.split()[1], terminated  # the rule stopped it
    assert proc.poll() is None, "the daemon died"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == 0


@pytest.fixture
def memcg():
    cg = make_cgroup(1024 * 1024 * 1024)
    yield cg
    cg.cleanup()


@pytest.mark.root
@pytest.mark.parametrize("how", ["closed", "reader-gone", "dev-full"])
def test_broken_output_never_stops_guarding(tmp_path, memcg, how):
    """With its standard output closed at start, a pipe whose reader has gone, or /dev/full (every write
    ENOSPC), the daemon still stops a worker that crossed its rule, stays up, and exits 0 on SIGTERM;
    standard error says once that the log output fails."""
    fifo = Fifo(tmp_path / "reports")
    cfg = _config(tmp_path, fifo.path)
    try:
        if how == "closed":  # fd 1 closed before memguard starts
            argv = memcg.wrap(["sh", "-c", 'exec "$@" >&-', "sh", *MEMGUARD, "daemon", "--config", str(cfg),
                               "--runtime-dir", str(cfg.parent / "run")])
            proc = subprocess.Popen(argv, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
        elif how == "reader-gone":
            proc = _start(cfg, memcg, subprocess.PIPE)
            assert proc.stdout is not None
            assert proc.stdout.readline()  # it logs; then nobody reads any more
            proc.stdout.close()
        else:
            with open("/dev/full", "w") as full:
                proc = _start(cfg, memcg, full)
        _guards_then_stops(proc, fifo)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err
        if how != "closed":
            assert err.count("its log output fails") == 1, err
    finally:
        fifo.close()
        for p in memcg.pids():
            os.kill(p, signal.SIGKILL)


@pytest.mark.root
def test_metrics_on_a_full_filesystem_recover_without_leftovers(tmp_path, memcg):
    """The metrics file on a filesystem that is full: the daemon keeps guarding, leaves no temporary file,
    and writes the metrics again once there is room."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    fifo = Fifo(tmp_path / "reports")
    try:
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        cfg = _config(tmp_path, fifo.path, extra=f"metrics_file: {mnt / 'memguard.prom'}\n")
        proc = _start(cfg, memcg, subprocess.DEVNULL)
        started = fifo.line()
        assert fifo.line() == "terminated " + started.split()[1]
        assert proc.poll() is None
        # Each full tick tries again, so a temp file exists for an instant while a write fails; one left
        # behind keeps its name (memguard.prom.tmp<pid>) and stays: wait, with a deadline, for a listing
        # without it rather than sampling once mid-write.
        deadline = time.monotonic() + DEADLINE_S
        while (names := sorted(p.name for p in mnt.iterdir())) != ["filler"]:
            assert time.monotonic() < deadline, f"a temporary file was left behind: {names}"
            select.select([], [], [], 0.05)
        filler.unlink()  # room again: the next full tick writes the file
        deadline = time.monotonic() + DEADLINE_S
        while not (mnt / "memguard.prom").exists():
            assert time.monotonic() < deadline, "the metrics file was not written again"
            select.select([], [], [], 0.1)  # poll the filesystem with a deadline: nothing to wait on
        assert "memguard_worker_up" in (mnt / "memguard.prom").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
        assert sorted(p.name for p in mnt.iterdir()) == ["memguard.prom"]  # the last write, on exit, is clean
    finally:
        fifo.close()
        for p in memcg.pids():
            os.kill(p, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)])
