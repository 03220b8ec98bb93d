"""A worker whose ballast the test steers (test helper, memguard.client).

    worker_gate.py CONTROL_FILE [--retry-timeout SECONDS]

A thread keeps the worker's ballast at the number of megabytes written in CONTROL_FILE. The main loop
runs 100 ms trials through memguard.trial(); with --retry-timeout a trial that waits longer gives up
(AdmissionTimeout) and tries again, each attempt counting as a refused trial.
"""

import os
import sys
import threading
import time

import memguard.client as mg

control = sys.argv[1]
retry = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--retry-timeout" else None
ballast = []


def steer():
    while True:
        try:
            want = int(open(control).read().strip() or 0)
        except (OSError, ValueError):
            want = 0
        while len(ballast) < want:
            b = bytearray(1024 * 1024)
            for i in range(0, len(b), 4096):
                b[i] = 1
            ballast.append(b)
        del ballast[want:]
        time.sleep(0.05)


threading.Thread(target=steer, daemon=True).start()
print("pids", os.getpid(), flush=True)
n = 0
while True:
    n += 1
    try:
        with mg.trial(name=f"t{n}", wait_timeout=retry if retry is not None else 600):
            print(f"trial {n} start", flush=True)
            time.sleep(0.1)
    except mg.AdmissionTimeout:
        print(f"trial {n} gave up waiting", flush=True)
