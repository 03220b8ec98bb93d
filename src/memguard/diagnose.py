"""Why did a worker die? Out-of-memory messages in its last lines of output.

:func:`classify_output` scans the lines a worker wrote last (memguard
keeps the tail of each worker's output) for the messages that CUDA, its
libraries and the ML frameworks print when GPU memory runs out, and for
Python's ``MemoryError`` on the host side. It returns a
:class:`Diagnosis` quoting the line, with the requested size and the GPU
index where the message gives them, or None.

A GPU out-of-memory message wins over a host-side one: a process that
failed a CUDA allocation often fails a host allocation in its error path
too, and the GPU message is the cause.

Pure and standard library only: no I/O, no clock, safe to call from the
decision core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["GPU_OOM", "HOST_OOM_PYTHON", "Diagnosis", "classify_output", "format_bytes"]

GPU_OOM = "gpu_oom"
HOST_OOM_PYTHON = "host_oom_python"

QUOTE_CHARS = 300
"""Longest quoted line. PyTorch's message runs to ~500 characters; its first
300 hold the exception, the requested size and the GPU, and a journal field
stays readable."""

_LOOKAHEAD = 3
"""Lines after the match searched for the size and GPU index (llama.cpp prints
``current device: 0`` on the next line; NCCL the size of its failed calloc)."""

# (source, pattern). Order only breaks ties between patterns matching the same line.
_GPU_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (src, re.compile(rx)) for src, rx in (
        # PyTorch: "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ..."
        # and the older "RuntimeError: CUDA out of memory. Tried to allocate ... (GPU 0; ...)". ROCm says HIP.
        ("pytorch", r"\b(?:CUDA|HIP) out of memory\b"),
        # llama.cpp / ggml
        ("llama.cpp", r"\bcudaMalloc failed: out of memory\b"),
        ("llama.cpp", r"\bfailed to allocate CUDA\d+ buffer of size \d+"),
        # CUDA runtime / driver API, as PyTorch, llama.cpp and others print them
        ("cuda", r"\bCUDA error: out of memory\b"),
        ("cuda", r"\bCUDA_ERROR_OUT_OF_MEMORY\b"),
        ("cuda", r"\bcudaErrorMemoryAllocation\b"),
        ("cuda", r"\bcudaMalloc\w*\(.*\)\s*(?:returned|failed:?)\s*out of memory\b"),
        # CUDA libraries
        ("cublas", r"\bCUBLAS_STATUS_ALLOC_FAILED\b"),
        ("cudnn", r"\bCUDNN_STATUS_ALLOC_FAILED\b"),
        ("cufft", r"\bCUFFT_ALLOC_FAILED\b"),
        ("cusolver", r"\bCUSOLVER_STATUS_ALLOC_FAILED\b"),
        ("cusparse", r"\bCUSPARSE_STATUS_ALLOC_FAILED\b"),
        # NCCL: "[3] include/alloc.h:178 NCCL WARN Cuda failure 'out of memory'"
        ("nccl", r"\bNCCL WARN Cuda failure(?: \d+)? 'out of memory'"),
        ("nccl", r"\bNCCL WARN Failed to CUDA calloc \d+ bytes"),
        # JAX / XLA: "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 7406166528 bytes."
        ("jax", r"\bRESOURCE_EXHAUSTED: Out of memory\b"),
        ("jax", r"\bResource exhausted: Out of memory while trying to allocate\b"),
        # TensorFlow: "ResourceExhaustedError: OOM when allocating tensor with shape[...] ... device:GPU:0"
        ("tensorflow", r"\bOOM when allocating tensor\b(?!.*device:CPU)"),
        # Apple's backend, for completeness: "MPS backend out of memory"
        ("mps", r"\bMPS backend out of memory\b"),
        # NVIDIA Jetson (unified memory): NvMap refusing an allocation with ENOMEM (12), as the CUDA driver logs
        # it: "NvMapMemAllocInternalTagged: 1075072515 error 12", "NvMapMemHandleAlloc: error 12".
        ("jetson", r"\bNvMapMemAllocInternalTagged: \d+ error 12\b"),
        ("jetson", r"\bNvMapMemHandleAlloc: error 12\b"),
        # PyTorch on Jetson: a failed cudaMalloc leads its out-of-memory report to NVML, whose memory queries are
        # Not Supported there, and an assertion fires in place of OutOfMemoryError:
        # 'RuntimeError: NVML_SUCCESS == r INTERNAL ASSERT FAILED at "../c10/cuda/CUDACachingAllocator.cpp":995'
        ("pytorch", r"\bNVML_SUCCESS == r INTERNAL ASSERT FAILED at \"[^\"]*CUDACachingAllocator\.cpp\""),
    )
)

_HOST_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (src, re.compile(rx)) for src, rx in (
        # The exception line of a traceback: "MemoryError", "MemoryError: ...",
        # "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 7.45 GiB ...",
        # possibly inside an exception group ("  | MemoryError") or behind a "(pid=123) " prefix.
        ("python", r"^[\s|+\-]*(?:\([^)]*\)\s*)?(?:[A-Za-z_][\w.]*\.)?_?(?:Array)?MemoryError\b(?!\w)"),
        ("pytorch", r"\bDefaultCPUAllocator: (?:not enough memory|can't allocate memory)"),
        ("tensorflow", r"\bOOM when allocating tensor\b.*device:CPU"),
        ("c++", r"\bstd::bad_alloc\b"),
    )
)

_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50, "eib": 1 << 60,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15, "eb": 10**18,
}

_SIZE = r"(\d+(?:\.\d+)?)\s*([KMGTPE]i?B|[KMGTPE]B|B|bytes?)\b"
_REQUEST_PATTERNS = tuple(re.compile(rx, re.I) for rx in (
    r"\bTried to allocate " + _SIZE,                          # PyTorch ("more than 1EB" is no size: no match)
    r"\btrying to allocate (\d+) (bytes)\b",                  # JAX / XLA
    r"\bOut of memory allocating (\d+) (bytes)\b",            # JAX / XLA
    r"\ballocating " + _SIZE + r" on device \d+",            # llama.cpp
    r"\bbuffer of size (\d+)()",                              # ggml: "failed to allocate CUDA0 buffer of size N"
    r"\bFailed to CUDA calloc (\d+) (bytes)\b",               # NCCL
    r"\bfailed to alloc(?:ate)? [\d.]+\s*\w*\s*\((\d+) (bytes)\)",  # TensorFlow "failed to allocate 2.00G (2147483648 bytes)"
    r"\bfailed to alloc (\d+) (bytes)\b",                     # TensorFlow/XLA stream executor
    r"\bUnable to allocate " + _SIZE,                         # NumPy
    r"\byou tried to allocate (\d+) (bytes)\b",               # PyTorch CPU allocator
))

_GPU_INDEX_PATTERNS = tuple(re.compile(rx) for rx in (
    r"\(GPU (\d+);",                      # PyTorch < 2.1
    r"\bGPU (\d+) has a total capac",     # PyTorch >= 2.1 (older builds spell it "capacty")
    r"\bdevice:GPU:(\d+)",                # TensorFlow
    r"\bon device (?:ordinal )?(\d+)",    # JAX, llama.cpp
    r"\bcurrent device: (\d+)",           # llama.cpp / ggml
    r"\bCUDA(\d+) buffer",                # ggml
    r"\bcuda:(\d+)\b",                    # PyTorch device strings
    r"\s\[(\d+)\] [\w/.]+:\d+ NCCL WARN",  # NCCL: "host:pid:tid [3] include/alloc.h:178 NCCL WARN"
))

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class Diagnosis:
    """What a worker's output says about why it died.

    ``kind`` is :data:`GPU_OOM` or :data:`HOST_OOM_PYTHON`; ``source`` the
    layer that printed it (``pytorch``, ``cuda``, ``cublas``, ``cudnn``,
    ``nccl``, ``jax``, ``tensorflow``, ``llama.cpp``, ``python``...);
    ``line`` the quoted line, trimmed to :data:`QUOTE_CHARS`;
    ``requested_bytes`` the allocation that failed and ``gpu`` the device
    index, where the message says.
    """

    kind: str
    source: str
    line: str
    requested_bytes: int | None = None
    gpu: int | None = None

    def describe(self) -> str:
        """One sentence: ``GPU out of memory on GPU 0 (tried to allocate 2.00 GiB), reported by pytorch``."""
        what = "GPU out of memory" if self.kind == GPU_OOM else "host out of memory (Python MemoryError)"
        if self.gpu is not None:
            what += f" on GPU {self.gpu}"
        if self.requested_bytes is not None:
            what += f" (tried to allocate {format_bytes(self.requested_bytes)})"
        return f"{what}, reported by {self.source}"


def format_bytes(n: int) -> str:
    """``2.00 GiB`` for 2147483648."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _split(lines: Iterable[str]) -> list[str]:
    out: list[str] = []
    for chunk in lines:
        if not isinstance(chunk, str):
            chunk = bytes(chunk).decode("utf-8", "replace")
        for line in chunk.splitlines() or [""]:
            # A progress bar redraws with \r: splitlines() splits there too, so each redraw is its own line.
            out.append(_ANSI.sub("", line))
    return out


def _requested(text: str) -> int | None:
    for rx in _REQUEST_PATTERNS:
        m = rx.search(text)
        if m is None:
            continue
        number, unit = m.group(1), (m.group(2) or "bytes")
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


def _quote(line: str, at: int) -> str:
    line = line.strip()
    if len(line) <= QUOTE_CHARS:
        return line
    start = 0 if at < QUOTE_CHARS - 100 else max(0, at - 50)
    head = "…" if start else ""
    return head + line[start:start + QUOTE_CHARS - 1 - len(head)].rstrip() + "…"


def _first_match(line: str, patterns: Sequence[tuple[str, re.Pattern[str]]]) -> tuple[str, int] | None:
    best: tuple[str, int] | None = None
    for source, rx in patterns:
        m = rx.search(line)
        if m is not None and (best is None or m.start() < best[1]):
            best = (source, m.start())
    return best


def classify_output(lines: Sequence[str]) -> Diagnosis | None:
    """The out-of-memory message in a worker's last output lines, or None.

    Any GPU out-of-memory message wins over a host-side one. Among several
    matches of the same kind, the one that says most (requested size, GPU
    index) wins, then the latest. The size and GPU index are looked for in
    the matching line and the few lines after it.
    """
    text = _split(lines)
    for kind, patterns in ((GPU_OOM, _GPU_PATTERNS), (HOST_OOM_PYTHON, _HOST_PATTERNS)):
        best: tuple[int, int, Diagnosis] | None = None
        for i, line in enumerate(text):
            hit = _first_match(line, patterns)
            if hit is None:
                continue
            source, at = hit
            window = "\n".join(text[i:i + 1 + _LOOKAHEAD])
            requested = _requested(line)
            if requested is None:
                requested = _requested(window)
            gpu = _gpu_index(line) if kind == GPU_OOM else None
            if gpu is None and kind == GPU_OOM:
                gpu = _gpu_index(window)
            d = Diagnosis(kind, source, _quote(line, at), requested, gpu)
            score = (requested is not None) + (gpu is not None)
            if best is None or (score, i) >= (best[0], best[1]):
                best = (score, i, d)
        if best is not None:
            return best[2]
    return None
