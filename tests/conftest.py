"""Suite-wide settings.

Thread ownership checks are on for the whole suite, and for every daemon
it starts (they inherit the environment): a loop-owned object touched from
another thread raises instead of racing (see memguard.threads).
"""

import os

os.environ["MEMGUARD_CHECK_THREADS"] = "1"

import memguard.threads  # noqa: E402

assert memguard.threads.CHECK, "memguard was imported before the thread checks were switched on"
