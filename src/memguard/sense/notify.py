"""Kernel notifications: what the daemon waits on instead of polling.

* **cgroup v1 memory thresholds.** An eventfd registered through
  ``cgroup.event_control`` against ``memory.usage_in_bytes`` is signalled
  whenever the cgroup's usage crosses the threshold, in either direction
  (the kernel checks thresholds every 128 page events per CPU, so within
  half a MiB per CPU). Closing the eventfd unregisters it. cgroup v2 has no
  usage thresholds (its ``memory.events`` only tells of ``high``, ``max``
  and OOM events): there memguard polls.
* **PSI triggers.** Writing ``some|full <stall us> <window us>`` to a PSI
  file opened read-write (``/proc/pressure/memory``, a cgroup's
  ``memory.pressure``) arms a trigger: the file signals ``POLLPRI`` when the
  tasks stalled that long within a window. Without CAP_SYS_RESOURCE the
  window must be a multiple of 2 s. A PSI file is always "readable", so it
  is registered for ``EPOLLPRI`` only, never as a reader.
* :class:`Waiter`: one epoll set over those descriptors plus an eventfd
  that another thread writes to wake the waiting one.

Nothing here raises for a notification that cannot be armed: the arming
functions return the reason as a string, and the caller polls instead.
"""

from __future__ import annotations

import os
import select

__all__ = ["arm_usage_threshold", "arm_psi_trigger", "Waiter", "drain_eventfd"]

_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def arm_usage_threshold(cgroup_dir: str, threshold_bytes: int) -> int | str:
    """An eventfd the kernel signals when the v1 cgroup's usage crosses ``threshold_bytes``; or why not."""
    control = os.path.join(cgroup_dir, "cgroup.event_control")
    usage = os.path.join(cgroup_dir, "memory.usage_in_bytes")
    try:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except (OSError, AttributeError) as e:
        return f"no eventfd: {e}"
    try:
        ufd = os.open(usage, _O_FLAGS)
    except OSError as e:
        os.close(efd)
        return f"{usage} unreadable: {e.strerror or e}"
    try:
        cfd = os.open(control, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(cfd, f"{efd} {ufd} {max(0, int(threshold_bytes))}".encode())
        finally:
            os.close(cfd)
    except OSError as e:
        os.close(efd)
        return f"cannot register a threshold in {control}: {e.strerror or e}"
    finally:
        os.close(ufd)
    return efd


def arm_psi_trigger(path: str, kind: str, stall_us: int, window_us: int) -> int | str:
    """A PSI trigger on ``path``: an fd that signals POLLPRI when ``kind`` stall exceeds ``stall_us`` within
    ``window_us``; or why not (no PSI, a window the kernel refuses without CAP_SYS_RESOURCE...)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    try:
        os.write(fd, f"{kind} {int(stall_us)} {int(window_us)}\0".encode())
    except OSError as e:
        os.close(fd)
        return f"{path}: trigger '{kind} {stall_us} {window_us}' refused: {e.strerror or e}"
    return fd


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd's counter (0 if nothing was signalled)."""
    try:
        return os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return 0


class Waiter:
    """An epoll set the watching thread blocks on, with a poke eventfd other threads write to wake it."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.poke_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.poke_fd, select.EPOLLIN)

    def add(self, fd: int, *, priority: bool = False) -> None:
        """Watch ``fd``: readable (an eventfd), or ``priority`` (a PSI trigger, which is always readable)."""
        self.epoll.register(fd, select.EPOLLPRI if priority else select.EPOLLIN)

    def remove(self, fd: int) -> None:
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def poke(self) -> None:
        """Wake the waiting thread (any thread may call this)."""
        try:
            os.eventfd_write(self.poke_fd, 1)
        except OSError:
            pass

    def wait(self, timeout: float | None) -> list[int]:
        """The descriptors that fired (the poke drained and left out); [] on a timeout."""
        try:
            events = self.epoll.poll(-1 if timeout is None else max(timeout, 0.0))
        except InterruptedError:
            return []
        out = []
        for fd, _ in events:
            if fd == self.poke_fd:
                drain_eventfd(fd)
            else:
                out.append(fd)
        return out

    def close(self) -> None:
        self.epoll.close()
        try:
            os.close(self.poke_fd)
        except OSError:
            pass
