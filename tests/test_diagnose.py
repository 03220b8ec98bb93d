"""diagnose.py: why a program died, from its exit status and its last lines of output.

The lines are shaped like what PyTorch, CUDA, cuBLAS, cuDNN, NCCL, JAX,
TensorFlow, llama.cpp, Python, shells and schedulers print (as seen in their
users' bug reports; tests/corpus/exit_messages.yaml holds the real texts and
tests/test_exit_corpus.py measures recall and precision on them). Pure
functions: no processes, no files.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from memguard.diagnose import (
    CAUSES, DISK_FULL, EXIT, GPU_OOM, HOST_OOM, KILLED, MAX_LINE_CHARS, NONE, QUOTE_CHARS, TIMEOUT, UNKNOWN,
    Diagnosis, classify_output, diagnose_exit, find_evidence, format_bytes,
)

GiB = 1 << 30
MiB = 1 << 20
DOCS = Path(__file__).resolve().parent.parent / "docs" / "incidents.md"

TORCH_2 = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
           "of 79.15 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.09 GiB "
           "memory in use. Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved "
           "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
           "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


# ----------------------------------------------------------------------------------------------
# classify_output: the text


def test_pytorch_traceback_with_the_oom_line_not_last():
    """A full traceback, OOM line followed by more output: gpu_oom, its line quoted, size and GPU parsed."""
    lines = [
        "epoch 3 step 1200 loss 0.412",
        "Traceback (most recent call last):",
        '  File "/opt/exp/train.py", line 88, in <module>',
        "    loss = model(batch).loss",
        '  File "/usr/lib/python3/dist-packages/torch/nn/modules/module.py", line 1736, in _call_impl',
        "    return forward_call(*args, **kwargs)",
        TORCH_2,
        "wandb: Waiting for W&B process to finish... (failed 1).",
        "wandb: Synced 5 files",
    ]
    d = classify_output(lines)
    assert d is not None
    assert d.kind == GPU_OOM and d.source == "pytorch"
    assert d.requested_bytes == 2 * GiB and d.gpu == 0 and d.index == 6
    assert d.line.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0")
    assert len(d.line) <= QUOTE_CHARS and d.line.endswith("…")
    assert d.describe() == "GPU out of memory on GPU 0 (tried to allocate 2.00 GiB), reported by pytorch"


def test_old_pytorch_message_gives_size_and_gpu():
    """PyTorch < 2.1: 'RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 1; ...)'."""
    d = classify_output(["RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 1; 7.79 GiB total "
                         "capacity; 6.35 GiB already allocated; 11.50 MiB free; 6.42 GiB reserved in total by "
                         "PyTorch)"])
    assert (d.kind, d.requested_bytes, d.gpu) == (GPU_OOM, 20 * MiB, 1)


@pytest.mark.parametrize("lines, source, requested, gpu", [
    (["RuntimeError: CUDA error: out of memory",
      "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
      "might be incorrect.",
      "For debugging consider passing CUDA_LAUNCH_BLOCKING=1"], "cuda", None, None),
    (["RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"],
     "cublas", None, None),
    (["RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED"], "cudnn", None, None),
    (["terminate called after throwing an instance of 'thrust::system::system_error'",
      "  what():  parallel_for failed: cudaErrorMemoryAllocation: out of memory"], "cuda", None, None),
    (["2021-10-15 15:01:44.577626: E external/org_tensorflow/tensorflow/stream_executor/cuda/cuda_driver.cc:764] "
      "failed to alloc 2740606464 bytes unified memory; result: CUDA_ERROR_OUT_OF_MEMORY: out of memory"],
     "cuda", 2740606464, None),
    (["ng30903:3063028:3066152 [3] include/alloc.h:178 NCCL WARN Cuda failure 'out of memory'",
      "",
      "ng30903:3063028:3066152 [3] include/alloc.h:185 NCCL WARN Failed to CUDA calloc 6291456 bytes"],
     "nccl", 6291456, 3),
    (["jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
      "7406166528 bytes.", "BufferAssignment OOM Debugging."], "xla", 7406166528, None),
    (["tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor with "
      "shape[128,128,109,109] and type float on /job:localhost/replica:0/task:0/device:GPU:1 by allocator "
      "GPU_1_bfc"], "tensorflow", None, 1),
    (["llama_new_context_with_model: pipeline parallelism enabled (n_copies=4)",
      "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: cudaMalloc failed: "
      "out of memory",
      "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 4294967296",
      "llama_new_context_with_model: failed to allocate compute buffers"], "llama.cpp", 4294967296, 0),
    (["CUDA error: out of memory",
      "  current device: 1, in function ggml_cuda_pool_malloc_vmm at ggml/src/ggml-cuda.cu:387",
      "  cuMemCreate(&handle, reserve_size, &prop, 0)"], "cuda", None, 1),
    (["cupy.cuda.memory.OutOfMemoryError: Out of memory allocating 1,073,741,824 bytes (allocated so far: "
      "0 bytes)."], "cupy", GiB, None),
    (["torch.OutOfMemoryError: Allocation on device"], "pytorch", None, None),
])
def test_gpu_oom_messages_of_each_layer(lines, source, requested, gpu):
    """Each framework's or library's GPU OOM message is gpu_oom, with the size and GPU where it says them."""
    d = classify_output(lines)
    assert d is not None and d.kind == GPU_OOM
    assert (d.source, d.requested_bytes, d.gpu) == (source, requested, gpu)


def test_host_memory_errors_are_host_oom():
    """A Python MemoryError traceback, nothing about CUDA: host_oom, the exception line quoted, its size parsed."""
    lines = [
        "Traceback (most recent call last):",
        '  File "prep.py", line 12, in <module>',
        "    x = np.zeros((1_000_000, 1_000_000))",
        "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 7.28 TiB for an array with shape "
        "(1000000, 1000000) and data type float64",
    ]
    d = classify_output(lines)
    assert d == Diagnosis(HOST_OOM, "numpy", lines[-1], int(7.28 * (1 << 40)), None, index=3)
    assert classify_output(["MemoryError"]).kind == HOST_OOM
    assert classify_output(["  | MemoryError: out of arena space"]).kind == HOST_OOM
    assert classify_output(["Unable to allocate 139. MiB for an array with shape (9131294, 2)"]).requested_bytes == \
        139 * MiB
    cpu = classify_output(["RuntimeError: [enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 8589934592 bytes."])
    assert (cpu.kind, cpu.source, cpu.requested_bytes) == (HOST_OOM, "pytorch", 8 * GiB)
    assert classify_output(["java.lang.OutOfMemoryError: Java heap space"]).kind == HOST_OOM


def test_gpu_oom_wins_over_a_later_host_memory_error():
    """A CUDA OOM followed by a MemoryError in the error path: the diagnosis is the GPU one."""
    d = classify_output(["RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; ...)",
                         "During handling of the above exception, another exception occurred:",
                         "MemoryError"])
    assert d.kind == GPU_OOM and d.requested_bytes == GiB


def test_a_kill_for_memory_wins_over_an_earlier_gpu_message():
    """A CUDA OOM, then the kernel's OOM killer in the same log: the kill ended the program, host_oom."""
    d = classify_output(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
                         "[ 8812.113] Memory cgroup out of memory: Killed process 4242 (python)"])
    assert (d.kind, d.source) == (HOST_OOM, "kernel")


def test_the_most_informative_of_several_oom_lines_is_quoted():
    """Several GPU OOM lines: the one giving size and GPU beats a bare later one."""
    d = classify_output(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. GPU 2 has a "
                         "total capacity of 23.65 GiB of which 11.06 MiB is free.",
                         "ERROR worker: CUDA out of memory"])
    assert (d.requested_bytes, d.gpu) == (512 * MiB, 2)


@pytest.mark.parametrize("lines", [
    ["GPU memory: 7.21/8.00 GiB used (90%)"],
    ["INFO: reserving memory for the KV cache: 2.00 GiB"],
    ["memory_efficient_attention enabled; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"],
    ["torch.cuda.memory_allocated() = 1073741824", "max_memory_reserved: 2.1 GiB"],
    ["MemoryErrorHandler installed", "    except MemoryError:", "    raise MemoryError('x') from e"],
    ["    except torch.cuda.OutOfMemoryError:", "        if 'out of memory' in str(e):"],
    ["    raise RuntimeError(\"CUDA out of memory\")", "print('CUDA out of memory, retrying')"],
    ["    logger.error(\"CUDA out of memory\")", "    catch (const std::bad_alloc& e) {"],
    ["ResourceExhaustedError: 2 root error(s) found. (see above)"],
    ["The model is not out of memory", "no CUDA out of memory errors seen in 100 steps"],
    ["To avoid out of memory errors, lower --max-tokens"],
    ["If you encounter CUDA out of memory, try to set --tile with a smaller number."],
    ["per_process_gpu_memory_fraction=0.8", "--gpu-memory-utilization 0.9", "max_split_size_mb:128"],
    ["Epoch 1: 100%|██████████| 50/50 [00:10<00:00, loss=0.1, mem=7.2GB, oom=0]"],
    ["--timeout 600 --ddp_timeout 3600", "timeout=30"],
    ["RuntimeError: CUDA error: an illegal memory access was encountered"],
    ["RuntimeError: CUDA error: device-side assert triggered"],
    ["Memory access fault by GPU node-1 (Agent handle: 0x55) on address 0x7f. Reason: Page not present."],
    ["Error: ENOSPC: System limit for number of file watchers reached, watch '/app'"],
    ["tail: inotify cannot be used, reverting to polling: No space left on device"],
    ['"OOMKilled": false,', "oom_score_adj=-1000", "State:          Terminated", "  Reason:       Completed"],
    ["Allocator (GPU_0_bfc) ran out of memory trying to allocate 2.20GiB with freed_by_count=0. The caller "
     "indicates that this is not a failure, but may mean that there could be performance gains if more memory "
     "were available."],
    ["malloc(): memory corruption", "double free or corruption (out)", "Segmentation fault (core dumped)"],
    [],
])
def test_lines_that_mention_memory_but_are_no_diagnosis(lines):
    """Mentions of memory, allocators, timeouts and even MemoryError in source lines or advice name no cause."""
    assert classify_output(lines) is None


@pytest.mark.parametrize("line, kind, source", [
    ("zsh: killed     python train.py", HOST_OOM, "shell"),
    ("bash: line 1:  4242 Killed                  python train.py", HOST_OOM, "shell"),
    ("RuntimeError: DataLoader worker (pid 19597) is killed by signal: Killed.", HOST_OOM, "pytorch"),
    ("[12345.678] Out of memory: Killed process 4242 (python3) total-vm:12345kB, anon-rss:8000kB", HOST_OOM,
     "kernel"),
    ("  Reason:       OOMKilled", HOST_OOM, "kubernetes"),
    ("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=191.batch cgroup.", HOST_OOM, "slurm"),
    ("fatal error: runtime: out of memory", HOST_OOM, "go"),
    ("memory allocation of 655360 bytes failed", HOST_OOM, "rust"),
    ("OSError: [Errno 12] Cannot allocate memory", HOST_OOM, "libc"),
    ("# Native memory allocation (malloc) failed to allocate 3293577216 bytes for committing reserved memory.",
     HOST_OOM, "java"),
    ("OSError: [Errno 28] No space left on device: '/tmp/x'", DISK_FULL, "disk"),
    ("OSError: [Errno 122] Disk quota exceeded", DISK_FULL, "disk"),
    ("ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory (shm).",
     DISK_FULL, "shm"),
    ("slurmstepd: error: *** JOB 1 ON n1 CANCELLED AT 2024-04-20T09:09:37 DUE TO TIME LIMIT ***", TIMEOUT, "slurm"),
    ("subprocess.TimeoutExpired: Command 'x' timed out after 30 seconds", TIMEOUT, "python"),
    ("Process finished with exit code 137 (interrupted by signal 9: SIGKILL)", KILLED, "shell"),
    ("./run.sh: line 12: 4242 Terminated              python train.py", KILLED, "shell"),
])
def test_each_kind_of_text(line, kind, source):
    """Host kills and allocation failures, full disks, time limits and bare kills each get their kind."""
    d = classify_output([line])
    assert d is not None and (d.kind, d.source) == (kind, source)


def test_the_shells_killed_is_not_certain():
    """'Killed' is usually the OOM killer but any SIGKILL prints it: host_oom, marked uncertain."""
    assert classify_output(["Killed"]).certain is False
    assert classify_output(["MemoryError"]).certain is True


def test_recovered_out_of_memory_is_evidence_but_not_a_cause():
    """'Skipping batch' after a CUDA OOM: find_evidence keeps it (recovered), classify_output ignores it."""
    lines = ["| WARNING: ran out of memory with exception: CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; "
             "15.75 GiB total capacity);",
             " Skipping batch",
             "* Trying batch size 256... Failed (CUDA out of memory...)"]
    found = find_evidence(lines)
    assert [(d.kind, d.recovered) for d in found] == [(GPU_OOM, True), (GPU_OOM, True)]
    assert classify_output(lines) is None


def test_colour_codes_carriage_returns_and_joined_chunks_are_handled():
    """ANSI colours are stripped, \\r-redrawn progress bars and multi-line chunks are split into lines."""
    d = classify_output(["\x1b[31mtrain:  40%|####      | 4/10\rtrain:  50%|#####     | 5/10\n"
                         "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; "
                         "8.00 GiB total capacity)\x1b[0m\nexiting"])
    assert d.line.startswith("torch.cuda.OutOfMemoryError") and d.line.endswith("capacity)")
    assert d.requested_bytes == 3 * GiB


def test_bytes_are_decoded():
    """Raw output bytes (not UTF-8 clean) are decoded with replacement, not rejected."""
    d = classify_output([b"\xff\xfe garbage\nRuntimeError: CUDA error: out of memory\n"])
    assert d.kind == GPU_OOM


def test_a_long_line_is_trimmed_around_the_match():
    """A match far into a very long line is quoted from just before it, within QUOTE_CHARS."""
    d = classify_output(["x" * 1000 + " RuntimeError: CUDA error: out of memory " + "y" * 1000])
    assert len(d.line) <= QUOTE_CHARS and d.line.startswith("…") and "CUDA error: out of memory" in d.line


def test_a_megabyte_of_adversarial_text_is_classified_quickly():
    """A guard against catastrophic backtracking: 1 MB lines built from the patterns' own fragments (repeated
    prefixes that never complete, nested parentheses, long words) are classified well within a deadline that
    a backtracking pattern would blow by hours. Also: the message at the end of a long line is still found."""
    fragments = ["cudaMalloc(", "CUDA error: ", "error: ", "NVML_SUCCESS == ", "Tried to allocate 1 ", "(GPU 0;",
                 "Out of memory allocating 1,2,3", "posix_memalign(", "NvMapMemAllocInternalTagged: ", "a" * 61 + ".",
                 "(" * 50, "line 1: 1 ", "Killed  x", "raise ", "if '", "OOM when allocating tensor ",
                 "Requested amount of GPU memory (", "java.lang.", "TimeoutError", "x." * 40]
    lines = [(f * (1_000_000 // len(f) + 1))[:1_000_000] for f in fragments]
    lines.append("".join(fragments) * (1_000_000 // len("".join(fragments))))
    lines.append("z" * 1_000_000 + " RuntimeError: CUDA error: out of memory")
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(find_evidence(lines)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "classifying 22 MB of adversarial text took more than 60 s"
    found = result[0]
    assert found and found[-1].kind == GPU_OOM and found[-1].index == len(lines) - 1


def test_very_long_lines_are_cut_to_their_ends():
    """A line over MAX_LINE_CHARS keeps its head and tail: an error at either end is found."""
    head = classify_output(["MemoryError: " + "x" * (MAX_LINE_CHARS * 3)])
    tail = classify_output(["x" * (MAX_LINE_CHARS * 3) + " std::bad_alloc"])
    assert head.kind == HOST_OOM and tail.kind == HOST_OOM


def test_format_bytes():
    """Sizes are written the way PyTorch writes them."""
    assert [format_bytes(n) for n in (512, 2 * GiB, 1536 * MiB)] == ["512 B", "2.00 GiB", "1.50 GiB"]


# ----------------------------------------------------------------------------------------------
# diagnose_exit: exit status + text


def test_exit_0_is_never_a_failure_and_quotes_the_recovered_oom():
    """A program that printed a CUDA OOM, recovered and exited 0: cause none, the OOM line quoted."""
    v = diagnose_exit(0, None, ["step 10", TORCH_2, "recovered with batch size 8", "done"])
    assert v.cause == NONE and not v.failed
    assert v.evidence and v.evidence[0].startswith("torch.OutOfMemoryError")
    assert "out-of-memory" in v.detail and v.exit_code == 0 and v.signal is None
    assert diagnose_exit(0, None, []).cause == NONE
    assert diagnose_exit(0, None, ["Killed"], kernel_oom=True).cause == NONE


@pytest.mark.parametrize("returncode, signal, expected_signal", [
    (None, 9, 9), (-9, None, 9), (137, None, 9),
])
def test_sigkill_without_evidence_is_killed(returncode, signal, expected_signal):
    """SIGKILL (as a signal, Python's -9 or a shell's 137) with nothing in the text: killed, who sent it asked."""
    v = diagnose_exit(returncode, signal, ["epoch 3 loss 0.4"])
    assert (v.cause, v.signal) == (KILLED, expected_signal)
    assert "OOM killer" in v.recommendation and "docker" in v.recommendation


def test_exit_137_with_oom_evidence_is_host_oom():
    """137 from a container whose log shows the OOM killer or a shell's Killed: host_oom."""
    assert diagnose_exit(137, None, ["Killed"]).cause == HOST_OOM
    assert diagnose_exit(137, None, ["Last State: Terminated", "  Reason: OOMKilled"]).cause == HOST_OOM


def test_sigkill_after_a_gpu_oom_is_not_a_gpu_oom():
    """A CUDA OOM then a SIGKILL: the GPU message did not kill it. Without the kernel's word: killed, the GPU line
    quoted as context; with kernel_oom=True: host_oom (a container killed for RAM)."""
    lines = [TORCH_2]
    v = diagnose_exit(137, None, lines)
    assert v.cause == KILLED and v.evidence == (lines[0][:QUOTE_CHARS - 1].rstrip() + "…",)
    assert v.main is None and "source" not in v.to_dict() and "gpu" not in v.to_dict()
    v = diagnose_exit(None, 9, lines, kernel_oom=True, limit_bytes=16 * GiB)
    assert v.cause == HOST_OOM and "16.00 GiB" in v.detail and "16.00 GiB" in v.recommendation
    assert v.limit_bytes == 16 * GiB and v.evidence  # the GPU line, as context


def test_kernel_oom_false_turns_a_shell_killed_into_a_kill_from_elsewhere():
    """The shell's 'Killed' is taken for the OOM killer unless memguard knows the OOM counter did not move."""
    assert diagnose_exit(137, None, ["Killed"], kernel_oom=False).cause == KILLED
    assert diagnose_exit(1, None, ["RuntimeError: DataLoader worker (pid 1) is killed by signal: Killed."],
                         kernel_oom=False).cause == KILLED
    assert diagnose_exit(1, None, ["MemoryError"], kernel_oom=False).cause == HOST_OOM


def test_a_nonzero_exit_takes_the_texts_kind():
    """Exit 1 with a GPU OOM: gpu_oom; with nothing known: exit; with only a recovered OOM: exit."""
    v = diagnose_exit(1, None, [TORCH_2])
    assert (v.cause, v.exit_code, v.signal) == (GPU_OOM, 1, None)
    assert "expandable_segments" in v.recommendation and "batch size" in v.recommendation
    assert diagnose_exit(1, None, ["ValueError: bad config"]).cause == EXIT
    assert diagnose_exit(1, None, ["| WARNING: ran out of memory on GPU #2, skipping batch",
                                   "ValueError: bad config"]).cause == EXIT


def test_crash_signals_take_the_texts_kind():
    """std::bad_alloc ends in SIGABRT: host_oom; a SIGSEGV with nothing in the text: exit."""
    assert diagnose_exit(-6, None, ["terminate called after throwing an instance of 'std::bad_alloc'",
                                    "  what():  std::bad_alloc", "Aborted (core dumped)"]).cause == HOST_OOM
    v = diagnose_exit(139, None, ["Segmentation fault (core dumped)"])
    assert (v.cause, v.signal) == (EXIT, 11) and "SIGSEGV" in v.detail


def test_sigterm_and_time_limits():
    """SIGTERM after a scheduler's time limit: timeout; SIGTERM alone: killed; SIGXCPU: timeout."""
    assert diagnose_exit(None, 15, ["slurmstepd: error: *** JOB 1 ON n CANCELLED AT 2024 DUE TO TIME LIMIT ***"]
                         ).cause == TIMEOUT
    v = diagnose_exit(143, None, ["step 1"])
    assert (v.cause, v.signal) == (KILLED, 15) and "SIGTERM" in v.recommendation
    assert diagnose_exit(None, 24, []).cause == TIMEOUT
    assert diagnose_exit(None, 25, []).cause == DISK_FULL


def test_unknown_status_lets_the_text_decide():
    """A log without an exit status: its kind when it names one, unknown when it names none."""
    assert diagnose_exit(None, None, ["OSError: [Errno 28] No space left on device"]).cause == DISK_FULL
    v = diagnose_exit(None, None, ["all good"])
    assert v.cause == UNKNOWN and not v.failed and "--exit-code" in v.recommendation


def test_evidence_is_bounded_and_deduplicated():
    """Many OOM lines: the deciding one first, at most five, no line twice."""
    lines = [f"RuntimeError: CUDA out of memory. Tried to allocate {i}.00 MiB (GPU 0; 8 GiB total)" for i in range(9)]
    lines += lines
    v = diagnose_exit(1, None, lines)
    assert len(v.evidence) == 5 and len(set(v.evidence)) == 5


def test_verdict_to_dict_has_the_documented_fields():
    """to_dict() carries cause, detail, recommendation, evidence, exit_code, signal, limit_bytes, and what the
    deciding finding knows."""
    d = diagnose_exit(137, None, ["Killed"], limit_bytes=8 * GiB).to_dict()
    assert {"cause", "detail", "recommendation", "evidence", "exit_code", "signal", "signal_name",
            "limit_bytes"} <= set(d)
    assert (d["cause"], d["exit_code"], d["signal"], d["signal_name"], d["limit_bytes"], d["source"]) == \
        (HOST_OOM, 137, 9, "SIGKILL", 8 * GiB, "shell")


def test_every_verdict_has_a_cause_from_the_vocabulary_and_advice_for_failures():
    """Whatever the status and the text, the cause is one of CAUSES and a failure comes with a recommendation."""
    texts = [[], ["Killed"], [TORCH_2], ["MemoryError"], ["No space left on device"], ["TimeoutError"],
             ["Terminated"], ["exit code 137"]]
    for rc, sig in [(0, None), (1, None), (137, None), (-15, None), (None, 6), (None, None), (None, 14)]:
        for lines in texts:
            v = diagnose_exit(rc, sig, lines)
            assert v.cause in CAUSES
            if v.failed:
                assert v.recommendation and v.detail


def test_the_documented_causes_are_the_vocabulary():
    """docs/incidents.md's "Causes" table lists exactly the causes the code produces (scripts rely on them)."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Causes", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert documented == list(CAUSES)


# Lines shaped like each layer's message, for the patterns the corpus's real texts do not reach (the corpus holds
# no line for them, or an earlier pattern claims its lines first).
EXAMPLES = [
    "onnxruntime::CudaCall CUDA failure 2: out of memory ; GPU=0 ; hostname=h ; expr=cudaMalloc((void**)&p, size);",
    "Check failed: cudaSuccess == cudaStat (0 vs. 2) Cuda Error: out of memory",
    "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "RuntimeError: cuFFT error: CUFFT_ALLOC_FAILED",
    "RuntimeError: cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`",
    "RuntimeError: CUDA error: CUSPARSE_STATUS_ALLOC_FAILED when calling `cusparseCreate(handle)`",
    "RuntimeError: curand error: CURAND_STATUS_ALLOCATION_FAILED",
    "rocBLAS error: rocblas_status_memory_error",
    "clEnqueueNDRangeKernel failed: CL_MEM_OBJECT_ALLOCATION_FAILURE",
    "llama_kv_cache_init: failed to allocate buffer for kv cache",
    "RuntimeError: Could not allocate tensor with 4194304 bytes. There is not enough GPU video memory available!",
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: [metal::malloc] Attempting to "
    "allocate 53687091200 bytes which is greater than the maximum allowed buffer size",
    "ERROR: Out of GPU memory trying to allocate 1.234 GiB",
    "Attempting to reserve 12.50G at the bottom of memory. That was not possible. There are 9.62G free.",
    "W external/xla/xla/tsl/framework/bfc_allocator.cc:482] Allocator (GPU_0_bfc) ran out of memory trying to "
    "allocate 1.00GiB (rounded to 1073741824)requested by op",
    "tensorflow.python.framework.errors_impl.InternalError: Failed copying input tensor from /job:localhost/replica:0"
    "/task:0/device:CPU:0 to /job:localhost/replica:0/task:0/device:GPU:0 in order to run _EagerConst: Dst tensor is "
    "not initialized.",
    "jaxlib.xla_extension.XlaRuntimeError: INTERNAL: Failed to allocate 8388608 bytes for new constant",
    "ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be stored in "
    "KV cache (10000). Try increasing `gpu_memory_utilization` or decreasing `max_model_len`",
    "ValueError: To serve at least one request with the models's max seq len (131072), (16.0 GiB KV cache is needed, "
    "which is larger than the available KV cache memory (9.36 GiB).",
    "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
    "Not enough memory to handle 4096 prefill tokens. You need to decrease `--max-batch-prefill-tokens`",
    "NvMapMemAllocInternalTagged: 1075072515 error 12",
    "Fatal Python error: Cannot recover from MemoryErrors while normalizing exceptions.",
    "Unhandled exception. System.OutOfMemoryException: Exception of type 'System.OutOfMemoryException' was thrown.",
    "ERROR: OutOfMemoryError()",
    "ray.exceptions.RayTaskError(OutOfMemoryError): ray::train() (pid=123, ip=10.0.0.1)",
    "Exception in thread \"main\" java.lang.OutOfMemoryError: GC overhead limit exceeded",
    "OutOfMemoryError: Java heap space",
    "  what():  bad allocation",
    "terminate called after throwing an instance of 'paddle::memory::allocation::BadAlloc'",
    "ArrowMemoryError: realloc of size 2172846080 failed",
    "bash: fork: Cannot allocate memory",
    "virtual memory exhausted: Cannot allocate memory",
    "cc1plus: out of memory allocating 65536 bytes after a total of 1234 bytes",
    "OSError: [WinError 1455] The paging file is too small for this operation to complete",
    "Error: model requires more system memory (12.3 GiB) than is available (8.1 GiB)",
    "W tensorflow/core/framework/op_kernel.cc:1763] OP_REQUIRES failed at cast_op.cc:109 : Resource exhausted: OOM "
    "when allocating tensor with shape[1,559,512,3] and type float on /job:localhost/replica:0/task:0/device:CPU:0 "
    "by allocator cpu",
    "W tensorflow/core/framework/allocator.cc:108] Allocator (mklcpu) ran out of memory trying to allocate 2.1G",
    "PHP Fatal error:  Allowed memory size of 134217728 bytes exhausted (tried to allocate 20480 bytes)",
    "Error: cannot allocate vector of size 1.2 Gb",
    "[ 8812.113] Memory cgroup out of memory: Killed process 4242 (python)",
    "trainer.service: Failed with result 'oom-kill'.",
    "systemd-oomd[712]: Killed /user.slice/user-1000.slice/session-3.scope due to memory pressure for /user.slice",
    "earlyoom: low memory! at or below SIGTERM limits: mem 10.00%, swap 10.00%",
    "Message: The node was low on resource: memory. Container trainer was using 15Gi, which exceeds its request of 8Gi.",
    "slurmstepd: error: Exceeded job memory limit",
    "Container [pid=1234,containerID=c_1] is running beyond physical memory limits. Current usage: 8.1 GB of 8 GB",
    "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.",
    "distributed.scheduler.KilledWorker: Attempted to run task x on 3 different workers, but all those workers died",
    "The executor with id 1 exited with exit code 137(SIGKILL, possible container OOM).",
    "npm ERR! code ENOSPC",
    "There is not enough space on the disk.",
    "Message: The node was low on resource: ephemeral-storage.",
    "OSError: Not enough disk space. Needed: 1.20 GiB (download: 1.00 GiB, generated: 200 MiB)",
    'Job 1234 exceeds job hard limit "h_rt" of queue "all.q@node1"',
    "wandb: ERROR Run initialization has timed out after 90.0 sec.",
    "RuntimeError: Timed out initializing process group in store based barrier on rank: 0",
    "ERROR: Job failed: execution took longer than 1h0m0s seconds",
    "CPU time limit exceeded (core dumped)",
    "trainer.service: Main process exited, code=killed, status=9/KILL",
]


def test_every_pattern_is_reached_by_a_real_or_example_line():
    """Each pattern matches some line: the corpus's real texts or EXAMPLES above. A pattern no line reaches
    (shadowed by another, or filtered out before matching) is dead and fails this test."""
    import yaml

    from memguard import diagnose as dg

    corpus = yaml.safe_load((Path(__file__).resolve().parent / "corpus" / "exit_messages.yaml").read_text("utf-8"))
    texts = [e["text"].splitlines() for e in corpus] + [[line] for line in EXAMPLES]
    reached: set[int] = set()
    for text in texts:
        lines = dg.split_lines(text)
        for i, line in enumerate(lines):
            hit = dg._match_line(line, lines, i)
            if hit is not None:
                reached.add(id(hit[0]))
    dead = [f"{r.source}: {r.rx.pattern[:80]}" for r in dg._ALL_RULES if id(r) not in reached]
    assert not dead, "patterns no line reaches:\n" + "\n".join(dead)
