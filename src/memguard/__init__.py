"""memguard: a memory supervisor for ML machines.

Importing the package stays cheap and standard-library only, so worker code
can ``import memguard`` in any environment.
"""

__version__ = "0.1.0"

_CLIENT_NAMES = ("trial", "heartbeat", "on_reclaim", "budget", "under_memguard", "worker_name", "admission",
                 "AdmissionTimeout", "MemguardError")


def __getattr__(name: str):
    """``memguard.trial``, ``memguard.heartbeat``... come from :mod:`memguard.client`, loaded on first use."""
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'memguard' has no attribute {name!r}")


__all__ = ["__version__", *_CLIENT_NAMES]
