"""``memguard init`` as PID 1 of a real container (commands/init.py), under a private dockerd.

A dockerd of our own (Debian's docker.io) runs for the test session with
its data and exec roots in a temporary directory, no iptables, no bridge;
the image is built without any registry: ``docker import`` of a root
filesystem made of busybox, this machine's Python interpreter and standard
library (the shared libraries they need, found with ldd), memguard's
dependencies and memguard itself. Built once per session.

The fixture here (``private_dockerd``) is deliberately minimal and named
to be swapped for a shared one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from daemonkit import REPO, make_cgroup

MiB = 1024**2
START_S = 60.0
IMAGE = "memguard-test:py"
_DEPS = ("psutil", "yaml", "_yaml", "structlog", "sdnotify", "pynvml.py", "typing_extensions.py")
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "pydoc_data"}


class Docker:
    """The ``docker`` client bound to one daemon socket."""

    def __init__(self, host: str) -> None:
        self.host = host

    def __call__(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(["docker", "-H", self.host, *args], capture_output=True, text=True, timeout=timeout,
                             **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.returncode}: {out.stderr.strip()}")
        return out


def _wait_socket(proc: subprocess.Popen, sock: Path, log: Path) -> None:
    """dockerd is up once its socket answers a ping (watched through its log growing, with a deadline)."""
    deadline = time.monotonic() + START_S
    client = Docker(f"unix://{sock}")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dockerd exited {proc.returncode}: {log.read_text()[-2000:]}")
        if sock.exists() and client("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode == 0:
            return
        try:
            proc.wait(0.2)  # returns early only if dockerd died
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"dockerd did not answer within {START_S}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def private_dockerd():
    """A dockerd of our own for the session: ``Docker`` client bound to it. Skips where it cannot run."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a private dockerd")
    for tool in ("dockerd", "docker"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package docker.io; .ci/run installs it)")
    root = Path(tempfile.mkdtemp(prefix="mgd-"))  # short: containerd's socket paths must fit 108 bytes
    sock = root / "docker.sock"
    log = root / "dockerd.log"
    argv = ["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none", "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{sock}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_socket(proc, sock, log)
        yield Docker(f"unix://{sock}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _libraries(files: list[str]) -> set[str]:
    """The shared libraries ``files`` load (ldd), and the loader."""
    out = subprocess.run(["ldd", *files], capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            libs.add(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):  # the loader, not a file header
            libs.add(parts[0])
    return libs


@pytest.fixture(scope="session")
def python_image(private_dockerd, tmp_path_factory):
    """An image with busybox, this machine's Python and memguard, built by docker import (no registry)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (Debian package busybox-static; .ci/run installs it)")
    exe = os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
    stdlib = Path(sysconfig.get_paths()["stdlib"])  # the base interpreter's, not the venv's
    stage = tmp_path_factory.mktemp("rootfs")
    for d in ("bin", "usr/local/bin", "opt/memguard/lib", "tmp", "proc", "sys", "dev", "etc"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, stage / "bin" / "busybox")
    for applet in ("sh", "cat", "sleep", "ls", "ps", "echo", "kill", "true"):
        os.symlink("busybox", stage / "bin" / applet)
    (stage / "tmp").chmod(0o1777)
    (stage / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.symlink(exe, stage / "usr" / "local" / "bin" / "python3")
    site = Path(sysconfig.get_paths()["purelib"])
    venv_site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for name in _DEPS:
        src = venv_site / name if (venv_site / name).exists() else site / name
        if not src.exists():
            pytest.skip(f"memguard's dependency {name} is not installed here")
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, stage / "opt" / "memguard" / "lib" / name)
    shutil.copytree(REPO / "src" / "memguard", stage / "opt" / "memguard" / "lib" / "memguard",
                    ignore=shutil.ignore_patterns("__pycache__"))
    launcher = stage / "usr" / "local" / "bin" / "memguard"
    launcher.write_text("#!/usr/local/bin/python3\nimport sys\nfrom memguard.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    (stage / "leak.py").write_text(textwrap.dedent("""\
        import signal, sys, time
        def bye(*_):
            print("leak: SIGTERM received, saving and exiting", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        held = []
        while True:
            chunk = bytearray(4 << 20)
            for i in range(0, len(chunk), 4096):
                chunk[i] = 1
            held.append(chunk)
            time.sleep(0.02)
        """))
    dynload = [str(p) for p in (stdlib / "lib-dynload").glob("*.so") if "tkinter" not in p.name]
    extensions = [str(p) for p in (stage / "opt").rglob("*.so")]
    libs = _libraries([exe, *dynload, *extensions])
    python_parts = [exe, str(stdlib)] + sorted(libs)
    excludes = [f"--exclude={str(stdlib / d).lstrip('/')}" for d in _STDLIB_SKIP]
    excludes.append("--exclude=*/lib-dynload/_tkinter*")
    tar = subprocess.Popen(["tar", "-c", "--dereference", *excludes, "-C", str(stage), ".", "-C", "/",
                            *[p.lstrip("/") for p in python_parts]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imp = private_dockerd("import", "-c", "ENV PATH=/usr/local/bin:/bin", "-c", "ENV PYTHONPATH=/opt/memguard/lib",
                          "-c", "ENV PYTHONDONTWRITEBYTECODE=1", "-", IMAGE, stdin=tar.stdout, timeout=300)
    tar.stdout.close()
    assert tar.wait(60) == 0, tar.stderr.read().decode()
    assert imp.returncode == 0
    smoke = private_dockerd("run", "--rm", "--network", "none", IMAGE, "memguard", "--version", check=False)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    return IMAGE


def _run_container(docker: Docker, image: str, name: str, *args: str, timeout: float = 120) -> dict:
    docker("run", "-d", "--name", name, "--network", "none", *args, timeout=60)
    docker("wait", name, timeout=timeout)
    return json.loads(docker("inspect", name).stdout)[0]


def test_entrypoint_stops_a_leak_before_the_container_limit(private_dockerd, python_image, tmp_path):
    """memguard init as PID 1 of a container run with --memory 256m: the leaking command is stopped gracefully
    before the limit (its SIGTERM handler runs), the kernel OOM killer never fires (OOMKilled false), the
    container exits with a status memguard chose (1: stopped for memory), and /dev/termination-log and stderr
    say why, with the rule and the numbers."""
    term = tmp_path / "termination-log"
    term.write_text("")
    name = f"mg-{uuid.uuid4().hex[:8]}"
    try:
        info = _run_container(private_dockerd, python_image, name, "--memory", "256m", "--memory-swap", "256m",
                              "-v", f"{term}:/dev/termination-log", python_image,
                              "memguard", "init", "--", "python3", "/leak.py")
        logs = private_dockerd("logs", name)
        state = info["State"]
        assert state["OOMKilled"] is False, logs.stdout + logs.stderr
        assert state["ExitCode"] == 1, logs.stdout + logs.stderr
        assert "leak: SIGTERM received, saving and exiting" in logs.stdout
        message = term.read_text()
        assert message.startswith("memguard stopped python3 /leak.py before the container's memory limit (256MiB): "
                                  "terminate (SIGTERM): rule stop-at: memory.available"), message
        assert "< 10%" in message and "exit code 1" in message
        assert "memguard init: memguard stopped python3 /leak.py" in logs.stderr
    finally:
        private_dockerd("rm", "-f", name, check=False)


def test_entrypoint_passes_exit_codes_reaps_orphans_and_forwards_signals(private_dockerd, python_image):
    """Like tini: the command's exit status is the container's; orphans the command leaves are reaped by memguard
    (the command waits until its orphans' /proc entries are gone, which a zombie's never is, then exits 7); and
    docker stop's SIGTERM reaches the command through memguard (exit 143), where a PID 1 without a handler
    would ignore it and be SIGKILLed by docker (137)."""
    a, b = f"mg-{uuid.uuid4().hex[:8]}", f"mg-{uuid.uuid4().hex[:8]}"
    orphans = ("(sleep 0.1 & echo $! > /tmp/o1); (sleep 0.1 & echo $! > /tmp/o2); "
               "while [ -e /proc/$(cat /tmp/o1) ] || [ -e /proc/$(cat /tmp/o2) ]; do sleep 0.05; done; exit 7")
    try:
        info = _run_container(private_dockerd, python_image, a, "--memory", "256m", python_image,
                              "memguard", "init", "-q", "--", "sh", "-c", orphans, timeout=60)
        assert info["State"]["ExitCode"] == 7 and info["State"]["OOMKilled"] is False
        private_dockerd("run", "-d", "--name", b, "--network", "none", "--memory", "256m", python_image,
                        "memguard", "init", "-q", "--", "sleep", "3600")
        # memguard handles signals before it starts the command: wait (in the container) for the command
        private_dockerd("exec", b, "sh", "-c", "until grep -qx sleep /proc/[0-9]*/comm; do sleep 0.05; done",
                        timeout=60)
        private_dockerd("stop", "-t", "30", b, timeout=60)
        info = json.loads(private_dockerd("inspect", b).stdout)[0]
        assert info["State"]["ExitCode"] == 143
    finally:
        private_dockerd("rm", "-f", a, b, check=False)


def test_init_outside_a_container_guards_a_memory_cgroup(tmp_path):
    """The same command without docker, in a memory cgroup of 256 MiB: the leak is stopped at --stop-at, the
    cgroup's OOM kill counter stays 0, the exit code is 1 and the termination file names the rule."""
    cg = make_cgroup(256 * MiB)
    leak = tmp_path / "leak.py"
    leak.write_text("import time\nheld = []\nwhile True:\n    held.append(bytearray(4 << 20)); "
                    "[held[-1].__setitem__(i, 1) for i in range(0, 4 << 20, 4096)]; time.sleep(0.02)\n")
    term = tmp_path / "term"
    try:
        out = subprocess.run(cg.wrap([sys.executable, "-m", "memguard.cli", "init", "--termination-log", str(term),
                                      "--grace", "2s", "--", sys.executable, str(leak)]),
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert cg.oom_kills() == 0, out.stderr
        assert out.returncode == 143, out.stderr  # no SIGTERM handler: it died of SIGTERM
        assert "rule stop-at: memory.available" in term.read_text()
    finally:
        cg.cleanup()


def test_init_gives_the_command_the_containers_standard_streams():
    """`docker run -i image memguard init -- CMD` as a pipe would drive it: the command reads init's standard
    input, and its output (binary, no final newline) comes out of init unchanged."""
    data = b"row\0\xff\r\n" * 5000 + b"last"
    out = subprocess.run([sys.executable, "-m", "memguard.cli", "init", "-q", "--", sys.executable, "-c",
                          "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                         input=data, capture_output=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


def test_shipped_examples_and_doc_configs_are_valid(tmp_path):
    """examples/container: the Dockerfile's ENTRYPOINT + CMD and the pod's command + args are command lines
    memguard accepts, and the pod sets the memory limit memguard guards; the configuration blocks users copy
    from docs/alerts.md and docs/fleet.md pass `memguard check`."""
    import re

    import yaml

    from memguard.cli import build_parser
    from memguard.config import check_path

    docker = (REPO / "examples" / "container" / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", docker, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M).group(1))
    args = build_parser().parse_args(entry[1:] + cmd)
    assert args.command == "init" and args.cmd[-2:] == ["python3", "train.py"] and args.stop_at == 90.0
    pod = yaml.safe_load((REPO / "examples" / "container" / "pod.yaml").read_text())
    c = pod["spec"]["containers"][0]
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    assert args.command == "init" and args.grace == 20.0
    assert c["resources"]["limits"]["memory"] and c["terminationMessagePath"] == "/dev/termination-log"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace
    for doc in ("alerts.md", "fleet.md"):
        text = (REPO / "docs" / doc).read_text()
        block = re.search(r"```yaml\n(# /etc/memguard/memguard.yaml.*?)```", text, re.S).group(1)
        path = tmp_path / f"{doc}.yaml"
        path.write_text(block)
        policy, issues = check_path(str(path))
        assert not issues and policy is not None, (doc, [str(i) for i in issues])
