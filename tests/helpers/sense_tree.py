"""Builds process trees for tests/test_sense.py (run as a program, not imported).

    python sense_tree.py shared MB N
        Touch MB MiB of private anonymous memory, fork N children that only
        read every page (so the pages stay shared), then print
        "ready <main> <child>..." once every child has read.
    python sense_tree.py orphan MB
        Fork C; C forks G; G calls setsid(), names itself "sense-grandkid"
        and touches MB MiB. Print "ready <main> <C> <G>". When C dies (the
        test kills it) reap it and print "reaped <C>": G is then an orphan
        reparented away from the tree.
    python sense_tree.py alloc MB
        Touch MB MiB and print "ready <pid>".

Every process exits when its stdin reaches end of file (the test closes
it, or dies), so nothing outlives the test even if it crashes.
"""

import mmap
import os
import sys

MIB = 1 << 20


def touch(mb):
    buf = mmap.mmap(-1, mb * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = b"\x01" * MIB
    for i in range(mb):
        buf[i * MIB:(i + 1) * MIB] = chunk
    return buf


def read_every_page(buf):
    pages = bytes(memoryview(buf)[::mmap.PAGESIZE])  # one byte of every page, no write
    assert pages.count(1) == len(buf) // mmap.PAGESIZE


def say(fd, text):
    os.write(fd, (text + "\n").encode())


def lines_from(fd, n):
    data = b""
    while data.count(b"\n") < n:
        chunk = os.read(fd, 4096)
        if not chunk:
            raise SystemExit("a child died before reporting")
        data += chunk
    return data.decode().split()


def block_until_stdin_eof():
    while os.read(0, 4096):
        pass
    os._exit(0)


def shared(mb, n):
    buf = touch(mb)
    r, w = os.pipe()
    for _ in range(n):
        if os.fork() == 0:
            os.close(r)
            read_every_page(buf)
            say(w, str(os.getpid()))
            block_until_stdin_eof()
    os.close(w)
    kids = lines_from(r, n)
    say(1, " ".join(["ready", str(os.getpid())] + kids))
    block_until_stdin_eof()


def orphan(mb):
    r, w = os.pipe()
    c = os.fork()
    if c == 0:
        os.close(r)
        if os.fork() == 0:
            os.setsid()
            with open("/proc/self/comm", "w") as f:
                f.write("sense-grandkid")
            buf = touch(mb)  # noqa: F841 (kept alive until exit)
            say(w, "G" + str(os.getpid()))
            block_until_stdin_eof()
        block_until_stdin_eof()
    os.close(w)
    g = lines_from(r, 1)[0][1:]
    say(1, f"ready {os.getpid()} {c} {g}")
    os.waitpid(c, 0)
    say(1, f"reaped {c}")
    block_until_stdin_eof()


def alloc(mb):
    buf = touch(mb)  # noqa: F841
    say(1, f"ready {os.getpid()}")
    block_until_stdin_eof()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"shared": shared, "orphan": orphan, "alloc": alloc}[mode](*map(int, args))
