"""GPU memory on NVIDIA Jetson: unified memory, measured through NvMap.

On a Jetson the GPU has no memory of its own: CUDA allocations are system
RAM, handed out by the NvMap kernel driver, and NVML is either absent
(JetPack 5 and older) or lists the GPU without memory figures (JetPack 6
and later). :class:`JetsonSensor` reads what the kernel does expose and
gives it the shape of an NVML reading (:class:`~memguard.sense.gpu.GpuReading`),
so ``gpu.*`` rules and ``worker.gpu_memory`` work the same way:

- ``/sys/kernel/debug/nvmap/iovmm/clients`` (debugfs, readable by root
  only): one line per NvMap client with its process id and the GPU
  memory it holds. Each process's GPU memory is the sum of its clients'.
  The pids are the kernel's (host) pids, as NVML's are.
- ``/proc/meminfo``: ``MemTotal`` (what the GPU shares), ``MemAvailable``
  (what can still be allocated, to the GPU or anything else, without
  swapping) and ``NvMapMemUsed`` (all GPU allocations; readable by
  anyone). These are the figures ``tegrastats`` prints as ``RAM``.

The one device, index ``"0"``, has ``total`` = MemTotal, ``free`` =
MemAvailable and ``used`` = the GPU's allocations (NvMapMemUsed, or the
clients file's total). So ``used + free`` is less than ``total``: the rest
is what the CPU side uses. Without NvMapMemUsed and without a readable
clients file, ``used`` is Unknown; without a readable clients file the
per-process figures are Unknown, and :attr:`GpuStart.reason` says so once.

:func:`make_gpu_sensor` chooses between this sensor and
:class:`~memguard.sense.gpu.GpuSensor`. Every path is taken relative to
``root``, so tests run on a directory tree shaped like a Jetson's.
"""

from __future__ import annotations

import os
import time
from types import MappingProxyType
from typing import Callable, Mapping, Union

from memguard.model import Reading, Unknown

from .gpu import (
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    GpuDevice,
    GpuProblem,
    GpuReading,
    GpuSensor,
    GpuStart,
    ThreadedSensor,
)

__all__ = [
    "COMPATIBLE",
    "MEMINFO",
    "MODEL",
    "NVMAP_CLIENTS",
    "TEGRA_RELEASE",
    "JetsonSensor",
    "NvmapClients",
    "is_jetson",
    "make_gpu_sensor",
    "parse_meminfo",
    "parse_nvmap_clients",
]

NVMAP_CLIENTS = "sys/kernel/debug/nvmap/iovmm/clients"
"""NvMap's per-client GPU memory (the iovmm heap, where CUDA allocates), relative to the root."""

MEMINFO = "proc/meminfo"
TEGRA_RELEASE = "etc/nv_tegra_release"
"""Present on Jetson Linux (L4T)."""

MODEL = "proc/device-tree/model"
COMPATIBLE = "proc/device-tree/compatible"

_KIB = 1024


# ---------------------------------------------------------------------------
# Parsing


class NvmapClients:
    """What one read of NvMap's ``clients`` file says.

    ``per_pid`` maps each process id to the bytes its clients hold
    (kernel clients, pid 0, are left out); ``total_bytes`` is the file's
    ``total`` line, or None when it has none.
    """

    __slots__ = ("per_pid", "total_bytes")

    def __init__(self, per_pid: Mapping[int, int], total_bytes: int | None) -> None:
        self.per_pid = per_pid
        self.total_bytes = total_bytes


def _kib(token: str) -> int | None:
    """``"1456788K"`` -> bytes; None for anything else."""
    if not token.endswith("K") or not token[:-1].isdigit():
        return None
    return int(token[:-1]) * _KIB


def parse_nvmap_clients(text: str) -> NvmapClients:
    """Parse ``/sys/kernel/debug/nvmap/iovmm/clients``.

    The kernel prints a header, then one line per client,
    ``"%-18s %18s %8u %10lluK"`` (client name, process name, pid, size in
    KiB), then ``total ... <size>K``. A process name may contain spaces,
    so fields are taken from the right. Unparsable lines are skipped.
    """
    per_pid: dict[int, int] = {}
    total: int | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        size = _kib(fields[-1])
        if size is None:
            continue  # the header, an allocation detail line
        if fields[0] == "total" and len(fields) == 2:
            total = size
            continue
        if len(fields) < 4 or not fields[-2].isdigit():
            continue
        pid = int(fields[-2])
        if pid > 0:
            per_pid[pid] = per_pid.get(pid, 0) + size
    return NvmapClients(MappingProxyType(dict(sorted(per_pid.items()))), total)


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as {field: bytes} (fields in kB are multiplied out; others as they are)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        out[name.strip()] = int(parts[0]) * (_KIB if parts[1:2] == ["kB"] else 1)
    return out


def _read(path: str, limit: int = 1 << 20) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        got = 0
        while got < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def is_jetson(root: str = "/") -> bool:
    """True on NVIDIA Jetson: ``/etc/nv_tegra_release``, or a device tree compatible with ``nvidia,tegra*``."""
    if os.path.exists(os.path.join(root, TEGRA_RELEASE)):
        return True
    try:
        return b"nvidia,tegra" in _read(os.path.join(root, COMPATIBLE)).encode()
    except OSError:
        return False


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


# ---------------------------------------------------------------------------
# The sensor


class JetsonSensor(ThreadedSensor):
    """A Jetson's unified GPU memory as one device: totals from /proc/meminfo, per process from NvMap.

    Same interface as :class:`~memguard.sense.gpu.GpuSensor`: :meth:`start`
    once, then :meth:`read` or :meth:`read_async` each tick (bounded by
    ``timeout_s``; a debugfs read that hangs gives a ``timeout`` problem,
    not a stuck tick), :meth:`close` at the end. ``root`` is the directory
    the kernel's paths are taken from ("/" in production).
    """

    source = "NvMap"

    def __init__(self, root: str = "/", timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(timeout_s, start_timeout_s, "memguard-jetson", clock)
        self.root = root
        self._clients_readable = False
        self._name: Union[str, Unknown] = "NVIDIA Jetson (integrated GPU)"

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _prepare(self) -> GpuStart | None:
        if not is_jetson(self.root):
            return GpuStart(False, f"this is not an NVIDIA Jetson (no {self._path(TEGRA_RELEASE)}, no "
                                   "'nvidia,tegra' in the device tree): the Jetson GPU sensor is off")
        return None

    def _start_in_thread(self) -> GpuStart:
        try:
            model = _read(self._path(MODEL)).strip("\x00\n ")
            if model:
                self._name = f"{model} (integrated GPU)"
        except OSError:
            pass
        self._identity["0"] = (Unknown("a Jetson's integrated GPU has no NVML UUID"), self._name)
        self._indices = (("0", False),)
        try:
            info = parse_meminfo(_read(self._path(MEMINFO)))
        except OSError as e:
            return GpuStart(False, f"cannot read {self._path(MEMINFO)} ({_os_reason(e)}): the Jetson GPU "
                                   "sensor is off", jetson=True)
        if "MemTotal" not in info or "MemAvailable" not in info:
            return GpuStart(False, f"{self._path(MEMINFO)} has no MemTotal or MemAvailable: the Jetson GPU "
                                   "sensor is off", jetson=True)
        clients_path = self._path(NVMAP_CLIENTS)
        try:
            _read(clients_path)
            self._clients_readable = True
            note = ""
        except OSError as e:
            used = ("gpu.used is known (NvMapMemUsed)" if "NvMapMemUsed" in info
                    else "gpu.used is unknown too (no NvMapMemUsed in /proc/meminfo)")
            note = (f"{clients_path} is not readable ({_os_reason(e)}): GPU memory per process is unknown, "
                    f"so worker.gpu_memory is unknown; {used}. Run memguard as root with debugfs mounted "
                    "(/sys/kernel/debug) to see each worker's share")
        reading = self._read_in_thread()
        return GpuStart(True, note, reading.devices, jetson=True)

    def _read_in_thread(self) -> GpuReading:
        problems: list[GpuProblem] = []
        meminfo_path = self._path(MEMINFO)
        try:
            info = parse_meminfo(_read(meminfo_path))
        except OSError as e:
            info = {}
            problems.append(GpuProblem("0", "error", f"GPU 0: cannot read {meminfo_path} ({_os_reason(e)})"))
        total: Reading = info.get("MemTotal", Unknown(f"no MemTotal in {meminfo_path}"))
        free: Reading = info.get("MemAvailable", Unknown(f"no MemAvailable in {meminfo_path}"))
        clients: NvmapClients | None = None
        processes: Union[Mapping[int, Reading], Unknown]
        clients_path = self._path(NVMAP_CLIENTS)
        if self._clients_readable:
            try:
                clients = parse_nvmap_clients(_read(clients_path))
                processes = clients.per_pid
            except OSError as e:
                msg = f"GPU 0: cannot read {clients_path} ({_os_reason(e)})"
                processes = Unknown(msg)
                problems.append(GpuProblem("0", "error", msg))
        else:
            processes = Unknown(f"GPU 0: {clients_path} is not readable (root and a mounted debugfs are needed): "
                                "no per-process GPU memory")
        used: Reading
        if "NvMapMemUsed" in info:
            used = info["NvMapMemUsed"]
        elif clients is not None:
            used = clients.total_bytes if clients.total_bytes is not None else sum(clients.per_pid.values())
        else:
            used = Unknown("GPU 0: neither NvMapMemUsed in /proc/meminfo nor a readable NvMap clients file")
        uuid, name = self._identity["0"]
        dev = GpuDevice("0", uuid, name, total, used, free, processes, False)
        return GpuReading((dev,), tuple(problems))


# ---------------------------------------------------------------------------
# Choosing a sensor


def make_gpu_sensor(mode: str = "auto", *, root: str = "/", timeout_s: float = DEFAULT_TIMEOUT_S,
                    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                    clock: Callable[[], float] = time.monotonic) -> ThreadedSensor | None:
    """The GPU sensor for ``mode``: ``"off"`` (None), ``"nvml"``, ``"jetson"``, or ``"auto"``.

    ``"auto"`` picks :class:`JetsonSensor` on a Jetson (:func:`is_jetson`
    under ``root``) and :class:`~memguard.sense.gpu.GpuSensor` (NVML)
    everywhere else. The sensor is not started: call ``start()``, whose
    :class:`~memguard.sense.gpu.GpuStart` says whether it runs and why.
    A ``mode`` not among these raises ValueError (configuration checks
    it first).
    """
    if mode == "off":
        return None
    if mode == "jetson" or (mode == "auto" and is_jetson(root)):
        return JetsonSensor(root, timeout_s, start_timeout_s=start_timeout_s, clock=clock)
    if mode in ("auto", "nvml"):
        return GpuSensor(timeout_s=timeout_s, start_timeout_s=start_timeout_s,
                         tegra_release_path=os.path.join(root, TEGRA_RELEASE), clock=clock)
    raise ValueError(f"unknown GPU sensing mode {mode!r}: expected auto, nvml, jetson or off")
