"""The real pynvml over a C stand-in for libnvidia-ml.so.1: build it, describe a machine, drive the sensor.

- :func:`build_standin` compiles tests/nvml_standin/libnvidia-ml.c with the
  system C compiler (``cc``) into ``<dir>/<generation>/libnvidia-ml.so.1``,
  leaving out the symbols that driver generation lacks (:data:`GENERATIONS`);
  :func:`build_libcuda` compiles the libcuda.so.1 stand-in, whose
  allocations the NVML stand-in then reports.
- :class:`Machine` writes the stand-in's behaviour file: GPUs, MIG devices,
  processes, failing and hanging calls. The stand-in rereads it at every
  call, so a test changes the machine between two reads.
- :class:`Probe` runs tests/nvml_standin/probe.py in a child process whose
  ``LD_LIBRARY_PATH`` makes pynvml's ``dlopen("libnvidia-ml.so.1")`` find
  the stand-in, with an optional older nvidia-ml-py first on ``PYTHONPATH``,
  and exchanges one JSON line per command with it.
- :func:`binding_dir` installs one nvidia-ml-py version into a directory
  with pip (from the configured package index).

Nothing sleeps: a hung call waits on a FIFO that :meth:`Machine.release`
opens, and every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SOURCE = HERE / "nvml_standin" / "libnvidia-ml.c"
PROBE = HERE / "nvml_standin" / "probe.py"
REPO = HERE.parent
DEADLINE_S = 30.0

GiB = 1 << 30
MiB = 1 << 20

GENERATIONS: dict[str, tuple[str, ...]] = {
    # Everything memguard may call: R510 and later (_v3 lists, memory info v2).
    "r535": ("HAVE_V2", "HAVE_MPS", "HAVE_MPS_V2", "HAVE_V3", "HAVE_MEMORY_V2"),
    # No _v3 symbols, but the MPS list's _v2 (R495-R505).
    "r495": ("HAVE_V2", "HAVE_MPS", "HAVE_MPS_V2"),
    # Neither _v3 nor the MPS list's _v2 (R460-R470, e.g. the long-lived R470 branch).
    "r470": ("HAVE_V2", "HAVE_MPS"),
    # Only the unversioned v1 lists (before R450).
    "r440": (),
}


def compiler() -> str | None:
    """The system C compiler, or None."""
    return shutil.which("cc") or shutil.which("gcc")


def build_standin(out: Path, generation: str) -> Path:
    """Compile the stand-in for ``generation``; returns the directory holding libnvidia-ml.so.1."""
    cc = compiler()
    assert cc is not None
    target = out / generation
    target.mkdir(parents=True, exist_ok=True)
    flags = [f"-D{d}" for d in GENERATIONS[generation]]
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-Wl,-soname,libnvidia-ml.so.1", *flags,
                    "-o", str(target / "libnvidia-ml.so.1"), str(SOURCE)], check=True, capture_output=True,
                   timeout=120)
    return target


def build_libcuda(out: Path) -> Path:
    """Compile the libcuda.so.1 stand-in (tests/nvml_standin/libcuda.c) into ``out``; returns ``out``."""
    cc = compiler()
    assert cc is not None
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-Wl,-soname,libcuda.so.1", "-o",
                    str(out / "libcuda.so.1"), str(HERE / "nvml_standin" / "libcuda.c")], check=True,
                   capture_output=True, timeout=120)
    return out


def binding_dir(out: Path, version: str) -> Path | str:
    """nvidia-ml-py ``version`` installed into ``out/<version>``; a string saying why not on failure."""
    target = out / version
    if (target / "pynvml.py").exists():
        return target
    got = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                          "--target", str(target), f"nvidia-ml-py=={version}"], capture_output=True, text=True,
                         timeout=300)
    if got.returncode != 0 or not (target / "pynvml.py").exists():
        return f"pip could not install nvidia-ml-py=={version}: {got.stderr.strip()[-300:]}"
    return target


class Machine:
    """The behaviour file of the stand-in: one machine's GPUs and faults."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "nvml-standin.conf"
        self.log = root / "nvml-calls.log"
        self.lines: list[str] = []
        self._fifos = 0
        self.write()

    def add(self, line: str) -> Machine:
        self.lines.append(line)
        self.write()
        return self

    def remove(self, prefix: str) -> Machine:
        self.lines = [ln for ln in self.lines if not ln.startswith(prefix)]
        self.write()
        return self

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in self.lines))
        os.replace(tmp, self.path)  # the stand-in never sees half a file

    def gpu(self, i: int, uuid: str, total: int, free: int, reserved: int = 0,
            name: str = "NVIDIA A100-SXM4-40GB") -> Machine:
        return self.add(f"gpu {i} {uuid} {total} {free} {reserved} {name}")

    def mig(self, i: int, slots: int) -> Machine:
        return self.add(f"mig {i} {slots}")

    def migdev(self, i: int, slot: int, uuid: str, total: int, free: int, name: str) -> Machine:
        return self.add(f"migdev {i} {slot} {uuid} {total} {free} 0 {name}")

    def proc(self, dev: str, kind: str, pid: int, used: int | None, live: bool = False) -> Machine:
        return self.add(f"proc {dev} {kind} {pid} {'na' if used is None else used}{' live' if live else ''}")

    def fail(self, function: str, dev: str, code: int, from_call: int = 1) -> Machine:
        return self.add(f"fail {function} {dev} {code} {from_call}")

    def hang(self, function: str, dev: str, nth: int) -> Path:
        """The ``nth`` call of ``function`` on ``dev`` blocks until :meth:`release`; returns the FIFO."""
        self._fifos += 1
        fifo = self.root / f"hang-{self._fifos}.fifo"
        os.mkfifo(fifo)
        self.add(f"hang {function} {dev} {nth} {fifo}")
        return fifo

    def release(self, fifo: Path, timeout: float = DEADLINE_S) -> None:
        """Let the call blocked on ``fifo`` return (waits for it to be blocked there, up to ``timeout``)."""
        done = threading.Event()

        def opener() -> None:
            fd = os.open(fifo, os.O_WRONLY)  # returns once the stand-in has it open for reading
            os.close(fd)
            done.set()

        threading.Thread(target=opener, daemon=True).start()
        assert done.wait(timeout), f"no call was blocked on {fifo}"

    def calls(self, function: str | None = None) -> list[str]:
        """The calls made so far, as "<function> <dev>" lines."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [ln for ln in lines if function is None or ln.split()[0] == function]


class Probe:
    """memguard's GpuSensor over the real pynvml, in a child process loading the stand-in."""

    def __init__(self, standin: Path, machine: Machine, binding: Path | None = None) -> None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(standin) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        env["MEMGUARD_NVML_STANDIN"] = str(machine.path)
        env["MEMGUARD_NVML_STANDIN_LOG"] = str(machine.log)
        env["PYTHONPATH"] = os.pathsep.join([*([str(binding)] if binding else []), str(REPO / "src")])
        self.proc = subprocess.Popen([sys.executable, str(PROBE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True)

    def __call__(self, op: str, timeout: float = DEADLINE_S, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the probe did not answer {op!r} within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the probe exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
        out = json.loads(line)
        assert not (isinstance(out, dict) and "error" in out), out.get("error")
        return out

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self("close")
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=DEADLINE_S)
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


def unknown(value: Any) -> bool:
    """True for a figure the probe encoded as Unknown."""
    return isinstance(value, dict) and "unknown" in value


def two_a100s(machine: Machine) -> Machine:
    """Two 40 GiB A100s; GPU 0 has 512 MiB reserved. No processes yet."""
    machine.gpu(0, "GPU-11111111-2222-3333-4444-555555555555", 40 * GiB, 31 * GiB, reserved=512 * MiB)
    machine.gpu(1, "GPU-66666666-7777-8888-9999-000000000000", 40 * GiB, 10 * GiB)
    return machine
