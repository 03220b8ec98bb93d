"""Optuna workers under memguard: gated trials, clean stops, retries, restarts.

``pip install memguard[optuna]``. Optuna is imported inside the functions
that need it. Only Optuna's public API is used; tested with Optuna 3.4 (the
oldest supported) and the newest release.

The short version::

    import optuna
    from memguard.integrations.optuna import optimize

    study = optuna.load_study(study_name="search", storage="sqlite:////var/lib/exp/search.db")
    optimize(study, objective, n_trials=500)

What :func:`optimize` does, and why:

- **Admission.** Between two trials it waits at the worker's admission gate
  while memguard keeps it closed (``block``), *before* Optuna creates the
  next trial, so no trial sits RUNNING while the worker waits. Then it
  claims the next trial with memguard and reads the gate once more: a gate
  that closed in between sends it back to wait, so no trial is ever
  created behind a closed gate, and memguard, which recycles or brakes a
  worker only between trials, knows of the trial before it exists.
- **Stopping.** SIGINT and SIGTERM raise :class:`MemguardStop`, a
  KeyboardInterrupt, inside the running trial. Optuna records that trial
  as FAIL (a trial interrupted by SIGTERM's default action or by
  ``sys.exit()`` would stay RUNNING for ever); then the process exits.
  A signal that arrives while Optuna itself is writing to its storage
  (asking for or telling a trial) is held until the next safe point, so a
  storage transaction is never cut in half.
- **Retry, Optuna's way.** A trial failed by a stop is queued again by
  Optuna's own retry callback (``RetryFailedTrialCallback``, renamed
  ``RetryHeartbeatStaleTrialCallback`` in Optuna 4.9): the new trial has
  the same parameters, and ``retried_trial_number()`` /
  ``retry_history()`` name the original. At most ``max_retry`` retries per
  original trial (default 1: a configuration that blew memory up once
  tends to do it again).
- **No trial left RUNNING.** Each trial records which worker process runs
  it (user attribute ``memguard_owner``: host, worker, boot, pid). A worker
  killed outright (SIGKILL after its grace period, the kernel's OOM killer,
  memguard itself killed and its workers with it) cannot record its trial's
  end; the next start of the same worker finds that trial still RUNNING,
  sees its process gone, fails it and queues it again the same way, before
  it asks for a new trial. memguard logs it as ``trial_requeued``. No
  heartbeat, grace period or other worker is needed for that.
- **Restarts.** ``n_trials`` counts the COMPLETE and PRUNED trials of the
  whole study, not of this process: a worker that memguard restarts goes
  on where the study is and exits 0 once the study has its trials (under
  ``restart: {policy: on-failure}`` memguard then leaves it stopped: the
  work is done).
- ``catch=(MemoryError,)``: a trial that runs out of memory is recorded
  FAIL and the worker goes on.

A trial whose worker died on another machine (several machines, one RDB
study) is failed by Optuna's heartbeat instead: see :func:`rdb_storage`.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .. import client as _client

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "MemguardStop",
    "StoppedTrial",
    "gated",
    "install_signal_handlers",
    "restore_signal_handlers",
    "MemguardCallback",
    "optimize",
    "requeue",
    "requeue_orphans",
    "rdb_storage",
    "ATTR_STOPPED",
    "ATTR_STARTED",
    "ATTR_OWNER",
]

#: User attributes memguard writes. On a trial a stop failed:
ATTR_STOPPED = "memguard_stopped"  # why it was stopped ("SIGINT; admission closed: ...")
ATTR_STARTED = "memguard_started"  # False when the objective had not started yet
#: On every trial run under memguard: who runs it, so that a later start of the worker can tell a trial
#: whose process is gone. {"host": ..., "worker": "search-0", "boot": boot id, "pid": ..., "start": ...}
ATTR_OWNER = "memguard_owner"

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StoppedTrial:
    """A trial that a stop interrupted, as the objective wrapper saw it."""

    number: int
    started: bool
    reason: str


class MemguardStop(KeyboardInterrupt):
    """The worker was asked to stop (SIGINT or SIGTERM, normally from memguard).

    A KeyboardInterrupt, so that Optuna records the running trial as FAIL
    and re-raises it. ``trials`` lists the trials it interrupted.
    :func:`optimize` turns it into a plain KeyboardInterrupt once it has
    requeued them.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.trials: list[StoppedTrial] = []
        try:
            self.signal_name = signal.Signals(signum).name
        except ValueError:
            self.signal_name = f"signal {signum}"
        super().__init__(f"stopped by {self.signal_name}")

    def reason(self) -> str:
        """The signal, and memguard's reason when the worker's admission gate says one."""
        is_open, why = _client.admission()
        return self.signal_name + ("" if is_open or not why else f"; admission closed: {why}")


class _StopState:
    """Process-wide: what the signal handler saw, where the main thread is, whether a trial is claimed."""

    def __init__(self) -> None:
        self.loops = 0  # > 0: inside optimize(), which has safe points to act on a held stop
        self.reset()

    def reset(self) -> None:
        self.requested: MemguardStop | None = None
        self.raised = False
        self.interruptible = 0  # > 0: the main thread is in an objective or a gate wait
        self.claimed = False  # the next trial is claimed with memguard (the gate was open after the claim)

    def take(self) -> MemguardStop | None:
        """The pending stop, to raise now (once)."""
        if self.requested is None or self.raised:
            return None
        self.raised = True
        return self.requested


_state = _StopState()


def _on_signal(signum: int, frame: Any) -> None:
    if _state.requested is None:
        _state.requested = MemguardStop(signum)
    if _state.raised:
        return  # already stopping: a second signal changes nothing (SIGKILL follows the grace period)
    if _state.interruptible > 0 or _state.loops == 0:
        stop = _state.take()
        if stop is not None:
            raise stop
    # Otherwise Optuna is between trials (asking, telling, running callbacks):
    # held until the next safe point, so no storage write is cut in half.


class _Interruptible:
    """A region of the main thread where a stop is raised at once (a pending one on entry)."""

    def __enter__(self) -> None:
        self.counted = threading.current_thread() is threading.main_thread()
        if not self.counted:
            return
        stop = _state.take()
        if stop is not None:
            raise stop
        _state.interruptible += 1

    def __exit__(self, *exc: Any) -> None:
        if self.counted:
            _state.interruptible -= 1


def install_signal_handlers(signals: Iterable[int] = STOP_SIGNALS) -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise :class:`MemguardStop` (a KeyboardInterrupt); returns the old handlers.

    Never ``sys.exit()``: SystemExit is not caught by Optuna, which would
    leave the trial RUNNING. Only the main thread can install handlers; from
    another thread this does nothing and returns ``{}``.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in signals:
        previous[int(sig)] = signal.signal(sig, _on_signal)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------
# Who runs a trial


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _boot_id() -> str:
    return (_read("/proc/sys/kernel/random/boot_id") or "").strip()


def _process_start(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a process; None when there is none."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        fields = text.rsplit(")", 1)[1].split()
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _owner() -> dict[str, Any] | None:
    """This process as a trial's owner, or None outside memguard (nothing would ever look)."""
    worker = _client.worker_name()
    if worker is None:
        return None
    pid = os.getpid()
    started = _process_start(pid)
    return {"host": socket.gethostname(), "worker": worker, "boot": _boot_id(), "pid": pid,
            "start": started[0] if started else None}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """Is the process that ran a trial certainly gone? Only answerable on its own machine."""
    if owner.get("boot") != _boot_id():
        return True  # the machine was restarted since
    pid, start = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int):
        return False
    now = _process_start(pid)
    # Gone, or its pid now belongs to another process, or a zombie nobody reaped yet: it will not tell.
    return now is None or now[0] != start or now[1] in ("Z", "X")


# ---------------------------------------------------------------------------
# Retries, Optuna's way


def _retry_callback(max_retry: int | None) -> Any:
    """Optuna's retry callback: RetryHeartbeatStaleTrialCallback from 4.9, RetryFailedTrialCallback before."""
    import optuna

    cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
           or optuna.storages.RetryFailedTrialCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def requeue(study: "optuna.Study", trial: "optuna.trial.FrozenTrial", max_retry: int | None = 1) -> bool:
    """Queue ``trial`` (failed) again with Optuna's retry callback; True when a retry was added.

    The new trial is WAITING with the same parameters (and the same fixed
    parameters, if it was enqueued), so the next ``ask()`` of any worker
    runs it; ``RetryFailedTrialCallback.retried_trial_number()`` names the
    original trial, ``retry_history()`` every attempt. Nothing is added once
    ``max_retry`` retries of the original were made (None: no limit).
    """
    import optuna

    history = list(trial.system_attrs.get("retry_history", []))
    if max_retry is not None and len(history) + 1 > max_retry:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _retry_callback(max_retry)(study, trial)
    return True


def _failed_trial(study: "optuna.Study", number: int) -> "optuna.trial.FrozenTrial | None":
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number == number:
            return t
    return None


def requeue_orphans(study: "optuna.Study", max_retry: int | None = 1) -> list[int]:
    """Fail and requeue the trials an earlier start of this worker left RUNNING; returns their numbers.

    A trial counts as this worker's when its ``memguard_owner`` names this
    machine and this worker (``MEMGUARD_WORKER``) and that process is gone
    (its pid is free or taken by another process, or the machine restarted
    since). Each is told FAIL and queued again with :func:`requeue`, and
    memguard is told (``trial_requeued`` in its log). Outside memguard it
    does nothing. :func:`optimize` calls it before it asks for a trial.
    """
    from optuna.trial import TrialState

    me = _owner()
    if me is None:
        return []
    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(ATTR_OWNER)
        if not isinstance(owner, dict) or owner.get("host") != me["host"] or owner.get("worker") != me["worker"]:
            continue
        if not _owner_gone(owner):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - finished meanwhile (Optuna's heartbeat, another worker): not ours
            continue
        added = requeue(study, t, max_retry)
        original = t.system_attrs.get("failed_trial", t.number)
        detail = (f"trial {t.number}, left RUNNING by an earlier start of {me['worker']} (pid {owner.get('pid')}, "
                  f"gone), was failed and " + (f"queued again (a retry of trial {original})" if added else
                                                f"not retried: its {max_retry} retries are used up"))
        print(f"memguard: {detail}", file=sys.stderr, flush=True)
        _client.default_client().report_requeued(f"trial-{t.number}", detail)
        done.append(t.number)
    return done


# ---------------------------------------------------------------------------
# The objective wrapper and the callback between trials


def gated(objective: Callable[..., Any] | None = None, *, wait_timeout: float | None = 3600.0) -> Any:
    """Wrap an Optuna objective: each trial passes memguard's admission gate and is reported.

    The trial is named ``trial-<number>`` in memguard's events and records
    its owner (``memguard_owner``). When a stop interrupts it, the trial
    gets the user attributes ``memguard_stopped`` (why) and
    ``memguard_started`` before Optuna records it FAIL. Usable as ``@gated``
    or ``gated(objective, wait_timeout=600)``.

    Used alone (in your own ``study.optimize``), the wait at a closed gate
    happens inside the trial, which Optuna has already created; add
    :class:`MemguardCallback` to ``callbacks`` to move it between trials,
    or use :func:`optimize`, which does both.
    """
    if objective is None:
        return functools.partial(gated, wait_timeout=wait_timeout)
    obj = objective

    @functools.wraps(obj)
    def wrapper(trial: "optuna.trial.Trial", *args: Any, **kwargs: Any) -> Any:
        c = _client.default_client()
        name = f"trial-{trial.number}"
        started = False
        try:
            if c.active:
                if _state.claimed:
                    c.name_trial(name)  # claimed before Optuna created it; now it has a number
                else:
                    with _Interruptible():  # a stop may cut the wait at the gate short
                        c.claim(wait_timeout, name=name)
                _state.claimed = False
                owner = _owner()
                if owner is not None:
                    trial.set_user_attr(ATTR_OWNER, owner)
            try:
                with _Interruptible():  # ...and the objective; not the reports around them
                    started = True
                    result = obj(trial, *args, **kwargs)
            except BaseException as e:
                if c.active:
                    c.end_trial(name, False, f"{type(e).__name__}: {e}"[:500])
                raise
            if c.active:
                c.end_trial(name, True)
            return result
        except MemguardStop as stop:
            _record_stop(trial, stop, started)
            raise

    return wrapper


def _record_stop(trial: Any, stop: MemguardStop, started: bool) -> None:
    reason = stop.reason()
    stop.trials.append(StoppedTrial(trial.number, started, reason))
    try:
        trial.set_user_attr(ATTR_STOPPED, reason)
        trial.set_user_attr(ATTR_STARTED, started)
    except Exception:  # noqa: BLE001 - the FAIL Optuna records matters more than the note
        pass


class MemguardCallback:
    """A study callback for the moment between two trials: wait at the gate, then claim the next trial.

    It stops the optimisation loop when a stop signal was held (it arrived
    while Optuna was writing to its storage); otherwise it waits while
    memguard keeps the gate closed, before Optuna creates the next trial,
    and claims that trial (see :meth:`memguard.client.Client.claim`). A stop
    that arrives during the wait ends the loop at once, with no trial
    RUNNING. With ``n_trials`` it also ends the loop once the study holds
    that many COMPLETE and PRUNED trials (Optuna's ``MaxTrialsCallback``).
    """

    def __init__(self, wait_timeout: float | None = 3600.0, n_trials: int | None = None,
                 deadline: float | None = None) -> None:
        self.wait_timeout = wait_timeout
        self.n_trials = n_trials
        self.deadline = deadline  # time.monotonic() past which Optuna's timeout ends the loop anyway

    def __call__(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        from optuna.trial import TrialState

        if _state.requested is not None:
            study.stop()
            return
        if self.n_trials is not None and len(study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= self.n_trials:
            study.stop()
            return
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return  # Optuna's timeout ends the loop: no next trial to wait for
        c = _client.default_client()
        if not c.active or _state.claimed:
            return
        with _Interruptible():
            c.claim(self.wait_timeout)
        _state.claimed = True


def _exit_like_sigint(stop: MemguardStop) -> None:
    """Raise a plain KeyboardInterrupt: uncaught, the interpreter then ends by SIGINT (status 130).

    Python does that only for KeyboardInterrupt itself, not for a subclass
    (which would end with status 1, like a crash). If nothing catches it,
    the process prints one line about the stop instead of two tracebacks.
    """
    done = ", ".join(f"trial {t.number} failed and was requeued" if t.number in _requeued
                     else f"trial {t.number} failed" for t in stop.trials)
    message = f"{stop}" + (f"; {done}" if done else "; no trial was running")
    _install_quiet_hook()
    exc = KeyboardInterrupt(message)
    _quiet.add(id(exc))
    raise exc from stop


_requeued: set[int] = set()
_quiet: set[int] = set()
_hook_installed = False


def _install_quiet_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(etype: Any, value: Any, tb: Any) -> None:
        if id(value) in _quiet:
            print(f"memguard: {value}", file=sys.stderr, flush=True)
            return
        previous(etype, value, tb)

    sys.excepthook = hook


def _requeue_stopped(study: "optuna.Study", stop: MemguardStop, max_retry: int | None) -> None:
    for stopped in stop.trials:
        try:
            failed = _failed_trial(study, stopped.number)
            if failed is not None and requeue(study, failed, max_retry):
                _requeued.add(stopped.number)
        except Exception:  # noqa: BLE001 - the stop must go on
            pass


def optimize(
    study: "optuna.Study",
    objective: Callable[["optuna.trial.Trial"], Any],
    n_trials: int,
    *,
    timeout: float | None = None,
    max_retry: int | None = 1,
    wait_timeout: float | None = 3600.0,
    catch: Sequence[type[Exception]] = (MemoryError,),
    callbacks: Iterable[Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]] = (),
    gc_after_trial: bool = True,
    **kwargs: Any,
) -> None:
    """Run ``objective`` until the study holds ``n_trials`` COMPLETE or PRUNED trials, memguard-aware.

    ``n_trials`` counts the whole study (every worker, every restart).
    First the trials an earlier start of this worker left RUNNING are failed
    and queued again (:func:`requeue_orphans`). ``max_retry`` bounds the
    retries of a trial (None: no bound); ``wait_timeout`` (seconds, None
    for ever) bounds each wait at a closed admission gate, after which
    :class:`memguard.client.AdmissionTimeout` is raised and the process
    exits non-zero (memguard restarts it under ``restart: {policy:
    on-failure}``). ``timeout`` is Optuna's (seconds for this call). Other
    keyword arguments go to ``study.optimize``; ``n_jobs`` must be 1 (a stop
    can interrupt only the main thread).

    Returns when the study is complete or ``timeout`` ran out. After a
    stop, once the interrupted trial is recorded FAIL and requeued, it
    raises KeyboardInterrupt (caused by the :class:`MemguardStop`): let it
    end the process, which then exits the way SIGINT ends a program
    (status 130 in a shell), whichever of SIGINT or SIGTERM asked.
    """
    import optuna  # noqa: F401 - fail here, not in the middle of a trial, when optuna is missing
    from optuna.trial import TrialState

    if kwargs.get("n_jobs", 1) != 1:
        raise ValueError("memguard's optimize() runs one trial at a time per process (n_jobs=1); "
                         "run more workers with replicas: instead")
    if "n_trials" in kwargs:
        raise TypeError("n_trials is given once")
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    previous = install_signal_handlers()
    _state.loops += 1
    c = _client.default_client()
    try:
        try:
            requeue_orphans(study, max_retry)
            if len(study.get_trials(deepcopy=False, states=states)) >= n_trials:
                return
            between = MemguardCallback(wait_timeout, n_trials,
                                       None if timeout is None else time.monotonic() + timeout)
            if c.active:
                with _Interruptible():
                    c.claim(wait_timeout)
                _state.claimed = True
            study.optimize(gated(objective, wait_timeout=wait_timeout), n_trials=None, timeout=timeout,
                           catch=tuple(catch), callbacks=[*callbacks, between], gc_after_trial=gc_after_trial,
                           **kwargs)
        except MemguardStop as stop:
            _requeue_stopped(study, stop, max_retry)
            _exit_like_sigint(stop)
        held = _state.take()
        if held is not None:
            _exit_like_sigint(held)  # held until now; the study loop ended cleanly first
    finally:
        if _state.claimed:
            _state.claimed = False
            try:
                c.withdraw()  # the loop ended (complete, timeout, a callback's stop) before the claimed trial
            except Exception:  # noqa: BLE001
                pass
        _state.loops -= 1
        restore_signal_handlers(previous)
        if _state.loops == 0:
            _state.reset()  # the stop, if any, is on its way out; a later call starts clean


def rdb_storage(url: str, *, heartbeat_interval_s: int = 60, grace_period_s: int | None = None,
                max_retry: int | None = 1, **kwargs: Any) -> "optuna.storages.RDBStorage":
    """An ``RDBStorage`` whose heartbeat fails trials of workers that were killed outright.

    A worker killed by SIGKILL (after its grace period, or by the kernel's
    OOM killer) cannot record its trial's end. On its own machine the next
    start of that worker fails and requeues the trial (:func:`optimize`);
    the heartbeat covers the rest (the worker is not started again, or runs
    on another machine): with a heartbeat every ``heartbeat_interval_s``
    seconds, a trial silent for ``grace_period_s`` (default: twice the
    interval) is failed by the next worker that asks for a trial, and
    retried ``max_retry`` times (None: no retry) with Optuna's own retry
    callback. Works with SQLite, PostgreSQL and MySQL URLs. Other keyword
    arguments go to ``RDBStorage``.
    """
    import optuna
    import sqlalchemy.exc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if max_retry is not None:
            params = inspect.signature(optuna.storages.RDBStorage).parameters
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            if "heartbeat_stale_trial_callback" in params and retry_cls is not None:  # optuna >= 5
                kwargs.setdefault("heartbeat_stale_trial_callback", retry_cls(max_retry=max_retry))
            else:  # optuna 3.x and 4.x
                kwargs.setdefault("failed_trial_callback",
                                  optuna.storages.RetryFailedTrialCallback(max_retry=max_retry))
        # Workers started together on a new database race to create its tables; the loser sees
        # "table ... already exists" (SQLite) or a duplicate key. Once the winner is done, it works.
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval_s,
                                                  grace_period=grace_period_s, **kwargs)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


#: Five tries, 0.2 s to 0.8 s apart (2 s in all): the schema is created in well under a second.
_CREATE_ATTEMPTS = 5
