"""Alert hooks: memguard's events sent to a webhook (HTTP POST of JSON) or to a command (exec hook).

The reporter hands every event it logs to :meth:`Alerts.submit`, on the
loop, and that call only decides and queues: it filters by event kind and
severity, drops a repeat of the same event (kind, worker, rule or cause)
about the same process within the hook's ``dedup`` window, and holds the hook to its
``min_interval`` and ``max_per_hour``. What it drops is counted, and the
next alert that goes out says how many were held back. Each hook has a
small bounded queue and one task that delivers from it: an attempt is cut
off at ``timeout``, a failed one is retried ``retries`` times with a
doubling ``backoff``, and a delivery that fails for good becomes an
``alert_failed`` event in memguard's own log. Nothing here blocks the
loop or raises into it; guarding goes on whatever a hook does.

A webhook receives one JSON object per event, with a Slack-compatible
``text`` field (Slack, Mattermost, Rocket.Chat and most chat webhooks show
it as the message)::

    {"text": "memguard on gpu-07: kill: trials-0 (pid 4242): kill: ... [worker.memory 9.1GiB > 8GiB]",
     "host": "gpu-07", "event": "kill", "level": "warning", "time": "2026-05-04T10:02:13.120+00:00",
     "worker": "trials-0", "workload": "trials", "message": "...", "suppressed": 0,
     "fields": {"pid": 4242, "rule": "rules[0]", "value": 9771487232, "threshold": 8589934592, ...}}

An exec hook (like earlyoom's ``-N``) runs its command without a shell,
with the same JSON on its standard input and the event in environment
variables: ``MEMGUARD_EVENT``, ``MEMGUARD_LEVEL``, ``MEMGUARD_WORKER``,
``MEMGUARD_WORKLOAD``, ``MEMGUARD_PID``, ``MEMGUARD_RULE``,
``MEMGUARD_MESSAGE``, ``MEMGUARD_HOST``, ``MEMGUARD_SUPPRESSED``. Running
and stopping its process is an OS effect: the daemon passes the runner in
(``run_exec``, :func:`memguard.act.hooks.run_hook`), called in a thread of
its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as _dt
import json
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Iterable, Mapping, Protocol

from ..policy import ALERT_LEVELS, AlertHook

__all__ = ["Alerts", "ExecResult", "build_payload", "post_json", "matches"]

_RANK = {name: i for i, name in enumerate(ALERT_LEVELS)}
_RANK["critical"] = _RANK["error"]
#: Events memguard makes about its alerts are logged, never alerted on (no loop of alerts about alerts),
#: and neither are the workers' output lines.
_NEVER = frozenset({"output"})
#: 100 queued deliveries per hook: more than an hour's worth at the default max_per_hour.
QUEUE_MAX = 100
#: Backoff between retries is capped at 60 s whatever the hook asks (its timeout still bounds each attempt).
BACKOFF_MAX_S = 60.0
#: 2 s for queued alerts to go out when memguard stops (a `stopped` alert, a last kill).
DRAIN_S = 2.0
#: 64 KiB: a webhook's reply status line and headers fit in a few hundred bytes; the body is not read.
_MAX_REPLY = 64 * 1024
#: A dedup table larger than this is swept of expired entries.
_DEDUP_SWEEP = 1024


class ExecResult(Protocol):
    """What the exec runner returns (:class:`memguard.act.hooks.ExecResult`)."""

    returncode: int | None
    timed_out: bool
    error: str
    stderr: str


RunExec = Callable[[tuple[str, ...], Mapping[str, str], bytes, float], ExecResult]


def _rank(level: str) -> int:
    return _RANK.get(level, _RANK["info"])


def matches(hook: AlertHook, level: str, event: str, fields: Mapping[str, Any]) -> bool:
    """Whether ``hook`` wants this event: its kind (the event's name, or an exit's cause) and its severity."""
    if event in _NEVER or event.startswith("alert_"):
        return False
    if hook.events and event not in hook.events and str(fields.get("cause", "")) not in hook.events:
        return False
    floor = hook.severity if hook.severity is not None else ("debug" if hook.events else "warning")
    return _rank(level) >= _rank(floor)


def _dedup_key(event: str, fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The same event about the same process (a worker's incarnation, by pid) for the same rule or cause: a
    restarted worker killed again is news, a rule that fires each tick for one process is not."""
    return (event, str(fields.get("worker") or ""), str(fields.get("pid") or ""),
            str(fields.get("rule") or fields.get("cause") or ""))


def build_payload(level: str, event: str, fields: Mapping[str, Any], *, host: str, at: float,
                  suppressed: int = 0) -> dict[str, Any]:
    """The JSON every hook gets: the event's fields, a Slack-compatible ``text``, the host and the time."""
    message = str(fields.get("message") or event)
    text = f"memguard on {host}: {event}: {message}"
    if suppressed:
        text += f" (+{suppressed} more alert(s) held back since the last one)"
    rest = {k: v for k, v in fields.items() if k not in ("message", "worker", "workload")}
    return {
        "text": text,
        "host": host,
        "event": event,
        "level": level,
        "time": _dt.datetime.fromtimestamp(at, _dt.timezone.utc).isoformat(timespec="milliseconds"),
        "worker": fields.get("worker"),
        "workload": fields.get("workload"),
        "message": message,
        "suppressed": suppressed,
        "fields": rest,
    }


def _env(payload: Mapping[str, Any]) -> dict[str, str]:
    f = payload["fields"]
    values = {
        "MEMGUARD_EVENT": payload["event"], "MEMGUARD_LEVEL": payload["level"],
        "MEMGUARD_WORKER": payload.get("worker"), "MEMGUARD_WORKLOAD": payload.get("workload"),
        "MEMGUARD_PID": f.get("pid"), "MEMGUARD_RULE": f.get("rule"), "MEMGUARD_MESSAGE": payload["message"],
        "MEMGUARD_HOST": payload["host"], "MEMGUARD_SUPPRESSED": payload["suppressed"],
        "MEMGUARD_TIME": payload["time"],
    }
    return {k: str(v) for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------
# the webhook client: plain asyncio streams, so a timeout cancels it cleanly (no thread left hanging)


async def post_json(url: str, body: bytes, headers: Iterable[tuple[str, str]] = (), *,
                    user_agent: str = "memguard") -> int:
    """POST ``body`` as JSON to ``url``; returns the HTTP status. Raises OSError (or a subclass) when the
    receiver cannot be reached or answers something that is not HTTP. The caller bounds it in time."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise OSError(f"not an http(s) URL: {url}")
    port = u.port or (443 if u.scheme == "https" else 80)
    ctx = None
    if u.scheme == "https":
        try:
            import ssl
        except ImportError:
            raise OSError("https:// webhooks need TLS, which this daemon did not load (none was configured "
                          "when it started): restart memguard to use this hook") from None
        ctx = ssl.create_default_context()
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=ctx,
                                                   server_hostname=u.hostname if ctx else None)
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
        if ":" in u.hostname and not host.startswith("["):
            host = f"[{u.hostname}]" + (f":{u.port}" if u.port else "")
        head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", f"User-Agent: {user_agent}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers]
        if u.username is not None:
            import base64

            cred = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
            head.append("Authorization: Basic " + base64.b64encode(cred.encode()).decode())
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        line = await reader.readline()
        if len(line) > _MAX_REPLY:
            raise OSError("the receiver's status line is too long")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise OSError(f"the receiver did not answer HTTP: {line[:80]!r}")
        return int(parts[1])
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError):  # ssl.SSLError is an OSError
            pass


# ---------------------------------------------------------------------------


@dataclass
class _Hook:
    spec: AlertHook
    queue: Deque[dict[str, Any]] = field(default_factory=collections.deque)
    wake: asyncio.Event | None = None
    task: asyncio.Task | None = None
    sent_at: Deque[float] = field(default_factory=collections.deque)  # when deliveries were taken on
    dedup: dict[tuple[str, ...], float] = field(default_factory=dict)
    held_back: int = 0  # suppressed since the last delivery taken on
    quiet: bool = True  # no suppression said since the last delivery (said once per burst)
    busy: bool = False


class Alerts:
    """Every hook of the ``alerts:`` section, on the daemon's loop.

    ``report(level, event, fields)`` is how the component tells memguard's
    log what became of its deliveries (``alert_failed``,
    ``alert_suppressed``, ``alert_sent`` at debug level); ``on_outcome(hook,
    outcome)`` counts them for the metrics. ``clock`` (monotonic seconds)
    drives dedup and rate limits; ``wall`` stamps the payloads.
    """

    def __init__(self, hooks: Iterable[AlertHook] = (), *, run_exec: RunExec | None = None,
                 report: Callable[[str, str, dict[str, Any]], None] | None = None,
                 on_outcome: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 host: str | None = None, user_agent: str = "memguard") -> None:
        self.run_exec = run_exec
        self.report = report or (lambda level, event, fields: None)
        self.on_outcome = on_outcome or (lambda hook, outcome: None)
        self.clock = clock
        self.wall = wall
        self.host = host or socket.gethostname()
        self.user_agent = user_agent
        self._hooks: dict[AlertHook, _Hook] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.configure(hooks)

    # ------------------------------------------------------------------ configuration

    def configure(self, hooks: Iterable[AlertHook]) -> None:
        """Take the hooks of a (re)loaded policy: an unchanged hook keeps its queue, dedup and rate state."""
        new: dict[AlertHook, _Hook] = {}
        for spec in hooks:
            new[spec] = self._hooks.pop(spec, None) or _Hook(spec)
        for gone in self._hooks.values():
            if gone.task is not None:
                gone.task.cancel()
        self._hooks = new

    @property
    def hooks(self) -> tuple[AlertHook, ...]:
        return tuple(self._hooks)

    # ------------------------------------------------------------------ the loop's side: decide and queue

    def submit(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        """One event the reporter logged; queued for each hook that wants it. Never raises, never waits."""
        if self._closed or not self._hooks:
            return
        for hook in list(self._hooks.values()):
            try:
                self._offer(hook, level, event, fields)
            except Exception as e:  # noqa: BLE001 - an alert problem never reaches the loop
                self._tell("error", "alert_failed", hook, f"{type(e).__name__}: {e}")

    def _offer(self, hook: _Hook, level: str, event: str, fields: Mapping[str, Any]) -> None:
        spec = hook.spec
        if not matches(spec, level, event, fields):
            return
        now = self.clock()
        key = _dedup_key(event, fields)
        last = hook.dedup.get(key)
        if last is not None and now - last < spec.dedup_s:
            self._hold(hook, f"a repeat of {event} within dedup {spec.dedup_s:g}s")
            return
        while hook.sent_at and now - hook.sent_at[0] >= 3600.0:
            hook.sent_at.popleft()
        if hook.sent_at and now - hook.sent_at[-1] < spec.min_interval_s:
            self._hold(hook, f"min_interval {spec.min_interval_s:g}s")
            return
        if len(hook.sent_at) >= spec.max_per_hour:
            self._hold(hook, f"max_per_hour {spec.max_per_hour}")
            return
        if len(hook.queue) >= QUEUE_MAX:
            self._hold(hook, f"{QUEUE_MAX} alerts already waiting")
            return
        hook.dedup[key] = now
        if len(hook.dedup) > _DEDUP_SWEEP:
            hook.dedup = {k: t for k, t in hook.dedup.items() if now - t < spec.dedup_s}
        hook.sent_at.append(now)
        payload = build_payload(level, event, fields, host=self.host, at=self.wall(), suppressed=hook.held_back)
        hook.held_back = 0
        hook.quiet = True
        hook.queue.append(payload)
        self._ensure_task(hook)

    def _hold(self, hook: _Hook, why: str) -> None:
        hook.held_back += 1
        self.on_outcome(hook.spec.name, "suppressed")
        if hook.quiet:
            hook.quiet = False
            self._tell("info", "alert_suppressed", hook, f"holding alerts back ({why}); the next alert says how "
                                                         f"many (said once until one goes out)")

    def _ensure_task(self, hook: _Hook) -> None:
        if hook.wake is None:
            hook.wake = asyncio.Event()
        if hook.task is None or hook.task.done():
            hook.task = asyncio.get_running_loop().create_task(self._deliver_loop(hook))
        hook.wake.set()

    def _tell(self, level: str, event: str, hook: _Hook, message: str, **extra: Any) -> None:
        target = hook.spec.webhook or " ".join(hook.spec.exec)
        try:
            self.report(level, event, {"hook": hook.spec.name, "target": target,
                                       "message": f"alert hook {hook.spec.name} ({target}): {message}", **extra})
        except Exception:  # noqa: BLE001 - the log's own failures are the reporter's to count
            pass

    # ------------------------------------------------------------------ delivery tasks

    async def _deliver_loop(self, hook: _Hook) -> None:
        assert hook.wake is not None
        while True:
            if not hook.queue:
                hook.wake.clear()
                await hook.wake.wait()
                continue
            payload = hook.queue.popleft()
            hook.busy = True
            try:
                await self._deliver(hook, payload)
            finally:
                hook.busy = False

    async def _deliver(self, hook: _Hook, payload: dict[str, Any]) -> None:
        spec = hook.spec
        body = json.dumps(payload, default=str, separators=(",", ":")).encode()
        why = ""
        for attempt in range(spec.retries + 1):
            if attempt:
                await asyncio.sleep(min(spec.backoff_s * 2 ** (attempt - 1), BACKOFF_MAX_S))
            started = self.clock()
            try:
                ok, why, permanent = await self._attempt(spec, payload, body)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one hook's failure never stops another's
                ok, why, permanent = False, f"{type(e).__name__}: {e}", False
            if ok:
                self.on_outcome(spec.name, "sent")
                self._tell("debug", "alert_sent", hook, f"{payload['event']} delivered",
                           alert_event=payload["event"], attempts=attempt + 1,
                           took_s=round(self.clock() - started, 3))
                return
            if permanent:
                break
        self.on_outcome(spec.name, "failed")
        self._tell("warning", "alert_failed", hook, f"{payload['event']} not delivered: {why}; memguard keeps "
                                                    "guarding", alert_event=payload["event"], reason=why)

    async def _attempt(self, spec: AlertHook, payload: Mapping[str, Any], body: bytes) -> tuple[bool, str, bool]:
        """(delivered, why not, no point retrying)."""
        if spec.webhook is not None:
            try:
                status = await asyncio.wait_for(
                    post_json(spec.webhook, body, spec.headers, user_agent=self.user_agent), spec.timeout_s)
            except asyncio.TimeoutError:
                return False, f"no answer within {spec.timeout_s:g}s (timeout)", False
            except (OSError, UnicodeError) as e:  # ssl.SSLError is an OSError
                return False, f"{type(e).__name__}: {e}", False
            if 200 <= status < 300:
                return True, "", False
            return False, f"HTTP {status}", not (status == 429 or status == 408 or status >= 500)
        if self.run_exec is None:
            return False, "exec hooks are not available in this memguard", True
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="memguard-hook")
        result = await loop.run_in_executor(self._pool, self.run_exec, spec.exec, _env(payload), body,
                                            spec.timeout_s)
        if result.error:
            return False, result.error, True
        if result.timed_out:
            return False, f"still running after {spec.timeout_s:g}s (timeout): killed", False
        if result.returncode == 0:
            return True, "", False
        tail = f": {result.stderr}" if result.stderr else ""
        return False, f"exited {result.returncode}{tail}", False

    # ------------------------------------------------------------------ the end

    def pending(self) -> int:
        return sum(len(h.queue) + (1 if h.busy else 0) for h in self._hooks.values())

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """Give queued alerts ``drain_s`` to go out, then stop every delivery task."""
        self._closed = True
        deadline = self.clock() + drain_s
        while self.pending() and self.clock() < deadline:
            await asyncio.sleep(0.05)
        tasks = [h.task for h in self._hooks.values() if h.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
