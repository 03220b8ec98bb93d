"""The watcher against the real kernel: cgroup v1 usage thresholds wake it without polling.

A watcher over a real memory cgroup is given a band whose low edge lies
64 MiB below the cgroup's current available memory, with no backstop poll
in the window: while nothing happens it reads nothing; when a child in the
cgroup allocates past the edge, the kernel's eventfd wakes it, it reads
once and reports the crossing.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from daemonkit import make_cgroup
from memguard.model import WatchPlan
from memguard.sense.watch import CgroupProbe, Target, Watcher

MiB = 1024**2


@pytest.fixture
def memcg():
    cg = make_cgroup(512 * MiB)
    yield cg
    cg.cleanup()


def test_a_kernel_threshold_wakes_the_watcher_without_polling(memcg):
    """With a v1 usage threshold armed, the watcher reads the scope only when the kernel signals: the
    checks it makes equal the kernel's wake-ups, and a child allocating 128 MiB past the band's edge is
    reported as a crossing of the low edge."""
    if memcg.version != 1:
        pytest.skip("usage threshold notifications exist on cgroup v1 only (v2 polls)")
    probe = CgroupProbe(str(memcg.path), 1)
    total = float(512 * MiB)
    woke = threading.Event()
    w = Watcher(probe)
    w.start(woke.set)
    try:
        available = probe.read(total, precise=True)
        assert available is not None
        plan = WatchPlan(low_bytes=available - 64 * MiB, stop=True, max_interval_s=3600.0)
        w.watch(Target(plan, total))
        assert w.checked.wait(10), "the watcher never read the scope"
        assert w.stats()["mode"] == "kernel", w.stats()
        polls, wakes = w.polls, w.kernel_wakes
        # Left alone for a second (a window to count in, not a synchronisation): polling at this headroom
        # (64 MiB / 6000 MiB/s, about every 10 ms) would read about 100 times; waiting on the kernel, never.
        threading.Event().wait(1.0)
        assert w.polls == polls and not woke.is_set(), w.stats()
        child = subprocess.Popen(memcg.wrap([sys.executable, "-c", (
            "import mmap,sys; m=mmap.mmap(-1, 128<<20); m.write(b'x'*(128<<20)); sys.stdin.read()")]),
            stdin=subprocess.PIPE)
        try:
            assert woke.wait(30), f"no crossing reported: {w.stats()}"
            crossing = w.take()
            assert crossing is not None and crossing.low and crossing.stop
            assert crossing.available is not None and crossing.available <= plan.low_bytes
            assert w.kernel_wakes > wakes, "the crossing was seen by a poll, not signalled by the kernel"
        finally:
            child.kill()
            child.wait(10)
    finally:
        w.close()


def test_without_kernel_thresholds_the_watcher_polls_at_the_headroom_pace(memcg):
    """Told not to use kernel thresholds (as on cgroup v2 or for the host), the watcher polls: a crossing is
    still seen, by a read, and the mode says so."""
    probe = CgroupProbe(str(memcg.path), memcg.version)
    total = float(512 * MiB)
    woke = threading.Event()
    w = Watcher(probe, kernel_thresholds=False)
    w.start(woke.set)
    try:
        available = probe.read(total, precise=True)
        assert available is not None
        w.watch(Target(WatchPlan(low_bytes=available - 64 * MiB, max_interval_s=0.05), total))
        assert w.checked.wait(10)
        child = subprocess.Popen(memcg.wrap([sys.executable, "-c", (
            "import mmap,sys; m=mmap.mmap(-1, 128<<20); m.write(b'x'*(128<<20)); sys.stdin.read()")]),
            stdin=subprocess.PIPE)
        try:
            assert woke.wait(30), f"no crossing reported: {w.stats()}"
            assert w.stats()["mode"] == "polling" and w.kernel_wakes == 0 and w.polls >= 2
            assert w.take().low
        finally:
            child.kill()
            child.wait(10)
    finally:
        w.close()


def test_a_rule_on_the_trend_wakes_the_watcher_before_its_threshold(memcg):
    """With a rule on the trend in the plan (a threshold 400 MiB below the cgroup's available memory,
    ``within: 10s``), a child filling the cgroup at about 100 MiB/s makes the watcher wake the daemon long
    before the threshold: the rate of its own readings, projected 10 s ahead, reaches it. The watcher polls
    for such a rule even where the kernel could notify (a usage threshold knows no rate), and hands the
    readings it made to the daemon (the core's fill rate is built from them)."""
    probe = CgroupProbe(str(memcg.path), memcg.version)
    total = float(512 * MiB)
    woke = threading.Event()
    w = Watcher(probe)
    w.start(woke.set)
    try:
        available = probe.read(total, precise=True)
        assert available is not None
        threshold = available - 400 * MiB
        plan = WatchPlan(low_bytes=threshold, trends=((threshold, 10.0),), max_interval_s=0.05)
        w.watch(Target(plan, total))
        assert w.checked.wait(10)
        child = subprocess.Popen(memcg.wrap([sys.executable, "-c", (
            "import mmap,sys,time\nm=mmap.mmap(-1, 300<<20)\nfor i in range(300):\n"
            "    m[i<<20:(i+1)<<20]=b'x'*(1<<20); time.sleep(0.01)\nsys.stdin.read()")]),
            stdin=subprocess.PIPE)
        try:
            assert woke.wait(30), f"no crossing reported: {w.stats()}"
            crossing = w.take()
            assert crossing is not None and crossing.low
            assert crossing.available is not None and crossing.available > threshold + 100 * MiB, \
                "woken by the level, not by the trend"
            assert "trend" in str(w.stats()["mode"]) and w.kernel_wakes == 0
            readings = w.recent()
            assert len(readings) >= 2 and readings[0][1] > readings[-1][1], readings
        finally:
            child.kill()
            child.wait(10)
    finally:
        w.close()


def test_psi_triggers_arm_with_a_2s_window_and_are_watched_for_priority_events():
    """A PSI trigger on /proc/pressure/memory arms with a 2 s window (an fd the waiter watches for EPOLLPRI
    only: the file is always readable), and a window the kernel refuses comes back as a reason, not an
    exception."""
    import os

    from memguard.sense.notify import Waiter, arm_psi_trigger

    if not os.path.exists("/proc/pressure/memory"):
        pytest.skip("no PSI on this kernel (/proc/pressure/memory is missing)")
    fd = arm_psi_trigger("/proc/pressure/memory", "some", 150_000, 2_000_000)
    if isinstance(fd, str) and "Permission" in fd:
        pytest.skip(f"PSI triggers need more privileges here: {fd}")
    assert isinstance(fd, int), fd
    w = Waiter()
    try:
        w.add(fd, priority=True)
        w.poke()
        assert w.wait(0) in ([], [fd])  # the poke is drained; a stall may or may not have fired meanwhile
    finally:
        w.close()
        os.close(fd)
    bad = arm_psi_trigger("/proc/pressure/memory", "some", 150_000, 123_456_789)  # over the 10 s maximum
    assert isinstance(bad, str) and "refused" in bad
