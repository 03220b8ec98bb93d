"""Thread ownership: objects the event loop owns are touched only on the loop's thread.

The daemon runs on one asyncio loop; slow reads (process trees, cgroup
files, NVML) run in worker threads that get an immutable snapshot and hand
values back. Nothing enforces that in Python, so objects that keep mutable
state for the loop (the child supervisor, the control server, the worker
cgroups, the observer, the reporter) are :class:`LoopOwned`: with
``MEMGUARD_CHECK_THREADS=1`` in the environment when memguard is imported
(the test suite sets it), every method marked :func:`on_owner_thread`
asserts that it runs on the thread that created the object. Off, the
decorator returns the method unchanged: no cost in production.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, TypeVar

__all__ = ["CHECK", "LoopOwned", "on_owner_thread", "OwnershipError"]

CHECK = os.environ.get("MEMGUARD_CHECK_THREADS", "") not in ("", "0")

F = TypeVar("F", bound=Callable[..., Any])


class OwnershipError(AssertionError):
    """A loop-owned object was used from another thread."""


class LoopOwned:
    """Remembers the thread that created it (normally the event loop's)."""

    _owner_thread: int | None = None

    def _claim_thread(self) -> None:
        """Make the calling thread the owner (called from ``__init__``)."""
        self._owner_thread = threading.get_ident()


def on_owner_thread(fn: F) -> F:
    """Mark a method that must run on its object's owner thread (checked when CHECK is on)."""
    if not CHECK:
        return fn

    @functools.wraps(fn)
    def checked(self: LoopOwned, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner_thread
        here = threading.get_ident()
        if owner is not None and owner != here:
            raise OwnershipError(f"{type(self).__name__}.{fn.__name__} called from thread "
                                 f"{threading.current_thread().name}, not the thread that owns it")
        return fn(self, *args, **kwargs)

    return checked  # type: ignore[return-value]
