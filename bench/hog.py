"""The memory hog the reaction benchmark runs as a memguard worker.

Standard library only. It writes its pid to ``--pid-file``, opens
``--fifo`` for reading (blocking, no CPU, until the benchmark opens the
other end) and then reads go signals, one JSON line each:

    {"rate": BYTES_PER_S}                 allocate at that rate until killed
    {"rate": BYTES_PER_S, "stop_at": N}   allocate at that rate until N bytes
                                          are held in all, print "holding N",
                                          then wait for the next line
    {"rate": R, "burst": N, "pause": S}   bursts: N bytes as fast as the rate
                                          allows (1e12: full speed), then S
                                          seconds of nothing, until killed
    {"rate": BYTES_PER_S, "burst": B}     paced bursts (no "pause"): B bytes at a
                                          time as fast as the kernel hands pages
                                          out (one madvise call), then a wait so
                                          that the average is the rate

At start the hog reserves one large anonymous mapping (address space
only, ``MAP_NORESERVE``: nothing is charged yet). It then fills it in
chunks of ``--chunk`` bytes (4 MiB) with ``madvise(MADV_POPULATE_WRITE)``
(Linux 5.14+; on older kernels, by writing one byte per page): the kernel
faults in and zeroes every page of the chunk before the call returns, so
each chunk is charged to the memory cgroup at once. Filling one
existing mapping takes page faults, not ``mmap`` calls, so the hog does
not wait for its address-space lock while memguard reads its
``/proc/<pid>/smaps_rollup`` (a reader of that lock); ``mmap`` with
``MAP_POPULATE`` would, and memguard's own reading would then slow the hog.

The pace follows a monotonic clock: chunk k is due ``chunk / rate``
seconds after chunk k-1. A chunk up to one interval late is taken at once
(the schedule holds); after a longer stall (the hog descheduled, a slow
page fault) the schedule restarts from now, so the hog never bursts above
its rate to catch up: the rate is a ceiling, and the benchmark measures
the rate actually reached.

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

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PAGE = mmap.PAGESIZE


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid-file", required=True)
    ap.add_argument("--fifo", required=True)
    ap.add_argument("--chunk", type=int, default=4 << 20)
    ap.add_argument("--reserve", type=int, default=16 << 30, help="address space to reserve (bytes)")
    args = ap.parse_args()
    chunk = args.chunk - args.chunk % PAGE

    area = mmap.mmap(-1, args.reserve, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    ones = b"\1" * (chunk // PAGE)
    populate = True

    def fill(off: int, size: int) -> None:
        nonlocal populate
        if populate:
            try:
                area.madvise(MADV_POPULATE_WRITE, off, size)
                return
            except OSError:  # EINVAL before Linux 5.14
                populate = False
        area[off:off + size:PAGE] = ones[: (size + PAGE - 1) // PAGE]

    tmp = f"{args.pid_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, args.pid_file)

    taken = 0
    with open(args.fifo, "rb") as f:
        for line in f:
            go = json.loads(line)
            rate = float(go["rate"])
            stop_at = go.get("stop_at")
            if go.get("burst") and "pause" in go:
                burst, pause = int(go["burst"]), float(go.get("pause", 0.2))
                while taken + burst <= args.reserve:
                    done = 0
                    while done < burst:
                        size = min(chunk, burst - done)
                        size -= size % PAGE
                        if size <= 0:
                            break
                        fill(taken, size)
                        taken += size
                        done += size
                    time.sleep(pause)
                break
            burst = int(go.get("burst") or 0)
            if burst:
                step = burst - burst % PAGE
                interval = step / rate
                due = time.monotonic()
                while taken + step <= args.reserve:
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    due = max(due, now) + interval
                    fill(taken, step)
                    taken += step
                print(f"holding {taken}", flush=True)
                continue
            interval = chunk / rate
            due = time.monotonic()
            while stop_at is None or taken < stop_at:
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                elif now - due > interval:
                    due = now  # more than a chunk late (descheduled, stalled): no burst to catch up
                due += interval
                size = chunk if stop_at is None else min(chunk, int(stop_at) - taken)
                size -= size % PAGE
                if size <= 0 or taken + size > args.reserve:
                    break
                fill(taken, size)
                taken += size
            print(f"holding {taken}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
