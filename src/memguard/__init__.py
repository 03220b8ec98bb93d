"""memguard: a memory supervisor for ML machines.

Importing the package stays cheap and standard-library only, so worker code
can ``import memguard`` in any environment.
"""

__version__ = "0.1.0"
