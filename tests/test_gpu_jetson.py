"""sense/jetson.py: a Jetson's unified GPU memory from NvMap and /proc/meminfo, on a tree shaped like a Jetson's.

tests/jetson_tree/ holds the files an AGX Orin 32GB (JetPack 6) shows:
/etc/nv_tegra_release, the device tree's model and compatible strings,
/proc/meminfo with its NvMapMem lines, and NvMap's debugfs clients file in
the kernel's own format. Each test copies it and rewrites what it needs;
workers are real processes, and their GPU memory goes through the same
attribution and decision core as NVML's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memguard.sense.observer import gpu_observation
from memguard.decide.core import step
from memguard.diagnose import GPU_OOM, classify_output
from memguard.model import Notice, Observation, Unknown, WorkerSample, is_known
from memguard.act.effects import cuda_env
from memguard.sense.gpu import GpuSensor, attribute_all, new_problems
from memguard.sense.jetson import (
    NVMAP_CLIENTS,
    JetsonSensor,
    is_jetson,
    make_gpu_sensor,
    parse_meminfo,
    parse_nvmap_clients,
)

from corekit import GiB, MiB, Sim, daemon, rule, scope, signals, workload

TREE = Path(__file__).parent / "jetson_tree"
KiB = 1024
DEADLINE_S = 20.0


def clients_text(rows: list[tuple[str, str, int, int]], total_kib: int | None = None) -> str:
    """A clients file as nvmap prints it: rows of (client, process, pid, KiB), then the total."""
    lines = ["%-18s %18s %8s %11s" % ("CLIENT", "PROCESS", "PID", "SIZE")]
    lines += ["%-18s %18s %8u %10dK" % r for r in rows]
    total = sum(r[3] for r in rows) if total_kib is None else total_kib
    lines.append("%-18s %18s %8s %10dK" % ("total", "", "", total))
    return "\n".join(lines) + "\n"


@pytest.fixture
def jetson(tmp_path):
    """A copy of the Jetson tree; returns its root."""
    root = tmp_path / "jetson"
    shutil.copytree(TREE, root)
    return root


def started(root: Path, timeout_s: float = 2.0) -> JetsonSensor:
    sensor = JetsonSensor(str(root), timeout_s)
    st = sensor.start()
    assert st.enabled and st.jetson, st.reason
    return sensor


# ---------------------------------------------------------------------------
# Parsing


def test_the_clients_file_gives_each_process_its_sum_and_leaves_kernel_clients_out():
    """Two clients of one pid add up; a process name with a space parses; the kernel client (pid 0) and the
    header are left out; the total line is read."""
    got = parse_nvmap_clients((TREE / NVMAP_CLIENTS).read_text())
    assert dict(got.per_pid) == {1130: 8192 * KiB, 1904: 118776 * KiB, 2342: 63524 * KiB,
                                 5512: (6291456 + 32768) * KiB, 6120: 5013632 * KiB, 7001: 40960 * KiB}
    assert got.total_bytes == 11573404 * KiB
    assert dict(parse_nvmap_clients("garbage\n\nuser x notapid 12K\n").per_pid) == {}


def test_meminfo_fields_in_bytes():
    """/proc/meminfo's kB fields become bytes; unit-less counts stay as they are."""
    info = parse_meminfo((TREE / "proc/meminfo").read_text())
    assert info["MemTotal"] == 31873856 * KiB and info["NvMapMemUsed"] == 11573404 * KiB
    assert info["HugePages_Total"] == 0


def test_a_jetson_is_recognised_by_its_release_file_or_its_device_tree(jetson, tmp_path):
    """nv_tegra_release, or 'nvidia,tegra' in the device tree's compatible string; neither on other machines."""
    assert is_jetson(str(jetson))
    (jetson / "etc/nv_tegra_release").unlink()
    assert is_jetson(str(jetson))
    (jetson / "proc/device-tree/compatible").write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert not is_jetson(str(jetson))
    assert not is_jetson(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# The sensor


def test_the_sensor_reads_the_one_unified_device_and_each_process(jetson):
    """Device 0: total MemTotal, free MemAvailable, used the GPU's allocations (NvMapMemUsed), per-process
    memory from NvMap, the board's name from the device tree."""
    sensor = started(jetson)
    try:
        st = sensor.started
        assert st.reason == "" and [d.index for d in st.devices] == ["0"]
        [dev] = sensor.read().devices
        assert dev.name == "NVIDIA Jetson AGX Orin Developer Kit (integrated GPU)"
        assert isinstance(dev.uuid, Unknown)
        assert (dev.total_bytes, dev.free_bytes, dev.used_bytes) == (31873856 * KiB, 9842108 * KiB,
                                                                     11573404 * KiB)
        assert dev.processes[5512] == (6291456 + 32768) * KiB and 0 not in dev.processes
        assert cuda_env(["0"], [dev]) == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    finally:
        sensor.close()


def test_without_nvmapmemused_used_is_the_clients_total(jetson):
    """An older kernel without the NvMapMem lines: used comes from the clients file's total."""
    meminfo = jetson / "proc/meminfo"
    meminfo.write_text("".join(ln for ln in meminfo.read_text().splitlines(True) if not ln.startswith("NvMap")))
    sensor = started(jetson)
    try:
        assert sensor.read().devices[0].used_bytes == 11573404 * KiB
    finally:
        sensor.close()


class Tree:
    """A real worker process with a real child (the child is what holds GPU memory in the tests)."""

    def __init__(self) -> None:
        code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], "
                "stdin=subprocess.PIPE); print(c.pid, flush=True); sys.stdin.read(); c.stdin.close(); c.wait()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.parent = self.proc.pid
        self.child = int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=DEADLINE_S)
        self.proc.stdout.close()


def _tick(sim: Sim, sensor: JetsonSensor, trees: dict[str, list[int]]) -> list:
    """One core step whose GPU part comes from the Jetson sensor through the daemon's own attribution."""
    base = sim.observe()
    samples = {name: WorkerSample(name, pids[0], 100 * MiB, members=tuple((p, 0) for p in pids))
               for name, pids in trees.items()}
    gpus, samples = gpu_observation(sensor.read(), samples, None)
    obs = Observation(at=sim.now, scope=scope(), workers=samples, events=base.events, gpus=gpus)
    sim.state, actions = step(sim.state, obs, sim.policy, sim.now)
    sim._absorb(actions)
    return actions


def test_a_workers_child_holding_nvmap_memory_trips_its_gpu_rule(jetson):
    """A real child of a real worker holds 6 GiB in NvMap (the LLM server's share): worker.gpu_memory is 6 GiB,
    the rule `worker.gpu_memory > 4GiB` kills that worker and no other; a stranger's NvMap memory is
    unattributed."""
    tree, other = Tree(), Tree()
    try:
        (jetson / NVMAP_CLIENTS).write_text(clients_text([
            ("user", "llama-server", tree.child, 6 * GiB // KiB), ("user", "gnome-shell", 2342, 64 * MiB // KiB),
            ("user", "python3", other.parent, 512 * MiB // KiB)]))
        sensor = started(jetson)
        sim = Sim(daemon(workload("llm", rules=(rule("worker.gpu_memory > 4GiB", "kill", name="gpu-cap"),)),
                         workload("aux", rules=(rule("worker.gpu_memory > 4GiB", "kill", name="aux-cap"),))))
        sim.start()
        sim.tick(0.1)
        # The core knows each worker by the pid it spawned (virtual here); the tree adds the real processes.
        trees = {"llm-0": [sim.pids["llm-0"], tree.parent, tree.child],
                 "aux-0": [sim.pids["aux-0"], other.parent, other.child]}
        att = attribute_all(sensor.read(), trees)
        assert att.workers["llm-0"].total_bytes == 6 * GiB and att.workers["llm-0"].pids == (tree.child,)
        assert att.workers["aux-0"].total_bytes == 512 * MiB
        assert att.unattributed.pids == (2342,)
        sig = signals(_tick(sim, sensor, trees))
        assert [(s.worker, s.explain.rule, s.explain.value) for s in sig] == [("llm-0", "gpu-cap", 6 * GiB)]
        sensor.close()
    finally:
        tree.close()
        other.close()


def test_a_system_rule_on_the_jetsons_gpu_memory_fires(jetson):
    """`gpu[0].used > 30%` (the GPU's allocations against the whole RAM) warns: 11 GiB of 30 GiB."""
    sensor = started(jetson)
    try:
        sim = Sim(daemon(workload("w"), rules=(rule("gpu[0].used > 30%", "warn", "system", name="gpu-share"),)))
        sim.start()
        sim.tick(0.1)
        acts = _tick(sim, sensor, {"w-0": [sim.pids["w-0"]]})
        assert any(isinstance(a, Notice) and a.event == "warn" and a.explain.rule == "gpu-share" for a in acts)
    finally:
        sensor.close()


def test_without_debugfs_per_process_memory_is_unknown_and_said_once_at_start(jetson):
    """No readable clients file (not root, debugfs not mounted): sensing runs, the start-up note says what is
    missing, worker.gpu_memory is Unknown (its rule cannot fire) and gpu.used stays known; no problem per tick."""
    (jetson / NVMAP_CLIENTS).unlink()
    sensor = JetsonSensor(str(jetson))
    st = sensor.start()
    try:
        assert st.enabled and "not readable" in st.reason and "worker.gpu_memory is unknown" in st.reason
        assert "gpu.used is known" in st.reason
        reading = sensor.read()
        assert reading.problems == ()
        [dev] = reading.devices
        assert isinstance(dev.processes, Unknown) and is_known(dev.used_bytes)
        sim = Sim(daemon(workload("llm", rules=(rule("worker.gpu_memory > 1MiB", "kill"),))))
        sim.start()
        sim.tick(0.1)
        assert signals(_tick(sim, sensor, {"llm-0": [sim.pids["llm-0"]]})) == []
    finally:
        sensor.close()


def test_a_clients_file_that_vanishes_mid_run_is_one_stable_problem(jetson):
    """Readable at start, gone later: per-process memory Unknown with an 'error' problem, the same every tick."""
    sensor = started(jetson)
    try:
        (jetson / NVMAP_CLIENTS).unlink()
        first, second = sensor.read(), sensor.read()
        [p] = first.problems
        assert (p.device, p.kind) == ("0", "error") and "cannot read" in p.message
        assert isinstance(first.devices[0].processes, Unknown)
        assert new_problems(second.problems, first.problems) == ()
    finally:
        sensor.close()


def test_a_debugfs_read_that_hangs_times_out_and_recovers(jetson):
    """The clients file is a FIFO nobody writes: the read gives a 'timeout' within its deadline, the event
    loop keeps running; once the writer comes, the next read is whole again."""
    clients = jetson / NVMAP_CLIENTS
    content = clients.read_text()
    sensor = started(jetson, timeout_s=0.3)
    clients.unlink()
    os.mkfifo(clients)
    try:
        reading = asyncio.run(sensor.read_async())
        assert [(p.device, p.kind) for p in reading.problems] == [(None, "timeout")]
        assert isinstance(reading.devices[0].used_bytes, Unknown)
        assert "NvMap did not answer" in reading.problems[0].message

        def writer() -> None:
            with open(clients, "w") as f:  # opens once the sensor's read has it open
                f.write(content)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        t.join(DEADLINE_S)
        assert not t.is_alive()
        assert sensor.wait_idle(DEADLINE_S)
        clients.unlink()
        clients.write_text(content)
        assert sensor.read().problems == ()
    finally:
        sensor.close()


# ---------------------------------------------------------------------------
# Choosing the sensor


def test_make_gpu_sensor_picks_jetson_on_a_jetson_and_nvml_elsewhere(jetson, tmp_path):
    """auto: the Jetson sensor on a Jetson tree, NVML elsewhere; nvml/jetson force one; off is None; a typo
    is a ValueError naming the choices."""
    assert isinstance(make_gpu_sensor("auto", root=str(jetson)), JetsonSensor)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert type(make_gpu_sensor("auto", root=str(plain))) is GpuSensor
    assert type(make_gpu_sensor("nvml", root=str(jetson))) is GpuSensor
    assert isinstance(make_gpu_sensor("jetson", root=str(plain)), JetsonSensor)
    assert make_gpu_sensor("off") is None
    with pytest.raises(ValueError, match="auto, nvml, jetson or off"):
        make_gpu_sensor("cuda")


def test_the_jetson_sensor_elsewhere_is_off_with_a_reason(tmp_path):
    """Forced on a machine that is no Jetson: off, saying why, and read() is the empty reading."""
    sensor = JetsonSensor(str(tmp_path))
    st = sensor.start()
    assert not st.enabled and "not an NVIDIA Jetson" in st.reason
    assert sensor.read().devices == ()
    sensor.close()


# ---------------------------------------------------------------------------
# Jetson out-of-memory texts


@pytest.mark.parametrize("line, source", [
    ("NvMapMemAllocInternalTagged: 1075072515 error 12", "jetson"),
    ("NvMapMemHandleAlloc: error 12", "jetson"),
    ('RuntimeError: NVML_SUCCESS == r INTERNAL ASSERT FAILED at "../c10/cuda/CUDACachingAllocator.cpp":995, '
     "please report a bug to PyTorch.", "pytorch"),
])
def test_jetson_out_of_memory_texts_are_gpu_oom(line, source):
    """What a Jetson process prints when NvMap refuses an allocation, or PyTorch's assertion in its place,
    classifies the exit as gpu_oom."""
    d = classify_output(["loading model", line, "Aborted (core dumped)"])
    assert d is not None and d.kind == GPU_OOM and d.source == source and d.line == line.strip()


def test_an_nvmap_message_that_is_not_out_of_memory_is_not_gpu_oom():
    """NvMapMemHandleAlloc with another error number is no out-of-memory diagnosis."""
    assert classify_output(["NvMapMemHandleAlloc: error 22"]) is None
