"""Many fast trials on memguard.client (test helper): a shared counter hands out trial numbers.

    worker_fast_trials.py DIR TOTAL

Each trial runs inside ``memguard.trial()``, takes the next number n < TOTAL from DIR/counter (under an
exclusive lock), sleeps TRIAL_MS milliseconds (default 1) and appends n to DIR/done. Nothing leaks. The
worker exits 0 when no trial is left.
"""

import fcntl
import os
import sys
import time

import memguard.client as mg

root, total = sys.argv[1], int(sys.argv[2])
trial_s = float(os.environ.get("TRIAL_MS", "1")) / 1000.0
os.makedirs(root, exist_ok=True)


def take() -> int | None:
    with open(f"{root}/counter", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0)
        if n >= total:
            return None
        f.seek(0)
        f.truncate()
        f.write(str(n + 1))
        return n


while True:
    with mg.trial(wait_timeout=120):
        n = take()
        if n is None:
            break
        time.sleep(trial_s)
        with open(f"{root}/done", "a") as f:
            f.write(f"{n}\n")
print("no trial left", flush=True)
