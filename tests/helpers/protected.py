"""A stand-in for sshd (standard library only): named ``--name`` (prctl), it holds a little memory and, like a
daemon serving logins, allocates and frees a few MiB every 20 ms, so it faults while memory is short.

Prints ``pid <pid>`` once started. Runs until killed.
"""

import argparse
import ctypes
import mmap
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--name", default="sshd")
p.add_argument("--hold", type=float, default=16, help="MiB held")
p.add_argument("--churn", type=float, default=4, help="MiB allocated and freed every 20 ms")
args = p.parse_args()
ctypes.CDLL(None).prctl(15, args.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
held = mmap.mmap(-1, int(args.hold) << 20)
held[::mmap.PAGESIZE] = b"\1" * ((int(args.hold) << 20) // mmap.PAGESIZE)
print("pid", os.getpid(), flush=True)
size = int(args.churn) << 20
while True:
    m = mmap.mmap(-1, size)
    m[::mmap.PAGESIZE] = b"\1" * (size // mmap.PAGESIZE)
    m.close()
    time.sleep(0.02)
