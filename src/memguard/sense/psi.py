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

__all__ = ["PSI_MEMORY_PATH", "read_pressure", "parse_pressure"]

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
