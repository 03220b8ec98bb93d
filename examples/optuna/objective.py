"""An Optuna search whose worker leaks memory on every trial, run under memguard.

The leak is deliberate and typical: each trial's data is kept in a
module-level list (a replay buffer, a cache of datasets, a list of
checkpoints) and never released. Nothing inside the process can give that
memory back; only a restart can. memguard recycles the worker every
50 trials, restarts it early when it grows fast, and stops it before it
takes the machine down; this script makes sure no trial is lost on the
way.

Run it by hand (no memguard: the client calls do nothing)::

    python objective.py

or under memguard (see README.md)::

    memguard daemon --config examples/optuna/memguard.yaml

Environment: STUDY_STORAGE (default sqlite:////tmp/memguard-optuna.db),
STUDY_NAME (memguard-optuna), N_TRIALS (500, counted over the whole
study), LEAK_MIB_PER_TRIAL (8), TRIAL_SECONDS (0.5).
"""

from __future__ import annotations

import os
import time

import optuna

import memguard.client as mg
from memguard.integrations.optuna import optimize, rdb_storage

LEAK_MIB = int(os.environ.get("LEAK_MIB_PER_TRIAL", "8"))
TRIAL_SECONDS = float(os.environ.get("TRIAL_SECONDS", "0.5"))

_kept: list[bytes] = []  # the leak: every trial's data stays here for ever
_cache: dict[int, bytes] = {}  # a cache that is safe to drop at any moment


@mg.on_reclaim
def drop_cache() -> None:
    """memguard asked for memory back: drop what can be rebuilt. (The leak stays: it is a bug.)"""
    _cache.clear()


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    _kept.append(b"\x01" * (LEAK_MIB * 1024 * 1024))  # touched pages: real resident memory
    _cache[trial.number % 4] = b"\x02" * (1024 * 1024)
    steps = 10
    for step in range(steps):  # "training"
        time.sleep(TRIAL_SECONDS / steps)
        loss = (x - 2.0) ** 2 + lr * (steps - step)
        trial.report(loss, step)
        mg.heartbeat()  # at most one message a second; keeps heartbeat_timeout quiet
    return (x - 2.0) ** 2 + lr


def main() -> None:
    url = os.environ.get("STUDY_STORAGE", "sqlite:////tmp/memguard-optuna.db")
    name = os.environ.get("STUDY_NAME", "memguard-optuna")
    n_trials = int(os.environ.get("N_TRIALS", "500"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = rdb_storage(url, heartbeat_interval_s=30, max_retry=1)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="minimize")
    b = mg.budget()
    print(f"{mg.worker_name() or 'standalone'}: study {name}, {n_trials} trials in all, "
          f"memory budget {b['memory_limit_bytes'] or 'none'} bytes", flush=True)
    optimize(study, objective, n_trials=n_trials)
    print(f"study complete: best value {study.best_value:.4f} with {study.best_params}", flush=True)


if __name__ == "__main__":
    main()
