"""The running daemon writes down every death: real processes, the real kernel log, a real dockerd.

- a process outside memguard's workers, OOM-killed by the kernel in its own
  memory cgroup while the daemon runs, becomes an incident naming its pid,
  command and cgroup, with the flight recorder's timeline before it;
- SIGKILL of the daemon right after it decided to stop a worker leaves the
  record of that decision; the restarted daemon closes it and records the
  kernel OOM kill that happened while it was down;
- three containers that all exit 137 (OOM-killed at their ``--memory``
  limit; ``docker kill``; a CUDA out-of-memory line, then killed for RAM)
  are each recorded and diagnosed correctly by ``memguard diagnose
  CONTAINER``, from the records and, without them, from the runtime and the
  kernel log.

Everything that eats memory runs in a memory cgroup the test creates (or a
container with a memory limit). Needs root and a readable /dev/kmsg; the
container tests also need docker.io and busybox-static (each skips saying
what is missing).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from memguard.client import admin_request
from memguard.report.incidents import IncidentStore
from memguard.report.incidentsink import STALE_NOTE
from memguard.sense.kmsg import KmsgReader, KmsgUnavailable

from daemonkit import MEMGUARD, REPO, Daemon, make_cgroup, worker_cmd, write_config

pytestmark = pytest.mark.root

MiB = 1024**2
# Doubling a string until the kernel stops it (a 48 MiB cgroup is reached within a second).
EAT_PY = [sys.executable, "-c", "s = b'x'\nwhile True: s += s"]


@pytest.fixture(autouse=True)
def _kernel_log() -> None:
    if os.geteuid() != 0:
        pytest.skip("reading the kernel log and creating memory cgroups need root")
    try:
        KmsgReader.open().close()
    except KmsgUnavailable as e:
        pytest.skip(f"the kernel log is not readable here: {e}")


def _oom_kill_outside(limit: int = 48 * MiB) -> tuple[int, str]:
    """A process (not memguard's) OOM-killed by the kernel in a memory cgroup of its own: (pid, cgroup)."""
    cg = make_cgroup(limit)
    memsw = cg.path / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # cgroup v1: no swapping past the limit when the machine has swap (v2: memory.swap.max 0)
        memsw.write_text(str(limit))
    try:
        proc = subprocess.Popen(cg.wrap(EAT_PY), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert cg.oom_kills() >= 1
        root = "/sys/fs/cgroup/memory" if cg.version == 1 else "/sys/fs/cgroup"
        return proc.pid, "/" + os.path.relpath(cg.path, root)
    finally:
        cg.cleanup()


def _ticked(d: Daemon) -> None:
    """At least one tick has run (the control socket answers after a tick): the recorder has a sample."""
    started = d.event("started")
    assert admin_request("status", started["socket"], timeout_s=20)["ok"]


def _record(store: IncidentStore, incident_id: str, pred, timeout: float = 30.0):
    """The record once ``pred(record)`` holds: checked now and at each file renamed into the store (inotify)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, str(store.dir).encode(), 0x80) >= 0  # IN_MOVED_TO: an atomic write
        deadline = time.monotonic() + timeout
        while True:
            got = store.load(incident_id)
            if got is not None and pred(got):
                return got
            left = deadline - time.monotonic()
            assert left > 0, f"record {incident_id} never matched: {got}"
            if select.select([fd], [], [], left)[0]:
                os.read(fd, 65536)
    finally:
        os.close(fd)


def _every_incident(d: Daemon, **match: object) -> list[dict]:
    """After the daemon exited: every incident entry it logged (the rest of its output read to the end)."""
    while True:
        ev = d.lines.get(timeout=30)
        if ev is None:
            break
        d.events.append(ev)
    return list(d.all("incident", **match))


def _incident(d: Daemon, timeout: float = 30.0, **match: object) -> dict:
    return d.wait_for(lambda e: e.get("event") == "incident" and all(e.get(k) == v for k, v in match.items()),
                      timeout, what=f"incident {match}")


def test_kernel_kill_outside_the_workers_is_recorded_with_its_timeline(tmp_path: Path) -> None:
    """While the daemon runs, the kernel OOM-kills a process in a memory cgroup memguard knows nothing of:
    one incident (one journal entry) names its pid, command name and cgroup, the 48MiB limit, and carries the
    recorder's timeline up to the kill."""
    cfg = write_config(tmp_path, "scope: host\npoll_interval: 200ms\nworkloads: workloads.d/\n", {})
    d = Daemon(cfg)
    try:
        _ticked(d)
        pid, cgroup = _oom_kill_outside()
        entry = _incident(d, pid=pid)
        assert entry["cause"] == "host_oom" and entry["origin"] == "kernel" and entry["limit_bytes"] == 48 * MiB
        inc = IncidentStore(d.state_dir / "incidents").load(entry["incident"])
        assert inc is not None and entry["file"].endswith(inc.id + ".json")
        assert inc.what["pid"] == pid and inc.what["comm"].startswith("python")
        assert inc.what["cgroup"] == cgroup and inc.owner.kind == "process"
        assert "48MiB limit" in inc.why["text"] and any("Killed process" in line for line in inc.evidence)
        tl = inc.timeline
        assert tl is not None and tl["scope"]["t"] and max(tl["scope"]["t"]) <= 1.0
        assert min(tl["scope"]["t"]) < 0  # samples from before the kill
        assert tl["scope"]["available_bytes"][0] > 0
    finally:
        assert d.stop() == 0
    assert len(_every_incident(d, pid=pid)) == 1


def test_kernel_kill_of_a_worker_is_one_record_with_its_exit(tmp_path: Path) -> None:
    """A worker allocating past its limits.memory is OOM-killed by the kernel in its own cgroup: the kernel's
    report and the worker's exit as memguard reaped it are one death, so one record (both views merged, the
    worker named through its cgroup) and one journal entry."""
    memcg = make_cgroup(512 * MiB)
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\n", {
        "hog": f"name: hog\ncommand: {worker_cmd('--rate', '300')}\nlimits: {{memory: 64MiB, swap: 0}}\n"
               "restart: {policy: never}\n"})
    d = Daemon(cfg, cgroup=memcg)
    try:
        if "per-worker cgroups" not in d.event("cgroups")["message"]:
            pytest.skip("memguard cannot create worker cgroups here")
        pid = d.worker_pids("hog-0")[0]
        entry = _incident(d, pid=pid)
        assert entry["cause"] == "host_oom" and entry["worker"] == "hog-0"
        inc = _record(IncidentStore(d.state_dir / "incidents"), entry["incident"],
                      lambda i: {"exit", "kernel"} <= set(i.sources))
        assert inc.owner.kind == "memguard-worker" and inc.owner.worker == "hog-0"
        assert inc.what["command"][-2:] == ["--rate", "300"] and inc.how["oom"]["limit_bytes"] == 64 * MiB
        assert any("Killed process" in line for line in inc.evidence)
        d.event("exit", worker="hog-0")
    finally:
        assert d.stop() == 0
        memcg.cleanup()
    assert len(_every_incident(d, pid=pid)) == 1


def test_sigkill_after_a_decision_leaves_its_record_and_the_restart_catches_up(tmp_path: Path) -> None:
    """The daemon logs its decision to stop a worker and is SIGKILLed at once: the record of that decision
    (pending, the rule and the numbers) is on disk. While it is down the kernel OOM-kills a process; the
    restarted daemon records that kill (it resumes the kernel log where the first one stood) and completes the
    record the first one could not."""
    memcg = make_cgroup(512 * MiB)
    cfg = write_config(tmp_path, "scope: host\npoll_interval: 200ms\nworkloads: workloads.d/\n", {"w": f"""
        name: w
        command: {worker_cmd("--sigterm", "ignore")}
        restart: {{policy: never}}
        grace: 10s
        rules:
          - {{name: too-big, when: "worker.memory > 1MiB", action: terminate}}
        """})
    first = Daemon(cfg, cgroup=memcg)
    second = None
    try:
        worker = first.worker_pids("w-0")[0]
        first.event("terminate", worker="w-0")
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        store = IncidentStore(first.state_dir / "incidents")
        [own] = store.by_pid(worker)
        assert own.source == "memguard" and own.why["rule"] == "too-big" and own.why["threshold"] == MiB
        assert own.what["worker"] == "w-0" and own.how["signal_name"] == "SIGTERM"
        assert own.state == "pending"  # the worker ignores SIGTERM: no exit came before the daemon died

        pid, cgroup = _oom_kill_outside()  # while no memguard runs
        second = Daemon(cfg, cgroup=memcg)
        entry = _incident(second, pid=pid)
        inc = store.load(entry["incident"])
        assert inc is not None and inc.what["cgroup"] == cgroup and inc.cause == "host_oom"
        # The restarted daemon closes what the killed one left open.
        done = _record(store, own.id, lambda i: i.state == "complete")
        assert done.outcome["note"] == STALE_NOTE and done.why["rule"] == "too-big"
    finally:
        if second is not None:
            second.stop()
        first.kill()
        memcg.cleanup()


# ---------------------------------------------------------------------------
# Containers


CUDA_LINE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
             "of 79.15 GiB of which 1.20 GiB is free.")
EAT_AWK = ["awk", 'BEGIN { s = "x"; while (1) s = s s }']
LIMIT = ["-m", "32m", "--memory-swap", "32m"]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A private dockerd, and a memguard daemon following it (its socket through DOCKER_HOST). At the end: each
    container's death made one journal entry."""
    if os.geteuid() != 0:
        pytest.skip("a private dockerd needs root")
    from dockerkit import start_dockerd

    dockerd = start_dockerd()
    tmp = tmp_path_factory.mktemp("watched")
    cfg = write_config(tmp, "scope: host\nworkloads: workloads.d/\n", {})
    d = Daemon(cfg, env={"DOCKER_HOST": f"unix://{dockerd.sock}"})
    try:
        started = d.event("started")
        note = d.event("incidents")
        assert "container events" in note["message"], note
        assert admin_request("status", started["socket"], timeout_s=20)["ok"]
        yield dockerd, d
        assert d.stop() == 0
        # One death, one journal entry: the kernel's report and the runtime's death of a container are one.
        names = [e["container"] for e in _every_incident(d) if e.get("container")]
        assert len(names) == len(set(names)), names
    finally:
        d.stop()
        dockerd.stop()


def _diagnose(target: str, store_dir: Path, dockerd) -> dict:
    env = dict(os.environ, DOCKER_HOST=f"unix://{dockerd.sock}")
    proc = subprocess.run([*MEMGUARD, "diagnose", target, "--json", "--dir", str(store_dir)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[0])


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_container_oom_killed_at_its_limit(watched, tmp_path: Path) -> None:
    """A container that outgrows --memory 32m: one incident naming it (host_oom, the 32MiB limit, the kernel's
    report); `memguard diagnose NAME --json` says host_oom, signal 9, exit code 137, limit_bytes 32MiB from the
    record, and the same from the runtime and the kernel log alone (no records)."""
    dockerd, d = watched
    name = _name("train")
    res = dockerd.docker("run", "--name", name, *LIMIT, "memguard-mini:1", *EAT_AWK, check=False)
    assert res.returncode == 137
    entry = _incident(d, container=name)
    assert entry["cause"] == "host_oom" and entry["limit_bytes"] == 32 * MiB
    # The kernel's report and the runtime's death are one record (the runtime's view merged into the kernel's).
    inc = _record(IncidentStore(d.state_dir / "incidents"), entry["incident"], lambda i: "container" in i.sources)
    assert inc.how["oom_killed"] is True and "32MiB limit" in inc.summary and "kernel" in inc.sources
    for store_dir in (d.state_dir / "incidents", tmp_path / "no-records"):
        got = _diagnose(name, store_dir, dockerd)
        assert (got["cause"], got["signal"], got["exit_code"], got["limit_bytes"]) == ("host_oom", 9, 137, 32 * MiB)
        assert any("Killed process" in line for line in got["evidence"])
        assert got["container"]["name"] == name and "--memory" in got["recommendation"]


def test_docker_kill_is_killed_not_an_oom(watched, tmp_path: Path) -> None:
    """`docker kill` of a running container: exit 137 too, but the runtime sent the SIGKILL and saw no OOM;
    recorded and diagnosed as `killed`, with advice about who stops containers."""
    dockerd, d = watched
    name = _name("serve")
    dockerd.docker("run", "-d", "--name", name, *LIMIT, "memguard-mini:1", "sleep", "600")
    dockerd.docker("kill", name)
    entry = _incident(d, container=name)
    assert entry["cause"] == "killed" and "limit_bytes" not in entry
    for store_dir in (d.state_dir / "incidents", tmp_path / "no-records"):
        got = _diagnose(name, store_dir, dockerd)
        assert (got["cause"], got["signal"], got["exit_code"], got["limit_bytes"]) == ("killed", 9, 137, None)
        assert "docker kill" in got["detail"] and "--stop-timeout" in got["recommendation"]


def test_cuda_line_then_ram_kill_is_a_ram_oom(watched) -> None:
    """A container prints PyTorch's CUDA out-of-memory line, goes on, and is killed at its RAM limit: host_oom,
    the CUDA line quoted as context (evidence), not the cause."""
    dockerd, d = watched
    name = _name("finetune")
    script = f'echo "{CUDA_LINE}"; exec awk \'BEGIN {{ s = "x"; while (1) s = s s }}\''
    res = dockerd.docker("run", "--name", name, *LIMIT, "memguard-mini:1", "sh", "-c", script, check=False)
    assert res.returncode == 137
    entry = _incident(d, container=name)
    assert entry["cause"] == "host_oom"
    _record(IncidentStore(d.state_dir / "incidents"), entry["incident"], lambda i: "container" in i.sources)
    got = _diagnose(name, d.state_dir / "incidents", dockerd)
    assert (got["cause"], got["signal"], got["exit_code"], got["limit_bytes"]) == ("host_oom", 9, 137, 32 * MiB)
    assert any("CUDA out of memory" in line for line in got["evidence"])
    assert "context, not the cause" in got["detail"]
