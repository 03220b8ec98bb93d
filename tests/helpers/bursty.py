"""A job that grows in bursts (standard library only), as Polars does: memory taken at full speed, then a pause.

    bursty.py [--burst MiB] [--pause SECONDS] [--max MiB] [--name NAME] [--then hold|hang|spin|exit]
              [--hold-s SECONDS]

Prints ``pid <pid> <monotonic time>`` once started, then takes ``--burst`` MiB at once (every page written,
so each burst is charged at once), pauses, and again, up to ``--max`` MiB, and prints ``grown <MiB>``; then
(``--then``) holds its memory, hangs with every thread asleep on a lock (a deadlock: 0 % CPU), spins at
100 % of a core without output, or holds it ``--hold-s`` seconds, prints ``exiting <monotonic time>`` and
exits 0. SIGTERM ends it (default action).
"""

import argparse
import ctypes
import mmap
import os
import threading
import time

p = argparse.ArgumentParser()
p.add_argument("--burst", type=float, default=64)
p.add_argument("--pause", type=float, default=0.1)
p.add_argument("--max", type=float, default=1e9)
p.add_argument("--name")
p.add_argument("--then", choices=["hold", "hang", "spin", "exit"], default="hold")
p.add_argument("--hold-s", type=float, default=1.0)
args = p.parse_args()
if args.name:
    ctypes.CDLL(None).prctl(15, args.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
print("pid", os.getpid(), time.monotonic(), flush=True)
held = []
taken = 0.0
while taken < args.max:
    size = int(min(args.burst, args.max - taken)) << 20
    if size <= 0:
        break
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(MADV_POPULATE_WRITE)
    except OSError:
        area[::mmap.PAGESIZE] = b"\1" * (size // mmap.PAGESIZE)
    held.append(area)
    taken += size / (1 << 20)
    time.sleep(args.pause)
print("grown", int(taken), flush=True)
if args.then == "exit":
    time.sleep(args.hold_s)
    print("exiting", time.monotonic(), flush=True)
elif args.then == "spin":
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
elif args.then == "hang":
    lock = threading.Lock()
    lock.acquire()
    workers = [threading.Thread(target=lock.acquire, daemon=True) for _ in range(4)]
    for t in workers:
        t.start()
    lock.acquire()  # the main thread too: every thread waits on a lock nobody releases
else:
    while True:
        time.sleep(3600)
