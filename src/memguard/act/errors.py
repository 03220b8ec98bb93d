"""Errors raised by the actor room."""

from __future__ import annotations

__all__ = ["SpawnError"]


class SpawnError(Exception):
    """A worker could not be started; ``str(error)`` says why, for a person.

    The message names what was wrong: the command that was not found, the
    user or group that does not exist, the working directory that is
    missing, or the OS error that stopped the start.
    """
