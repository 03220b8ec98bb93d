"""memguard under a real systemd: READY, STATUS, the watchdog, journald fields, reload, stop, crashes.

A real systemd (the host's /lib/systemd/systemd) boots once for this module
as PID 1 of new PID, mount, UTS and cgroup namespaces, the recipe of
ARCHITECTURE.md ("Facts") made safe for the host it runs on:

- private tmpfs on /tmp, /run, /var/log and /var/lib/systemd, so its boot
  neither empties the host's /tmp nor writes journals, utmp records or timer
  stamps into the host's /var;
- a cgroup of its own (a child of ours, made the root of its cgroup
  namespace, with cgroup2 mounted over /sys/fs/cgroup inside), so it runs in
  the unified hierarchy like a production host, two test runs cannot collide,
  and teardown can kill everything it started in one write (cgroup.kill);
- the units that would touch the host kernel or the host's files (sysctl,
  modules, binfmt, /dev nodes, tmpfiles, sysusers, timers...) masked in
  /run/systemd/system before it starts.

memguard's own unit (systemd/memguard.service) is installed into it with
ExecStart pointing at this interpreter (``<python> -m memguard.cli``), plus
a drop-in that shortens the watchdog. Its files (configuration, boot
script) live in the repository's build/ directory, outside /tmp.

Everything waits on something that happens (``systemctl`` returning, an
entry arriving in ``journalctl --follow``, a pidfd becoming readable), with
a deadline. Only the boot itself is polled: before systemd's bus exists
there is nothing to wait on.

Skipped, with the reason, where systemd cannot boot like this: not root, no
unshare/nsenter, no /lib/systemd/systemd, no cgroup2 hierarchy, a checkout
under /tmp (the namespace's private /tmp would hide it).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from daemonkit import HELPERS, REPO, is_gone, wait_gone
from memguard.commands.install import exec_start_argv, plan_install, systemd_quote
from memguard.report.journald import MESSAGE_IDS

pytestmark = pytest.mark.slow

SYSTEMD = "/lib/systemd/systemd"
UNIT = "memguard.service"
UNIT_FILE = REPO / "systemd" / UNIT
WATCHDOG_S = 4  # the test's WatchdogSec (the unit's 20 s would make the test wait 20 s)
MiB = 1024**2
LEAK_LIMIT = 64 * MiB

# systemd's own message ids (systemd/sd-messages.h)
SD_UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
SD_UNIT_FAILURE_RESULT = "d9b373ed55a64feb8242e02dbe79a49c"

# Units that would act on the host (its kernel, /dev, /etc, /var) or start
# unrelated jobs: masked in the namespace before systemd starts.
MASKED = (
    "timers.target",
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-sysusers.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-remount-fs.service",
    "systemd-random-seed.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "ldconfig.service",
)

BOOT_SCRIPT = """\
set -e
{stash}
mount -t tmpfs -o mode=1777 tmpfs /tmp
{keep}
mount -t tmpfs -o mode=755 tmpfs /run
for d in /var/log /var/lib/systemd; do
    if [ -d "$d" ]; then mount -t tmpfs -o mode=755 tmpfs "$d"; fi
done
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/systemd/system
for unit in {masked}; do ln -s /dev/null "/run/systemd/system/$unit"; done
exec env container=other {systemd} --system --unit=basic.target
"""


# ---------------------------------------------------------------------------
# Small helpers


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """For the few states nothing can be waited on (the boot, before systemd's bus exists): poll pred until
    it is true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _cgroup2_mount() -> str | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if fields[3] == "/":
                return fields[4]
    return None


def _own_cgroup2() -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def _why_no_systemd() -> str | None:
    if os.geteuid() != 0:
        return "booting systemd in a namespace needs root"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} does not exist"
    if not os.path.exists("/proc/self/ns/cgroup"):
        return "the kernel has no cgroup namespaces"
    if _cgroup2_mount() is None or _own_cgroup2() is None:
        return "no cgroup2 hierarchy is mounted (systemd needs one for its units)"
    return None


# ---------------------------------------------------------------------------
# The booted systemd


class Booted:
    """A systemd booted as PID 1 of its own namespaces; reached with nsenter."""

    def __init__(self, base: Path, cgroup: Path) -> None:
        self.base = base
        self.cgroup = cgroup  # host path of the cgroup namespace's root
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.pid = 0  # host pid of the namespace's PID 1
        self.start_cursor = ""
        self.stash: Path | None = None

    # -- boot and teardown -------------------------------------------------

    def boot(self) -> None:
        script = self.base / "boot.sh"
        # The namespace gets a private /tmp; a checkout (or interpreter) living under /tmp is bound back in
        # at the same path, through a stash mount point outside /tmp.
        keep = sorted({Path(*p.parts[:3]) for p in (REPO, Path(sys.executable).resolve(), Path(sys.prefix))
                       if len(p.parts) > 2 and p.parts[1] == "tmp"})
        stash = Path("/var/tmp") / f"memguard-systemd-{self.base.name}"
        self.stash = stash if keep else None
        if keep:
            stash.mkdir(parents=True, exist_ok=True)
        script.write_text(BOOT_SCRIPT.format(
            masked=" ".join(MASKED), systemd=SYSTEMD,
            stash=f"mount --bind /tmp {stash}" if keep else "",
            keep="\n".join(f"mkdir -p {k} && mount --bind {stash}/{k.relative_to('/tmp')} {k}" for k in keep)))
        log = open(self.base / "boot.log", "wb")
        # The shell moves itself into the test cgroup, then unshare makes that cgroup the root of a new
        # cgroup namespace and forks the namespace's PID 1, which mounts the private file systems and
        # becomes systemd.
        self.proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"),
             "unshare", "--cgroup", "--pid", "--fork", "--mount", "--mount-proc", "--uts",
             "--propagation", "private", "sh", str(script)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def systemd_pid() -> int:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace exited ({self.proc.returncode}): {self.boot_log()}")
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                pid = int(kids[0])
                return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" else 0
            except (OSError, IndexError, ValueError):
                return 0

        self.pid = int(wait_until(systemd_pid, 15, "systemd to start in the namespace"))  # type: ignore[arg-type]

        def booted() -> str:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd exited ({self.proc.returncode}): {self.boot_log()}")
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            state = r.stdout.strip()
            return state if state in ("running", "degraded") else ""

        state = wait_until(booted, 60, "systemd to finish booting")
        if state == "degraded":
            failed = self.systemctl("--failed", "--no-legend", check=False).stdout
            print(f"booted systemd is degraded (not a memguard problem): {failed}", file=sys.stderr)

    def boot_log(self) -> str:
        try:
            return (self.base / "boot.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def teardown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.pid:
                self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (a hung shutdown, a failed boot): the whole subtree, in one write.
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass
        elif self.pid and not is_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)  # the namespace's init: the kernel kills the rest
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._remove_cgroups()
        if self.stash is not None:
            try:
                self.stash.rmdir()  # only a mount point inside the (gone) namespace
            except OSError:
                pass

    def _remove_cgroups(self) -> None:
        def removed() -> bool:
            if not self.cgroup.exists():
                return True
            for dirpath, _, _ in os.walk(self.cgroup, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            return not self.cgroup.exists()

        try:
            wait_until(removed, 15, f"the test cgroup {self.cgroup} to empty")
        except TimeoutError as e:
            print(f"left behind: {e}", file=sys.stderr)

    # -- talking to it -----------------------------------------------------

    def _nsenter(self, argv: tuple[str, ...] | list[str], **kw: object) -> subprocess.Popen:
        """A command inside the namespace. nsenter forks to enter the PID namespace and does not pass
        signals on, so the command runs in a session of its own: killing the group kills both."""
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-p", "-m", "--", *argv],
                                start_new_session=True, **kw)  # type: ignore[call-overload]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = self._nsenter(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise
        r = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "-p", ",".join(props), UNIT).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    @property
    def journal_dir(self) -> str:
        """The booted system's (volatile) journal, seen from the host through its PID 1's root."""
        return f"/proc/{self.pid}/root/run/log/journal"

    def journalctl(self, *args: str, follow: bool = False, **kw: object) -> subprocess.Popen:
        """The host's journalctl reading the booted system's journal: no nsenter, so a follower can be
        killed without leaving an orphan in the namespace."""
        return subprocess.Popen(["journalctl", "-D", self.journal_dir, "--no-pager", "-o", "json", "--all",
                                 *(["--follow"] if follow else []), *args], **kw)  # type: ignore[call-overload]

    def journal(self, *args: str, after: str | None = None) -> list[dict]:
        """``journalctl -o json ARGS``; with ``after``, only the entries after that cursor."""
        proc = self.journalctl(*_after(after), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"journalctl {args} exited {proc.returncode}: {err}"
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [e for e in entries if e["__CURSOR"] != after]

    def cursor(self) -> str:
        return self.journal("-n", "1")[-1]["__CURSOR"]

    def wait_entry(self, after: str, *matches: str, pred: Callable[[dict], bool] = lambda e: True,
                   timeout: float = 30, what: str = "") -> dict:
        """The first journal entry after cursor ``after`` with these journalctl matches and pred, waiting
        for it (``journalctl --follow``) up to ``timeout`` seconds."""
        proc = self.journalctl(*_after(after), *matches, follow=True, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        seen: list[str] = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([proc.stdout], [], [], left)
                if not ready:
                    break
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.startswith(b"{"):
                        continue
                    entry = json.loads(line)
                    if entry["__CURSOR"] == after:
                        continue
                    seen.append(str(entry.get("MESSAGE", ""))[:160])
                    if pred(entry):
                        return entry
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        recent = self.run("journalctl", "--no-pager", "-u", UNIT, "-n", "25", check=False).stdout
        raise AssertionError(f"no journal entry {what or matches} within {timeout}s; matching entries seen: "
                             f"{seen[-10:]}; the unit's last lines:\n{recent}")

    def worker_pid(self, after: str, worker: str, invocation: str, timeout: float = 30) -> int:
        """The pid a worker_mem.py worker printed (``pids <pid>``), as seen inside the namespace."""
        e = self.wait_entry(after, f"MEMGUARD_WORKER={worker}", "MEMGUARD_EVENT=output",
                            f"_SYSTEMD_INVOCATION_ID={invocation}",
                            pred=lambda e: str(e.get("MESSAGE", "")).startswith("pids "), timeout=timeout,
                            what=f"the pids line of {worker}")
        return int(e["MESSAGE"].split()[1])

    def write(self, path: str, text: str) -> None:
        """Write a file as the namespace sees it (through its PID 1's root)."""
        target = Path(f"/proc/{self.pid}/root{path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def host_pid(self, ns_pid: int) -> int | None:
        """The host pid of a process known by its pid inside the namespace."""
        ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry.name}/ns/pid") != ns:
                    continue
                for line in Path(f"/proc/{entry.name}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                        return int(entry.name)
            except (OSError, ValueError):
                continue
        return None

    def unit_processes(self) -> list[int]:
        """Host pids of every process in memguard's cgroup subtree (memguard, its sentinel, workers)."""
        group = self.show("ControlGroup")["ControlGroup"]
        if not group:
            return []
        root = self.cgroup / group.lstrip("/")
        pids: list[int] = []
        for dirpath, _, files in os.walk(root):
            if "cgroup.procs" in files:
                try:
                    pids += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
                except OSError:
                    pass
        return pids

    # -- memguard's unit and configuration ---------------------------------

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    def write_config(self, *, steady_replicas: int = 1, broken: bool = False, hostile: bool = False) -> None:
        py = json.dumps(sys.executable)
        helper = json.dumps(str(HELPERS / "worker_mem.py"))
        (self.etc / "workloads.d").mkdir(parents=True, exist_ok=True)
        (self.etc / "memguard.yaml").write_text(textwrap.dedent("""\
            poll_interval: 500ms
            fast_poll_interval: 100ms
            scope: host
            workloads: workloads.d/
            log: {format: auto, level: info}
            """))
        (self.etc / "workloads.d" / "steady.yaml").write_text(textwrap.dedent(f"""\
            name: steady
            command: [{py}, {helper}]
            replicas: {steady_replicas}
            grace: 2s
            """))
        # Leaks 40 MB/s up to 120 MB: past its 64 MiB limit within two seconds of starting.
        (self.etc / "workloads.d" / "leak.yaml").write_text(textwrap.dedent(f"""\
            name: leak
            command: [{py}, {helper}, --rate, "40", --max, "120"]
            limits: {{memory: 64MiB}}
            grace: 2s
            rules:
              - {{name: over-limit, when: "worker.memory > 100%", action: terminate}}
            restart: {{policy: never}}
            """))
        hostile_file = self.etc / "workloads.d" / "hostile.yaml"
        if hostile:  # values that once took the daemon down: a 400-digit size, 1000 nested lists
            hostile_file.write_text("name: hostile\ncommand: [true]\nlimits: {memory: " + "9" * 400 + "MiB}\n"
                                    "environment: {DEEP: " + "[" * 1000 + "]" * 1000 + "}\n")
        elif hostile_file.exists():
            hostile_file.unlink()
        broken_file = self.etc / "workloads.d" / "broken.yaml"
        if broken:
            broken_file.write_text("name: broken\ncomand: [true]\nreplicas: many\n")
        elif broken_file.exists():
            broken_file.unlink()

    def install_unit(self) -> None:
        """The repository's unit, ExecStart pointing at this interpreter, and a drop-in for the test."""
        exec_start = " ".join(systemd_quote(a) for a in [sys.executable, "-m", "memguard.cli", "daemon",
                                                        "--config", str(self.etc / "memguard.yaml")])
        unit = re.sub(r"(?m)^ExecStart=.*$", lambda m: f"ExecStart={exec_start}", UNIT_FILE.read_text())
        self.write(f"/run/systemd/system/{UNIT}", unit)
        self.write(f"/run/systemd/system/{UNIT}.d/test.conf", textwrap.dedent(f"""\
            [Unit]
            # The tests start memguard more often than 5 times in 5 minutes.
            StartLimitBurst=1000
            [Service]
            WatchdogSec={WATCHDOG_S}s
            # No core file from the watchdog's SIGABRT.
            LimitCORE=0
            """))
        self.systemctl("daemon-reload")

    def restart_memguard(self) -> None:
        """memguard freshly started on the baseline configuration; start_cursor marks where its log begins."""
        self.write_config()
        self.systemctl("reset-failed", UNIT, check=False)
        self.start_cursor = self.cursor()
        self.systemctl("restart", UNIT)


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    why = _why_no_systemd()
    if why:
        pytest.skip(f"cannot boot systemd here: {why}")
    mount, own = _cgroup2_mount(), _own_cgroup2()
    assert mount is not None and own is not None
    cgroup = Path(mount) / own.lstrip("/") / f"memguard-systemd-{uuid.uuid4().hex[:8]}"
    try:
        cgroup.mkdir()
    except OSError as e:
        pytest.skip(f"cannot boot systemd here: cannot create a cgroup for it ({cgroup}): {e}")
    base = REPO / "build" / f"systemd-test-{uuid.uuid4().hex[:8]}"
    base.mkdir(parents=True)
    b = Booted(base, cgroup)
    try:
        try:
            b.boot()
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"systemd did not boot in a namespace: {e}; boot log: {b.boot_log()}")
        b.write_config()
        b.install_unit()
        yield b
    finally:
        b.teardown()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def memguard(booted: Booted) -> Booted:
    booted.restart_memguard()
    return booted


def _after(cursor: str | None) -> list[str]:
    """journalctl arguments for "the entries after this cursor" (the caller drops the cursor's own entry).

    Not --after-cursor: with matches, journalctl 252 seeks to the cursor and then skips two *matching*
    entries, assuming the first is the cursor's own; when the cursor's entry does not match, the first
    entry that does is lost. --cursor includes the cursor's entry if it matches, and the caller drops it.
    """
    return [f"--cursor={cursor}"] if cursor else []


def _seqnum(entry: dict) -> int:
    fields = dict(part.split("=", 1) for part in entry["__CURSOR"].split(";"))
    return int(fields["i"], 16)


# ---------------------------------------------------------------------------
# The tests


def test_start_is_active_only_after_ready_with_memguards_status(booted: Booted) -> None:
    """`systemctl start` returns, and the unit turns active, only once memguard has sent READY=1 after
    starting its workers: systemd's "Started" entry comes after memguard's own `started` and `spawn`
    entries in the journal. StatusText is memguard's STATUS line; the watchdog is armed; the hardening
    leaves /dev, /proc and the cgroup tree alone; workers get no NOTIFY_SOCKET."""
    booted.write_config()
    booted.systemctl("stop", UNIT)
    booted.systemctl("reset-failed", UNIT, check=False)
    cursor = booted.cursor()
    booted.systemctl("start", UNIT)
    assert booted.systemctl("is-active", UNIT).stdout.strip() == "active"
    show = booted.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess", "WatchdogUSec",
                       "InvocationID", "MainPID", "KillMode", "OOMPolicy", "Delegate", "PrivateDevices",
                       "DevicePolicy", "DeviceAllow", "ProtectControlGroups", "ProtectProc")
    assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show
    assert (show["Type"], show["NotifyAccess"]) == ("notify", "main")
    assert re.match(r"\d+ running, \d+ blocked, \d+ failed", show["StatusText"]), show["StatusText"]
    assert show["WatchdogUSec"] == f"{WATCHDOG_S}s"
    assert (show["KillMode"], show["OOMPolicy"], show["Delegate"]) == ("mixed", "continue", "yes")
    assert (show["PrivateDevices"], show["DevicePolicy"], show.get("DeviceAllow", "")) == ("no", "auto", "")
    assert (show["ProtectControlGroups"], show["ProtectProc"]) == ("no", "default")

    inv = show["InvocationID"]
    started = booted.wait_entry(cursor, f"UNIT={UNIT}", f"INVOCATION_ID={inv}", f"MESSAGE_ID={SD_UNIT_STARTED}",
                                what="systemd's 'Started memguard.service'")
    ours = booted.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={inv}", after=cursor)
    events = {e.get("MEMGUARD_EVENT") for e in ours}
    assert {"started", "spawn"} <= events, events
    memguard_started = next(e for e in ours if e.get("MEMGUARD_EVENT") == "started")
    last_spawn = [e for e in ours if e.get("MEMGUARD_EVENT") == "spawn"][-1]
    # One socket, one queue: memguard sent these before READY=1, systemd logged "Started" after it.
    assert _seqnum(memguard_started) < _seqnum(last_spawn) < _seqnum(started)
    assert memguard_started["_TRANSPORT"] == "journal" and memguard_started["MESSAGE_ID"] == MESSAGE_IDS["started"]

    steady = booted.host_pid(booted.worker_pid(cursor, "steady-0", inv))
    assert steady is not None
    environ = Path(f"/proc/{steady}/environ").read_bytes().split(b"\0")
    names = {v.split(b"=", 1)[0] for v in environ}
    assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID"}, names


def test_breach_is_in_the_journal_with_its_fields(memguard: Booted) -> None:
    """A worker past its limit is terminated, and `journalctl -u memguard MEMGUARD_EVENT=terminate -o json`
    returns that decision as structured fields: worker, workload, pid, rule, value, threshold, priority,
    a stable MESSAGE_ID. The worker's own output is attributed to it (`journalctl -t leak-0`), and
    `memguard events` reads the same event back."""
    inv = memguard.show("InvocationID")["InvocationID"]
    pid = memguard.worker_pid(memguard.start_cursor, "leak-0", inv)
    ev = memguard.wait_entry(memguard.start_cursor, "MEMGUARD_EVENT=terminate", "MEMGUARD_WORKER=leak-0",
                             f"_SYSTEMD_INVOCATION_ID={inv}", timeout=30, what="the leak's terminate")

    found = memguard.journal("-u", "memguard", "MEMGUARD_EVENT=terminate")  # the documented query
    entry = next(e for e in found if e["__CURSOR"] == ev["__CURSOR"])
    assert entry["MEMGUARD_WORKER"] == "leak-0"
    assert entry["MEMGUARD_WORKLOAD"] == "leak"
    assert int(entry["MEMGUARD_PID"]) == pid
    assert entry["MEMGUARD_RULE"] == "over-limit"
    assert entry["MEMGUARD_SIGNAL"] == "worker.memory"
    assert float(entry["MEMGUARD_THRESHOLD"]) == LEAK_LIMIT
    assert float(entry["MEMGUARD_VALUE"]) > LEAK_LIMIT
    assert entry["PRIORITY"] == "4"
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["terminate"]
    assert entry["SYSLOG_IDENTIFIER"] == "memguard"
    assert entry["_SYSTEMD_UNIT"] == UNIT and entry["_TRANSPORT"] == "journal"
    assert "leak-0" in entry["MESSAGE"] and "terminate" in entry["MESSAGE"]

    # The stop is an incident: one journal entry referencing its record under StateDirectory=, logged before
    # the decision's own entry (the record is written before the signal).
    both = memguard.journal("-u", "memguard", f"MEMGUARD_PID={pid}", f"_SYSTEMD_INVOCATION_ID={inv}")
    incidents = [e for e in both if e.get("MEMGUARD_EVENT") == "incident"]
    assert len(incidents) == 1 and incidents[0]["MESSAGE_ID"] == MESSAGE_IDS["incident"]
    assert incidents[0]["MEMGUARD_FILE"].startswith("/var/lib/memguard/incidents/")
    assert incidents[0]["MEMGUARD_WORKER"] == "leak-0" and incidents[0]["MEMGUARD_ORIGIN"] == "memguard"
    order = [e.get("MEMGUARD_EVENT") for e in both]
    assert order.index("incident") < order.index("terminate")

    out = memguard.journal("-u", "memguard", "-t", "leak-0", f"_SYSTEMD_INVOCATION_ID={inv}")
    line = next(e for e in out if e["MESSAGE"] == f"pids {pid}")
    assert (line["MEMGUARD_WORKER"], line["MEMGUARD_STREAM"], line["PRIORITY"]) == ("leak-0", "stdout", "6")

    r = memguard.run(sys.executable, "-m", "memguard.cli", "events", "--event", "terminate", "--worker",
                     "leak-0", "--json", "-n", "1")
    shown = json.loads(r.stdout.splitlines()[-1])
    assert (shown["event"], shown["worker"], shown["pid"], shown["rule"]) == ("terminate", "leak-0", pid,
                                                                             "over-limit")
    assert shown["threshold"] == LEAK_LIMIT and shown["level"] == "warning"


def _restart_after(memguard: Booted, do: Callable[[int], None], result: str) -> float:
    """Apply ``do`` to memguard's main process (host pid); wait for systemd to start a new memguard.
    Checks every old process is gone and the new workers run; returns seconds until the new READY."""
    show = memguard.show("InvocationID", "MainPID")
    inv, main_ns = show["InvocationID"], int(show["MainPID"])
    worker_ns = memguard.worker_pid(memguard.start_cursor, "steady-0", inv)
    old = memguard.unit_processes()
    main = memguard.host_pid(main_ns)
    worker = memguard.host_pid(worker_ns)
    assert main in old and worker in old, (main, worker, old)

    cursor = memguard.cursor()
    t0 = time.monotonic()
    do(main)
    failure = memguard.wait_entry(cursor, f"MESSAGE_ID={SD_UNIT_FAILURE_RESULT}", f"UNIT={UNIT}",
                                  timeout=WATCHDOG_S + 15, what=f"systemd's 'Failed with result {result}'")
    assert failure["UNIT_RESULT"] == result, failure["MESSAGE"]
    assert failure["INVOCATION_ID"] == inv
    started = memguard.wait_entry(cursor, f"MESSAGE_ID={SD_UNIT_STARTED}", f"UNIT={UNIT}",
                                  pred=lambda e: e.get("INVOCATION_ID") != inv, timeout=30,
                                  what="systemd starting memguard again")
    elapsed = time.monotonic() - t0
    assert wait_gone(old, 15) == [], "processes of the old memguard survived"

    new = memguard.show("InvocationID", "MainPID", "ActiveState")
    assert new["InvocationID"] == started["INVOCATION_ID"] != inv
    assert new["ActiveState"] == "active" and int(new["MainPID"]) != main_ns
    new_worker = memguard.host_pid(memguard.worker_pid(cursor, "steady-0", new["InvocationID"]))
    assert new_worker is not None and new_worker not in old and not is_gone(new_worker)
    return elapsed


def test_watchdog_restarts_a_wedged_daemon(memguard: Booted) -> None:
    """A memguard whose loop stops (SIGSTOP) stops pinging; systemd's watchdog kills it after WatchdogSec
    and Restart= starts a new one: within WatchdogSec + RestartSec + a margin, no process of the old
    instance is left (workers included), and new workers run under a new main pid."""
    elapsed = _restart_after(memguard, lambda pid: os.kill(pid, signal.SIGSTOP), "watchdog")
    assert elapsed < WATCHDOG_S + 2 + 10, f"restarted only after {elapsed:.1f}s"


def test_sigkill_of_the_daemon_restarts_it_without_survivors(memguard: Booted) -> None:
    """`kill -9` of memguard: systemd starts it again (Restart=always), and no worker of the old instance
    survives the old daemon (KillMode=mixed, the sentinel and the workers' parent-death signal)."""
    elapsed = _restart_after(memguard, lambda pid: os.kill(pid, signal.SIGKILL), "signal")
    assert elapsed < 2 + 10, f"restarted only after {elapsed:.1f}s"


def test_reload_keeps_the_last_good_policy_and_applies_a_fixed_one(memguard: Booted) -> None:
    """`systemctl reload` with a broken workload file: memguard stays active under its running policy and
    logs every error (MEMGUARD_EVENT=config_error, with file and line); once the file is fixed, the next
    reload applies the new policy (steady goes from 1 replica to 2)."""
    show = memguard.show("InvocationID", "MainPID")
    inv = show["InvocationID"]
    steady0 = memguard.worker_pid(memguard.start_cursor, "steady-0", inv)

    memguard.write_config(steady_replicas=2, broken=True)
    cursor = memguard.cursor()
    memguard.systemctl("reload", UNIT)
    memguard.wait_entry(cursor, "MEMGUARD_EVENT=reload_failed", f"_SYSTEMD_INVOCATION_ID={inv}",
                        what="reload_failed")
    errors = memguard.journal("-u", UNIT, "MEMGUARD_EVENT=config_error", after=cursor)
    assert len(errors) >= 2, errors
    assert all(e["MEMGUARD_FILE"].endswith("broken.yaml") and e["PRIORITY"] == "3" for e in errors)
    assert {e["MEMGUARD_KEY"] for e in errors} >= {"comand", "replicas"}
    assert all(int(e["MEMGUARD_LINE"]) > 0 for e in errors)
    after = memguard.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={inv}", after=cursor)
    assert not [e for e in after if e.get("MEMGUARD_EVENT") in ("reloaded", "spawn")], "a broken policy applied"
    state = memguard.show("ActiveState", "MainPID", "InvocationID")
    assert state["MainPID"] == show["MainPID"] and state["InvocationID"] == inv
    assert memguard.systemctl("is-active", UNIT, check=False).stdout.strip() in ("active", "reloading")
    assert not is_gone(memguard.host_pid(steady0) or 0), "the running worker was touched"

    memguard.write_config(steady_replicas=2)
    cursor = memguard.cursor()
    memguard.systemctl("reload", UNIT)
    memguard.wait_entry(cursor, "MEMGUARD_EVENT=reloaded", f"_SYSTEMD_INVOCATION_ID={inv}", what="reloaded")
    steady1 = memguard.host_pid(memguard.worker_pid(cursor, "steady-1", inv))
    assert steady1 is not None and not is_gone(steady1)
    assert memguard.show("MainPID")["MainPID"] == show["MainPID"]


def test_reload_with_hostile_values_keeps_the_unit_active_with_its_workers(memguard: Booted) -> None:
    """`systemctl reload` onto a file with an overflowing size and 1000 nested lists: the reload is refused
    with the errors in the journal, the unit stays active with the same main process and its workers."""
    show = memguard.show("InvocationID", "MainPID")
    inv = show["InvocationID"]
    steady0 = memguard.host_pid(memguard.worker_pid(memguard.start_cursor, "steady-0", inv))
    memguard.write_config(hostile=True)
    cursor = memguard.cursor()
    memguard.systemctl("reload", UNIT)
    memguard.wait_entry(cursor, "MEMGUARD_EVENT=reload_failed", f"_SYSTEMD_INVOCATION_ID={inv}",
                        what="reload_failed")
    errors = memguard.journal("-u", UNIT, "MEMGUARD_EVENT=config_error", after=cursor)
    assert errors and all(e["MEMGUARD_FILE"].endswith("hostile.yaml") for e in errors), errors
    state = memguard.show("ActiveState", "MainPID", "InvocationID")
    assert state["MainPID"] == show["MainPID"] and state["InvocationID"] == inv
    assert memguard.systemctl("is-active", UNIT, check=False).stdout.strip() in ("active", "reloading")
    assert steady0 is not None and not is_gone(steady0), "the running worker was touched"
    memguard.write_config()


def test_stop_stops_every_worker_well_within_the_timeout(memguard: Booted) -> None:
    """`systemctl stop`: memguard stops its workers itself and exits 0, every process of the unit is gone,
    the unit is inactive, and it all takes seconds, far from TimeoutStopSec (90 s): systemd never had to
    SIGKILL anything."""
    inv = memguard.show("InvocationID")["InvocationID"]
    memguard.worker_pid(memguard.start_cursor, "steady-0", inv)
    procs = memguard.unit_processes()
    assert len(procs) >= 2
    cursor = memguard.cursor()
    t0 = time.monotonic()
    memguard.systemctl("stop", UNIT, timeout=120)
    elapsed = time.monotonic() - t0
    assert wait_gone(procs, 5) == []
    show = memguard.show("ActiveState", "Result", "ExecMainStatus", "TimeoutStopUSec")
    assert show["ActiveState"] == "inactive" and show["Result"] == "success", show
    assert show["ExecMainStatus"] == "0"
    assert show["TimeoutStopUSec"] == "1min 30s"
    assert elapsed < 15, f"stop took {elapsed:.1f}s"
    # memguard's last entries reach journald as datagrams sent just before it exits; journald stores them on
    # its own schedule, unordered with the end of the stop job: wait for the last one before reading.
    memguard.wait_entry(cursor, "MEMGUARD_EVENT=stopped", what="memguard's stopped entry")
    after = memguard.journal("-u", UNIT, after=cursor)
    exits = [e for e in after if e.get("MEMGUARD_EVENT") == "exit" and e.get("MEMGUARD_WORKER") == "steady-0"]
    assert exits and "stopped by memguard" in exits[-1]["MESSAGE"]
    assert any(e.get("MEMGUARD_EVENT") == "stopped" for e in after)
    killed = [e["MESSAGE"] for e in after if "Killing process" in str(e.get("MESSAGE", ""))]
    assert not killed, killed


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit as `memguard install` writes it (ExecStart pointing at
    this memguard), with no warning about it."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for step in plan_install(tmp_path, exec_start_argv()):
        if step.action == "create":
            step.path.parent.mkdir(parents=True, exist_ok=True)
            step.path.write_text(step.content)
    unit = tmp_path / "usr/local/lib/systemd/system" / UNIT
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "memguard" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_security_score_is_the_one_the_docs_record() -> None:
    """`systemd-analyze security --offline=yes` scores the shipped unit as docs/service.md says (and
    below the 8.8 of the unit before its hardening), so the recorded figure cannot go stale."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT_FILE)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline (systemd 250 or later): {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for memguard\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    doc = (REPO / "docs" / "service.md").read_text()
    recorded = re.search(r"`systemd-analyze security` exposure level: \*\*(\d+\.\d)\*\*", doc)
    assert recorded, "docs/service.md records no score"
    assert score == float(recorded.group(1)) < 8.8, (score, recorded.group(1))


# ---------------------------------------------------------------------------
# The sandbox, the catalog, OBJECT_PID, and reading the journal without permission

#: The unit's settings that make up the sandbox every worker inherits.
SANDBOX_KEYS = ("ProtectSystem", "ProtectKernelTunables", "RestrictSUIDSGID", "RestrictRealtime",
                "LockPersonality", "ProtectHostname", "SystemCallArchitectures", "CapabilityBoundingSet",
                "SystemCallFilter", "SystemCallErrorNumber", "ProtectKernelLogs", "PrivateDevices",
                "ProtectClock", "ProtectControlGroups", "NoNewPrivileges", "MemoryDenyWriteExecute")

PROBE = """\
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r = libc.swapoff(b"/nonexistent-memguard-probe")   # @swap: filtered; harmless either way
print("swapoff", errno.errorcode.get(ctypes.get_errno(), "?") if r else "ok")
try:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.read(fd, 8192)
    print("kmsg ok")
except OSError as e:
    print("kmsg", errno.errorcode.get(e.errno, "?"))
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print("capbnd", int(status["CapBnd"].strip(), 16))
print("seccomp", status["Seccomp"].strip())
"""

CAP = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7,
       "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14, "CAP_SYS_MODULE": 16,
       "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_RESOURCE": 24,
       "CAP_SYS_TIME": 25, "CAP_MKNOD": 27, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35}


def _sandbox_properties(extra: tuple[str, ...] = ()) -> list[str]:
    props = []
    for line in UNIT_FILE.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in SANDBOX_KEYS:
            props += ["-p", f"{key}={value}"]
    for p in extra:
        props += ["-p", p]
    return props


def _probe(booted: Booted, *extra: str) -> dict[str, str]:
    r = booted.run("systemd-run", "--quiet", "--wait", "--pipe", "--collect", *_sandbox_properties(extra),
                   sys.executable, "-I", "-c", PROBE, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def test_the_sandbox_workers_inherit_leaves_kmsg_and_gpu_tools_and_denies_what_it_says(booted: Booted) -> None:
    """A process under the unit's sandbox (what memguard and every worker runs in): /dev/kmsg stays
    readable (memguard reads the kernel's OOM reports there), the capabilities the GPU driver's helper and
    memguard need stay in the bounding set while the clock, reboot, accounting and immutable-file ones are
    gone, and a filtered system call fails with EPERM instead of killing the caller. The same probe with
    ProtectKernelLogs=yes added cannot read /dev/kmsg: why the unit does not set it."""
    if not os.path.exists("/dev/kmsg"):
        pytest.skip("this kernel has no /dev/kmsg")
    got = _probe(booted)
    assert got["kmsg"] == "ok", got
    assert got["swapoff"] == "EPERM", got  # filtered (@swap), the process lives on; unfiltered: ENOENT
    assert got["seccomp"] == "2", got
    bnd = int(got["capbnd"])
    ours = int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)  # none can gain more
    for kept in ("CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE",
                 "CAP_SYS_RESOURCE", "CAP_IPC_LOCK", "CAP_NET_ADMIN", "CAP_SYSLOG", "CAP_SYS_MODULE", "CAP_MKNOD",
                 "CAP_SYS_ADMIN", "CAP_CHOWN"):
        assert bnd & (1 << CAP[kept]) or not ours & (1 << CAP[kept]), kept
    for dropped in ("CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_WAKE_ALARM", "CAP_SYS_PACCT", "CAP_LINUX_IMMUTABLE"):
        assert not bnd & (1 << CAP[dropped]), dropped

    with_pkl = _probe(booted, "ProtectKernelLogs=yes")
    assert with_pkl["kmsg"] != "ok", with_pkl


STUBBORN = """\
name: stubborn
command: [{py}, {helper}, --sigterm, ignore]
grace: 3s
rules:
  - {{name: any-memory, when: "worker.memory > 1MiB", for: 2s, action: terminate}}
restart: {{policy: never}}
"""


def test_terminate_names_its_victim_as_object_pid_and_journalctl_x_explains_it(memguard: Booted,
                                                                              tmp_path: Path) -> None:
    """A terminate entry carries the victim's pid as OBJECT_PID, and journald adds what it knows of that
    process (OBJECT_COMM, OBJECT_CMDLINE, OBJECT_SYSTEMD_UNIT). With memguard's catalog compiled into the
    journal's database, `journalctl -x` prints the entry's explanation under it."""
    stubborn = memguard.etc / "workloads.d" / "stubborn.yaml"
    stubborn.write_text(STUBBORN.format(py=json.dumps(sys.executable),
                                        helper=json.dumps(str(HELPERS / "worker_mem.py"))))
    try:
        memguard.systemctl("reset-failed", UNIT, check=False)
        cursor = memguard.cursor()
        memguard.systemctl("restart", UNIT)
        inv = memguard.show("InvocationID")["InvocationID"]
        pid = memguard.worker_pid(cursor, "stubborn-0", inv)
        ev = memguard.wait_entry(cursor, "MEMGUARD_EVENT=terminate", "MEMGUARD_WORKER=stubborn-0",
                                 f"_SYSTEMD_INVOCATION_ID={inv}", what="the terminate of stubborn-0")
        assert int(ev["OBJECT_PID"]) == int(ev["MEMGUARD_PID"]) == pid
        assert ev["OBJECT_SYSTEMD_UNIT"] == UNIT
        assert "worker_mem.py" in ev["OBJECT_CMDLINE"] and ev["OBJECT_COMM"].startswith("python"), ev

        # The catalog, compiled as `memguard install` + `journalctl --update-catalog` would, into the
        # booted system's database (a tmpfs of its own: the host's stays untouched).
        r = subprocess.run([sys.executable, "-m", "memguard", "install", "--root", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(["journalctl", "--root", str(tmp_path), "--update-catalog"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and not r.stderr, r.stderr
        database = Path(f"/proc/{memguard.pid}/root/var/lib/systemd/catalog/database")
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "var/lib/systemd/catalog/database", database)
        out = memguard.run("journalctl", "--no-pager", "-x", "-u", UNIT, f"_SYSTEMD_INVOCATION_ID={inv}",
                           "MEMGUARD_EVENT=terminate").stdout
        assert "memguard terminated worker stubborn-0" in out, out[-2000:]  # @MEMGUARD_WORKER@ filled in
        assert "raise limits.memory" in out and "man:memguard(8)" in out
    finally:
        stubborn.unlink(missing_ok=True)
        memguard.restart_memguard()


def test_events_without_journal_permission_says_what_to_do(memguard: Booted) -> None:
    """`memguard events` run by a user outside the groups that may read the system journal: exit 1, no
    traceback, and a message naming the user, the group systemd-journal and sudo; the same user with
    the group systemd-journal added reads memguard's events."""
    from userkit import as_user, cleanup_stash, free_uid, stash_root, why_no_user_switch

    why = why_no_user_switch()
    if why:
        pytest.skip(why)
    import grp

    try:
        journal_gid = grp.getgrnam("systemd-journal").gr_gid
    except KeyError:
        pytest.skip("this system has no group systemd-journal")
    stash_root().mkdir(parents=True, exist_ok=True)
    uid = free_uid()
    events = [sys.executable, "-m", "memguard", "events", "-n", "3"]
    try:
        memguard.wait_entry(memguard.start_cursor, "MEMGUARD_EVENT=started", what="memguard's start")
        r = memguard.run(*as_user(events, uid), check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        assert f"you ({uid}) may not read the system journal" in r.stderr, r.stderr
        assert "systemd-journal" in r.stderr and "sudo memguard events" in r.stderr
        # The journal's group and modes, as systemd-tmpfiles sets them at boot (masked in this namespace,
        # whose journal is root's alone until then); --prefix keeps it to the journal's directory.
        memguard.run("systemd-tmpfiles", "--create", "--prefix=/run/log/journal", check=False)
        r = memguard.run(*as_user(events, uid, groups=[journal_gid]), check=False)
        assert r.returncode == 0 and r.stdout.strip() and "may not read" not in r.stderr, r.stdout + r.stderr
    finally:
        cleanup_stash()
