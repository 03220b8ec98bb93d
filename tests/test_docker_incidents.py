"""Container deaths told apart and recorded, with a real (private) dockerd and the real kernel log.

Three deaths that all end in ``exit 137``:

- a container OOM-killed by the kernel at its ``--memory`` limit;
- a container stopped by ``docker kill`` (SIGKILL, not an OOM);
- a container that prints a CUDA out-of-memory line, then is killed for RAM
  (the verdict is a RAM OOM; the GPU line is context).

Each goes through :class:`memguard.report.deaths.DeathWatch` exactly as the
daemon would feed it: the kernel log from /dev/kmsg and the runtime's
events. Containers run from an image made here from busybox (no
registry), each with a memory limit (the tests' memory is always bounded).
Needs root, docker.io and busybox-static (tests/dockerkit.py skips without).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from pathlib import Path

import pytest

from memguard.report.deaths import DeathWatch
from memguard.report.incidents import IncidentStore
from memguard.sense.containers import ContainerEvent, DockerClient, attribute_cgroup
from memguard.sense.kmsg import KmsgReader, KmsgUnavailable

from dockerkit import IMAGE, Dockerd, start_dockerd

pytestmark = pytest.mark.root

# Doubling a string until the kernel stops it: a 32 MiB container is killed within a few doublings.
EAT = ["awk", 'BEGIN { s = "x"; while (1) s = s s }']
LIMIT = "32m"
LIMIT_BYTES = 32 * 1024 * 1024
CUDA_LINE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
             "of 79.15 GiB of which 1.20 GiB is free.")


@pytest.fixture(scope="module")
def dockerd():
    d = start_dockerd()
    try:
        yield d
    finally:
        d.stop()


def _reader() -> KmsgReader:
    try:
        return KmsgReader.open()
    except KmsgUnavailable as e:
        pytest.skip(f"the kernel log is not readable here: {e}")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _events_for(d: Dockerd, name: str, since: float) -> list[ContainerEvent]:
    """The container's events from ``since`` until now (the answer ends by itself)."""
    got = d.client.events(since=since, until=time.time() + 0.5, actions=("die", "oom", "kill"), container=name)
    assert isinstance(got, list), got
    return got


def _watch(tmp_path: Path, d: Dockerd) -> tuple[DeathWatch, IncidentStore]:
    store = IncidentStore(tmp_path / "incidents")
    return DeathWatch(store, reader=_reader(), docker=d.client), store


def test_container_oom_killed_at_its_limit(dockerd: Dockerd, tmp_path: Path) -> None:
    """A container that outgrows ``--memory 32m`` exits 137 with OOMKilled; the incident names the container,
    says ``host_oom`` at its 32MiB limit, and carries the kernel's report with ``oom_memcg=/docker/<id>``."""
    watch, store = _watch(tmp_path, dockerd)
    name = _name("oom")
    since = time.time() - 1
    res = dockerd.docker("run", "--name", name, "-m", LIMIT, "--memory-swap", LIMIT, IMAGE, *EAT, check=False)
    assert res.returncode == 137, res.stderr
    info = dockerd.client.inspect(name)
    assert info.oom_killed and info.exit_code == 137

    async def go():
        for ev in _events_for(dockerd, name, since):
            await watch.on_container_event(ev)
        await watch.wait_idle()
    asyncio.run(go())

    found = store.by_container(name)
    assert len(found) == 1, [i.summary for i in store.list()]
    inc = found[0]
    assert inc.cause == "host_oom", inc.summary
    assert inc.owner is not None and inc.owner.name == name and inc.owner.container_id == info.id
    assert inc.how["oom"]["limit_bytes"] == LIMIT_BYTES
    assert inc.how["exit_code"] == 137 and inc.how["oom_killed"] is True
    assert "32MiB limit" in inc.why["text"]
    assert any(f"oom_memcg=/docker/{info.id}" in line for line in inc.evidence), inc.evidence
    assert set(inc.sources) >= {"kernel", "container"}
    assert inc.what["container"]["image"] == IMAGE
    # Found by id prefix too, and attributed from the kernel's cgroup path alone.
    assert store.by_container(info.id[:12]) == found
    assert attribute_cgroup(inc.what["cgroup"]).container_id == info.id


def test_docker_kill_is_not_an_oom(dockerd: Dockerd, tmp_path: Path) -> None:
    """``docker kill`` also ends in exit 137, but the runtime sent SIGKILL and saw no OOM: cause ``killed``,
    the signal named, no kernel report. The events arrive through the live stream the daemon follows."""
    watch, store = _watch(tmp_path, dockerd)
    name = _name("killed")
    dockerd.docker("run", "-d", "--name", name, "-m", LIMIT, IMAGE, "sleep", "600")
    cid = dockerd.client.inspect(name).id
    stream = DockerClient(dockerd.sock, timeout_s=5.0)
    got: queue.Queue = queue.Queue()
    started = threading.Event()

    def follow() -> None:
        gen = stream.follow_events(actions=("die", "oom", "kill"), since=time.time() - 1)
        started.set()
        for ev in gen:
            got.put(ev)
            if not isinstance(ev, ContainerEvent) or (ev.action == "die" and ev.id == cid):
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert started.wait(10)
    dockerd.docker("kill", name)
    assert dockerd.docker("wait", name).stdout.decode().strip() == "137"
    events = []
    deadline = time.monotonic() + 30
    while not (events and events[-1].action == "die"):
        ev = got.get(timeout=max(0.1, deadline - time.monotonic()))
        assert isinstance(ev, ContainerEvent), ev
        if ev.id == cid:
            events.append(ev)

    async def go():
        for ev in events:
            await watch.on_container_event(ev)
        await watch.wait_idle()
    asyncio.run(go())

    (inc,) = store.by_container(name)
    assert inc.cause == "killed", inc.summary
    assert inc.how["signal_name"] == "SIGKILL" and inc.how["exit_code"] == 137
    assert inc.how["oom_killed"] is False
    assert "docker kill" in inc.how["sent_by"]
    assert "not an OOM" in inc.summary
    assert "kernel" not in inc.sources


def test_cuda_line_then_ram_kill_is_a_ram_oom(dockerd: Dockerd, tmp_path: Path) -> None:
    """A container that prints a CUDA out-of-memory line and is then killed at its RAM limit is a RAM OOM
    (``host_oom``): the GPU line is quoted as context, not taken for the cause."""
    watch, store = _watch(tmp_path, dockerd)
    name = _name("cuda-then-ram")
    since = time.time() - 1
    script = f'echo "{CUDA_LINE}"; exec awk \'BEGIN {{ s = "x"; while (1) s = s s }}\''
    res = dockerd.docker("run", "--name", name, "-m", LIMIT, "--memory-swap", LIMIT, IMAGE, "sh", "-c", script,
                         check=False)
    assert res.returncode == 137
    assert "CUDA out of memory" in res.stdout.decode()

    async def go():
        for ev in _events_for(dockerd, name, since):
            await watch.on_container_event(ev)
        await watch.wait_idle()
    asyncio.run(go())

    (inc,) = store.by_container(name)
    assert inc.cause == "host_oom", inc.summary
    assert inc.how["output_cause"] == "gpu_oom"
    assert "CUDA out of memory" in inc.how["output_line"]
    assert "context, not the cause" in inc.why["text"]


def test_following_the_runtime_and_catching_up_after_a_restart(dockerd: Dockerd, tmp_path: Path) -> None:
    """The daemon's way: the runtime's events followed in a thread. A failing container (exit 3) is ``exit``; a
    ``--rm`` container killed at its limit is still named (from its events) though it is gone. A container that
    dies while nobody follows is recorded when following resumes from the saved position."""
    store = IncidentStore(tmp_path / "incidents")
    failed, removed, later = _name("fails"), _name("rm-oom"), _name("while-down")

    async def follow_until(names: set[str]) -> None:
        seen: set[str] = set()
        done = asyncio.Event()

        def on_incident(inc, path) -> None:
            o = inc.owner
            if o is not None and o.name in names and "container" in inc.sources:
                seen.add(o.name)
                if seen == names:
                    done.set()

        watch = DeathWatch(store, reader=_reader(), docker=dockerd.client, on_incident=on_incident)
        watch.start()
        thread = watch.follow_containers()
        assert thread is not None
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            watch.stop_containers()
            watch.stop()
            await watch.wait_idle()
            watch.reader.close()

    async def first() -> None:
        task = asyncio.ensure_future(follow_until({failed, removed}))
        await asyncio.sleep(0)  # let the follower start before the containers run
        await asyncio.to_thread(dockerd.docker, "run", "--name", failed, "-m", LIMIT, IMAGE, "sh", "-c",
                                "echo 'ValueError: bad config'; exit 3", check=False)
        await asyncio.to_thread(dockerd.docker, "run", "--rm", "--name", removed, "-m", LIMIT, "--memory-swap",
                                LIMIT, IMAGE, *EAT, check=False)
        await task
    asyncio.run(first())

    (f,) = store.by_container(failed)
    assert f.cause == "exit" and f.how["exit_code"] == 3
    (r,) = store.by_container(removed)
    assert r.cause == "host_oom" and r.what["container"]["name"] == removed

    # memguard is down: a container dies; following again resumes from the saved position and records it.
    res = dockerd.docker("run", "--name", later, "-m", LIMIT, IMAGE, "sh", "-c", "exit 5", check=False)
    assert res.returncode == 5
    asyncio.run(follow_until({later}))
    (l,) = store.by_container(later)
    assert l.cause == "exit" and l.how["exit_code"] == 5
    assert len(store.by_container(failed)) == 1  # the past before the saved position was not replayed
    assert len(store.by_container(removed)) == 1


def test_kernel_record_and_death_merge_across_a_restart(dockerd: Dockerd, tmp_path: Path) -> None:
    """The kernel's report of a container's OOM kill is recorded, memguard restarts, then the runtime's death
    event is handled: still one record, with both views (the kill from the record, the name and exit from the
    runtime)."""
    store = IncidentStore(tmp_path / "incidents")
    name = _name("restart-between")
    since = time.time() - 1
    first = DeathWatch(store, reader=_reader(), docker=dockerd.client)
    res = dockerd.docker("run", "--name", name, "-m", LIMIT, "--memory-swap", LIMIT, IMAGE, *EAT, check=False)
    assert res.returncode == 137

    async def kernel_only():
        await first.drain()
        await first.wait_idle()
    asyncio.run(kernel_only())
    first.reader.close()
    assert [i.sources for i in store.by_container(name)] == [["kernel"]]

    second = DeathWatch(store, docker=dockerd.client)  # a new daemon: nothing in memory

    async def events_only():
        for ev in _events_for(dockerd, name, since):
            await second.on_container_event(ev)
        await second.wait_idle()
    asyncio.run(events_only())
    (inc,) = store.by_container(name)
    assert inc.cause == "host_oom" and set(inc.sources) == {"kernel", "container"}
    assert inc.how["exit_code"] == 137 and inc.how["oom"]["limit_bytes"] == LIMIT_BYTES
