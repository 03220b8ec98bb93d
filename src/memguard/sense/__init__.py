"""sense/: read the machine into immutable values (memguard.model). Only reads; never logs.

- :mod:`~memguard.sense.observer`: builds each tick's Observation from the readers below.
- :mod:`~memguard.sense.host`: the host (``/proc/meminfo``, ``/proc/vmstat``) and file-reading helpers.
- :mod:`~memguard.sense.cgroup`: memory cgroups (v1 or v2): figures, detection, the scope choice.
- :mod:`~memguard.sense.psi`: PSI memory pressure.
- :mod:`~memguard.sense.procs`: per-worker process trees, shared pages counted once.
- :mod:`~memguard.sense.procstat`: a process's identity and state from ``/proc/<pid>/stat``.
- :mod:`~memguard.sense.gpu`: GPUs through one NVML choke point, and GPU memory per worker.
- :mod:`~memguard.sense.unmanaged`: processes memguard does not own, for opt-in victims.
"""
