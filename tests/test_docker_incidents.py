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
