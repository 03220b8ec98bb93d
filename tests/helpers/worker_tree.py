"""A test worker that builds a process tree (standard library only).

    worker_tree.py fork4 MB   touch MB megabytes, fork 4 children that only read them, print "pids ..."
    worker_tree.py escape MB  fork a child that forks a grandchild; the grandchild calls setsid() and
                              allocates MB megabytes, slowly; print "sessions <main's> <grandchild's>" and
                              "pids <main> <child> <grandchild>"
    worker_tree.py doublefork MB  the classic daemon double fork: a child calls setsid(), forks a
                              grandchild and exits at once, so the grandchild is an orphan from its
                              first instant; it allocates MB megabytes; print "pids <main> <grandchild>"
"""

import os
import signal
import sys
import time

mode, mb = sys.argv[1], int(sys.argv[2])


def touch(n_mb):
    block = bytearray(n_mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return block


if mode == "fork4":
    data = touch(mb)
    kids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            total = 0
            for i in range(0, len(data), 4096):  # read only: pages stay shared
                total += data[i]
            while True:
                signal.pause()
        kids.append(pid)
    print("pids", os.getpid(), *kids, flush=True)
    while True:
        signal.pause()

elif mode == "doublefork":
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            held = touch(mb)
            os.write(w, f"{os.getpid()}\n".encode())
            while True:
                signal.pause()
        os._exit(0)  # the grandchild is orphaned at once
    os.waitpid(child, 0)
    grand = int(os.read(r, 64).split()[0])
    print("pids", os.getpid(), grand, flush=True)
    while True:
        signal.pause()

elif mode == "escape":
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        grand = os.fork()
        if grand == 0:
            os.setsid()
            os.write(w, f"{os.getpid()} {os.getsid(0)}\n".encode())
            held = []
            for _ in range(mb // 4):
                held.append(touch(4))
                time.sleep(0.05)
            while True:
                signal.pause()
        while True:
            signal.pause()
    grand, grand_sid = (int(x) for x in os.read(r, 64).split()[:2])
    print("sessions", os.getsid(0), grand_sid, flush=True)  # told before the allocation can get it killed
    print("pids", os.getpid(), child, grand, flush=True)
    while True:
        signal.pause()
