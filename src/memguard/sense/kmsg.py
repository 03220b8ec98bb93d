"""The kernel's own OOM kills, read from the kernel log (``/dev/kmsg``).

Reading the kernel log
----------------------
``/dev/kmsg`` hands out one record per ``read()``::

    6,620,406331099,-;memory: usage 32768kB, limit 32768kB, failcnt 0

``<syslog priority>,<sequence>,<microseconds since boot>,<flags>;<text>``,
then optional ``" KEY=value"`` dictionary lines. A buffer too small for
the record gives ``EINVAL`` (the buffer is grown and the read retried).
The sequence number counts every record since boot; the ring is small
(128 KiB by default, about a thousand lines, and one OOM report with its
task table can take a hundred), so records are overwritten. A reader
whose position was overwritten gets ``EPIPE`` once and continues at the
oldest record still there: :class:`KmsgReader` reports that as a
:class:`KmsgGap` with the number of records lost, and so it does for
records lost while nobody was reading (a resumed cursor older than the
ring).

:class:`KmsgReader` is non-blocking and has a :meth:`~KmsgReader.fileno`
for ``loop.add_reader``. It opens either where the log stands now
(everything already in the ring is skipped) or from a saved
:class:`KmsgCursor` (boot id + next sequence number), so a restarted
daemon reads what the kernel logged while it was down: the records still
in the ring, and a :class:`KmsgGap` for those that were not. A cursor
from an earlier boot resumes at the start of this boot's log.

Only records of the kernel facility (0) count: user space can write to
``/dev/kmsg`` too, but never with facility 0, so a process cannot forge an
OOM report.

Parsing the OOM killer's reports
--------------------------------
One OOM event is a burst of lines; :class:`OomReportParser` groups them
and returns one :class:`OomKill` per killed process, with what the lines
of the report said:

- ``python invoked oom-killer: gfp_mask=0x..(GFP_..), order=0, oom_score_adj=0``
  (the task whose allocation failed, not necessarily the victim; an
  ``order=-1`` is a manual kill through sysrq);
- ``CPU: 1 UID: 0 PID: 9182 Comm: tr ...`` (the invoking pid);
- before 4.19: ``python cpuset=<name> mems_allowed=0`` and
  ``Task in /docker/<id> killed as a result of limit of /docker/<id>``;
- ``memory: usage 32768kB, limit 32768kB, failcnt 0`` (and
  ``memory+swap:`` on cgroup v1, ``swap:`` on v2): the limit that was hit;
- ``Mem-Info:``: a machine-wide OOM;
- since 4.19: ``oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),
  cpuset=...,mems_allowed=0,oom_memcg=/docker/<id>,task_memcg=/docker/<id>,
  task=sh,pid=18579,uid=0`` (``global_oom`` in place of ``oom_memcg=`` for a
  machine-wide OOM);
- before 5.x: ``[Memory cgroup ]Out of memory: Kill process N (comm) score S
  or sacrifice child`` (the chosen process; a child may die instead);
- the kill itself: ``Out of memory: Killed process N (comm) total-vm:..kB,
  anon-rss:..kB, file-rss:..kB, shmem-rss:..kB, UID:0 pgtables:..kB
  oom_score_adj:0`` (``Memory cgroup out of memory:`` for a cgroup limit;
  plain ``Killed process N (comm) total-vm:...`` before 5.1; ``, UID N,``
  on some distribution kernels);
- ``Tasks in /x are going to be killed due to memory.oom.group set``, then
  one more kill line per process of that cgroup;
- ``oom_reaper: reaped process N (comm), now anon-rss:0kB, ...``: a kill
  whose kill line was lost still yields a record.

:func:`records_from_text` turns kernel log text (``dmesg``, ``journalctl
-k``, ``/var/log/kern.log``) into records, so the same parser reads logs
collected elsewhere.

Everything here except :class:`KmsgReader` and :func:`read_boot_id` is
pure: no I/O, no clock.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence, Union

from memguard.model import Unknown

__all__ = [
    "KMSG_PATH",
    "BOOT_ID_PATH",
    "KmsgRecord",
    "KmsgGap",
    "KmsgProblem",
    "KmsgItem",
    "KmsgCursor",
    "KmsgUnavailable",
    "KmsgReader",
    "OomKill",
    "OomReportParser",
    "parse_record",
    "parse_oom_reports",
    "records_from_text",
    "read_boot_id",
    "kernel_time_to_wall",
    "CONSTRAINTS",
]

KMSG_PATH = "/dev/kmsg"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

FACILITY_KERNEL = 0

READ_SIZE = 8192
"""First read buffer, bytes. The kernel's longest /dev/kmsg record is about
8 KiB (CONSOLE_EXT_LOG_MAX); a record that does not fit (EINVAL) doubles it."""

READ_SIZE_MAX = 1 << 20
"""Largest buffer tried before a record is given up as unreadable, bytes."""

CONTEXT_TTL_US = 30_000_000
"""How long the lines of one OOM report apply to kill lines that follow, in
microseconds of kernel time (30 s). A report is printed within milliseconds;
a kill line much later without a new report belongs to something else."""

CONSTRAINTS = {
    "CONSTRAINT_NONE": "global",
    "CONSTRAINT_CPUSET": "cpuset",
    "CONSTRAINT_MEMORY_POLICY": "mempolicy",
    "CONSTRAINT_MEMCG": "memcg",
}
"""The kernel's constraint names and ours: ``global`` (the machine ran out),
``memcg`` (a memory cgroup's limit), ``cpuset``/``mempolicy`` (the memory
nodes the task may use ran out)."""


# ---------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class KmsgRecord:
    """One kernel log record.

    ``ts_us`` is the kernel's timestamp, microseconds since boot (the clock
    ``dmesg`` shows; it does not advance during suspend). ``facility`` is 0
    for the kernel itself, anything else for records written by user space.
    ``fields`` holds the record's dictionary (``SUBSYSTEM=``, ``DEVICE=``).
    """

    seq: int
    ts_us: int
    level: int
    text: str
    facility: int = FACILITY_KERNEL
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def from_kernel(self) -> bool:
        return self.facility == FACILITY_KERNEL


@dataclass(frozen=True)
class KmsgGap:
    """Records the ring overwrote before they were read: ``lost`` of them.

    ``first_lost`` is the first sequence number missed and ``next_seq`` the
    one reading resumed at. ``while_down`` is True for records lost between
    a saved cursor and this start (the daemon was not running).
    """

    first_lost: int
    next_seq: int
    while_down: bool = False

    @property
    def lost(self) -> int:
        return self.next_seq - self.first_lost

    def describe(self) -> str:
        when = " while memguard was not running" if self.while_down else ""
        return (f"{self.lost} kernel log record(s) were overwritten before memguard read them{when} "
                f"(sequence {self.first_lost}..{self.next_seq - 1}); an OOM kill among them is not named")


@dataclass(frozen=True)
class KmsgProblem:
    """Reading the kernel log failed; ``reason`` says why. The reader stops."""

    reason: str


KmsgItem = Union[KmsgRecord, KmsgGap, KmsgProblem]


_HEADER = re.compile(rb"^(\d+),(\d+),(\d+),([^;,]*)(?:,[^;]*)?;")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def _unescape(text: str) -> str:
    # The kernel writes bytes it will not print as \xNN (and a backslash as \x5c).
    if "\\x" not in text:
        return text
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def parse_record(raw: bytes) -> KmsgRecord | None:
    """One ``/dev/kmsg`` record from the bytes of one read; None if it is not one."""
    m = _HEADER.match(raw)
    if m is None:
        return None
    prio, seq, ts = int(m.group(1)), int(m.group(2)), int(m.group(3))
    body = raw[m.end():].decode("utf-8", "replace")
    text, _, rest = body.partition("\n")
    fields: dict[str, str] = {}
    for line in rest.split("\n"):
        if line.startswith(" ") and "=" in line:
            key, _, value = line[1:].partition("=")
            fields[key] = _unescape(value)
    return KmsgRecord(seq=seq, ts_us=ts, level=prio & 7, facility=prio >> 3, text=_unescape(text),
                      fields=fields)


# Prefixes of kernel log lines collected elsewhere: syslog ("Jun 24 18:49:43 host kernel: "),
# journalctl's short-iso form, dmesg's "[ 8341.856856] " or "[Mon Aug 31 18:23:18 2015] ",
# and a caller id "[ T9185] ".
_SYSLOG_PREFIX = re.compile(
    r"^(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?|\d{4}-\d\d-\d\dT[\d:.,+\-Z]+)\s+\S+\s+([^\s:\[]+)(?:\[\d+\])?:\s?")
_DMESG_TS = re.compile(r"^\s*\[\s*(\d+)\.(\d{1,9})\]\s?")
_DMESG_HUMAN_TS = re.compile(r"^\s*\[[^\]]*\d\d:\d\d:\d\d[^\]]*\]\s?")
_CALLER = re.compile(r"^\s*\[\s*[TC]\d+\]\s?")
_KMSG_TEXT = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;")


def records_from_text(lines: Iterable[str]) -> Iterator[KmsgRecord]:
    """Kernel log text (dmesg, journalctl -k, kern.log, /dev/kmsg dumps) as records.

    Syslog and dmesg prefixes are stripped, and syslog lines of programs
    other than the kernel are left out; a ``[seconds.micros]`` stamp
    becomes ``ts_us`` (0 when the text has none). Lines in /dev/kmsg form
    keep their own sequence numbers; other lines are numbered in order.
    All records are taken to be the kernel's.
    """
    n = 0
    for raw in lines:
        for line in raw.splitlines() or [""]:
            n += 1
            m = _KMSG_TEXT.match(line)
            if m is not None:
                rec = parse_record(line.encode())
                if rec is not None:
                    yield rec
                    continue
            text = line
            m = _SYSLOG_PREFIX.match(line)
            if m is not None:
                if m.group(1) != "kernel":
                    continue  # another program's line in a syslog file
                text = line[m.end():]
            ts = 0
            m = _DMESG_TS.match(text)
            if m is not None:
                ts = int(m.group(1)) * 1_000_000 + int(m.group(2).ljust(6, "0")[:6])
                text = text[m.end():]
            else:
                text = _DMESG_HUMAN_TS.sub("", text, count=1)
            text = _CALLER.sub("", text, count=1)
            yield KmsgRecord(seq=n, ts_us=ts, level=6, text=text.rstrip("\n"))


# ---------------------------------------------------------------------------
# The reader


class KmsgUnavailable(OSError):
    """/dev/kmsg cannot be read here; the message says why (start-up decision, logged once)."""


@dataclass(frozen=True)
class KmsgCursor:
    """Where reading stands: the boot and the next sequence number to read."""

    boot_id: str
    next_seq: int

    def to_dict(self) -> dict[str, object]:
        return {"boot_id": self.boot_id, "next_seq": self.next_seq}

    @classmethod
    def from_dict(cls, data: object) -> "KmsgCursor | None":
        """The cursor in ``data`` (as :meth:`to_dict` wrote it), or None if it is not one."""
        if not isinstance(data, dict):
            return None
        boot, seq = data.get("boot_id"), data.get("next_seq")
        if not isinstance(boot, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return None
        return cls(boot, seq)

    def dumps(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def loads(cls, text: str | bytes) -> "KmsgCursor | None":
        try:
            return cls.from_dict(json.loads(text))
        except ValueError:
            return None


def read_boot_id(path: str = BOOT_ID_PATH) -> str | Unknown:
    """This boot's id (a UUID), or Unknown with the reason."""
    try:
        with open(path, "rb") as f:
            return f.read().decode().strip()
    except OSError as e:
        return Unknown(f"{path} unreadable: {e.strerror or e}")


def kernel_time_to_wall(ts_us: int, now_wall: float, now_mono: float, offset_s: float = 0.0) -> float:
    """Wall-clock time (epoch seconds) of a kernel log timestamp, given the wall
    time and CLOCK_MONOTONIC read together now, and the offset between the
    two clocks (:attr:`KmsgReader.clock_offset_s`)."""
    return now_wall - (now_mono - (ts_us / 1e6 + offset_s))


FRESH_LIMIT_S = 60.0
"""A record read more than this long after its kernel timestamp (seconds) says
nothing about the clock offset: it is backlog, not news."""


class KmsgReader:
    """A non-blocking follower of ``/dev/kmsg``. Not thread-safe; one owner.

    :meth:`read` returns what is there now (records, gaps, at most one
    problem) and never blocks; register :meth:`fileno` with
    ``loop.add_reader`` to be woken when the kernel logs. :attr:`cursor`
    is what to save to resume after a restart.
    """

    def __init__(self, fd: int, boot_id: str, next_seq: int | None, *, path: str = KMSG_PATH,
                 pending: Sequence[KmsgItem] = (), read_size: int = READ_SIZE) -> None:
        self._fd = fd
        self.path = path
        self.boot_id = boot_id
        self._next_seq = next_seq
        self._size = read_size
        self._pending: list[KmsgItem] = list(pending)
        self._resuming = False  # the next gap is one of records lost while nobody read
        self._offset: float | None = None
        self.closed = False

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, path: str = KMSG_PATH, *, resume: KmsgCursor | None = None,
             boot_id: str | None = None, read_size: int = READ_SIZE) -> "KmsgReader":
        """Open the kernel log where it stands now, or at ``resume``.

        ``boot_id`` defaults to this boot's; a ``resume`` cursor from another
        boot resumes at the oldest record of this boot still in the ring.
        Records between the cursor and the oldest record still there come
        back from the first :meth:`read` as a :class:`KmsgGap`. ``read_size``
        is the first read buffer (grown on EINVAL). Raises
        :class:`KmsgUnavailable`.
        """
        if boot_id is None:
            got = read_boot_id()
            boot_id = got if isinstance(got, str) else ""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            hint = ""
            if e.errno in (errno.EPERM, errno.EACCES):
                hint = " (reading it needs root, or kernel.dmesg_restrict=0)"
            raise KmsgUnavailable(e.errno, f"cannot open {path}: {e.strerror or e}{hint}") from None
        reader = cls(fd, boot_id, None, path=path, read_size=read_size)
        try:
            if resume is None or not boot_id:
                reader._skip_to_end()
            else:
                same_boot = resume.boot_id == boot_id
                reader._next_seq = resume.next_seq if same_boot else 0
                reader._resuming = True
        except BaseException:
            reader.close()
            raise
        return reader

    def _skip_to_end(self) -> None:
        """Read past everything already in the ring, learning the next sequence number."""
        last: int | None = None
        for item in self._drain(limit=None, keep=False):
            if isinstance(item, KmsgRecord):
                last = item.seq
            elif isinstance(item, KmsgProblem):
                raise KmsgUnavailable(errno.EIO, item.reason)
        self._next_seq = None if last is None else last + 1

    # -- reading -----------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def cursor(self) -> KmsgCursor | None:
        """Where to resume after a restart; None until the position is known (empty log)."""
        if self._next_seq is None or not self.boot_id:
            return None
        return KmsgCursor(self.boot_id, self._next_seq)

    def read(self, limit: int = 4096, *, now: float | None = None) -> list[KmsgItem]:
        """What the kernel logged since the last read: up to ``limit`` records, with gaps. Never blocks.

        ``now``: CLOCK_MONOTONIC when the read was made (``time.monotonic()``);
        it refines :attr:`clock_offset_s`.
        """
        out, self._pending = self._pending, []
        if self.closed:
            return out
        out.extend(self._drain(limit=limit, keep=True))
        if now is not None:
            newest = next((i for i in reversed(out) if isinstance(i, KmsgRecord)), None)
            if newest is not None:
                lag = now - newest.ts_us / 1e6
                if abs(lag) < FRESH_LIMIT_S and (self._offset is None or lag < self._offset):
                    self._offset = lag
        return out

    @property
    def clock_offset_s(self) -> float:
        """CLOCK_MONOTONIC minus the kernel log's clock, seconds (0 until a fresh record was read).

        The kernel stamps its log with its scheduler clock, which can stand
        seconds apart from CLOCK_MONOTONIC (2.2 s on the machine these tests
        were written on). A record read as soon as it is written shows the
        offset plus the read latency; the smallest such figure is kept.
        """
        return self._offset if self._offset is not None else 0.0

    def monotonic_of(self, ts_us: int) -> float:
        """A kernel log timestamp on the CLOCK_MONOTONIC time line (the flight recorder's)."""
        return ts_us / 1e6 + self.clock_offset_s

    def _read_one(self) -> bytes | None | KmsgProblem:
        """One record's bytes; None when there is nothing more now. Retries EPIPE and EINVAL."""
        while True:
            try:
                return os.read(self._fd, self._size)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    continue  # overwritten under us: the next read is the oldest record left
                if e.errno == errno.EINVAL and self._size < READ_SIZE_MAX:
                    self._size *= 2
                    continue
                return KmsgProblem(f"reading {self.path} failed: {e.strerror or e}")

    def _drain(self, limit: int | None, keep: bool) -> Iterator[KmsgItem]:
        n = 0
        while limit is None or n < limit:
            raw = self._read_one()
            if raw is None:
                return
            if isinstance(raw, KmsgProblem):
                self.close()
                yield raw
                return
            if not raw:
                return
            rec = parse_record(raw)
            if rec is None:
                continue
            expected = self._next_seq
            if expected is not None and rec.seq < expected:
                continue  # already seen (a resume reads from the start of the ring)
            if keep and expected is not None and rec.seq > expected:
                yield KmsgGap(expected, rec.seq, while_down=self._resuming)
            self._resuming = False
            self._next_seq = rec.seq + 1
            n += 1
            yield rec

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self) -> "KmsgReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# OOM reports


@dataclass(frozen=True)
class OomKill:
    """One process killed by the kernel's OOM killer, with what its report said.

    Sizes are in KiB as the kernel prints them (None where the report does
    not say). ``constraint`` is ``global``, ``memcg``, ``cpuset``,
    ``mempolicy`` or ``unknown``. ``oom_memcg`` is the memory cgroup whose
    limit was hit; ``task_memcg`` the victim's own cgroup (paths from the
    root of the memory hierarchy, as the kernel prints them). ``group`` is
    set when the victim died with the rest of its cgroup (memory.oom.group).
    ``from_reaper``/``from_summary``: the kill line itself was never read;
    the oom_reaper line, or the report's ``oom-kill:`` summary, named the
    victim. ``lines`` quotes the report's key lines.
    """

    pid: int
    comm: str
    seq: int
    ts_us: int
    constraint: str = "unknown"
    uid: int | None = None
    oom_memcg: str | None = None
    task_memcg: str | None = None
    cpuset: str | None = None
    invoker: str | None = None
    invoker_pid: int | None = None
    gfp_mask: str | None = None
    order: int | None = None
    chosen_pid: int | None = None
    score: int | None = None
    total_vm_kb: int | None = None
    anon_rss_kb: int | None = None
    file_rss_kb: int | None = None
    shmem_rss_kb: int | None = None
    pgtables_kb: int | None = None
    oom_score_adj: int | None = None
    memory_usage_kb: int | None = None
    memory_limit_kb: int | None = None
    memsw_usage_kb: int | None = None
    memsw_limit_kb: int | None = None
    swap_usage_kb: int | None = None
    swap_limit_kb: int | None = None
    group: str | None = None
    first_seq: int | None = None
    from_reaper: bool = False
    from_summary: bool = False
    lines: tuple[str, ...] = ()

    @property
    def rss_kb(self) -> int | None:
        parts = [v for v in (self.anon_rss_kb, self.file_rss_kb, self.shmem_rss_kb) if v is not None]
        return sum(parts) if parts else None

    @property
    def limit_kind(self) -> str | None:
        """Which limit was hit: ``memory``, ``memory+swap`` (v1), or None (none known)."""
        mem_full = _at_limit(self.memory_usage_kb, self.memory_limit_kb)
        memsw_full = _at_limit(self.memsw_usage_kb, self.memsw_limit_kb)
        if memsw_full and not mem_full:
            return "memory+swap"
        if self.memory_limit_kb is not None and not _unlimited(self.memory_limit_kb):
            return "memory"
        if memsw_full:
            return "memory+swap"
        return None

    @property
    def limit_bytes(self) -> int | None:
        """The limit that was hit, in bytes (None for a machine-wide OOM, or when the report does not say)."""
        kind = self.limit_kind
        if kind == "memory":
            return self.memory_limit_kb * 1024  # type: ignore[operator]
        if kind == "memory+swap":
            return self.memsw_limit_kb * 1024  # type: ignore[operator]
        return None

    @property
    def cgroup(self) -> str | None:
        """The victim's cgroup: ``task_memcg``, else the limit's cgroup."""
        return self.task_memcg or self.oom_memcg

    @property
    def manual(self) -> bool:
        """True for an OOM kill asked for through sysrq (``order=-1``)."""
        return self.order == -1

    def describe(self) -> str:
        """One sentence: ``the kernel OOM killer killed pid 18579 (sh) at the 32MiB limit of /docker/3f2a…``."""
        from memguard.units import format_size

        what = f"the kernel OOM killer killed pid {self.pid} ({self.comm})"
        if self.manual:
            return what + ", asked for through sysrq (manual OOM kill)"
        if self.constraint == "memcg":
            limit = self.limit_bytes
            cg = self.oom_memcg or self.task_memcg
            where = f"the cgroup {cg}" if cg else "its cgroup"
            swap = " (memory+swap)" if self.limit_kind == "memory+swap" else ""
            if limit is not None:
                return f"{what} at the {format_size(limit)}{swap} limit of {where}"
            return f"{what} at the memory limit of {where}"
        if self.constraint == "global":
            return f"{what}: the machine ran out of memory"
        if self.constraint in ("cpuset", "mempolicy"):
            return f"{what}: the memory nodes it may use ran out ({self.constraint})"
        return what

    def to_dict(self) -> dict[str, object]:
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        d["lines"] = list(self.lines)
        return d


def _at_limit(usage: int | None, limit: int | None) -> bool:
    if usage is None or limit is None or _unlimited(limit):
        return False
    return usage >= limit - 64  # within one page-batch of the limit


def _unlimited(kb: int) -> bool:
    return kb >= (1 << 52)  # 9007199254740988kB is PAGE_COUNTER_MAX: no limit


_NUM = r"([\d,]+)"


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.replace(",", ""))
    except ValueError:
        return None


_INVOKED = re.compile(r"^(.*?) invoked oom-killer: (.*)$")
_GFP = re.compile(r"gfp_mask=(0x[0-9a-fA-F]+(?:\([^)]*\))?)")
_ORDER = re.compile(r"order=(-?\d+)")
_CPU_LINE = re.compile(r"^CPU: \d+ (?:UID: \d+ )?PID: (\d+) Comm: (.*?)(?: (?:Not tainted|Tainted:|Kdump:)|$)")
_OLD_CPUSET = re.compile(r"^(.*?) cpuset=(\S*) mems_allowed=\S*$")
_TASK_IN = re.compile(r"^Task in (\S+) killed as a result of limit of (\S+)")
_USAGE = re.compile(r"^(memory|memory\+swap|swap): usage " + _NUM + r"kB, limit " + _NUM + r"kB")
_SUMMARY = re.compile(r"^oom-kill:\s*(.*)$")
_SUMMARY_KEY = re.compile(r"(?:^|,)\s*(constraint|nodemask|cpuset|mems_allowed|oom_memcg|task_memcg|task|pid|uid)=")
_OOM_PREFIX = r"(Memory cgroup out of memory|Out of memory(?: \([^)]*\))?)"
_CHOSEN = re.compile(_OOM_PREFIX + r": Kill process (\d+) \((.*?)\) score (-?\d+)")
_KILLED = re.compile(r"(?:" + _OOM_PREFIX + r": )?\bKilled process (\d+) \((.*?)\)(?=[ ,]|$)(.*)$")
_SHARING = re.compile(r"^Kill process (\d+) \((.*?)\) sharing same memory")
_STATS = re.compile(r"^Memory cgroup stats for (\S+?):")
_GROUP = re.compile(r"^Tasks in (\S+) are going to be killed due to memory\.oom\.group set")
_REAPED = re.compile(r"^oom_reaper: reaped process (\d+) \((.*?)\), now anon-rss:" + _NUM + "kB")
_RSS = {
    "total_vm_kb": re.compile(r"total-vm:" + _NUM + "kB"),
    "anon_rss_kb": re.compile(r"anon-rss:" + _NUM + "kB"),
    "file_rss_kb": re.compile(r"file-rss:" + _NUM + "kB"),
    "shmem_rss_kb": re.compile(r"shmem-rss:" + _NUM + "kB"),
    "pgtables_kb": re.compile(r"pgtables:" + _NUM + "kB"),
}
_UID = re.compile(r"\bUID:? ?(\d+)")
_ADJ = re.compile(r"oom_score_adj:(-?\d+)")


def _parse_summary(text: str) -> tuple[dict[str, str], bool]:
    """The key=value pairs of an ``oom-kill:`` line, and whether it says ``global_oom``."""
    marks = list(_SUMMARY_KEY.finditer(text))
    out: dict[str, str] = {}
    global_oom = False
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        value = text[m.end():end]
        if value.endswith(",global_oom") or value.endswith(", global_oom"):
            value = value.rsplit(",", 1)[0]
            global_oom = True
        out[m.group(1)] = value.strip()
    if "global_oom" in text.split(","):
        global_oom = True
    return out, global_oom


@dataclass
class _Report:
    """The lines of one OOM report seen so far (mutable, private to the parser)."""

    first_seq: int
    ts_us: int
    invoker: str | None = None
    invoker_pid: int | None = None
    gfp_mask: str | None = None
    order: int | None = None
    constraint: str | None = None
    oom_memcg: str | None = None
    task_memcg: str | None = None
    cpuset: str | None = None
    stats_memcg: str | None = None
    summary_pid: int | None = None
    summary_uid: int | None = None
    summary_task: str | None = None
    summary_seq: int = 0
    summary_ts: int = 0
    chosen_pid: int | None = None
    score: int | None = None
    usage: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    group: str | None = None
    killed: set[int] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)


class OomReportParser:
    """Groups the lines of each OOM report; :meth:`feed` returns an :class:`OomKill` per death.

    Feed it every item a :class:`KmsgReader` returns, in order (or the
    records of :func:`records_from_text`). A kill is returned as soon as
    its kill line is read; the report's lines before it fill the record.
    A :class:`KmsgGap` forgets the report in progress.
    """

    def __init__(self) -> None:
        self._report: _Report | None = None

    def feed(self, item: KmsgItem) -> list[OomKill]:
        if isinstance(item, (KmsgGap, KmsgProblem)):
            self._report = None
            return []
        if not item.from_kernel:
            return []
        return self._line(item)

    def feed_all(self, items: Iterable[KmsgItem]) -> list[OomKill]:
        out: list[OomKill] = []
        for item in items:
            out.extend(self.feed(item))
        return out

    def flush(self) -> list[OomKill]:
        """The kill a report named (``oom-kill:... pid=N``) but whose kill line never came.

        Called by :meth:`feed` when the next report starts; call it at the
        end of a log excerpt. The report is forgotten either way.
        """
        r, self._report = self._report, None
        if r is None or r.summary_pid is None or r.summary_pid in r.killed or r.summary_task is None:
            return []
        rec = KmsgRecord(seq=r.summary_seq, ts_us=r.summary_ts, level=3, text="")
        return [self._kill(rec, "", r, prefix=None, pid=r.summary_pid, comm=r.summary_task, rest="",
                           from_summary=True)]

    # -- one line ----------------------------------------------------------

    def _current(self, rec: KmsgRecord) -> _Report | None:
        r = self._report
        if r is not None and rec.ts_us and r.ts_us and rec.ts_us - r.ts_us > CONTEXT_TTL_US:
            self._report = r = None
        return r

    def _line(self, rec: KmsgRecord) -> list[OomKill]:
        text = rec.text.strip()
        if not text:
            return []
        m = _INVOKED.match(text)
        if m is not None:
            out = self.flush()
            r = self._report = _Report(first_seq=rec.seq, ts_us=rec.ts_us, invoker=m.group(1))
            g = _GFP.search(m.group(2))
            o = _ORDER.search(m.group(2))
            r.gfp_mask = g.group(1) if g else None
            r.order = int(o.group(1)) if o else None
            r.lines.append(text)
            return out
        r = self._current(rec)
        m = _KILLED.search(text)
        if m is not None and "oom_reaper" not in text:
            if r is not None and int(m.group(2)) in r.killed:
                r.lines.append(text)
                return []  # the same process again (memory.oom.group kills the whole cgroup, its first victim too)
            return [self._kill(rec, text, r, prefix=m.group(1), pid=int(m.group(2)), comm=m.group(3),
                               rest=m.group(4))]
        m = _REAPED.match(text)
        if m is not None:
            pid = int(m.group(1))
            if r is not None and pid in r.killed:
                return []
            if r is None:
                return []  # a reaper line without its report: nothing to attribute
            return [self._kill(rec, text, r, prefix=None, pid=pid, comm=m.group(2), rest="", from_reaper=True)]
        m = _SHARING.match(text)
        if m is not None and r is not None:
            return [self._kill(rec, text, r, prefix=None, pid=int(m.group(1)), comm=m.group(2), rest="")]
        if r is None:
            # A report read from its middle (its first lines overwritten, or a log excerpt):
            # these lines still say enough to start one.
            if _SUMMARY.match(text) or _TASK_IN.match(text) or _CHOSEN.match(text) or _STATS.match(text):
                r = self._report = _Report(first_seq=rec.seq, ts_us=rec.ts_us)
            else:
                return []
        self._context(r, rec, text)
        return []

    def _context(self, r: _Report, rec: KmsgRecord, text: str) -> None:
        m = _CPU_LINE.match(text)
        if m is not None:
            if r.invoker_pid is None and (r.invoker is None or m.group(2).strip() == r.invoker):
                r.invoker_pid = int(m.group(1))
            return
        m = _OLD_CPUSET.match(text)
        if m is not None:
            r.cpuset = m.group(2) or None
            return
        m = _TASK_IN.match(text)
        if m is not None:
            r.task_memcg, r.oom_memcg = m.group(1), m.group(2)
            r.constraint = "memcg"
            r.lines.append(text)
            return
        m = _USAGE.match(text)
        if m is not None:
            r.usage.setdefault(m.group(1), (_int(m.group(2)), _int(m.group(3))))
            if m.group(1) == "memory":
                r.lines.append(text)
            return
        m = _STATS.match(text)
        if m is not None:
            if r.stats_memcg is None:
                r.stats_memcg = m.group(1)  # v1 prints the OOM cgroup first, then its descendants
            return
        if text.startswith("Mem-Info:"):
            if r.constraint is None:
                r.constraint = "global"
            return
        m = _SUMMARY.match(text)
        if m is not None:
            pairs, global_oom = _parse_summary(m.group(1))
            c = pairs.get("constraint")
            if c:
                r.constraint = CONSTRAINTS.get(c, c.lower().replace("constraint_", ""))
            elif global_oom:
                r.constraint = "global"
            if pairs.get("oom_memcg"):
                r.oom_memcg = pairs["oom_memcg"]
            if pairs.get("task_memcg"):
                r.task_memcg = pairs["task_memcg"]
            if pairs.get("cpuset"):
                r.cpuset = pairs["cpuset"]
            r.summary_pid = _int(pairs.get("pid"))
            r.summary_uid = _int(pairs.get("uid"))
            r.summary_task = pairs.get("task")
            r.summary_seq, r.summary_ts = rec.seq, rec.ts_us
            r.lines.append(text)
            return
        m = _CHOSEN.match(text)
        if m is not None:
            r.chosen_pid, r.score = int(m.group(2)), int(m.group(4))
            if r.constraint is None:
                # Before 4.19 a report has no constraint= line: "Memory cgroup out of memory" is a
                # cgroup's limit, "Out of memory" the machine (or, rarely, a cpuset).
                r.constraint = "memcg" if m.group(1).startswith("Memory cgroup") else "global"
            r.lines.append(text)
            return
        m = _GROUP.match(text)
        if m is not None:
            r.group = m.group(1)
            r.lines.append(text)

    def _kill(self, rec: KmsgRecord, text: str, r: _Report | None, *, prefix: str | None, pid: int, comm: str,
              rest: str, from_reaper: bool = False, from_summary: bool = False) -> OomKill:
        if r is None:
            r = self._report = _Report(first_seq=rec.seq, ts_us=rec.ts_us)
        constraint = r.constraint
        if prefix is not None and prefix.startswith("Memory cgroup"):
            constraint = "memcg"
        elif constraint is None and prefix is not None and prefix.startswith("Out of memory"):
            constraint = "global"
        values = {k: _int(rx.search(rest).group(1)) if rx.search(rest) else None for k, rx in _RSS.items()}
        uid_m = _UID.search(rest)
        adj_m = _ADJ.search(rest)
        uid = int(uid_m.group(1)) if uid_m else (r.summary_uid if r.summary_pid in (None, pid) else None)
        # The oom-kill: summary names the chosen task; with oom.group or a sacrificed child
        # another pid dies too, in the same cgroup unless the group says otherwise.
        task_memcg = r.task_memcg
        if r.group is not None and r.killed:
            task_memcg = r.group  # killed with the rest of the group: somewhere in it
        mem = r.usage.get("memory", (None, None))
        memsw = r.usage.get("memory+swap", (None, None))
        swap = r.usage.get("swap", (None, None))
        r.killed.add(pid)
        if text:
            r.lines.append(text)
        return OomKill(
            pid=pid, comm=comm, seq=rec.seq, ts_us=rec.ts_us, constraint=constraint or "unknown", uid=uid,
            oom_memcg=(r.oom_memcg or r.stats_memcg) if constraint == "memcg" else None, task_memcg=task_memcg, cpuset=r.cpuset,
            invoker=r.invoker, invoker_pid=r.invoker_pid, gfp_mask=r.gfp_mask, order=r.order,
            chosen_pid=r.chosen_pid if r.chosen_pid is not None else r.summary_pid, score=r.score,
            oom_score_adj=int(adj_m.group(1)) if adj_m else None,
            memory_usage_kb=mem[0], memory_limit_kb=mem[1], memsw_usage_kb=memsw[0], memsw_limit_kb=memsw[1],
            swap_usage_kb=swap[0], swap_limit_kb=swap[1], group=r.group,
            first_seq=r.first_seq, from_reaper=from_reaper, from_summary=from_summary, lines=tuple(r.lines[-8:]),
            **values,
        )


def parse_oom_reports(lines: Iterable[str]) -> list[OomKill]:
    """Every OOM kill in kernel log text (dmesg, journalctl -k, kern.log)."""
    parser = OomReportParser()
    return parser.feed_all(records_from_text(lines)) + parser.flush()
