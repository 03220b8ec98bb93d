"""sense/gpu.py: GPU sensing through NVML, driven by the shipped fake binding.

CI has no GPU, so every NVML answer here comes from
memguard.testing.nvml.FakeNvml, whose errors are pynvml's own classes.
Process trees and PID namespaces are real: a real parent with a real
child, and real `unshare` namespaces where the machine allows them.
Nothing sleeps to synchronise: hung NVML calls are released explicitly
and waited for with GpuSensor.wait_idle(); helper processes report
readiness through a pipe read with select() and a deadline, and every
process a test starts is waited for before it ends.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memguard.model import Unknown, is_known
from memguard.act.effects import cuda_env
from memguard.sense.gpu import (
    UNATTRIBUTED,
    GpuReading,
    GpuSensor,
    attribute,
    attribute_all,
    host_pid_map,
    in_initial_pid_namespace,
    new_problems,
    nspid_map,
    parse_nspid,
)
from memguard.testing.nvml import SCENARIOS, FakeDevice, FakeHandle, FakeNvml, GiB, MiB
from memguard.sense.procs import process_start_time, sample_tree

pynvml = pytest.importorskip("pynvml")

HELPER = str(Path(__file__).parent / "helpers" / "sense_tree.py")
DEADLINE_S = 20.0
NO_TEGRA = "/nonexistent/nv_tegra_release"


def sensor_for(fake: FakeNvml, timeout_s: float = 2.0) -> GpuSensor:
    return GpuSensor(fake, timeout_s, tegra_release_path=NO_TEGRA)


@pytest.fixture
def started():
    """Start sensors on fakes; close every one at the end, releasing any hung call first."""
    made: list[tuple[GpuSensor, FakeNvml]] = []

    def start(fake: FakeNvml, timeout_s: float = 2.0) -> GpuSensor:
        s = sensor_for(fake, timeout_s)
        made.append((s, fake))
        st = s.start()
        assert st.enabled, st.reason
        return s

    yield start
    for s, fake in made:
        fake.release()
        assert s.wait_idle(DEADLINE_S)
        s.close()


# ---------------------------------------------------------------------------
# Devices and per-process memory


def test_two_devices_are_read_and_summed(started):
    """Two GPUs: totals, used = total - free, and a pid listed as compute and graphics counted once."""
    fake = FakeNvml.scenario("two_devices")
    reading = started(fake).read()
    assert reading.problems == ()
    assert [d.index for d in reading.devices] == ["0", "1"]
    d0, d1 = reading.devices
    assert d0.name == "NVIDIA A100-SXM4-40GB" and d0.uuid.startswith("GPU-")
    assert d0.total_bytes == 40 * GiB
    assert d0.used_bytes == 9 * GiB and d0.free_bytes == 31 * GiB
    assert d1.used_bytes == 31 * GiB
    # 1002 is in both the compute and the graphics list with 2 GiB: the max, not 4 GiB.
    assert dict(d0.processes) == {1001: 6 * GiB, 1002: 2 * GiB}
    assert dict(d1.processes) == {2001: 30 * GiB}
    assert reading.device(1) is d1 and reading.device("0") is d0 and reading.device(7) is None


def test_a_worker_on_two_devices_gets_the_sum_and_strangers_are_unattributed(started):
    """attribute(): a worker's pids on both GPUs sum per device and in total; others are unattributed."""
    reading = started(FakeNvml.scenario("two_devices")).read()
    result = attribute_all(reading, {"train-0": [1001, 2001, 5555], "idle-0": [7777]})
    train = result.workers["train-0"]
    assert dict(train.per_device) == {"0": 6 * GiB, "1": 30 * GiB}
    assert train.total_bytes == 36 * GiB and train.pids == (1001, 2001)
    idle = result.workers["idle-0"]
    assert idle.total_bytes == 0 and dict(idle.per_device) == {"0": 0, "1": 0} and idle.pids == ()
    assert result.unattributed.worker == UNATTRIBUTED
    assert dict(result.unattributed.per_device) == {"0": 2 * GiB, "1": 0}
    assert result.unattributed.pids == (1002,)
    assert attribute(reading, {"train-0": [1001]})["train-0"].total_bytes == 6 * GiB


class Tree:
    """A real parent process with one real child (tests/helpers/sense_tree.py shared 1 1)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, HELPER, "shared", "1", "1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], DEADLINE_S)
        assert ready, "helper did not report its tree"
        words = os.read(fd, 4096).decode().split()
        assert words[0] == "ready", words
        self.parent, self.child = int(words[1]), int(words[2])
        self.child_fd = os.pidfd_open(self.child)

    def close(self) -> None:
        self.proc.stdin.close()  # the whole tree exits at stdin EOF
        self.proc.wait(timeout=DEADLINE_S)
        ready, _, _ = select.select([self.child_fd], [], [], DEADLINE_S)
        if not ready:
            signal.pidfd_send_signal(self.child_fd, signal.SIGKILL)
            select.select([self.child_fd], [], [], DEADLINE_S)
        os.close(self.child_fd)
        self.proc.stdout.close()


def test_a_workers_child_using_the_gpu_counts_for_the_worker(started):
    """A real child of a real worker process holds GPU memory: it is the worker's, via its tree's members."""
    tree = Tree()
    try:
        members = sample_tree("llm-0", tree.parent, process_start_time(tree.parent)).members
        assert {pid for pid, _ in members} == {tree.parent, tree.child}
        fake = FakeNvml.scenario("child_uses_gpu", pids={tree.child: 3 * GiB, 999_999: 1 * GiB})
        reading = started(fake).read()
        # (pid, start time) member pairs are accepted as they are.
        got = attribute_all(reading, {"llm-0": members, "other-0": [os.getpid()]})
        llm = got.workers["llm-0"]
        assert llm.total_bytes == 3 * GiB and llm.pids == (tree.child,)
        assert dict(llm.per_device) == {"0": 3 * GiB}
        assert got.workers["other-0"].total_bytes == 0
        assert got.unattributed.pids == (999_999,)
    finally:
        tree.close()


# ---------------------------------------------------------------------------
# Errors are values


def test_a_device_lost_mid_run_is_unknown_and_the_other_stays_known(started):
    """GpuIsLost on GPU 1 from its 3rd memory call: GPU 1 Unknown plus a 'lost' problem, GPU 0 known."""
    fake = FakeNvml.scenario("device_lost_mid_run")
    sensor = started(fake)  # start-up sweep: memory call 1
    first = sensor.read()  # call 2
    assert first.problems == () and all(d.known for d in first.devices)
    second = sensor.read()  # call 3: lost
    d0, d1 = second.devices
    assert d0.known and d0.used_bytes == 9 * GiB
    assert d1.index == "1" and d1.uuid == first.devices[1].uuid  # identity kept from the last good read
    for value in (d1.total_bytes, d1.used_bytes, d1.free_bytes, d1.processes):
        assert isinstance(value, Unknown) and "GPU is lost" in value.reason
    [problem] = second.problems
    assert (problem.device, problem.kind) == ("1", "lost")
    # A worker whose memory is on GPU 0 only is still Unknown in total: GPU 1 might hold some of it.
    w = attribute(second, {"w-0": [1001]})["w-0"]
    assert w.per_device["0"] == 6 * GiB and isinstance(w.per_device["1"], Unknown)
    assert isinstance(w.total_bytes, Unknown)
    # It stays lost; the error is pynvml's own class.
    assert sensor.read().problems[0].kind == "lost"
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetName(FakeHandle((1,)))


def test_library_missing_turns_sensing_off_with_one_reason():
    """NVMLError_LibraryNotFound at nvmlInit: start() is off with a reason; read() is an empty value."""
    sensor = sensor_for(FakeNvml.scenario("library_missing"))
    st = sensor.start()
    assert not st.enabled and not st.jetson
    assert "libnvidia-ml.so.1" in st.reason and "no NVIDIA driver" in st.reason
    assert sensor.start() is st  # decided once
    assert sensor.read() == GpuReading()
    sensor.close()


@pytest.mark.parametrize("scenario, words", [
    ("driver_not_loaded", "driver is not loaded"),
    ("no_devices", "no NVIDIA GPU"),
])
def test_no_driver_or_no_device_turns_sensing_off(scenario, words):
    """A driver that is not loaded, or no GPU at all, is an off decision at start-up, not an error later."""
    st = sensor_for(FakeNvml.scenario(scenario)).start()
    assert not st.enabled and words in st.reason


def test_binding_not_installed_turns_sensing_off():
    """No importable binding module (ImportError) is an off decision naming the package to install."""
    st = GpuSensor(module="memguard_test_no_such_binding", tegra_release_path=NO_TEGRA).start()
    assert not st.enabled and "nvidia-ml-py" in st.reason


def test_the_real_binding_decides_without_raising():
    """The real pynvml module: on a machine without NVIDIA's library start() is off, never raises."""
    sensor = GpuSensor(timeout_s=5.0)
    st = sensor.start()
    try:
        if not os.path.exists("/dev/nvidiactl"):
            assert not st.enabled and st.reason
        else:  # a GPU machine: a real reading, every figure known or explained
            assert st.enabled, st.reason
            reading = sensor.read()
            assert reading.devices and all(d.known or d.total_bytes.reason for d in reading.devices)
    finally:
        sensor.close()


def test_driver_mismatch_is_unknown_with_a_mismatch_problem(started):
    """NVMLLibraryMismatchError (not an NVMLError) from the process lists: processes Unknown, 'mismatch'."""
    fake = FakeNvml.scenario("driver_mismatch")
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)
    reading = started(fake).read()
    [dev] = reading.devices
    assert dev.used_bytes == 4 * GiB + 500 * MiB  # memory info still works
    assert isinstance(dev.processes, Unknown)
    [problem] = reading.problems
    assert problem.kind == "mismatch" and problem.device == "0"
    assert isinstance(attribute(reading, {"w-0": [1001]})["w-0"].total_bytes, Unknown)


def test_driver_mismatch_falls_back_to_the_v2_process_lists(started):
    """When the binding offers the _v2 variants, a mismatch on the unversioned wrapper uses them instead."""
    fake = FakeNvml.scenario("driver_mismatch", v2_fallback=True)
    sensor = started(fake)
    reading = sensor.read()
    assert reading.problems == ()
    assert dict(reading.devices[0].processes) == {1001: 4 * GiB}
    before = fake.count("nvmlDeviceGetComputeRunningProcesses")
    sensor.read()
    assert fake.count("nvmlDeviceGetComputeRunningProcesses") == before  # remembered: straight to _v2


def test_per_process_memory_unavailable_is_unknown_per_pid_with_device_totals_known(started):
    """usedGpuMemory None: those pids are Unknown, the device's figures are known, no problem reported."""
    reading = started(FakeNvml.scenario("per_process_memory_unavailable")).read()
    [dev] = reading.devices
    assert dev.known and dev.used_bytes == 10 * GiB
    assert set(dev.processes) == {1001, 1002}
    assert all(isinstance(v, Unknown) for v in dev.processes.values())
    assert reading.problems == ()
    got = attribute(reading, {"gpu-0": [1001], "cpu-0": [4242]})
    assert isinstance(got["gpu-0"].total_bytes, Unknown) and got["gpu-0"].pids == (1001,)
    assert got["cpu-0"].total_bytes == 0  # not on the GPU at all: known zero


def test_an_unknown_per_pid_figure_in_one_list_does_not_hide_a_known_one(started):
    """A pid with None in the compute list and a figure in the graphics list takes the known figure."""
    fake = FakeNvml([FakeDevice(total=16 * GiB, used=3 * GiB, compute=[(1001, None)],
                                graphics=[(1001, 2 * GiB)])])
    [dev] = started(fake).read().devices
    assert dict(dev.processes) == {1001: 2 * GiB}


# ---------------------------------------------------------------------------
# PID namespaces


def test_pid_from_another_namespace_is_unattributed_unless_mapped(started):
    """NVML's host pid: unattributed without a map, the worker's through a map, Unknown when blind."""
    reading = started(FakeNvml.scenario("pid_from_other_namespace")).read()
    ours = 4242
    plain = attribute_all(reading, {"w-0": [ours]})
    assert plain.workers["w-0"].total_bytes == 0
    assert plain.unattributed.pids == (4_000_001,) and plain.unattributed.total_bytes == 5 * GiB
    mapped = attribute_all(reading, {"w-0": [ours]}, pid_map={4_000_001: ours})
    assert mapped.workers["w-0"].total_bytes == 5 * GiB and mapped.workers["w-0"].pids == (ours,)
    assert mapped.unattributed.total_bytes == 0
    # With a map, a pid missing from it belongs to no worker even if the number happens to match.
    strict = attribute(reading, {"w-0": [4_000_001]}, pid_map={})
    assert strict["w-0"].total_bytes == 0
    blind = attribute(reading, {"w-0": [ours]}, pid_map=Unknown("no host pids"))
    assert isinstance(blind["w-0"].total_bytes, Unknown)


def test_parse_nspid_reads_every_namespace_level():
    """The NSpid line lists the pid from the /proc mount's namespace inward; absent gives ()."""
    status = b"Name:\tpython3\nTgid:\t31337\nNgid:\t0\nPid:\t31337\nPPid:\t1\nNSpid:\t31337\t42\t1\nNSpgid:\t31337\n"
    assert parse_nspid(status) == (31337, 42, 1)
    assert parse_nspid(b"NSpid:\t7\n") == (7,)
    assert parse_nspid(b"Name:\tx\n") == ()


def test_nspid_map_of_real_processes_and_of_a_proc_tree(tmp_path):
    """nspid_map(): our own pids map to themselves; a /proc showing outer pids maps outer -> ours."""
    tree = Tree()
    try:
        assert nspid_map([os.getpid(), tree.parent, tree.child]) == {
            os.getpid(): os.getpid(), tree.parent: tree.parent, tree.child: tree.child}
    finally:
        tree.close()
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_bytes(b"Name:\tw\nPid:\t77\nNSpid:\t918273\t77\n")
    assert nspid_map([77, 78], proc=str(tmp_path)) == {918273: 77}  # 78 is gone: left out


def test_host_pid_map_is_the_identity_in_the_hosts_namespace():
    """In the host's PID namespace NVML's pids are ours: host_pid_map() says so with None."""
    if not in_initial_pid_namespace():
        pytest.skip("the test itself runs in a PID namespace")
    assert host_pid_map([os.getpid()]) is None


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a PID namespace"
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    return None


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_inside_a_pid_namespace_with_its_own_proc_host_pids_are_unknown():
    """memguard in a container-like PID namespace with its own /proc cannot map host pids: Unknown."""
    code = ("from memguard.sense.gpu import host_pid_map, in_initial_pid_namespace;"
            "import os; m = host_pid_map([os.getpid()]);"
            "print(in_initial_pid_namespace(), type(m).__name__, os.getpid())")
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=DEADLINE_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "Unknown", "1"]


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_a_process_in_a_nested_namespace_shows_our_pid_first():
    """Seen from the host's /proc, a nested process's NSpid starts with the pid we index it by."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c",
                             "import os,sys; print(os.getpid(), flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
        assert ready
        assert proc.stdout.readline().split() == ["1"]  # pid 1 inside its namespace
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        inner = int(children[0])
        ns = parse_nspid(Path(f"/proc/{inner}/status").read_bytes())
        assert ns == (inner, 1)
        assert nspid_map([inner]) == {inner: inner}
    finally:
        proc.stdin.close()
        proc.wait(timeout=DEADLINE_S)
        proc.stdout.close()


# ---------------------------------------------------------------------------
# Hangs and timeouts


def test_a_hung_call_times_out_without_a_second_stuck_call_and_recovers(started):
    """A blocked NVML call: read() returns in timeout_s with 'timeout', makes no new call, then recovers.
    Minutes later (virtual clock) the problem is still the same one: only elapsed_s changes."""
    fake = FakeNvml.scenario("hang")
    timeout_s = 2.0  # long enough that "at once" below holds on a loaded machine too
    sensor = started(fake, timeout_s)
    virtual = [1000.0]
    sensor.clock = lambda: virtual[0]
    t0 = time.monotonic()
    reading = sensor.read()
    took = time.monotonic() - t0
    assert took < timeout_s + 1.0
    assert fake.hung.is_set() and sensor.busy()
    [dev] = reading.devices
    assert dev.index == "0" and dev.name == "NVIDIA H100 80GB HBM3"
    assert isinstance(dev.used_bytes, Unknown)
    assert [(p.device, p.kind) for p in reading.problems] == [(None, "timeout")]
    calls = fake.count("nvmlDeviceGetMemoryInfo")
    virtual[0] += 125.0
    t0 = time.monotonic()
    again = sensor.read()
    assert time.monotonic() - t0 < timeout_s  # answers at once while the call is stuck
    # The same problem, not a new one per tick: the message carries no elapsed time (elapsed_s does).
    assert again.problems == reading.problems and again.problems[0].key == reading.problems[0].key
    assert again.problems[0].elapsed_s == reading.problems[0].elapsed_s + 125.0
    assert new_problems(again.problems, reading.problems) == ()
    assert fake.count("nvmlDeviceGetMemoryInfo") == calls  # no second call queued behind the stuck one
    fake.release()
    assert sensor.wait_idle(DEADLINE_S)
    recovered = sensor.read()
    assert recovered.problems == () and recovered.devices[0].used_bytes == 12 * GiB


def test_read_async_keeps_the_event_loop_running_during_a_hang(started):
    """read_async(): while NVML hangs the loop keeps serving other tasks; the verdict is 'timeout'."""
    fake = FakeNvml.scenario("hang")
    sensor = started(fake, 0.3)

    async def main() -> tuple[GpuReading, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        reading = await sensor.read_async()
        stop.set()
        await task
        return reading, ticks

    reading, ticks = asyncio.run(main())
    assert reading.problems[0].kind == "timeout"
    assert ticks >= 5  # the loop ran other work while the call was stuck
    fake.release()
    assert sensor.wait_idle(DEADLINE_S)
    assert asyncio.run(sensor.read_async()).problems == ()


def test_a_hang_at_start_up_turns_sensing_off():
    """nvmlInit that never returns: start() gives up after start_timeout_s with a reason."""
    fake = FakeNvml.scenario("hang", function="nvmlInit", on_call=1)
    sensor = GpuSensor(fake, 0.2, start_timeout_s=0.3, tegra_release_path=NO_TEGRA)
    try:
        st = sensor.start()
        assert not st.enabled and "did not answer" in st.reason
        fake.release()
        assert sensor.wait_idle(DEADLINE_S)
        assert fake.initialised == 0  # the late start-up shut NVML down again
        assert sensor.read() == GpuReading()
    finally:
        fake.release()
        assert sensor.wait_idle(DEADLINE_S)
        sensor.close()


# ---------------------------------------------------------------------------
# MIG and Jetson


def test_mig_devices_are_listed_separately(started):
    """MIG on: each MIG device is a device of its own ("0:0", "0:1"), empty slots skipped, parent replaced."""
    reading = started(FakeNvml.scenario("mig")).read()
    assert [d.index for d in reading.devices] == ["0:0", "0:1"]
    a, b = reading.devices
    assert a.mig and b.mig and a.gpu == 0
    assert a.uuid.startswith("MIG-") and a.uuid != b.uuid
    assert a.total_bytes == 39 * GiB + 512 * MiB and a.used_bytes == 10 * GiB + 20 * MiB
    assert dict(a.processes) == {3001: 10 * GiB} and dict(b.processes) == {3002: 20 * GiB}
    got = attribute(reading, {"a-0": [3001], "b-0": [3002]})
    assert dict(got["a-0"].per_device) == {"0:0": 10 * GiB, "0:1": 0}
    assert got["b-0"].total_bytes == 20 * GiB


def test_jetson_turns_sensing_off_pointing_at_unified_memory():
    """Memory info Not Supported on every GPU (Jetson): off, with a reason naming unified memory and RAM rules."""
    fake = FakeNvml.scenario("jetson")
    sensor = sensor_for(fake)
    st = sensor.start()
    assert not st.enabled and st.jetson
    assert "unified-memory" in st.reason and "memory.available" in st.reason
    assert fake.initialised == 0  # NVML was shut down again
    sensor.close()


def test_tegra_release_without_nvml_is_recognised_as_jetson(tmp_path):
    """/etc/nv_tegra_release and no NVML library (JetPack <= 6): off, explained as unified memory."""
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("# R36 (release), REVISION: 3.0\n")
    st = GpuSensor(FakeNvml.scenario("library_missing"), tegra_release_path=str(tegra)).start()
    assert not st.enabled and st.jetson and "unified-memory" in st.reason


# ---------------------------------------------------------------------------
# The fake itself


def test_every_named_scenario_builds_and_mirrors_pynvml_shapes():
    """Each scenario builds; memory info is pynvml's struct and processes pynvml's friendly objects."""
    for name in SCENARIOS:
        params = {"pids": {1: GiB}} if name == "child_uses_gpu" else {}
        fake = FakeNvml.scenario(name, **params)
        assert isinstance(fake, FakeNvml)
    fake = FakeNvml.scenario("two_devices")
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    mem = fake.nvmlDeviceGetMemoryInfo(h)
    assert isinstance(mem, pynvml.c_nvmlMemory_t) and mem.total == 40 * GiB and mem.used + mem.free == mem.total
    [p1, p2] = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert isinstance(p1, pynvml.nvmlFriendlyObject) and (p1.pid, p1.usedGpuMemory) == (1001, 6 * GiB)
    with pytest.raises(pynvml.NVMLError_InvalidArgument) as e:
        fake.nvmlDeviceGetHandleByIndex(5)
    assert e.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert fake.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert not hasattr(FakeNvml([], has_mps=False), "nvmlDeviceGetMPSComputeRunningProcesses")
    with pytest.raises(ValueError, match="unknown scenario"):
        FakeNvml.scenario("gpu_on_fire")


def test_a_missing_mps_function_is_not_an_error(started):
    """A binding without nvmlDeviceGetMPSComputeRunningProcesses reads the other lists and reports nothing."""
    fake = FakeNvml([FakeDevice(total=8 * GiB, used=GiB, compute=[(5, GiB)])], has_mps=False)
    reading = started(fake).read()
    assert reading.problems == () and dict(reading.devices[0].processes) == {5: GiB}


def test_an_unexpected_error_is_an_error_problem_not_an_exception(started):
    """An NVML error with no special meaning (Unknown Error) on one device: 'error' problem, no raise."""
    fake = FakeNvml.scenario("two_devices")
    sensor = started(fake)
    fake.fail("nvmlDeviceGetComputeRunningProcesses", pynvml.NVML_ERROR_UNKNOWN, device=0)
    reading = sensor.read()
    assert [(p.device, p.kind) for p in reading.problems] == [("0", "error")]
    assert isinstance(reading.devices[0].processes, Unknown) and is_known(reading.devices[0].used_bytes)
    assert dict(reading.devices[1].processes) == {2001: 30 * GiB}


def test_close_is_idempotent_and_reads_after_close_are_empty():
    """close() shuts NVML down once; a later read() is the empty reading, not an error."""
    fake = FakeNvml.scenario("two_devices")
    sensor = sensor_for(fake)
    assert sensor.start().enabled
    sensor.close()
    sensor.close()
    assert fake.initialised == 0 and fake.count("nvmlShutdown") == 1
    assert sensor.read() == GpuReading()


# ---------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES by UUID


def test_cuda_env_names_devices_by_uuid_in_nvml_order(started):
    """Indexes become the UUIDs NVML gave, in the configured order, with CUDA_DEVICE_ORDER=PCI_BUS_ID;
    UUIDs pass through; no gpus, no variables."""
    devices = started(FakeNvml.scenario("two_devices")).read().devices
    u0, u1 = devices[0].uuid, devices[1].uuid
    assert cuda_env(["1", "0"], devices) == {"CUDA_VISIBLE_DEVICES": f"{u1},{u0}", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert cuda_env(["GPU-abc", "0"], devices)["CUDA_VISIBLE_DEVICES"] == f"GPU-abc,{u0}"
    assert cuda_env([], devices) == {}


def test_cuda_env_maps_a_mig_index_to_its_mig_uuid(started):
    """"0:1" (MIG device 1 of GPU 0) becomes that MIG device's UUID; the parent's index alone cannot be mapped
    (MIG replaces it in the reading), so the entries stay as written."""
    devices = started(FakeNvml.scenario("mig")).read().devices
    env = cuda_env(["0:1"], devices)
    assert env["CUDA_VISIBLE_DEVICES"] == devices[1].uuid and env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
    assert cuda_env(["0"], devices)["CUDA_VISIBLE_DEVICES"] == "0"


def test_cuda_env_without_a_reading_keeps_indexes_with_pci_bus_order(started):
    """Sensing off (no devices) or an index NVML does not list: every entry as written, and PCI_BUS_ID order
    so CUDA's index N is NVML's index N."""
    assert cuda_env([0, "1"], ()) == {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    devices = started(FakeNvml.scenario("two_devices")).read().devices
    assert cuda_env(["0", "5"], devices)["CUDA_VISIBLE_DEVICES"] == "0,5"
    # GPU 1 lost before memguard ever read its UUID:
    fresh = FakeNvml.scenario("two_devices")
    fresh.lose(1)
    s = GpuSensor(fresh, tegra_release_path=NO_TEGRA)
    devices = s.start().devices
    assert isinstance(devices[1].uuid, Unknown)
    assert cuda_env(["1"], devices)["CUDA_VISIBLE_DEVICES"] == "1"
    s.close()


# ---------------------------------------------------------------------------
# Driver generations in the Python fake (the C stand-in covers them over the real pynvml)


@pytest.mark.parametrize("driver, expected, problem", [
    ("r535", {1001: 6 * GiB, 1003: 1 * GiB}, None),
    ("r495", {1001: 6 * GiB, 1003: 1 * GiB}, None),
    ("r470", {1001: 6 * GiB}, None),  # no MPS _v2: the MPS list is absent, not an error
    ("r440", None, "before R450"),
])
def test_each_driver_generation_through_the_current_binding(started, driver, expected, problem):
    """What memguard reads per driver generation with nvidia-ml-py >= 12.550.52: per-process memory where the
    driver has a versioned list, otherwise Unknown with one 'mismatch' problem naming the generation."""
    reading = started(FakeNvml.scenario("driver_generation", driver=driver)).read()
    [dev] = reading.devices
    assert dev.used_bytes == 8 * GiB  # total - free: the reserved 512 MiB counts as used
    if expected is None:
        assert isinstance(dev.processes, Unknown)
        [p] = reading.problems
        assert p.kind == "mismatch" and problem in p.message
    else:
        assert reading.problems == ()
        assert {k: v for k, v in dev.processes.items() if is_known(v)} == expected
        assert isinstance(dev.processes[1002], Unknown)


def test_an_old_binding_on_an_old_driver_asks_for_the_floor(started):
    """nvidia-ml-py before 12.550.52 on a driver without _v3: per-process memory Unknown, and the problem
    names the nvidia-ml-py version to install."""
    from memguard.sense.gpu import MIN_BINDING_VERSION

    reading = started(FakeNvml.scenario("driver_generation", driver="r470", binding="12.535")).read()
    [p] = reading.problems
    assert p.kind == "mismatch" and f"nvidia-ml-py >= {MIN_BINDING_VERSION}" in p.message
    ok = started(FakeNvml.scenario("driver_generation", driver="r535", binding="12.535")).read()
    assert ok.problems == ()


def test_the_fake_models_memory_info_v1_and_v2():
    """v1 used includes reserved memory; v2 keeps it apart; drivers before R510 have no v2 call."""
    fake = FakeNvml.scenario("driver_generation", driver="r535")
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    v1 = fake.nvmlDeviceGetMemoryInfo(h)
    v2 = fake.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert (v1.used, v1.free) == (8 * GiB, 24 * GiB)
    assert (v2.used, v2.reserved, v2.free) == (8 * GiB - 512 * MiB, 512 * MiB, 24 * GiB)
    old = FakeNvml.scenario("driver_generation", driver="r470")
    old.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        old.nvmlDeviceGetMemoryInfo(old.nvmlDeviceGetHandleByIndex(0), version=pynvml.nvmlMemory_v2)
    with pytest.raises(ValueError, match="unknown driver generation"):
        FakeNvml([], driver="r999")
