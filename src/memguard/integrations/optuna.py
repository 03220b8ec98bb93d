"""Optuna workers under memguard: gated trials, clean stops, retries, restarts.

``pip install memguard[optuna]``. Optuna is imported inside the functions
that need it.

The short version::

    import optuna
    from memguard.integrations.optuna import optimize

    study = optuna.load_study(study_name="search", storage="sqlite:////var/lib/exp/search.db")
    optimize(study, objective, n_trials=500)

What :func:`optimize` does, and why:

- **Admission.** Between two trials it waits at the worker's admission gate
  while memguard keeps it closed (``block``), *before* Optuna creates the
  next trial, so no trial sits RUNNING while the worker waits. Each trial
  is also wrapped in :func:`memguard.client.trial`, which reports its start
  and end to memguard (for ``recycle.max_trials``, ``trial_timeout`` and
  ``heartbeat_timeout``).
- **Stopping.** SIGINT and SIGTERM raise :class:`MemguardStop`, a
  KeyboardInterrupt, inside the running trial. Optuna records that trial
  as FAIL (a trial interrupted by SIGTERM's default action or by
  ``sys.exit()`` would stay RUNNING for ever); then the process exits.
  A signal that arrives while Optuna itself is writing to its storage
  (asking for or telling a trial) is held until the next safe point, so a
  storage transaction is never cut in half.
- **Retry.** A trial failed that way is enqueued again with the same
  parameters (``retry_of`` and ``memguard`` user attributes), at most
  ``max_retry`` times per original trial (default 1: a configuration that
  blew memory up once tends to do it again). A trial stopped before its
  objective started (while it waited at the gate) is requeued without
  counting as a retry.
- **Restarts.** ``n_trials`` counts the COMPLETE and PRUNED trials of the
  whole study, not of this process: a worker that memguard restarts goes
  on where the study is and exits 0 once the study has its trials (under
  ``restart: {policy: on-failure}`` memguard then leaves it stopped: the
  work is done).
- ``catch=(MemoryError,)``: a trial that runs out of memory is recorded
  FAIL and the worker goes on.

For a worker killed outright (SIGKILL after the grace period, or the
kernel's OOM killer), Optuna cannot record anything; use ``RDBStorage``
with ``heartbeat_interval`` so the RUNNING trial is failed at the next
``ask()``, and ``RetryHeartbeatStaleTrialCallback`` to retry it.
"""

from __future__ import annotations

import functools
import inspect
import signal
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
    "RetryStoppedTrials",
    "optimize",
    "rdb_storage",
    "ATTR_STOPPED",
    "ATTR_STARTED",
    "ATTR_RETRY_OF",
    "ATTR_REASON",
    "ATTR_RETRIES",
]

#: User attributes memguard writes. On a trial a stop failed:
ATTR_STOPPED = "memguard_stopped"  # why it was stopped ("SIGINT; admission closed: ...")
ATTR_STARTED = "memguard_started"  # False when the objective had not started (it waited at the gate)
#: On the trial enqueued to retry it:
ATTR_RETRY_OF = "retry_of"  # number of the original trial
ATTR_REASON = "memguard"  # why the original was stopped
ATTR_RETRIES = "memguard_retries"  # retries of the original used so far, this one included

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StoppedTrial:
    """A trial that a stop interrupted, as the objective wrapper saw it."""

    number: int
    params: dict[str, Any]
    user_attrs: dict[str, Any]
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
    """Process-wide: what the signal handler saw and where the main thread is."""

    def __init__(self) -> None:
        self.loops = 0  # > 0: inside optimize(), which has safe points to act on a held stop
        self.reset()

    def reset(self) -> None:
        self.requested: MemguardStop | None = None
        self.raised = False
        self.interruptible = 0  # > 0: the main thread is in an objective or a gate wait

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


def _fixed_params(trial: Any) -> dict[str, Any]:
    """Parameters an enqueued trial was given (Optuna keeps them as system attribute ``fixed_params``)."""
    fixed = getattr(trial, "_fixed_params", None)
    if isinstance(fixed, dict):
        return dict(fixed)
    try:
        attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
        return dict(attrs.get("fixed_params") or {})
    except Exception:  # noqa: BLE001 - only a better retry is lost
        return {}


def gated(objective: Callable[..., Any] | None = None, *, wait_timeout: float | None = 3600.0) -> Any:
    """Wrap an Optuna objective: each trial passes memguard's admission gate and is reported.

    The trial is named ``trial-<number>`` in memguard's events. When a
    stop interrupts it, the trial gets the user attributes
    ``memguard_stopped`` (why) and ``memguard_started`` before Optuna
    records it FAIL. Usable as ``@gated`` or ``gated(objective, wait_timeout=600)``.
    """
    if objective is None:
        return functools.partial(gated, wait_timeout=wait_timeout)
    obj = objective

    @functools.wraps(obj)
    def wrapper(trial: "optuna.trial.Trial", *args: Any, **kwargs: Any) -> Any:
        started = False
        gate = _client.trial(f"trial-{trial.number}", wait_timeout=wait_timeout)
        try:
            with _Interruptible():  # a stop may cut the wait at the gate short...
                gate.__enter__()
            try:
                with _Interruptible():  # ...and the objective; not the reports around them
                    started = True
                    result = obj(trial, *args, **kwargs)
            except BaseException:
                gate.__exit__(*sys.exc_info())
                raise
            gate.__exit__(None, None, None)
            return result
        except MemguardStop as stop:
            _record_stop(trial, stop, started)
            raise

    return wrapper


def _record_stop(trial: Any, stop: MemguardStop, started: bool) -> None:
    reason = stop.reason()
    try:
        params = {**_fixed_params(trial), **trial.params}
        user_attrs = trial.user_attrs
    except Exception:  # noqa: BLE001
        params, user_attrs = {}, {}
    stop.trials.append(StoppedTrial(trial.number, params, user_attrs, started, reason))
    try:
        trial.set_user_attr(ATTR_STOPPED, reason)
        trial.set_user_attr(ATTR_STARTED, started)
    except Exception:  # noqa: BLE001 - the FAIL Optuna records matters more than the note
        pass


class RetryStoppedTrials:
    """Enqueue again, with the same parameters, a trial that a stop failed; at most ``max_retry`` times.

    A study callback (it acts on FAIL trials carrying ``memguard_stopped``)
    that :func:`optimize` also calls directly, since Optuna re-raises a
    KeyboardInterrupt before it runs the callbacks. The new trial's user
    attributes: ``retry_of`` (the original trial's number), ``memguard``
    (why it was stopped), ``memguard_retries`` (retries used). A trial that
    never started its objective is requeued without using a retry.
    """

    def __init__(self, max_retry: int = 1) -> None:
        if max_retry < 0:
            raise ValueError("max_retry must be 0 or more")
        self.max_retry = max_retry
        self.enqueued: list[int] = []  # numbers of the trials requeued by this object
        self._seen: set[int] = set()

    def __call__(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        import optuna

        if trial.state != optuna.trial.TrialState.FAIL or ATTR_STOPPED not in trial.user_attrs:
            return
        params = {**dict(trial.system_attrs.get("fixed_params") or {}), **trial.params}
        self.requeue(study, StoppedTrial(trial.number, params, dict(trial.user_attrs),
                                         bool(trial.user_attrs.get(ATTR_STARTED, True)),
                                         str(trial.user_attrs[ATTR_STOPPED])))

    def requeue(self, study: "optuna.Study", stopped: StoppedTrial) -> bool:
        """Enqueue ``stopped`` again unless its retries are used up; True when enqueued."""
        if stopped.number in self._seen:
            return False
        self._seen.add(stopped.number)
        original = stopped.user_attrs.get(ATTR_RETRY_OF, stopped.number)
        used = int(stopped.user_attrs.get(ATTR_RETRIES, 0)) + (1 if stopped.started else 0)
        if used > self.max_retry:
            return False
        study.enqueue_trial(stopped.params, user_attrs={ATTR_RETRY_OF: original, ATTR_REASON: stopped.reason,
                                                        ATTR_RETRIES: used})
        self.enqueued.append(stopped.number)
        _requeued.add(stopped.number)
        return True


class MemguardCallback:
    """A study callback for the moment between two trials.

    It stops the optimisation loop when a stop signal was held (it arrived
    while Optuna was writing to its storage), and otherwise waits at the
    admission gate while memguard keeps it closed, before Optuna asks for
    the next trial. A stop that arrives during that wait ends the loop at
    once, with no trial RUNNING.
    """

    def __init__(self, wait_timeout: float | None = 3600.0) -> None:
        self.wait_timeout = wait_timeout

    def __call__(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        if _state.requested is not None:
            study.stop()
            return
        if getattr(study, "_stop_flag", False):
            return  # the loop ends anyway (another callback stopped it): no need to wait
        with _Interruptible():
            _client.wait_for_admission(self.wait_timeout)


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


def optimize(
    study: "optuna.Study",
    objective: Callable[["optuna.trial.Trial"], Any],
    n_trials: int,
    *,
    timeout: float | None = None,
    max_retry: int = 1,
    wait_timeout: float | None = 3600.0,
    catch: Sequence[type[Exception]] = (MemoryError,),
    callbacks: Iterable[Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]] = (),
    gc_after_trial: bool = True,
    **kwargs: Any,
) -> None:
    """Run ``objective`` until the study holds ``n_trials`` COMPLETE or PRUNED trials, memguard-aware.

    ``n_trials`` counts the whole study (every worker, every restart).
    ``max_retry`` bounds retries of a trial that a stop failed;
    ``wait_timeout`` (seconds, None for ever) bounds each wait at a closed
    admission gate, after which :class:`memguard.client.AdmissionTimeout` is
    raised and the process exits non-zero (memguard restarts it under
    ``restart: {policy: on-failure}``). ``timeout`` is Optuna's (seconds for
    this call). Other keyword arguments go to ``study.optimize``; ``n_jobs``
    must be 1 (a stop can interrupt only the main thread).

    Returns when the study is complete or ``timeout`` ran out. After a
    stop, once the interrupted trial is recorded FAIL and requeued, it
    raises KeyboardInterrupt (caused by the :class:`MemguardStop`): let it
    end the process, which then exits the way SIGINT ends a program
    (status 130 in a shell), whichever of SIGINT or SIGTERM asked.
    """
    import optuna
    from optuna.trial import TrialState

    if kwargs.get("n_jobs", 1) != 1:
        raise ValueError("memguard's optimize() runs one trial at a time per process (n_jobs=1); "
                         "run more workers with replicas: instead")
    if "n_trials" in kwargs:
        raise TypeError("n_trials is given once")
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    retry = RetryStoppedTrials(max_retry)
    previous = install_signal_handlers()
    _state.loops += 1
    try:
        with _Interruptible():
            _client.wait_for_admission(wait_timeout)
        if len(study.get_trials(deepcopy=False, states=states)) >= n_trials:
            return
        all_callbacks = [*callbacks, optuna.study.MaxTrialsCallback(n_trials, states=states), retry,
                         MemguardCallback(wait_timeout)]
        try:
            study.optimize(gated(objective, wait_timeout=wait_timeout), n_trials=None, timeout=timeout,
                           catch=tuple(catch), callbacks=all_callbacks, gc_after_trial=gc_after_trial, **kwargs)
        except MemguardStop as stop:
            for stopped in stop.trials:
                try:
                    retry.requeue(study, stopped)
                except Exception:  # noqa: BLE001 - the stop must go on
                    pass
            _exit_like_sigint(stop)
        held = _state.take()
        if held is not None:
            _exit_like_sigint(held)  # held until now; the study loop ended cleanly first
    finally:
        _state.loops -= 1
        restore_signal_handlers(previous)
        if _state.loops == 0:
            _state.reset()  # the stop, if any, is on its way out; a later call starts clean


def rdb_storage(url: str, *, heartbeat_interval_s: int = 60, grace_period_s: int | None = None,
                max_retry: int | None = 1, **kwargs: Any) -> "optuna.storages.RDBStorage":
    """An ``RDBStorage`` whose heartbeat fails trials of workers that were killed outright.

    A worker killed by SIGKILL (after its grace period, or by the kernel's
    OOM killer) cannot record its trial's end: the trial would stay RUNNING.
    With a heartbeat every ``heartbeat_interval_s`` seconds, a trial silent
    for ``grace_period_s`` (default: twice the interval) is failed by the
    next worker that asks for a trial, and retried ``max_retry`` times
    (None: no retry) with Optuna's own retry callback. Works with SQLite,
    PostgreSQL and MySQL URLs. Other keyword arguments go to ``RDBStorage``.
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
