"""The host's memory: ``/proc/meminfo`` and the kernel's OOM-kill counter.

:func:`host_scope` sits on the daemon's fast path (up to ~1000 calls a
second near a threshold), so it keeps ``/proc/meminfo`` and
``/proc/vmstat`` open and re-reads each with a single ``pread`` at offset
0 (the kernel regenerates a seq_file read from offset 0), then picks the
four or five numbers it needs with ``bytes.find`` instead of parsing
every line.

This module also holds the small file-reading helpers the other sense
modules share (:class:`PinnedFile`, :func:`read_bytes`).
"""

from __future__ import annotations

import os
import threading

from memguard.model import ScopeMemory, Unknown

__all__ = [
    "MEMINFO_PATH",
    "VMSTAT_PATH",
    "PinnedFile",
    "read_bytes",
    "read_once",
    "field_int",
    "read_meminfo",
    "read_oom_kills",
    "host_scope",
    "host_totals",
]

MEMINFO_PATH = "/proc/meminfo"
VMSTAT_PATH = "/proc/vmstat"

_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class PinnedFile:
    """A kernel-generated file (procfs, cgroupfs) kept open and re-read whole.

    Each :meth:`read` is one ``pread(fd, size, 0)``: for seq_file-backed
    files a read at offset 0 regenerates the contents, so the value is
    fresh while the open/close syscalls are saved. If the read fails (the
    cgroup was removed and re-created, the fd went stale) the file is
    reopened once and read again; a second failure raises :class:`OSError`.

    Only meant for files the kernel generates: a regular file replaced on
    disk would keep reading the old inode.
    """

    __slots__ = ("path", "fd", "size", "_lock")

    def __init__(self, path: str, size: int = 4096) -> None:
        self.path = path
        self.fd = -1
        self.size = size
        self._lock = threading.Lock()  # a reopen must not close an fd another thread is reading

    def read(self) -> bytes:
        with self._lock:
            fd = self.fd
            if fd < 0:
                fd = self.fd = os.open(self.path, _O_FLAGS)
                data = os.pread(fd, self.size, 0)
            else:
                try:
                    data = os.pread(fd, self.size, 0)
                except OSError:
                    self._close()
                    fd = self.fd = os.open(self.path, _O_FLAGS)
                    data = os.pread(fd, self.size, 0)
            while len(data) >= self.size:  # bigger than expected: grow and re-read whole
                self.size *= 4
                data = os.pread(fd, self.size, 0)
            return data

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self._close()

    def __repr__(self) -> str:
        return f"PinnedFile({self.path!r})"


def read_once(path: str, size: int = 8192) -> bytes:
    """Open, read the whole file (one read when it fits in ``size``), close. Raises OSError."""
    fd = os.open(path, _O_FLAGS)
    try:
        data = os.read(fd, size)
        if len(data) < size:
            return data
        parts = [data]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    finally:
        os.close(fd)


_PINNED: dict[str, PinnedFile] = {
    MEMINFO_PATH: PinnedFile(MEMINFO_PATH, 4096),
    VMSTAT_PATH: PinnedFile(VMSTAT_PATH, 16384),
    "/proc/pressure/memory": PinnedFile("/proc/pressure/memory", 512),
}


def read_bytes(path: str) -> bytes:
    """The whole file: through a pinned fd for the well-known /proc files, else one-shot. Raises OSError."""
    pinned = _PINNED.get(path)
    if pinned is not None:
        return pinned.read()
    return read_once(path)


def field_int(data: bytes, key: bytes) -> int | None:
    """The integer after ``key`` on its line in ``data``; ``key`` starts with ``b"\\n"``.

    The caller passes ``b"\\n" + data`` (or data whose first line is not
    wanted) so a key never matches inside another name. A trailing ``kB``
    multiplies by 1024. None when the key is missing or not a number.
    """
    i = data.find(key)
    if i < 0:
        return None
    i += len(key)
    j = data.find(b"\n", i)
    line = data[i:] if j < 0 else data[i:j]
    try:
        if line.endswith(b" kB"):
            return int(line[:-3]) * 1024
        return int(line)
    except ValueError:
        return None


def _reason(path: str, err: OSError) -> str:
    return f"{path} unreadable: {err.strerror or err}"


def read_meminfo(path: str = MEMINFO_PATH) -> dict[str, int]:
    """Every line of ``/proc/meminfo`` as ``{name: value}``, in bytes.

    Values given in ``kB`` are converted to bytes; unitless lines
    (``HugePages_Total``...) are counts and stay as they are. Returns an
    empty dict when the file cannot be read (it never raises).
    """
    try:
        data = read_bytes(path)
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in data.split(b"\n"):
        name, sep, rest = line.partition(b":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == b"kB":
            value *= 1024
        out[name.strip().decode("ascii", "replace")] = value
    return out


_K_TOTAL = b"\nMemTotal:"
_K_AVAIL = b"\nMemAvailable:"
_K_SWAP_TOTAL = b"\nSwapTotal:"
_K_SWAP_FREE = b"\nSwapFree:"
_K_OOM = b"\noom_kill "


def _meminfo_fields(path: str) -> tuple:
    """(MemTotal, MemAvailable, SwapTotal, SwapFree) in bytes, each int or Unknown."""
    try:
        data = b"\n" + read_bytes(path)
    except OSError as e:
        u = Unknown(_reason(path, e))
        return u, u, u, u
    out = []
    for key in (_K_TOTAL, _K_AVAIL, _K_SWAP_TOTAL, _K_SWAP_FREE):
        v = field_int(data, key)
        out.append(Unknown(f"{key[1:-1].decode()} missing from {path}") if v is None else v)
    return tuple(out)


def read_oom_kills(path: str = VMSTAT_PATH) -> int | Unknown:
    """The host's OOM-kill counter (``oom_kill`` in /proc/vmstat, kernel 4.13+)."""
    try:
        data = read_bytes(path)
    except OSError as e:
        return Unknown(_reason(path, e))
    v = field_int(data, _K_OOM)
    return Unknown(f"oom_kill missing from {path}") if v is None else v


def host_scope(
    *,
    oom_kills: bool = True,
    meminfo_path: str = MEMINFO_PATH,
    vmstat_path: str = VMSTAT_PATH,
) -> ScopeMemory:
    """The host as a :class:`ScopeMemory` (kind ``"host"``). Never raises.

    total = MemTotal, available = MemAvailable, swap from SwapTotal and
    SwapFree, ``oom_kills`` from /proc/vmstat. A field that cannot be read
    is an :class:`Unknown` carrying the reason. ``oom_kills=False`` skips
    /proc/vmstat (about two thirds of the cost) and leaves it UNKNOWN.
    """
    total, avail, swap_total, swap_free = _meminfo_fields(meminfo_path)
    if oom_kills:
        ooms = read_oom_kills(vmstat_path)
    else:
        ooms = Unknown("not read")
    return ScopeMemory("host", total, avail, swap_total, swap_free, ooms, "")


def host_totals(meminfo_path: str = MEMINFO_PATH) -> tuple[int | Unknown, int | Unknown]:
    """(MemTotal, SwapTotal) in bytes: the fixed sizes a cgroup scope is bounded by."""
    total, _avail, swap_total, _free = _meminfo_fields(meminfo_path)
    return total, swap_total
