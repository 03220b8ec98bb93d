"""sense/: readings of the real machine, real process trees and real cgroups.

No mocks and no sleeping: processes report readiness through a pipe that
the test reads with select() and a deadline, and every process a test
starts is killed and waited for (pidfds for the ones that are not our
children) before the test ends.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from memguard.model import Pressure, ScopeMemory, Unknown, WorkerSample, is_known
from memguard.sense.cgroup import (
    CgroupError,
    MemoryCgroup,
    ScopeError,
    cgroup_scope,
    choose_scope,
    find_own_cgroup,
)
from memguard.sense.host import host_scope, read_meminfo
from memguard.sense.psi import read_pressure
from memguard.act.cgroups import create_cgroup, remove_cgroup, set_memory_limit
from memguard.sense.procs import children_reader, process_start_time, sample_tree
from memguard.sense.cgroup import locate_memory_cgroup
from memguard.sense.host import host_totals
from memguard.sense.psi import PSI_MEMORY_PATH

MIB = 1 << 20
HELPER = str(Path(__file__).parent / "helpers" / "sense_tree.py")
DEADLINE_S = 20.0


# ---------------------------------------------------------------------------
# Process plumbing


class Running:
    """A helper program we started, and the processes it reported."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        self.pidfds: dict[int, int] = {}

    def line(self, timeout: float = DEADLINE_S) -> list[str]:
        """The next line the helper prints, waiting with select() up to ``timeout`` seconds."""
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"helper {self.proc.args} said nothing within {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"helper {self.proc.args} exited ({self.proc.wait()}) before saying anything")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().split()

    def watch(self, *pids: int) -> None:
        """Hold a pidfd on each process so it can be killed and waited for without pid reuse."""
        for pid in pids:
            if pid not in self.pidfds and pid != self.proc.pid:
                self.pidfds[pid] = os.pidfd_open(pid)

    def kill(self, pid: int) -> None:
        """SIGKILL one watched descendant and wait (select on its pidfd) until it has exited."""
        fd = self.pidfds[pid]
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        ready, _, _ = select.select([fd], [], [], DEADLINE_S)
        assert ready, f"process {pid} did not die"

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()  # every helper process exits at stdin EOF
        for pid, fd in self.pidfds.items():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([fd], [], [], DEADLINE_S)
            os.close(fd)
        self.pidfds.clear()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)
        self.proc.stdout.close()


@pytest.fixture
def run():
    started: list[Running] = []

    def start(*args: str, prefix: list[str] | None = None) -> Running:
        r = Running((prefix or []) + [sys.executable, HELPER, *args])
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


# ---------------------------------------------------------------------------
# Host, PSI


def test_host_scope_agrees_with_psutil():
    """host_scope() and read_meminfo() read the same numbers psutil reads from /proc/meminfo."""
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    scope = host_scope()
    info = read_meminfo()
    assert isinstance(scope, ScopeMemory) and scope.kind == "host"
    assert scope.total_bytes == vm.total == info["MemTotal"]
    assert abs(scope.available_bytes - vm.available) < 256 * MIB
    assert scope.swap_total_bytes == swap.total
    assert abs(scope.swap_free_bytes - swap.free) < 256 * MIB
    assert isinstance(scope.oom_kills, int) and scope.oom_kills >= 0
    assert info["MemAvailable"] % 1024 == 0  # kB converted to bytes


def test_host_scope_unreadable_files_give_unknown(tmp_path):
    """A missing meminfo/vmstat makes the affected fields Unknown with a reason; nothing raises."""
    scope = host_scope(meminfo_path=str(tmp_path / "nope"), vmstat_path=str(tmp_path / "nope2"))
    for value in (scope.total_bytes, scope.available_bytes, scope.swap_total_bytes, scope.swap_free_bytes):
        assert isinstance(value, Unknown) and "nope" in value.reason
    assert isinstance(scope.oom_kills, Unknown) and "nope2" in scope.oom_kills.reason
    assert read_meminfo(str(tmp_path / "nope")) == {}
    partial = tmp_path / "meminfo"
    partial.write_text("MemTotal:       1000 kB\nMemFree:        500 kB\n")
    scope = host_scope(meminfo_path=str(partial), oom_kills=False)
    assert scope.total_bytes == 1024000
    assert isinstance(scope.available_bytes, Unknown) and "MemAvailable" in scope.available_bytes.reason


def test_host_scope_is_cheap():
    """host_scope() costs far below a millisecond of CPU a call (it runs up to ~1000 times a second);
    CPU time of this thread, so time the machine gave to others does not count."""
    host_scope()
    n = 2000
    t0 = time.thread_time()
    for _ in range(n):
        host_scope()
    per_call = (time.thread_time() - t0) / n
    assert per_call < 500e-6, f"host_scope took {per_call * 1e6:.0f} µs a call"


def test_pressure_real_file_documented_format_and_missing(tmp_path):
    """PSI reads the real file when present, parses the documented format, and a missing file is Unknown."""
    real = read_pressure()
    if os.path.exists(PSI_MEMORY_PATH):
        assert all(isinstance(v, float) and 0.0 <= v <= 100.0
                   for v in (real.some_avg10, real.some_avg60, real.full_avg10, real.full_avg60))
    else:
        assert isinstance(real.some_avg10, Unknown)
    f = tmp_path / "memory"
    f.write_text("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n"
                 "full avg10=0.75 avg60=0.10 avg300=0.00 total=678\n")
    assert read_pressure(str(f)) == Pressure(1.5, 0.25, 0.75, 0.1, 0.012345, 0.000678)  # total= in µs -> s
    f.write_text("some avg10=3.00 avg60=2.00 avg300=1.00 total=1\n")  # no 'full' line
    p = read_pressure(str(f))
    assert (p.some_avg10, p.some_avg60) == (3.0, 2.0) and isinstance(p.full_avg10, Unknown)
    f.write_text("garbage\n")
    assert isinstance(read_pressure(str(f)).some_avg10, Unknown)
    missing = read_pressure(str(tmp_path / "absent"))
    assert isinstance(missing.some_avg10, Unknown) and "absent" in missing.some_avg10.reason
    assert isinstance(missing.full_avg60, Unknown)


# ---------------------------------------------------------------------------
# Process trees


def test_forked_tree_counts_shared_pages_once(run):
    """A 400 MiB parent with 4 forked readers counts ~400 MiB (PSS), not 5x; the ppid-scan fallback agrees."""
    helper = run("shared", "400", "4")
    ready = helper.line()
    assert ready[0] == "ready"
    main, *kids = map(int, ready[1:])
    helper.watch(*kids)
    assert main == helper.proc.pid

    start = process_start_time(main)
    s = sample_tree("trainer", main, start, protect=())
    assert isinstance(s, WorkerSample) and s.worker == "trainer" and s.pid == main
    assert s.processes == 5 and s.source == "tree" and s.protected is False
    assert is_known(s.memory_bytes)
    assert abs(s.memory_bytes - 400 * MIB) < 0.2 * 400 * MIB, s.memory_bytes / MIB
    rss_sum = sum(psutil.Process(p).memory_info().rss for p in [main, *kids])
    assert rss_sum > 4 * s.memory_bytes  # what naive RSS summing would say

    members = s.members
    assert members[0] == (main, start)  # the main process first
    assert {p for p, _ in members} == {main, *kids}

    scan = sample_tree("trainer", main, start, children=children_reader(use_children_files=False))
    assert scan.processes == 5
    assert abs(scan.memory_bytes - s.memory_bytes) < 0.1 * s.memory_bytes

    exe = os.path.basename(sys.executable)
    names: dict = {}
    assert sample_tree("trainer", main, start, protect={exe}, names=names).protected  # argv[0] basename matches
    assert len(names) >= 1  # names are cached per (pid, start time)
    assert not sample_tree("trainer", main, start, protect={"no-such-program"}, names=names).protected


def test_setsid_grandchild_of_dead_parent_still_counts(run):
    """A grandchild that called setsid() stays in the worker after its parent exits and it is reparented."""
    helper = run("orphan", "64")
    tag, main, child, grandchild = helper.line()
    assert tag == "ready"
    main, child, grandchild = int(main), int(child), int(grandchild)
    helper.watch(child, grandchild)

    start = process_start_time(main)
    before = sample_tree("w", main, start, protect={"sense-grandkid"})
    assert before.processes == 3 and before.protected  # protected through the grandchild's comm
    assert {p for p, _ in before.members} == {main, child, grandchild}

    helper.kill(child)
    assert helper.line() == ["reaped", str(child)]  # the main process reaped it: the grandchild is orphaned
    assert psutil.Process(grandchild).ppid() not in (main, child)
    assert os.getsid(grandchild) == grandchild

    lost = sample_tree("w", main, start, protect={"sense-grandkid"})  # without the recorded members...
    assert {p for p, _ in lost.members} == {main}  # ...a walk from the main process cannot find it
    after = sample_tree("w", main, start, before.members, protect={"sense-grandkid"})
    assert {p for p, _ in after.members} == {main, grandchild}
    assert after.processes == 2 and after.protected
    assert after.memory_bytes > 60 * MIB  # the grandchild's 64 MiB still counts

    helper.kill(grandchild)
    gone = sample_tree("w", main, start, after.members, protect={"sense-grandkid"})
    assert gone.processes == 1 and not gone.protected
    assert gone.memory_bytes < after.memory_bytes - 50 * MIB


def test_pid_reuse_guard_and_gone_worker(run):
    """A wrong start time for a pid reads as a replaced process (Unknown memory); so does a reaped one."""
    helper = run("alloc", "8")
    tag, pid = helper.line()
    pid = int(pid)
    start = process_start_time(pid)
    assert isinstance(start, int)
    ticks = os.sysconf("SC_CLK_TCK")
    assert abs(psutil.boot_time() + start / ticks - psutil.Process(pid).create_time()) < 1.0

    s = sample_tree("w", pid, start + 1)
    assert isinstance(s.memory_bytes, Unknown) and "another process" in s.memory_bytes.reason
    assert s.processes == 0
    assert s.members == ()

    s = sample_tree("w", pid, start)
    assert is_known(s.memory_bytes) and s.memory_bytes > 8 * MIB and s.processes == 1

    helper.proc.kill()
    helper.proc.wait()
    s = sample_tree("w", pid, start, s.members)
    assert isinstance(s.memory_bytes, Unknown) and s.processes == 0 and s.members == ()
    assert process_start_time(pid) is None or process_start_time(pid) != start


# ---------------------------------------------------------------------------
# Cgroups


@pytest.fixture
def limited_cgroup():
    """A child of our own memory cgroup with a 256 MiB limit, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    own = find_own_cgroup()
    if own is None:
        pytest.skip("this process is in no memory cgroup (no v1 memory hierarchy, no cgroup2 memory controller)")
    if not os.access(own.path, os.W_OK):
        pytest.skip(f"our memory cgroup {own.path} is not writable")
    try:
        cg = create_cgroup(own, f"memguard-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    except (OSError, CgroupError) as e:
        pytest.skip(f"cannot create a child memory cgroup under {own.path}: {e}")
    try:
        set_memory_limit(cg, 256 * MIB)
        yield cg
    finally:
        if os.path.isdir(cg.path):  # a test may have removed it already
            for pid in cg.pids():  # anything a failed test left behind: kill it and wait until it is out
                fd = os.pidfd_open(pid)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                select.select([fd], [], [], DEADLINE_S)
                os.close(fd)
            remove_cgroup(cg)
        assert not os.path.exists(cg.path)


def in_cgroup(cg: MemoryCgroup) -> list[str]:
    """argv prefix that joins the cgroup before exec'ing the rest (so every page is charged there)."""
    return ["sh", "-c", 'echo $$ > "$0" && shift && exec "$@"', cg.path + "/cgroup.procs", "--"]


@pytest.mark.root
def test_cgroup_working_set_and_scope(limited_cgroup, run):
    """A process touching 100 MiB in a 256 MiB cgroup: working set, limit and cgroup_scope add up."""
    cg = limited_cgroup
    assert cg.limit_bytes() == 256 * MIB
    helper = run("alloc", "100", prefix=in_cgroup(cg))
    tag, pid = helper.line()
    assert cg.pids() == [int(pid)] == [helper.proc.pid]

    ws = cg.working_set_bytes()
    usage = cg.usage_bytes()
    assert 100 * MIB <= ws <= usage
    assert ws < 100 * MIB + 60 * MIB, ws / MIB
    assert cg.oom_kills() == 0

    host_total = host_totals()[0]
    scope = cgroup_scope(cg, host_total)
    ws_after = cg.working_set_bytes()
    assert scope.kind == "cgroup" and scope.path == cg.path
    assert scope.total_bytes == 256 * MIB
    low, high = sorted((256 * MIB - ws, 256 * MIB - ws_after))
    assert low - 2 * MIB <= scope.available_bytes <= high + 2 * MIB
    assert scope.oom_kills == 0
    assert cg.pressure_path() is None if cg.version == 1 else cg.pressure_path().endswith("memory.pressure")

    assert MemoryCgroup.from_path(cg.path) == cg
    with pytest.raises(CgroupError, match="still holds processes"):
        remove_cgroup(cg)  # kills nothing


@pytest.mark.root
def test_limit_changes_and_removed_cgroup_read_live(limited_cgroup):
    """Kept-open files read live values: a new limit shows at once, a removed cgroup reads Unknown."""
    cg = limited_cgroup
    watcher = MemoryCgroup(cg.version, cg.path)
    assert watcher.limit_bytes() == 256 * MIB
    set_memory_limit(cg, None)
    assert watcher.limit_bytes() is None and cg.limit_bytes() is None
    set_memory_limit(cg, 128 * MIB)
    assert watcher.limit_bytes() == 128 * MIB
    remove_cgroup(cg)
    assert not os.path.exists(cg.path)
    scope = cgroup_scope(watcher, host_totals()[0])
    assert isinstance(scope.total_bytes, Unknown) and isinstance(scope.available_bytes, Unknown)
    assert isinstance(scope.oom_kills, Unknown) and isinstance(watcher.limit_bytes(), Unknown)


@pytest.mark.root
def test_choose_scope_auto_picks_limited_cgroup(limited_cgroup):
    """From inside the 256 MiB cgroup choose_scope('auto') guards the cgroup; outside it, 'host' is the host."""
    code = (
        "from memguard.sense.cgroup import choose_scope; r = choose_scope('auto'); s = r.read(); "
        "print(r.kind, s.total_bytes, s.path); print(r.description)"
    )
    out = subprocess.run(
        in_cgroup(limited_cgroup) + [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=DEADLINE_S,
    )
    assert out.returncode == 0, out.stderr
    kind, total, path = out.stdout.splitlines()[0].split()
    assert (kind, int(total), path) == ("cgroup", 256 * MIB, limited_cgroup.path)

    assert choose_scope("host").kind == "host"
    assert choose_scope("host").read().kind == "host"
    with pytest.raises(ValueError, match="scope must be"):
        choose_scope("container")
    own = find_own_cgroup()
    if own is None or own.limit_bytes() is None:
        with pytest.raises(ScopeError, match="cgroup was asked for"):
            choose_scope("cgroup")
        assert choose_scope("auto").kind == "host"


def test_cgroup_v2_layout_is_read_through_the_same_interface(tmp_path):
    """cgroup v2 files (this machine has no v2 memory controller, so a directory with the kernel's
    formats stands in): detection via mountinfo, tightest memory.max up the tree, working set,
    oom_kill from memory.events, swap figures, memory.pressure."""
    root = tmp_path / "cg"
    leaf = root / "pod" / "ctr"
    leaf.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")  # the root: no memory.max
    (root / "pod" / "cgroup.controllers").write_text("memory pids\n")
    (root / "pod" / "memory.max").write_text(f"{512 * MIB}\n")
    (root / "pod" / "memory.swap.max").write_text("max\n")
    files = {
        "cgroup.controllers": "memory\n",
        "memory.max": "max\n",
        "memory.current": f"{300 * MIB}\n",
        "memory.stat": f"anon {200 * MIB}\nfile {100 * MIB}\nactive_file {40 * MIB}\n"
                       f"inactive_file {60 * MIB}\nshmem 0\n",
        "memory.events": "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n",
        "memory.swap.current": f"{10 * MIB}\n",
        "memory.swap.max": f"{64 * MIB}\n",
        "memory.pressure": "some avg10=4.00 avg60=1.00 avg300=0.00 total=9\n"
                           "full avg10=2.00 avg60=0.50 avg300=0.00 total=3\n",
    }
    for name, text in files.items():
        (leaf / name).write_text(text)
    mountinfo = (
        f"25 1 0:22 / /proc rw - proc proc rw\n"
        f"30 25 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    cg = locate_memory_cgroup("0::/pod/ctr\n", mountinfo)
    assert cg == MemoryCgroup(2, str(leaf))
    assert locate_memory_cgroup("0::/pod/ctr\n", "25 1 0:22 / /proc rw - proc proc rw\n") is None
    assert locate_memory_cgroup("0::/../elsewhere\n", mountinfo) is None

    assert cg.limit_bytes() == 512 * MIB  # the parent's limit is the tighter one
    assert cg.usage_bytes() == 300 * MIB
    assert cg.working_set_bytes() == 240 * MIB
    assert cg.oom_kills() == 2
    assert (cg.swap_limit(), cg.swap_usage()) == (64 * MIB, 10 * MIB)
    assert cg.pressure_path() == str(leaf / "memory.pressure")
    assert cg.pressure() == Pressure(4.0, 1.0, 2.0, 0.5, 9e-06, 3e-06)

    scope = cgroup_scope(cg, 16 << 30, host_swap_total=1 << 30)
    assert scope == ScopeMemory("cgroup", 512 * MIB, 272 * MIB, 64 * MIB, 54 * MIB, 2, str(leaf))
    assert cgroup_scope(cg, 256 * MIB).total_bytes == 256 * MIB  # capped at the host's MemTotal
    assert cgroup_scope(cg, 256 * MIB).available_bytes == 16 * MIB

    (leaf / "memory.stat").write_text(f"anon {400 * MIB}\n")  # inactive_file missing
    assert isinstance(cgroup_scope(cg, 16 << 30).available_bytes, Unknown)


def test_io_counters_are_read_only_when_asked_and_cpu_time_comes_with_the_tree():
    """sample_tree(io=False) leaves the I/O counters unread (IO_NOT_READ: no /proc/<pid>/io opened, only
    worker.idle and worker.quiet need them) but still gives the tree's CPU time from the stat reads that
    found it; io=True sums rchar + wchar over the tree, which a process writing to a pipe moves."""
    from memguard.model import IO_NOT_READ

    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfor _ in range(5000): sys.stdout.write('x' * 100)\n"
                              "sys.stdout.flush()\nsum(range(3_000_000))\ntime.sleep(30)"],
                             stdout=subprocess.DEVNULL)
    try:
        start = process_start_time(child.pid)
        deadline = time.monotonic() + 10
        with_io = sample_tree("w", child.pid, start, io=True)
        while (not isinstance(with_io.io_bytes, int) or with_io.io_bytes < 500_000
               or not with_io.cpu_seconds) and time.monotonic() < deadline:
            os.sched_yield()
            with_io = sample_tree("w", child.pid, start, io=True)
        without = sample_tree("w", child.pid, start, io=False)
        assert with_io.io_bytes >= 500_000
        assert without.io_bytes is IO_NOT_READ
        assert is_known(without.cpu_seconds) and without.cpu_seconds > 0
    finally:
        child.kill()
        child.wait()
