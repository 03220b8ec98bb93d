"""Sizes, durations and percentages as users write them in YAML.

Sizes: ``512MiB``, ``8GiB``, ``1.5G`` (binary multiples: ``K``/``KiB`` = 1024,
like systemd's ``MemoryMax=``), ``500MB`` (decimal: 1000), or a bare integer of
bytes. Durations: ``100ms``, ``5s``, ``10m``, ``12h``, ``1d``; a bare number is
refused, because ``poll_interval: 1`` could mean a second or a millisecond.
Percentages: ``15%``.

Every parser raises :class:`UnitError` with a sentence saying what was
expected, which the config loader places next to the file and line.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "UnitError",
    "parse_size",
    "parse_duration",
    "parse_percent",
    "format_size",
    "format_duration",
]


class UnitError(ValueError):
    """A value that does not read as the unit it should have."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

_DURATION_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z%]*)\s*$")

SIZE_EXPECTED = "a size such as 512MiB, 8GiB or a number of bytes"
DURATION_EXPECTED = "a duration such as 100ms, 5s, 10m or 12h"
PERCENT_EXPECTED = "a percentage such as 15%"


def parse_size(value: object) -> int:
    """Return a size in bytes; ``value`` is an int (bytes) or a string with a unit."""
    if isinstance(value, bool):
        raise UnitError(f"expected {SIZE_EXPECTED}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"expected {SIZE_EXPECTED}, got a negative number {value}")
        return value
    if isinstance(value, float):
        raise UnitError(f"expected {SIZE_EXPECTED}, got the bare number {value!r} (add a unit)")
    if not isinstance(value, str):
        raise UnitError(f"expected {SIZE_EXPECTED}, got {type(value).__name__}")
    m = _NUM_UNIT.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UnitError(f"expected {SIZE_EXPECTED}, got {value!r}")
    number = float(m.group(1))
    return int(round(number * _SIZE_UNITS[m.group(2).lower()]))


def parse_duration(value: object) -> float:
    """Return a duration in seconds; ``value`` must carry a unit."""
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise UnitError(
                f"expected {DURATION_EXPECTED}, got the bare number {value!r} (add a unit: s, ms, m, h)"
            )
        raise UnitError(f"expected {DURATION_EXPECTED}, got {type(value).__name__}")
    m = _NUM_UNIT.match(value)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise UnitError(f"expected {DURATION_EXPECTED}, got {value!r}")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if not math.isfinite(seconds):
        raise UnitError(f"expected {DURATION_EXPECTED}, got {value!r}")
    return seconds


def parse_percent(value: object) -> float:
    """Return a percentage as a number 0..100 (``"15%"`` -> 15.0)."""
    if not isinstance(value, str):
        raise UnitError(f"expected {PERCENT_EXPECTED}, got {value!r}")
    m = _NUM_UNIT.match(value)
    if not m or m.group(2) != "%":
        raise UnitError(f"expected {PERCENT_EXPECTED}, got {value!r}")
    pct = float(m.group(1))
    if pct > 100.0 * 100:
        raise UnitError(f"expected {PERCENT_EXPECTED}, got an implausible {value!r}")
    return pct


def format_size(n: int | float) -> str:
    """Human size with binary units: ``1.5GiB``, ``300MiB``, ``512B``."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            v = n / factor
            if factor >= 1024**3 and round(v, 2) == round(v) and abs(n - round(v) * factor) >= 1024**2:
                continue  # 2047.9 MiB is not "2GiB": say it in the smaller unit
            # Two decimals for GiB and TiB: 2047.9 MiB must not read as "2GiB" next to a 2 GiB threshold.
            text = f"{v:.2f}" if factor >= 1024**3 and v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"
            text = text.rstrip("0").rstrip(".") if "." in text else text
            return f"{sign}{text}{unit}"
    return f"{sign}{int(n)}B"


def format_duration(seconds: float) -> str:
    """Human duration: ``150ms``, ``5s``, ``2m30s``, ``1h5m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}m{s}s" if s else f"{m}m"
    h, rem = divmod(int(round(seconds)), 3600)
    m = rem // 60
    return f"{h}h{m}m" if m else f"{h}h"
