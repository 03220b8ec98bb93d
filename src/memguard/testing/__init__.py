"""Test doubles shipped as public API (in the spirit of ``structlog.testing``).

Nothing in the daemon imports this package; tests and demos do:

- :mod:`memguard.testing.nvml`: :class:`~memguard.testing.nvml.FakeNvml`, a
  scriptable stand-in for the ``pynvml`` module (the hardware boundary).
"""
