#!/usr/bin/env python3
"""How long the exit classifier takes: memguard.diagnose.diagnose_exit on real and adversarial text.

Run from the repository root (no root needed)::

    .venv/bin/python bench/classifier.py

Three measurements, each the median of several repetitions, on one CPU:

* a worker's exit: the last 50 lines of a training log ending in a CUDA out-of-memory traceback,
  the size of the tail the daemon keeps;
* every entry of the corpus (tests/corpus/exit_messages.yaml), per entry;
* 1 MB lines built from the patterns' own fragments (prefixes that never complete), the worst
  case for a regular-expression classifier: each line is cut to MAX_LINE_CHARS before matching.

Prints a table; writes nothing.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402

from memguard.diagnose import MAX_LINE_CHARS, diagnose_exit  # noqa: E402

REPS = 7


def timed(fn, reps: int = REPS) -> float:
    """Median wall time of ``fn()`` in seconds."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    tail = [f"epoch 3 step {i} loss 0.41{i % 10} lr 2e-5 it/s 3.1" for i in range(40)] + [
        "Traceback (most recent call last):",
        '  File "/opt/exp/train.py", line 88, in <module>',
        "    loss = model(batch).loss",
        '  File "/usr/lib/python3/dist-packages/torch/nn/modules/module.py", line 1736, in _call_impl',
        "    return forward_call(*args, **kwargs)",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "79.15 GiB of which 1.05 GiB is free.",
        "wandb: Waiting for W&B process to finish... (failed 1).",
        "wandb: Synced 5 files", "", "",
    ]
    corpus = yaml.safe_load((ROOT / "tests" / "corpus" / "exit_messages.yaml").read_text(encoding="utf-8"))
    texts = [e["text"].splitlines() for e in corpus]
    fragments = ["cudaMalloc(", "error: ", "out of memory", "NVML_SUCCESS == ", "Tried to allocate 1 ",
                 "Out of memory allocating 1,2,3", "Killed  x", "No space left on device", "TimeoutError", "a" * 61]
    huge = [(f * (1_000_000 // len(f) + 1))[:1_000_000] for f in fragments]

    one = timed(lambda: diagnose_exit(1, None, tail))
    per_entry = timed(lambda: [diagnose_exit(1, None, t) for t in texts], reps=3) / len(texts)
    worst = max(timed(lambda h=h: diagnose_exit(1, None, [h]), reps=3) for h in huge)

    print(f"{'measurement':<52} {'median':>10}")
    print(f"{'worker exit, 50-line tail':<52} {one * 1e3:>8.2f} ms")
    print(f"{f'corpus, per entry ({len(texts)} entries)':<52} {per_entry * 1e3:>8.2f} ms")
    print(f"{f'slowest 1 MB adversarial line (cut to {MAX_LINE_CHARS // 1024} KiB)':<52} {worst * 1e3:>8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
