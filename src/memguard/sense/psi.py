"""PSI memory pressure (``/proc/pressure/memory`` or a cgroup's ``memory.pressure``).

The file has two lines::

    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

The averages are percentages of wall time; ``total`` is the time stalled
since boot (or since the cgroup was made), in microseconds, read as seconds
for the metrics' counters. A missing file (kernel without
PSI, booted with ``psi=0``, cgroup v1) or a line that does not parse gives
:class:`Unknown` readings carrying the reason; :func:`read_pressure` never
raises.
"""

from __future__ import annotations

import re

from memguard.model import Pressure, Reading, Unknown
from memguard.sense.host import read_bytes

__all__ = ["PSI_MEMORY_PATH", "read_pressure", "parse_pressure", "parse_totals", "read_pressure_totals",
           "RecentPressure"]

PSI_MEMORY_PATH = "/proc/pressure/memory"

_LINE = re.compile(rb"^(some|full) avg10=(\d+(?:\.\d+)?) avg60=(\d+(?:\.\d+)?)", re.M)
_TOTAL = re.compile(rb"^(some|full) .*\btotal=(\d+)\s*$", re.M)


def parse_pressure(data: bytes, where: str = "pressure file") -> Pressure:
    """Pressure from the bytes of a PSI file; unparsable parts are Unknown."""
    got: dict[bytes, tuple[float, float]] = {}
    for m in _LINE.finditer(data):
        got[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    some = got.get(b"some")
    full = got.get(b"full")
    if some is None:
        u = Unknown(f"no 'some avg10=... avg60=...' line in {where}")
        s10 = s60 = u
    else:
        s10, s60 = some
    if full is None:
        u = Unknown(f"no 'full avg10=... avg60=...' line in {where}")
        f10 = f60 = u
    else:
        f10, f60 = full
    totals: dict[bytes, Reading] = {m.group(1): int(m.group(2)) / 1e6 for m in _TOTAL.finditer(data)}
    no_total = Unknown(f"no 'total=' field in {where}")
    return Pressure(s10, s60, f10, f60, totals.get(b"some", no_total), totals.get(b"full", no_total))


def read_pressure(path: str = PSI_MEMORY_PATH) -> Pressure:
    """Memory pressure from a PSI file: some/full avg10 and avg60, in percent."""
    try:
        data = read_bytes(path)
    except OSError as e:
        u = Unknown(f"{path} unreadable: {e.strerror or e}")
        return Pressure(u, u, u, u)
    return parse_pressure(data, path)


_TOTAL = re.compile(rb"^(some|full) .*?total=(\d+)", re.M)


def parse_totals(data: bytes) -> tuple[int | None, int | None]:
    """(some, full) total stall time in microseconds from the bytes of a PSI file (None where absent)."""
    got = {m.group(1): int(m.group(2)) for m in _TOTAL.finditer(data)}
    return got.get(b"some"), got.get(b"full")


def read_pressure_totals(path: str = PSI_MEMORY_PATH) -> tuple[Pressure, tuple[int | None, int | None]]:
    """:func:`read_pressure` and :func:`parse_totals` from one read of the file."""
    try:
        data = read_bytes(path)
    except OSError as e:
        u = Unknown(f"{path} unreadable: {e.strerror or e}")
        return Pressure(u, u, u, u), (None, None)
    return parse_pressure(data, path), parse_totals(data)


class RecentPressure:
    """memguard's short PSI averages (``psi.some_avg1``, ``psi.full_avg1``) from the kernel's total counters.

    The kernel's averages run over 10 s at the shortest and are updated every 2 s: a thrash shows in them
    only after several seconds. The ``total=`` counters (microseconds stalled) move at once; the share of
    wall time stalled between the newest reading and the oldest of the last :data:`WINDOW_S` is the average
    over about that long. Fed one reading per call (full ticks, and when a PSI trigger fires); not
    thread-safe (the observer's own).
    """

    #: 1 s: a thrash that began a second ago reads at its full strength, where a longer window would still
    #: average in the calm before it (measured: the probe of tests/test_last_line.py stalled for over a second
    #: with a 2 s window, not at all with 1 s).
    WINDOW_S = 1.0
    #: A share is computed over at least 0.3 s (over a millisecond it says nothing).
    MIN_SPAN_S = 0.3

    def __init__(self) -> None:
        self._history: list[tuple[float, int | None, int | None]] = []

    def add(self, now: float, totals: tuple[int | None, int | None]) -> tuple[object, object]:
        """Note a reading at ``now`` (seconds); returns (some, full) in percent over about the last second."""
        self._history.append((now, totals[0], totals[1]))
        # Keep the window, plus the newest reading before it (the base of the next share).
        while len(self._history) > 2 and now - self._history[1][0] >= self.WINDOW_S:
            self._history.pop(0)
        return self._share(1), self._share(2)

    def _share(self, index: int) -> object:
        newest = self._history[-1]
        if newest[index] is None:
            return Unknown("no total= in the PSI file")
        base = None
        for entry in self._history[:-1]:
            if newest[0] - entry[0] >= self.MIN_SPAN_S and entry[index] is not None:
                base = entry  # the oldest one in the window that is at least MIN_SPAN_S old
                break
        if base is None:
            return Unknown("not enough PSI readings yet for a 1 s average")
        span_us = (newest[0] - base[0]) * 1e6
        stalled = max(0, newest[index] - base[index])  # type: ignore[operator]
        return min(100.0, 100.0 * stalled / span_us)
