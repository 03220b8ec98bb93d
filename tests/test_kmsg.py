"""The kernel log: /dev/kmsg records, the follower, and the OOM killer's reports across kernel versions.

The parser is checked on real kernel logs from public reports (tests/data/kernel_oom/, one file per
report, kernels 3.10 to 6.18, with where each came from) and on kills the kernel makes here, read from
the real /dev/kmsg: a process OOM-killed in a memory cgroup this test creates, read live, and read after
a "restart" from a saved cursor.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from memguard.sense.containers import attribute_cgroup
from memguard.sense.kmsg import (
    KmsgCursor,
    KmsgGap,
    KmsgReader,
    KmsgRecord,
    KmsgUnavailable,
    OomReportParser,
    parse_oom_reports,
    parse_record,
    records_from_text,
)

from daemonkit import make_cgroup

DATA = Path(__file__).resolve().parent / "data" / "kernel_oom"
EAT = [sys.executable, "-c",
       "b = []\nwhile True:\n    b.append(bytearray(4 << 20))\n    b[-1][::4096] = b'x' * (len(b[-1]) // 4096)"]


def sample(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text().splitlines() if not line.startswith("#")]


# ---------------------------------------------------------------------------
# Records


def test_parse_record_header_text_dictionary_and_escapes() -> None:
    """A /dev/kmsg record: priority split into facility and level, sequence, microseconds, the text with
    \\xNN escapes undone, and the dictionary lines as fields."""
    raw = b"6,620,406331099,-;memory: usage 32768kB, limit 32768kB\\x2c ok\n SUBSYSTEM=memory\n DEVICE=+x\n"
    rec = parse_record(raw)
    assert rec == KmsgRecord(seq=620, ts_us=406331099, level=6, text="memory: usage 32768kB, limit 32768kB, ok",
                             facility=0, fields={"SUBSYSTEM": "memory", "DEVICE": "+x"})
    assert parse_record(b"garbage") is None
    user = parse_record(b"14,5,100,-;Out of memory: Killed process 1 (init) total-vm:1kB\n")
    assert user is not None and user.facility == 1 and not user.from_kernel


def test_user_space_cannot_forge_an_oom_report() -> None:
    """Records of any facility but the kernel's are ignored: a process writing an OOM report to /dev/kmsg
    (facility 1, 'user') makes no kill."""
    forged = [parse_record(b"11,7,100,-;Memory cgroup out of memory: Killed process 4242 (sshd) total-vm:1kB, "
                           b"anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0\n")]
    assert OomReportParser().feed_all(forged) == []
    kernel = [parse_record(b"3,7,100,-;Memory cgroup out of memory: Killed process 4242 (sshd) total-vm:1kB\n")]
    assert [k.pid for k in OomReportParser().feed_all(kernel)] == [4242]


def test_text_logs_keep_kernel_lines_only() -> None:
    """dmesg, dmesg -T, syslog and journalctl prefixes are stripped; syslog lines of other programs (a
    node-problem-detector quoting the kill) are not taken for kernel lines."""
    lines = sample("aks-5.15-cri-oom-group.log")
    recs = list(records_from_text(lines))
    assert len(recs) == 4
    assert recs[0].ts_us == 8341856856 and recs[0].text.startswith("oom-kill:constraint=")
    (r,) = records_from_text(["[Thu Dec  7 00:05:15 2017] Killed process 28438 (java) total-vm:2kB"])
    assert r.text.startswith("Killed process") and r.ts_us == 0
    (r,) = records_from_text(["Aug 30 06:58:55.050705 node1 kernel: oom-kill:x"])
    assert r.text == "oom-kill:x"


# ---------------------------------------------------------------------------
# Real reports from public sources, 3.10 to 6.x


CORPUS = [
    # file, pid, comm, constraint, uid, oom_memcg (suffix), limit_bytes, owner kind, extra checks
    ("this-machine-docker-6.18.kmsg", 9166, "sh", "memcg", 0, "/docker/c25ab6f2f306a8e52f6a72a35402fc8660c79f1d169"
     "3247186f0f206768b6041", 32 << 20, "container", {"invoker": "tr", "invoker_pid": 9182, "anon_rss_kb": 31744}),
    ("aks-5.15-cri-oom-group.log", 68061, "stress", "memcg", 0, "/kubepods.slice", None, "container",
     {"oom_score_adj": 872, "pgtables_kb": 5696}),
    ("gpud-cri-containerd-lxc.log", 461754, "pt_main_thread", "memcg", 0, "-pod"
     "eded8c65_6e8e_4c6e_a889_3e427565c740.slice", None, "container", {"from_summary": True}),
    ("systemd-5.x-global-docker.log", 7134, "java", "global", 1000, None, None, "container", {"from_summary": True}),
    ("generic-5.x-global-init-scope.log", 7899, "python", "global", 0, None, None, "systemd-unit",
     {"total_vm_kb": 26184840}),
    ("generic-6.x-global-uid.log", 2475067, "postgres", "global", 1011, None, None, None, {"oom_score_adj": 900}),
    ("debian-6.16-global.log", 3581527, "uwsgi", "global", 33, None, None, None, {"file_rss_kb": 29128}),
    ("ubuntu-5.4-memcg-uid.log", 63214, "uwsgi", "memcg", 0, None, None, None, {"shmem_rss_kb": 92}),
    ("rhel8-4.18-memsw-limit.log", 7093, "java", "memcg", None, "docker-083afd1a06b8b612ab5d974e12200d7fd1d35be6a44"
     "f0e368179399ef6c6e84d.scope", 35651584 * 1024, "container",
     {"limit_kind": "memory+swap", "invoker_pid": 7127, "gfp_mask": "0x6200ca(GFP_HIGHUSER_MOVABLE)"}),
    ("kmsg-raw-k8s-reaper-only.kmsg", 2292670, "main", "memcg", None,
     "kubepods-pod9eb0e64e_6e1a_43e4_b372_2603a3cc2941.slice", 20480 * 1024, "container", {"from_reaper": True}),
    ("rhel7-3.10-memcg-k8s.log", 28438, "java", "memcg", None, "/6895a3e13439535852d3184ac2aadd26d7363cc035f171545"
     "ec7d4ce74073b0b", None, None, {"chosen_pid": 24572, "file_rss_kb": 13684}),
    ("rhel7-3.10-uid-variant.log", 18177, "palo_be", "memcg", 0, None, None, None, {"chosen_pid": 24984}),
    ("generic-4.x-global.log", 21518, "python2", "global", None, None, None, None, {"score": 752}),
]


@pytest.mark.parametrize("name,pid,comm,constraint,uid,oom_memcg,limit,owner,extra", CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_real_reports(name, pid, comm, constraint, uid, oom_memcg, limit, owner, extra) -> None:
    """Each real report yields the killed process with what its lines said (and nothing invented)."""
    kills = parse_oom_reports(sample(name))
    assert len(kills) == 1, kills
    k = kills[0]
    assert (k.pid, k.comm, k.constraint, k.uid) == (pid, comm, constraint, uid)
    if oom_memcg is None:
        assert k.oom_memcg is None
    else:
        assert k.oom_memcg is not None and k.oom_memcg.endswith(oom_memcg)
    assert k.limit_bytes == limit
    for key, value in extra.items():
        assert getattr(k, key) == value, key
    if owner is not None:
        assert k.cgroup is not None and attribute_cgroup(k.cgroup).kind == owner


def test_sacrificed_children_and_repeated_kills() -> None:
    """4.15: 'Kill process 4142 ... or sacrifice child' then 'Killed process 4254': the child that died is the
    victim, the chosen parent is kept apart. Two reports, two kills."""
    kills = parse_oom_reports(sample("ubuntu-4.15-memcg-child.log"))
    assert [(k.pid, k.chosen_pid, k.constraint) for k in kills] == [(4254, 4142, "memcg"), (4255, 4142, "memcg")]
    kills = parse_oom_reports(sample("ubuntu-5.4-memcg-reaper.log"))
    assert [k.pid for k in kills] == [15617, 15674]
    assert not any(k.from_reaper for k in kills)  # the reaper lines confirm, they add no kill


def test_reports_without_a_kill_line_name_nobody() -> None:
    """A report whose kill line is missing (the excerpt stops, or only the chosen process is named) yields no
    kill: 'Kill process N ... or sacrifice child' does not say who died."""
    assert parse_oom_reports(sample("k8s-4.x-task-in-memsw.log")) == []
    assert parse_oom_reports(sample("k8s-4.x-task-in-pod.log")) == []


def test_oom_group_kills_each_process_once() -> None:
    """memory.oom.group: after 'Tasks in X are going to be killed', further kills carry the group; a pid killed
    twice (the first victim again) is one death."""
    base = "Memory cgroup out of memory: Killed process {} (w) total-vm:10kB, anon-rss:5kB, file-rss:0kB, " \
           "shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0"
    lines = [
        "[10.000000] w invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "[10.000100] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/job,"
        "task_memcg=/job/a,task=w,pid=100,uid=0",
        "[10.000200] " + base.format(100),
        "[10.000300] Tasks in /job are going to be killed due to memory.oom.group set",
        "[10.000400] " + base.format(100),
        "[10.000500] " + base.format(101),
        "[10.000600] " + base.format(102),
    ]
    kills = parse_oom_reports(lines)
    assert [(k.pid, k.group, k.task_memcg) for k in kills] == [(100, None, "/job/a"), (101, "/job", "/job"),
                                                              (102, "/job", "/job")]
    assert all(k.oom_memcg == "/job" and k.invoker == "w" for k in kills)


def test_a_gap_forgets_the_report_in_progress() -> None:
    """Records lost in the middle of a report: the kill after the gap is not given the lost report's cgroup."""
    p = OomReportParser()
    p.feed(KmsgRecord(1, 1_000_000, 4, "a invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"))
    p.feed(KmsgRecord(2, 1_000_001, 6, "Task in /x killed as a result of limit of /x"))
    p.feed(KmsgGap(3, 50))
    (k,) = p.feed(KmsgRecord(50, 1_000_100, 3, "Out of memory: Killed process 7 (b) total-vm:1kB"))
    assert k.task_memcg is None and k.constraint == "global" and k.invoker is None


def test_manual_sysrq_kill_is_told_apart() -> None:
    """order=-1 in the invoked line is a kill asked for through sysrq, not memory running out."""
    (k,) = parse_oom_reports([
        "[5.0] kworker/0:1 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=-1, oom_score_adj=0",
        "[5.1] Out of memory: Killed process 9 (hog) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, "
        "UID:0 pgtables:0kB oom_score_adj:0"])
    assert k.manual and "sysrq" in k.describe()


def test_cursor_round_trip_and_bad_input() -> None:
    """The saved cursor reads back; anything else reads as no cursor (never an exception)."""
    c = KmsgCursor("b00t", 42)
    assert KmsgCursor.loads(c.dumps()) == c
    for bad in ("", "nope", "[]", '{"boot_id": 1, "next_seq": 2}', '{"boot_id": "x", "next_seq": -1}',
                '{"boot_id": "x", "next_seq": true}'):
        assert KmsgCursor.loads(bad) is None


# ---------------------------------------------------------------------------
# The real /dev/kmsg


def _reader(**kw) -> KmsgReader:
    if os.geteuid() != 0:
        pytest.skip("reading /dev/kmsg needs root here")
    try:
        return KmsgReader.open(**kw)
    except KmsgUnavailable as e:
        pytest.skip(str(e))


def _oom_kill_in_cgroup(limit: int = 64 << 20) -> tuple[int, str]:
    """Start a process that eats memory in a fresh memory cgroup; return its pid and the cgroup's kernel path
    once the kernel has killed it."""
    cg = make_cgroup(limit)
    try:
        proc = subprocess.Popen(cg.wrap(EAT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proc.wait(timeout=60) == -9
        assert cg.oom_kills() >= 1
        root = "/sys/fs/cgroup/memory" if cg.version == 1 else "/sys/fs/cgroup"
        return proc.pid, "/" + os.path.relpath(cg.path, root)
    finally:
        cg.cleanup()


def _kills_of(reader: KmsgReader, pid: int, timeout: float = 10.0):
    """Read (waiting on the reader's fd) until the kill of ``pid`` is parsed."""
    parser = OomReportParser()
    items = []
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = reader.read(now=time.monotonic())
        items.extend(got)
        for k in parser.feed_all(got):
            if k.pid == pid:
                return k, items
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no kill of pid {pid} in {len(items)} records")
        select.select([reader], [], [], left)


def test_live_kill_in_a_memory_cgroup() -> None:
    """A process OOM-killed in its own memory cgroup: the follower, opened before, reads the kernel's report
    and the parser names the pid, the command, the cgroup and its limit."""
    with _reader() as reader:
        start = reader.cursor
        pid, cgroup = _oom_kill_in_cgroup(64 << 20)
        kill, items = _kills_of(reader, pid)
        # Read fresh, the records place the kill on the monotonic clock within the time the test took.
        import time

        now = time.monotonic()
        assert now - 30 < reader.monotonic_of(kill.ts_us) <= now
    assert kill.comm.startswith("python")
    assert kill.constraint == "memcg"
    assert kill.task_memcg == cgroup and kill.oom_memcg == cgroup
    assert kill.limit_bytes == 64 << 20
    assert kill.uid == 0 and kill.anon_rss_kb and kill.anon_rss_kb > 30_000
    assert attribute_cgroup(kill.cgroup).kind == "process"
    # Opened where the log stood: nothing older than the start position came back.
    assert start is not None and all(i.seq >= start.next_seq for i in items if isinstance(i, KmsgRecord))


def test_resume_reads_what_happened_while_down() -> None:
    """A follower closed (the daemon stopped), a kill, a new follower from the saved cursor: the kill is read.
    A cursor from another boot reads this boot's ring from its start."""
    with _reader() as first:
        cursor = first.cursor
    assert cursor is not None
    pid, cgroup = _oom_kill_in_cgroup(48 << 20)
    with _reader(resume=KmsgCursor.loads(cursor.dumps())) as again:
        kill, items = _kills_of(again, pid)
        assert kill.task_memcg == cgroup
        recs = [i for i in items if isinstance(i, KmsgRecord)]
        assert recs[0].seq == cursor.next_seq  # nothing skipped, nothing repeated
        assert again.cursor is not None and again.cursor.next_seq > cursor.next_seq
    with _reader(resume=KmsgCursor("another-boot", 10**9)) as other:
        first_items = other.read(limit=1)
        assert first_items and (isinstance(first_items[0], KmsgGap) or first_items[0].seq >= 0)
        kill, _ = _kills_of(other, pid)
        assert kill.pid == pid


def test_small_read_buffer_grows_on_einval() -> None:
    """A read buffer smaller than a record gets EINVAL from the kernel; the reader grows it and loses nothing."""
    with _reader(resume=KmsgCursor("another-boot", 0), read_size=16) as reader:
        items = reader.read(limit=50)
    recs = [i for i in items if isinstance(i, KmsgRecord)]
    assert len(recs) == 50 and all(r.text for r in recs)
    assert any(len(r.text) > 16 for r in recs)


@pytest.mark.skipif(os.environ.get("MEMGUARD_TEST_KMSG_WRAP") != "1",
                    reason="overwrites the whole kernel log ring (set MEMGUARD_TEST_KMSG_WRAP=1; CI does)")
def test_records_overwritten_before_reading_are_reported() -> None:
    """When the ring wraps past an unread position, the kernel answers EPIPE and reading resumes at the oldest
    record: the reader reports a gap with the number of records lost, then goes on."""

    with _reader() as reader:
        start = reader.cursor
        assert start is not None
        filler = b"memguard test: filling the kernel log ring " + b"." * 900
        wrapped = False
        written = 0
        while written < (64 << 20) and not wrapped:
            for _ in range(200):
                # A fresh fd per write: each open file gets its own rate limit (printk_devkmsg=ratelimit).
                fd = os.open("/dev/kmsg", os.O_WRONLY)
                try:
                    os.write(fd, b"<6>" + filler)
                finally:
                    os.close(fd)
                written += len(filler)
            with _reader(resume=KmsgCursor(reader.boot_id, 0)) as probe:
                first = probe.read(limit=1)
                oldest = first[-1].seq if first and isinstance(first[-1], KmsgRecord) else 0
            wrapped = oldest > start.next_seq
        if not wrapped:
            pytest.skip("the kernel log ring is larger than 64 MiB")
        items = reader.read()
    gaps = [i for i in items if isinstance(i, KmsgGap)]
    assert gaps and gaps[0].first_lost == start.next_seq and gaps[0].lost > 0
    assert not gaps[0].while_down and "overwritten" in gaps[0].describe()
    after = items[items.index(gaps[0]) + 1]
    assert isinstance(after, KmsgRecord) and after.seq == gaps[0].next_seq
