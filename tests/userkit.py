"""Running memguard as an unprivileged user in tests: a uid of its own, this interpreter still reachable.

The tests run as root; ``as_user(argv, uid)`` wraps a command so that it
runs as ``uid:uid`` with no supplementary groups (``setpriv``). The uid
needs no entry in /etc/passwd: a fresh uid per test keeps its default
runtime directory (``/tmp/memguard-UID``) its own even when several test
runs share the machine.

The interpreter may live where an unprivileged user cannot go (pyenv
under ``/root``, mode 700). The command then starts in a private mount
namespace (``unshare --mount``) where each such directory is covered by an
empty tmpfs of mode 755 and only the entries that lead to the interpreter
are bound back in: the user reaches Python and nothing else of it. The
host's mounts are untouched.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

from daemonkit import REPO

__all__ = ["free_uid", "as_user", "why_no_user_switch", "stash_root"]


def why_no_user_switch() -> str | None:
    """Why a command cannot be run as another user here, or None."""
    if os.geteuid() != 0:
        return "switching to another user needs root"
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def free_uid() -> int:
    """A uid no account uses and no process or /tmp/memguard-UID directory of this machine has."""
    import pwd

    taken = {p.pw_uid for p in pwd.getpwall()}
    rng = random.Random()
    for _ in range(1000):
        uid = rng.randrange(200_000, 2_000_000)
        if uid not in taken and not os.path.exists(f"/tmp/memguard-{uid}"):
            return uid
    raise RuntimeError("no free uid found")


def _needed() -> list[Path]:
    """What the user must reach: the interpreter and its standard library, the environment, the checkout."""
    paths = {Path(sys.executable).resolve().parent, Path(sys.prefix), Path(sys.base_prefix).resolve(),
             Path(sysconfig.get_paths()["stdlib"]).resolve(), REPO}
    return sorted(paths)


def _blocked() -> dict[Path, set[str]]:
    """Directories on the way to what is needed that others may not traverse, each with the entries in it
    that lead on."""
    out: dict[Path, set[str]] = {}
    for target in _needed():
        parts = target.parts
        for i in range(1, len(parts)):
            d = Path(*parts[:i])
            try:
                mode = os.stat(d).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH:
                out.setdefault(d, set()).add(parts[i])
                break  # what lies below is bound back whole
    return out


def stash_root() -> Path:
    """Where the mount points used to bind entries back live: inside the checkout, visible from the
    namespaced systemd of tests/test_systemd.py too (its /tmp is private)."""
    return REPO / "build" / "userkit"


def as_user(argv: list[str], uid: int, gid: int | None = None, groups: list[int] | None = None) -> list[str]:
    """``argv`` run as ``uid`` (and group ``gid``, default the same number), with the supplementary
    ``groups`` (default none), this interpreter reachable."""
    gid = uid if gid is None else gid
    group_flag = f"--groups {','.join(str(g) for g in groups)}" if groups else "--clear-groups"
    blocked = _blocked()
    lines = ["set -e"]
    if blocked:
        lines.append(f'stash=$(mktemp -d {shlex.quote(str(stash_root()))}/stash-XXXXXX)')
        for n, (d, entries) in enumerate(sorted(blocked.items())):
            for entry in sorted(entries):
                src = shlex.quote(str(d / entry))
                lines.append(f'mkdir -p "$stash/{n}/{entry}" && mount --bind {src} "$stash/{n}/{entry}"')
            lines.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(d))}")
            for entry in sorted(entries):
                dst = shlex.quote(str(d / entry))
                lines.append(f'mkdir -p {dst} && mount --bind "$stash/{n}/{entry}" {dst}')
    lines.append(f'exec setpriv --reuid {uid} --regid {gid} {group_flag} -- "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh", *argv]


def cleanup_stash() -> None:
    """Remove the (empty, on the host) mount points left by as_user."""
    root = stash_root()
    if not root.is_dir():
        return
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except OSError:
                pass


@pytest.fixture
def user_switch() -> None:
    why = why_no_user_switch()
    if why:
        pytest.skip(why)
    stash_root().mkdir(parents=True, exist_ok=True)
    yield
    cleanup_stash()
