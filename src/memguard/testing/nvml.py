"""A scriptable stand-in for the ``pynvml`` module, for tests and demos without a GPU.

Public testing API, in the spirit of ``structlog.testing``: pass a
:class:`FakeNvml` wherever memguard takes an NVML binding::

    from memguard.sense.gpu import GpuSensor
    from memguard.testing.nvml import FakeNvml

    nvml = FakeNvml.scenario("two_devices")
    sensor = GpuSensor(nvml)
    assert sensor.start().enabled
    reading = sensor.read()

It mirrors pynvml's shapes: memory info is pynvml's own ``c_nvmlMemory_t``
(``.total``, ``.free``, ``.used``), processes are pynvml's
``nvmlFriendlyObject`` with ``.pid``, ``.usedGpuMemory`` (None when NVML
has no figure), ``.gpuInstanceId`` and ``.computeInstanceId``, and errors
are pynvml's own classes: ``NVMLError(code)`` yields the generated
subclass (``NVMLError_GpuIsLost``...) with the code in ``.value``, and
``NVMLLibraryMismatchError`` is not an ``NVMLError``, exactly as in
nvidia-ml-py. Code that catches pynvml's exceptions is exercised for real.
Without nvidia-ml-py installed, look-alike classes built the same way
stand in.

Driver generations are modelled as NVIDIA's library exports them
(:data:`DRIVERS`): which process-list symbols exist (``_v2`` from R450,
the MPS list's ``_v2`` from R495, ``_v3`` from R510) and whether
``nvmlDeviceGetMemoryInfo_v2`` does. The binding side follows
nvidia-ml-py: from 12.550.52 (``binding="current"``) the unversioned
wrappers raise ``NVMLLibraryMismatchError`` when the driver lacks ``_v3``
and the ``_v2`` wrappers raise ``NVMLError_FunctionNotFound`` when it lacks
those; before it (``binding="12.535"``) there are no ``_v2`` wrappers and
the unversioned ones raise ``NVMLError_FunctionNotFound`` themselves.
Memory info carries reserved memory: v1's ``used`` includes it, v2 keeps
it apart. tests/nvml_standin/ holds the same model at the C level, for
the real pynvml.

Scenarios (:meth:`FakeNvml.scenario`), each documented on
:data:`SCENARIOS`, cover the cases a GPU machine can present. Faults can
also be scripted by hand: :meth:`FakeNvml.fail`, :meth:`FakeNvml.lose`,
:meth:`FakeNvml.hang` / :meth:`FakeNvml.release`, and the devices
(:class:`FakeDevice`) are plain mutable objects. Every call is recorded
in :attr:`FakeNvml.calls`.
"""

from __future__ import annotations

import string
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = [
    "DRIVERS",
    "GiB",
    "MiB",
    "SCENARIOS",
    "FakeDevice",
    "FakeHandle",
    "FakeNvml",
    "NVMLError",
    "NVMLLibraryMismatchError",
    "error_class",
]

MiB = 1 << 20
GiB = 1 << 30

# NVML return codes (nvml.h), as pynvml names them.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

DRIVERS: Mapping[str, frozenset[str]] = {
    "r535": frozenset({"v2", "mps_v2", "v3", "memory_v2"}),  # R510 and later: everything memguard may call
    "r495": frozenset({"v2", "mps_v2"}),  # R495-R505: no _v3
    "r470": frozenset({"v2"}),  # R450-R470: neither _v3 nor the MPS list's _v2
    "r440": frozenset(),  # before R450: only unversioned v1 lists, which nvidia-ml-py cannot call
}
"""Which versioned symbols each driver generation exports (the unversioned v1 ones exist in all)."""

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_VALUE_NOT_AVAILABLE_uint = 0xFFFFFFFF

_CODES = {k: v for k, v in dict(globals()).items() if k.startswith("NVML_ERROR_")}

try:
    import pynvml as _pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency of memguard
    _pynvml = None

if _pynvml is not None:
    NVMLError = _pynvml.NVMLError
    NVMLLibraryMismatchError = _pynvml.NVMLLibraryMismatchError
    _MemoryInfo: Any = _pynvml.c_nvmlMemory_t
    _MemoryInfoV2: Any = _pynvml.c_nvmlMemory_v2_t
    _Friendly: Any = _pynvml.nvmlFriendlyObject

    def error_class(code: int) -> type:
        """pynvml's generated class for an NVML error code (``NVMLError_GpuIsLost`` for 15)."""
        return _pynvml.nvmlExceptionClass(code)

else:  # pragma: no cover - exercised only where nvidia-ml-py is missing

    class NVMLLibraryMismatchError(Exception):  # type: ignore[no-redef]
        """As pynvml: raised by unversioned wrappers; deliberately not an NVMLError."""

    class NVMLError(Exception):  # type: ignore[no-redef]
        """As pynvml: ``NVMLError(code)`` returns the subclass generated for ``code``."""

        _valClassMapping: dict[int, type] = {}

        def __new__(typ, value):  # noqa: N804 - pynvml's spelling
            if typ is NVMLError:
                typ = NVMLError._valClassMapping.get(value, typ)
            obj = Exception.__new__(typ)
            obj.value = value
            return obj

        def __str__(self) -> str:
            return f"NVML Error with code {self.value}"

    for _name, _val in _CODES.items():
        _cls_name = "NVMLError_" + string.capwords(_name.replace("NVML_ERROR_", ""), "_").replace("_", "")

        def _gen(val: int):
            def new(typ, *args):
                return NVMLError.__new__(typ, val)
            return new

        _cls = type(_cls_name, (NVMLError,), {"__new__": _gen(_val)})
        globals()[_cls_name] = _cls
        NVMLError._valClassMapping[_val] = _cls

    def error_class(code: int) -> type:  # type: ignore[misc]
        return NVMLError._valClassMapping[code]

    class _MemoryInfo:  # type: ignore[no-redef]
        def __init__(self, total: int = 0, free: int = 0, used: int = 0) -> None:
            self.total, self.free, self.used = total, free, used

    class _MemoryInfoV2:  # type: ignore[no-redef]
        def __init__(self, version: int = 0, total: int = 0, reserved: int = 0, free: int = 0, used: int = 0) -> None:
            self.version, self.total, self.reserved, self.free, self.used = version, total, reserved, free, used

    class _Friendly:  # type: ignore[no-redef]
        def __init__(self, d: Mapping[str, Any]) -> None:
            for k, v in d.items():
                setattr(self, k, v)


def _proc(pid: int, used: int | None, gi: int = NVML_VALUE_NOT_AVAILABLE_uint,
          ci: int = NVML_VALUE_NOT_AVAILABLE_uint) -> Any:
    return _Friendly({"pid": pid, "usedGpuMemory": used, "gpuInstanceId": gi, "computeInstanceId": ci})


# ---------------------------------------------------------------------------
# Devices and handles


@dataclass
class FakeDevice:
    """One GPU (or MIG device) of the fake. Mutable: change it between reads.

    ``compute``, ``graphics`` and ``mps`` list ``(pid, bytes or None)``.
    ``mig_slots`` is None for a GPU without MIG support, else one entry per
    MIG slot (None for an empty slot). ``lost`` makes every call on it
    raise ``NVMLError_GpuIsLost``; ``lose_at_memory_call`` sets ``lost``
    when the Nth ``nvmlDeviceGetMemoryInfo`` call on it arrives. ``used``
    is all memory in use, ``reserved`` (driver-reserved) included.
    """

    name: str = "NVIDIA A100-SXM4-40GB"
    uuid: str = ""
    total: int = 40 * GiB
    used: int = 0
    reserved: int = 0
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    mps: list[tuple[int, int | None]] = field(default_factory=list)
    memory_supported: bool = True
    processes_supported: bool = True
    mig_slots: list[FakeDevice | None] | None = None
    mig_enabled: bool = False
    gpu_instance: int = NVML_VALUE_NOT_AVAILABLE_uint
    lost: bool = False
    lose_at_memory_call: int | None = None


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns: ``path`` is (gpu,) or (gpu, mig slot)."""

    path: tuple[int, ...]

    @property
    def index(self) -> str:
        return ":".join(str(p) for p in self.path)


def _uuid(prefix: str, n: int) -> str:
    return f"{prefix}-5e1f0a7c-{n:04x}-4c3b-9d2e-{0xfa4e00000000 + n:012x}"


# ---------------------------------------------------------------------------
# The fake module


class FakeNvml:
    """A fake ``pynvml`` module. Not a mock: it keeps state and behaves like NVML.

    ``devices`` are the GPUs in NVML index order. ``init_error`` (an NVML
    code) makes ``nvmlInit`` fail. ``driver`` is a generation of
    :data:`DRIVERS` and ``binding`` ``"current"`` (nvidia-ml-py 12.550.52
    and later) or ``"12.535"`` (older), which together decide what the
    process-list and memory wrappers do. ``mismatch`` (the driver lacks
    ``_v3``) with ``v2_fallback`` (the ``_v2`` wrappers exist) say the same
    in the older, shorter way; ``mismatch`` alone offers no ``_v2``
    wrappers. ``has_mps=False`` leaves
    ``nvmlDeviceGetMPSComputeRunningProcesses`` out, like an old binding.
    """

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError

    def __init__(self, devices: Sequence[FakeDevice] = (), *, init_error: int | None = None,
                 mismatch: bool = False, v2_fallback: bool = False, has_mps: bool = True,
                 driver: str = "r535", binding: str = "current") -> None:
        if driver not in DRIVERS:
            raise ValueError(f"unknown driver generation {driver!r}; known: {', '.join(DRIVERS)}")
        if binding not in ("current", "12.535"):
            raise ValueError(f"unknown binding {binding!r}: 'current' or '12.535'")
        self.devices: list[FakeDevice] = list(devices)
        for i, d in enumerate(self.devices):
            if not d.uuid:
                d.uuid = _uuid("GPU", i)
            for s, m in enumerate(d.mig_slots or ()):
                if m is not None and not m.uuid:
                    m.uuid = _uuid("MIG", 16 * (i + 1) + s)
        self.init_error = init_error
        self.driver_symbols = set(DRIVERS[driver]) - ({"v3"} if mismatch else set())
        self.binding = binding
        if binding != "current":
            self.NVMLLibraryMismatchError = None  # nvidia-ml-py before 12.550.52 has no such class
        self.initialised = 0
        self.calls: list[tuple[str, str | None]] = []
        self._counts: dict[tuple[str, str | None], int] = {}
        self._failures: list[dict[str, Any]] = []
        self._hangs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.hung = threading.Event()  # set while a call is blocked in a hang
        self._released = threading.Event()
        for code_name, code in _CODES.items():
            setattr(self, code_name, code)
        self.NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
        self.NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
        if has_mps:
            self.nvmlDeviceGetMPSComputeRunningProcesses = self._mps_processes
        if binding == "current" and (v2_fallback or not mismatch):
            self.nvmlDeviceGetComputeRunningProcesses_v2 = lambda h: self._processes(
                "nvmlDeviceGetComputeRunningProcesses_v2", h, "compute", versioned=True)
            self.nvmlDeviceGetGraphicsRunningProcesses_v2 = lambda h: self._processes(
                "nvmlDeviceGetGraphicsRunningProcesses_v2", h, "graphics", versioned=True)
            if has_mps:
                self.nvmlDeviceGetMPSComputeRunningProcesses_v2 = lambda h: self._processes(
                    "nvmlDeviceGetMPSComputeRunningProcesses_v2", h, "mps", versioned=True)

    def __getattr__(self, name: str) -> Any:
        # pynvml exposes NVMLError_<Name> classes as module attributes.
        if name.startswith("NVMLError_"):
            for code in _CODES.values():
                cls = error_class(code)
                if cls.__name__ == name:
                    return cls
        raise AttributeError(name)

    # -- scripting --------------------------------------------------------

    def fail(self, function: str, error: int | BaseException | type[BaseException], *,
             device: int | str | None = None, from_call: int = 1, times: int | None = None) -> None:
        """Make ``function`` (or ``"*"``: any function) raise from its ``from_call``-th call.

        ``error`` is an NVML code (raised as ``NVMLError(code)``), an
        exception, or an exception class. ``device`` limits it to calls on
        one device (``0``, ``"0:1"``); ``times`` limits how often it raises.
        Calls are counted per function and device.
        """
        self._failures.append({"function": function, "error": error,
                               "device": None if device is None else str(device),
                               "from": from_call, "times": times})

    def lose(self, device: int, *, at_memory_call: int | None = None) -> None:
        """GPU ``device`` falls off the bus: now, or at its Nth memory-info call."""
        if at_memory_call is None:
            self.devices[device].lost = True
        else:
            self.devices[device].lose_at_memory_call = at_memory_call

    def hang(self, function: str, *, on_call: int = 1, device: int | str | None = None) -> None:
        """Make the ``on_call``-th call of ``function`` block until :meth:`release` (once)."""
        self._hangs.append({"function": function, "on": on_call,
                            "device": None if device is None else str(device), "done": False})

    def release(self) -> None:
        """Let every blocked call return, and every later hang pass through."""
        self._released.set()

    def count(self, function: str, device: int | str | None = None) -> int:
        """How many times ``function`` was called (on ``device``, if given)."""
        dev = None if device is None else str(device)
        return sum(1 for f, d in self.calls if f == function and (dev is None or d == dev))

    # -- plumbing ---------------------------------------------------------

    def _enter(self, function: str, handle: FakeHandle | None = None) -> FakeDevice | None:
        """Record the call, apply scripted faults and hangs; return the device of ``handle``."""
        index = handle.index if isinstance(handle, FakeHandle) else None
        with self._lock:
            self.calls.append((function, index))
            n = self._counts[(function, index)] = self._counts.get((function, index), 0) + 1
            hang = None
            for h in self._hangs:
                if (not h["done"] and h["function"] == function and h["on"] == n
                        and (h["device"] is None or h["device"] == index)):
                    h["done"] = True
                    hang = h
        if hang is not None and not self._released.is_set():
            self.hung.set()
            self._released.wait()
            self.hung.clear()
        for f in self._failures:
            if f["function"] not in (function, "*"):
                continue
            if f["device"] is not None and f["device"] != index:
                continue
            if n >= f["from"] and (f["times"] is None or n < f["from"] + f["times"]):
                self._raise(f["error"])
        if function not in ("nvmlInit",) and self.initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return None
        dev = self._device(handle)
        if function == "nvmlDeviceGetMemoryInfo" and dev.lose_at_memory_call is not None:
            if n >= dev.lose_at_memory_call:
                dev.lost = True
        parent = self.devices[handle.path[0]]
        if dev.lost or parent.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return dev

    @staticmethod
    def _raise(error: Any) -> None:
        if isinstance(error, int):
            raise NVMLError(error)
        if isinstance(error, type):
            raise error()
        raise error

    def _device(self, handle: Any) -> FakeDevice:
        if not isinstance(handle, FakeHandle):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        dev = self.devices[handle.path[0]]
        if len(handle.path) == 2:
            m = (dev.mig_slots or [])[handle.path[1]]
            if m is None:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return m
        return dev

    # -- the pynvml functions ----------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle = FakeHandle((index,))
        if self.devices[index].lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._enter("nvmlDeviceGetUUID", handle).uuid  # type: ignore[union-attr]

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._enter("nvmlDeviceGetName", handle).name  # type: ignore[union-attr]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        dev = self._enter("nvmlDeviceGetMemoryInfo" if not version else "nvmlDeviceGetMemoryInfo_v2", handle)
        assert dev is not None
        if version and "memory_v2" not in self.driver_symbols:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if not dev.memory_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        free = max(0, dev.total - dev.used)
        if version:  # v2: reserved memory is accounted apart from used
            return _MemoryInfoV2(version=version, total=dev.total, reserved=dev.reserved, free=free,
                                 used=max(0, dev.used - dev.reserved))
        return _MemoryInfo(total=dev.total, free=free, used=dev.used)

    def _processes(self, function: str, handle: FakeHandle, kind: str, versioned: bool = False) -> list[Any]:
        dev = self._enter(function, handle)
        assert dev is not None
        if not versioned and "v3" not in self.driver_symbols:
            if self.binding != "current":  # old bindings: the failed symbol look-up itself
                raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML lib version. "
                f"Either use matching pyNVML and NVML lib versions or use a versioned function such as "
                f"{function}_v2")
        if versioned and ("mps_v2" if kind == "mps" else "v2") not in self.driver_symbols:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if not dev.processes_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        gi = dev.gpu_instance
        return [_proc(pid, used, gi, 0 if gi != NVML_VALUE_NOT_AVAILABLE_uint else gi)
                for pid, used in getattr(dev, kind)]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses", handle, "graphics")

    def _mps_processes(self, handle: FakeHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetMPSComputeRunningProcesses", handle, "mps")

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        dev = self._enter("nvmlDeviceGetMigMode", handle)
        assert dev is not None
        if dev.mig_slots is None or len(handle.path) != 1:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if dev.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        dev = self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        assert dev is not None
        if dev.mig_slots is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return len(dev.mig_slots)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        dev = self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        assert dev is not None
        if dev.mig_slots is None or not dev.mig_enabled or len(handle.path) != 1:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < len(dev.mig_slots):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if dev.mig_slots[index] is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return FakeHandle((handle.path[0], index))

    # -- scenarios ----------------------------------------------------------

    @classmethod
    def scenario(cls, name: str, **params: Any) -> FakeNvml:
        """A fake set up as one of :data:`SCENARIOS` (see there for each one's parameters)."""
        try:
            build = _BUILDERS[name]
        except KeyError:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
        return build(cls, **params)


def _two(processes: Mapping[int, Mapping[int, int]] | None = None) -> list[FakeDevice]:
    if processes is None:
        processes = {0: {1001: 6 * GiB, 1002: 2 * GiB}, 1: {2001: 30 * GiB}}
    devs = []
    for i in (0, 1):
        procs = dict(processes.get(i, {}))
        devs.append(FakeDevice(name="NVIDIA A100-SXM4-40GB", total=40 * GiB,
                               used=sum(procs.values()) + 1 * GiB,
                               compute=list(procs.items())))
    # The same context shows up in the graphics list too: it must not count twice.
    if 1002 in processes.get(0, {}):
        devs[0].graphics = [(1002, processes[0][1002])]
    return devs


def _s_two_devices(cls: type[FakeNvml], processes: Mapping[int, Mapping[int, int]] | None = None) -> FakeNvml:
    return cls(_two(processes))


def _s_child_uses_gpu(cls: type[FakeNvml], pids: Mapping[int, int]) -> FakeNvml:
    dev = FakeDevice(name="NVIDIA GeForce RTX 4090", total=24 * GiB,
                     used=sum(pids.values()) + 300 * MiB, compute=list(pids.items()))
    return cls([dev])


def _s_device_lost_mid_run(cls: type[FakeNvml], lost_device: int = 1, lost_at_memory_call: int = 3,
                           processes: Mapping[int, Mapping[int, int]] | None = None) -> FakeNvml:
    fake = cls(_two(processes))
    fake.lose(lost_device, at_memory_call=lost_at_memory_call)
    return fake


def _s_library_missing(cls: type[FakeNvml]) -> FakeNvml:
    return cls([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)


def _s_driver_not_loaded(cls: type[FakeNvml]) -> FakeNvml:
    return cls([], init_error=NVML_ERROR_DRIVER_NOT_LOADED)


def _s_no_devices(cls: type[FakeNvml]) -> FakeNvml:
    return cls([])


def _s_driver_mismatch(cls: type[FakeNvml], v2_fallback: bool = False,
                       pids: Mapping[int, int] | None = None) -> FakeNvml:
    procs = dict(pids or {1001: 4 * GiB})
    dev = FakeDevice(name="NVIDIA Tesla T4", total=15 * GiB, used=sum(procs.values()) + 500 * MiB,
                     compute=list(procs.items()))
    return cls([dev], mismatch=True, v2_fallback=v2_fallback)


def _s_driver_generation(cls: type[FakeNvml], driver: str = "r470", binding: str = "current") -> FakeNvml:
    dev = FakeDevice(name="NVIDIA Tesla V100-SXM2-32GB", total=32 * GiB, used=8 * GiB, reserved=512 * MiB,
                     compute=[(1001, 6 * GiB)], graphics=[(1002, None)], mps=[(1003, 1 * GiB)])
    return cls([dev], driver=driver, binding=binding)


def _s_per_process_memory_unavailable(cls: type[FakeNvml], pids: Sequence[int] = (1001, 1002)) -> FakeNvml:
    dev = FakeDevice(name="NVIDIA A10", total=24 * GiB, used=10 * GiB,
                     compute=[(pid, None) for pid in pids])
    return cls([dev])


def _s_pid_from_other_namespace(cls: type[FakeNvml], host_pids: Mapping[int, int] | None = None) -> FakeNvml:
    procs = dict(host_pids or {4_000_001: 5 * GiB})
    dev = FakeDevice(name="NVIDIA L4", total=24 * GiB, used=sum(procs.values()) + 300 * MiB,
                     compute=list(procs.items()))
    return cls([dev])


def _s_hang(cls: type[FakeNvml], function: str = "nvmlDeviceGetMemoryInfo", on_call: int = 2) -> FakeNvml:
    fake = cls([FakeDevice(name="NVIDIA H100 80GB HBM3", total=80 * GiB, used=12 * GiB,
                           compute=[(1001, 11 * GiB)])])
    fake.hang(function, on_call=on_call)
    return fake


def _s_mig(cls: type[FakeNvml], slot_processes: Mapping[int, Mapping[int, int]] | None = None) -> FakeNvml:
    if slot_processes is None:
        slot_processes = {0: {3001: 10 * GiB}, 1: {3002: 20 * GiB}}
    slots: list[FakeDevice | None] = [None] * 7
    for slot in (0, 1):
        procs = dict(slot_processes.get(slot, {}))
        slots[slot] = FakeDevice(name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=39 * GiB + 512 * MiB,
                                 used=sum(procs.values()) + 20 * MiB, compute=list(procs.items()),
                                 gpu_instance=1 + slot)
    parent = FakeDevice(name="NVIDIA A100-SXM4-80GB", total=80 * GiB, used=30 * GiB + 40 * MiB,
                        mig_slots=slots, mig_enabled=True)
    return cls([parent])


def _s_jetson(cls: type[FakeNvml]) -> FakeNvml:
    dev = FakeDevice(name="Orin (nvgpu)", total=0, memory_supported=False, processes_supported=False)
    return cls([dev])


_BUILDERS = {
    "two_devices": _s_two_devices,
    "child_uses_gpu": _s_child_uses_gpu,
    "device_lost_mid_run": _s_device_lost_mid_run,
    "library_missing": _s_library_missing,
    "driver_not_loaded": _s_driver_not_loaded,
    "no_devices": _s_no_devices,
    "driver_mismatch": _s_driver_mismatch,
    "driver_generation": _s_driver_generation,
    "per_process_memory_unavailable": _s_per_process_memory_unavailable,
    "pid_from_other_namespace": _s_pid_from_other_namespace,
    "hang": _s_hang,
    "mig": _s_mig,
    "jetson": _s_jetson,
}

SCENARIOS: Mapping[str, str] = {
    "two_devices": "Two 40 GiB A100s. GPU 0: pid 1001 6 GiB, pid 1002 2 GiB (listed as compute and as "
                   "graphics); GPU 1: pid 2001 30 GiB. Each device's used = its processes + 1 GiB. "
                   "processes={gpu: {pid: bytes}} replaces the processes.",
    "child_uses_gpu": "One 24 GiB RTX 4090 whose compute processes are pids={pid: bytes} (required), "
                      "used = their sum + 300 MiB.",
    "device_lost_mid_run": "two_devices, but GPU lost_device (1) raises NVMLError_GpuIsLost on every call "
                           "from its lost_at_memory_call-th (3rd) nvmlDeviceGetMemoryInfo on.",
    "library_missing": "nvmlInit raises NVMLError_LibraryNotFound, as on a machine without the driver.",
    "driver_not_loaded": "nvmlInit raises NVMLError_DriverNotLoaded.",
    "no_devices": "NVML initialises and reports no GPU.",
    "driver_mismatch": "One T4; the unversioned process-list wrappers raise NVMLLibraryMismatchError (not "
                       "an NVMLError). v2_fallback=True also offers working _v2 variants.",
    "driver_generation": "One 32 GiB V100 with 8 GiB used (512 MiB of it reserved): compute pid 1001 6 GiB, "
                         "graphics pid 1002 with no figure, MPS client pid 1003 1 GiB, under driver (r470: "
                         "no _v3, no MPS _v2) and binding ('current' or '12.535'); see DRIVERS.",
    "per_process_memory_unavailable": "One A10 with 10 GiB used; its processes pids (1001, 1002) have "
                                      "usedGpuMemory None.",
    "pid_from_other_namespace": "One L4 whose processes are host_pids={pid: bytes} (default 4000001: 5 GiB), "
                                "PIDs that exist in no namespace memguard can see.",
    "hang": "One H100; the on_call-th (2nd: the first read after start-up) call of function "
            "(nvmlDeviceGetMemoryInfo) blocks until release().",
    "mig": "One A100 80GB in MIG mode with 7 slots; slots 0 and 1 hold 3g.40gb devices with pid 3001 10 GiB "
           "and pid 3002 20 GiB (slot_processes={slot: {pid: bytes}} replaces them), the rest are empty.",
    "jetson": "One 'Orin (nvgpu)' whose memory info and process lists raise NVMLError_NotSupported.",
}
