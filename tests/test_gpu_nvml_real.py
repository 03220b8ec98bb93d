"""sense/gpu.py over the real pynvml module of nvidia-ml-py and a C stand-in for libnvidia-ml.so.1.

The stand-in (tests/nvml_standin/libnvidia-ml.c) is compiled here with the
system C compiler, once per driver generation, each leaving out the symbols
that generation of NVIDIA's driver lacks. pynvml loads it with its own
dlopen("libnvidia-ml.so.1"), found through LD_LIBRARY_PATH in a child
process, so the binding's own code runs: its symbol look-ups, its
NVMLLibraryMismatchError and NVMLError_FunctionNotFound, its two-call
process-list protocol and struct layouts. Each test runs against the
oldest nvidia-ml-py memguard supports (MIN_BINDING_VERSION, installed with
pip) and the one installed with memguard.

No test sleeps: hung calls block on a FIFO the test opens to release them,
and every wait has a deadline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memguard.sense.gpu import MIN_BINDING_VERSION, GpuProblem, new_problems

from nvmlkit import GiB, Machine, Probe, binding_dir, build_standin, compiler, two_a100s, unknown

pytest.importorskip("pynvml")

BELOW_FLOOR = "12.535.161"  # the newest nvidia-ml-py without the _v2 process-list wrappers

if compiler() is None:
    pytest.skip("no C compiler (cc) to build the libnvidia-ml.so.1 stand-in", allow_module_level=True)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """{generation: directory holding that generation's libnvidia-ml.so.1}."""
    out = tmp_path_factory.mktemp("standin")
    return {g: build_standin(out, g) for g in ("r535", "r495", "r470", "r440")}


@pytest.fixture(scope="module")
def bindings(tmp_path_factory):
    """{"oldest": the floor's pynvml directory, "newest": None (the installed one), ...}, or why not."""
    out = tmp_path_factory.mktemp("bindings")
    return {"oldest": binding_dir(out, MIN_BINDING_VERSION), "newest": None,
            "below_floor": binding_dir(out, BELOW_FLOOR)}


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


@pytest.fixture
def probe(standins, bindings, machine):
    """probe(generation, binding="newest") -> a Probe; every one is closed at the end."""
    made: list[Probe] = []

    def make(generation: str = "r535", binding: str = "newest") -> Probe:
        where = bindings[binding]
        if isinstance(where, str):
            pytest.skip(where)
        p = Probe(standins[generation], machine, where)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


BINDINGS = ["oldest", "newest"]


def problems(reading: dict) -> list[GpuProblem]:
    return [GpuProblem(p["device"], p["kind"], p["message"], p["elapsed_s"]) for p in reading["problems"]]


def with_processes(machine: Machine) -> Machine:
    two_a100s(machine)
    machine.proc("0", "compute", 1001, 6 * GiB)
    machine.proc("0", "graphics", 1001, 6 * GiB)  # the same context in two lists: counted once
    machine.proc("0", "graphics", 1002, None)  # NVML_VALUE_NOT_AVAILABLE
    machine.proc("0", "mps", 1003, 1 * GiB)
    machine.proc("1", "compute", 2001, 30 * GiB)
    return machine


# ---------------------------------------------------------------------------
# Driver generations


def test_the_probe_loads_the_stand_in_through_the_named_binding(probe, machine, bindings):
    """The child really runs the requested nvidia-ml-py, and pynvml's dlopen reached the stand-in."""
    two_a100s(machine)
    for which in BINDINGS:
        p = probe("r535", which)
        got = p("binding")
        if which == "oldest":
            assert got["version"] == MIN_BINDING_VERSION and got["file"].startswith(str(bindings["oldest"]))
        assert got["mismatch_error"]
        assert p("start")["enabled"]
    assert machine.calls("nvmlInit")  # the stand-in logged the calls: it is the library pynvml loaded


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("generation, mps_listed", [("r535", True), ("r495", True), ("r470", False)])
def test_per_process_memory_is_known_on_every_driver_generation_with_versioned_lists(
        probe, machine, binding, generation, mps_listed):
    """R510+ (_v3), R495 (no _v3) and R470 (neither _v3 nor MPS _v2): per-process memory known, no problem.

    On R470 the MPS client list exists only unversioned, which nvidia-ml-py cannot call: MPS clients are not
    listed there (their memory shows under the MPS server), and that is no error either."""
    with_processes(machine)
    p = probe(generation, binding)
    assert p("start")["enabled"]
    reading = p("read")
    assert reading["problems"] == []
    d0, d1 = reading["devices"]
    expected = {"1001": 6 * GiB, "1003": 1 * GiB} if mps_listed else {"1001": 6 * GiB}
    assert {k: v for k, v in d0["processes"].items() if not unknown(v)} == expected
    assert unknown(d0["processes"]["1002"])
    assert d1["processes"] == {"2001": 30 * GiB}
    att = p("attribute", trees={"w-0": [1001, 2001]})
    assert att["w-0"]["total"] == 36 * GiB


@pytest.mark.parametrize("binding", BINDINGS)
def test_without_v3_the_v2_lists_are_remembered_and_absent_lists_are_not_retried(probe, machine, binding):
    """On R470 the first sweep finds the working _v2 lists and the missing MPS _v2; later reads go straight
    to them, calling neither the _v3 symbols nor the missing MPS list again."""
    with_processes(machine)
    p = probe("r470", binding)
    p("start")
    first = {c: len(machine.calls(c)) for c in ("nvmlDeviceGetComputeRunningProcesses_v2",
                                                "nvmlDeviceGetMPSComputeRunningProcesses_v2")}
    assert first["nvmlDeviceGetComputeRunningProcesses_v2"] >= 2  # GPU 0 and 1, count call and list call
    for _ in range(3):
        assert p("read")["problems"] == []
    assert len(machine.calls("nvmlDeviceGetComputeRunningProcesses_v2")) > first[
        "nvmlDeviceGetComputeRunningProcesses_v2"]
    assert len(machine.calls("nvmlDeviceGetMPSComputeRunningProcesses_v2")) == 0  # the symbol is absent...
    # ...and the stand-in never saw a _v3 call: pynvml failed the symbol look-up before calling.
    assert machine.calls("nvmlDeviceGetComputeRunningProcesses_v3") == []


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_driver_before_r450_gives_unknown_per_process_memory_and_one_stable_problem(probe, machine, binding):
    """Only v1 lists (before R450): device figures known, per-process memory Unknown, one 'mismatch' problem
    naming the driver generation, the same on every read."""
    with_processes(machine)
    p = probe("r440", binding)
    assert p("start")["enabled"]
    reads = [p("read") for _ in range(3)]
    d0 = reads[0]["devices"][0]
    assert d0["total"] == 40 * GiB and not unknown(d0["used"])
    assert unknown(d0["processes"]) and "before R450" in d0["processes"]["unknown"]
    probs = problems(reads[0])
    assert [(x.device, x.kind) for x in probs] == [("0", "mismatch"), ("1", "mismatch")]
    assert all(problems(r) == probs for r in reads)
    assert unknown(p("attribute", trees={"w-0": [1001]})["w-0"]["total"])


def test_below_the_floor_a_pre_r510_driver_gives_a_problem_that_names_the_floor(probe, machine):
    """nvidia-ml-py 12.535.161 (no _v2 wrappers, no NVMLLibraryMismatchError) on R470: the unversioned wrapper
    raises NVMLError_FunctionNotFound, and the problem says which nvidia-ml-py to install. The same binding on
    an R510+ driver works: the floor is about old drivers."""
    with_processes(machine)
    p = probe("r470", "below_floor")
    assert not p("binding")["mismatch_error"]
    p("start")
    reading = p("read")
    [d0, d1] = reading["devices"]
    assert unknown(d0["processes"])
    [first, _] = problems(reading)
    assert first.kind == "mismatch" and f"nvidia-ml-py >= {MIN_BINDING_VERSION}" in first.message
    assert BELOW_FLOOR in first.message
    modern = probe("r535", "below_floor")
    modern("start")
    assert modern("read")["problems"] == []


@pytest.mark.parametrize("generation", ["r535", "r470"])
def test_used_is_total_minus_free_whatever_is_reserved(probe, machine, generation):
    """GPU 0 has 512 MiB reserved: used is total - free (reserved memory is in use), with or without the v2
    memory call in the driver."""
    two_a100s(machine)
    p = probe(generation)
    p("start")
    d0, d1 = p("read")["devices"]
    assert (d0["total"], d0["free"], d0["used"]) == (40 * GiB, 31 * GiB, 9 * GiB)
    assert d1["used"] == 30 * GiB


# ---------------------------------------------------------------------------
# Lost GPUs, Jetson, hangs


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("function, code", [("nvmlDeviceGetHandleByIndex", 999),
                                            ("nvmlDeviceGetMemoryInfo", 15)])
def test_a_gpu_that_fell_off_the_bus_is_lost_and_reported_once(probe, machine, binding, function, code):
    """Unknown Error (999) on the device handle, or GPU_IS_LOST (15): GPU 1 is 'lost', Unknown, identity
    kept; GPU 0 stays known; over several reads the problem is one log line, not one per read."""
    with_processes(machine)
    machine.fail(function, "1", code, from_call=3)  # calls 1 and 2: start-up sweep and first read
    p = probe("r535", binding)
    p("start")
    first = p("read")
    assert first["problems"] == []
    reads = [p("read") for _ in range(4)]
    d0, d1 = reads[0]["devices"]
    assert not unknown(d0["used"]) and d0["processes"]["1001"] == 6 * GiB
    assert d1["index"] == "1" and d1["uuid"] == first["devices"][1]["uuid"]
    assert unknown(d1["total"]) and unknown(d1["processes"])
    [lost] = problems(reads[0])
    assert (lost.device, lost.kind) == ("1", "lost")
    if code == 999:
        assert "fell off the bus" in lost.message
    logged: list[GpuProblem] = []
    previous: list[GpuProblem] = problems(first)
    for r in reads:
        logged.extend(new_problems(problems(r), previous))
        previous = problems(r)
    assert logged == [lost]


def test_an_unknown_error_elsewhere_is_an_error_not_lost(probe, machine):
    """999 from a process list (not the handle) is an 'error' on that device: it says nothing about the bus."""
    with_processes(machine)
    machine.fail("nvmlDeviceGetComputeRunningProcesses_v3", "0", 999)
    p = probe("r535")
    p("start")
    reading = p("read")
    assert [(x.device, x.kind) for x in problems(reading)] == [("0", "error")]
    assert "Unknown Error" in reading["problems"][0]["message"]


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_jetson_like_gpu_with_not_supported_memory_turns_nvml_sensing_off_with_the_right_reason(
        probe, machine, binding):
    """JetPack 6: NVML lists 'Orin (nvgpu)' but memory and process lists are Not Supported. Sensing through
    NVML is off, recognised as unified memory, and the reason does not claim the driver is missing."""
    machine.gpu(0, "GPU-0a0b0c0d-0000-1111-2222-333344445555", 0, 0, name="Orin (nvgpu)")
    machine.fail("nvmlDeviceGetMemoryInfo", "0", 3)
    for fn in ("Compute", "Graphics", "MPSCompute"):
        machine.fail(f"nvmlDeviceGet{fn}RunningProcesses_v3", "0", 3)
    p = probe("r535", binding)
    st = p("start")
    assert not st["enabled"] and st["jetson"]
    assert "Orin (nvgpu)" in st["reason"] and "Not Supported" in st["reason"] and "JetPack 6" in st["reason"]
    assert "no NVIDIA driver" not in st["reason"]
    assert machine.calls("nvmlShutdown")  # NVML was shut down again


@pytest.mark.parametrize("op", ["read", "read_async"])
def test_a_slow_call_times_out_once_makes_no_second_call_and_recovers(probe, machine, op):
    """The first read's memory call blocks: the read returns a 'timeout' within its deadline; reads while it
    is stuck return the same problem (same key: one log line) without calling NVML; after release, normal."""
    two_a100s(machine)
    fifo = machine.hang("nvmlDeviceGetMemoryInfo", "0", 2)
    p = probe("r535")
    p("start", timeout_s=0.3)
    stuck = p(op)
    [timeout] = problems(stuck)
    assert (timeout.device, timeout.kind) == (None, "timeout")
    assert all(unknown(d["used"]) for d in stuck["devices"])
    calls = len(machine.calls())
    again = [p(op) for _ in range(3)]
    assert len(machine.calls()) == calls  # nothing queued behind the stuck call
    assert all(problems(r) == [timeout] for r in again)
    assert new_problems(problems(again[-1]), problems(stuck)) == ()
    machine.release(fifo)
    assert p("wait_idle")["idle"]
    recovered = p(op)
    assert recovered["problems"] == [] and recovered["devices"][0]["used"] == 9 * GiB


def test_mig_devices_over_the_real_binding(probe, machine):
    """A GPU in MIG mode: each MIG device is read through its own handle, empty slots are skipped."""
    machine.gpu(0, "GPU-aaaaaaaa-0000-0000-0000-000000000000", 80 * GiB, 50 * GiB, name="NVIDIA A100-SXM4-80GB")
    machine.mig(0, 7)
    machine.migdev(0, 0, "MIG-bbbbbbbb-0000-0000-0000-000000000000", 40 * GiB, 30 * GiB, "NVIDIA A100 MIG 3g.40gb")
    machine.migdev(0, 2, "MIG-cccccccc-0000-0000-0000-000000000000", 40 * GiB, 20 * GiB, "NVIDIA A100 MIG 3g.40gb")
    machine.proc("0:0", "compute", 3001, 10 * GiB)
    machine.proc("0:2", "compute", 3002, 20 * GiB)
    p = probe("r535")
    assert p("start")["enabled"]
    reading = p("read")
    assert reading["problems"] == []
    assert [(d["index"], d["mig"], d["uuid"][:4]) for d in reading["devices"]] == [("0:0", True, "MIG-"),
                                                                                    ("0:2", True, "MIG-")]
    assert reading["devices"][0]["processes"] == {"3001": 10 * GiB}
    assert reading["devices"][1]["used"] == 20 * GiB


# ---------------------------------------------------------------------------
# The daemon: one log line per distinct problem


def test_the_daemon_logs_a_lost_gpu_once_over_many_ticks(tmp_path, standins, monkeypatch):
    """A real `memguard daemon` whose pynvml loads the stand-in: GPU 1 is lost from its second sweep on.
    After six more sweeps (a hung call on the 8th sweep is the barrier) there is exactly one gpu_problem
    event for it."""
    from daemonkit import Daemon, write_config

    (tmp_path / "gpu").mkdir()
    machine = with_processes(Machine(tmp_path / "gpu"))
    machine.fail("nvmlDeviceGetHandleByIndex", "1", 999, from_call=2)
    barrier = machine.hang("nvmlDeviceGetHandleByIndex", "0", 8)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(standins["r535"]))
    monkeypatch.setenv("MEMGUARD_NVML_STANDIN", str(machine.path))
    monkeypatch.setenv("MEMGUARD_NVML_STANDIN_LOG", str(machine.log))
    cfg = write_config(tmp_path, "workloads: workloads.d/\npoll_interval: 0.1s\n", {
        "idle": "name: idle\ncommand: [sleep, '600']\n"})
    d = Daemon(cfg)
    try:
        d.event("gpu", timeout=30)
        machine.release(barrier)  # the 8th sweep has started: 6 sweeps with GPU 1 lost are done
        first = d.event("gpu_problem", timeout=30)
        assert first["device"] == "1" and first["kind"] == "lost"
    finally:
        d.stop()
    while (ev := d.lines.get(timeout=30)) is not None:
        d.events.append(ev)
    lost = [e for e in d.events if e.get("event") == "gpu_problem" and e.get("device") == "1"]
    assert len(lost) == 1, lost
    assert len(machine.calls("nvmlDeviceGetHandleByIndex")) >= 2 * 7


def test_the_stand_in_source_builds_for_every_generation(standins):
    """Each generation's library exports exactly the process-list symbols of that generation (checked in a
    child process, so this one never has a libnvidia-ml.so.1 loaded)."""
    import json
    import subprocess

    code = ("import ctypes, json, sys; lib = ctypes.CDLL(sys.argv[1]); print(json.dumps([s for s in sys.argv[2:] "
            "if hasattr(lib, s)]))")
    symbols = {"_v2": "nvmlDeviceGetComputeRunningProcesses_v2", "_v3": "nvmlDeviceGetComputeRunningProcesses_v3",
               "mps": "nvmlDeviceGetMPSComputeRunningProcesses",
               "mps_v2": "nvmlDeviceGetMPSComputeRunningProcesses_v2"}
    expect = {"r535": {"_v2", "_v3", "mps", "mps_v2"}, "r495": {"_v2", "mps", "mps_v2"}, "r470": {"_v2", "mps"},
              "r440": set()}
    for gen, where in standins.items():
        out = subprocess.run([sys.executable, "-c", code, str(Path(where) / "libnvidia-ml.so.1"),
                              *symbols.values()], capture_output=True, text=True, check=True, timeout=60)
        has = {k for k, v in symbols.items() if v in json.loads(out.stdout)}
        assert has == expect[gen], gen
