"""A trial worker on memguard.client (test helper): claims trials from a shared directory, leaks per trial.

    worker_trials.py DIR TOTAL

Each trial claims the next free number n < TOTAL (an O_EXCL file in DIR/claims), runs inside
``memguard.trial()``, leaks LEAK_MB_<replica> (default 50) megabytes that are never freed, and marks
DIR/done/n. The worker exits 0 when no trial is left.
"""

import os
import sys
import time

import memguard.client as mg

root, total = sys.argv[1], int(sys.argv[2])
replica = os.environ.get("MEMGUARD_REPLICA", "0")
leak_mb = int(os.environ.get(f"LEAK_MB_{replica}", "50"))
os.makedirs(f"{root}/claims", exist_ok=True)
os.makedirs(f"{root}/done", exist_ok=True)
leaked = []


def claim():
    for n in range(total):
        if os.path.exists(f"{root}/done/{n}"):
            continue
        try:
            os.close(os.open(f"{root}/claims/{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            continue
    return None


print("pids", os.getpid(), flush=True)
while True:
    with mg.trial(name="claiming", wait_timeout=120):
        n = claim()
        if n is None:
            break
        block = bytearray(leak_mb * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        leaked.append(block)
        time.sleep(0.4)
        open(f"{root}/done/{n}", "w").close()
    print(f"trial {n} done", flush=True)
print("no trial left", flush=True)
