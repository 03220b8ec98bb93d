"""A job that grows into swap and keeps using all of it (standard library only): a working set past RAM.

    thrash_job.py [--rate MiB_PER_S] [--max MiB]

Prints ``pid <pid>``; grows at ``--rate`` up to ``--max`` MiB, and all the while walks over everything it
holds, writing one byte per page, as a job scanning its data does: once its memory is larger than what
its cgroup may keep in RAM, every pass swaps pages in and out. SIGTERM ends it (default action).
"""

import argparse
import mmap
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--rate", type=float, default=100)
p.add_argument("--max", type=float, default=1024)
args = p.parse_args()
print("pid", os.getpid(), flush=True)
chunk = 16 << 20
areas = []
start = time.monotonic()
ones = b"\2" * (chunk // mmap.PAGESIZE)
while True:
    due = min(args.max, (time.monotonic() - start) * args.rate)
    while len(areas) * 16 < due:
        a = mmap.mmap(-1, chunk)
        a[::mmap.PAGESIZE] = ones
        areas.append(a)
    for a in areas:  # one pass over the working set
        a[::mmap.PAGESIZE] = ones
        if len(areas) * 16 < min(args.max, (time.monotonic() - start) * args.rate):
            break
