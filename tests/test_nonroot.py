"""The in-process daemon tests run as an unprivileged user too: the pump needs no root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _interpreter_for_nobody() -> str | None:
    """An interpreter of this Python version that user nobody may run (the venv's may live under /root)."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(want), f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if candidate and os.path.exists(candidate):
            res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", candidate,
                                  "-c", "pass"], capture_output=True)
            if res.returncode == 0:
                return candidate
    return None


@pytest.mark.root
def test_in_process_daemon_tests_pass_as_nobody():
    """tests/test_pump.py (the whole daemon over fake ports in virtual time) passes when run by user nobody,
    with the thread-ownership checks on."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the tests as another user")
    python = _interpreter_for_nobody()
    if python is None:
        pytest.skip("no interpreter of this Python version that user nobody may run")
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="memguard-nobody-"))  # pytest's own tmp dirs are root-only
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(REPO / "src"), site]),
           "MEMGUARD_CHECK_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path)}
    os.chmod(tmp_path, 0o777)
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c",
                            "import memguard.daemon, pytest, hypothesis"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import memguard and pytest here: {probe.stderr.strip()[-300:]}")
    res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-m", "pytest",
                          "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), str(REPO / "tests" / "test_pump.py")],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-500:]
