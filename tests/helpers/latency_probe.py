"""A latency probe (standard library only): how long does a small, interactive process stall?

    latency_probe.py [--hold MiB] [--period SECONDS] [--name NAME]

Like a login shell or sshd answering a keystroke: every ``--period`` it touches all of its ``--hold`` MiB and
allocates and frees 1 MiB, and measures how late the round ends against its schedule. Prints ``pid <pid>``
at start, then one line ``stall <seconds>`` whenever a round is late by more than 0.1 s, and on SIGTERM or
SIGINT a line ``max_stall <seconds> rounds <n>`` before it exits 0.
"""

import argparse
import ctypes
import mmap
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--hold", type=float, default=32)
p.add_argument("--period", type=float, default=0.01)
p.add_argument("--name")
args = p.parse_args()
if args.name:
    ctypes.CDLL(None).prctl(15, args.name.encode()[:15], 0, 0, 0)
size = int(args.hold) << 20
held = mmap.mmap(-1, size)
ones = b"\1" * (size // mmap.PAGESIZE)
held[::mmap.PAGESIZE] = ones
worst = 0.0
rounds = 0


def done(signum, frame):
    print(f"max_stall {worst:.4f} rounds {rounds}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, done)
signal.signal(signal.SIGINT, done)
print("pid", os.getpid(), flush=True)
due = time.monotonic()
while True:
    due += args.period
    held[::mmap.PAGESIZE] = ones
    m = mmap.mmap(-1, 1 << 20)
    m[::mmap.PAGESIZE] = b"\1" * 256
    m.close()
    now = time.monotonic()
    late = now - due
    rounds += 1
    if late > worst:
        worst = late
    if late > 0.1:
        print(f"stall {late:.4f}", flush=True)
        due = now  # a stall is measured once, not carried into the next rounds
    elif due > now:
        time.sleep(due - now)
