"""Reloading the configuration without stalling the tick.

A reload (SIGHUP, ``memguard ctl reload``) parses the files in a worker
thread: the loop keeps ticking meanwhile (the parse shares the interpreter
lock with it, so a tick waits at most one switch interval, 5 ms, for it),
and the configuration loader bounds what it reads, so a parse ends in well
under a second. The result is posted to the daemon's inbox as a
:class:`Loaded` and applied by the next tick; replies to ``ctl reload``
are answered then. One parse runs at a time; a reload asked for during a
parse reads the files once more when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError
from .policy import DaemonPolicy

__all__ = ["Loaded", "Reloader", "RELOAD_TIMEOUT_S"]

#: A parse that has not ended after this long is abandoned (only a stuck filesystem gets there).
RELOAD_TIMEOUT_S = 30.0


@dataclass
class Loaded:
    """The outcome of one parse: a policy, or the errors; and the ``ctl reload`` replies waiting on it."""

    policy: DaemonPolicy | None
    errors: list[Any] = field(default_factory=list)
    replies: list[asyncio.Future] = field(default_factory=list)


class Reloader:
    """``executor`` runs the parse (None: asyncio's default thread pool; tests pass one that runs inline)."""

    def __init__(self, load: Callable[[], DaemonPolicy] | None, post: Callable[[Any], None],
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.load = load
        self.post = post
        self.executor = executor
        self._task: asyncio.Task | None = None
        self._waiting: list[asyncio.Future] = []
        self._again = False

    def request(self, reply: asyncio.Future | None = None) -> bool:
        """Start a parse (or queue one after the parse under way). True when a new parse started."""
        if reply is not None:
            self._waiting.append(reply)
        if self._task is not None:
            self._again = True
            return False
        self._task = asyncio.ensure_future(self._parse())
        return True

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _parse(self) -> None:
        replies, self._waiting = self._waiting, []
        try:
            if self.load is None:
                loaded = Loaded(None, ["this memguard has no configuration file to reload"], replies)
            else:
                loop = asyncio.get_running_loop()
                policy = await asyncio.wait_for(loop.run_in_executor(self.executor, self.load), RELOAD_TIMEOUT_S)
                loaded = Loaded(policy, [], replies)
        except ConfigError as e:
            loaded = Loaded(None, list(e.errors), replies)
        except asyncio.TimeoutError:
            loaded = Loaded(None, [f"the configuration did not parse within {RELOAD_TIMEOUT_S:g} s"], replies)
        finally:
            self._task = None
        self.post(loaded)
        if self._again:
            self._again = False
            self.request()
