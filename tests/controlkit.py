"""A ControlServer on its own asyncio loop in a thread, for tests whose client blocks.

memguard.client is synchronous (sockets, threads), so tests that drive it
run the server's loop in a background thread (plain asyncio.run there) and
collect its TrialEvents in a queue.Queue the test waits on with deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Callable

from memguard.act.control import ControlServer
from memguard.model import TrialEvent

DEADLINE_S = 10.0


class ServerThread:
    """A ControlServer on its own loop in a thread; its TrialEvents land in a queue."""

    def __init__(self, path: str, identify: Callable[[str, int], bool], worker: str = "trials-0") -> None:
        self.path = path
        self.worker = worker
        self.identify = identify
        self.events: queue.Queue[TrialEvent] = queue.Queue()
        self.admin: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.token = ""

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = ControlServer(self.path, on_trial=self.events.put, on_admin=self._admin,
                                    identify=lambda w, pid: w == self.worker and self.identify(w, pid),
                                    incarnation_of=lambda w: 1 if w == self.worker else None)
        await self.server.start()
        self.token = self.server.new_token(self.worker, 1)
        self._ready.set()
        await self._stop.wait()
        await self.server.close()

    def _admin(self, req: dict[str, Any]) -> dict[str, Any]:
        self.admin.append(req)
        return {"workers": {self.worker: "running"}}

    def start(self) -> "ServerThread":
        self._thread.start()
        assert self._ready.wait(DEADLINE_S), "the control server did not start"
        return self

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(go)
        return fut.result(DEADLINE_S)

    def next_event(self) -> TrialEvent:
        return self.events.get(timeout=DEADLINE_S)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE_S)
