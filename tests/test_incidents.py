"""Incident records: the store (atomic writes, retention, damaged files, one record per death, queries), what
each kind of death is called, and kernel OOM kills recorded end to end from the real kernel log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from memguard.model import Exited, Explanation, Observation, Signal, SignalProcess
from memguard.report.deaths import KMSG_STATE, DeathWatch
from memguard.report.incidents import (
    CAUSES,
    Incident,
    IncidentStore,
    cause_of_rule,
    default_incident_dir,
    exit_meaning,
    incident_for_action,
    incident_from_exit,
    incident_from_oom_kill,
    incident_id,
)
from memguard.report.recorder import FlightRecorder
from memguard.sense.containers import attribute_cgroup
from memguard.sense.host import host_scope
from memguard.sense.kmsg import KmsgReader, KmsgUnavailable, parse_oom_reports

from daemonkit import make_cgroup

DATA = Path(__file__).resolve().parent / "data" / "kernel_oom"
EAT = [sys.executable, "-c",
       "b = []\nwhile True:\n    b.append(bytearray(4 << 20))\n    b[-1][::4096] = b'x' * (len(b[-1]) // 4096)"]


def _inc(wall: float, key: str, cause: str = "exit", **kw) -> Incident:
    return Incident(id=incident_id(wall, key), key=key, cause=cause, summary=kw.pop("summary", key), wall=wall, **kw)


# ---------------------------------------------------------------------------
# The store


def test_round_trip_and_no_leftovers(tmp_path: Path) -> None:
    """A record reads back equal; the directory holds the one file and nothing half-written."""
    store = IncidentStore(tmp_path)
    inc = _inc(1_700_000_000.5, "death:b:42", "host_oom", what={"pid": 42, "owner": {"kind": "process", "cgroup": "/"}},
               how={"oom": {"limit_bytes": 1 << 30}}, timeline={"scope": {"t": [-1.0, 0.0]}})
    path = store.write(inc)
    assert path.name == inc.id + ".json" and inc.id.startswith("20231114-221320-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert store.load(inc.id) == inc
    assert store.load(inc.id[:10]) == inc  # a unique prefix
    assert json.loads(path.read_text())["cause"] == "host_oom"


def test_a_writer_killed_mid_stream_leaves_only_whole_records(tmp_path: Path) -> None:
    """A process writing records in a loop is SIGKILLed at some point: every record file in the store parses
    (a half-written one can only be a temporary file, which listing ignores and pruning removes)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / 'src')!r})
        from memguard.report.incidents import IncidentStore, Incident, incident_id
        store = IncidentStore({str(tmp_path)!r}, max_count=10**6, max_bytes=1 << 40, max_age_s=1e12)
        big = "x" * 200_000
        n = 0
        while True:
            key = f"death:b:{{n}}"
            store.write(Incident(id=incident_id(1.7e9 + n, key), key=key, cause="exit", summary=big, wall=1.7e9 + n),
                        durable=False, prune=False)
            n += 1
            if n == 20:
                print("go", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"go\n"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -9
    store = IncidentStore(tmp_path)
    good, bad = store.scan()
    assert len(good) >= 20 and bad == []
    assert all(len(i.summary) == 200_000 for i in good)


def test_readers_never_see_half_a_record(tmp_path: Path) -> None:
    """A reader racing a writer that keeps replacing one large record always reads a whole record."""
    store = IncidentStore(tmp_path)
    key = "death:b:1"
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            store.write(_inc(1.7e9, key, summary=str(n) * 100_000), durable=False, prune=False)
            n = (n + 1) % 10

    t = threading.Thread(target=writer)
    t.start()
    try:
        iid = incident_id(1.7e9, key)
        seen = 0
        while seen < 200:
            got = store.load(iid)
            if got is None:
                continue  # not written yet
            if len(set(got.summary)) != 1 or len(got.summary) != 100_000:
                errors.append(got.summary[:20])
            seen += 1
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_damaged_files_are_named_and_skipped(tmp_path: Path) -> None:
    """Empty, truncated, non-UTF-8, wrong-shaped files: listing skips them and says why; loading gives None."""
    store = IncidentStore(tmp_path)
    good = _inc(1.7e9, "death:b:7")
    store.write(good)
    (tmp_path / "20240101-000000-aaaaaaaa.json").write_text("")
    (tmp_path / "20240101-000000-bbbbbbbb.json").write_text(good.to_json()[:40])
    (tmp_path / "20240101-000000-cccccccc.json").write_bytes(b"\xff\xfe{")
    (tmp_path / "20240101-000000-dddddddd.json").write_text('{"id": "x", "cause": "exit", "wall": "soon"}')
    (tmp_path / "20240101-000000-eeeeeeee.json").write_text('[1, 2]')
    (tmp_path / "notes.txt").write_text("not a record")
    items, broken = store.scan()
    assert [i.id for i in items] == [good.id]
    reasons = {Path(b.path).stem[-8:]: b.reason for b in broken}
    assert reasons.keys() == {"aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd", "eeeeeeee"}
    assert reasons["aaaaaaaa"] == "empty" and "wall is not a number" in reasons["dddddddd"]
    assert store.load("20240101-000000-bbbbbbbb") is None
    assert store.load("../etc/passwd") is None


def test_retention_by_count_age_and_bytes(tmp_path: Path) -> None:
    """The oldest go first past each limit; stale temporary files of dead writers go too."""
    now = 1.8e9
    store = IncidentStore(tmp_path, max_count=5, max_age_s=3600, max_bytes=10**9, clock=lambda: now)
    for n in range(8):
        store.write(_inc(now - 100 * n, f"k{n}"), prune=False)
    store.write(_inc(now - 7200, "old"), prune=False)
    tmp = tmp_path / ".x.tmp"
    tmp.write_text("half")
    os.utime(tmp, (0, 0))
    removed = store.prune()
    assert removed == 5 and not tmp.exists()
    assert [i.key for i in store.list()] == ["k0", "k1", "k2", "k3", "k4"]
    size = IncidentStore(tmp_path / "probe").write(_inc(now, "big0", summary="y" * 500)).stat().st_size
    small = IncidentStore(tmp_path / "small", max_count=100, max_age_s=1e9, max_bytes=2 * size + 10,
                          clock=lambda: now)
    for n in range(3):
        small.write(_inc(now + n, f"big{n}", summary="y" * 500))
    assert [i.key for i in small.list()] == ["big2", "big1"]  # the newest that fit


def test_one_death_seen_twice_is_one_record(tmp_path: Path) -> None:
    """The kernel's report of a kill and the worker's exit (same boot, same pid, within the window) merge: the
    stronger cause leads, every detail of both is kept. The same pid much later is another death."""
    store = IncidentStore(tmp_path)
    (kill,) = parse_oom_reports([l for l in (DATA / "this-machine-docker-6.18.kmsg").read_text().splitlines()
                                 if not l.startswith("#")])
    kernel = incident_from_oom_kill(kill, attribute_cgroup(kill.cgroup), wall=1.8e9, boot_id="b")
    ex = Exited(worker="w-0", incarnation=1, pid=kill.pid, at=5.0, signal=9, last_lines=("epoch 1",))
    exit_view = incident_from_exit(ex, wall=1.8e9 + 0.2, boot_id="b", command=["python", "train.py"])
    store.record(exit_view)
    merged = store.record(kernel)
    assert len(store.list()) == 1
    assert merged.cause == "host_oom" and merged.sources == ["exit", "kernel"]
    assert merged.what["command"] == ["python", "train.py"] and merged.how["oom"]["limit_bytes"] == 32 << 20
    later = incident_from_exit(ex, wall=1.8e9 + 3600, boot_id="b")
    store.record(later)
    assert len(store.list()) == 2


def test_queries_for_diagnose(tmp_path: Path) -> None:
    """latest, by pid, by worker, by container name or id prefix, by unit, and find() choosing among them."""
    store = IncidentStore(tmp_path)
    cid = "c0ffee" + "1" * 58
    t = time.time() - 60
    store.write(_inc(t, "a", what={"pid": 10, "owner": {"kind": "memguard-worker", "cgroup": "/x",
                                                           "worker": "trials-0"}}))
    store.write(_inc(t + 1, "b", what={"pid": 11, "owner": {"kind": "container", "cgroup": f"/docker/{cid}",
                                                               "container_id": cid, "name": "web-1"}}))
    store.write(_inc(t + 2, "c", what={"pid": 12, "owner": {"kind": "systemd-unit", "cgroup": "/s",
                                                               "unit": "ssh.service"}}))
    assert [i.key for i in store.latest(2)] == ["c", "b"]
    assert [i.key for i in store.by_pid(10)] == ["a"]
    assert [i.key for i in store.by_worker("trials-0")] == ["a"]
    assert [i.key for i in store.by_container("web-1")] == ["b"]
    assert [i.key for i in store.by_container(cid[:12])] == ["b"]
    assert store.by_container("c0f") == []  # too short to be an id prefix
    assert [i.key for i in store.by_unit("ssh")] == ["c"]
    assert [i.key for i in store.find("11")] == ["b"]
    assert [i.key for i in store.find("trials-0")] == ["a"]
    assert [i.key for i in store.find("web-1")] == ["b"]
    assert store.find("nothing-like-it") == []


def test_state_directory_choice() -> None:
    """systemd's StateDirectory= wins; then root's /var/lib/memguard; then XDG_STATE_HOME; then ~/.local/state."""
    assert default_incident_dir({"STATE_DIRECTORY": "/var/lib/memguard:/other"}, 1000) == \
        Path("/var/lib/memguard/incidents")
    assert default_incident_dir({}, 0) == Path("/var/lib/memguard/incidents")
    assert default_incident_dir({"XDG_STATE_HOME": "/x"}, 1000) == Path("/x/memguard/incidents")
    assert default_incident_dir({"HOME": "/home/u"}, 1000) == Path("/home/u/.local/state/memguard/incidents")


def test_small_state_beside_the_records(tmp_path: Path) -> None:
    """The kernel log cursor is kept as a dot-file: not a record, never listed, read back as written."""
    store = IncidentStore(tmp_path)
    store.save_state("kmsg", {"boot_id": "b", "next_seq": 5})
    assert store.load_state("kmsg") == {"boot_id": "b", "next_seq": 5}
    assert store.load_state("other") is None
    assert store.scan() == ([], [])


# ---------------------------------------------------------------------------
# What each death is called


def _exit(**kw) -> Exited:
    base = dict(worker="w-0", incarnation=1, pid=100, at=1.0)
    base.update(kw)
    return Exited(**base)


CUDA = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"


@pytest.mark.parametrize("exited,sent,cause", [
    (_exit(returncode=0, last_lines=(CUDA, "recovered, batch halved")), False, "none"),
    (_exit(signal=9, kernel_oom=True, oom_detail="at its cgroup limit 256MiB", last_lines=(CUDA,)), False, "host_oom"),
    (_exit(signal=9, kernel_oom=False), False, "killed"),
    (_exit(signal=15), True, "none"),
    (_exit(returncode=1, last_lines=(CUDA,)), False, "gpu_oom"),
    (_exit(returncode=1, last_lines=("MemoryError",)), False, "host_oom"),
    (_exit(returncode=3, last_lines=("ValueError: bad",)), False, "exit"),
], ids=["exit0-recovered", "kernel-oom-with-cuda-context", "sigkill-elsewhere", "stopped-by-memguard",
        "cuda-oom-exit1", "memoryerror", "plain-failure"])
def test_exit_causes(exited: Exited, sent: bool, cause: str) -> None:
    """The exit status decides whether it failed (exit 0 never did), the kernel's count then the output decide
    why; a GPU line before a kernel OOM kill is context."""
    inc = incident_from_exit(exited, wall=1.8e9, boot_id="b", sent_by_memguard=sent)
    assert inc.cause == cause, inc.summary
    assert inc.cause in CAUSES
    if cause == "host_oom" and exited.kernel_oom:
        assert "context, not the cause" in inc.why["text"] and inc.how["output_cause"] == "gpu_oom"


def test_exit_meanings() -> None:
    """Exit codes and signals in words, including the shell's 128+N."""
    assert exit_meaning(0) == "exit 0 (success)"
    assert "SIGKILL" in exit_meaning(137) and "128+9" in exit_meaning(137)
    assert "command not found" in exit_meaning(127)
    assert exit_meaning(signal=9).startswith("killed by SIGKILL")
    assert "signal 99" in exit_meaning(signal=99)


def test_pending_reads_the_newest_files_and_returns_only_pending_records(tmp_path: Path) -> None:
    """``pending(n)`` (a daemon's start closing what a dead predecessor left pending) looks at the n newest
    files only and returns their pending records, not the complete ones nor a file that is not a record."""
    store = IncidentStore(tmp_path)
    now = time.time()  # recent: older records would be pruned by age as the next ones are written
    old_pending = incident_for_action(Signal(worker="w-0", workload="w", pid=10, incarnation=1, signum=9,
                                             event="kill", reason="rule r"), wall=now - 300, monotonic=1.0)
    store.write(old_pending, durable=False)
    done = incident_for_action(Signal(worker="w-1", workload="w", pid=11, incarnation=1, signum=9, event="kill",
                                      reason="rule r"), wall=now - 200, monotonic=2.0)
    store.write(done, durable=False)
    store.complete(done.id, wall=now - 199, signal=9)
    new_pending = incident_for_action(Signal(worker="w-2", workload="w", pid=12, incarnation=1, signum=9,
                                             event="kill", reason="rule r"), wall=now - 100, monotonic=3.0)
    store.write(new_pending, durable=False)
    (tmp_path / "29991231-235959-ffffffff.json").write_text("{ pending, but not JSON")
    assert [i.id for i in store.pending(10)] == [new_pending.id, old_pending.id]
    assert [i.id for i in store.pending(2)] == [new_pending.id]  # the broken newest file counts as looked at


def test_memguards_own_action_before_the_signal(tmp_path: Path) -> None:
    """The record of memguard's decision (rule, numbers, ranking) is written pending before the signal and
    completed after: the cause follows what the rule watched."""
    ex = Explanation(rule="host-low", when="memory.available < 10%", signal="memory.available",
                     value=1.2e9, threshold=1.6e9, unit="bytes",
                     display="memory.available 1.1GiB (7.5% of 15.6GiB) < 10% (1.6GiB)")
    act = Signal(worker="trials-0", workload="trials", pid=4242, incarnation=3, signum=15, event="terminate",
                 reason="rule host-low", explain=ex)
    ranking = [{"worker": "trials-0", "memory_bytes": 9 << 30, "score": 1.0},
               {"worker": "trials-1", "memory_bytes": 2 << 30, "score": 0.2}]
    inc = incident_for_action(act, wall=1.8e9, monotonic=100.0, boot_id="b", command=["python", "t.py"],
                              user="ml", ranking=ranking)
    assert inc.state == "pending" and inc.cause == "host_oom"
    assert inc.why["rule"] == "host-low" and inc.why["threshold"] == 1.6e9 and inc.why["ranking"][0]["worker"] == \
        "trials-0"
    store = IncidentStore(tmp_path)
    store.write(inc, durable=False)
    done = store.complete(inc.id, wall=1.8e9 + 2.5, signal=15)
    assert done is not None and done.state == "complete" and done.outcome["after_s"] == 2.5
    assert store.load(inc.id).outcome["signal_name"] == "SIGTERM"
    gpu = Explanation("gpu-budget", "worker.gpu_memory > 98%", "worker.gpu_memory", 1.0, 0.9, "bytes", "x")
    assert cause_of_rule(gpu) == "gpu_oom"
    assert cause_of_rule(None, "stop") == "none"
    victim = SignalProcess(pid=77, start=1, name="chrome", signum=9, event="kill", reason="unmanaged victim")
    assert incident_for_action(victim, wall=1.0, monotonic=1.0).what["comm"] == "chrome"


# ---------------------------------------------------------------------------
# Kernel OOM kills recorded from the real kernel log


def _kill_in_cgroup(limit: int) -> tuple[int, str]:
    cg = make_cgroup(limit)
    memsw = cg.path / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # cgroup v1: no swapping past the limit when the machine has swap (v2: memory.swap.max 0)
        memsw.write_text(str(limit))
    try:
        proc = subprocess.Popen(cg.wrap(EAT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proc.wait(timeout=60) == -9
        root = "/sys/fs/cgroup/memory" if cg.version == 1 else "/sys/fs/cgroup"
        return proc.pid, "/" + os.path.relpath(cg.path, root)
    finally:
        cg.cleanup()


def _open_reader(store: IncidentStore) -> KmsgReader:
    if os.geteuid() != 0:
        pytest.skip("reading /dev/kmsg needs root here")
    try:
        return DeathWatch.open_reader(store)
    except KmsgUnavailable as e:
        pytest.skip(str(e))


async def _until_incident(watch: DeathWatch, store: IncidentStore, pid: int, timeout: float = 15.0) -> Incident:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await watch.drain()
        await watch.wait_idle()
        got = store.by_pid(pid)
        if got:
            return got[0]
        left = deadline - loop.time()
        assert left > 0, f"no incident for pid {pid}"
        ready = asyncio.Event()
        loop.add_reader(watch.reader.fileno(), ready.set)
        try:
            await asyncio.wait_for(ready.wait(), left)
        finally:
            loop.remove_reader(watch.reader.fileno())


def test_kernel_oom_kill_recorded_with_its_timeline(tmp_path: Path) -> None:
    """A process outside memguard's workers is OOM-killed in its own memory cgroup: the incident names its pid,
    command and cgroup, says the limit, carries the recorder's minutes before it and, later, the seconds after."""
    store = IncidentStore(tmp_path / "incidents")
    recorder = FlightRecorder(window_s=60)
    reader = _open_reader(store)
    watch = DeathWatch(store, reader=reader, recorder=recorder, after_s=0.3)
    for _ in range(5):
        recorder.record(Observation(at=time.monotonic(), scope=host_scope()))
    pid, cgroup = _kill_in_cgroup(64 << 20)
    recorder.record(Observation(at=time.monotonic(), scope=host_scope()))

    inc = asyncio.run(_until_incident(watch, store, pid))
    assert inc.cause == "host_oom" and inc.source == "kernel"
    assert inc.what["pid"] == pid and inc.what["comm"].startswith("python")
    assert inc.what["cgroup"] == cgroup and inc.owner.kind == "process"
    assert inc.how["oom"]["limit_bytes"] == 64 << 20 and "64MiB limit" in inc.why["text"]
    assert inc.timeline is not None and len(inc.timeline["scope"]["t"]) >= 1
    assert all(t <= 1.0 for t in inc.timeline["scope"]["t"])
    assert any(m.event == "kernel_oom_kill" and m.pid == pid for m in recorder.marks)
    # The seconds after were appended once they had passed.
    assert store.load(inc.id).after is not None
    # The cursor was saved: a restarted daemon resumes after this record.
    assert store.load_state(KMSG_STATE)["next_seq"] > inc.how["oom"]["kernel_seq"]
    reader.close()


def test_restarted_daemon_records_kills_from_while_it_was_down(tmp_path: Path) -> None:
    """The watch is stopped (cursor saved), a process is OOM-killed, a new watch resumes from the store's
    cursor and records that kill; reading the same records again changes nothing."""
    store = IncidentStore(tmp_path / "incidents")
    first = _open_reader(store)
    watch = DeathWatch(store, reader=first)
    asyncio.run(watch.drain())
    store.save_state(KMSG_STATE, first.cursor.to_dict())
    first.close()
    pid, cgroup = _kill_in_cgroup(48 << 20)

    again = DeathWatch(store, reader=_open_reader(store))
    inc = asyncio.run(_until_incident(again, store, pid))
    assert inc.what["cgroup"] == cgroup
    again.reader.close()
    # A second restart from an older cursor reads the kill again: merged, not doubled.
    store.save_state(KMSG_STATE, first.cursor.to_dict())
    third = DeathWatch(store, reader=_open_reader(store))
    asyncio.run(_until_incident(third, store, pid))
    third.reader.close()
    assert len(store.by_pid(pid)) == 1


def test_a_death_that_cannot_be_written_is_reported_not_raised(tmp_path: Path) -> None:
    """A store that cannot be written (its directory is a file): the kernel's kill is handed to ``on_error`` (the
    reporter says it once and goes on guarding); nothing raises out of the watch."""
    (tmp_path / "file").write_text("not a directory")
    errors: list[BaseException] = []
    watch = DeathWatch(IncidentStore(tmp_path / "file" / "incidents"), on_error=errors.append)
    [kill] = parse_oom_reports(["[ 10.0] Memory cgroup out of memory: Killed process 4242 (python) total-vm:1kB, "
                                "anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0"])

    async def main() -> None:
        watch._spawn(watch.record_kill(kill))
        await watch.wait_idle()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(errors) == 1 and isinstance(errors[0], OSError)
