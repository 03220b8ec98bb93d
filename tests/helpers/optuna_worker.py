"""An Optuna worker for tests: memguard's optimize() on a shared study.

    optuna_worker.py STORAGE STUDY N_TRIALS

Environment: ``HOLD_CALLS`` (comma-separated numbers, counted from 1) names
this process's objective calls that print ``in-trial NUMBER PARAMS_JSON``
and then wait for a line on stdin before returning, so a test can signal
the worker in the middle of a trial, or let the trial finish when it wants.
``HANG_CALLS`` names calls that hang (sleep) until a signal ends them,
for workers whose stdin is not the test's; only in the first start of a
worker under memguard (``MEMGUARD_INCARNATION`` 1), so a restart recovers.
``HANG_ONCE`` (a path) instead: the first call, in any process, that finds
no file there creates it, prints ``hanging NUMBER``, and hangs. ``LEAK_MIB`` MiB of every trial
are kept for ever (a leak). ``MAX_RETRY`` is passed to optimize(). ``HEARTBEAT_S`` set: the storage
is memguard's rdb_storage() with that heartbeat interval. ``TRIAL_SECONDS``:
how long each trial takes (training time). Prints ``done`` when optimize()
returns.
"""

from __future__ import annotations

import json
import os
import sys
import time

import optuna

from memguard.integrations.optuna import optimize, rdb_storage


def main() -> None:
    storage, study_name, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hold = {int(x) for x in os.environ.get("HOLD_CALLS", "").split(",") if x.strip()}
    hang = {int(x) for x in os.environ.get("HANG_CALLS", "").split(",") if x.strip()}
    leak_mib = int(os.environ.get("LEAK_MIB", "0"))
    kept: list[bytes] = []
    trial_s = float(os.environ.get("TRIAL_SECONDS", "0"))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if os.environ.get("HEARTBEAT_S"):
        storage = rdb_storage(storage, heartbeat_interval_s=int(os.environ["HEARTBEAT_S"]))
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True)
    calls = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal calls
        calls += 1
        x = trial.suggest_float("x", -10.0, 10.0)
        y = trial.suggest_int("y", 0, 5)
        if calls in hold:
            print(f"in-trial {trial.number} {json.dumps(trial.params, sort_keys=True)}", flush=True)
            sys.stdin.readline()
        if calls in hang and os.environ.get("MEMGUARD_INCARNATION", "1") == "1":
            print(f"hanging {trial.number}", flush=True)
            time.sleep(3600)
        once = os.environ.get("HANG_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                print(f"hanging {trial.number} {time.monotonic():.6f}", flush=True)
                time.sleep(3600)
        if leak_mib:
            kept.append(b"\x01" * (leak_mib * 1024 * 1024))
        if trial_s:
            time.sleep(trial_s)  # the training this trial stands for
        return (x - 2.0) ** 2 + y

    optimize(study, objective, n_trials, max_retry=int(os.environ.get("MAX_RETRY", "1")))
    print("done", flush=True)


if __name__ == "__main__":
    main()
