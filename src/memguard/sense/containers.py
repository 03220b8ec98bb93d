"""Who a cgroup belongs to: a memguard worker, a container, a pod, a systemd unit, or nobody in particular.

Attribution from the path alone
-------------------------------
:func:`attribute_cgroup` is pure: it reads a cgroup path as the kernel
prints it (``oom_memcg=``/``task_memcg=`` of an OOM report, or
``/proc/<pid>/cgroup``) and says what owns it. It knows:

- memguard's own workers: a ``<worker>.<incarnation>`` cgroup (optionally
  ``<worker>.<incarnation>@<tag>``) directly below a ``memguard-workers``
  cgroup (cgroup v1) or below a ``memguard*.service`` cgroup (cgroup v2,
  where memguard itself sits in the ``supervisor`` leaf), or below a
  daemon's own ``memguard.<pid>.<start time>`` directory (under either),
  or below any ``worker_roots`` the daemon passes in;
- Docker: ``/docker/<id>`` (cgroupfs driver), ``docker-<id>.scope``
  (systemd driver);
- Podman: ``libpod-<id>.scope``, ``/libpod_parent/libpod-<id>``, and its
  monitor ``libpod-conmon-<id>.scope``;
- containerd / CRI-O under Kubernetes: ``cri-containerd-<id>.scope``,
  ``crio-<id>.scope``, ``/kubepods/<qos>/pod<uid>/<id>``, with the pod
  from ``kubepods-<qos>-pod<uid>.slice`` or ``pod<uid>``; a cgroup at the
  pod level (a pod-wide limit) is the pod;
- LXC: ``/lxc/<name>``, ``lxc.payload.<name>`` (an outer container when
  nothing inside it is recognised);
- systemd units: the deepest ``*.service`` or ``*.scope`` (``session-3.scope``
  of a login, ``user@1000.service``, ``run-r<id>.scope`` of systemd-run),
  with the user from ``user-<uid>.slice``; a process directly in a slice
  is the slice's;
- anything else: a plain process (``/`` is the root cgroup).

Naming through the runtime
--------------------------
:class:`DockerClient` speaks the Docker Engine API over its unix socket
with the standard library (``http.client`` on ``AF_UNIX``): inspect a
container (name, image, command, ``State.OOMKilled``, ``State.ExitCode``,
its memory limit), read the last lines of its log, and list its events
(``die`` with the exit code, ``oom``, ``kill`` with the signal). Podman's
Docker-compatible socket answers the same calls. Every call has a short
timeout and returns :class:`~memguard.model.Unknown` with the reason
when the daemon is absent, slow or answers an error: it never raises.
The calls block: from asyncio, run them in a thread
(``await asyncio.to_thread(client.inspect, cid)``) or use
:class:`ContainerNamer`, which does, with a cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

from memguard.model import Unknown

__all__ = [
    "Owner",
    "ContainerInfo",
    "ContainerEvent",
    "DockerClient",
    "ContainerNamer",
    "attribute_cgroup",
    "cgroup_of_pid",
    "cmdline_of_pid",
    "kube_pod_name",
    "default_docker_socket",
    "DOCKER_SOCKET",
    "PODMAN_SOCKET",
]

DOCKER_SOCKET = "/var/run/docker.sock"
PODMAN_SOCKET = "/run/podman/podman.sock"

API_TIMEOUT_S = 2.0
"""Longest wait for one runtime API call, in seconds. A healthy dockerd answers
inspect in milliseconds; a daemon that takes longer is wedged, and an incident
record is better written without the container's name than late."""

NAME_CACHE_S = 300.0
"""How long a container's name and image are reused without asking again, in
seconds. They never change while the container exists; the cache only bounds
memory and the staleness of a recreated container with the same id (none)."""

_HEX64 = r"[0-9a-f]{64}"
_ID_RX = re.compile(rf"^{_HEX64}$")
_SCOPED = re.compile(rf"^(docker|libpod|libpod-conmon|cri-containerd|crio|crio-conmon|nerdctl|containerd)-({_HEX64})"
                     rf"(?:\.scope)?$")
_RUNTIMES = {
    "docker": "docker",
    "libpod": "podman",
    "libpod-conmon": "podman",
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "nerdctl": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
}
_POD_SLICE = re.compile(r"^kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_]{36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
_QOS_SLICE = re.compile(r"^kubepods(?:-(burstable|besteffort))?\.slice$")
_WORKER = re.compile(r"^(?P<worker>.+)\.(?P<inc>\d+)(?:@(?P<tag>[^/]+))?$")
_MEMGUARD_SERVICE = re.compile(r"^memguard[\w@.-]*\.service$")
_MEMGUARD_INSTANCE = re.compile(r"^memguard\.\d+\.\d+$")  # one daemon's directory: memguard.<pid>.<start time>
_USER_SLICE = re.compile(r"^user-(\d+)\.slice$")
_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")
_LXC = re.compile(r"^lxc\.payload\.(.+)$")


@dataclass(frozen=True)
class Owner:
    """What a cgroup belongs to.

    ``kind``: ``memguard-worker``, ``container``, ``pod``, ``systemd-unit``,
    ``slice`` or ``process`` (nothing more specific is known). A container
    has ``runtime`` (docker, podman, containerd, cri-o, lxc or ``container``
    when only the id says so) and ``container_id``; under Kubernetes also
    ``pod_uid`` and ``qos``. ``unit`` is the systemd unit (also set for a
    container's scope) and ``uid`` the user of a ``user-<uid>.slice``.
    ``name``/``image``/``pod_name`` are filled by the runtime
    (:meth:`ContainerNamer.resolve`), not by the path.
    """

    kind: str
    cgroup: str
    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    qos: str | None = None
    unit: str | None = None
    slice: str | None = None
    uid: int | None = None
    worker: str | None = None
    incarnation: int | None = None
    name: str | None = None
    image: str | None = None
    pod_name: str | None = None
    pod_namespace: str | None = None
    detail: str | None = None

    @property
    def short_id(self) -> str | None:
        return self.container_id[:12] if self.container_id else None

    def describe(self) -> str:
        """``docker container web-1 (3f2a9c1b7d0e, image nginx:1.27)``, ``memguard worker trials-0``, ``systemd unit ssh.service``."""
        if self.kind == "memguard-worker":
            return f"memguard worker {self.worker}"
        if self.kind == "container":
            rt = self.runtime if self.runtime and self.runtime != "container" else ""
            head = f"{rt} container".strip()
            label = self.name or self.short_id or "?"
            extra = [self.short_id] if self.name and self.short_id else []
            if self.image:
                extra.append(f"image {self.image}")
            if self.pod_name or self.pod_uid:
                pod = f"{self.pod_namespace}/{self.pod_name}" if self.pod_name and self.pod_namespace else \
                    (self.pod_name or self.pod_uid)
                extra.append(f"pod {pod}")
            if self.detail:
                extra.append(self.detail)
            return f"{head} {label}" + (f" ({', '.join(extra)})" if extra else "")
        if self.kind == "pod":
            pod = f"{self.pod_namespace}/{self.pod_name}" if self.pod_name and self.pod_namespace else \
                (self.pod_name or self.pod_uid)
            return f"Kubernetes pod {pod}" + (f" ({self.qos})" if self.qos else "")
        if self.kind == "systemd-unit":
            who = f" of user {self.uid}" if self.uid is not None else ""
            return f"systemd unit {self.unit}{who}"
        if self.kind == "slice":
            return f"systemd slice {self.slice}"
        if self.cgroup in ("", "/"):
            return "a process in the root cgroup"
        return f"a process in the cgroup {self.cgroup}"

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "Owner":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}  # type: ignore[attr-defined]
        known.setdefault("kind", "process")
        known.setdefault("cgroup", "")
        return cls(**known)  # type: ignore[arg-type]


def _parts(path: str) -> list[str]:
    return [p for p in path.strip().split("/") if p]


def _worker_from(parts: Sequence[str], root_len: int, path: str) -> Owner | None:
    if len(parts) <= root_len:
        return None
    m = _WORKER.match(parts[root_len])
    if m is None or parts[root_len] == "supervisor":
        return None
    return Owner(kind="memguard-worker", cgroup=path, worker=m.group("worker"), incarnation=int(m.group("inc")),
                 detail=m.group("tag"))


def attribute_cgroup(path: str, *, worker_roots: Sequence[str] = ()) -> Owner:
    """What owns the cgroup at ``path`` (as the kernel prints it: from the hierarchy's root).

    ``worker_roots``: cgroups whose children are memguard workers named
    ``<worker>.<incarnation>`` (the daemon knows its own); without them,
    ``memguard-workers`` (v1) and ``memguard*.service`` (v2) parents are
    recognised.
    """
    path = path.strip() or "/"
    parts = _parts(path)
    # memguard's workers: explicit roots first, then the names memguard gives its cgroups.
    for root in worker_roots:
        rp = _parts(root)
        if rp and parts[:len(rp)] == rp:
            got = _worker_from(parts, len(rp), path)
            if got is not None:
                return got
    for i, p in enumerate(parts):
        if p == "memguard-workers" or _MEMGUARD_SERVICE.match(p) or _MEMGUARD_INSTANCE.match(p):
            if i + 1 < len(parts) and _MEMGUARD_INSTANCE.match(parts[i + 1]):
                continue  # the daemon's own directory below its unit: the workers are one level down
            got = _worker_from(parts, i + 1, path)
            if got is not None:
                return got

    pod_uid = qos = None
    unit = slice_ = None
    uid: int | None = None
    container: tuple[str, str, str | None] | None = None  # runtime, id, detail
    lxc: str | None = None
    prev = ""
    for i, p in enumerate(parts):
        m = _SCOPED.match(p)
        if m is not None:
            kind = m.group(1)
            detail = "its conmon monitor" if kind.endswith("conmon") else None
            container = (_RUNTIMES[kind], m.group(2), detail)
            unit = p if p.endswith(".scope") else unit
        elif _ID_RX.match(p):
            runtime = {"docker": "docker", "libpod_parent": "podman", "lxc": "lxc"}.get(prev, "container")
            container = (runtime, p, None)
        elif (m := _POD_SLICE.match(p)) is not None:
            qos = m.group(1) or "guaranteed"
            pod_uid = m.group(2).replace("_", "-")
        elif (m := _POD_DIR.match(p)) is not None and any(x.startswith("kubepods") for x in parts[:i]):
            pod_uid = m.group(1)
            qos = qos or (prev if prev in ("burstable", "besteffort") else "guaranteed")
        elif (m := _QOS_SLICE.match(p)) is not None:
            qos = m.group(1) or qos
            slice_ = p
        elif p in ("burstable", "besteffort") and prev == "kubepods":
            qos = p
        elif prev == "lxc" and i == 1:
            lxc = p
        elif (m := _LXC.match(p)) is not None:
            lxc = m.group(1)
        elif p.endswith(".service") or p.endswith(".scope"):
            unit = p
            m = _USER_MANAGER.match(p)
            if m is not None:
                uid = int(m.group(1))
        elif p.endswith(".slice"):
            slice_ = p
            m = _USER_SLICE.match(p)
            if m is not None:
                uid = int(m.group(1))
        prev = p

    if container is not None:
        runtime, cid, detail = container
        if pod_uid is not None and runtime == "container":
            runtime = "kubernetes"
        return Owner(kind="container", cgroup=path, runtime=runtime, container_id=cid, pod_uid=pod_uid, qos=qos,
                     unit=unit, uid=uid, detail=detail)
    if pod_uid is not None:
        return Owner(kind="pod", cgroup=path, runtime="kubernetes", pod_uid=pod_uid, qos=qos, slice=slice_)
    if lxc is not None:
        return Owner(kind="container", cgroup=path, runtime="lxc", name=lxc)
    if unit is not None:
        return Owner(kind="systemd-unit", cgroup=path, unit=unit, slice=slice_, uid=uid)
    if slice_ is not None:
        return Owner(kind="slice", cgroup=path, slice=slice_, uid=uid)
    return Owner(kind="process", cgroup=path)


def cgroup_of_pid(pid: int, proc: str = "/proc") -> str | Unknown:
    """The memory cgroup of a live process: the v1 ``memory`` line of /proc/<pid>/cgroup, else the v2 line."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return Unknown(f"/proc/{pid}/cgroup unreadable: {e.strerror or e}")
    v2 = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            return path
        if controllers == "" and line.startswith("0::"):
            v2 = path
    return v2 if v2 is not None else Unknown(f"/proc/{pid}/cgroup names no memory cgroup")


def cmdline_of_pid(pid: int, proc: str = "/proc") -> list[str] | Unknown:
    """A live process's command line (``/proc/<pid>/cmdline``), or Unknown saying why not (gone, a kernel thread)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read(65536)
    except OSError as e:
        return Unknown(f"/proc/{pid}/cmdline unreadable: {e.strerror or e}")
    args = [a.decode(errors="replace") for a in raw.split(b"\0")]
    if args and args[-1] == "":
        args.pop()
    return args if args else Unknown(f"process {pid} has no command line (a kernel thread, or a zombie)")


def kube_pod_name(pod_uid: str, log_root: str = "/var/log/pods") -> tuple[str, str] | None:
    """(namespace, name) of a pod on this node, from the kubelet's log directory ``<ns>_<name>_<uid>``."""
    try:
        entries = os.listdir(log_root)
    except OSError:
        return None
    suffix = "_" + pod_uid
    for entry in entries:
        if entry.endswith(suffix):
            ns, _, name = entry[:-len(suffix)].partition("_")
            if ns and name:
                return ns, name
    return None


# ---------------------------------------------------------------------------
# The Docker Engine API


@dataclass(frozen=True)
class ContainerInfo:
    """What ``GET /containers/<id>/json`` says about a container (the fields incidents use)."""

    id: str
    name: str
    image: str = ""
    command: tuple[str, ...] = ()
    status: str = ""
    running: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    pid: int | None = None
    error: str = ""
    started_at: str = ""
    finished_at: str = ""
    memory_limit_bytes: int | None = None
    memory_swap_limit_bytes: int | None = None
    tty: bool = False
    restart_count: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(cls, data: Mapping[str, object]) -> "ContainerInfo":
        state = data.get("State") or {}
        config = data.get("Config") or {}
        host = data.get("HostConfig") or {}
        assert isinstance(state, dict) and isinstance(config, dict) and isinstance(host, dict)
        mem = host.get("Memory") or 0
        swap = host.get("MemorySwap") or 0
        path = data.get("Path") or ""
        args = data.get("Args") or []
        command = tuple([str(path)] + [str(a) for a in args]) if path else ()
        exit_code = state.get("ExitCode")
        return cls(
            id=str(data.get("Id", "")),
            name=str(data.get("Name", "")).lstrip("/"),
            image=str(config.get("Image", "")),
            command=command,
            status=str(state.get("Status", "")),
            running=bool(state.get("Running", False)),
            exit_code=exit_code if isinstance(exit_code, int) else None,
            oom_killed=bool(state.get("OOMKilled", False)),
            pid=(state.get("Pid") or None) if isinstance(state.get("Pid"), int) else None,
            error=str(state.get("Error", "") or ""),
            started_at=str(state.get("StartedAt", "") or ""),
            finished_at=str(state.get("FinishedAt", "") or ""),
            memory_limit_bytes=int(mem) if isinstance(mem, int) and mem > 0 else None,
            memory_swap_limit_bytes=int(swap) if isinstance(swap, int) and swap > 0 else None,
            tty=bool(config.get("Tty", False)),
            restart_count=int(data.get("RestartCount", 0) or 0),
            labels=dict(config.get("Labels") or {}),
        )

    @property
    def pod_name(self) -> str | None:
        return self.labels.get("io.kubernetes.pod.name")

    @property
    def pod_namespace(self) -> str | None:
        return self.labels.get("io.kubernetes.pod.namespace")

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["command"] = list(self.command)
        d["labels"] = dict(self.labels)
        return d


@dataclass(frozen=True)
class ContainerEvent:
    """One container event of the runtime: ``die`` (with ``exit_code``), ``oom``, ``kill`` (with ``signal``), ..."""

    action: str
    id: str
    time_ns: int
    name: str = ""
    image: str = ""
    exit_code: int | None = None
    signal: int | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(cls, data: Mapping[str, object]) -> "ContainerEvent | None":
        actor = data.get("Actor") or {}
        attrs = actor.get("Attributes") if isinstance(actor, dict) else None
        attrs = {str(k): str(v) for k, v in (attrs or {}).items()}
        action = str(data.get("Action") or data.get("status") or "")
        cid = str((actor.get("ID") if isinstance(actor, dict) else None) or data.get("id") or "")
        if not action or not cid:
            return None
        time_ns = data.get("timeNano")
        if not isinstance(time_ns, int):
            t = data.get("time")
            time_ns = int(t) * 1_000_000_000 if isinstance(t, int) else 0
        sig = attrs.get("signal")
        code = attrs.get("exitCode")
        return cls(action=action.split(":")[0], id=cid, time_ns=time_ns, name=attrs.get("name", ""),
                   image=attrs.get("image", ""), exit_code=int(code) if code and code.lstrip("-").isdigit() else None,
                   signal=_signal_number(sig), attributes=attrs)


def _signal_number(text: str | None) -> int | None:
    if not text:
        return None
    if text.isdigit():
        return int(text)
    import signal as _signal

    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(_signal.Signals[name])
    except KeyError:
        return None


_CONNECTION: type | None = None


def _unix_connection(path: str, timeout: float | None) -> Any:
    """An ``http.client`` connection over the unix socket ``path`` (http.client, and the email package it
    brings, are imported the first time a runtime is asked: a daemon on a box without one never loads them)."""
    global _CONNECTION
    if _CONNECTION is None:
        import http.client

        class _UnixHTTPConnection(http.client.HTTPConnection):
            def __init__(self, path: str, timeout: float | None) -> None:
                super().__init__("localhost", timeout=timeout)
                self._unix_path = path

            def connect(self) -> None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self._unix_path)
                except BaseException:
                    sock.close()
                    raise
                self.sock = sock

        _CONNECTION = _UnixHTTPConnection
    return _CONNECTION(path, timeout)


def default_docker_socket() -> str:
    """``$DOCKER_HOST`` when it is a ``unix://`` address, else the Docker socket, else Podman's if it exists."""
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://"):]
    if not os.path.exists(DOCKER_SOCKET) and os.path.exists(PODMAN_SOCKET):
        return PODMAN_SOCKET
    return DOCKER_SOCKET


def _demux(raw: bytes) -> list[str]:
    """Log bytes of a container without a TTY: 8-byte frame headers (stream, 0, 0, 0, size BE32)."""
    out = bytearray()
    i = 0
    while i + 8 <= len(raw) and raw[i] in (0, 1, 2) and raw[i + 1:i + 4] == b"\0\0\0":
        size = int.from_bytes(raw[i + 4:i + 8], "big")
        out += raw[i + 8:i + 8 + size]
        i += 8 + size
    if i == 0:
        out = bytearray(raw)  # a TTY container: raw bytes
    return bytes(out).decode("utf-8", "replace").splitlines()


class DockerClient:
    """The Docker Engine API (or Podman's compatible one) over a unix socket. Blocking calls with a timeout.

    Every method returns a value or an :class:`~memguard.model.Unknown`
    saying why not (no socket, permission denied, timeout, no such
    container); none raises.
    """

    def __init__(self, socket_path: str | None = None, *, timeout_s: float = API_TIMEOUT_S) -> None:
        self.socket_path = socket_path or default_docker_socket()
        self.timeout_s = timeout_s

    def _request(self, path: str, *, timeout_s: float | None = None) -> tuple[int, bytes] | Unknown:
        if not os.path.exists(self.socket_path):
            return Unknown(f"no container runtime socket at {self.socket_path}")
        conn = _unix_connection(self.socket_path, self.timeout_s if timeout_s is None else timeout_s)
        from http.client import HTTPException

        try:
            conn.request("GET", path, headers={"Host": "docker"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except FileNotFoundError:
            return Unknown(f"no container runtime socket at {self.socket_path}")
        except PermissionError:
            return Unknown(f"no permission to use {self.socket_path}")
        except (socket.timeout, TimeoutError):
            return Unknown(f"{self.socket_path} did not answer within {self.timeout_s:g}s")
        except (OSError, HTTPException) as e:
            return Unknown(f"{self.socket_path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
        finally:
            conn.close()

    def _json(self, path: str) -> object | Unknown:
        got = self._request(path)
        if isinstance(got, Unknown):
            return got
        status, body = got
        if status == 404:
            return Unknown(f"no such container ({path.split('/')[2] if path.count('/') >= 2 else path})")
        if status >= 400:
            msg = body.decode(errors="replace").strip()
            try:
                msg = json.loads(msg).get("message", msg)
            except (ValueError, AttributeError):
                pass
            return Unknown(f"runtime API {path}: HTTP {status}: {msg[:200]}")
        try:
            return json.loads(body)
        except ValueError:
            return Unknown(f"runtime API {path}: not JSON")

    def ping(self) -> bool | Unknown:
        """True when the runtime answers ``/_ping``."""
        got = self._request("/_ping")
        if isinstance(got, Unknown):
            return got
        return got[0] == 200

    def inspect(self, ref: str) -> ContainerInfo | Unknown:
        """A container by id, id prefix or name."""
        data = self._json(f"/containers/{urllib.parse.quote(ref, safe='')}/json")
        if isinstance(data, Unknown):
            return data
        if not isinstance(data, dict):
            return Unknown("runtime API: unexpected inspect answer")
        return ContainerInfo.from_api(data)

    def logs(self, ref: str, tail: int = 50) -> list[str] | Unknown:
        """The last ``tail`` lines the container wrote (stdout and stderr, interleaved as they came)."""
        q = urllib.parse.urlencode({"stdout": 1, "stderr": 1, "tail": tail})
        got = self._request(f"/containers/{urllib.parse.quote(ref, safe='')}/logs?{q}")
        if isinstance(got, Unknown):
            return got
        status, body = got
        if status >= 400:
            return Unknown(f"container {ref} logs: HTTP {status}")
        return _demux(body)

    def events(self, *, since: float | int, until: float | int, actions: Sequence[str] = ("die", "oom", "kill"),
               container: str | None = None) -> list[ContainerEvent] | Unknown:
        """Container events between two wall-clock times (epoch seconds, or int nanoseconds); the answer ends
        at ``until``."""
        filters: dict[str, list[str]] = {"type": ["container"], "event": list(actions)}
        if container:
            filters["container"] = [container]
        q = urllib.parse.urlencode({"since": _api_time(since), "until": _api_time(until), "filters": json.dumps(filters)})
        until_s = until / 1e9 if isinstance(until, int) and until > 10**15 else until
        got = self._request(f"/events?{q}", timeout_s=self.timeout_s + max(0.0, until_s - time.time()))
        if isinstance(got, Unknown):
            return got
        status, body = got
        if status >= 400:
            return Unknown(f"runtime events: HTTP {status}")
        return list(_parse_events(body))

    def follow_events(self, *, actions: Sequence[str] = ("die", "oom", "kill"),
                      since: float | int | None = None) -> Iterator[ContainerEvent | Unknown]:
        """Container events as they happen (blocks; run it in a thread). Ends with an Unknown when the stream breaks."""
        filters = {"type": ["container"], "event": list(actions)}
        params = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = _api_time(since)
        if not os.path.exists(self.socket_path):
            yield Unknown(f"runtime events: no container runtime socket at {self.socket_path}")
            return
        conn = _unix_connection(self.socket_path, None)
        from http.client import HTTPException

        try:
            try:
                conn.connect()
                assert conn.sock is not None
                conn.sock.settimeout(self.timeout_s)
                conn.request("GET", f"/events?{urllib.parse.urlencode(params)}", headers={"Host": "docker"})
                resp = conn.getresponse()
                conn.sock.settimeout(None)  # events may be hours apart
            except (OSError, HTTPException) as e:
                yield Unknown(f"runtime events: {e}")
                return
            if resp.status >= 400:
                yield Unknown(f"runtime events: HTTP {resp.status}")
                return
            while True:
                try:
                    line = resp.readline()
                except (OSError, HTTPException) as e:
                    yield Unknown(f"runtime events stream broke: {e}")
                    return
                if not line:
                    yield Unknown("runtime events stream ended")
                    return
                yield from _parse_events(line)
        finally:
            conn.close()


def _api_time(t: float | int) -> str:
    """A time for the events API: epoch seconds, or an int of nanoseconds (exact) given as ``int``."""
    if isinstance(t, int) and t > 10**15:
        return f"{t // 1_000_000_000}.{t % 1_000_000_000:09d}"
    return f"{t:.6f}"


def _parse_events(body: bytes) -> Iterator[ContainerEvent]:
    dec = json.JSONDecoder()
    text = body.decode(errors="replace")
    i = 0
    while i < len(text):
        while i < len(text) and text[i] in " \r\n\t":
            i += 1
        if i >= len(text):
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            break
        if isinstance(obj, dict):
            ev = ContainerEvent.from_api(obj)
            if ev is not None:
                yield ev


class ContainerNamer:
    """Names containers of :class:`Owner` values through the runtime, off the event loop, with a cache.

    ``await namer.resolve(owner)`` returns the owner with ``name``,
    ``image`` and the pod's name filled where the runtime (or the kubelet's
    log directory) knows them, and unchanged otherwise. Docker and Podman
    containers are asked of their socket; others keep their id.
    """

    def __init__(self, docker: DockerClient | None = None, *, cache_s: float = NAME_CACHE_S,
                 clock=time.monotonic) -> None:
        self.docker = docker if docker is not None else DockerClient()
        self.cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ContainerInfo | Unknown]] = {}

    def info_sync(self, container_id: str) -> ContainerInfo | Unknown:
        now = self._clock()
        hit = self._cache.get(container_id)
        if hit is not None and now - hit[0] < self.cache_s and not isinstance(hit[1], Unknown):
            return hit[1]
        got = self.docker.inspect(container_id)
        self._cache[container_id] = (now, got)
        if len(self._cache) > 4096:
            for key, _ in sorted(self._cache.items(), key=lambda kv: kv[1][0])[:1024]:
                del self._cache[key]
        return got

    def resolve_sync(self, owner: Owner) -> Owner:
        """The owner with its names filled (blocking: call from a thread)."""
        if owner.kind == "container" and owner.container_id and owner.runtime in ("docker", "podman", "container",
                                                                                  "kubernetes"):
            info = self.info_sync(owner.container_id)
            if isinstance(info, ContainerInfo):
                owner = replace(owner, name=info.name or owner.name, image=info.image or owner.image,
                                pod_name=info.pod_name or owner.pod_name,
                                pod_namespace=info.pod_namespace or owner.pod_namespace)
        if owner.pod_uid and not owner.pod_name:
            got = kube_pod_name(owner.pod_uid)
            if got is not None:
                owner = replace(owner, pod_namespace=got[0], pod_name=got[1])
        return owner

    async def resolve(self, owner: Owner) -> Owner:
        """:meth:`resolve_sync` in a thread: the event loop never waits on the runtime."""
        if owner.kind not in ("container", "pod"):
            return owner
        return await asyncio.to_thread(self.resolve_sync, owner)

    async def info(self, container_id: str) -> ContainerInfo | Unknown:
        return await asyncio.to_thread(self.info_sync, container_id)
