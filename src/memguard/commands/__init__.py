"""Subcommands of ``memguard`` that are not the daemon: ``install``, ``events``, ``diagnose``."""
