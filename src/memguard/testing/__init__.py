"""Test doubles shipped as public API (in the spirit of ``structlog.testing``).

Nothing in the daemon imports this package; tests and demos do:

- :class:`~memguard.testing.clock.VirtualClock`: the daemon's clock port in virtual time;
- :class:`~memguard.testing.ports.FakeObserver`, :class:`~memguard.testing.ports.FakeEffects`,
  :class:`~memguard.testing.ports.RecordingLog`: the daemon's ports over scripted readings,
  pretend processes and a recording log, so the whole daemon runs in a test without root;
- :mod:`memguard.testing.nvml`: :class:`~memguard.testing.nvml.FakeNvml`, a scriptable
  stand-in for the ``pynvml`` module (the hardware boundary).
"""

from .clock import InlineExecutor, VirtualClock
from .ports import FakeEffects, FakeObserver, GiB, MiB, RecordingLog

__all__ = ["VirtualClock", "InlineExecutor", "FakeObserver", "FakeEffects", "RecordingLog", "GiB", "MiB"]
