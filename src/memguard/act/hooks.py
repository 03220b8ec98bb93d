"""Running an alert's exec hook: a command with the event on stdin, cut off at its timeout.

Called in a thread of the alert component's own pool (never on the loop):
the hook is a child of that thread, in a session of its own, so the
daemon's orphan sweep (which reaps zombies of worker trees and of the
thread that receives orphans) leaves it to this function. A hook that
outlives its timeout is killed with its whole process group (through
:mod:`memguard.act.process`, identity-checked), then reaped.
"""

from __future__ import annotations

import os
import signal as _signal
import subprocess
from dataclasses import dataclass
from typing import Mapping

from .process import signal_group

__all__ = ["run_hook", "hook_environment", "ExecResult"]

#: The hook's standard error kept for the log: its last 300 characters.
STDERR_TAIL = 300
#: After SIGKILL, 2 s for the kernel to end the group before the pipes are abandoned.
_REAP_S = 2.0
#: memguard's own variables are never passed on (a hook is no worker and has no token).
_DROP = ("MEMGUARD_SOCKET", "MEMGUARD_TOKEN", "MEMGUARD_WORKER", "MEMGUARD_ADMISSION_FILE", "NOTIFY_SOCKET",
         "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(frozen=True)
class ExecResult:
    """What became of one run of an exec hook (``returncode`` None: it did not finish)."""

    returncode: int | None = None
    timed_out: bool = False
    error: str = ""  # could not be started (no such file, permission denied)
    stderr: str = ""  # the end of its standard error, on one line


def hook_environment(event_env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without memguard's and systemd's own variables, plus the event's."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP}
    env.update(event_env)
    return env


def _tail(data: bytes | None) -> str:
    text = (data or b"").decode("utf-8", "replace").strip()
    return text[-STDERR_TAIL:].replace("\n", " | ")


def run_hook(argv: tuple[str, ...], event_env: Mapping[str, str], stdin: bytes, timeout_s: float) -> ExecResult:
    """Run ``argv`` with ``stdin`` and the event's variables; at most ``timeout_s`` seconds."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=hook_environment(event_env), close_fds=True,
                                start_new_session=True, cwd="/")
    except OSError as e:
        return ExecResult(error=f"cannot run {argv[0]}: {e.strerror or e}")
    try:
        _, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, None, _signal.SIGKILL)  # its leader is our unreaped child: the number is ours
        try:
            _, err = proc.communicate(timeout=_REAP_S)
        except subprocess.TimeoutExpired:  # a descendant left the group holding stderr open
            for pipe in (proc.stdin, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
            err = b""
        return ExecResult(timed_out=True, stderr=_tail(err))
    except OSError as e:  # EPIPE: the hook did not read its stdin; it may still have done its job
        proc.wait()
        return ExecResult(returncode=proc.returncode, stderr=f"(stdin not read: {e.strerror or e})")
    return ExecResult(returncode=proc.returncode, stderr=_tail(err))
