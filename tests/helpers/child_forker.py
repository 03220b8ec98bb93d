"""A worker for the children tests: forks one child, prints its pid, waits.

usage: child_forker.py [--setsid] [--exit] [--child-exit-after SECONDS] [--child-exit-on-usr1]

--setsid                 the child calls setsid(): it escapes the worker's
                         process group and session
--exit                   the worker exits right after printing the pid, so
                         its child becomes an orphan
--child-exit-after S     the child exits after S seconds (default: never)
--child-exit-on-usr1     the child exits when it gets SIGUSR1 (the test says when)
"""

import os
import signal
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    setsid = "--setsid" in args
    exit_now = "--exit" in args
    child_after = None
    if "--child-exit-after" in args:
        child_after = float(args[args.index("--child-exit-after") + 1])
    on_usr1 = "--child-exit-on-usr1" in args
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        if on_usr1:
            signal.signal(signal.SIGUSR1, lambda *_: os._exit(0))
        if setsid:
            os.setsid()
        os.close(ready_w)  # tells the parent the child is set up
        if child_after is not None:
            time.sleep(child_after)  # the child's own behaviour, not synchronisation
            os._exit(0)
        while True:
            signal.pause()
    os.close(ready_w)
    os.read(ready_r, 1)  # EOF once the child has called setsid() (if asked)
    os.close(ready_r)
    print(pid, flush=True)
    if exit_now:
        os._exit(0)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
