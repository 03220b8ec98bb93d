"""sense/: read the machine into immutable values (memguard.model). Only reads; never logs.

- :mod:`~memguard.sense.host`: the host (``/proc/meminfo``, ``/proc/vmstat``).
- :mod:`~memguard.sense.cgroup`: memguard's memory cgroup (v1 or v2) and the scope choice.
- :mod:`~memguard.sense.psi`: PSI memory pressure.
- :mod:`~memguard.sense.procs`: per-worker process trees, shared pages counted once.
"""

from memguard.sense.cgroup import (
    CgroupError,
    CgroupFigures,
    MemoryCgroup,
    ScopeError,
    ScopeReader,
    cgroup_scope,
    choose_scope,
    create_child,
    find_own_cgroup,
)
from memguard.sense.host import host_scope, read_meminfo
from memguard.sense.procs import TreeTracker, process_start_time
from memguard.sense.psi import read_pressure

__all__ = [
    "CgroupError",
    "CgroupFigures",
    "MemoryCgroup",
    "ScopeError",
    "ScopeReader",
    "TreeTracker",
    "cgroup_scope",
    "choose_scope",
    "create_child",
    "find_own_cgroup",
    "host_scope",
    "process_start_time",
    "read_meminfo",
    "read_pressure",
]
