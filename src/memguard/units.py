"""Sizes, durations and percentages as users write them in YAML.

Sizes: ``512MiB``, ``8GiB``, ``1.5G`` (binary multiples: ``K``/``KiB`` = 1024,
like systemd's ``MemoryMax=``), ``500MB`` (decimal: 1000), or a bare integer of
bytes. Durations: ``100ms``, ``5s``, ``10m``, ``12h``, ``1d``; a bare number is
refused, because ``poll_interval: 1`` could mean a second or a millisecond.
Percentages: ``15%``.

Every parser raises :class:`UnitError` with a sentence saying what was
expected, which the config loader places next to the file and line, and
nothing else, whatever it is given: a number with hundreds of digits is
refused as out of range, never an OverflowError.

Bounds (each refused with a message that names it):

- a size is at most :data:`MAX_SIZE_BYTES` (1 EiB);
- a duration is at most :data:`MAX_DURATION_S` (365 days);
- a number is written in at most :data:`MAX_NUMBER_CHARS` characters.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "UnitError",
    "MAX_SIZE_BYTES",
    "MAX_DURATION_S",
    "MAX_NUMBER_CHARS",
    "MAX_PERCENT",
    "SIZE_UNITS",
    "DURATION_UNITS",
    "parse_size",
    "parse_duration",
    "parse_percent",
    "format_size",
    "format_duration",
    "duration_text",
]


class UnitError(ValueError):
    """A value that does not read as the unit it should have."""


MAX_SIZE_BYTES = 2**60
"""1 EiB, the largest size memguard accepts. Thousands of times the memory of
the largest single machines, yet far below 2**63, the ceiling of the
kernel's 64-bit cgroup counters (``memory.max``), and exact as a float, so
every size a rule compares with is a plain finite number."""

MAX_DURATION_S = 365 * 86400.0
"""365 days, the longest duration memguard accepts. Longer than any worker
runs between two reboots of its machine, yet every timer stays exact to the
microsecond (a float holds ``time.monotonic()`` plus a year with room to
spare) and inside what thread and event-loop timeouts accept."""

MAX_NUMBER_CHARS = 64
"""The longest number (digits, point and unit) memguard reads. A real value
needs at most a dozen characters; a longer one is a mistake, and refusing
it up front keeps conversion cost and error messages small (Python itself
refuses to convert integers of more than 4300 digits)."""

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
    "p": 1024**5,
    "pib": 1024**5,
    "pb": 1000**5,
    "e": 1024**6,
    "eib": 1024**6,
    "eb": 1000**6,
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

SIZE_UNITS: tuple[str, ...] = tuple(u for u in _SIZE_UNITS if u)
"""The size units (lower case; units are not case-sensitive)."""
DURATION_UNITS: tuple[str, ...] = tuple(_DURATION_UNITS)
"""The duration units (lower case; units are not case-sensitive)."""

_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z%]*)\s*$", re.ASCII)

SIZE_EXPECTED = "a size such as 512MiB, 8GiB or a number of bytes"
DURATION_EXPECTED = "a duration such as 100ms, 5s, 10m or 12h"
PERCENT_EXPECTED = "a percentage such as 15%"

MAX_PERCENT = 10000.0
"""The largest percentage memguard reads (100 times the base): a worker may
be allowed past 100 % of its limit for a moment, never by a factor of 100."""


def _shown(value: object) -> str:
    """``value`` for a message: quoted, and cut short when long (repr of a huge int would raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_NUMBER_CHARS:
        return f"a number of more than {MAX_NUMBER_CHARS} digits"
    if not isinstance(value, str):
        return repr(value)
    if len(value) <= MAX_NUMBER_CHARS:
        return repr(value)
    return f"{value[:24]!r}... ({len(value)} characters)"


def _number_unit(value: str, expected: str) -> tuple[float, str]:
    """Split ``"1.5GiB"`` into (1.5, "gib"); raise UnitError for anything else."""
    if len(value) > MAX_NUMBER_CHARS:
        raise UnitError(f"expected {expected}, got {_shown(value)}: longer than {MAX_NUMBER_CHARS} characters")
    m = _NUM_UNIT.match(value)
    if not m:
        raise UnitError(f"expected {expected}, got {_shown(value)}")
    number = float(m.group(1))  # at most 64 characters of digits: finite (below 1e64)
    return number, m.group(2).lower()


_TOO_BIG = "expected a size of at most 1EiB (the largest memguard accepts)"


def parse_size(value: object) -> int:
    """Return a size in bytes, at most :data:`MAX_SIZE_BYTES`; ``value`` is an int (bytes) or a string with a unit."""
    if isinstance(value, bool):
        raise UnitError(f"expected {SIZE_EXPECTED}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"expected {SIZE_EXPECTED}, got a negative number")
        if value > MAX_SIZE_BYTES:
            raise UnitError(f"{_TOO_BIG}, got {_shown(value)}")
        return value
    if isinstance(value, float):
        raise UnitError(f"expected {SIZE_EXPECTED}, got the bare number {value!r} (add a unit)")
    if not isinstance(value, str):
        raise UnitError(f"expected {SIZE_EXPECTED}, got {type(value).__name__}")
    number, unit = _number_unit(value, SIZE_EXPECTED)
    if unit not in _SIZE_UNITS:
        raise UnitError(f"expected {SIZE_EXPECTED}, got {_shown(value)}")
    size = number * _SIZE_UNITS[unit]
    if size > MAX_SIZE_BYTES:
        raise UnitError(f"{_TOO_BIG}, got {_shown(value)}")
    return int(round(size))


def parse_duration(value: object) -> float:
    """Return a duration in seconds; ``value`` must carry a unit."""
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise UnitError(
                f"expected {DURATION_EXPECTED}, got the bare number {_shown(value)} (add a unit: s, ms, m, h)"
            )
        raise UnitError(f"expected {DURATION_EXPECTED}, got {type(value).__name__}")
    number, unit = _number_unit(value, DURATION_EXPECTED)
    if unit not in _DURATION_UNITS:
        raise UnitError(f"expected {DURATION_EXPECTED}, got {_shown(value)}")
    seconds = number * _DURATION_UNITS[unit]
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise UnitError(f"expected a duration of at most 365d (the longest memguard accepts), got {_shown(value)}")
    return seconds


def parse_percent(value: object) -> float:
    """Return a percentage as a number 0..100 (``"15%"`` -> 15.0)."""
    if not isinstance(value, str):
        raise UnitError(f"expected {PERCENT_EXPECTED}, got {_shown(value)}")
    pct, unit = _number_unit(value, PERCENT_EXPECTED)
    if unit != "%":
        raise UnitError(f"expected {PERCENT_EXPECTED}, got {_shown(value)}")
    if pct > MAX_PERCENT:
        raise UnitError(f"expected {PERCENT_EXPECTED}, got an implausible {_shown(value)}")
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


def duration_text(seconds: float) -> str:
    """A duration as :func:`parse_duration` reads it: ``1036800s``, ``0.5s``, never an exponent.

    Exact for every duration of a millisecond or more (the digits of
    ``repr``); below that, to the nanosecond. For expression text built
    from a number (``f"worker.age > {duration_text(s)}"``): ``f"{s:g}s"``
    gives ``1.0368e+06s`` for 12 days, which is no duration.
    """
    from decimal import Decimal

    text = format(Decimal(repr(float(seconds))), "f")
    if len(text) > 30:
        text = f"{float(seconds):.9f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}s"
