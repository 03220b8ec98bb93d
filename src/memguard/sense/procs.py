"""Per-worker accounting of a whole process tree, each shared page counted once.

A worker is its main process plus every descendant. :func:`walk_tree`
finds the descendants by following ``/proc/<pid>/task/<tid>/children``
from the main process (no scan of all of ``/proc``; on a kernel without
those files, one ``psutil.process_iter`` ppid scan per sample instead),
plus every descendant recorded before, by pid *and* start time: a
grandchild that called ``setsid()`` and was reparented (to memguard, a
child subreaper) after its parent died still belongs to the worker while
it lives. The records live with the actor (:class:`~memguard.model.LiveWorker`);
a sample hands back what it found (``WorkerSample.members``) for it to
record. A member whose pid is gone, or whose start time changed (the pid
was reused), is dropped.

These are pure functions of ``/proc``: safe in a reader thread.

Memory is the sum over the tree of ``Pss + SwapPss`` from
``/proc/<pid>/smaps_rollup``: a page mapped by n processes of the tree
adds 1/n to each, so a 400 MB parent with 4 forked readers counts about
400 MB, not 2 GB. Where smaps_rollup cannot be read for a member,
``RssAnon + RssShmem`` from ``/proc/<pid>/status`` stands in. A member
that vanishes mid-read is skipped; an unreadable (or replaced) main
process makes the memory :class:`~memguard.model.Unknown`.

Nothing here raises on a vanished process or an unreadable file, and
nothing logs. Reading smaps_rollup walks the page tables of the process,
so a sample costs roughly in proportion to the tree's resident memory:
meant for the daemon's full ticks, not its fast path.
"""

from __future__ import annotations

import os
from typing import Callable, Collection, Iterable, Mapping, NamedTuple

from memguard.model import IO_NOT_READ, Unknown, WorkerSample
from memguard.sense.host import field_int
from memguard.sense.procstat import ProcStat, read_stat

__all__ = ["walk_tree", "sample_tree", "children_reader", "process_start_time", "NameCache", "own_children",
           "environ_marker", "Adopted", "find_adopted", "resident_bytes", "tree_resident_bytes", "cgroup_tree"]

_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC

ChildrenOf = Callable[[int, int], Iterable[int]]


def _read(path: str, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a file, in one read. Raises OSError."""
    fd = os.open(path, _O_FLAGS)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes:
    fd = os.open(path, _O_FLAGS)
    try:
        data = os.read(fd, 4096)
        if len(data) < 4096:
            return data
        parts = [data]
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


_stat = read_stat


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22); None if gone.

    A pid plus its start time names one process for good: a reused pid
    has a different start time.
    """
    st = _stat(pid)
    return None if st is None else st.start


def _children_from_files(pid: int, threads: int) -> list[int]:
    """Children of every thread of ``pid`` (the kernel lists a child under the thread that forked it)."""
    if threads == 1:
        try:
            data = _read_all(f"/proc/{pid}/task/{pid}/children")
        except OSError:
            return []
        return [int(x) for x in data.split()]
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            data = _read_all(f"/proc/{pid}/task/{tid}/children")
        except OSError:
            continue  # the thread ended
        out.extend(int(x) for x in data.split())
    return out


def _children_from_scan() -> ChildrenOf:
    """One ppid scan of every process, for kernels without the children files."""
    import psutil

    by_parent: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        ppid = p.info.get("ppid")
        if ppid is not None:
            by_parent.setdefault(ppid, []).append(p.pid)
    return lambda pid, threads: by_parent.get(pid, ())


_K_PSS = b"\nPss:"
_K_SWAP_PSS = b"\nSwapPss:"
_K_RSS_ANON = b"\nRssAnon:"
_K_RSS_SHMEM = b"\nRssShmem:"


def _process_memory(pid: int) -> int | None:
    """Pss + SwapPss of ``pid`` in bytes; RssAnon + RssShmem if that is unreadable; None if neither."""
    try:
        data = _read(f"/proc/{pid}/smaps_rollup", 4096)
    except OSError:
        data = b""
    if data:
        pss = field_int(data, _K_PSS)
        if pss is not None:
            swap = field_int(data, _K_SWAP_PSS)
            return pss + (swap or 0)
    try:
        status = _read(f"/proc/{pid}/status", 4096)
    except OSError:
        return None
    anon = field_int(status, _K_RSS_ANON)
    shmem = field_int(status, _K_RSS_SHMEM)
    if anon is None and shmem is None:
        return None
    return (anon or 0) + (shmem or 0)


_K_RCHAR = b"rchar:"
_K_WCHAR = b"\nwchar:"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _io_bytes(pid: int) -> int | None:
    """rchar + wchar of ``pid`` (bytes read and written through system calls); None if unreadable."""
    try:
        data = b"\n" + _read(f"/proc/{pid}/io", 1024)
    except OSError:
        return None
    r = field_int(data, b"\n" + _K_RCHAR)
    w = field_int(data, _K_WCHAR)
    if r is None or w is None:
        return None
    return r + w


_K_SWAP = b"\nVmSwap:"


def resident_bytes(pid: int) -> int | None:
    """RssAnon + RssShmem + VmSwap of ``pid`` from ``/proc/<pid>/status``: kernel counters, no page-table walk
    (unlike PSS), so cheap enough to read at the moment of acting. None if the process is gone."""
    try:
        status = _read(f"/proc/{pid}/status", 4096)
    except OSError:
        return None
    anon = field_int(status, _K_RSS_ANON)
    shmem = field_int(status, _K_RSS_SHMEM)
    if anon is None and shmem is None:
        return None  # a kernel thread, or a zombie
    return (anon or 0) + (shmem or 0) + (field_int(status, _K_SWAP) or 0)


def tree_resident_bytes(pids: Iterable[int]) -> int | None:
    """:func:`resident_bytes` summed over a tree's processes; None when none of them could be read."""
    total, seen = 0, False
    for p in pids:
        m = resident_bytes(p)
        if m is not None:
            total += m
            seen = True
    return total if seen else None


def _names(pid: int) -> tuple[str, str]:
    """(comm, basename of argv[0]) of ``pid``; empty strings where unreadable."""
    try:
        comm = _read(f"/proc/{pid}/comm", 64).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        comm = ""
    try:
        argv0 = _read(f"/proc/{pid}/cmdline", 4096).split(b"\0", 1)[0]
        arg0 = os.path.basename(argv0.decode("utf-8", "replace"))
    except OSError:
        arg0 = ""
    return comm, arg0


def children_reader(use_children_files: bool | None = None) -> ChildrenOf:
    """How to list a process's children: the /proc children files when the kernel has them (or when
    ``use_children_files`` is True), else one psutil ppid scan shared by every lookup of this sample."""
    if use_children_files is None:
        me = os.getpid()
        use_children_files = os.path.exists(f"/proc/{me}/task/{me}/children")
    return _children_from_files if use_children_files else _children_from_scan()


def _main_process(pid: int, start: int | None) -> tuple[str | None, ProcStat | None]:
    """(None, its stat) when ``pid`` is still the live process that started at ``start``; else (why not,
    None)."""
    if start is None:
        return f"process {pid} did not exist when tracking began", None
    st = _stat(pid)
    if st is None:
        return f"process {pid} is gone", None
    if st.start != start:
        return f"pid {pid} now belongs to another process (start time {st.start}, expected {start})", None
    if st.dead:
        return f"process {pid} has exited", None
    return None, st


def walk_tree(pid: int, start: int | None, members: Iterable[tuple[int, int]] = (),
              children: ChildrenOf | None = None,
              stats: dict[int, ProcStat] | None = None) -> tuple[str | None, dict[int, int]]:
    """Every live process of the tree rooted at ``pid`` (which must have started at ``start``).

    ``members`` are descendants recorded earlier: one reparented away from
    the tree (its parent died, it called setsid()) cannot be found by
    walking down from ``pid``, so each one still alive with its recorded
    start time is kept, with its own descendants. Returns (why the main
    process is unusable, or None; {pid: start time} of the tree).
    """
    children = children if children is not None else children_reader()
    tree: dict[int, int] = {}
    stack: list[tuple[int, int, int]] = []
    why, st = _main_process(pid, start)
    if st is not None:
        tree[pid] = st.start
        stack.append((pid, st.threads, st.start))
        if stats is not None:
            stats[pid] = st
    for mpid, mstart in members:
        if mpid in tree:
            continue
        st = _stat(mpid)
        if st is None or st.start != mstart or st.dead:
            continue
        tree[mpid] = mstart
        stack.append((mpid, st.threads, mstart))
        if stats is not None:
            stats[mpid] = st
    while stack:
        p, threads, pstart = stack.pop()
        for child in children(p, threads):
            if child in tree:
                continue
            st = _stat(child)
            # A child cannot have started before its parent: a pid reused in between is not ours.
            if st is None or st.dead or st.start < pstart:
                continue
            tree[child] = st.start
            stack.append((child, st.threads, st.start))
            if stats is not None:
                stats[child] = st
    return why, tree


def cgroup_tree(pid: int, start: int | None, pids: Iterable[int],
                members: Iterable[tuple[int, int]] = (),
                stats: dict[int, ProcStat] | None = None) -> tuple[str | None, dict[int, int]]:
    """Like :func:`walk_tree`, for a worker with a cgroup of its own: its processes are those the cgroup
    lists (``cgroup.procs``, one read) instead of a walk of children files, plus recorded members still alive
    outside it."""
    tree: dict[int, int] = {}
    why, st = _main_process(pid, start)
    if st is not None:
        tree[pid] = st.start
        if stats is not None:
            stats[pid] = st
    for p in pids:
        if p in tree:
            continue
        st = _stat(p)
        if st is not None and not st.dead:
            tree[p] = st.start
            if stats is not None:
                stats[p] = st
    for mpid, mstart in members:
        if mpid in tree:
            continue
        st = _stat(mpid)
        if st is not None and st.start == mstart and not st.dead:
            tree[mpid] = mstart
            if stats is not None:
                stats[mpid] = st
    return why, tree


NameCache = dict[tuple[int, int], tuple[str, str]]


def sample_tree(worker: str, pid: int, start: int | None, members: Iterable[tuple[int, int]] = (),
                protect: Collection[str] = (), *, children: ChildrenOf | None = None, measure: bool | str = True,
                names: NameCache | None = None, pids: Iterable[int] | None = None,
                io: bool = True) -> WorkerSample:
    """Measure one worker's whole tree (see the module text): memory, process count, protection, members.

    ``measure``: ``True`` or ``"pss"`` sums PSS over the tree (exact, walks
    page tables); ``"rss"`` sums :func:`resident_bytes` (kernel counters,
    cheap; shared pages count in each process); ``False`` leaves the memory
    Unknown: a worker with a cgroup of its own is measured through it,
    exactly and far more cheaply. ``pids``: the worker's cgroup's processes
    (see :func:`cgroup_tree`), instead of walking children files.
    ``names`` caches (comm, argv[0]) per (pid, start time) across samples:
    a process's name for ``protect:`` is read once. ``io``: read each
    process's I/O counters (``/proc/<pid>/io``: only ``worker.idle`` and
    ``worker.quiet`` use them); otherwise the sample's ``io_bytes`` is
    Unknown. The CPU time comes from the ``stat`` read that found the tree.
    """
    stats: dict[int, ProcStat] = {}
    why, tree = (walk_tree(pid, start, members, children, stats) if pids is None
                 else cgroup_tree(pid, start, pids, members, stats))
    total = 0
    cpu_ticks, io_sum, counters_known = 0, 0, why is None
    for p in tree:
        st = stats.get(p)
        got = _io_bytes(p) if io else 0
        if st is None or got is None:
            if p == pid:
                counters_known = False  # the main process's counters are unreadable: no progress figure
            continue  # a member that vanished mid-read
        cpu_ticks += st.cpu_ticks
        io_sum += got
    if not measure and why is None:
        why = "measured through its cgroup"
    read = resident_bytes if measure == "rss" else _process_memory
    for p in (tree if measure else ()):
        m = read(p)
        if m is None:
            if p == pid and why is None:
                why = f"memory of process {p} is unreadable"
            continue  # a member that vanished mid-read
        total += m
    protected = False
    if protect:
        for p, pstart in tree.items():
            key = (p, pstart)
            got = names.get(key) if names is not None else None
            if got is None:
                got = _names(p)
                if names is not None:
                    names[key] = got
            if got[0] in protect or got[1] in protect:
                protected = True
                break
    ordered = sorted(tree.items())
    if start is not None and (pid, start) in tree.items():
        ordered.remove((pid, start))
        ordered.insert(0, (pid, start))
    memory = Unknown(why) if why is not None else total
    if counters_known:
        cpu: object = cpu_ticks / _CLK_TCK
        io_total: object = io_sum if io else IO_NOT_READ
    else:
        cpu = io_total = Unknown("the main process's /proc stat or io is unreadable")
    return WorkerSample(worker, pid, memory, len(tree), protected, "rss" if measure == "rss" else "tree",
                        members=tuple(ordered), cpu_seconds=cpu, io_bytes=io_total)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Orphans memguard adopted
#
# memguard is a child subreaper: a descendant of a worker whose parent dies
# (the classic double fork: fork, setsid, fork, exit) is reparented to
# memguard, not to init. So every process of every worker tree stays in
# memguard's own subtree, and the ones a walk down from a worker's main
# process cannot reach are exactly memguard's children that are not a
# worker's main process nor a helper. Each one is attributed by the marker
# memguard put in every worker's environment (MEMGUARD_INSTANCE,
# MEMGUARD_WORKER, MEMGUARD_INCARNATION), which descendants inherit.


def own_children() -> list[int]:
    """The children of this process, across all its threads (orphans are adopted by one of them)."""
    me = os.getpid()
    try:
        tids = os.listdir(f"/proc/{me}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            out.extend(int(x) for x in _read_all(f"/proc/{me}/task/{tid}/children").split())
        except OSError:
            continue
    return out


def environ_marker(pid: int) -> tuple[str, str, int] | None:
    """(instance, worker, incarnation) from the process's initial environment, or None when it carries no
    complete marker (or cannot be read: another user's process, a setuid program)."""
    try:
        data = _read_all(f"/proc/{pid}/environ")
    except OSError:
        return None
    found: dict[bytes, bytes] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in (b"MEMGUARD_INSTANCE", b"MEMGUARD_WORKER", b"MEMGUARD_INCARNATION"):
            found[key] = value
    try:
        return (found[b"MEMGUARD_INSTANCE"].decode(), found[b"MEMGUARD_WORKER"].decode(),
                int(found[b"MEMGUARD_INCARNATION"]))
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


class Adopted(NamedTuple):
    """Orphans memguard adopted, sorted out: ``members`` of live workers (worker -> (pid, start) pairs),
    ``leftovers`` of incarnations that were not running when the snapshot was taken, as (pid, start,
    worker, incarnation) (the actor checks again before it kills: a worker may have started since),
    ``unmarked`` ones whose environment names no worker of this memguard."""

    members: dict[str, list[tuple[int, int]]]
    leftovers: list[tuple[int, int, str, int]]
    unmarked: list[tuple[int, int]]


def find_adopted(instance: str, live: Mapping[str, tuple[int, int]], skip: Collection[int],
                 children: ChildrenOf | None = None) -> Adopted:
    """Sort memguard's adopted orphans (and their descendants) by owner.

    ``live`` maps each running worker to (main pid, incarnation); ``skip``
    holds the pids of memguard's direct children that are not orphans
    (workers' main processes, the sentinel).
    """
    children = children if children is not None else children_reader()
    by_worker: dict[str, list[tuple[int, int]]] = {}
    leftovers: list[tuple[int, int, str, int]] = []
    unmarked: list[tuple[int, int]] = []
    for pid in own_children():
        if pid in skip:
            continue
        st = _stat(pid)
        if st is None or st.dead:
            continue  # a zombie: reaped by the supervisor
        family = sorted(walk_tree(pid, st.start, (), children)[1].items())
        marker = environ_marker(pid)
        if marker is None or marker[0] != instance:
            unmarked.extend(family)
            continue
        _, worker, incarnation = marker
        current = live.get(worker)
        if current is not None and current[1] == incarnation:
            by_worker.setdefault(worker, []).extend(family)
        else:
            leftovers.extend((p, pstart, worker, incarnation) for p, pstart in family)
    return Adopted(by_worker, leftovers, unmarked)
