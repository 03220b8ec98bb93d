"""GPU decisions: the real sensor and attribution over the fake NVML binding, fed to the decision core.

The fake is the only one allowed (CI has no GPU): everything from the
sensor's reading to the core's decision is the real code path.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from memguard.decide.core import step
from memguard.model import Notice, Observation, WorkerSample
from memguard.sense.gpu import GpuSensor
from memguard.sense.observer import gpu_observation
from memguard.testing.nvml import FakeNvml

from corekit import GiB, MiB, Sim, daemon, rule, scope, signals, workload
from daemonkit import Daemon, write_config


def _sensor(fake: FakeNvml) -> GpuSensor:
    sensor = GpuSensor(binding=fake, timeout_s=2.0)
    assert sensor.start().enabled
    return sensor


def _tick(sim: Sim, sensor: GpuSensor, trees: dict[str, list[int]], pid_map=None) -> list:
    """One step of the core with the GPU part of the observation taken through the real sensor."""
    base = sim.observe()
    samples = {name: WorkerSample(name, trees[name][0], 100 * MiB, members=tuple((p, 0) for p in trees[name]))
               for name in trees}
    gpus, samples = gpu_observation(sensor.read(), samples, pid_map)
    obs = Observation(at=sim.now, scope=scope(), workers=samples, events=base.events, gpus=gpus)
    sim.state, actions = step(sim.state, obs, sim.policy, sim.now)
    sim._absorb(actions)
    return actions


def _started(sim: Sim) -> None:
    sim.start()
    sim.tick(0.1)


def test_two_devices_victim_is_the_worker_holding_most_on_the_pressured_device():
    """Two GPUs; GPU 1 is past 90 %: the victim is the worker holding most memory on GPU 1 (not the one
    with most on GPU 0), and the event names device, figure and threshold."""
    fake = FakeNvml.scenario("two_devices")
    sensor = _sensor(fake)
    pol = daemon(workload("a"), workload("b"),
                 rules=(rule("gpu[1].used > 70%", "terminate", "system", name="gpu1-full"),))
    sim = Sim(pol)
    _started(sim)
    trees = {"a-0": [sim.pids["a-0"], 1001, 1002], "b-0": [sim.pids["b-0"], 2001]}
    sig = signals(_tick(sim, sensor, trees))
    assert [s.worker for s in sig] == ["b-0"]
    ex = sig[0].explain
    assert ex.signal == "gpu[1].used" and ex.value == 31 * GiB and ex.threshold == pytest.approx(0.7 * 40 * GiB)
    assert "GPU memory 30GiB on GPU 1" in ex.display
    sensor.close()


def test_a_workers_child_using_gpu_memory_counts_for_the_worker():
    """GPU memory of a real child process of the worker counts for the worker (worker.gpu_memory)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        fake = FakeNvml.scenario("child_uses_gpu", pids={child.pid: 5 * GiB})
        sensor = _sensor(fake)
        wl = workload("w", rules=(rule("worker.gpu_memory > 4GiB", "kill", name="gpu-cap"),))
        sim = Sim(daemon(wl))
        _started(sim)
        sig = signals(_tick(sim, sensor, {"w-0": [sim.pids["w-0"], child.pid]}))
        assert [(s.worker, s.explain.rule, s.explain.value) for s in sig] == [("w-0", "gpu-cap", 5 * GiB)]
        sensor.close()
    finally:
        child.stdin.close()
        child.wait(5)


def test_device_lost_mid_run_makes_its_readings_unknown_and_never_escalates():
    """A GPU lost mid-run: its readings become Unknown, its rule stops firing, the other GPU still counts."""
    fake = FakeNvml.scenario("device_lost_mid_run", lost_device=1, lost_at_memory_call=2)
    sensor = _sensor(fake)
    pol = daemon(workload("a"), rules=(rule("gpu[1].used > 1GiB", "warn", "system", name="g1"),
                                       rule("gpu[0].used > 1GiB", "warn", "system", name="g0")))
    sim = Sim(pol)
    _started(sim)
    acts = _tick(sim, sensor, {"a-0": [sim.pids["a-0"]]})
    reading = sensor.read()
    lost = reading.device("1")
    assert not lost.known and any(p.kind == "lost" for p in reading.problems)
    assert reading.device("0").known
    warned = {a.explain.rule for a in acts if isinstance(a, Notice) and a.event == "warn"}
    assert "g0" in warned
    sensor.close()


def test_library_missing_turns_gpu_sensing_off_with_a_reason():
    """No NVML library: sensing is off with one clear reason; GPU rules are unknown and never fire."""
    sensor = GpuSensor(binding=FakeNvml.scenario("library_missing"))
    started = sensor.start()
    assert not started.enabled and "NVML" in started.reason
    pol = daemon(workload("a", rules=(rule("worker.gpu_memory > 1MiB", "kill"),)),
                 rules=(rule("gpu.used > 1MiB", "kill", "system"),))
    sim = Sim(pol)
    _started(sim)
    assert signals(sim.run(3, 0.1)) == []


def test_driver_mismatch_is_unknown_not_a_crash():
    """A driver/library mismatch (not an NVMLError) makes per-process readings Unknown: no crash, no kill."""
    sensor = _sensor(FakeNvml.scenario("driver_mismatch"))
    wl = workload("w", rules=(rule("worker.gpu_memory > 1MiB", "kill"),))
    sim = Sim(daemon(wl))
    _started(sim)
    acts = _tick(sim, sensor, {"w-0": [sim.pids["w-0"]]})
    assert signals(acts) == []
    assert any(p.kind == "mismatch" for p in sensor.read().problems)
    sensor.close()


def test_per_process_memory_not_available_is_unknown_for_the_worker():
    """usedGpuMemory None: the worker's GPU memory is Unknown, so its GPU rule cannot fire; device figures
    stay known."""
    sensor = _sensor(FakeNvml.scenario("per_process_memory_unavailable"))
    wl = workload("w", rules=(rule("worker.gpu_memory > 1MiB", "kill"),))
    sim = Sim(daemon(wl, rules=(rule("gpu.used > 5GiB", "warn", "system", name="dev"),)))
    _started(sim)
    acts = _tick(sim, sensor, {"w-0": [sim.pids["w-0"], 1001]})
    assert signals(acts) == []
    assert any(isinstance(a, Notice) and a.event == "warn" for a in acts)


def test_pid_from_another_namespace_is_not_attributed_to_a_worker():
    """A GPU process whose pid maps to no worker (another PID namespace) is attributed to nobody: no worker
    rule fires, though the device rule still sees the memory."""
    sensor = _sensor(FakeNvml.scenario("pid_from_other_namespace"))
    wl = workload("w", rules=(rule("worker.gpu_memory > 1GiB", "kill"),))
    sim = Sim(daemon(wl, rules=(rule("gpu.used > 4GiB", "warn", "system", name="dev"),)))
    _started(sim)
    acts = _tick(sim, sensor, {"w-0": [sim.pids["w-0"]]}, pid_map={})
    assert signals(acts) == []
    assert any(isinstance(a, Notice) and a.event == "warn" for a in acts)


def test_cuda_oom_output_classifies_the_exit_as_gpu_oom(tmp_path):
    """A real worker that prints a PyTorch CUDA out-of-memory error and exits 1 is classified gpu_oom, with
    the line quoted in the exit event."""
    line = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 7.79 GiB of which 1.20 GiB is free.")
    script = tmp_path / "oom.py"
    script.write_text("import sys\nprint('Traceback (most recent call last):')\nprint('  File \"train.py\"')\n"
                      f"print({line!r}, file=sys.stderr)\nsys.exit(1)\n")
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\ngpu: off\n", {
        "llm": f"name: llm\ncommand: [{sys.executable!r}, {str(script)!r}]\nrestart: {{policy: never}}\n"})
    d = Daemon(cfg)
    try:
        ev = d.event("exit", worker="llm-0")
        assert ev["cause"] == "gpu_oom" and ev["returncode"] == 1
        assert ev["oom_line"].startswith("torch.OutOfMemoryError: CUDA out of memory")
        assert ev["gpu"] == 0 and ev["requested_bytes"] == 2 * GiB
        assert "GPU out of memory on GPU 0" in ev["message"]
    finally:
        d.stop()
