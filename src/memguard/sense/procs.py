"""Per-worker accounting of a whole process tree, each shared page counted once.

A worker is its main process plus every descendant. :class:`TreeTracker`
finds the descendants by following ``/proc/<pid>/task/<tid>/children``
from the main process (no scan of all of ``/proc``; on a kernel without
those files, one ``psutil.process_iter`` ppid scan per tick instead) and
remembers every descendant it has seen, by pid *and* start time: a
grandchild that called ``setsid()`` and was reparented to init (or to
memguard) after its parent died still belongs to the worker while it
lives. A member whose pid is gone, or whose start time changed (the pid
was reused), is dropped.

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
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping

from memguard.model import Unknown, WorkerSample
from memguard.sense.host import field_int
from memguard.sense.procstat import read_stat

__all__ = ["TreeTracker", "process_start_time", "tree_memory_bytes"]

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


def tree_memory_bytes(pids: Iterable[int]) -> int:
    """Pss + SwapPss summed over ``pids`` (unreadable ones skipped)."""
    total = 0
    for pid in pids:
        m = _process_memory(pid)
        if m is not None:
            total += m
    return total


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


@dataclass
class _Worker:
    pid: int
    start: int | None
    members: dict[int, int] = field(default_factory=dict)  # descendants seen: pid -> start time
    tree: dict[int, int] = field(default_factory=dict)  # the live tree found by the last walk


class TreeTracker:
    """Finds and measures each worker's process tree. Not thread-safe.

    ``use_children_files`` forces the /proc children files (True) or the
    psutil ppid scan (False); by default the children files are used
    when the kernel has them.
    """

    def __init__(self, *, use_children_files: bool | None = None) -> None:
        if use_children_files is None:
            me = os.getpid()
            use_children_files = os.path.exists(f"/proc/{me}/task/{me}/children")
        self.use_children_files = use_children_files
        self._workers: dict[str, _Worker] = {}

    # -- bookkeeping ----------------------------------------------------

    def track(self, worker: str, pid: int, start_time: int | None = None) -> None:
        """Start (or restart, for a new incarnation) tracking ``worker`` whose main process is ``pid``.

        ``start_time`` is the main process's start time as recorded when it
        was spawned (:func:`process_start_time`); when omitted it is read
        now. Descendants remembered for a previous incarnation are dropped.
        """
        if start_time is None:
            start_time = process_start_time(pid)
        self._workers[worker] = _Worker(pid, start_time)

    def forget(self, worker: str) -> None:
        """Stop tracking ``worker`` (no error if it was not tracked)."""
        self._workers.pop(worker, None)

    def tracked(self) -> dict[str, tuple[int, int | None]]:
        """{worker: (main pid, main start time)} of every tracked worker."""
        return {name: (w.pid, w.start) for name, w in self._workers.items()}

    def members(self, worker: str, *, refresh: bool = True) -> list[tuple[int, int]]:
        """(pid, start time) of every live process of the worker's tree, main process first.

        The tree is walked afresh, so this is current when the actor uses it
        to signal a whole tree; ``refresh=False`` returns what the last walk
        (the last :meth:`sample` or :meth:`members`) found, at no cost.
        Empty for an unknown worker.
        """
        w = self._workers.get(worker)
        if w is None:
            return []
        tree = self._walk(w, self._children_of())[1] if refresh else w.tree
        out = sorted(tree.items())
        main = (w.pid, w.start)
        if main in out:
            out.remove(main)  # type: ignore[arg-type]
            out.insert(0, main)  # type: ignore[arg-type]
        return out

    # -- sampling -------------------------------------------------------

    def sample(self, worker: str, pid: int, protect: Collection[str] = ()) -> WorkerSample:
        """Measure ``worker``'s tree once.

        If ``worker`` is not tracked yet, or ``pid`` differs from the tracked
        main process (a new incarnation), it is tracked from ``pid`` with the
        start time read now; call :meth:`track` right after spawning, with
        the start time recorded then, so a pid reused before the first
        sample is recognised. ``protected`` is true when the comm or the
        argv[0] basename of any process of the tree is in ``protect``.
        """
        return self._sample(worker, pid, frozenset(protect), self._children_of())

    def sample_all(self, workers: Mapping[str, int], protect: Collection[str] = (),
                   skip_memory: Collection[str] = ()) -> dict[str, WorkerSample]:
        """:meth:`sample` for each ``{worker: main pid}``, sharing one ppid scan when one is needed.

        Workers in ``skip_memory`` are walked (members, protection) but their
        memory is not read (``Unknown``): their cgroup measures them exactly
        and far more cheaply than PSS, which walks page tables (~14 ms/GiB).
        """
        children = self._children_of()
        names = frozenset(protect)
        skip = frozenset(skip_memory)
        return {name: self._sample(name, pid, names, children, name not in skip) for name, pid in workers.items()}

    def _children_of(self) -> ChildrenOf:
        return _children_from_files if self.use_children_files else _children_from_scan()

    def _walk(self, w: _Worker, children: ChildrenOf) -> tuple[str | None, dict[int, int]]:
        """Refresh the worker's members; return (why the main process is unusable, or None; the tree)."""
        tree: dict[int, int] = {}
        stack: list[tuple[int, int, int]] = []
        why: str | None = None
        if w.start is None:
            why = f"process {w.pid} did not exist when tracking began"
        else:
            st = _stat(w.pid)
            if st is None:
                why = f"process {w.pid} is gone"
            elif st.start != w.start:
                why = f"pid {w.pid} now belongs to another process (start time {st.start}, expected {w.start})"
            elif st.dead:
                why = f"process {w.pid} has exited"
            else:
                tree[w.pid] = w.start
                stack.append((w.pid, st.threads, w.start))
        # Descendants seen before may have been reparented (setsid, parent died): keep them if alive.
        for pid, start in w.members.items():
            if pid in tree:
                continue
            st = _stat(pid)
            if st is None or st.start != start or st.dead:
                continue
            tree[pid] = start
            stack.append((pid, st.threads, start))
        while stack:
            pid, threads, start = stack.pop()
            for child in children(pid, threads):
                if child in tree:
                    continue
                st = _stat(child)
                # A child cannot have started before its parent: a pid reused in between is not ours.
                if st is None or st.dead or st.start < start:
                    continue
                tree[child] = st.start
                stack.append((child, st.threads, st.start))
        w.members = {p: s for p, s in tree.items() if not (p == w.pid and s == w.start)}
        w.tree = tree
        return why, tree

    def _sample(self, worker: str, pid: int, protect: frozenset[str], children: ChildrenOf,
                measure: bool = True) -> WorkerSample:
        w = self._workers.get(worker)
        if w is None or w.pid != pid:
            self.track(worker, pid)
            w = self._workers[worker]
        why, tree = self._walk(w, children)
        total = 0
        if not measure and why is None:
            why = "measured through its cgroup"
        for p in (tree if measure else ()):
            m = _process_memory(p)
            if m is None:
                if p == w.pid and why is None:
                    why = f"memory of process {p} is unreadable"
                continue  # a member that vanished mid-read
            total += m
        protected = False
        if protect:
            for p in tree:
                comm, arg0 = _names(p)
                if comm in protect or arg0 in protect:
                    protected = True
                    break
        memory = Unknown(why) if why is not None else total
        return WorkerSample(worker, pid, memory, len(tree), protected, "tree")
