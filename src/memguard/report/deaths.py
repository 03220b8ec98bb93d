"""Deaths memguard did not cause, recorded: the kernel's OOM kills and containers that died.

:class:`DeathWatch` joins the pieces for the daemon:

- the kernel log (:class:`~memguard.sense.kmsg.KmsgReader`, registered with
  ``loop.add_reader``): each OOM kill is attributed to its owner
  (:func:`~memguard.sense.containers.attribute_cgroup`), named through the
  container runtime off the loop, and written as an incident with the
  flight recorder's timeline before it; the seconds after it are appended
  ``after_s`` later. The kernel log cursor is saved in the store when
  reading starts, after each kill and every :data:`CURSOR_SAVE_S` while
  other lines come, so a restarted daemon (even one that was SIGKILLed)
  resumes where it stopped and records the kills that happened while it
  was down;
- the container runtime's events (``die``, ``oom``, ``kill``, fed by the
  daemon from :meth:`~memguard.sense.containers.DockerClient.follow_events`
  in a thread): a container that died gets one incident with its name,
  image, exit code, ``OOMKilled`` and its last log lines. The kernel log is
  drained first, so a kernel OOM kill of the container (logged before the
  runtime saw the death) is already known, and the two views end in one
  record.

Everything that blocks (fsync, the runtime's socket) runs in a thread;
the event loop only parses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from ..sense.containers import ContainerEvent, ContainerInfo, ContainerNamer, DockerClient, Owner, attribute_cgroup
from ..sense.kmsg import KmsgCursor, KmsgGap, KmsgProblem, KmsgReader, OomKill, OomReportParser
from .incidents import Incident, IncidentStore, incident_from_container, incident_from_oom_kill
from .recorder import FlightRecorder

__all__ = ["DeathWatch", "KMSG_STATE", "EVENTS_STATE", "TIMELINE_S", "AFTER_S"]

KMSG_STATE = "kmsg"
"""Name of the kernel log cursor in the store's state (``.kmsg.state``)."""

EVENTS_STATE = "container_events"
"""Name of the container events position in the store's state: the time of the last event handled."""

RUNTIME_RETRY_S = 30.0
"""Seconds between attempts to reach a container runtime that is absent or went away."""

TIMELINE_S = 300.0
"""Seconds of flight-recorder history put in each incident (5 minutes: the
slope of a leak and the spike that ended it; the recorder keeps 10)."""

AFTER_S = 5.0
"""Seconds after a death whose timeline is appended to its incident: long
enough to see the memory come back (or not) and memguard's next steps."""

CURSOR_SAVE_S = 10.0
"""Seconds between saves of the kernel log position while only lines other than OOM reports come: after a
restart at most this much is read again (and merged, not doubled)."""

RECENT_KILLS_S = 120.0
"""How long a container's kernel OOM kill is remembered for its ``die`` event, seconds."""


class DeathWatch:
    """Records kernel OOM kills and container deaths as incidents. One per daemon; use from the event loop."""

    def __init__(self, store: IncidentStore, *, reader: KmsgReader | None = None,
                 recorder: FlightRecorder | None = None, namer: ContainerNamer | None = None,
                 docker: DockerClient | None = None, worker_roots: Sequence[str] = (),
                 boot_id: str | None = None, timeline_s: float = TIMELINE_S, after_s: float = AFTER_S,
                 on_incident: Callable[[Incident, str], None] | None = None,
                 on_gap: Callable[[KmsgGap], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.reader = reader
        self.recorder = recorder
        self.docker = docker if docker is not None else (namer.docker if namer is not None else None)
        self.namer = namer if namer is not None else (ContainerNamer(self.docker) if self.docker is not None else None)
        self.worker_roots = tuple(worker_roots)
        self.boot_id = boot_id or (reader.boot_id if reader is not None else None)
        self.timeline_s = timeline_s
        self.after_s = after_s
        self.on_incident = on_incident
        self.on_gap = on_gap
        self.on_error = on_error  # a write that failed, the kernel log that stopped: said by the reporter
        self._clock = clock
        self._wall = wall
        self._parser = OomReportParser()
        self._recent: dict[str, tuple[float, OomKill, str]] = {}  # container id -> (mono, kill, incident key)
        self._events: dict[str, list[ContainerEvent]] = {}  # container id -> its events before "die"
        self._tasks: set[asyncio.Task[Any]] = set()
        self.gaps: list[KmsgGap] = []
        self.problem: str | None = None
        self.runtime_problem: str | None = None
        self._lock: asyncio.Lock | None = None
        self._saved: KmsgCursor | None = None
        self._saved_at = 0.0
        self._stop_events: threading.Event | None = None

    # -- wiring helpers -------------------------------------------------------

    @staticmethod
    def open_reader(store: IncidentStore, path: str | None = None) -> KmsgReader:
        """The kernel log reader, resumed from the cursor saved in ``store`` (or from now). Raises KmsgUnavailable."""
        cursor = KmsgCursor.from_dict(store.load_state(KMSG_STATE))
        kwargs = {"path": path} if path else {}
        return KmsgReader.open(resume=cursor, **kwargs)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register the kernel log with the loop: every new record is handled as it comes."""
        if self.reader is None:
            return
        loop = loop or asyncio.get_running_loop()
        loop.add_reader(self.reader.fileno(), self._on_readable)
        self._spawn(self.drain())  # what is already there (a resumed cursor's backlog)

    def stop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self.reader is not None and not self.reader.closed:
            try:
                (loop or asyncio.get_running_loop()).remove_reader(self.reader.fileno())
            except (RuntimeError, ValueError):
                pass

    async def wait_idle(self) -> None:
        """Until every write and timeline append started so far is done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and self.on_error is not None:
            self.on_error(error)

    def _on_readable(self) -> None:
        self._spawn(self.drain())

    # -- the kernel log ---------------------------------------------------------

    def read_kills(self) -> list[OomKill]:
        """Parse what the kernel logged since the last read (no I/O beyond the non-blocking read)."""
        if self.reader is None or self.reader.closed:
            return []
        kills: list[OomKill] = []
        for item in self.reader.read(now=self._clock()):
            if isinstance(item, KmsgGap):
                self.gaps.append(item)
                if self.on_gap is not None:
                    self.on_gap(item)
            elif isinstance(item, KmsgProblem):
                self.problem = item.reason
                self.stop()
                if self.on_error is not None:
                    self.on_error(OSError(f"the kernel log is no longer followed: {item.reason}"))
            kills.extend(self._parser.feed(item))
        return kills

    async def drain(self) -> list[Incident]:
        """Read the kernel log now and record each OOM kill; save the cursor. Returns the incidents written.

        Drains run one at a time: a caller (a container's death) waits for a
        drain in progress, so the kills it read are recorded when it returns.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._drain_locked()

    async def _drain_locked(self) -> list[Incident]:
        kills = self.read_kills()
        out = []
        for kill in kills:
            out.append(await self.record_kill(kill))
        cursor = self.reader.cursor if self.reader is not None else None
        if cursor is not None and cursor != self._saved and (
                kills or self.gaps or self._saved is None or self._clock() - self._saved_at >= CURSOR_SAVE_S):
            # Saved at the first drain (a daemon killed before any kill still resumes from its start), after
            # every kill, and at most every CURSOR_SAVE_S otherwise (what is read again after a restart is merged).
            await asyncio.to_thread(self.store.save_state, KMSG_STATE, cursor.to_dict())
            self._saved, self._saved_at = cursor, self._clock()
        return out

    async def record_kill(self, kill: OomKill) -> Incident:
        owner = attribute_cgroup(kill.cgroup or "/", worker_roots=self.worker_roots) if kill.cgroup else None
        info: ContainerInfo | None = None
        if owner is not None and self.namer is not None and owner.kind in ("container", "pod"):
            owner = await self.namer.resolve(owner)
            if owner.container_id and owner.runtime in ("docker", "podman"):
                got = await self.namer.info(owner.container_id)
                info = got if isinstance(got, ContainerInfo) else None
        now_mono, now_wall = self._clock(), self._wall()
        mono = self._mono_of(kill, now_mono)
        wall = now_wall - (now_mono - mono)
        timeline = self._timeline(mono)
        inc = incident_from_oom_kill(kill, owner, wall=wall, boot_id=self.boot_id, timeline=timeline, container=info,
                                     monotonic=mono)
        written = await asyncio.to_thread(self.store.record, inc)
        if owner is not None and owner.container_id:
            self._recent[owner.container_id] = (now_mono, kill, written.key)
            self._forget_old(now_mono)
        if self.recorder is not None:
            self.recorder.record_mark(mono, "kernel_oom_kill", pid=kill.pid, text=inc.summary,
                                      worker=owner.worker if owner else None)
        self._after(written.id, mono)
        self._notify(written)
        return written

    # -- container deaths -------------------------------------------------------

    def follow_containers(self, loop: asyncio.AbstractEventLoop | None = None) -> "threading.Thread | None":
        """Follow the runtime's container events in a daemon thread, each handed to the loop.

        Resumes from the time of the last event handled (saved in the store),
        so deaths while memguard was down are recorded too; reconnects every
        :data:`RUNTIME_RETRY_S` while the runtime is absent. Returns the thread
        (None without a Docker client). :meth:`stop_containers` ends it at
        the next event.
        """
        if self.docker is None:
            return None
        loop = loop or asyncio.get_running_loop()
        self._stop_events = threading.Event()
        saved = self.store.load_state(EVENTS_STATE) or {}
        # Resume just after the last event handled (nanoseconds, exact: the API's since is inclusive).
        since: int = saved["since_ns"] + 1 if isinstance(saved.get("since_ns"), int) else int(self._wall() * 1e9)

        def feed(ev: ContainerEvent) -> None:
            self._spawn(self._on_followed(ev))

        def run() -> None:
            nonlocal since
            docker = DockerClient(self.docker.socket_path, timeout_s=self.docker.timeout_s)
            while not self._stop_events.is_set():
                try:
                    for item in docker.follow_events(since=since):
                        if self._stop_events.is_set():
                            return
                        if isinstance(item, ContainerEvent):
                            if item.time_ns:
                                since = max(since, item.time_ns + 1)
                            loop.call_soon_threadsafe(feed, item)
                        else:
                            self.runtime_problem = item.reason
                            break
                except RuntimeError:  # the loop is closed: the daemon is exiting
                    return
                except Exception as e:  # noqa: BLE001 - a bug here must not end the following for good
                    self.runtime_problem = f"{type(e).__name__}: {e}"
                self._stop_events.wait(RUNTIME_RETRY_S)

        t = threading.Thread(target=run, name="memguard-container-events", daemon=True)
        t.start()
        return t

    def stop_containers(self) -> None:
        if self._stop_events is not None:
            self._stop_events.set()

    async def _on_followed(self, ev: ContainerEvent) -> None:
        await self.on_container_event(ev)
        if ev.time_ns:
            await asyncio.to_thread(self.store.save_state, EVENTS_STATE, {"since_ns": ev.time_ns})

    async def on_container_event(self, ev: ContainerEvent) -> Incident | None:
        """A runtime event; a ``die`` becomes an incident (merged with the kernel's kill of it, if any)."""
        if ev.action != "die":
            self._remember_event(ev)
            return None
        await self.drain()  # the kernel logged its kill before the runtime saw the death
        events = self._events.pop(ev.id, []) + [ev]
        info: ContainerInfo | None = None
        lines: list[str] = []
        if self.docker is not None:
            got = await asyncio.to_thread(self.docker.inspect, ev.id)
            info = got if isinstance(got, ContainerInfo) else None
            logs = await asyncio.to_thread(self.docker.logs, ev.id, 50)
            lines = logs if isinstance(logs, list) else []
        if info is None:  # removed already (--rm): what the event says
            info = ContainerInfo(id=ev.id, name=ev.name, image=ev.image, exit_code=ev.exit_code,
                                 oom_killed=any(e.action == "oom" for e in events))
        elif info.exit_code is None and ev.exit_code is not None:
            info = replace(info, exit_code=ev.exit_code)
        recent = self._recent.pop(ev.id, None)
        if recent is None and (info.oom_killed or any(e.action == "oom" for e in events)):
            recent = await asyncio.to_thread(self._kernel_record_of, info.id, ev)
        kills = [recent[1]] if recent is not None else []
        owner = Owner(kind="container", cgroup=kills[0].cgroup or "" if kills else "", runtime="docker",
                      container_id=info.id, name=info.name, image=info.image)
        if kills and kills[0].cgroup:
            owner = replace(attribute_cgroup(kills[0].cgroup, worker_roots=self.worker_roots), name=info.name,
                            image=info.image)
        now_mono, wall = self._clock(), ev.time_ns / 1e9 if ev.time_ns else self._wall()
        mono = self._mono_of(kills[0], now_mono) if kills else now_mono
        inc = incident_from_container(info, wall=wall, boot_id=self.boot_id, owner=owner, kills=kills, events=events,
                                      log_lines=lines, timeline=self._timeline(mono))
        if recent is not None:
            inc = replace(inc, key=recent[2])  # the same death as the kernel's record: merge into it
            existing = await asyncio.to_thread(self.store.find_key, recent[2])
            if existing is not None:
                inc = replace(inc, id=existing.id)
        written = await asyncio.to_thread(self.store.record, inc)
        if recent is None:
            self._after(written.id, mono)
        self._notify(written)
        return written

    def _kernel_record_of(self, container_id: str, ev: ContainerEvent) -> tuple[float, OomKill, str] | None:
        """The kernel's record of this container's OOM kill written before a restart (not in memory any more)."""
        wall = ev.time_ns / 1e9 if ev.time_ns else self._wall()
        for inc in self.store.latest(50):
            o = inc.what.get("owner") or {}
            if o.get("container_id") == container_id and "kernel" in inc.sources and abs(inc.wall - wall) < 120:
                kill = _kill_from_record(inc)
                if kill is not None:
                    return (self._clock(), kill, inc.key)
        return None

    def _remember_event(self, ev: ContainerEvent) -> None:
        self._events.setdefault(ev.id, []).append(ev)
        if len(self._events) > 1024:
            for key in list(self._events)[:256]:
                del self._events[key]

    def _forget_old(self, now: float) -> None:
        for cid in [c for c, (t, _, _) in self._recent.items() if now - t > RECENT_KILLS_S]:
            del self._recent[cid]

    # -- timelines ----------------------------------------------------------------

    def _mono_of(self, kill: OomKill, now_mono: float) -> float:
        """The kill's moment on the monotonic clock (the recorder's), never in the future."""
        if not kill.ts_us:
            return now_mono
        at = self.reader.monotonic_of(kill.ts_us) if self.reader is not None else kill.ts_us / 1e6
        return min(at, now_mono)

    def _timeline(self, mono: float) -> dict[str, Any] | None:
        if self.recorder is None or self.recorder.latest_at is None:
            return None
        tl = self.recorder.timeline(self.timeline_s, around=mono)
        return tl if tl["scope"]["t"] or tl["full"]["t"] else None

    def _after(self, incident_id: str, mono: float) -> None:
        if self.recorder is None or self.after_s <= 0:
            return
        delay = max(0.0, mono + self.after_s - self._clock())

        async def later() -> None:
            await asyncio.sleep(delay)
            assert self.recorder is not None
            tl = self.recorder.timeline(0.0, around=mono, after_s=self.after_s)
            await asyncio.to_thread(self.store.append_after, incident_id, tl)

        self._spawn(later())

    def _notify(self, inc: Incident) -> None:
        if self.on_incident is not None:
            self.on_incident(inc, str(self.store.path_of(inc.id)))


def _kill_from_record(inc: Incident) -> OomKill | None:
    """Enough of the kernel's kill back from its record to describe the container's death."""
    oom = inc.how.get("oom") or {}
    pid = inc.what.get("pid")
    if not isinstance(pid, int):
        return None
    kb = lambda key: oom[key] // 1024 if isinstance(oom.get(key), int) else None  # noqa: E731
    limit_kind = oom.get("limit_kind")
    limit = kb("limit_bytes")
    return OomKill(pid=pid, comm=str(inc.what.get("comm", "?")), seq=int(oom.get("kernel_seq", 0)),
                   ts_us=int(oom.get("kernel_ts_us", 0)), constraint=str(oom.get("constraint", "memcg")),
                   uid=inc.what.get("uid"), oom_memcg=oom.get("memcg"), task_memcg=inc.what.get("cgroup"),
                   invoker=oom.get("invoker"), invoker_pid=oom.get("invoker_pid"),
                   memory_usage_kb=kb("usage_bytes"),
                   memory_limit_kb=limit if limit_kind != "memory+swap" else None,
                   memsw_usage_kb=limit if limit_kind == "memory+swap" else None,
                   memsw_limit_kb=limit if limit_kind == "memory+swap" else None,
                   anon_rss_kb=kb("anon_rss_bytes"), total_vm_kb=kb("total_vm_bytes"),
                   oom_score_adj=oom.get("oom_score_adj"), lines=tuple(inc.evidence[:8]))
