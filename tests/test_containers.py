"""Who a cgroup belongs to, and the runtime API client's behaviour when the runtime misbehaves.

Attribution is pure (a table of real cgroup layouts: Docker's two drivers, Podman, containerd and CRI-O
under Kubernetes, systemd units and sessions, memguard's own workers). The client is checked against a
real HTTP server on a unix socket that answers like dockerd, and like a dockerd that is gone, slow or
broken: every call returns a value or an Unknown saying why, never an exception. The real dockerd is in
tests/test_docker_incidents.py.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socketserver
import threading
from pathlib import Path

import pytest

from memguard.model import Unknown
from memguard.sense.containers import (
    ContainerEvent,
    ContainerInfo,
    ContainerNamer,
    DockerClient,
    Owner,
    attribute_cgroup,
    cgroup_of_pid,
    kube_pod_name,
)

H = "3f2a9c1b7d0e" + "a" * 52
POD = "10d16a28-60ff-475f-a631-510d9792219f"

TABLE = [
    # path, kind, runtime, container id, pod uid, unit, worker, uid
    (f"/docker/{H}", "container", "docker", H, None, None, None, None),
    (f"/system.slice/docker-{H}.scope", "container", "docker", H, None, f"docker-{H}.scope", None, None),
    (f"/machine.slice/libpod-{H}.scope", "container", "podman", H, None, f"libpod-{H}.scope", None, None),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{H}.scope/container", "container", "podman",
     H, None, f"libpod-{H}.scope", None, 1000),
    (f"/libpod_parent/libpod-{H}", "container", "podman", H, None, None, None, None),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{H}.scope", "container", "containerd", H, POD, f"cri-containerd-{H}.scope", None, None),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{H}.scope",
     "container", "cri-o", H, POD, f"crio-{H}.scope", None, None),
    (f"/kubepods/burstable/pod{POD}/{H}", "container", "kubernetes", H, POD, None, None, None),
    (f"/kubepods/pod{POD}/{H}", "container", "kubernetes", H, POD, None, None, None),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice", "pod",
     "kubernetes", None, POD, None, None, None),
    ("/system.slice/ssh.service", "systemd-unit", None, None, None, "ssh.service", None, None),
    ("/user.slice/user-1000.slice/session-3.scope", "systemd-unit", None, None, None, "session-3.scope", None, 1000),
    ("/system.slice/run-r0123abcd.scope", "systemd-unit", None, None, None, "run-r0123abcd.scope", None, None),
    ("/user.slice", "slice", None, None, None, None, None, None),
    ("/", "process", None, None, None, None, None, None),
    ("/process_api/abc/memguard-test-1/memguard-workers/trials-0.3", "memguard-worker", None, None, None, None,
     "trials-0", None),
    ("/system.slice/memguard.service/trials-1.12", "memguard-worker", None, None, None, None, "trials-1", None),
    ("/system.slice/memguard.service/supervisor", "systemd-unit", None, None, None, "memguard.service", None, None),
    ("/system.slice/memguard.service/etl.4@d1a2", "memguard-worker", None, None, None, None, "etl", None),
    # The daemon's own directory (memguard.<pid>.<start time>) below its unit, and below any cgroup (v1).
    ("/system.slice/memguard.service/memguard.812.99031/trials-0.2", "memguard-worker", None, None, None, None,
     "trials-0", None),
    ("/user.slice/memguard-test-1/memguard.4242.1234567/hog-0.1", "memguard-worker", None, None, None, None,
     "hog-0", None),
]


@pytest.mark.parametrize("path,kind,runtime,cid,pod,unit,worker,uid", TABLE, ids=[t[0][-48:] for t in TABLE])
def test_attribution(path, kind, runtime, cid, pod, unit, worker, uid) -> None:
    """Each real cgroup layout is attributed to its owner, with the ids the path holds."""
    o = attribute_cgroup(path)
    assert (o.kind, o.runtime, o.container_id, o.pod_uid, o.unit, o.worker, o.uid) == \
        (kind, runtime, cid, pod, unit, worker, uid)
    assert o.describe()  # one sentence for any owner
    assert Owner.from_dict(json.loads(json.dumps(o.to_dict()))) == o


def test_worker_roots_from_the_daemon() -> None:
    """The daemon's own worker cgroup parent, passed in, names workers anywhere in the tree; a worker's nested
    cgroups are still the worker's; incarnation and tag are kept."""
    o = attribute_cgroup("/srv/jobs/etl-2.7/sub", worker_roots=["/srv/jobs"])
    assert (o.kind, o.worker, o.incarnation) == ("memguard-worker", "etl-2", 7)
    assert attribute_cgroup("/srv/jobs/etl-2.7").kind == "process"  # not without the root
    o = attribute_cgroup("/x/memguard-workers/hog-0.1@run42")
    assert (o.worker, o.incarnation, o.detail) == ("hog-0", 1, "run42")


def test_cgroup_of_this_process() -> None:
    """A live process's memory cgroup from /proc/<pid>/cgroup (v1 memory line, else v2); a gone pid is Unknown."""
    got = cgroup_of_pid(os.getpid())
    assert isinstance(got, str) and got.startswith("/")
    assert isinstance(cgroup_of_pid(2**22 + 12345), Unknown)


def test_pod_name_from_the_kubelet_log_directory(tmp_path: Path) -> None:
    """A pod's namespace and name come from /var/log/pods/<ns>_<name>_<uid> when the kubelet runs here."""
    (tmp_path / f"default_web-7d9f_{POD}").mkdir()
    assert kube_pod_name(POD, str(tmp_path)) == ("default", "web-7d9f")
    assert kube_pod_name("0" * 36, str(tmp_path)) is None
    assert kube_pod_name(POD, str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------
# The client, against a real HTTP server on a unix socket


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(sock: str, handler_cls) -> _UnixServer:
    srv = _UnixServer(sock, handler_cls)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


INSPECT = {
    "Id": H, "Name": "/web-1", "Path": "python", "Args": ["train.py", "--bs", "64"],
    "State": {"Status": "exited", "Running": False, "OOMKilled": True, "ExitCode": 137, "Pid": 0,
              "Error": "", "StartedAt": "2026-01-01T00:00:00Z", "FinishedAt": "2026-01-01T00:01:00Z"},
    "Config": {"Image": "trainer:3", "Tty": False, "Labels": {"io.kubernetes.pod.name": "web",
                                                             "io.kubernetes.pod.namespace": "prod"}},
    "HostConfig": {"Memory": 16 << 30, "MemorySwap": 16 << 30},
    "RestartCount": 2,
}


class FakeDockerd(http.server.BaseHTTPRequestHandler):
    """Answers like dockerd for one container; anything else 404 (a real server, fixed answers)."""

    calls: list[str] = []

    def log_message(self, *a) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        FakeDockerd.calls.append(self.path)
        if self.path == "/_ping":
            return self._send(200, b"OK", "text/plain")
        if self.path in (f"/containers/{H}/json", "/containers/web-1/json"):
            return self._send(200, json.dumps(INSPECT).encode())
        if self.path.startswith("/containers/web-1/logs"):
            frames = b""
            for stream, text in ((1, b"epoch 3\n"), (2, b"torch.OutOfMemoryError: CUDA out of memory.\n")):
                frames += bytes([stream, 0, 0, 0]) + len(text).to_bytes(4, "big") + text
            return self._send(200, frames, "application/vnd.docker.raw-stream")
        if self.path.startswith("/events"):
            evs = [{"Type": "container", "Action": "kill", "Actor": {"ID": H, "Attributes": {"name": "web-1",
                                                                                            "signal": "9"}},
                    "timeNano": 1},
                   {"Type": "container", "Action": "die", "Actor": {"ID": H, "Attributes": {
                       "name": "web-1", "exitCode": "137", "image": "trainer:3"}}, "timeNano": 2}]
            return self._send(200, b"\n".join(json.dumps(e).encode() for e in evs) + b"\n")
        if self.path.startswith("/containers/broken"):
            return self._send(500, b'{"message": "something broke"}')
        return self._send(404, b'{"message": "No such container"}')


def test_client_reads_inspect_logs_and_events(tmp_path: Path) -> None:
    """inspect (name without the slash, image, command, OOMKilled, exit code, memory limit, pod labels), the
    log stream demultiplexed from its 8-byte frames, and events with exit code and signal."""
    sock = str(tmp_path / "d.sock")
    srv = _serve(sock, FakeDockerd)
    try:
        c = DockerClient(sock)
        assert c.ping() is True
        info = c.inspect("web-1")
        assert isinstance(info, ContainerInfo)
        assert (info.name, info.image, info.command, info.oom_killed, info.exit_code) == \
            ("web-1", "trainer:3", ("python", "train.py", "--bs", "64"), True, 137)
        assert info.memory_limit_bytes == 16 << 30 and info.pid is None
        assert (info.pod_namespace, info.pod_name) == ("prod", "web")
        assert c.logs("web-1", tail=5) == ["epoch 3", "torch.OutOfMemoryError: CUDA out of memory."]
        evs = c.events(since=0, until=1)
        assert [(e.action, e.exit_code, e.signal, e.name) for e in evs] == \
            [("kill", None, 9, "web-1"), ("die", 137, None, "web-1")]
        got = c.inspect("nope")
        assert isinstance(got, Unknown) and "no such container" in got.reason
        got = c.inspect("broken")
        assert isinstance(got, Unknown) and "HTTP 500" in got.reason and "something broke" in got.reason
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_without_a_runtime(tmp_path: Path) -> None:
    """No socket, a socket nobody serves, a server that never answers: Unknown with the reason, within the timeout."""
    missing = DockerClient(str(tmp_path / "none.sock"))
    got = missing.inspect(H)
    assert isinstance(got, Unknown) and "no container runtime socket" in got.reason
    import socket as _socket

    dead = str(tmp_path / "dead.sock")
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.bind(dead)
    s.close()  # the file stays, nobody listens
    got = DockerClient(dead).ping()
    assert isinstance(got, Unknown)

    hung = str(tmp_path / "hung.sock")
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(hung)
    listener.listen(1)  # accepts into the backlog, never answers
    try:
        got = DockerClient(hung, timeout_s=0.3).inspect(H)
        assert isinstance(got, Unknown) and "did not answer" in got.reason
    finally:
        listener.close()


def test_namer_fills_names_off_the_loop_and_caches(tmp_path: Path) -> None:
    """ContainerNamer names a container owner from the runtime in a thread, once per id within its cache time;
    owners the runtime cannot name keep their id."""
    sock = str(tmp_path / "d.sock")
    srv = _serve(sock, FakeDockerd)
    FakeDockerd.calls.clear()
    try:
        namer = ContainerNamer(DockerClient(sock))
        owner = attribute_cgroup(f"/docker/{H}")

        async def go():
            a = await namer.resolve(owner)
            b = await namer.resolve(owner)
            return a, b
        a, b = asyncio.run(go())
        assert a.name == "web-1" and a.image == "trainer:3" and a.pod_name == "web" and b == a
        assert FakeDockerd.calls.count(f"/containers/{H}/json") == 1
        other = attribute_cgroup("/docker/" + "b" * 64)
        assert asyncio.run(namer.resolve(other)).name is None
        unit = attribute_cgroup("/system.slice/ssh.service")
        assert asyncio.run(namer.resolve(unit)) is unit
    finally:
        srv.shutdown()
        srv.server_close()


def test_event_from_api_tolerates_odd_input() -> None:
    """Events without an actor or an action are dropped; signals given by name are numbers."""
    assert ContainerEvent.from_api({}) is None
    ev = ContainerEvent.from_api({"status": "kill", "id": H, "time": 5, "Actor": {"Attributes": {"signal": "TERM"}}})
    assert ev is not None and ev.signal == 15 and ev.time_ns == 5_000_000_000
