"""The memory cgroup memguard runs in (cgroup v2 or v1), behind one interface.

Detection (:func:`find_own_cgroup`) reads ``/proc/<pid>/cgroup`` and maps
the path through ``/proc/self/mountinfo`` to a directory: a v1 ``memory``
hierarchy is preferred when the process has one (hybrid systems bind the
memory controller to v1), else the cgroup2 path is used if the memory
controller is enabled there.

The two versions name their files differently:

=================  ======================================  ===============================
figure             v2                                      v1
=================  ======================================  ===============================
limit              tightest ``memory.max`` up the tree     min(``memory.limit_in_bytes``,
                                                           ``hierarchical_memory_limit``)
usage              ``memory.current``                      ``memory.usage_in_bytes``
inactive file      ``inactive_file`` in ``memory.stat``    ``total_inactive_file``
OOM kills          ``oom_kill`` in ``memory.events``       ``oom_kill`` in ``memory.oom_control``
swap limit         tightest ``memory.swap.max``            ``hierarchical_memsw_limit`` -
                                                           ``hierarchical_memory_limit``
swap usage         ``memory.swap.current``                 ``total_swap`` in ``memory.stat``
pressure           ``memory.pressure``                     (none)
=================  ======================================  ===============================

Readers (:meth:`MemoryCgroup.snapshot`, ``limit_bytes`` ... and
:func:`cgroup_scope`) never raise: an unreadable file gives an
:class:`~memguard.model.Unknown` with the reason. Files are kept open and
re-read with one ``pread`` each (see :class:`~memguard.sense.host.PinnedFile`),
so :func:`cgroup_scope` costs a handful of syscalls.

Nothing here changes a cgroup: creating, limiting, moving into and
removing cgroups is the actor's (:mod:`memguard.act.cgroups`).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Callable, Union

from memguard.model import Pressure, Reading, ScopeMemory, Unknown, is_known
from memguard.sense.host import PinnedFile, field_int, host_scope, host_totals, read_once
from memguard.sense.psi import parse_pressure
from memguard.units import format_size

__all__ = [
    "CgroupError",
    "ScopeError",
    "MemoryCgroup",
    "CgroupFigures",
    "ScopeReader",
    "find_own_cgroup",
    "locate_memory_cgroup",
    "cgroup_scope",
    "choose_scope",
    "UNLIMITED_THRESHOLD",
]

#: Limits at or above this are "no limit" (v1 writes 9223372036854771712, i.e.
#: PAGE_COUNTER_MAX pages; v2 writes ``max``).
UNLIMITED_THRESHOLD = 1 << 62

Limit = Union[int, None, Unknown]  # None: no limit


class CgroupError(RuntimeError):
    """A cgroup helper could not do what was asked (the message says why)."""


class ScopeError(RuntimeError):
    """The requested memory scope cannot be guarded on this machine."""


def _limit_value(v: int) -> int | None:
    return None if v < 0 or v >= UNLIMITED_THRESHOLD else v


def _parse_limit(raw: bytes) -> int | None:
    s = raw.strip()
    if s == b"max":
        return None
    return _limit_value(int(s))


def _working_set(usage: Reading, inactive_file: Reading) -> Reading:
    if not is_known(usage):
        return usage
    if not is_known(inactive_file):
        return inactive_file
    ws = usage - inactive_file  # type: ignore[operator]
    return ws if ws > 0 else 0


def _min_limit(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def _why(path: str, err: OSError) -> Unknown:
    return Unknown(f"{path} unreadable: {err.strerror or err}")


@dataclass(frozen=True)
class CgroupFigures:
    """One read of a memory cgroup's figures, in bytes.

    ``limit`` and ``swap_limit`` are None when there is no limit;
    ``swap_usage`` (and then ``swap_limit``) is None when the kernel does
    no swap accounting for the cgroup. Any figure may be Unknown.
    """

    limit: Limit
    usage: Reading
    inactive_file: Reading
    oom_kills: Reading
    swap_limit: Limit
    swap_usage: Union[int, None, Unknown]

    @property
    def working_set(self) -> Reading:
        """Usage less inactive file cache, clamped at 0 (what kubelet calls the working set)."""
        return _working_set(self.usage, self.inactive_file)


class MemoryCgroup:
    """A memory cgroup directory, v1 or v2. Cheap to re-read; not thread-safe.

    ``version`` is 1 or 2 and ``path`` the directory. The object keeps the
    files it reads open (one pread per read); :meth:`close` releases them.
    """

    __slots__ = ("version", "path", "_pinned", "_chain", "_absent", "__weakref__")

    def __init__(self, version: int, path: str) -> None:
        if version not in (1, 2):
            raise ValueError(f"cgroup version must be 1 or 2, not {version!r}")
        self.version = version
        self.path = posixpath.normpath(path)
        self._pinned: dict[str, PinnedFile] = {}
        self._chain: tuple[str, ...] | None = None
        self._absent: set[str] = set()

    # -- identity ------------------------------------------------------

    @classmethod
    def from_path(cls, path: str) -> "MemoryCgroup":
        """The memory cgroup at ``path``, its version told by the files it has. Raises CgroupError."""
        if os.path.exists(os.path.join(path, "memory.limit_in_bytes")):
            return cls(1, path)
        try:
            controllers = read_once(os.path.join(path, "cgroup.controllers")).split()
        except OSError:
            raise CgroupError(f"{path} is not a cgroup directory with a memory controller") from None
        if b"memory" not in controllers:
            raise CgroupError(f"{path} is a cgroup2 directory without the memory controller enabled")
        return cls(2, path)

    def __repr__(self) -> str:
        return f"MemoryCgroup(version={self.version}, path={self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryCgroup) and (self.version, self.path) == (other.version, other.path)

    def __hash__(self) -> int:
        return hash((MemoryCgroup, self.version, self.path))

    def close(self) -> None:
        """Close the files kept open for fast re-reading."""
        pinned, self._pinned = self._pinned, {}
        for p in pinned.values():
            p.close()

    # -- low-level reads ----------------------------------------------

    def _read(self, full: str) -> bytes:
        p = self._pinned.get(full)
        if p is None:
            p = self._pinned[full] = PinnedFile(full, 8192 if full.endswith(".stat") else 512)
        return p.read()

    def _read_optional(self, full: str) -> bytes | None:
        """The file, or None when the kernel does not provide it (remembered)."""
        if full in self._absent:
            return None
        try:
            return self._read(full)
        except FileNotFoundError:
            if os.path.isdir(os.path.dirname(full)):
                self._absent.add(full)
            raise

    def _ancestry(self) -> tuple[str, ...]:
        """v2: this directory, then each parent that is still a cgroup2 directory."""
        chain = self._chain
        if chain is None:
            out = [self.path]
            d = self.path
            while True:
                parent = posixpath.dirname(d)
                if parent == d or not os.path.exists(parent + "/cgroup.controllers"):
                    break
                out.append(parent)
                d = parent
            chain = self._chain = tuple(out)
        return chain

    def _v2_tightest(self, name: str, optional: bool) -> Limit:
        """The smallest ``name`` (memory.max, memory.swap.max) up the v2 tree."""
        best: int | None = None
        chain = self._ancestry()
        last = len(chain) - 1
        for i, d in enumerate(chain):
            full = d + "/" + name
            try:
                raw = self._read_optional(full) if optional else self._read(full)
            except FileNotFoundError as e:
                if i == last or optional:
                    continue  # the root cgroup has no memory.max / memory.swap.max
                return _why(full, e)
            except OSError as e:
                return _why(full, e)
            if raw is None:
                continue
            try:
                best = _min_limit(best, _parse_limit(raw))
            except ValueError:
                return Unknown(f"{full} is not a number")
        return best

    def _number(self, name: str) -> Reading:
        full = self.path + "/" + name
        try:
            return int(self._read(full))
        except OSError as e:
            return _why(full, e)
        except ValueError:
            return Unknown(f"{full} is not a number")

    def _stat(self) -> bytes | Unknown:
        full = self.path + "/memory.stat"
        try:
            return b"\n" + self._read(full)
        except OSError as e:
            return _why(full, e)

    def _stat_key(self, stat: bytes | Unknown, key: bytes) -> Reading:
        if not isinstance(stat, bytes):
            return stat
        v = field_int(stat, key)
        return Unknown(f"{key.strip().decode()} missing from {self.path}/memory.stat") if v is None else v

    def _v1_limit(self, stat: bytes | Unknown) -> Limit:
        full = self.path + "/memory.limit_in_bytes"
        try:
            own = _parse_limit(self._read(full))
        except OSError as e:
            return _why(full, e)
        except ValueError:
            return Unknown(f"{full} is not a number")
        if isinstance(stat, bytes):
            hier = field_int(stat, b"\nhierarchical_memory_limit ")
            if hier is not None:
                own = _min_limit(own, _limit_value(hier))
        return own

    def _v1_swap(self, stat: bytes | Unknown, limit: Limit) -> tuple[Limit, Union[int, None, Unknown]]:
        if not isinstance(stat, bytes):
            return stat, stat
        used = field_int(stat, b"\ntotal_swap ")
        if used is None:  # no swap accounting (swapaccount=0 or no CONFIG_MEMCG_SWAP)
            return None, None
        memsw = field_int(stat, b"\nhierarchical_memsw_limit ")
        memsw_limit = None if memsw is None else _limit_value(memsw)
        if memsw_limit is None:
            return None, used
        if is_known(limit) and limit is not None:
            return max(0, memsw_limit - limit), used
        return memsw_limit, used

    def _oom(self) -> Reading:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        full = self.path + "/" + name
        try:
            data = b"\n" + self._read(full)
        except OSError as e:
            return _why(full, e)
        v = field_int(data, b"\noom_kill ")
        return Unknown(f"oom_kill missing from {full}") if v is None else v

    def _v2_swap_usage(self) -> Union[int, None, Unknown]:
        full = self.path + "/memory.swap.current"
        try:
            raw = self._read_optional(full)
        except FileNotFoundError:
            return None if full in self._absent else Unknown(f"{full} is gone")
        except OSError as e:
            return _why(full, e)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            return Unknown(f"{full} is not a number")

    # -- readers (never raise) ------------------------------------------

    def snapshot(self) -> CgroupFigures:
        """Every figure, each file read once."""
        stat = self._stat()
        if self.version == 2:
            limit = self._v2_tightest("memory.max", optional=False)
            usage = self._number("memory.current")
            inactive = self._stat_key(stat, b"\ninactive_file ")
            swap_usage = self._v2_swap_usage()
            swap_limit = self._v2_tightest("memory.swap.max", optional=True) if swap_usage is not None else None
        else:
            limit = self._v1_limit(stat)
            usage = self._number("memory.usage_in_bytes")
            inactive = self._stat_key(stat, b"\ntotal_inactive_file ")
            swap_limit, swap_usage = self._v1_swap(stat, limit)
        return CgroupFigures(limit, usage, inactive, self._oom(), swap_limit, swap_usage)

    def limit_bytes(self) -> Limit:
        """The memory limit in force here (tightest of this cgroup and its parents); None when unlimited."""
        if self.version == 2:
            return self._v2_tightest("memory.max", optional=False)
        return self._v1_limit(self._stat())

    def usage_bytes(self) -> Reading:
        """Memory charged to the cgroup, page cache included."""
        return self._number("memory.current" if self.version == 2 else "memory.usage_in_bytes")

    def working_set_bytes(self) -> Reading:
        """Usage less inactive file cache, clamped at 0."""
        usage = self.usage_bytes()
        key = b"\ninactive_file " if self.version == 2 else b"\ntotal_inactive_file "
        inactive = self._stat_key(self._stat(), key)
        return _working_set(usage, inactive)

    def usage_and_working_set(self) -> tuple[Reading, Reading]:
        """(usage, working set) from one read of each file: their difference is the inactive file cache."""
        usage = self.usage_bytes()
        key = b"\ninactive_file " if self.version == 2 else b"\ntotal_inactive_file "
        return usage, _working_set(usage, self._stat_key(self._stat(), key))

    def oom_kills(self) -> Reading:
        """Kernel OOM kills counted in this cgroup (v2: its subtree)."""
        return self._oom()

    def swap_limit(self) -> Limit:
        """The swap this cgroup may use; None when unlimited or when there is no swap accounting."""
        if self.version == 2:
            if self._v2_swap_usage() is None:
                return None
            return self._v2_tightest("memory.swap.max", optional=True)
        stat = self._stat()
        return self._v1_swap(stat, self._v1_limit(stat))[0]

    def swap_usage(self) -> Union[int, None, Unknown]:
        """Swap used by the cgroup; None when there is no swap accounting."""
        if self.version == 2:
            return self._v2_swap_usage()
        return self._v1_swap(self._stat(), None)[1]

    def pressure_path(self) -> str | None:
        """The cgroup's PSI file (v2 ``memory.pressure``); None on v1, which has none."""
        return self.path + "/memory.pressure" if self.version == 2 else None

    def pressure(self) -> Pressure:
        """PSI memory pressure of this cgroup (v2); Unknown readings on v1."""
        if self.version != 2:
            u = Unknown("cgroup v1 has no per-cgroup memory pressure")
            return Pressure(u, u, u, u)
        full = self.path + "/memory.pressure"
        try:
            return parse_pressure(self._read(full), full)
        except OSError as e:
            u = _why(full, e)
            return Pressure(u, u, u, u)

    def pids(self) -> list[int]:
        """The processes in this cgroup (not its children), sorted. Raises OSError."""
        return sorted(int(x) for x in read_once(self.path + "/cgroup.procs").split())


# ---------------------------------------------------------------------------
# Detection


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return (
        field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def _parse_mountinfo(text: str) -> list[tuple[str, str, str, list[str]]]:
    """(fstype, root, mount point, super options) of every mount."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            fstype, superopts = parts[sep + 1], parts[sep + 3]
        except (ValueError, IndexError):
            continue
        out.append((fstype, _unescape(parts[3]), _unescape(parts[4]), superopts.split(",")))
    return out


def _through_mount(mount_point: str, mount_root: str, cg_path: str) -> str | None:
    """The directory of cgroup ``cg_path`` seen through a mount of ``mount_root``."""
    if ".." in cg_path.split("/"):
        return None  # the cgroup lies outside our cgroup namespace
    cg_path = posixpath.normpath(cg_path)
    root = posixpath.normpath(mount_root)
    if root == "/":
        rel = cg_path
    elif cg_path == root:
        rel = "/"
    elif cg_path.startswith(root + "/"):
        rel = cg_path[len(root):]
    else:
        return None
    return posixpath.normpath(mount_point + "/" + rel.lstrip("/"))


def locate_memory_cgroup(cgroup_text: str, mountinfo_text: str) -> MemoryCgroup | None:
    """Map a ``/proc/<pid>/cgroup`` text to a memory cgroup directory through ``mountinfo``.

    A v1 ``memory`` hierarchy wins when the process has one and it is
    mounted; else the cgroup2 path, if the memory controller is enabled
    there. None when neither resolves to an existing directory.
    """
    v1_path = v2_path = None
    for line in cgroup_text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _parse_mountinfo(mountinfo_text)
    if v1_path is not None:
        for fstype, root, mnt, opts in mounts:
            if fstype != "cgroup" or "memory" not in opts:
                continue
            d = _through_mount(mnt, root, v1_path)
            if d and os.path.exists(d + "/memory.usage_in_bytes"):
                return MemoryCgroup(1, d)
    if v2_path is not None:
        for fstype, root, mnt, _opts in mounts:
            if fstype != "cgroup2":
                continue
            d = _through_mount(mnt, root, v2_path)
            if not d:
                continue
            try:
                controllers = read_once(d + "/cgroup.controllers").split()
            except OSError:
                continue
            if b"memory" in controllers:
                return MemoryCgroup(2, d)
    return None


def find_own_cgroup(pid: int | str = "self") -> MemoryCgroup | None:
    """The memory cgroup process ``pid`` runs in (v1 or v2); None if there is no memory controller."""
    try:
        cgroup_text = read_once(f"/proc/{pid}/cgroup").decode("utf-8", "surrogateescape")
        mountinfo = read_once("/proc/self/mountinfo", 65536).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    return locate_memory_cgroup(cgroup_text, mountinfo)


# ---------------------------------------------------------------------------
# The scope


def cgroup_scope(
    cg: MemoryCgroup,
    host_total: int,
    *,
    host_swap_total: Reading | None = None,
) -> ScopeMemory:
    """The cgroup as a :class:`ScopeMemory` (kind ``"cgroup"``). Never raises.

    total = min(limit, ``host_total``); available = total - working set
    (clamped at 0). Swap: total = the cgroup's swap limit (bounded by
    ``host_swap_total`` when given), or ``host_swap_total`` when the
    cgroup's swap is unlimited; free = swap total - the cgroup's swap
    usage. Unknown where the kernel does no swap accounting.
    """
    f = cg.snapshot()
    limit = f.limit
    total: Reading
    if not is_known(limit):
        total = limit  # type: ignore[assignment]
    elif limit is None or limit > host_total:
        total = host_total
    else:
        total = limit
    ws = f.working_set
    available: Reading
    if not is_known(total):
        available = total
    elif not is_known(ws):
        available = ws
    else:
        available = total - ws if total > ws else 0

    swap_total: Reading
    swap_free: Reading
    s_used, s_limit = f.swap_usage, f.swap_limit
    host_swap = host_swap_total if host_swap_total is not None and is_known(host_swap_total) else None
    if s_used is None:
        swap_total = swap_free = Unknown(f"no swap accounting in {cg.path}")
    elif not is_known(s_used):
        swap_total = swap_free = s_used
    elif not is_known(s_limit):
        swap_total = swap_free = s_limit  # type: ignore[assignment]
    else:
        if s_limit is None:
            swap_total = host_swap if host_swap is not None else Unknown("swap unlimited, host SwapTotal not given")
        else:
            swap_total = s_limit if host_swap is None or s_limit < host_swap else host_swap
        if is_known(swap_total):
            swap_free = swap_total - s_used if swap_total > s_used else 0
        else:
            swap_free = swap_total
    return ScopeMemory("cgroup", total, available, swap_total, swap_free, f.oom_kills, cg.path)


@dataclass(frozen=True)
class ScopeReader:
    """What :func:`choose_scope` chose: ``read()`` gives the scope's memory now.

    ``kind`` is ``"host"`` or ``"cgroup"``; ``description`` is a sentence
    for the log saying what is guarded and why; ``cgroup`` is memguard's
    memory cgroup when one was found (whatever the kind).
    """

    read: Callable[[], ScopeMemory]
    kind: str
    description: str
    cgroup: MemoryCgroup | None = None

    def __call__(self) -> ScopeMemory:
        return self.read()


SCOPE_MODES = ("auto", "host", "cgroup")


def choose_scope(mode: str = "auto") -> ScopeReader:
    """Pick the scope to guard and return a zero-argument reader for it.

    ``auto``: memguard's own memory cgroup when its limit is below the
    host's MemTotal, else the host. ``host``: the host. ``cgroup``: the
    cgroup, or :class:`ScopeError` when memguard's cgroup has no limit.
    """
    if mode not in SCOPE_MODES:
        raise ValueError(f"scope must be one of {', '.join(SCOPE_MODES)}, not {mode!r}")
    host_total, host_swap = host_totals()
    if not is_known(host_total):
        raise ScopeError(f"cannot size the host: MemTotal is {host_total!r}")
    assert isinstance(host_total, int)
    host_reader = ScopeReader(host_scope, "host", f"host memory (MemTotal {format_size(host_total)})")
    if mode == "host":
        return host_reader

    cg = find_own_cgroup()
    if cg is None:
        if mode == "cgroup":
            raise ScopeError(
                "scope: cgroup was asked for, but memguard runs in no memory cgroup: /proc/self/cgroup "
                "names no mounted cgroup v1 'memory' hierarchy nor a cgroup2 directory with the memory "
                "controller enabled; use scope: host or auto"
            )
        return ScopeReader(host_scope, "host", host_reader.description + "; no memory cgroup found")
    limit = cg.limit_bytes()
    where = f"cgroup v{cg.version} {cg.path}"
    if not is_known(limit):
        if mode == "cgroup":
            raise ScopeError(f"scope: cgroup was asked for, but the limit of {where} cannot be read: {limit!r}")
        return ScopeReader(host_scope, "host", f"{host_reader.description}; the limit of {where} is unreadable",
                           cg)
    if limit is None:
        if mode == "cgroup":
            raise ScopeError(
                f"scope: cgroup was asked for, but memguard's memory cgroup ({where}) has no memory limit; "
                "give it one (systemd MemoryMax=, docker --memory, Kubernetes resources.limits.memory) "
                "or use scope: host or auto"
            )
        return ScopeReader(host_scope, "host", f"{host_reader.description}; {where} has no memory limit", cg)
    if mode == "auto" and limit >= host_total:
        return ScopeReader(
            host_scope, "host",
            f"{host_reader.description}; the limit of {where} ({format_size(limit)}) is not below MemTotal",
            cg,
        )

    def read() -> ScopeMemory:
        return cgroup_scope(cg, host_total, host_swap_total=host_swap)

    shown = min(limit, host_total)
    return ScopeReader(
        read, "cgroup",
        f"{where}: limit {format_size(limit)}"
        + (f" (capped at MemTotal {format_size(host_total)})" if limit > host_total else "")
        + f", {format_size(shown)} guarded",
        cg,
    )
