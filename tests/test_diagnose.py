"""diagnose.py: out-of-memory messages in a worker's last lines of output.

The lines are shaped like what PyTorch, CUDA, cuBLAS, cuDNN, NCCL, JAX,
TensorFlow, llama.cpp and Python print (as seen in their users' bug
reports). Pure functions: no processes, no files.
"""

from __future__ import annotations

import pytest

from memguard.diagnose import GPU_OOM, HOST_OOM_PYTHON, QUOTE_CHARS, Diagnosis, classify_output, format_bytes

GiB = 1 << 30
MiB = 1 << 20

TORCH_2 = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
           "of 79.15 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.09 GiB "
           "memory in use. Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved "
           "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
           "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


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
    assert d.requested_bytes == 2 * GiB and d.gpu == 0
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
      "7406166528 bytes.", "BufferAssignment OOM Debugging."], "jax", 7406166528, None),
    (["tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor with "
      "shape[128,128,109,109] and type float on /job:localhost/replica:0/task:0/device:GPU:1 by allocator "
      "GPU_1_bfc"], "tensorflow", None, 1),
    (["llama_new_context_with_model: pipeline parallelism enabled (n_copies=4)",
      "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: cudaMalloc failed: "
      "out of memory",
      "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 4294967296",
      "llama_new_context_with_model: failed to allocate compute buffers"], "llama.cpp", 4096 * MiB, 0),
    (["CUDA error: out of memory",
      "  current device: 1, in function ggml_cuda_pool_malloc_vmm at ggml/src/ggml-cuda.cu:387",
      "  cuMemCreate(&handle, reserve_size, &prop, 0)"], "cuda", None, 1),
])
def test_gpu_oom_messages_of_each_layer(lines, source, requested, gpu):
    """Each framework's or library's GPU OOM message is gpu_oom, with the size and GPU where it says them."""
    d = classify_output(lines)
    assert d is not None and d.kind == GPU_OOM
    assert (d.source, d.requested_bytes, d.gpu) == (source, requested, gpu)


def test_host_memory_error_is_host_oom_python():
    """A Python MemoryError traceback, nothing about CUDA: host_oom_python, the exception line quoted."""
    lines = [
        "Traceback (most recent call last):",
        '  File "prep.py", line 12, in <module>',
        "    x = np.zeros((1_000_000, 1_000_000))",
        "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 7.28 TiB for an array with shape "
        "(1000000, 1000000) and data type float64",
    ]
    d = classify_output(lines)
    assert d == Diagnosis(HOST_OOM_PYTHON, "python", lines[-1], int(7.28 * (1 << 40)), None)
    assert classify_output(["MemoryError"]).kind == HOST_OOM_PYTHON
    assert classify_output(["  | MemoryError: out of arena space"]).kind == HOST_OOM_PYTHON
    cpu = classify_output(["RuntimeError: [enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 8589934592 bytes."])
    assert (cpu.kind, cpu.source, cpu.requested_bytes) == (HOST_OOM_PYTHON, "pytorch", 8 * GiB)


def test_gpu_oom_wins_over_a_later_host_memory_error():
    """A CUDA OOM followed by a MemoryError in the error path: the diagnosis is the GPU one."""
    d = classify_output(["RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; ...)",
                         "During handling of the above exception, another exception occurred:",
                         "MemoryError"])
    assert d.kind == GPU_OOM and d.requested_bytes == GiB


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
    ["java.lang.OutOfMemoryError: Java heap space"],
    ["ResourceExhaustedError: 2 root error(s) found. (see above)"],
    [],
])
def test_lines_that_mention_memory_but_are_no_oom(lines):
    """Mentions of memory, allocators and even MemoryError in source lines are not a diagnosis."""
    assert classify_output(lines) is None


def test_tensorflow_cpu_oom_is_host_side():
    """TensorFlow's OOM on device:CPU is a host allocation failure, not a GPU one."""
    d = classify_output(["W tensorflow/core/framework/op_kernel.cc:1763] OP_REQUIRES failed at cast_op.cc:109 : "
                         "Resource exhausted: OOM when allocating tensor with shape[1,559,512,3] and type float "
                         "on /job:localhost/replica:0/task:0/device:CPU:0 by allocator cpu"])
    assert d.kind == HOST_OOM_PYTHON and d.source == "tensorflow"


def test_colour_codes_carriage_returns_and_joined_chunks_are_handled():
    """ANSI colours are stripped, \\r-redrawn progress bars and multi-line chunks are split into lines."""
    d = classify_output(["\x1b[31mtrain:  40%|####      | 4/10\rtrain:  50%|#####     | 5/10\n"
                         "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; "
                         "8.00 GiB total capacity)\x1b[0m\nexiting"])
    assert d.line.startswith("torch.cuda.OutOfMemoryError") and d.line.endswith("capacity)")
    assert d.requested_bytes == 3 * GiB


def test_a_long_line_is_trimmed_around_the_match():
    """A match far into a very long line is quoted from just before it, within QUOTE_CHARS."""
    d = classify_output(["x" * 1000 + " RuntimeError: CUDA error: out of memory " + "y" * 1000])
    assert len(d.line) <= QUOTE_CHARS and d.line.startswith("…") and "CUDA error: out of memory" in d.line


def test_format_bytes():
    """Sizes are written the way PyTorch writes them."""
    assert [format_bytes(n) for n in (512, 2 * GiB, 1536 * MiB)] == ["512 B", "2.00 GiB", "1.50 GiB"]
