"""Processes memguard does not own, for opt-in ``unmanaged:`` victims of system rules.

One pass over /proc per full tick, and only when ``unmanaged:`` is
configured. Memory is RssAnon + RssShmem from /proc/<pid>/status: cheap
enough for every process of a machine (PSS would walk page tables).
Kernel threads, memguard itself, its workers' trees and protected
processes are never returned.
"""

from __future__ import annotations

import os
import pwd
import re
from typing import Collection, Iterable, Sequence

from ..model import Adoptable, ProcessSample, ProtectedProcess, Unknown
from ..policy import UnmanagedMatch
from .procstat import read_stat, same_process

__all__ = ["scan_unmanaged", "scan_matches", "scan_protected", "alive"]


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _start(pid: int) -> int | None:
    st = read_stat(pid)
    return None if st is None else st.start


def alive(pid: int, start: int) -> bool:
    """Is the process with this pid still the one that started at ``start`` (and not a zombie)?"""
    return same_process(pid, start)


def _user(uid: int, cache: dict[int, str]) -> str:
    if uid not in cache:
        try:
            cache[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            cache[uid] = str(uid)
    return cache[uid]


def scan_unmanaged(matchers: Sequence[UnmanagedMatch], exclude: Collection[int],
                   protect: Iterable[str] = ()) -> tuple[ProcessSample, ...]:
    """Processes matched by an entry without rules: candidates for system rules' victims."""
    return scan_matches(matchers, exclude, protect)[0]


def scan_matches(matchers: Sequence[UnmanagedMatch], exclude: Collection[int],
                 protect: Iterable[str] = ()) -> tuple[tuple[ProcessSample, ...], tuple[Adoptable, ...]]:
    """One pass over /proc: (victim candidates of entries without rules, processes of entries with rules,
    which the actor adopts as ad-hoc workers)."""
    if not matchers:
        return (), ()
    compiled = [(m, re.compile(m.cmdline) if m.cmdline else None, re.compile(m.cgroup) if m.cgroup else None)
                for m in matchers]
    protected = set(protect)
    me = os.getpid()
    users: dict[int, str] = {}
    out = []
    adopt: list[Adoptable] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in (me, 1) or pid in exclude:
            continue
        try:
            raw = _read(f"/proc/{pid}/cmdline")
            if not raw:
                continue  # kernel thread or zombie
            argv = raw.rstrip("\0").split("\0")
            cmdline = " ".join(argv)
            st = _status(pid)
            name = st.get("Name", "")
            if name in protected or os.path.basename(argv[0]) in protected:
                continue
            if st.get("PPid") == str(me):
                continue  # memguard's own helpers (the sentinel)
            uid = int(st.get("Uid", "0").split()[0])
            user = _user(uid, users)
            cgroup_text = None
            for index, (m, cmd_re, cg_re) in enumerate(compiled):
                if m.user is not None and m.user != user:
                    continue
                if cmd_re is not None and not cmd_re.search(cmdline):
                    continue
                if cg_re is not None:
                    cgroup_text = cgroup_text if cgroup_text is not None else _read(f"/proc/{pid}/cgroup")
                    if not cg_re.search(cgroup_text):
                        continue
                start = _start(pid)
                if start is None:
                    break
                if m.rules:
                    adopt.append(Adoptable(pid=pid, start=start, name=name, entry=index))
                    break
                try:
                    anon = int(st.get("RssAnon", "0 kB").split()[0]) * 1024
                    shmem = int(st.get("RssShmem", "0 kB").split()[0]) * 1024
                    memory: object = anon + shmem
                except ValueError:
                    memory = Unknown("unreadable /proc/<pid>/status")
                out.append(ProcessSample(pid=pid, start=start, name=name, user=user, memory_bytes=memory,
                                         priority=m.priority, matcher=m.name or (m.cmdline or m.cgroup or m.user
                                                                                 or "")))
                break
        except (OSError, ValueError):
            continue
    return tuple(out), tuple(adopt)


def scan_protected(protect: Iterable[str]) -> tuple[ProtectedProcess, ...]:
    """Every process whose command name or argv[0] (its base name) is in ``protect``, with its
    oom_score_adj. One pass over /proc; kernel threads are skipped."""
    names = set(protect)
    if not names:
        return ()
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            comm = _read(f"/proc/{pid}/comm").rstrip("\n")
            if comm not in names:
                raw = _read(f"/proc/{pid}/cmdline")
                if not raw or os.path.basename(raw.split("\0", 1)[0]) not in names:
                    continue
            elif not _read(f"/proc/{pid}/cmdline"):
                continue  # a kernel thread (or a zombie) of that name
            start = _start(pid)
            if start is None:
                continue
            try:
                adj: int | None = int(_read(f"/proc/{pid}/oom_score_adj"))
            except (OSError, ValueError):
                adj = None
        except OSError:
            continue
        out.append(ProtectedProcess(pid=pid, start=start, name=comm, oom_score_adj=adj))
    return tuple(out)
