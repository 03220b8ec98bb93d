"""The memory hog the reaction benchmark runs as a memguard worker.

Standard library only. It writes its pid to ``--pid-file``, opens
``--fifo`` for reading (blocking, no CPU, until the benchmark opens the
other end) and then reads go signals, one JSON line each:

    {"rate": BYTES_PER_S}                 allocate at that rate until killed
    {"rate": BYTES_PER_S, "stop_at": N}   allocate at that rate until N bytes
                                          are held in all, print "holding N",
                                          then wait for the next line

Memory is taken in chunks of ``--chunk`` bytes (4 MiB) with an anonymous
``mmap(MAP_POPULATE)``: the kernel faults in and zeroes every page of the
chunk before ``mmap`` returns, so each chunk is charged to the memory
cgroup at once (no untouched, uncharged pages). The pace follows a
monotonic clock: chunk k is taken at ``t0 + k * chunk / rate``, so a late
chunk (a slow page fault, a descheduled hog) is caught up at once instead
of shifting the schedule.

Signals keep their default dispositions: SIGTERM and SIGKILL end the
process in the kernel, with no Python code in between. At end of file on
the fifo (the benchmark went away) the hog keeps what it holds and waits
to be killed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid-file", required=True)
    ap.add_argument("--fifo", required=True)
    ap.add_argument("--chunk", type=int, default=4 << 20)
    args = ap.parse_args()

    tmp = f"{args.pid_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, args.pid_file)

    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    held: list[mmap.mmap] = []
    taken = 0
    with open(args.fifo, "rb") as f:
        for line in f:
            go = json.loads(line)
            rate = float(go["rate"])
            stop_at = go.get("stop_at")
            start = taken
            t0 = time.monotonic()
            while stop_at is None or taken < stop_at:
                delay = t0 + (taken - start) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                size = args.chunk if stop_at is None else min(args.chunk, int(stop_at) - taken)
                held.append(mmap.mmap(-1, size, flags=flags))
                taken += size
            print(f"holding {taken}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
