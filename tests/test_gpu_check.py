"""scripts/gpu-check: the torch-free GPU check, without a GPU and over the C stand-ins.

Without NVIDIA's libraries the check must say so and exit 2. With the
libnvidia-ml.so.1 and libcuda.so.1 stand-ins on LD_LIBRARY_PATH it runs
end to end for real: its own pynvml survey and latency figures, a real
`memguard daemon` whose GpuSensor loads the NVML stand-in, a real worker
tree whose grandchild allocates through the libcuda stand-in (which the
NVML stand-in then reports for that pid), and memguard's rule stopping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvmlkit import GiB, MiB, Machine, build_libcuda, build_standin, compiler

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu-check"
SMALL = ["--limit", "64MiB", "--step", "16MiB", "--interval", "0.05", "--reads", "50", "--duration", "60"]
UUID0 = "GPU-11111111-2222-3333-4444-555555555555"


def run_check(env: dict[str, str], *args: str, prefix: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    out = subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                         timeout=180)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"one JSON object expected on stdout, got: {out.stdout!r} / {out.stderr}"
    return out.returncode, json.loads(lines[0]), out.stderr


def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMGUARD_NVML", "LD_LIBRARY_PATH"))}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent / "src")
    return env


def test_without_an_nvidia_driver_it_exits_2_with_a_clear_reason():
    """No libnvidia-ml.so.1 on this machine: exit 2, one JSON object saying 'cannot-run' and why."""
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    rc, result, err = run_check(plain_env())
    assert rc == 2 and result["result"] == "cannot-run"
    assert "no NVIDIA driver" in result["reason"] and "libnvidia-ml.so.1" in result["reason"]
    assert "cannot-run" in err and result["pid_namespace"]["host"] in (True, False, None)


def test_without_nvidia_ml_py_it_exits_2_naming_the_package(tmp_path):
    """An interpreter where `import pynvml` fails: exit 2, the reason names nvidia-ml-py."""
    (tmp_path / "pynvml.py").write_text("raise ImportError('no module named pynvml (simulated)')\n")
    env = plain_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    rc, result, _ = run_check(env)
    assert rc == 2 and "nvidia-ml-py is not installed" in result["reason"]


needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler (cc) to build the driver stand-ins")


@pytest.fixture
def gpu_machine(tmp_path):
    """(env, machine): a directory with both stand-ins, and the NVML behaviour file, for one generation."""

    def make(generation: str = "r535") -> tuple[dict[str, str], Machine]:
        libs = build_standin(tmp_path / "libs", generation)
        build_libcuda(libs)
        (tmp_path / "gpu").mkdir(exist_ok=True)
        machine = Machine(tmp_path / "gpu")
        env = plain_env()
        env.update(LD_LIBRARY_PATH=str(libs), MEMGUARD_NVML_STANDIN=str(machine.path),
                   MEMGUARD_NVML_STANDIN_LOG=str(machine.log))
        return env, machine

    return make


@needs_cc
@pytest.mark.parametrize("generation", ["r535", "r470"])
def test_a_full_check_passes_over_the_stand_ins(gpu_machine, generation):
    """The whole check on one A100 stand-in, on a current driver and on one without _v3 lists: raw NVML
    answers keyed by call, latency quantiles, the filler in the worker's grandchild pinned by UUID, memguard
    charging its memory to the worker and stopping it by the rule, all in one JSON result."""
    env, machine = gpu_machine(generation)
    machine.gpu(0, UUID0, 40 * GiB, 31 * GiB, reserved=512 * MiB)
    machine.gpu(1, "GPU-66666666-7777-8888-9999-000000000000", 40 * GiB, 40 * GiB)
    rc, result, err = run_check(env, *SMALL, "--device", UUID0)
    assert rc == 0, (result.get("reason"), err[-2000:])
    assert result["result"] == "pass" and result["target"]["uuid"] == UUID0
    gpu0 = result["nvml"]["gpus"][0]
    assert gpu0["nvmlDeviceGetMemoryInfo"]["value"]["total"] == 40 * GiB
    compute = gpu0["nvmlDeviceGetComputeRunningProcesses"]
    if generation == "r470":  # the raw answers show why memguard falls back to _v2
        assert compute["error"] == "NVMLLibraryMismatchError"
        assert gpu0["nvmlDeviceGetMPSComputeRunningProcesses_v2"]["error"] == "NVMLError_FunctionNotFound"
    else:
        assert compute == {"value": []}
    assert "value" in gpu0["nvmlDeviceGetComputeRunningProcesses_v2"]
    lat = result["latency"]
    assert lat["raw_sweep"]["n"] == 50 and lat["memguard_read"]["p99_ms"] >= lat["memguard_read"]["p50_ms"]
    assert UUID0 in lat["memguard_view"]["devices"]
    run = result["memguard_run"]
    assert run["filler_is_grandchild_of_worker"] and run["pinned_by_uuid"] and run["cuda_uuid_matches_nvml"]
    assert run["stopped_by_rule"] and run["charged_bytes"] > run["threshold_bytes"]
    assert run["crossing_to_decision_s"] is not None and run["gpu_problems"] == []
    assert result["duration_s"] < 120
    assert "stopped by the rule: True" in err


@needs_cc
def test_mig_is_detected_reported_and_used_never_changed(gpu_machine):
    """A GPU in MIG mode: the check reports it and its MIG devices, fills a MIG device by its MIG- UUID, and
    makes no NVML call but reads (nothing that could change MIG)."""
    env, machine = gpu_machine()
    machine.gpu(0, "GPU-aaaaaaaa-0000-0000-0000-000000000000", 80 * GiB, 50 * GiB, name="NVIDIA A100-SXM4-80GB")
    machine.mig(0, 7)
    mig_uuid = "MIG-bbbbbbbb-0000-0000-0000-000000000000"
    machine.migdev(0, 0, mig_uuid, 40 * GiB, 30 * GiB, "NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    rc, result, err = run_check(env, *SMALL)
    assert rc == 0, (result.get("reason"), err[-2000:])
    assert result["mig"]["enabled_on"] == ["0"] and result["mig"]["devices"] == [{"index": "0:0", "uuid": mig_uuid}]
    assert result["target"] == {**result["target"], "uuid": mig_uuid, "mig": True, "index": "0:0"}
    assert result["memguard_run"]["stopped_by_rule"]
    called = {line.split()[0] for line in machine.calls()}
    assert called and all(c.startswith(("nvmlDeviceGet", "nvmlSystemGet", "nvmlInit", "nvmlShutdown"))
                          for c in called), called


@needs_cc
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to create a PID namespace")
def test_inside_a_pid_namespace_it_says_why_attribution_cannot_work(gpu_machine):
    """Run in a fresh PID namespace with its own /proc: NVML answers and latency are still reported, then exit
    2 with a message naming the PID namespace and what to do."""
    env, machine = gpu_machine()
    machine.gpu(0, UUID0, 40 * GiB, 31 * GiB)
    rc, result, _ = run_check(env, *SMALL, prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    assert rc == 2 and result["result"] == "cannot-run"
    assert result["pid_namespace"]["attributable"] is False
    assert "PID namespace" in result["reason"] and "host's PID namespace" in result["reason"]
    assert result["nvml"]["gpus"][0]["uuid"] == UUID0 and "raw_sweep" in result["latency"]
    assert "memguard_run" not in result
