"""What memguard tells beyond its log: recent events, alert hooks, /metrics over HTTP.

The reporter hands every event it logs to :meth:`Outlets.event`. Here it

- lands in a bounded ring of recent events (and, per worker, its last
  event), which the control socket's ``status`` reply carries for
  ``memguard top`` and ``memguard health``;
- goes to the alert hooks of the ``alerts:`` section
  (:mod:`memguard.report.alerts`), which decide and queue at once and
  deliver in tasks of their own.

It also serves the metrics over HTTP when ``metrics: {listen: ...}`` is
set (:mod:`memguard.report.endpoint`). Nothing here raises into the
reporter: a failure is an event in memguard's log, and guarding goes on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, Deque, Mapping

from ..policy import DaemonPolicy
from ..threads import LoopOwned, on_owner_thread
from .alerts import Alerts, RunExec
from .endpoint import MetricsServer

__all__ = ["Outlets", "RECENT_EVENTS"]

#: 200 recent events: a screenful of history in ``memguard top`` many times over, ~100 KiB at most.
RECENT_EVENTS = 200
#: Events that stay out of the ring: the workers' own output lines (their volume would flush it) and
#: memguard's debug chatter.
_NOT_RECENT = frozenset({"output"})
#: The message kept in the ring is cut at 300 characters (the log keeps the whole).
_MESSAGE_MAX = 300
#: A worker's last event is kept for at most this many workers (the config allows 1024 replicas per workload).
_LAST_MAX = 4096


class Outlets(LoopOwned):
    """The ring of recent events, the alert hooks and the /metrics endpoint, for one reporter."""

    def __init__(self, *, run_exec: RunExec | None = None, capacity: int = RECENT_EVENTS,
                 wall: Callable[[], float] = time.time) -> None:
        self._claim_thread()
        self.wall = wall
        self.recent: Deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self.last_by_worker: dict[str, dict[str, Any]] = {}
        self.alerts = Alerts(run_exec=run_exec)
        self.policy: DaemonPolicy | None = None
        self.server: MetricsServer | None = None
        self._reporter: Any = None
        self._serving: asyncio.Task | None = None

    # ------------------------------------------------------------------ every event

    def event(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        """One event the reporter logged. Never raises."""
        try:
            if event not in _NOT_RECENT and level != "debug":
                entry = {"time": self.wall(), "level": level, "event": event,
                         "worker": fields.get("worker"), "workload": fields.get("workload"),
                         "message": str(fields.get("message") or event)[:_MESSAGE_MAX]}
                if fields.get("cause") is not None:
                    entry["cause"] = str(fields["cause"])
                self.recent.append(entry)
                worker = fields.get("worker")
                if isinstance(worker, str):
                    if worker not in self.last_by_worker and len(self.last_by_worker) >= _LAST_MAX:
                        self.last_by_worker.pop(next(iter(self.last_by_worker)))
                    self.last_by_worker[worker] = entry
            self.alerts.submit(level, event, fields)
        except Exception:  # noqa: BLE001 - nothing here may stop the log or the loop
            pass

    def status_fields(self) -> dict[str, Any]:
        """What the ``status`` reply takes from here (see :func:`memguard.report.status.status_reply`)."""
        return {"policy": self.policy, "events": tuple(self.recent), "last_events": dict(self.last_by_worker)}

    # ------------------------------------------------------------------ the policy's outlets

    @on_owner_thread
    def start(self, policy: DaemonPolicy, reporter: Any) -> None:
        """Called once the daemon runs (on its loop): alert hooks and the HTTP endpoint of ``policy``."""
        self._reporter = reporter
        metrics = getattr(reporter, "metrics", None)
        self.alerts.report = lambda level, event, fields: reporter.event(level, event, **fields)
        if metrics is not None:
            self.alerts.on_outcome = metrics.alert
        self.configure(policy)

    @on_owner_thread
    def configure(self, policy: DaemonPolicy) -> None:
        """The (re)loaded policy: its hooks replace the old ones; a changed listen address rebinds."""
        old, self.policy = self.policy, policy
        metrics = getattr(self._reporter, "metrics", None)
        if metrics is not None:
            metrics.configure(policy)
        self.alerts.configure(policy.alerts)
        listen = policy.metrics_listen if metrics is not None else None
        if old is not None and old.metrics_listen == listen and (self.server is not None) == (listen is not None):
            return
        if self.server is not None:
            server, self.server = self.server, None
            asyncio.get_running_loop().create_task(server.close())
        if listen is not None and metrics is not None:
            self.server = MetricsServer(listen, metrics.text)
            self._serving = asyncio.get_running_loop().create_task(self._serve(self.server))

    async def _serve(self, server: MetricsServer) -> None:
        try:
            await server.start()
        except OSError as e:
            if self.server is server:
                self.server = None
            self._say("error", "metrics_listen_failed",
                      f"metrics: cannot listen on {server.listen}: {e.strerror or e}; the metrics are not served "
                      "over HTTP (memguard keeps guarding; fix metrics.listen and reload)", listen=server.listen)
            return
        address = server.address
        self._say("info", "metrics_listening", f"metrics served at http://{server.listen}/metrics",
                  listen=server.listen, port=address[1] if address else None)

    def _say(self, level: str, event: str, message: str, **fields: Any) -> None:
        if self._reporter is not None:
            self._reporter.event(level, event, message=message, **fields)

    async def close(self) -> None:
        """At the daemon's end: queued alerts get a moment to go out; the endpoint closes."""
        await self.alerts.close()
        if self._serving is not None and not self._serving.done():
            self._serving.cancel()
        if self.server is not None:
            await self.server.close()
            self.server = None
