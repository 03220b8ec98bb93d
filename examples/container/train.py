"""A stand-in trainer for the example image: it leaks memory until told to stop, then saves and exits."""

import signal
import sys
import time

held = []


def save_and_exit(signum, frame):
    print(f"train.py: signal {signum}: writing a checkpoint and exiting", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, save_and_exit)
print("train.py: training (and leaking 16 MiB a second)", flush=True)
while True:
    chunk = bytearray(16 << 20)
    chunk[::4096] = b"\1" * len(chunk[::4096])
    held.append(chunk)
    time.sleep(1.0)
