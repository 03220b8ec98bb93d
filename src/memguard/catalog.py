"""memguard's journal message catalog: what each event means and what to do, for ``journalctl -x``.

One entry per MESSAGE_ID of :data:`memguard.report.journald.MESSAGE_IDS`,
in systemd's catalog format (``journalctl --update-catalog`` compiles the
``*.catalog`` files of /usr/lib/systemd/catalog/ and
/usr/local/lib/systemd/catalog/ into its database; ``memguard install``
puts :func:`render` there as ``memguard.catalog``). ``journalctl -x -u
memguard`` then shows the explanation under each entry, and
``journalctl --catalog --list-catalog`` lists them.

``@FIELD@`` in a text is replaced by that field of the entry being shown
(only fields every entry of that event carries are used).
"""

from __future__ import annotations

from .report.journald import MESSAGE_IDS

__all__ = ["ENTRIES", "render", "FILE_NAME"]

FILE_NAME = "memguard.catalog"
DOCUMENTATION = "man:memguard(8)"

# event -> (subject, body). The body: what happened, then what to do.
ENTRIES: dict[str, tuple[str, str]] = {
    "started": ("memguard started", """\
memguard started guarding its scope (the host, or its own cgroup) and its
workers. The entry names the configuration file, the scope, the workloads and
the control socket (MEMGUARD_SOCKET), where `memguard ctl status` reaches it.

Nothing to do. `memguard ctl status` shows the workers."""),
    "stopping": ("memguard is stopping its workers", """\
memguard was asked to stop (SIGTERM or SIGINT: `systemctl stop`, shutdown) and
is stopping every worker, each with its workload's stop_signal and grace, then
SIGKILL.

Nothing to do. A worker with a long grace delays the stop; systemd waits up to
TimeoutStopSec."""),
    "stopped": ("memguard stopped", """\
Every worker has stopped and memguard exits.

Nothing to do. The workers start again with memguard."""),
    "reloaded": ("memguard reloaded its configuration", """\
The configuration was read again and found valid. Workers of new or enlarged
workloads are started, workers of removed workloads stopped, workers whose
workload changed restarted; rules and limits apply from the next tick.

Nothing to do."""),
    "reload_failed": ("memguard refused a configuration reload", """\
The configuration has errors, so nothing of it was applied: the configuration
that was running stays in force, untouched, and the workers run on. Each error
is logged just before this entry as its own config_error entry, with the file,
line and key.

Fix the files, check them with `memguard check /etc/memguard`, then reload
again (`systemctl reload memguard`)."""),
    "config_error": ("memguard found an error in its configuration", """\
One error in memguard's configuration: the file (MEMGUARD_FILE), the line
(MEMGUARD_LINE), the key (MEMGUARD_KEY) and what is wrong. At a reload the
running configuration stays in force; at a start memguard does not start.

Fix the file and run `memguard check /etc/memguard` until it says OK."""),
    "reload_note": ("memguard applied a reload with a reservation", """\
The reload was applied, but one setting (such as runtime_dir) takes effect only
at the next start of memguard.

Restart memguard when convenient (`systemctl restart memguard`); this restarts
the workers."""),
    "output": ("A line written by a memguard worker", """\
A line a worker wrote to its stdout or stderr, forwarded by memguard and
attributed to the worker (SYSLOG_IDENTIFIER and MEMGUARD_WORKER name it,
MEMGUARD_STREAM says which stream).

Nothing to do: this is the worker's own output."""),
    "spawn": ("memguard started worker @MEMGUARD_WORKER@", """\
memguard started a worker process: at memguard's start, after a restart, or
because a reload or an operator asked for it. MEMGUARD_PID is its pid.

Nothing to do."""),
    "spawn_failed": ("memguard could not start worker @MEMGUARD_WORKER@", """\
The worker's command could not be started: the program was not found or is not
executable, its user or working directory does not exist, or the system
refused the process. The entry says which. memguard retries by the workload's
restart policy.

Check the workload's command, user and working_dir (`memguard check` reports
most of these), then reload."""),
    "exit": ("Worker @MEMGUARD_WORKER@ exited", """\
A worker process ended. MEMGUARD_CAUSE says why in one word (none, stopped,
host_oom, gpu_oom, killed, timeout, disk_full, exit: docs/incidents.md), and
the entry holds its exit status or signal, how long it ran, the lines of
output that say so and what to do.

If it was not memguard's doing, look at the worker's own output:
`journalctl -u memguard -t @MEMGUARD_WORKER@`."""),
    "incident": ("memguard recorded a death: @MEMGUARD_CAUSE@", """\
A process died and memguard wrote an incident record: what died (a worker, a
container, a systemd unit or a plain process), how (signal, exit status, the
kernel's OOM kill and the limit it hit), why (memguard's rule and numbers, or
the kernel), and the minutes of memory history before it. MEMGUARD_CAUSE is
one of host_oom, gpu_oom, killed, timeout, disk_full, exit, stopped, none.

Read the whole record: `memguard incidents show @MEMGUARD_INCIDENT@`, or ask
`memguard diagnose` (what died last, and what to do about it)."""),
    "completed": ("Worker @MEMGUARD_WORKER@ completed", """\
The worker exited successfully and its restart policy does not start it
again.

Nothing to do."""),
    "failed": ("Worker @MEMGUARD_WORKER@ failed: restart budget spent", """\
The worker exited or was stopped too often within its restart budget window,
so memguard stops restarting it: it stays failed until the configuration is
reloaded or an operator starts it. This keeps a crash loop from churning the
machine.

Find out why it keeps dying (`memguard events --worker @MEMGUARD_WORKER@`),
fix it, then `memguard ctl start @MEMGUARD_WORKER@` or reload."""),
    "restart_scheduled": ("memguard will restart worker @MEMGUARD_WORKER@", """\
The worker ended and its restart policy starts it again after a backoff delay,
which the entry states.

Nothing to do, unless this repeats: then see why the worker ends."""),
    "stop": ("memguard is stopping worker @MEMGUARD_WORKER@", """\
memguard is stopping the worker gracefully (its stop_signal, then SIGKILL after
its grace): its workload was removed or changed by a reload, an operator asked,
or memguard itself is stopping.

Nothing to do."""),
    "terminate": ("memguard terminated worker @MEMGUARD_WORKER@", """\
A rule fired and memguard sent the worker SIGTERM, with SIGKILL to follow after
the grace period if it has not exited. The entry names the rule (MEMGUARD_RULE,
and its file and line in MEMGUARD_SOURCE), the signal measured
(MEMGUARD_SIGNAL), its value and the threshold (MEMGUARD_VALUE,
MEMGUARD_THRESHOLD, in MEMGUARD_UNIT). OBJECT_PID and the OBJECT_ fields
journald adds describe the process.

If this is unexpected, the worker needs more memory than its rule allows: lower
its footprint (batch size, cache), raise limits.memory or the rule's
threshold, or run fewer replicas."""),
    "kill": ("memguard killed worker @MEMGUARD_WORKER@", """\
A rule whose action is kill fired, and memguard sent the worker SIGKILL at
once: memory was so short that a graceful stop could not be afforded. The
entry names the rule, the signal measured, its value and the threshold.

Work in flight in that worker is lost. Give the machine more headroom: fewer or
smaller workers, lower thresholds for the gentler rules so they act first."""),
    "restart": ("memguard restarts worker @MEMGUARD_WORKER@", """\
A rule whose action is restart fired (or an operator asked): memguard stops
the worker and starts it again at once, giving back the memory it had built
up (a leak, a fragmented heap).

If this repeats, the worker leaks: fix the leak, or accept the restarts and
make the worker resumable."""),
    "escalate": ("memguard escalated to SIGKILL for worker @MEMGUARD_WORKER@", """\
The worker (or a process it left behind) did not exit within its grace period
after SIGTERM, so memguard sent SIGKILL.

Make the worker exit promptly on its stop signal (a SIGTERM handler that saves
and exits), or raise the workload's grace."""),
    "block": ("memguard closed admission for new work", """\
A block rule fired: memguard closed the admission gate, so the workers it
names start no new trials or jobs (running ones go on) until the rule's
release condition holds. The entry names the rule, the signal, its value and
the threshold.

Nothing to do; work resumes by itself. If blocks are frequent, memory is
tight for this many workers."""),
    "release": ("memguard opened admission again", """\
The release condition of a block rule holds again: the admission gate is open
and workers take new work.

Nothing to do."""),
    "warn": ("memguard warning: a rule fired", """\
A rule whose action is warn fired: memory (or another signal) crossed its
threshold. memguard only reports it.

Look at what uses the memory (`memguard ctl status`); consider a stronger
action for this rule."""),
    "warn_cleared": ("memguard warning cleared", """\
The condition of a warn rule no longer holds.

Nothing to do."""),
    "kernel_oom_kill": ("The kernel OOM killer killed a process", """\
The kernel's OOM killer killed a process in memguard's scope: memory ran out
faster than memguard's rules acted, or a cgroup's hard limit (limits.memory)
was reached. A worker killed this way is restarted by its restart policy.

Make memguard act earlier: higher thresholds for the terminate rules, a faster
fast_poll_interval, or lower limits for the workers that grow fastest."""),
    "no_victim": ("memguard found no worker to stop", """\
A rule fired that needs a victim, but no worker could be chosen (none running,
or all protected): memory stays short and memguard cannot relieve it.

Look at what else uses the memory on this machine; protected or unmanaged
processes are outside memguard's reach."""),
    "refused": ("Worker @MEMGUARD_WORKER@ waits at a closed admission gate", """\
A trial or job of the worker asked to start while admission was closed, and
waits until memguard opens the gate again.

Nothing to do; it starts when memory allows. Frequent waits mean memory is
tight for this many workers."""),
    "trial_failed": ("A trial of worker @MEMGUARD_WORKER@ failed", """\
A trial reported by the worker ended with an exception (or an interrupt).

See the worker's output for the exception: `journalctl -u memguard -t
@MEMGUARD_WORKER@`."""),
    "reclaimed": ("Worker @MEMGUARD_WORKER@ gave memory back", """\
The worker ran its reclaim steps (garbage collection, freeing caches, its
on_reclaim callbacks) when memguard asked for memory back, and reported what
it did.

Nothing to do."""),
    "admission_error": ("memguard could not write an admission file", """\
memguard could not write the admission file of a worker under its runtime
directory, so that worker may not see the gate open or close.

Check that the runtime directory (/run/memguard by default) is writable by
memguard and not full."""),
    "self_protection": ("memguard's own protection", """\
Reports memguard's own OOM score (oom_score_adj) and whether its memory is
locked in RAM (mlock). Without CAP_SYS_RESOURCE or CAP_IPC_LOCK these may not
be applied, and memguard says so.

Under systemd nothing is needed. Running by hand, run memguard as root or set
mlock: false to silence the note."""),
    "cgroups": ("memguard's per-worker cgroups", """\
Says whether memguard gives each worker a cgroup of its own (with limits.memory
as a kernel limit), and where; or why it cannot (no delegated cgroup, no
permission), in which case it accounts processes by their process tree.

Nothing to do; for kernel-enforced limits run memguard as the systemd service
(Delegate=yes)."""),
    "cgroup": ("memguard set up a worker's cgroup", """\
memguard created or configured the cgroup of a worker.

Nothing to do."""),
    "cgroup_error": ("memguard could not set up a worker's cgroup", """\
Creating or configuring a worker's cgroup failed: the worker runs without its
kernel memory limit and is accounted by its process tree instead.

Check memguard's delegated cgroup (systemd's Delegate=yes) and the error in the
entry."""),
    "reclaim_unheard": ("A worker did not answer memguard's reclaim request", """\
memguard asked a worker to give memory back, but the worker is not connected
to memguard's control socket, so the request went unheard.

Workers that should reclaim import memguard.client (on_reclaim, trial) to
receive the request."""),
    "gpu": ("memguard's GPU sensing", """\
Says whether memguard reads the GPUs through NVML, which devices it sees, or
why GPU sensing is off (no driver, no library, disabled).

Nothing to do, unless your rules use gpu.* or worker.gpu_memory: those need GPU
sensing on."""),
    "gpu_problem": ("memguard hit a problem reading a GPU", """\
NVML reported a problem with a GPU (the device fell off the bus, an Xid error,
the driver not answering). The entry names the device and the kind of
problem; readings of that device are unknown while it lasts.

Check the GPU and its driver (`nvidia-smi`, the kernel log)."""),
    "operator": ("An operator command reached memguard", """\
`memguard ctl` asked memguard to stop, start or restart a worker, or to
reload; the entry names the operation and the worker.

Nothing to do."""),
    "notify_failed": ("memguard cannot notify systemd", """\
memguard could not send a notification (READY, STATUS, a watchdog ping) to
systemd's notify socket: its queue is full because systemd is not reading it,
or the socket refused or is missing. memguard goes on guarding and tries again
at every tick; it says so once per outage, and notify_recovered when messages
go through again.

If it lasts, systemd's watchdog restarts memguard. Look at systemd itself
(`systemctl status`, PID 1's load)."""),
    "notify_recovered": ("memguard can notify systemd again", """\
The notify socket takes messages again after notify_failed; state that could
not be sent then (READY, RELOADING, STOPPING) has been sent.

Nothing to do."""),
    "start_failed": ("memguard could not start", """\
memguard could not start, for example because its control socket is in use by
another memguard or its runtime directory is not usable. The entry says why.

Make sure only one memguard runs with this runtime directory, then start it
again."""),
    "metrics_error": ("memguard could not write its metrics file", """\
Writing the metrics file (metrics_file) failed; memguard stops writing metrics
and goes on guarding.

Check that the directory of metrics_file exists and is writable, then restart
memguard to write metrics again."""),
}


def _wrap_check(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("-- "):
            raise ValueError(f"a catalog body line may not start with '-- ': {line!r}")
    return text


def render() -> str:
    """The catalog file: one entry per MESSAGE_ID, in the table's order."""
    missing = set(MESSAGE_IDS) - set(ENTRIES)
    if missing:
        raise KeyError(f"no catalog entry for event(s): {', '.join(sorted(missing))}")
    out = ["# memguard's journal message catalog (systemd catalog format).",
           "# Generated from memguard/catalog.py; `memguard install` places it in",
           "# /usr/local/lib/systemd/catalog/ and runs `journalctl --update-catalog`.",
           ""]
    for event, mid in MESSAGE_IDS.items():
        subject, body = ENTRIES[event]
        out += [f"-- {mid}", f"Subject: {subject}", "Defined-By: memguard", f"Documentation: {DOCUMENTATION}",
                "", _wrap_check(body), ""]
    return "\n".join(out)
