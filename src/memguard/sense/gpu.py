"""GPU memory through NVML: devices, per-process use, and which worker owns it.

One choke point
---------------
Every NVML call goes through an :class:`NvmlBinding`: the ``pynvml`` module
of NVIDIA's ``nvidia-ml-py`` package in production, or
:class:`memguard.testing.nvml.FakeNvml` in tests. ``pynvml`` is imported
only when :meth:`GpuSensor.start` runs, never when this module is imported.

A start-up decision, then values
--------------------------------
:meth:`GpuSensor.start` decides once whether GPU sensing runs. No binding,
no driver library, no loaded driver, no device, or a Jetson-style
unified-memory GPU whose memory NVML does not report all turn it off, with
one sentence saying why (:attr:`GpuStart.reason`), which the daemon logs
once. Everything after that is a value: :meth:`GpuSensor.read` never
raises. A device that fell off the bus, a driver/library mismatch or a
call that does not return in time makes that device's figures
:class:`~memguard.model.Unknown` for that tick and adds a
:class:`GpuProblem` to the reading, so the daemon can report it. A
problem's :attr:`~GpuProblem.key` stays the same from tick to tick while
the cause lasts (no elapsed time in it), so "report each problem once"
is a comparison of keys (:func:`new_problems`).

Driver generations
------------------
The unversioned process-list wrappers of nvidia-ml-py call the ``_v3``
symbols, which drivers before R510 do not export; the binding then raises
``NVMLLibraryMismatchError`` (nvidia-ml-py >= 12.550.52) or
``NVMLError_FunctionNotFound`` (older). The sensor then uses the ``_v2``
wrappers (R450 and later) and remembers that choice. A list the driver
lacks in every version (the MPS list before R495, graphics or MPS lists
on some devices) is simply absent; only a compute list that cannot be read
at all makes per-process memory unknown, with a ``mismatch`` problem that
names the driver generation. Error 999 ("Unknown Error") on a device
handle is how a GPU that fell off the bus usually shows up: it is
reported as ``lost``, like ``NVML_ERROR_GPU_IS_LOST``.

Never blocking the tick
-----------------------
NVML calls can hang (a GPU in a bad state, a driver reset in progress).
Each read runs in one dedicated daemon thread; :meth:`GpuSensor.read`
waits at most ``timeout_s`` for it. If the call is still stuck, the
reading is all-unknown with a ``"timeout"`` problem, and later reads
return at once with the same verdict, without queueing a second call
behind the stuck one, until the stuck call returns; the next read after
that starts afresh. :meth:`GpuSensor.read_async` is the same for asyncio
callers and does not block the event loop at all. The same machinery
(:class:`ThreadedSensor`) serves the Jetson sensor
(:mod:`memguard.sense.jetson`).

Figures
-------
``total``/``free`` come from ``nvmlDeviceGetMemoryInfo`` (the v1 struct);
``used`` is ``total - free``, which holds whichever way a driver accounts
reserved memory (v1's ``used`` includes it from R525 on, v2 keeps it
apart). Per-process memory is the union of the compute, graphics and MPS
process lists: a pid listed in more than one takes the largest figure
(the same memory shows up in each list, so summing would count it twice);
``usedGpuMemory`` of ``None`` (NVML_VALUE_NOT_AVAILABLE) is Unknown for
that pid. With MIG enabled, each MIG device is listed as a device of its
own (index ``"0:1"`` for MIG device 1 of GPU 0) in place of its parent,
with its own memory and processes.

Attribution
-----------
:func:`attribute` maps per-process GPU memory to the worker whose process
tree holds the pid. NVML reports host PIDs, also inside containers. In the
host's PID namespace those are the PIDs ``/proc`` shows and the map is the
identity; :func:`host_pid_map` says which case applies.

Choosing devices for a worker
-----------------------------
:func:`cuda_env` turns a workload's ``gpus:`` (NVML indexes, MIG indexes,
UUIDs) into ``CUDA_VISIBLE_DEVICES`` by UUID, with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so CUDA's device 0 is the GPU memguard
calls ``gpu[0]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union

from memguard.model import Reading, Unknown, is_known

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_START_TIMEOUT_S",
    "MIN_BINDING_VERSION",
    "TEGRA_RELEASE_PATH",
    "UNATTRIBUTED",
    "NvmlBinding",
    "GpuDevice",
    "GpuProblem",
    "GpuReading",
    "GpuStart",
    "WorkerGpu",
    "GpuAttribution",
    "ThreadedSensor",
    "GpuSensor",
    "NO_GPU",
    "attribute",
    "attribute_all",
    "host_pid_map",
    "in_initial_pid_namespace",
    "new_problems",
    "nspid_map",
    "parse_nspid",
]

DEFAULT_TIMEOUT_S = 2.0
"""How long one read may take. A healthy NVML answers a full sweep of 8 GPUs in
a few milliseconds; 2 s is far past that yet short next to the daemon's 1 s
poll plus the grace periods of its rules, so a hung driver costs at most a
tick or two of GPU figures, never the RAM rules."""

DEFAULT_START_TIMEOUT_S = 30.0
"""How long start-up may take. Without persistence mode the driver sets each
GPU up when NVML first opens it, which can take seconds per GPU."""

MIN_BINDING_VERSION = "12.550.52"
"""The oldest nvidia-ml-py memguard supports: the first with the ``_v2``
process-list wrappers that drivers before R510 need, and with
``NVMLLibraryMismatchError``. With an older one, per-process memory on such
a driver is unknown, and the problem says to upgrade."""

TEGRA_RELEASE_PATH = "/etc/nv_tegra_release"
"""Present on NVIDIA Jetson (L4T) systems."""

UNATTRIBUTED = "(unattributed)"
"""The name :attr:`GpuAttribution.unattributed` carries. Worker names cannot
contain parentheses, so it never collides with one."""

# NVML error codes (nvml.h; stable ABI values, also pynvml.NVML_ERROR_*).
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_DRIVER_NOT_LOADED = 9
_TIMEOUT = 10
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_LIB_RM_VERSION_MISMATCH = 18
_UNKNOWN = 999
_MIG_ENABLE = 1

_PROC_INIT_PID_NS_INO = 0xEFFFFFFC  # PROC_PID_INIT_INO: the inode of the initial PID namespace


# ---------------------------------------------------------------------------
# The binding: the subset of pynvml memguard uses


class NvmlBinding(Protocol):
    """The part of the ``pynvml`` module (nvidia-ml-py) memguard calls.

    The ``pynvml`` module itself satisfies it, and so does
    :class:`memguard.testing.nvml.FakeNvml`. Errors are raised as
    ``NVMLError`` (its subclasses carry the code in ``.value``), except a
    missing versioned symbol behind an unversioned wrapper, which pynvml
    raises as ``NVMLLibraryMismatchError``, not an ``NVMLError``.
    ``nvmlDeviceGetMPSComputeRunningProcesses`` may be absent from old
    bindings; it is looked up with ``getattr``, as are the ``_v2``
    process-list variants tried after a mismatch. Error codes are compared
    by their nvml.h values (``NVML_ERROR_GPU_IS_LOST`` = 15, ...), which
    are part of NVML's ABI.
    """

    NVMLError: type[Exception]
    NVMLLibraryMismatchError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]: ...
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int: ...
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any: ...


# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class GpuProblem:
    """Something went wrong reading the GPU this tick.

    ``device`` is the device index (``"1"``, ``"0:2"``), or None when it
    concerns every device (a timeout). ``kind`` is one of ``"lost"`` (the
    GPU fell off the bus or needs a reset), ``"mismatch"`` (driver and
    library versions differ, e.g. a driver upgraded without a reboot, or
    the driver lacks a function memguard needs), ``"timeout"`` (NVML did
    not answer in time) or ``"error"`` (anything else). ``message`` is
    stable while the cause lasts; ``elapsed_s`` (how long a stuck call has
    been stuck) changes every tick and is left out of comparisons.
    """

    device: str | None
    kind: str
    message: str
    elapsed_s: float | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str | None, str, str]:
        """What identifies the problem from one tick to the next: (device, kind, message)."""
        return (self.device, self.kind, self.message)


def new_problems(current: Iterable[GpuProblem], previous: Iterable[GpuProblem]) -> tuple[GpuProblem, ...]:
    """The problems of ``current`` whose :attr:`~GpuProblem.key` is not among ``previous``'s.

    Log these each tick, with ``previous`` the last tick's problems: one
    line when a problem starts, none while it lasts, one again if it comes
    back after a tick without it.
    """
    seen = {p.key for p in previous}
    out: list[GpuProblem] = []
    for p in current:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class GpuDevice:
    """One GPU, or one MIG device, as read in one tick.

    ``index`` is the NVML index as a string (``"0"``), or
    ``"<gpu>:<mig slot>"`` for a MIG device. Figures are bytes, or
    Unknown. ``processes`` maps each pid NVML lists on the device (host
    PIDs) to the GPU memory it uses, or Unknown for a pid NVML gives no
    figure for; the whole mapping is Unknown when the lists could not be
    read.
    """

    index: str
    uuid: Union[str, Unknown]
    name: Union[str, Unknown]
    total_bytes: Reading
    used_bytes: Reading
    free_bytes: Reading
    processes: Union[Mapping[int, Reading], Unknown] = field(default_factory=lambda: MappingProxyType({}))
    mig: bool = False

    @property
    def gpu(self) -> int:
        """The physical GPU's NVML index (the part before ``:`` for a MIG device)."""
        return int(self.index.split(":", 1)[0])

    @property
    def known(self) -> bool:
        """True when the memory figures were read this tick."""
        return is_known(self.total_bytes) and is_known(self.free_bytes)


@dataclass(frozen=True)
class GpuReading:
    """All GPU devices as read in one tick, with what went wrong."""

    devices: tuple[GpuDevice, ...] = ()
    problems: tuple[GpuProblem, ...] = ()

    def device(self, index: Union[int, str]) -> GpuDevice | None:
        """The device with NVML index ``index`` (``0``, ``"0"``, ``"0:1"``), or None."""
        key = str(index)
        for d in self.devices:
            if d.index == key:
                return d
        return None


NO_GPU = GpuReading()
"""The reading when GPU sensing is off: no device, no problem."""


@dataclass(frozen=True)
class GpuStart:
    """The start-up decision: does GPU sensing run, and if not, why.

    ``reason`` is one sentence, empty when enabled (the Jetson sensor puts
    a note on what it can read there). ``devices`` is the first reading's
    devices when enabled. ``jetson`` is True when the machine was
    recognised as a unified-memory Jetson, where GPU allocations come out
    of system RAM.
    """

    enabled: bool
    reason: str = ""
    devices: tuple[GpuDevice, ...] = ()
    jetson: bool = False


@dataclass(frozen=True)
class WorkerGpu:
    """GPU memory used by one worker's process tree (or by no worker).

    ``per_device`` maps device index to bytes on that device (0 on a
    device it does not use), or Unknown; ``total_bytes`` is their sum,
    Unknown when any part is (a device whose process list could not be
    read might hold some of the worker's memory). ``pids`` are the tree's
    pids (as memguard sees them) that NVML lists, in ascending order.
    """

    worker: str
    total_bytes: Reading
    per_device: Mapping[str, Reading] = field(default_factory=lambda: MappingProxyType({}))
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GpuAttribution:
    """:func:`attribute_all`'s answer: each worker's share, and the rest.

    ``unattributed`` (named :data:`UNATTRIBUTED`) holds GPU memory of pids
    that belong to no worker, per device; its ``pids`` are NVML's pids.
    """

    workers: Mapping[str, WorkerGpu]
    unattributed: WorkerGpu


# ---------------------------------------------------------------------------
# Errors become values


def _code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ may call back into the library
        text = ""
    code = _code(exc)
    name = type(exc).__name__
    if not text:
        text = f"NVML error {code}" if code is not None else name
    return f"{name}: {text}" if name not in text else text


def _classify(binding: Any, exc: BaseException) -> str:
    mismatch = getattr(binding, "NVMLLibraryMismatchError", None)
    if isinstance(mismatch, type) and isinstance(exc, mismatch):
        return "mismatch"
    code = _code(exc)
    if code in (_GPU_IS_LOST, _RESET_REQUIRED):
        return "lost"
    if code == _LIB_RM_VERSION_MISMATCH:
        return "mismatch"
    if code == _TIMEOUT:
        return "timeout"
    return "error"


def _handle_failed(binding: Any, index: str, exc: BaseException) -> _DeviceFailed:
    """A failure to get a device handle. Unknown Error (999) there means a GPU gone from the bus."""
    if _code(exc) == _UNKNOWN:
        return _DeviceFailed("lost", f"GPU {index}: NVML answers Unknown Error for the device handle, which is "
                                     "how a GPU that fell off the bus usually shows (the kernel log says "
                                     "'NVRM: Xid 79'); it needs a reset or a reboot")
    return _DeviceFailed(_classify(binding, exc), f"GPU {index}: {_text(exc)}")


def _missing_symbol(binding: Any, exc: BaseException) -> bool:
    """True when ``exc`` says the driver lacks the symbol the binding called."""
    mismatch = getattr(binding, "NVMLLibraryMismatchError", None)
    return (isinstance(mismatch, type) and isinstance(exc, mismatch)) or _code(exc) == _FUNCTION_NOT_FOUND


def _binding_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:
        return "installed"


class _DeviceFailed(Exception):
    """Internal: a call on a device failed; carries the problem."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _unknown_device(index: str, identity: tuple[Union[str, Unknown], Union[str, Unknown]] | None,
                    why: str, mig: bool = False) -> GpuDevice:
    u = Unknown(why)
    uuid, name = identity if identity is not None else (u, u)
    return GpuDevice(index, uuid, name, u, u, u, u, mig)


# ---------------------------------------------------------------------------
# The worker thread


class _CallThread:
    """One daemon thread that runs calls one at a time.

    A daemon thread, so a call stuck forever in the driver cannot keep the
    process from exiting (a ThreadPoolExecutor's threads are joined at exit).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the waiting caller, never lost
                fut.set_exception(e)


# ---------------------------------------------------------------------------
# Sensors: a start-up decision and deadline-bounded reads in one thread


class ThreadedSensor:
    """A GPU sensor whose calls run in one dedicated thread, each bounded by a deadline.

    Subclasses provide :meth:`_start_in_thread` (the start-up decision and
    first reading), :meth:`_read_in_thread` (one reading) and
    :meth:`_shutdown_in_thread`; this class provides the interface the
    daemon uses: :meth:`start`, :meth:`read`, :meth:`read_async`,
    :meth:`close`, :attr:`enabled`. ``source`` names what is read in the
    messages ("NVML", "NvMap"). ``clock`` (monotonic seconds) only measures
    how long a stuck call has been stuck (:attr:`GpuProblem.elapsed_s`).
    """

    source = "the GPU sensor"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 thread_name: str = "memguard-gpu", clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._thread_name = thread_name
        self._thread: _CallThread | None = None
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future | None = None
        self._pending_since = 0.0
        self._started: GpuStart | None = None
        self._abandoned = False
        self._identity: dict[str, tuple[Union[str, Unknown], Union[str, Unknown]]] = {}
        self._indices: tuple[tuple[str, bool], ...] = ()  # (index, mig) of each device of the last sweep

    # -- to provide ---------------------------------------------------------

    def _prepare(self) -> GpuStart | None:
        """A decision taken before any thread starts (e.g. no binding), or None to go on."""
        return None

    def _start_in_thread(self) -> GpuStart:
        raise NotImplementedError

    def _read_in_thread(self) -> GpuReading:
        raise NotImplementedError

    def _shutdown_in_thread(self) -> None:
        pass

    def _classify(self, exc: BaseException) -> str:
        return "error"

    # -- start-up ---------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._started is not None and self._started.enabled

    @property
    def started(self) -> GpuStart | None:
        """What :meth:`start` decided, or None before it ran."""
        return self._started

    def start(self) -> GpuStart:
        """Decide whether GPU sensing runs; never raises. Idempotent."""
        if self._started is not None:
            return self._started
        early = self._prepare()
        if early is not None:
            self._started = early
            return early
        self._thread = _CallThread(self._thread_name)
        fut = self._thread.submit(self._start_in_thread)
        try:
            started = fut.result(timeout=self.start_timeout_s)
        except concurrent.futures.TimeoutError:
            self._abandoned = True  # if start-up finishes after all, it shuts down again
            self._pending, self._pending_since = fut, self.clock()
            started = GpuStart(False, f"{self.source} did not answer within {self.start_timeout_s:g} s at "
                                      "start-up (the first device sweep hung); GPU sensing is off")
        except Exception as e:  # a binding that is broken beyond its own errors
            started = GpuStart(False, f"{self.source} start-up failed: {_text(e)}")
        if not started.enabled:
            self._stop_thread()
        self._started = started
        return started

    # -- reading ----------------------------------------------------------

    def read(self) -> GpuReading:
        """Read every device once, waiting at most ``timeout_s``; never raises.

        Before :meth:`start`, or when sensing is off, the reading is empty.
        """
        fut = self._submit()
        if isinstance(fut, GpuReading):
            return fut
        try:
            return fut.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return self._timed_out()
        except Exception as e:
            return self._failed(e)

    async def read_async(self) -> GpuReading:
        """:meth:`read` for asyncio: the loop keeps running while the call is under way."""
        fut = self._submit()
        if isinstance(fut, GpuReading):
            return fut
        wrapped = asyncio.wrap_future(fut)
        done, _ = await asyncio.wait({wrapped}, timeout=self.timeout_s)
        if not done:
            return self._timed_out()
        try:
            return wrapped.result()
        except Exception as e:
            return self._failed(e)

    def busy(self) -> bool:
        """True while a call from an earlier read (or start) is still under way."""
        with self._lock:
            return self._pending is not None and not self._pending.done()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no call is running; True if idle within ``timeout`` seconds."""
        with self._lock:
            fut = self._pending
        if fut is None:
            return True
        try:
            fut.exception(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:
            pass
        return True

    def close(self) -> None:
        """Shut down (unless a call is stuck) and end the thread. Idempotent."""
        if self._thread is None:
            return
        if not self.busy():
            fut = self._thread.submit(self._shutdown_in_thread)
            try:
                fut.result(timeout=self.timeout_s)
            except Exception:
                pass
        self._stop_thread()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def _submit(self) -> concurrent.futures.Future | GpuReading:
        if not self.enabled or self._thread is None:
            return NO_GPU
        with self._lock:
            pending = self._pending
            if pending is not None and not pending.done():
                return self._timed_out()
            fut = self._thread.submit(self._read_in_thread)
            self._pending, self._pending_since = fut, self.clock()
            return fut

    def _timed_out(self) -> GpuReading:
        # The same message on every tick while the call stays stuck: one problem, not one per tick.
        msg = (f"{self.source} did not answer within {self.timeout_s:g} s; no new call is made until the "
               "stuck one returns")
        waited = round(self.clock() - self._pending_since, 1)
        return GpuReading(self._all_unknown(msg), (GpuProblem(None, "timeout", msg, elapsed_s=waited),))

    def _failed(self, e: BaseException) -> GpuReading:
        msg = f"{self.source} read failed: {_text(e)}"
        return GpuReading(self._all_unknown(msg), (GpuProblem(None, self._classify(e), msg),))

    def _all_unknown(self, why: str) -> tuple[GpuDevice, ...]:
        return tuple(_unknown_device(i, self._identity.get(i), why, mig) for i, mig in self._indices)


NO_NVML_LIBRARY = "the NVML library (libnvidia-ml.so.1) was not found: no NVIDIA driver is installed"
NO_NVML_LIBRARY_JETSON = "this Jetson has no NVML library (libnvidia-ml.so.1), as on JetPack 5 and older"


def _nvml_library_present() -> bool:
    """Can the dynamic loader find libnvidia-ml.so.1, the way pynvml will look for it (one dlopen)?"""
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


class GpuSensor(ThreadedSensor):
    """Reads NVML devices and per-process GPU memory, one dedicated thread, deadlines.

    ``binding`` is an :class:`NvmlBinding`; None imports ``module`` (the
    ``pynvml`` module of nvidia-ml-py) when :meth:`start` runs.
    ``timeout_s`` bounds each :meth:`read`; ``start_timeout_s`` bounds
    :meth:`start`. ``tegra_release_path`` is the file whose presence marks
    a Jetson. ``clock`` is as for :class:`ThreadedSensor`. Call
    :meth:`start` once, then :meth:`read` (or :meth:`read_async`) each
    tick, and :meth:`close` at the end.
    """

    source = "NVML"

    def __init__(self, binding: NvmlBinding | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 tegra_release_path: str = TEGRA_RELEASE_PATH, module: str = "pynvml",
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(timeout_s, start_timeout_s, "memguard-nvml", clock)
        self._binding: Any = binding
        self.tegra_release_path = tegra_release_path
        self.module = module
        self._initialised = False
        # list kind -> the function that works ("..._v2" after a mismatch), or None: the driver has no such list
        self._proc_fn_names: dict[str, str | None] = {}
        self._no_compute_list: str | None = None  # why the compute list cannot be read on this driver
        self._count = 0

    # -- start-up ---------------------------------------------------------

    def _prepare(self) -> GpuStart | None:
        if self._binding is not None:
            return None
        if self.module == "pynvml" and not _nvml_library_present():
            # No driver: the binding (megabytes of a long-running daemon's memory) is not worth importing.
            return self._off_reason(NO_NVML_LIBRARY, NO_NVML_LIBRARY_JETSON)
        try:
            import importlib

            self._binding = importlib.import_module(self.module)
        except ImportError as e:
            why = (f"the NVML Python binding is not installed (no module {self.module!r}; "
                   f"install the nvidia-ml-py package): {e}")
            return self._off_reason(why)
        return None

    def _classify(self, exc: BaseException) -> str:
        return _classify(self._binding, exc)

    def _is_jetson(self) -> bool:
        return bool(self.tegra_release_path) and os.path.exists(self.tegra_release_path)

    def _off_reason(self, why: str, jetson_why: str | None = None) -> GpuStart:
        if self._is_jetson():
            return GpuStart(False, _jetson_reason(jetson_why or f"NVML is not usable here ({why})"), jetson=True)
        return GpuStart(False, why)

    def _start_in_thread(self) -> GpuStart:
        b = self._binding
        try:
            b.nvmlInit()
        except Exception as e:
            code = _code(e)
            jetson_why = None
            if code == _LIBRARY_NOT_FOUND:
                why, jetson_why = NO_NVML_LIBRARY, NO_NVML_LIBRARY_JETSON
            elif code == _DRIVER_NOT_LOADED:
                why = "the NVIDIA driver is not loaded (NVML: Driver Not Loaded)"
            elif code == _LIB_RM_VERSION_MISMATCH or _classify(b, e) == "mismatch":
                why = ("the NVML library and the loaded NVIDIA kernel driver are different versions "
                       "(a driver upgraded without a reboot?)")
            elif code == _NO_PERMISSION:
                why = "no permission to use NVML (the NVIDIA device files are not accessible)"
            else:
                why = f"NVML failed to initialise: {_text(e)}"
            return self._off_reason(why, jetson_why)
        self._initialised = True
        try:
            count = int(b.nvmlDeviceGetCount())
        except Exception as e:
            self._shutdown_in_thread()
            return self._off_reason(f"NVML could not count the GPUs: {_text(e)}")
        if count == 0:
            self._shutdown_in_thread()
            return self._off_reason("NVML found no NVIDIA GPU")
        reading, memory_unsupported = self._sweep(count)
        if memory_unsupported == count:
            self._shutdown_in_thread()
            names = ", ".join(sorted({d.name for d in reading.devices if isinstance(d.name, str)})) or "?"
            return GpuStart(False, _jetson_reason(f"NVML lists the GPU ({names}) but reports no memory "
                                                  "figures for it (nvmlDeviceGetMemoryInfo: Not Supported), "
                                                  "as on JetPack 6 and later"), jetson=True)
        if self._abandoned:
            self._shutdown_in_thread()
            return GpuStart(False, "start-up finished after its deadline; GPU sensing stays off")
        self._count = count
        return GpuStart(True, "", reading.devices, jetson=False)

    def _shutdown_in_thread(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._binding.nvmlShutdown()
            except Exception:
                pass

    def _read_in_thread(self) -> GpuReading:
        return self._sweep(self._count)[0]

    # -- one sweep (runs in the NVML thread) --------------------------------

    def _sweep(self, count: int) -> tuple[GpuReading, int]:
        """Read every device; returns the reading and how many GPUs said memory is Not Supported."""
        devices: list[GpuDevice] = []
        problems: list[GpuProblem] = []
        unsupported = 0
        for i in range(count):
            got, probs, no_memory = self._read_gpu(i)
            devices.extend(got)
            problems.extend(probs)
            unsupported += no_memory
        self._indices = tuple((d.index, d.mig) for d in devices)
        return GpuReading(tuple(devices), tuple(problems)), unsupported

    def _call(self, index: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            raise _DeviceFailed(_classify(self._binding, e), f"GPU {index}: {_text(e)}") from e

    def _read_gpu(self, i: int) -> tuple[list[GpuDevice], list[GpuProblem], bool]:
        b = self._binding
        index = str(i)
        try:
            try:
                handle = b.nvmlDeviceGetHandleByIndex(i)
            except Exception as e:
                raise _handle_failed(b, index, e) from e
            mig = self._mig_enabled(index, handle)
        except _DeviceFailed as f:
            return ([self._failed_device(index, f)], [GpuProblem(index, f.kind, f.message)], False)
        if not mig:
            dev, probs, no_memory = self._read_device(index, handle, mig=False)
            return [dev], probs, no_memory
        devices: list[GpuDevice] = []
        problems: list[GpuProblem] = []
        try:
            slots = int(self._call(index, b.nvmlDeviceGetMaxMigDeviceCount, handle))
        except _DeviceFailed as f:
            return ([self._failed_device(index, f)], [GpuProblem(index, f.kind, f.message)], False)
        no_memory = True
        for slot in range(slots):
            mindex = f"{i}:{slot}"
            try:
                mhandle = b.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except Exception as e:
                if _code(e) == _NOT_FOUND:
                    continue  # an empty MIG slot
                f = _handle_failed(b, mindex, e)
                devices.append(self._failed_device(mindex, f, mig=True))
                problems.append(GpuProblem(mindex, f.kind, f.message))
                no_memory = False
                continue
            dev, probs, unsupported = self._read_device(mindex, mhandle, mig=True)
            devices.append(dev)
            problems.extend(probs)
            no_memory = no_memory and unsupported
        return devices, problems, bool(devices) and no_memory

    def _failed_device(self, index: str, f: _DeviceFailed, mig: bool = False) -> GpuDevice:
        if not mig:
            mig = any(m for i, m in self._indices if i == index)
        return _unknown_device(index, self._identity.get(index), f.message, mig)

    def _mig_enabled(self, index: str, handle: Any) -> bool:
        fn = getattr(self._binding, "nvmlDeviceGetMigMode", None)
        if fn is None:
            return False
        try:
            current = fn(handle)[0]
        except Exception as e:
            kind = _classify(self._binding, e)
            if kind == "lost":
                raise _DeviceFailed(kind, f"GPU {index}: {_text(e)}") from e
            return False  # Not Supported: a GPU without MIG
        return current == _MIG_ENABLE

    def _read_device(self, index: str, handle: Any, mig: bool) -> tuple[GpuDevice, list[GpuProblem], bool]:
        """One GPU or MIG device; returns (device, problems, memory info not supported)."""
        b = self._binding
        problems: list[GpuProblem] = []
        try:
            uuid = _as_str(self._call(index, b.nvmlDeviceGetUUID, handle))
            name = _as_str(self._call(index, b.nvmlDeviceGetName, handle))
            self._identity[index] = (uuid, name)
        except _DeviceFailed as f:
            return self._failed_device(index, f, mig), [GpuProblem(index, f.kind, f.message)], False
        unsupported = False
        try:
            mem = b.nvmlDeviceGetMemoryInfo(handle)
            total, free = int(mem.total), int(mem.free)
            used: Reading = max(0, total - free)
            total_r: Reading = total
            free_r: Reading = free
        except Exception as e:
            if _code(e) == _NOT_SUPPORTED:
                unsupported = True
                u = Unknown(f"GPU {index}: NVML reports no memory figures (Not Supported)")
                total_r = used = free_r = u
            else:
                f = _DeviceFailed(_classify(b, e), f"GPU {index}: {_text(e)}")
                dev = GpuDevice(index, uuid, name, Unknown(f.message), Unknown(f.message), Unknown(f.message),
                                Unknown(f.message), mig)
                return dev, [GpuProblem(index, f.kind, f.message)], False
        processes: Union[Mapping[int, Reading], Unknown]
        try:
            processes = self._processes(index, handle)
        except _DeviceFailed as f:
            processes = Unknown(f.message)
            if f.kind != "unsupported":
                problems.append(GpuProblem(index, f.kind, f.message))
        return GpuDevice(index, uuid, name, total_r, used, free_r, processes, mig), problems, unsupported

    def _list(self, kind: str, index: str, handle: Any) -> list[Any] | None:
        """One process list; None when this binding, driver or device has no such list."""
        b = self._binding
        base = f"nvmlDeviceGet{kind}RunningProcesses"
        if kind == "Compute" and self._no_compute_list is not None:
            raise _DeviceFailed("mismatch", f"GPU {index}: {self._no_compute_list}")
        name = self._proc_fn_names.get(kind, base)
        if name is None:
            return None  # found out earlier: this driver has no such list
        fn = getattr(b, name, None)
        if fn is None:
            return None  # an old binding without this list (MPS)
        try:
            return list(fn(handle))
        except Exception as e:
            if name == base and _missing_symbol(b, e):
                # The unversioned wrapper calls a _v3 symbol this driver lacks (drivers before R510).
                return self._list_v2(kind, base, index, handle)
            return self._list_failed(kind, index, e)

    def _list_v2(self, kind: str, base: str, index: str, handle: Any) -> list[Any] | None:
        b = self._binding
        v2 = getattr(b, base + "_v2", None)
        if v2 is None:
            return self._no_list(kind, index, f"this NVIDIA driver has no {base}_v3 (drivers before R510) and "
                                              f"nvidia-ml-py {_binding_version()} has no _v2 fallback: install "
                                              f"nvidia-ml-py >= {MIN_BINDING_VERSION}; per-process GPU memory "
                                              "is unknown")
        try:
            procs = list(v2(handle))
        except Exception as e:
            if _code(e) == _FUNCTION_NOT_FOUND:
                return self._no_list(kind, index, f"this NVIDIA driver has neither {base}_v3 nor _v2 (a driver "
                                                  "before R450): per-process GPU memory is unknown")
            return self._list_failed(kind, index, e)
        self._proc_fn_names[kind] = base + "_v2"
        return procs

    def _no_list(self, kind: str, index: str, why: str) -> None:
        """The driver has no version of this list memguard can call: absent, or for compute, a problem."""
        if kind != "Compute":
            self._proc_fn_names[kind] = None  # e.g. the MPS list before R495: nothing to read
            return None
        self._no_compute_list = why
        raise _DeviceFailed("mismatch", f"GPU {index}: {why}")

    def _list_failed(self, kind: str, index: str, e: BaseException) -> None:
        code = _code(e)
        if kind != "Compute" and code in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
            return None  # no graphics or MPS list on this device or driver
        if code == _NOT_SUPPORTED:
            raise _DeviceFailed("unsupported", f"GPU {index}: NVML gives no process list (Not Supported)") from e
        raise _DeviceFailed(_classify(self._binding, e), f"GPU {index}: {_text(e)}") from e

    def _processes(self, index: str, handle: Any) -> Mapping[int, Reading]:
        known: dict[int, int] = {}
        unknown: set[int] = set()
        for kind in ("Compute", "Graphics", "MPSCompute"):
            procs = self._list(kind, index, handle)
            for p in procs or ():
                pid = int(p.pid)
                used = getattr(p, "usedGpuMemory", None)
                if used is None:
                    unknown.add(pid)
                else:
                    known[pid] = max(known.get(pid, 0), int(used))
        out: dict[int, Reading] = dict(known)
        for pid in unknown:
            if pid not in out:
                out[pid] = Unknown(f"GPU {index}: NVML gives no memory figure for pid {pid}")
        return MappingProxyType(dict(sorted(out.items())))


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _jetson_reason(detail: str) -> str:
    return (f"{detail}. This is an NVIDIA Jetson or another unified-memory GPU: GPU allocations come out of "
            "system RAM, which the RAM rules (memory.available, PSI) watch, and NVML cannot measure them; GPU "
            "memory sensing through NVML is off (the Jetson sensor reads them from NvMap instead)")


# ---------------------------------------------------------------------------
# PID namespaces


def parse_nspid(status: bytes) -> tuple[int, ...]:
    """The pids of the ``NSpid:`` line of a ``/proc/<pid>/status``; () if absent.

    The first is the pid in the PID namespace of that ``/proc`` mount, the
    last the pid in the process's own (innermost) namespace.
    """
    start = status.find(b"\nNSpid:")
    if start < 0:
        if not status.startswith(b"NSpid:"):
            return ()
        start = -1
    line = status[start + 1:].split(b"\n", 1)[0]
    try:
        return tuple(int(x) for x in line.split()[1:])
    except ValueError:
        return ()


def nspid_map(pids: Iterable[int], proc: str = "/proc") -> dict[int, int]:
    """{outermost visible pid: pid} for each of ``pids`` from the NSpid lines under ``proc``.

    A pid whose status is unreadable (gone) is left out. Note that the
    first NSpid field is the pid in the namespace of the ``proc`` mount
    itself: with the host's ``/proc`` it is the host PID NVML reports;
    with a container's own ``/proc`` the host PID is not visible at all.
    """
    out: dict[int, int] = {}
    for pid in pids:
        try:
            fd = os.open(f"{proc}/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 8192)
            finally:
                os.close(fd)
        except OSError:
            continue
        ns = parse_nspid(data)
        out[ns[0] if ns else pid] = pid
    return out


def in_initial_pid_namespace(proc: str = "/proc") -> bool | None:
    """True when memguard runs in the host's PID namespace; None if that cannot be read."""
    try:
        link = os.readlink(f"{proc}/self/ns/pid")
    except OSError:
        return None
    return link == f"pid:[{_PROC_INIT_PID_NS_INO}]"


def host_pid_map(pids: Iterable[int], proc: str = "/proc") -> Union[Mapping[int, int], None, Unknown]:
    """How to turn NVML's host PIDs into the PIDs memguard's process trees use.

    None: memguard runs in the host's PID namespace, NVML's PIDs are ours
    (the identity). A mapping: ``/proc`` shows outer PIDs (NSpid has more
    than one field), translate through it. Unknown: memguard runs in a
    container's PID namespace whose ``/proc`` hides host PIDs; no worker's
    GPU memory can be attributed (run memguard in the host's PID
    namespace, e.g. ``--pid=host``).
    """
    initial = in_initial_pid_namespace(proc)
    if initial:
        return None
    pids = list(pids)
    try:
        fd = os.open(f"{proc}/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            own = parse_nspid(os.read(fd, 8192))
        finally:
            os.close(fd)
    except OSError:
        own = ()
    if len(own) > 1:
        return nspid_map(pids, proc)
    if initial is None:
        return Unknown(f"cannot tell whether memguard runs in the host's PID namespace ({proc}/self/ns/pid "
                       "is unreadable), and NVML reports host PIDs: per-worker GPU memory is not attributed")
    return Unknown("memguard runs in a PID namespace that cannot see host PIDs, and NVML reports host "
                   "PIDs: per-worker GPU memory cannot be attributed (run memguard in the host's PID "
                   "namespace)")


# ---------------------------------------------------------------------------
# Attribution


def _pids_of(members: Iterable[Any]) -> list[int]:
    out = []
    for m in members:
        out.append(int(m[0]) if isinstance(m, tuple) else int(m))
    return out


def attribute_all(reading: GpuReading, trees: Mapping[str, Iterable[int]],
                  pid_map: Union[Mapping[int, int], None, Unknown] = None) -> GpuAttribution:
    """Each worker's GPU memory, per device and in total, and the memory of no worker.

    ``trees`` maps each worker to the pids of its whole process tree
    (ints, or the ``(pid, start time)`` pairs of
    ``WorkerSample.members``). ``pid_map``
    translates NVML's pids into those pids: None means they are the same;
    with a mapping, an NVML pid not in it belongs to no worker; Unknown
    (from :func:`host_pid_map`) means no pid can be matched, and every
    worker's GPU memory is Unknown with that reason.
    """
    owner: dict[int, str] = {}
    for worker, members in trees.items():
        for pid in _pids_of(members):
            owner.setdefault(pid, worker)
    per: dict[str, dict[str, Reading]] = {w: {} for w in trees}
    pids: dict[str, set[int]] = {w: set() for w in trees}
    loose: dict[str, Reading] = {}
    loose_pids: set[int] = set()
    blind = isinstance(pid_map, Unknown)
    for dev in reading.devices:
        if isinstance(dev.processes, Unknown):
            for w in per:
                per[w][dev.index] = dev.processes
            loose[dev.index] = dev.processes
            continue
        sums: dict[str, Reading] = {w: 0 for w in per}
        rest: Reading = 0
        for nvml_pid, used in dev.processes.items():
            if blind:
                ours = None
            elif pid_map is None:
                ours = nvml_pid
            else:
                ours = pid_map.get(nvml_pid)  # type: ignore[union-attr]
            worker = owner.get(ours) if ours is not None else None
            if worker is None:
                rest = _add(rest, used)
                loose_pids.add(nvml_pid)
            else:
                sums[worker] = _add(sums[worker], used)
                pids[worker].add(ours)  # type: ignore[arg-type]
        for w in per:
            # Blind to host PIDs, a worker's share is unknown wherever some process uses the device.
            per[w][dev.index] = pid_map if blind and dev.processes else sums[w]  # type: ignore[assignment]
        loose[dev.index] = rest
    workers = {w: WorkerGpu(w, _total(per[w].values()), MappingProxyType(per[w]), tuple(sorted(pids[w])))
               for w in per}
    unattributed = WorkerGpu(UNATTRIBUTED, _total(loose.values()), MappingProxyType(loose),
                             tuple(sorted(loose_pids)))
    return GpuAttribution(MappingProxyType(workers), unattributed)


def attribute(reading: GpuReading, trees: Mapping[str, Iterable[int]],
              pid_map: Union[Mapping[int, int], None, Unknown] = None) -> dict[str, WorkerGpu]:
    """{worker: its GPU memory}: :func:`attribute_all` without the unattributed part."""
    return dict(attribute_all(reading, trees, pid_map).workers)


def _add(a: Reading, b: Reading) -> Reading:
    if isinstance(a, Unknown):
        return a
    if isinstance(b, Unknown):
        return b
    return a + b


def _total(values: Iterable[Reading]) -> Reading:
    total: Reading = 0
    for v in values:
        total = _add(total, v)
    return total
