"""A test worker (standard library only): allocates memory at a rate, optionally forks, prints its pids.

    worker_mem.py [--rate MB_PER_S] [--max MB] [--fork N] [--sigterm exit|ignore] [--report FIFO]
                  [--wait-fifo FIFO]

Prints one line ``pids <pid> <child pid>...`` once started, then allocates
``rate`` MB per second (touching every page) up to ``max`` MB, then holds.
Replica-specific behaviour comes from the environment: ``RATE_<replica>``
overrides --rate for that replica. With ``--report FIFO`` it also writes
``started <pid>`` there once started and ``terminated <pid>`` when SIGTERM
ends it: a test whose daemon cannot log (its output is broken on purpose)
still learns what happened. With ``--wait-fifo FIFO`` it allocates nothing
until the test opens that FIFO for writing (the go signal).
"""

import argparse
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--rate", type=float, default=0.0)
p.add_argument("--max", type=float, default=1e9)
p.add_argument("--fork", type=int, default=0)
p.add_argument("--sigterm", choices=["exit", "ignore"], default="exit")
p.add_argument("--report", help="a FIFO to write 'started <pid>' and 'terminated <pid>' to")
p.add_argument("--wait-fifo", help="allocate only once this FIFO is opened for writing")
args = p.parse_args()


def report(what: str) -> None:
    if not args.report:
        return
    try:
        fd = os.open(args.report, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # nobody reads it
    try:
        os.write(fd, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


if args.report and args.sigterm == "exit":
    def on_term(signum, frame):  # type: ignore[no-untyped-def]
        report("terminated")
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)

replica = os.environ.get("MEMGUARD_REPLICA", "0")
rate = float(os.environ.get(f"RATE_{replica}", args.rate))
if args.sigterm == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

children = []
for _ in range(args.fork):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            signal.pause()
    children.append(pid)

print("pids", os.getpid(), *children, flush=True)
report("started")
if args.wait_fifo:
    os.close(os.open(args.wait_fifo, os.O_RDONLY))  # blocks until the test opens the other end

held = []
chunk_mb = 4
start = time.monotonic()
allocated = 0.0
while True:
    if rate > 0 and allocated < args.max:
        due = (time.monotonic() - start) * rate
        while allocated + chunk_mb <= due and allocated < args.max:
            block = bytearray(chunk_mb * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            held.append(block)
            allocated += chunk_mb
        time.sleep(0.005)
    else:
        signal.pause()
sys.exit(0)
