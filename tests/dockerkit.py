"""A private dockerd for tests, and an image made without any registry.

:func:`start_dockerd` runs the Debian package's ``dockerd`` with everything
in a temporary directory and no effect on the machine's network:

    dockerd --iptables=false --ip-masq=false --bridge=none
            --data-root <tmp>/data --exec-root <tmp>/exec --pidfile <tmp>/dockerd.pid
            -H unix://<tmp>/docker.sock

(it starts its own containerd below ``--exec-root``; containers get no
network but loopback). The image ``memguard-mini:1`` is ``docker import``
of a root filesystem holding the static busybox of the ``busybox-static``
package and its applet links, with ``PATH=/bin``. :meth:`Dockerd.stop`
removes every container, stops dockerd (SIGTERM to the pid it was started
as, SIGKILL after a deadline), unmounts what is left below the temporary
directory and removes it.

What it needs, checked in order, each a skip with the reason when absent:
root, ``dockerd`` (``apt-get install docker.io``), a static busybox
(``apt-get install busybox-static``), and a dockerd that answers within
its start deadline (cgroup v1 memory or cgroup v2, overlayfs on the
temporary directory's filesystem). The CLI used is the ``docker`` that
came with dockerd (a newer client elsewhere on PATH works too, but the
package's one matches its daemon).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from memguard.sense.containers import DockerClient

IMAGE = "memguard-mini:1"
START_DEADLINE_S = 60.0  # dockerd + containerd start in ~1 s here; a loaded CI machine gets slack
STOP_DEADLINE_S = 20.0


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP): it runs in an empty rootfs."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return False
            little = head[5] == 1
            order = "little" if little else "big"
            phoff = int.from_bytes(head[32:40], order)
            phentsize = int.from_bytes(head[54:56], order)
            phnum = int.from_bytes(head[56:58], order)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        for i in range(phnum):
            if int.from_bytes(table[i * phentsize:i * phentsize + 4], order) == 3:  # PT_INTERP
                return False
        return True
    except OSError:
        return False


def find_static_busybox() -> str | None:
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if cand and os.path.exists(cand) and _is_static_elf(os.path.realpath(cand)):
            return os.path.realpath(cand)
    return None


def _wait_pid(pid: int, timeout: float) -> bool:
    """Wait on the process's pidfd until it exits or the deadline; True if it exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], max(0.0, timeout))[0])
    finally:
        os.close(fd)


class Dockerd:
    """A running private dockerd: its socket, its CLI, an API client."""

    def __init__(self, root: Path, proc: subprocess.Popen, cli: str) -> None:
        self.root = root
        self.proc = proc
        self.sock = str(root / "docker.sock")
        self.cli = cli
        self.log = root / "dockerd.log"
        self.client = DockerClient(self.sock, timeout_s=10.0)

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.root / "cli-config")
        res = subprocess.run([self.cli, "-H", f"unix://{self.sock}", *args], capture_output=True, timeout=timeout,
                             input=input, env=env)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({res.returncode}): "
                                 f"{res.stderr.decode(errors='replace')[-2000:]}")
        return res

    def tail_log(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def import_busybox_image(self, busybox: str, tag: str = IMAGE) -> str:
        """``docker import`` of a busybox-only root filesystem, PATH=/bin; returns the tag."""
        rootfs = self.root / "rootfs"
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, rootfs / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            if a != "busybox" and "/" not in a:
                link = rootfs / "bin" / a
                if not link.exists():
                    link.symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
        self.docker("import", "--change", "ENV PATH=/bin", "-", tag, input=tar)
        return tag

    def stop(self) -> None:
        try:
            ids = self.docker("ps", "-aq", check=False, timeout=20).stdout.decode().split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if not _wait_pid(self.proc.pid, STOP_DEADLINE_S):
                self.proc.kill()
        try:
            self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pass
        _unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def _unmount_below(root: Path) -> None:
    prefix = str(root) + "/"
    try:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return
    for mp in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def start_dockerd() -> Dockerd:
    """Start a private dockerd with the busybox image imported, or skip saying what is missing."""
    if os.geteuid() != 0:
        pytest.skip("a private dockerd needs root")
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
    if dockerd is None:
        pytest.skip("dockerd not installed (Debian: apt-get install docker.io)")
    cli = os.path.join(os.path.dirname(os.path.realpath(dockerd)).replace("/sbin", "/bin"), "docker")
    if not os.path.exists(cli):
        cli = shutil.which("docker") or ""
    if not cli:
        pytest.skip("the docker CLI is not installed (Debian: apt-get install docker.io)")
    busybox = find_static_busybox()
    if busybox is None:
        pytest.skip("no static busybox for the test image (Debian: apt-get install busybox-static)")
    # Short paths: unix sockets below exec-root must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mg-dockerd-", dir="/tmp"))
    log = open(root / "dockerd.log", "wb")
    argv = [dockerd, "--iptables=false", "--ip-masq=false", "--bridge=none",
            "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{root / 'docker.sock'}"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    d = Dockerd(root, proc, cli)
    deadline = time.monotonic() + START_DEADLINE_S
    ready = False
    probe = DockerClient(d.sock, timeout_s=2.0)
    while time.monotonic() < deadline:
        if probe.ping() is True:
            ready = True
            break
        # Wait on dockerd's own exit (a pidfd) for a moment before asking again: a dead daemon ends the wait.
        if _wait_pid(proc.pid, 0.1):
            break
    if not ready:
        why = d.tail_log(15)
        d.stop()
        pytest.skip(f"the private dockerd did not come up within {START_DEADLINE_S:.0f}s: {why[-1500:]}")
    try:
        d.import_busybox_image(busybox)
    except Exception as e:
        d.stop()
        pytest.skip(f"could not build the busybox image: {e}")
    return d
