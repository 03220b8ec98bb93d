"""Why did a program die? Its exit status and the last lines it printed.

Two layers:

* :func:`classify_output` and :func:`find_evidence` read text: the lines a
  program wrote last (memguard keeps the tail of each worker's output, and
  ``memguard diagnose --log`` reads any log file). They recognise the
  messages that GPU stacks (CUDA and its libraries, ROCm/HIP, Metal, Vulkan,
  XLA/TPU, TensorRT, ONNX Runtime, CuPy, PyTorch, TensorFlow, JAX, vLLM,
  llama.cpp, NCCL, Jetson's allocator...), host allocators (Python's
  ``MemoryError``, NumPy, C++ ``std::bad_alloc``, Rust, Go, the JVM,
  Node.js, ``ENOMEM``), the kernel's and the schedulers' OOM killers
  (kernel log lines, Kubernetes ``OOMKilled``, Slurm, YARN, Ray, Dask,
  joblib, PyTorch's DataLoader), full disks and time limits print, and
  quote them.
* :func:`diagnose_exit` combines them with the exit status into a
  :class:`Verdict`: the exit code and the signal decide **whether** the
  program failed, the text decides **what kind** of failure it was. An exit
  0 is never a failure; an out-of-memory line in the output of a program that
  exited 0 is reported as information (cause ``none``, the line quoted).

The causes (:data:`CAUSES`) are a documented vocabulary (docs/incidents.md,
"Causes"); scripts rely on their names.

Pure and standard library only: no I/O, no clock, safe to call from the
decision core. Every pattern is precompiled, anchored on literal text and
bounded (no nested unbounded repetition), and each line is cut to
:data:`MAX_LINE_CHARS` before matching, so the cost is linear in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .model import signal_name

__all__ = [
    "CAUSES", "DISK_FULL", "EXIT", "GPU_OOM", "HOST_OOM", "KILLED", "NONE", "TIMEOUT", "UNKNOWN", "STOPPED",
    "Diagnosis", "Verdict", "classify_output", "diagnose_exit", "find_evidence", "format_bytes", "recommend",
    "split_lines",
]

# ----------------------------------------------------------------------------------------------
# The vocabulary

HOST_OOM = "host_oom"
"""Host memory ran out: the kernel's or a cgroup's OOM killer (also as reported by Kubernetes,
Docker, Slurm, YARN, Ray, Dask), or an allocation that failed in the program (``MemoryError``,
``std::bad_alloc``, ``ENOMEM``, a JVM/Go/Rust/Node.js heap)."""
GPU_OOM = "gpu_oom"
"""An accelerator's memory ran out: GPU (CUDA, ROCm, Metal, Vulkan, Jetson), TPU HBM, Apple MPS."""
KILLED = "killed"
"""A signal from outside the program ended it (SIGKILL, SIGTERM, ...) and nothing says why."""
TIMEOUT = "timeout"
"""A time limit ended it: a scheduler's wall-clock limit, a watchdog, a request deadline."""
DISK_FULL = "disk_full"
"""A filesystem was full or over quota (``ENOSPC``, ``EDQUOT``), /dev/shm included."""
EXIT = "exit"
"""It failed (non-zero exit status or a crash signal) and the text names no known cause."""
NONE = "none"
"""No failure: it exited 0 (whatever it printed)."""
UNKNOWN = "unknown"
"""The exit status is not known and the text names no cause (``memguard diagnose --log``)."""
STOPPED = "stopped"
"""memguard stopped it (a rule, a limit, a shutdown, an operator): the event names the rule and the
numbers. Only the daemon uses it; a log read after the fact cannot tell."""

CAUSES = (HOST_OOM, GPU_OOM, KILLED, TIMEOUT, DISK_FULL, EXIT, NONE, UNKNOWN, STOPPED)

QUOTE_CHARS = 300
"""Longest quoted line. PyTorch's message runs to ~500 characters; its first
300 hold the exception, the requested size and the GPU, and a journal field
stays readable."""

MAX_LINE_CHARS = 32 * 1024
"""Longest line examined, in characters: a longer one is cut to its first and last 16 KiB.
Error messages are far shorter; a log that packs a whole traceback into one JSON line keeps
the exception, which comes last."""

EVIDENCE_MAX = 5
"""Most lines a verdict quotes: the deciding one first, then other evidence."""

_LOOKAHEAD = 3
"""Lines after a match searched for the size and GPU index (llama.cpp prints
``current device: 0`` on the next line; NCCL the size of its failed calloc), for
a sign that the program went on (``Skipping batch``), and for joblib's exit codes."""

# Signals by number (Linux). Deaths by these come from elsewhere: a person, a supervisor,
# a scheduler, the kernel. The rest (SIGABRT, SIGSEGV, SIGBUS, ...) the program brings on itself.
_SIGKILL = 9
_EXTERNAL_SIGNALS = {1, 2, 3, 9, 10, 12, 13, 14, 15, 24, 25, 26, 27, 30}
_TIMEOUT_SIGNALS = {14, 24, 26, 27}  # SIGALRM, SIGXCPU, SIGVTALRM, SIGPROF
_SIGXFSZ = 25


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Diagnosis:
    """One line of evidence: what the output says about why the program died.

    ``kind`` is one of :data:`GPU_OOM`, :data:`HOST_OOM`, :data:`DISK_FULL`,
    :data:`TIMEOUT`, :data:`KILLED`; ``source`` the layer that printed it
    (``pytorch``, ``cuda``, ``nccl``, ``jax``, ``kernel``, ``kubernetes``,
    ``slurm``, ``python``...); ``line`` the quoted line, trimmed to
    :data:`QUOTE_CHARS`; ``requested_bytes`` the allocation that failed and
    ``gpu`` the device index, where the message says. ``certain`` is False
    for a kill that is usually the OOM killer but may have come from
    elsewhere (the shell's ``Killed``); ``recovered`` is True when the
    program said it went on (``Skipping batch``, ``Trying batch size 192``);
    ``index`` is the line's position in the split text (:func:`split_lines`);
    ``kill`` is True for a kill for memory by the kernel or a scheduler
    (``OOMKilled``, Slurm's oom-kill events, YARN, Ray, Dask, systemd).
    """

    kind: str
    source: str
    line: str
    requested_bytes: int | None = None
    gpu: int | None = None
    certain: bool = True
    recovered: bool = False
    index: int = -1
    kill: bool = field(default=False, compare=False)

    def describe(self) -> str:
        """One sentence: ``GPU out of memory on GPU 0 (tried to allocate 2.00 GiB), reported by pytorch``."""
        what = _KIND_WORDS.get(self.kind, self.kind)
        if self.kind == HOST_OOM and self.kill:
            what = "killed for lack of host memory"
        elif self.kind == HOST_OOM and not self.certain:
            what = "killed, most likely by the OOM killer"
        if self.gpu is not None:
            what += f" on GPU {self.gpu}"
        if self.requested_bytes is not None:
            what += f" (tried to allocate {format_bytes(self.requested_bytes)})"
        return f"{what}, reported by {self.source}"


_KIND_WORDS = {
    GPU_OOM: "GPU out of memory",
    HOST_OOM: "host out of memory",
    DISK_FULL: "disk full",
    TIMEOUT: "time limit reached",
    KILLED: "killed by a signal",
}


@dataclass(frozen=True)
class Verdict:
    """Why a program ended: the cause, the lines that say so, what to do.

    ``exit_code`` is the exit status when it exited (a shell's or a container
    runtime's 128+N included), ``signal`` the number of the signal that ended
    it (also when only a 128+N or a negative returncode tells), ``limit_bytes``
    the memory limit it ran under when known. ``evidence`` quotes the lines,
    the deciding one first; ``findings`` holds them as :class:`Diagnosis`;
    ``main`` is the deciding finding, None when the status alone decided
    (the evidence is then context: a GPU message before a SIGKILL).
    """

    cause: str
    detail: str
    recommendation: str
    evidence: tuple[str, ...] = ()
    exit_code: int | None = None
    signal: int | None = None
    limit_bytes: int | None = None
    findings: tuple[Diagnosis, ...] = ()
    main: Diagnosis | None = None

    @property
    def failed(self) -> bool:
        return self.cause not in (NONE, UNKNOWN)

    def to_dict(self) -> dict[str, object]:
        """The verdict as JSON-ready data: the documented fields, then what the deciding finding knows."""
        out: dict[str, object] = {
            "cause": self.cause,
            "detail": self.detail,
            "recommendation": self.recommendation,
            "evidence": list(self.evidence),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "signal_name": signal_name(self.signal) if self.signal is not None else None,
            "limit_bytes": self.limit_bytes,
        }
        main = self.main
        if main is not None:
            out["source"] = main.source
            if main.requested_bytes is not None:
                out["requested_bytes"] = main.requested_bytes
            if main.gpu is not None:
                out["gpu"] = main.gpu
        return out


# ----------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class _Rule:
    kind: str | None  # None: decided by _generic_kind (GPU words near the line)
    source: str
    rx: re.Pattern[str]
    certain: bool = True
    kill: bool = False
    anchored: bool = False  # re.match at the line start instead of re.search
    check: Callable[[str, list[str], int], bool] | None = None  # extra condition on (line, lines, index)
    recovered: bool = False  # the message itself says the program went on


def _r(kind: str | None, source: str, rx: str, *, flags: int = 0, **kw: object) -> _Rule:
    return _Rule(kind, source, re.compile(rx, flags), **kw)  # type: ignore[arg-type]


_I = re.IGNORECASE
# Leading junk before an exception name at the start of a line: indentation, exception-group
# bars, pytest's "E", quotes, "(pid=123) " or "(LLMRayActor pid=1) " prefixes.
_LEAD = r"[\s|+\->\"']{0,40}(?:E\s+)?(?:\([^()\n]{0,80}\)\s*)?"
_GPU_WORDS = re.compile(r"cuda|\bgpu|\bhip\b|rocm|vram|vulkan|opencl|\bnccl|cudnn|cublas|\btpu\b|metal|"
                        r"\bxpu\b|\bnpu\b|device memory|on device|\bhbm\b|\bmps\b", _I)


def _after(rx: str, flags: int = _I) -> Callable[[str, list[str], int], bool]:
    """A rule's extra condition: ``rx`` occurs in the line or the few lines after it."""
    pat = re.compile(rx, flags)

    def check(line: str, lines: list[str], i: int) -> bool:
        return any(pat.search(t) for t in lines[i:i + 1 + _LOOKAHEAD])
    return check


def _not_in_line(rx: str, flags: int = _I) -> Callable[[str, list[str], int], bool]:
    pat = re.compile(rx, flags)

    def check(line: str, lines: list[str], i: int) -> bool:
        return pat.search(line) is None
    return check


_GPU_RULES: tuple[_Rule, ...] = (
    # PyTorch (CUDA, ROCm, Intel XPU, Ascend NPU...): "torch.OutOfMemoryError: CUDA out of memory. Tried to
    # allocate 2.00 GiB. GPU 0 has a total capacity of ..." and the older "(GPU 0; 7.79 GiB total capacity; ...)".
    _r(GPU_OOM, "pytorch", r"\b(?:CUDA|HIP|XPU|NPU|MLU|MUSA) out of memory\b", flags=_I),
    _r(GPU_OOM, "mps", r"\bMPS backend out of memory\b"),
    # PyTorch < 1.0 and Lua Torch: "cuda runtime error (2) : out of memory", "THCudaCheck FAIL ... error=2 : out of memory"
    _r(GPU_OOM, "pytorch", r"\bcuda runtime error ?\(2\) ?: ?out of memory", flags=_I),
    _r(GPU_OOM, "pytorch", r"\bTHCudaCheck FAIL file=\S{1,300} line=\d+ error=2 : out of memory"),
    # The CUDA runtime's and driver's words, as PyTorch, llama.cpp, darknet, ONNX Runtime print them
    _r(GPU_OOM, "cuda", r"\bCUDA (?:driver )?error(?: \d+)?(?: at \S{1,300}:\d+)?(?::|\s?\"|\s?') ?out of memory\b", flags=_I),
    _r(GPU_OOM, "cuda", r"\bCUDA failure 2: out of memory\b", flags=_I),
    _r(GPU_OOM, "cuda", r"\bcuda failed with error 2\b", flags=_I),
    _r(GPU_OOM, "cuda", r"\bCUDA_ERROR_OUT_OF_MEMORY\b"),
    _r(GPU_OOM, "cuda", r"\bcudaErrorMemoryAllocation\b"),
    _r(GPU_OOM, "cuda", r"\b(?:cu|cuda|hip)(?:Malloc|MemAlloc|MemCreate|HostAlloc)\w{0,30}[^\n]{0,160}?\bout of memory\b",
       flags=_I),
    # Caffe / glog checks and PaddlePaddle's legacy ones
    _r(GPU_OOM, "caffe", r"\(2 vs\. 0\)\s{1,3}out of memory\b"),
    # CUDA libraries
    _r(GPU_OOM, "cublas", r"\bCUBLAS_STATUS_ALLOC_FAILED\b"),
    _r(GPU_OOM, "cudnn", r"\bCUDNN_STATUS_ALLOC_FAILED\b"),
    _r(GPU_OOM, "cufft", r"\bCUFFT_ALLOC_FAILED\b"),
    _r(GPU_OOM, "cusolver", r"\bCUSOLVER_STATUS_ALLOC_FAILED\b"),
    _r(GPU_OOM, "cusparse", r"\bCUSPARSE_STATUS_ALLOC_FAILED\b"),
    _r(GPU_OOM, "curand", r"\bCURAND_STATUS_ALLOCATION_FAILED\b"),
    # RAPIDS Memory Manager (cuDF, cuML, XGBoost, Spark RAPIDS), often behind MemoryError or Java's OutOfMemoryError:
    # "std::bad_alloc: out_of_memory: RMM failure at:.../pool_memory_resource.hpp:196: Maximum pool size exceeded"
    _r(GPU_OOM, "rmm", r"\bRMM failure at:[^\n]{0,300}?Maximum pool size exceeded\b|\bFAILURE maximum pool size exceeded\b|"
                       r"\brmm::out_of_memory\b"),
    # NCCL: "NCCL WARN Cuda failure 'out of memory'", "NCCL WARN Failed to CUDA calloc 6291456 bytes"
    _r(GPU_OOM, "nccl", r"\bCuda failure(?: \d+)? '?out of memory'?", flags=_I),
    _r(GPU_OOM, "nccl", r"\bNCCL WARN Failed to CUDA calloc \d+ bytes"),
    # ROCm / HIP, MIOpen, rocBLAS
    _r(GPU_OOM, "rocm", r"\bhipErrorOutOfMemory\b|\bHIP_ERROR_OutOfMemory\b"),
    _r(GPU_OOM, "rocm", r"\brocblas_status_memory_error\b|\bmiopenStatusAllocFailed\b"),
    # Vulkan, Level Zero, Unified Runtime (llama.cpp, MLC, SYCL): "VK_ERROR_OUT_OF_DEVICE_MEMORY", "ErrorOutOfDeviceMemory"
    _r(GPU_OOM, "vulkan", r"\b\w{0,20}_ERROR_OUT_OF_DEVICE_MEMORY\b|\bErrorOutOfDeviceMemory\b"),
    _r(GPU_OOM, "vulkan", r"\bggml_vulkan: Device memory allocation of size \d+ failed"),
    _r(GPU_OOM, "opencl", r"\bCL_MEM_OBJECT_ALLOCATION_FAILURE\b"),
    # Apple Metal: "error: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
    _r(GPU_OOM, "metal", r"\bkIOGPUCommandBufferCallbackErrorOutOfMemory\b|\bMTLCommandBufferErrorOutOfMemory\b"),
    # llama.cpp / ggml: "failed to allocate CUDA0 buffer of size 4294967296"
    _r(GPU_OOM, "llama.cpp", r"\b(?:failed|unable) to allocate (?:CUDA|ROCm|HIP|Metal|Vulkan|SYCL|CANN|MUSA)\d* buffer\b"),
    _r(None, "llama.cpp", r"\b(?:failed|unable) to allocate (?:backend buffer|buffer for kv cache)\b"),
    # DirectML (Windows): "Could not allocate tensor with N bytes. There is not enough GPU video memory available!"
    _r(GPU_OOM, "directml", r"\bnot enough GPU video memory available\b"),
    # MLX on Apple silicon: "[metal::malloc] Attempting to allocate N bytes which is greater than the maximum ..."
    _r(GPU_OOM, "mlx", r"\[metal::malloc\] (?:Attempting to allocate|Resource limit)"),
    # Julia's CUDA.jl: "Out of GPU memory trying to allocate 1.234 GiB"
    _r(GPU_OOM, "julia", r"\bOut of GPU memory\b"),
    # TensorRT: "Cuda Error in allocate: 2 (out of memory)", "Error Code 2: OutOfMemory", "Error code 1: cuda Runtime
    # (out of memory)", "OutOfMemory Error in allocate", "Requested amount of GPU memory (N bytes) could not be allocated"
    _r(GPU_OOM, "tensorrt", r"\bCuda Error in [\w:]{0,80}allocate: 2 \(out of memory\)", flags=_I),
    _r(GPU_OOM, "tensorrt", r"\bError Code [12]: (?:Cuda Runtime \()?out ?of ?memory\b", flags=_I),
    _r(GPU_OOM, "tensorrt", r"\bOutOfMemory Error in \w{1,40}\b|\bOut of memory error during getBestTactic\b"),
    _r(GPU_OOM, "tensorrt", r"\bRequested amount of (?:GPU )?memory \(\d+ bytes\) could not be allocated"),
    _r(GPU_OOM, "tensorrt", r"\bSkipping tactic \w+ due to insufficient memory\b", recovered=True),
    # ONNX Runtime's arena: "BFCArena::AllocateRawInternal ... Failed to allocate memory for requested buffer of size N"
    _r(GPU_OOM, "onnxruntime", r"\bFailed to allocate memory for requested buffer of size \d+"),
    # JAX / XLA / TPU: "RESOURCE_EXHAUSTED: Out of memory while trying to allocate N bytes", "Resource exhausted:
    # Failed to allocate request for 32.00MiB (33554432B) on device ordinal 0", "Ran out of memory in memory space hbm"
    _r(GPU_OOM, "xla", r"\bResource[ _]exhausted: (?:Out of memory|Failed to allocate request for)\b", flags=_I),
    # TPU runtime: "Attempting to reserve 12.50G at the bottom of memory. That was not possible."
    _r(GPU_OOM, "xla", r"\bAttempting to (?:reserve|allocate) [\d.]{1,12}[KMGT]?i?B? [^\n]{0,40}?That was not possible\b"),
    _r(GPU_OOM, "xla", r"\bRan out of memory in memory space (?:hbm|vmem|smem|cmem|sflag)\b"),
    # TensorFlow: "ResourceExhaustedError: OOM when allocating tensor with shape[...] ... device:GPU:0" (device:CPU is
    # host memory, below), TF2 eager "failed to allocate memory [Op:AddV2]", the BFC allocator's own report (but not its
    # "The caller indicates that this is not a failure" warning, rejected for every rule).
    _r(GPU_OOM, "tensorflow", r"\bOOM when allocating tensor\b", check=_not_in_line(r"device:CPU|allocator cpu")),
    _r(GPU_OOM, "tensorflow", r"\bfailed to allocate memory \[Op:\w+\]"),
    _r(GPU_OOM, "tensorflow", r"\bAllocator \(GPU_\d+_bfc\) ran out of memory trying to allocate\b"),
    # TensorFlow copying an input to a GPU that has no room left: "... Dst tensor is not initialized."
    _r(GPU_OOM, "tensorflow", r"\bDst tensor is not initialized\b"),
    _r(GPU_OOM, "xla", r"\bFailed to allocate \d+ bytes for new constant\b"),
    # CuPy: "cupy.cuda.memory.OutOfMemoryError: Out of memory allocating 1,073,741,824 bytes (allocated so far: ...)"
    _r(GPU_OOM, "cupy", r"\bOut of memory allocating [\d,]+ bytes \(allocated so far\b", flags=_I),
    _r(GPU_OOM, "cupy", r"\bout of memory to allocate \d+ bytes \(total \d+ bytes\)"),
    # Theano / libgpuarray: "Error allocating 33554432 bytes of device memory (out of memory)"
    _r(GPU_OOM, "theano", r"\bbytes of device memory \(out of memory\)"),
    # PaddlePaddle: "Out of memory error on GPU 0. Cannot allocate 3.125000GB memory on GPU 0"
    _r(GPU_OOM, "paddle", r"\bOut of memory error on GPU \d+"),
    # vLLM, TGI, accelerate: too little GPU memory for the cache, the batch, the model
    _r(GPU_OOM, "vllm", r"\bNo available memory for the cache blocks\b"),
    _r(GPU_OOM, "vllm", r"\bFree memory on device \([^)\n]{1,40}\) on startup is less than desired GPU memory utilization"),
    _r(GPU_OOM, "vllm", r"\bis larger than the maximum number of tokens that can be stored in KV cache\b"),
    _r(GPU_OOM, "vllm", r"\bis larger than the available KV cache memory\b"),
    _r(GPU_OOM, "sglang", r"\bNot enough memory\. Please try to increase --mem-fraction-static\b"),
    _r(GPU_OOM, "tgi", r"\bNot enough memory to handle \d+ (?:prefill|total) tokens\b"),
    _r(GPU_OOM, "accelerate", r"\bNo executable batch size found, reached zero\b"),
    # PyTorch's caching allocator asserts on NVML in its out-of-memory path (Jetson, MIG, some drivers):
    # "NVML_SUCCESS == r INTERNAL ASSERT FAILED at ".../c10/cuda/CUDACachingAllocator.cpp":830"
    _r(GPU_OOM, "pytorch", r"\bNVML_SUCCESS == [^\n]{0,200}?INTERNAL ASSERT FAILED\b"),
    # Jetson's allocator: "NvMapMemAllocInternalTagged: 1075072515 error 12", "NvMapMemHandleAlloc: error 12"
    _r(GPU_OOM, "jetson", r"\bNvMapMem(?:AllocInternalTagged|HandleAlloc)\b[^\n]{0,40}?\berror 12\b"),
    # Triton kernels: "OutOfResources: out of resource: shared memory, Required: 98304, Hardware limit: 65536"
    _r(GPU_OOM, "triton", r"\bout of resource: shared memory\b", flags=_I),
)

_MEMORYERROR_NAME = re.compile(
    _LEAD + r"((?:[A-Za-z_][\w]{0,60}\.){0,6}_?\w{0,30}MemoryError)\b(?!\w)(?=\s*(?::|$|\(|\[))")


_HOST_RULES: tuple[_Rule, ...] = (
    _r(HOST_OOM, "java", r"\bjava\.lang\.OutOfMemoryError\b"),
    _r(HOST_OOM, "python", r"\bCannot recover from MemoryErrors\b"),
    _r(HOST_OOM, "dotnet", r"\bSystem\.OutOfMemoryException\b"),
    _r(HOST_OOM, "julia", r"\bOutOfMemoryError\(\)"),
    _r(HOST_OOM, "ray", r"\bRayTaskError\(OutOfMemoryError\)", check=_not_in_line(r"cuda|gpu|hip")),
    _r(HOST_OOM, "java", r"\bOutOfMemoryError: (?:Java heap space|GC overhead limit exceeded|Metaspace|"
                         r"Requested array size|unable to create (?:new )?native thread|Direct buffer memory)"),
    _r(HOST_OOM, "java", r"\bThere is insufficient memory for the Java Runtime Environment to continue\b"),
    _r(HOST_OOM, "java", r"\bNative memory allocation \((?:malloc|mmap)\) failed\b"),
    # NumPy: "Unable to allocate 7.45 GiB for an array with shape ..." (also behind TF's "Resource exhausted:")
    _r(HOST_OOM, "numpy", r"\bUnable to allocate (?:[\d.]{1,20}\s?[KMGTPE]?i?B for an )?array with shape\b"),
    # C++: "terminate called after throwing an instance of 'std::bad_alloc'", MSVC's "bad allocation"
    _r(HOST_OOM, "c++", r"\bstd::bad_alloc\b"),
    _r(HOST_OOM, "c++", r"\bwhat\(\):\s{1,4}bad allocation\b"),
    _r(HOST_OOM, "paddle", r"\binstance of 'paddle::memory::allocation::BadAlloc'"),
    # Rust (Polars, ...): "memory allocation of 655360 bytes failed"; Arrow's "malloc of size N failed"
    _r(HOST_OOM, "rust", r"\bmemory allocation of \d+ bytes failed\b"),
    _r(HOST_OOM, "pyarrow", r"\b(?:re)?alloc of size \d+ failed\b"),
    # Go: "fatal error: runtime: out of memory", "runtime: VirtualAlloc of N bytes failed with errno=1455"
    _r(HOST_OOM, "go", r"\bfatal error: (?:runtime: )?out of memory\b"),
    _r(HOST_OOM, "go", r"\bruntime: (?:out of memory: cannot allocate|VirtualAlloc of \d+ bytes failed)\b"),
    # ENOMEM from the C library and the kernel: "OSError: [Errno 12] Cannot allocate memory", "fork: Cannot allocate
    # memory", "error='Cannot allocate memory' (errno=12)", PyTorch's "Error code 12 (Cannot allocate memory)"
    _r(HOST_OOM, "libc", r"\[Errno 12\]|\berrno=12\b|\bENOMEM\b|\bError code 12\b"),
    _r(HOST_OOM, "libc", r"\bvirtual memory exhausted\b"),
    _r(HOST_OOM, "libc", r"\bCannot allocate memory\b"),
    # GCC and other obstack users: "cc1plus: out of memory allocating 65536 bytes after a total of 1234 bytes"
    _r(HOST_OOM, "gcc", r"\bout of memory allocating \d+ bytes after a total of\b"),
    # Windows: "The paging file is too small for this operation to complete. (os error 1455)"
    _r(HOST_OOM, "windows", r"\bThe paging file is too small for this operation to complete\b|\bWinError 1455\b"),
    # ollama: "Error: model requires more system memory (12.3 GiB) than is available (8.1 GiB)"
    _r(HOST_OOM, "ollama", r"\brequires more system memory \([^)\n]{1,30}\) than is available\b"),
    # PyTorch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes", and
    # before 1.2 "[enforce fail at CPUAllocator.cpp:56] posix_memalign(&data, gAlignment, nbytes) == 0. 12 vs 0"
    _r(HOST_OOM, "pytorch", r"\bDefaultCPUAllocator: (?:not enough memory|can't allocate memory)"),
    _r(HOST_OOM, "pytorch", r"\bposix_memalign\([^\n]{0,80}?\) == 0\. 12 vs 0\b"),
    # TensorFlow on the CPU
    _r(HOST_OOM, "tensorflow", r"\bOOM when allocating tensor\b[^\n]{0,400}?(?:device:CPU|allocator cpu)"),
    _r(HOST_OOM, "tensorflow", r"\bAllocator \((?:cpu|mklcpu)\) ran out of memory\b"),
    # Node.js, PHP, R
    _r(HOST_OOM, "node", r"\bJavaScript heap out of memory\b"),
    _r(HOST_OOM, "php", r"\bAllowed memory size of \d+ bytes exhausted\b"),
    _r(HOST_OOM, "r", r"\bcannot allocate vector of size\b"),
    _r(HOST_OOM, "ray", r"\bkilled due to the node running low on memory\b", kill=True),
    # Exception lines whose class ends in MemoryError: "MemoryError", "numpy.core._exceptions._ArrayMemoryError: ...",
    # "pyarrow.lib.ArrowMemoryError: malloc of size 128 failed", "ray.memory_monitor.RayOutOfMemoryError: ...",
    # "java.lang.OutOfMemoryError: Java heap space". torch/cupy/jax OutOfMemoryError carry a GPU message (above).
    _Rule(HOST_OOM, "python", _MEMORYERROR_NAME, anchored=True),
    # The kernel's OOM killer, quoted in a job's log (dmesg, journal): "Out of memory: Killed process 2700 (python)",
    # "Memory cgroup out of memory: Killed process", "oom-kill:constraint=CONSTRAINT_MEMCG,..."
    _r(HOST_OOM, "kernel", r"\bout of memory: Kill(?:ed)? process \d+|\bKilled process \d+ \([^)\n]{0,60}\) total-vm:|"
                           r"\boom-kill:constraint=|\binvoked oom-killer\b|\boom_reaper: reaped process\b", flags=_I, kill=True),
    # systemd, systemd-oomd, earlyoom: "Failed with result 'oom-kill'", "A process of this unit has been killed by the
    # OOM killer", "Killed /user.slice/... due to memory pressure", "low memory! at or below SIGTERM limits"
    _r(HOST_OOM, "systemd", r"\bFailed with result 'oom-kill'|\bhas been killed by the OOM killer\b", kill=True),
    _r(HOST_OOM, "systemd", r"\bKilled \S{1,300} due to memory (?:pressure|used)\b", kill=True),
    _r(HOST_OOM, "earlyoom", r"\blow memory! at or below SIG(?:TERM|KILL) limits\b", kill=True),
    # Kubernetes eviction: "The node was low on resource: memory."
    _r(HOST_OOM, "kubernetes", r"\bThe node was low on resource: memory\b", kill=True),
    # Kubernetes and Docker: "Reason: OOMKilled", "STATUS OOMKilled", "OOMKilled": true, Docker 1.4's "OOM Killed"
    _r(HOST_OOM, "kubernetes", r"\bOOM ?Killed\b(?![\"']?\s*:\s*false)", flags=_I, kill=True),
    # Slurm: "Detected 1 oom-kill event(s) in StepId=191.batch", "task 0: Out Of Memory", "Exceeded job memory limit"
    _r(HOST_OOM, "slurm", r"\bDetected \d+ oom[-_]kill events?\b|\btask \d+: Out Of Memory\b", kill=True),
    _r(HOST_OOM, "slurm", r"\bExceeded (?:job|step) memory limit\b", kill=True),
    # YARN (Spark): "Container killed by YARN for exceeding memory limits. 8.2 GB of 8 GB physical memory used"
    _r(HOST_OOM, "yarn", r"\bContainer killed by YARN for exceeding memory limits\b", kill=True),
    _r(HOST_OOM, "yarn", r"\bis running beyond (?:physical|virtual) memory limits\b", kill=True),
    # Ray: "Task was killed due to the node running low on memory", the raylet's "Workers ... killed due to memory
    # pressure (OOM)"
    _r(HOST_OOM, "ray", r"\bkilled due to memory pressure \(OOM\)", kill=True),
    # Dask: "Worker exceeded 95% memory budget. Restarting", "Worker tcp://... (pid=129) exceeded 95% memory budget"
    _r(HOST_OOM, "dask", r"\bexceeded \d+% memory budget\b", kill=True),
    _r(HOST_OOM, "dask", r"\bWorker process \d+ was killed by unknown signal\b", certain=False),
    _r(HOST_OOM, "dask", r"\bKilledWorker\b", certain=False),
    # Spark on Kubernetes: "exited with exit code 137(SIGKILL, possible container OOM)"
    _r(HOST_OOM, "spark", r"\bexit code 137\s?\(SIGKILL, possible container OOM\)", certain=False),
    # joblib/loky: TerminatedWorkerError with "The exit codes of the workers are {SIGKILL(-9)}"
    _r(HOST_OOM, "joblib", r"\bTerminatedWorkerError\b", certain=False, check=_after(r"SIGKILL\(-9\)", 0)),
    # PyTorch's DataLoader: "DataLoader worker (pid 4024) is killed by signal: Killed."
    _r(HOST_OOM, "pytorch", r"\bDataLoader worker \(pids?\(?s?\)? ?[\d, ]{1,80}\) is killed by signal: Killed\b",
       certain=False),
    # The shell's report of a SIGKILLed child: "Killed", "bash: line 1: 8156 Killed   python3 main.py", "zsh: killed",
    # "Killed: 9" (macOS). Usually the OOM killer; a kill from elsewhere reads the same (certain=False).
    _r(HOST_OOM, "shell", r"(?:^|[\\|/\-]|: line \d+:\s+\d+ |\[\d+\][+-]?\s+(?:\d+ )?|zsh: |\s\d+ |\btasks? [\d,\-]{1,40}: )"
                          r"\s*[Kk]illed(?:: 9)?(?:\s{2,}\S|\s*$)",
       certain=False),
)

_DISK_RULES: tuple[_Rule, ...] = (
    _r(DISK_FULL, "disk", r"\bNo space left on (?:the )?device\b", flags=_I),
    _r(DISK_FULL, "disk", r"\[Errno 28\]|\bENOSPC\b|\bkind: StorageFull\b|\bStorageFull\b"),
    _r(DISK_FULL, "disk", r"\bDisk quota exceeded\b|\[Errno 122\]|\bEDQUOT\b", flags=_I),
    _r(DISK_FULL, "disk", r"\bnot enough space on the disk\b|\bdatabase or disk is full\b", flags=_I),
    _r(DISK_FULL, "kubernetes", r"\bThe node was low on resource: ephemeral-storage\b"),
    # Hugging Face datasets: "OSError: Not enough disk space. Needed: 1.20 GiB (download: ...)"
    _r(DISK_FULL, "disk", r"\bNot enough disk space\b", flags=_I),
    # /dev/shm, the shared-memory filesystem PyTorch's DataLoader and NCCL use
    _r(DISK_FULL, "shm", r"\binsufficient shared memory \(shm\)|\bworkers are out of shared memory\b"),
)

_TIMEOUT_EXCEPTIONS = (r"\w{0,30}(?:Timeout|TimedOut)(?:Error|Exception|Expired)?|DeadlineExceeded(?:Error)?|"
                       r"socket\.timeout|(?:Soft)?TimeLimitExceeded")
_TIMEOUT_RULES: tuple[_Rule, ...] = (
    # Schedulers: Slurm "CANCELLED AT ... DUE TO TIME LIMIT", PBS "job killed: walltime 7233 exceeded limit 7200",
    # Moab "job exceeded wallclock limit", LSF "TERM_RUNLIMIT", GitHub Actions, HTCondor/CRAB, Kubernetes Jobs
    _r(TIMEOUT, "slurm", r"\bDUE TO TIME LIMIT\b"),
    _r(TIMEOUT, "pbs", r"\bjob killed: walltime \d+ exceeded limit \d+"),
    _r(TIMEOUT, "pbs", r"\bjob exceeded wall ?clock limit\b", flags=_I),
    _r(TIMEOUT, "lsf", r"\bTERM_RUNLIMIT\b"),
    _r(TIMEOUT, "ci", r"\bhas exceeded the maximum execution time of \d+ minutes\b"),
    _r(TIMEOUT, "htcondor", r"\bdue to wall ?clock limit\b", flags=_I),
    _r(TIMEOUT, "kubernetes", r"\bJob was active longer than specified deadline\b|\breason: DeadlineExceeded\b"),
    _r(TIMEOUT, "sge", r"\bexceeds job (?:hard|soft) limit \"[hs]_rt\""),
    # Watchdogs: PyTorch's NCCL watchdog "Watchdog caught collective operation timeout: WorkNCCL(...) ran for 1802212
    # milliseconds before timing out."
    _r(TIMEOUT, "nccl", r"\bWatchdog caught collective operation timeout\b|\bran for \d+ milliseconds before timing out\b"),
    # Exceptions and requests: "subprocess.TimeoutExpired: Command ... timed out after 30 seconds", "Read timed out.",
    # gRPC "DEADLINE_EXCEEDED"
    _Rule(TIMEOUT, "python", re.compile(_LEAD + r"(?:[A-Za-z_]\w{0,60}\.){0,6}(?:" + _TIMEOUT_EXCEPTIONS + r")\b(?=\s*(?::|$|\())"),
          anchored=True),
    _r(TIMEOUT, "http", r"\b(?:Read|Request|Connection) timed out\b", flags=_I),
    _r(TIMEOUT, "python", r"\btimed out after [\d.]+ ?(?:s|sec|secs|seconds|ms|milliseconds|minutes?)\b", flags=_I),
    _r(TIMEOUT, "pytorch", r"\bTimed out initializing process group\b"),
    _r(TIMEOUT, "ci", r"\bexecution took longer than \S{1,20} seconds\b"),
    _r(TIMEOUT, "grpc", r"\bDEADLINE_EXCEEDED\b|\bDeadline Exceeded\b"),
    _r(TIMEOUT, "shell", r"\bCPU time limit exceeded\b"),
)

_KILLED_RULES: tuple[_Rule, ...] = (
    # A SIGKILL or SIGTERM restated in text, with nothing about memory: an exit status of 137 or 143, "-9",
    # Python's "died with <Signals.SIGKILL: 9>", GNU time's "Command terminated by signal 9", torchrun's
    # "Received 15 death signal", the shell's "Terminated", a DataLoader worker "killed by signal: Terminated".
    _r(KILLED, "shell", r"\bexit(?:ed with)? (?:code|status):? (?:137|143)\b|\bexit code (?:137|143)\b", flags=_I),
    _r(KILLED, "shell", r"\binterrupted by signal (?:9|15)\b|\bterminated by signal (?:9|15)\b", flags=_I),
    _r(KILLED, "python", r"\bdied with <Signals\.SIG(?:KILL|TERM): (?:9|15)>|\bnon-zero exit status (?:137|143|-9|-15)\b"),
    _r(KILLED, "pytorch", r"\bfailed \(exitcode: -(?:9|15)\)|\bSignal (?:9|15) \(SIG(?:KILL|TERM)\) received by PID\b"),
    _r(KILLED, "pytorch", r"\bReceived (?:9|15) death signal\b"),
    _r(KILLED, "systemd", r"\bcode=killed, status=(?:9/KILL|15/TERM)\b"),
    _r(KILLED, "pytorch", r"\bDataLoader worker \([^)\n]{1,80}\) is killed by signal: Terminated\b"),
    _r(KILLED, "shell", r"(?:^|[\\|/\-]|: line \d+:\s+\d+ |\[\d+\][+-]?\s+(?:\d+ )?|zsh: |\s\d+ |\btasks? [\d,\-]{1,40}: )"
                        r"\s*[Tt]erminated(?:\s{2,}\S|\s*$)"),
)

# Out-of-memory words with no framework name: the kind follows the GPU words on the line or the two before it.
_GENERIC_RULES: tuple[_Rule, ...] = (
    _r(None, "generic", r"\b(?:error|fatal|failed|failure|abort(?:ed|ing)?|exception|panic)\b[:\s]{1,3}out of memory\b",
       flags=_I),
    _r(None, "generic", r"[\s>:|\]\[]{0,12}out of memory\b", flags=_I, anchored=True),
    _r(None, "generic", r"\bran out of memory\b", flags=_I),
)

# Rules in order of preference where two match one line (the first wins); across lines the tiers below decide.
_ALL_RULES: tuple[_Rule, ...] = _GPU_RULES + _HOST_RULES + _DISK_RULES + _TIMEOUT_RULES + _KILLED_RULES + _GENERIC_RULES

_PREFILTER = re.compile(
    r"memory|alloc|oom|kill|space|quota|errno|time.?out|timing out|timed out|deadline|time limit|walltime|wall ?clock|"
    r"runlimit|execution time|terminat|signal|exit|exhaust|resource|nvml|nvmap|insufficient|shm|batch size|cache blocks|"
    r"enomem|enospc|edquot|storagefull|memalign|exceed|killed|dst tensor|paging file|took longer", _I)

# A line the program printed as information, not as the failure.
_LINE_REJECT = re.compile(r"this is not a failure|inotify|file watchers", _I)
# Words before the match, in the same clause, that make it advice, a question or a negation:
# "If you encounter CUDA out of memory, try ...", "to avoid out of memory", "no CUDA out of memory errors".
_ADVICE = re.compile(
    r"\b(?:avoid(?:s|ed|ing)?|prevent(?:s|ed|ing)?|if|in case|whether|try|tip|hint|e\.g\.|such as|recommend\w*|"
    r"should|to fix|to reduce|to handle|can cause|may cause|might cause|could cause)\b[^.;!?\n]{0,80}$"
    r"|\b(?:not|no|never|without)\s+(?:\S+\s+)?$", _I)
# Source code, not output: Python/C++ keywords at the start of the line (Jupyter's numbered lines included), or a
# string literal opened after one.
_CODE_LINE = re.compile(r"^\s*(?:-+>\s*)?(?:\d+\s+)?(?:except|raise|catch|throw|if|elif|while|return|assert|def|class|"
                        r"import|from|with|try|print|logger\.\w+|logging\.\w+|log\.\w+)\b")
_CODE_PREFIX = re.compile(r"\b(?:raise|except|print|assert|return|if|elif|while)\b[^\n]{0,60}[\"']\s*$")

# The program said it went on: "Skipping batch", "* Trying batch size 192... Ok", "retrying".
_RECOVERED = re.compile(
    r"\b(?:skipping (?:this |the )?(?:batch|step|iteration|sample|tactic)|skip(?:ped)? (?:this |the )?batch|retrying|"
    r"will retry|trying (?:again|batch size|with (?:a )?smaller)|(?:reducing|decreasing|lowering) (?:the )?batch size|"
    r"halving|falling back|fallback to|recovered)\b", _I)


# ----------------------------------------------------------------------------------------------
# Sizes and GPU indexes

_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50, "eib": 1 << 60,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15, "eb": 10**18,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}

_SIZE = r"(\d+(?:\.\d*)?)\s?([KMGTPE]i?B|[KMGTPE]B|B|bytes?)\b"
_REQUEST_PATTERNS = tuple(re.compile(rx, re.I) for rx in (
    r"\bTried to allocate " + _SIZE,                          # PyTorch ("more than 1EB" is no size: no match)
    r"\btrying to allocate (\d+) (bytes)\b",                  # JAX / XLA
    r"\bOut of memory allocating ([\d,]+) (bytes)\b",         # JAX / XLA, CuPy (with thousands separators)
    r"\bout of memory to allocate (\d+) (bytes)\b",           # CuPy <= 5
    r"\bFailed to allocate request for " + r"(\d+(?:\.\d*)?)(MiB|GiB|KiB|B)\b",  # XLA
    r"\ballocating " + _SIZE + r" on device \d+",            # llama.cpp
    r"\bbuffer of size (\d+)()",                              # ggml, ONNX Runtime "requested buffer of size N"
    r"\bDevice memory allocation of size (\d+)()",            # ggml Vulkan
    r"\bFailed to CUDA calloc (\d+) (bytes)\b",               # NCCL
    r"\bfailed to alloc(?:ate)? [\d.]+\s*\w*\s*\((\d+) (bytes)\)",  # TensorFlow "failed to allocate 2.00G (2147483648 bytes)"
    r"\bfailed to alloc (\d+) (bytes)\b",                     # TensorFlow/XLA stream executor
    r"\bRequested amount of (?:GPU )?memory \((\d+) (bytes)\)",  # TensorRT
    r"\bRequested size was (\d+) (bytes)\b",                  # TensorRT
    r"\bError allocating (\d+) (bytes) of device memory",     # Theano
    r"\bCannot allocate (\d+(?:\.\d*)?)\s?([KMGT]i?B) memory on GPU",  # PaddlePaddle
    r"\bUnable to allocate " + _SIZE,                         # NumPy
    r"\byou tried to allocate (\d+) (bytes)\b",               # PyTorch CPU allocator
    r"\bmemory allocation of (\d+) (bytes) failed\b",         # Rust
    r"\b(?:re)?alloc of size (\d+)() failed\b",               # Arrow
    r"\bVirtualAlloc of (\d+) (bytes) failed\b",              # Go on Windows
    r"\bfailed to allocate (\d+)() bytes\b",                  # Java "Native memory allocation (malloc) failed to allocate N bytes"
    r"\btried to allocate (\d+) (bytes)\b",                   # PHP
))

_GPU_INDEX_PATTERNS = tuple(re.compile(rx) for rx in (
    r"\(GPU (\d+);",                      # PyTorch < 2.1
    r"\bGPU (\d+) has a total capac",     # PyTorch >= 2.1 (older builds spell it "capacty")
    r"\bdevice:GPU:(\d+)",                # TensorFlow
    r"\bon device (?:ordinal )?(\d+)",    # JAX, llama.cpp
    r"\bcurrent device: (\d+)",           # llama.cpp / ggml
    r"\bCUDA(\d+) buffer",                # ggml
    r"\bcuda:(\d+)\b",                    # PyTorch device strings
    r"\bon GPU #?(\d+)\b",                # PaddlePaddle, fairseq
    r"\bGPU=(\d+) ;",                     # ONNX Runtime
    r"\s\[(\d+)\] [\w/.]+:\d+ NCCL WARN",  # NCCL: "host:pid:tid [3] include/alloc.h:178 NCCL WARN"
))

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def format_bytes(n: int) -> str:
    """``2.00 GiB`` for 2147483648."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _requested(text: str) -> int | None:
    for rx in _REQUEST_PATTERNS:
        m = rx.search(text)
        if m is None:
            continue
        number, unit = m.group(1).replace(",", ""), (m.group(2) or "bytes")
        factor = _UNITS.get(unit.lower())
        if factor is None:
            continue
        try:
            return int(float(number) * factor)
        except ValueError:
            continue
    return None


def _gpu_index(text: str) -> int | None:
    for rx in _GPU_INDEX_PATTERNS:
        m = rx.search(text)
        if m is not None:
            return int(m.group(1))
    return None


# ----------------------------------------------------------------------------------------------
# Reading the text


def split_lines(lines: Iterable[str | bytes]) -> list[str]:
    """The text as lines: chunks split at newlines and carriage returns (a progress bar redraws with
    ``\\r``), colour codes removed, bytes decoded as UTF-8, each line cut to :data:`MAX_LINE_CHARS`."""
    out: list[str] = []
    half = MAX_LINE_CHARS // 2
    for chunk in lines:
        if not isinstance(chunk, str):
            chunk = bytes(chunk).decode("utf-8", "replace")
        for line in chunk.splitlines() or [""]:
            if len(line) > MAX_LINE_CHARS:
                line = line[:half] + " … " + line[-half:]
            out.append(_ANSI.sub("", line) if "\x1b" in line else line)
    return out


def _quote(line: str, at: int) -> str:
    stripped = line.strip()
    at = max(0, at - (len(line) - len(line.lstrip())))
    if len(stripped) <= QUOTE_CHARS:
        return stripped
    start = 0 if at < QUOTE_CHARS - 100 else max(0, at - 50)
    head = "…" if start else ""
    return head + stripped[start:start + QUOTE_CHARS - 1 - len(head)].rstrip() + "…"


def _generic_kind(lines: list[str], i: int) -> str:
    window = lines[max(0, i - 2):i + 1]
    return GPU_OOM if any(_GPU_WORDS.search(t) for t in window) else HOST_OOM


def _match_line(line: str, lines: list[str], i: int) -> tuple[_Rule, re.Match[str]] | None:
    """The first rule that matches ``line`` as output (not advice, not source code), with its match."""
    if not _PREFILTER.search(line) or _LINE_REJECT.search(line) or _CODE_LINE.match(line):
        return None
    for rule in _ALL_RULES:
        m = rule.rx.match(line) if rule.anchored else rule.rx.search(line)
        if m is None:
            continue
        prefix = line[max(0, m.start() - 120):m.start()]
        if _ADVICE.search(prefix) or _CODE_PREFIX.search(prefix):
            continue
        if rule.check is not None and not rule.check(line, lines, i):
            continue
        return rule, m
    return None


def _name_kind(name: str, line: str) -> str:
    """The kind of an exception whose name ends in MemoryError: GPU for the GPU frameworks' own classes
    (their message says CUDA/HIP anyway), host for the rest."""
    low = name.lower()
    if low.startswith(("torch.", "cupy.", "jax")) or _GPU_WORDS.search(line):
        return GPU_OOM
    return HOST_OOM


def _name_source(name: str, default: str) -> str:
    low = name.lower()
    for prefix, source in (("torch.", "pytorch"), ("cupy.", "cupy"), ("jax", "xla"), ("numpy.", "numpy"),
                           ("pyarrow.", "pyarrow"), ("ray.", "ray"), ("java.", "java")):
        if low.startswith(prefix):
            return source
    return default


def find_evidence(lines: Sequence[str | bytes]) -> list[Diagnosis]:
    """Every line of the output that says why a program died, in order, at most one finding per line.

    Findings marked ``recovered`` are out-of-memory messages the program went on after
    (``Skipping batch``); :func:`classify_output` and :func:`diagnose_exit` do not count
    them as the cause of a failure.
    """
    text = split_lines(lines)
    found: list[Diagnosis] = []
    for i, line in enumerate(text):
        hit = _match_line(line, text, i)
        if hit is None:
            continue
        rule, m = hit
        kind, source = rule.kind, rule.source
        if kind is None:
            kind = _generic_kind(text, i)
        elif rule.rx is _MEMORYERROR_NAME:
            kind, source = _name_kind(m.group(1), line), _name_source(m.group(1), rule.source)
        window = "\n".join(text[i:i + 1 + _LOOKAHEAD])
        requested = gpu = None
        if kind in (GPU_OOM, HOST_OOM):
            requested = _requested(line)
            if requested is None:
                requested = _requested(window)
        if kind == GPU_OOM:
            gpu = _gpu_index(line)
            if gpu is None:
                gpu = _gpu_index(window)
        recovered = rule.recovered or (kind in (GPU_OOM, HOST_OOM) and not rule.kill and (
            _RECOVERED.search(line) is not None
            or any(_RECOVERED.search(t) for t in text[i + 1:i + 3])))
        found.append(Diagnosis(kind, source, _quote(line, m.start()), requested, gpu,
                               certain=rule.certain, recovered=recovered, index=i, kill=rule.kill))
    return found


def _tier(d: Diagnosis) -> int:
    """Which finding names the cause when several kinds appear (lower wins): a kill for memory
    by the kernel or a scheduler ends the program whatever it printed before; a GPU
    out-of-memory wins over a host allocation failure in its error path; memory before disk,
    disk before time limits, and a bare kill last."""
    if d.kind == HOST_OOM and d.kill:
        return 0
    if d.kind == GPU_OOM:
        return 1
    if d.kind == HOST_OOM and d.certain:
        return 2
    if d.kind == DISK_FULL:
        return 3
    if d.kind == TIMEOUT:
        return 4
    if d.kind == HOST_OOM:
        return 5
    return 6


def _best(findings: Iterable[Diagnosis]) -> Diagnosis | None:
    """The deciding finding: the best tier, then the one that says most (size, GPU), then the latest."""
    best: tuple[int, int, int, Diagnosis] | None = None
    for d in findings:
        key = (-_tier(d), (d.requested_bytes is not None) + (d.gpu is not None), d.index)
        if best is None or key >= best[:3]:
            best = (*key, d)
    return best[3] if best is not None else None


def classify_output(lines: Sequence[str | bytes]) -> Diagnosis | None:
    """Why the output says the program died, or None: the deciding finding among
    :func:`find_evidence`'s, recovered ones left out.

    Its ``kind`` is one of ``gpu_oom``, ``host_oom``, ``disk_full``, ``timeout``, ``killed``.
    A kill for memory (kernel, Kubernetes, Slurm, YARN, Ray, Dask) wins over a GPU message, a
    GPU out-of-memory over a host one, memory over a full disk, a full disk over a time limit.
    Among findings of one tier, the one that gives the requested size and GPU index wins, then
    the latest. The size and GPU index are looked for in the matching line and the few after it.
    """
    return _best(d for d in find_evidence(lines) if not d.recovered)


# ----------------------------------------------------------------------------------------------
# Exit status + text


def _status(returncode: int | None, sig: int | None) -> tuple[int | None, int | None, bool]:
    """(exit_code, signal, via_128): a negative returncode is a signal (Python's convention), a
    returncode above 128 whose remainder is a signal number is how shells and container runtimes
    report a death by that signal."""
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    if sig is not None:
        return exit_code, sig, False
    if returncode is not None and returncode < 0:
        return None, -returncode, False
    if returncode is not None and 128 < returncode <= 128 + 64:
        return exit_code, returncode - 128, True
    return exit_code, None, False


def _status_words(exit_code: int | None, sig: int | None, via_128: bool) -> str:
    if sig is not None and via_128 and exit_code is not None:
        return f"exit {exit_code} = 128 + {signal_name(sig)}"
    if sig is not None:
        return f"ended by {signal_name(sig)}"
    if exit_code is not None:
        return f"exit {exit_code}"
    return "exit status unknown"


def _evidence(main: Diagnosis | None, findings: Sequence[Diagnosis]) -> tuple[tuple[str, ...], tuple[Diagnosis, ...]]:
    ordered: list[Diagnosis] = [main] if main is not None else []
    for d in reversed(findings):  # the latest context first
        if len(ordered) >= EVIDENCE_MAX:
            break
        if d is not main and all(d.line != o.line for o in ordered):
            ordered.append(d)
    return tuple(d.line for d in ordered), tuple(ordered)


def diagnose_exit(returncode: int | None, signal: int | None, lines: Sequence[str | bytes], *,
                  kernel_oom: bool | None = None, limit_bytes: int | None = None) -> Verdict:
    """Why a program ended, from its exit status and its last lines of output.

    ``returncode`` is the exit status (negative for a signal, as Python's subprocess reports
    it; 128+N as shells and container runtimes report a death by signal N), ``signal`` the
    signal that ended it where the caller knows it; both None when unknown (a log file read
    after the fact). ``kernel_oom`` says whether the kernel's OOM killer killed it (True),
    certainly did not (False: memguard watched the scope's OOM counter), or is not known
    (None). ``limit_bytes`` is the memory limit it ran under, quoted in the advice.

    The status decides whether it failed: an exit 0 is never a failure (cause ``none``; an
    out-of-memory line it printed is quoted as information). Then:

    * killed by the kernel's OOM killer: ``host_oom``;
    * SIGKILL (or 137): ``host_oom`` where the text shows a host memory death, ``timeout``
      where it shows a time limit, else ``killed`` (a GPU message does not explain a SIGKILL:
      it is quoted as context);
    * SIGALRM, SIGXCPU: ``timeout``; SIGXFSZ: ``disk_full`` (the file size limit);
    * another signal from elsewhere (SIGTERM, SIGINT, SIGHUP...): the text's kind, else ``killed``;
    * a crash (SIGABRT, SIGSEGV, SIGBUS...) or a non-zero exit: the text's kind, else ``exit``.

    A shell's ``Killed`` is taken for the OOM killer unless ``kernel_oom`` is False, when it
    is a kill from elsewhere.
    """
    exit_code, sig, via_128 = _status(returncode, signal)
    findings = find_evidence(lines)
    failing = [d for d in findings if not d.recovered]
    status = _status_words(exit_code, sig, via_128)

    def verdict(cause: str, main: Diagnosis | None, detail: str) -> Verdict:
        evidence, ordered = _evidence(main, failing if cause != NONE else findings)
        return Verdict(cause, detail, recommend(cause, main, sig=sig, limit_bytes=limit_bytes, kernel_oom=kernel_oom),
                       evidence, exit_code, sig, limit_bytes, ordered, main)

    if returncode == 0 and signal is None:
        ooms = [d for d in findings if d.kind in (GPU_OOM, HOST_OOM)]
        main = _best(ooms)
        if main is not None:
            return verdict(NONE, main, f"exited 0: it went on after an out-of-memory message: {main.describe()}")
        return verdict(NONE, None, "exited 0")

    if kernel_oom:
        kills = [d for d in failing if d.kind == HOST_OOM]
        main = _best(kills)
        detail = "killed by the kernel's OOM killer" + _at_limit(limit_bytes)
        if any(d.kind == GPU_OOM for d in failing):
            detail += "; it had printed a GPU out-of-memory message before (quoted as context)"
        return verdict(HOST_OOM, main, f"{detail}; {status}")

    if returncode is None and signal is None:
        main = _best(failing)
        if main is None:
            return verdict(UNKNOWN, None, "the text names no cause and the exit status is unknown")
        return verdict(main.kind, main, main.describe())

    def host_ok(d: Diagnosis) -> bool:
        return d.kind == HOST_OOM and (d.certain or kernel_oom is not False)

    if sig is not None and sig in _TIMEOUT_SIGNALS:
        main = _best(d for d in failing if d.kind == TIMEOUT)
        return verdict(TIMEOUT, main, f"ended by {signal_name(sig)}, the signal of a time limit; {status}")
    if sig == _SIGXFSZ:
        return verdict(DISK_FULL, _best(d for d in failing if d.kind == DISK_FULL),
                       f"ended by SIGXFSZ: a file outgrew the file size limit (ulimit -f); {status}")
    if sig == _SIGKILL:
        main = _best(d for d in failing if host_ok(d) or d.kind == TIMEOUT)
        if main is not None:
            return verdict(main.kind, main, f"{main.describe()}; {status}")
        ctx = ", after a GPU out-of-memory message quoted as context" if any(
            d.kind == GPU_OOM for d in failing) else ""
        return verdict(KILLED, _best(d for d in failing if d.kind == KILLED),
                       f"killed by SIGKILL from outside the program{ctx}; {status}")
    if sig is not None and sig in _EXTERNAL_SIGNALS:
        main = _best(d for d in failing if d.kind != HOST_OOM or host_ok(d))
        if main is not None and main.kind != KILLED:
            return verdict(main.kind, main, f"{main.describe()}; then {status}")
        return verdict(KILLED, main, f"ended by {signal_name(sig)}, sent from outside the program; {status}")

    # A crash signal or a non-zero exit: the text says what kind of failure it was.
    main = _best(d for d in failing if d.kind != HOST_OOM or host_ok(d))
    if main is None:
        weak = _best(d for d in failing if d.kind == HOST_OOM)
        if weak is not None:  # a "Killed" while kernel_oom is False: a kill from elsewhere
            return verdict(KILLED, weak, f"a process was killed, not by the kernel's OOM killer; {status}")
        what = f"crashed with {signal_name(sig)}" if sig is not None else "failed"
        return verdict(EXIT, None, f"{what}; {status}; the output names no known cause")
    return verdict(main.kind, main, f"{main.describe()}; {status}")


def _at_limit(limit_bytes: int | None) -> str:
    return f" at its memory limit of {format_bytes(limit_bytes)}" if limit_bytes else ""


# ----------------------------------------------------------------------------------------------
# Advice

_GPU_HINTS = {
    "vllm": "For vLLM, lower max_model_len or max_num_seqs, raise gpu_memory_utilization if the GPU is not shared, "
            "or use more GPUs (tensor_parallel_size).",
    "tgi": "For text-generation-inference, lower --max-batch-prefill-tokens and --max-total-tokens.",
    "tensorrt": "For TensorRT, lower the builder's workspace (setMemoryPoolLimit / --workspace) and build with fp16 "
                "or int8.",
    "triton": "This is the GPU's per-block shared memory, not its global memory: reduce the kernel's block sizes or "
              "num_stages.",
    "xla": "For JAX/XLA, reduce the batch or shard the model; XLA_PYTHON_CLIENT_MEM_FRACTION and "
           "XLA_PYTHON_CLIENT_PREALLOCATE=false control how much GPU memory JAX takes up front.",
    "mps": "On Apple silicon the GPU shares RAM: close other programs; PYTORCH_MPS_HIGH_WATERMARK_RATIO moves the "
           "limit (at the risk of system instability).",
    "jetson": "On Jetson the GPU shares RAM with the CPU: free host memory (other processes, page cache) before "
              "loading the model.",
    "llama.cpp": "For llama.cpp/ollama, offload fewer layers to the GPU (-ngl) or use a smaller context (-c).",
    "nccl": "NCCL could not get GPU memory for its buffers: leave headroom next to the model (NCCL_BUFFSIZE).",
    "accelerate": "accelerate halved the batch size down to zero: even batch size 1 does not fit.",
}

_HOST_HINTS = {
    "java": "For the JVM, raise the heap (-Xmx) or the container's memory.",
    "node": "For Node.js, raise --max-old-space-size.",
    "dask": "For Dask, give workers more memory (--memory-limit) or fewer threads, or use smaller partitions.",
    "ray": "For Ray, request more memory per task (memory=...) or lower the parallelism.",
    "yarn": "For Spark on YARN, raise spark.executor.memoryOverhead or spark.executor.memory.",
    "pytorch": "For PyTorch's DataLoader, use fewer workers (num_workers) or smaller prefetch_factor.",
    "joblib": "For joblib, use fewer workers (n_jobs) or pass memory-mapped data.",
    "kubernetes": "Raise the pod's memory limit (resources.limits.memory).",
    "slurm": "Request more memory for the job (--mem or --mem-per-cpu).",
}


def recommend(cause: str, main: Diagnosis | None = None, *, sig: int | None = None, limit_bytes: int | None = None,
              kernel_oom: bool | None = None) -> str:
    """What to do about a cause: the seed table of docs/incidents.md, with a hint for the layer that spoke."""
    source = main.source if main is not None else ""
    if cause == HOST_OOM:
        limit = f" (now {format_bytes(limit_bytes)})" if limit_bytes else ""
        text = (f"Raise the memory limit{limit} or make the job hold less: a smaller batch size, fewer data-loading "
                "workers, data streamed instead of loaded whole.")
        if main is not None and not main.certain and kernel_oom is None:
            text += (" The kill itself does not name its sender: the kernel's OOM killer says so in its log "
                     "(dmesg | grep -i 'killed process').")
        hint = _HOST_HINTS.get(source)
        return f"{text} {hint}" if hint else text
    if cause == GPU_OOM:
        text = ("Reduce the batch size (or sequence length), use mixed precision (bf16/fp16) and gradient "
                "checkpointing; with PyTorch, set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against "
                "fragmentation; check that no other process holds the GPU (nvidia-smi).")
        hint = _GPU_HINTS.get(source)
        return f"{hint} {text}" if hint else text
    if cause == DISK_FULL:
        if source == "shm" or (main is not None and "/torch_" in main.line):
            return ("/dev/shm is full: raise the container's shared memory (docker run --shm-size, a Kubernetes "
                    "emptyDir with medium: Memory) or use fewer DataLoader workers.")
        return ("Free space on the filesystem the job writes to (checkpoints, caches such as ~/.cache/huggingface, "
                "/tmp, /dev/shm): find it with df -h and du; over a quota, quota -s shows the limit.")
    if cause == TIMEOUT:
        if source == "nccl":
            return ("A collective operation waited past its timeout: one rank stalled or died (look for its own "
                    "error, often an out-of-memory), or raise the process group's timeout.")
        return ("The job ran past a time limit: raise the limit (the scheduler's wall time, the request timeout) "
                "or checkpoint and resume in shorter runs.")
    if cause == KILLED:
        if sig == _SIGKILL or sig is None:
            return ("Find who sent the kill: the kernel's OOM killer outside memguard's view (dmesg | grep -i "
                    "'killed process'), a container runtime (docker kill, an OOMKilled or evicted pod), a "
                    "scheduler's preemption or time limit, or a person.")
        return (f"{signal_name(sig)} is a request to stop: a container runtime (docker stop), systemd, a scheduler's "
                "preemption or time limit, or a shutdown sent it.")
    if cause == EXIT:
        return "Read the last lines of the output (the traceback or error message) for the failure."
    if cause == UNKNOWN:
        return "Give the exit status (--exit-code, --signal) to know whether it failed."
    if main is not None:
        return ("No action needed: it recovered from an out-of-memory error. If it happens often, a smaller batch "
                "size saves the retries.")
    return ""
