"""Where memguard's runtime directory and control socket live: one set of rules for the daemon and its clients.

The daemon listens on ``<runtime_dir>/control.sock``. Its runtime directory
(admission files, the control socket) is, in this order:

1. ``--runtime-dir DIR`` on the command line;
2. ``runtime_dir:`` in the daemon file;
3. the default for the user it runs as (:func:`default_runtime_dir`):
   ``/run/memguard`` for root, ``$XDG_RUNTIME_DIR/memguard`` for a user with
   a login session (systemd-logind makes ``/run/user/UID``), else
   ``/tmp/memguard-UID``.

A client (``memguard ctl``, :func:`memguard.client.admin_request`) finds
the socket by the same rules, seen from the other side
(:func:`client_socket_candidates`):

1. ``--socket PATH`` on the command line;
2. ``$MEMGUARD_SOCKET`` (memguard sets it in every worker's environment);
3. ``control.sock`` in the default runtime directory of the user it runs as,
   then in the other places that user's daemon may have chosen
   (``/run/user/UID/memguard`` when ``$XDG_RUNTIME_DIR`` is not set in this
   shell, ``/tmp/memguard-UID``);
4. ``/run/memguard/control.sock``, root's daemon (the service).

The first socket of step 3 and 4 that exists is used, so a user's own
``memguard daemon`` and ``memguard ctl`` find each other without flags,
and a user's ``memguard ctl`` still reaches the system service when it
runs no daemon of its own. A directory under ``/tmp`` is trusted only when
it belongs to that user (or root) and nobody else may write to it: anyone
can create ``/tmp/memguard-UID`` first.

The daemon does not read ``$MEMGUARD_SOCKET``: a daemon started from inside
a worker (``memguard run`` in a worker, a test) would otherwise take over
the socket of the memguard that runs it.

Standard library only: :mod:`memguard.client` imports this module, and
workers import the client.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping

__all__ = [
    "ENV_SOCKET",
    "SOCKET_NAME",
    "SYSTEM_RUNTIME_DIR",
    "SYSTEM_SOCKET",
    "default_runtime_dir",
    "daemon_runtime_dir",
    "socket_path",
    "client_socket_candidates",
    "find_socket",
]

ENV_SOCKET = "MEMGUARD_SOCKET"
SOCKET_NAME = "control.sock"
#: root's runtime directory: /run is a tmpfs emptied at boot, as a socket and admission files should be.
SYSTEM_RUNTIME_DIR = "/run/memguard"
SYSTEM_SOCKET = os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)


def _tmp_dir(uid: int) -> str:
    return f"/tmp/memguard-{uid}"


def default_runtime_dir(uid: int | None = None, env: Mapping[str, str] | None = None,
                        run_exists: bool | None = None) -> str:
    """The runtime directory memguard uses when neither ``--runtime-dir`` nor ``runtime_dir:`` says one:
    ``/run/memguard`` for root (where /run exists), ``$XDG_RUNTIME_DIR/memguard`` for a user with a login
    session, else ``/tmp/memguard-UID``."""
    uid = os.geteuid() if uid is None else uid
    env = os.environ if env is None else env
    if run_exists is None:
        run_exists = os.path.isdir("/run")
    if uid == 0 and run_exists:
        return SYSTEM_RUNTIME_DIR
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "memguard")
    return _tmp_dir(uid)


def daemon_runtime_dir(flag: str | None = None, configured: str | None = None, *, uid: int | None = None,
                       env: Mapping[str, str] | None = None) -> str:
    """The daemon's runtime directory: ``--runtime-dir`` > ``runtime_dir:`` > :func:`default_runtime_dir`."""
    return flag or configured or default_runtime_dir(uid, env)


def socket_path(runtime_dir: str) -> str:
    """The control socket of a daemon whose runtime directory is ``runtime_dir``."""
    return os.path.join(runtime_dir, SOCKET_NAME)


def _trusted(directory: str, uid: int) -> bool:
    """``directory`` belongs to ``uid`` or root and no one else may write to it (checked for the shared /tmp)."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid in (uid, 0)
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def client_socket_candidates(flag: str | None = None, *, uid: int | None = None,
                             env: Mapping[str, str] | None = None) -> list[str]:
    """The sockets a client tries, in order (see the module docstring). An explicit ``flag`` or
    ``$MEMGUARD_SOCKET`` is the only candidate: asked for by name, nothing else is tried."""
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    if flag:
        return [flag]
    if env.get(ENV_SOCKET):
        return [env[ENV_SOCKET]]
    dirs = [default_runtime_dir(uid, env)]
    if uid != 0:
        dirs += [os.path.join(f"/run/user/{uid}", "memguard"), _tmp_dir(uid)]
    dirs.append(SYSTEM_RUNTIME_DIR)
    out: list[str] = []
    for d in dirs:
        path = socket_path(d)
        if path not in out:
            out.append(path)
    return out


def find_socket(flag: str | None = None, *, uid: int | None = None,
                env: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """``(path, tried)``: the socket a client should talk to, and every candidate considered.

    The first candidate that exists as a socket (in a trusted directory, for
    the ones under /tmp) wins; when none does, the first candidate is
    returned, so the error names the place this user's daemon would use.
    """
    uid = os.geteuid() if uid is None else uid
    candidates = client_socket_candidates(flag, uid=uid, env=env)
    if len(candidates) == 1:
        return candidates[0], candidates
    for path in candidates:
        directory = os.path.dirname(path)
        if directory.startswith("/tmp/") and not _trusted(directory, uid):
            continue
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path, candidates
        except OSError:
            continue
    return candidates[0], candidates
