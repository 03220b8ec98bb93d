"""A leaky trial worker for the demo (standard library only).

It runs short "trials" while memguard's admission gate is open, and leaks
LEAK_MB_PER_S megabytes per second (times 1.5 for replica 1) into a cache
that is never freed, trials or not.
"""

import os
import signal
import sys
import time

replica = int(os.environ.get("MEMGUARD_REPLICA", "0"))
rate_mb = float(os.environ.get("LEAK_MB_PER_S", "8")) * (1.0 + 0.5 * replica)
gate = os.environ.get("MEMGUARD_ADMISSION_FILE")
cache = []  # the leak


def stop(signum, frame):
    print(f"got {signal.Signals(signum).name}: saving state and exiting", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)


def admitted():
    if not gate:
        return True
    try:
        with open(gate) as f:
            return f.read().startswith("open")
    except OSError:
        return True


def leak(seconds):
    """Grow the cache at the leak rate for `seconds`, touching every page."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cache.append(bytearray(os.urandom(16)) * (int(rate_mb * 1024 * 1024 / 10) // 16))
        time.sleep(0.1)


trial = 0
waiting = False
print(f"replica {replica}: leaking {rate_mb:g} MB/s", flush=True)
while True:
    if admitted():
        if waiting:
            print("admission open again: resuming trials", flush=True)
            waiting = False
        trial += 1
        leak(1.5)  # a trial
        print(f"trial {trial} done; cache {sum(len(c) for c in cache) >> 20} MiB", flush=True)
    else:
        if not waiting:
            print(f"admission closed: trial {trial + 1} waits (the leak goes on)", flush=True)
            waiting = True
        leak(0.5)
