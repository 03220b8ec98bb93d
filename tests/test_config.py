"""The configuration loader: YAML in, policy objects out, every mistake reported with file, line and key."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from memguard.config import (
    DAEMON_KEYS,
    DEFAULT_CONFIG_DIR,
    DEFAULT_CONFIG_FILE,
    MAX_FILE_BYTES,
    MAX_ISSUES_PER_FILE,
    MAX_LIST_ITEMS,
    MAX_NODES,
    MAX_RULES,
    MAX_TOTAL_BYTES,
    MAX_WORKLOAD_FILES,
    MAX_YAML_DEPTH,
    RULE_KEYS,
    WORKLOAD_KEYS,
    ConfigError,
    ConfigIssue,
    check_config,
    check_path,
    load_config,
    load_workload_file,
)
from memguard.expr import Comparison
from memguard.policy import ActionKind, DaemonPolicy, Limits, RestartPolicy, Rule, WorkloadPolicy
from memguard.signals import SIGNALS

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"
GOOD = CONFIGS / "good"
BROKEN = CONFIGS / "broken"
REPO = HERE.parent

GiB = 1024**3
MiB = 1024**2


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the only line of ``path`` containing ``needle``."""
    hits = [i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text]
    assert len(hits) == 1, f"{needle!r} is on lines {hits} of {path}"
    return hits[0]


def write(directory: Path, name: str, text: str) -> Path:
    p = directory / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def issues_of(path: Path | str) -> list[ConfigIssue]:
    policy, issues = check_path(path)
    assert policy is None, "a configuration with problems must not yield a policy"
    return issues


def only_issue(issues: list[ConfigIssue], file: Path | str, key_path: str) -> ConfigIssue:
    found = [i for i in issues if i.file == os.path.normpath(str(file)) and i.path == key_path]
    assert len(found) == 1, f"expected one issue at {file} {key_path}, got {found} in\n" + "\n".join(map(str, issues))
    return found[0]


# ---------------------------------------------------------------------------
# The good configuration


@pytest.fixture(scope="module")
def good() -> DaemonPolicy:
    return load_config(GOOD / "memguard.yaml")


def test_good_daemon_values_convert_units(good: DaemonPolicy) -> None:
    """Every daemon key maps to its DaemonPolicy field with units converted to seconds and bytes."""
    assert good.poll_interval_s == 2.0
    assert good.fast_poll_interval_s == pytest.approx(0.05)
    assert good.scope == "host"
    assert good.dry_run is True
    assert good.protect == ("sshd", "systemd-journald")
    assert good.post_action_delay_s == 7.0
    assert good.max_fill_rate_bytes_per_s == 4 * GiB
    assert good.log_format == "json"
    assert good.log_level == "debug"
    assert good.source == f"{os.path.normpath(GOOD / 'memguard.yaml')}:1"


def test_good_paths_resolve_against_the_daemon_file(good: DaemonPolicy) -> None:
    """workloads and runtime_dir are relative to the daemon file's directory and stored absolute."""
    assert good.workloads_dir == str((GOOD / "workloads.d").resolve())
    assert good.runtime_dir == str((GOOD / "run").resolve())
    assert os.path.isabs(good.workloads_dir)


def test_good_loads_the_same_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The current directory plays no part: loading from elsewhere gives the same policy (sources aside)."""
    here = load_config(GOOD / "memguard.yaml")
    monkeypatch.chdir(tmp_path)
    there = load_config(os.path.relpath(GOOD / "memguard.yaml", tmp_path))
    assert there.workloads_dir == here.workloads_dir
    assert [w.name for w in there.workloads] == [w.name for w in here.workloads]
    assert there.workloads[1].working_dir == here.workloads[1].working_dir


def test_good_system_rules(good: DaemonPolicy) -> None:
    """System rules get scope 'system', names rules[i] or the given name, parsed when/release and sources."""
    r0, r1, r2 = good.rules
    daemon = GOOD / "memguard.yaml"
    assert r0 == Rule(
        name="rules[0]",
        when=r0.when,
        when_text="memory.available < 15%",
        action=ActionKind.BLOCK,
        scope="system",
        for_s=0.0,
        release=r0.release,
        release_text="memory.available > 25%",
        grace_s=None,
        source=f"{os.path.normpath(daemon)}:{line_of(daemon, 'memory.available < 15%')}",
    )
    assert r0.when == Comparison("memory.available", "<", 15.0, "percent", "memory.available < 15%")
    assert isinstance(r0.release, Comparison) and r0.release.threshold == 25.0
    assert (r1.name, r1.action, r1.for_s, r1.grace_s) == ("rules[1]", ActionKind.TERMINATE, 5.0, 20.0)
    assert (r2.name, r2.action, r2.release) == ("last-resort", ActionKind.KILL, None)
    assert r2.when_text == "memory.available < 512MiB or psi.full_avg10 > 40"
    assert r2.source.endswith(f":{line_of(daemon, 'name: last-resort')}")


def test_good_workloads_sorted_by_file_name_with_defaults(good: DaemonPolicy) -> None:
    """Workloads come in file-name order; a file giving only command gets every default and its file name."""
    assert [w.name for w in good.workloads] == ["inference", "trials"]
    inference = good.workloads[0]
    defaults = WorkloadPolicy(name="inference", command=("python3", "serve.py"))
    assert inference.replicas == defaults.replicas
    assert inference.priority == defaults.priority
    assert inference.grace_s == defaults.grace_s
    assert inference.stop_signal == defaults.stop_signal == signal.SIGTERM
    assert inference.restart == RestartPolicy()
    assert inference.limits == Limits()
    assert (inference.user, inference.group, inference.working_dir, inference.environment) == (None, None, None, ())
    assert inference.rules == ()


def test_good_workload_values(good: DaemonPolicy) -> None:
    """Every workload key maps to its WorkloadPolicy field, units converted."""
    t = good.workload("trials")
    assert t is not None
    assert t.command == ("python3", "optimize.py", "--study", "mnist")
    assert (t.replicas, t.priority, t.user, t.group) == (2, 10, "ml", "ml")
    assert t.working_dir == str((GOOD / "exp").resolve())
    assert dict(t.environment) == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0"}
    assert t.limits == Limits(memory_bytes=8 * GiB, runtime_s=12 * 3600.0)
    assert t.grace_s == 15.0
    assert t.stop_signal == signal.SIGINT
    assert t.restart == RestartPolicy(mode="always", backoff_min_s=2.0, backoff_max_s=30.0,
                                      budget_count=5, budget_window_s=900.0)
    assert t.source == f"{os.path.normpath(GOOD / 'workloads.d' / 'trials.yaml')}:1"
    assert t.worker_names() == ["trials-0", "trials-1"]


def test_good_workload_rules(good: DaemonPolicy) -> None:
    """Worker rules get scope 'worker', for/grace in seconds, release parsed, and the rule's own line."""
    t = good.workload("trials")
    assert t is not None
    block, terminate, leak = t.rules
    path = GOOD / "workloads.d" / "trials.yaml"
    assert block.scope == terminate.scope == leak.scope == "worker"
    assert block.action is ActionKind.BLOCK and block.release_text == "worker.memory < 75%"
    assert (terminate.for_s, terminate.grace_s) == (10.0, 20.0)
    assert leak.name == "leak" and leak.action is ActionKind.RESTART
    assert terminate.source == f"{os.path.normpath(path)}:{line_of(path, 'for: 10s')}"


def test_check_path_on_the_good_directory(good: DaemonPolicy) -> None:
    """check_path on a directory holding a daemon file validates the whole config and returns its policy."""
    policy, issues = check_path(GOOD)
    assert issues == []
    assert policy == good


def test_check_path_on_a_workload_file_and_directory() -> None:
    """check_path on a workload file, or a directory of them, checks them alone and wraps them in a default policy."""
    policy, issues = check_path(GOOD / "workloads.d" / "trials.yaml")
    assert issues == [] and policy is not None
    assert [w.name for w in policy.workloads] == ["trials"]
    assert policy.rules == () and policy.source == ""
    policy, issues = check_path(GOOD / "workloads.d")
    assert issues == [] and policy is not None
    assert [w.name for w in policy.workloads] == ["inference", "trials"]


def test_load_workload_file() -> None:
    """load_workload_file returns the same WorkloadPolicy the daemon's load builds."""
    w = load_workload_file(GOOD / "workloads.d" / "trials.yaml")
    assert w == load_config(GOOD / "memguard.yaml").workload("trials")


def test_shipped_example_config_is_valid() -> None:
    """The production example in config/ (memguard.yaml and workloads.d/) passes the checks."""
    policy, issues = check_path(REPO / "config" / "memguard.yaml")
    assert issues == []
    assert policy is not None and [w.name for w in policy.workloads] == ["example-trials"]
    assert policy.runtime_dir == "/run/memguard"


def test_docs_example_is_valid(tmp_path: Path) -> None:
    """The example at the top of docs/policy.md loads as written."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "policy.md").read_text(), re.S)
    write(tmp_path, "memguard.yaml", blocks[0])
    write(tmp_path, "workloads.d/trials.yaml", blocks[1])
    policy = load_config(tmp_path / "memguard.yaml")
    assert len(policy.rules) == 3
    assert policy.workloads[0].limits.memory_bytes == 8 * GiB


def test_docs_cover_every_key_signal_and_action() -> None:
    """docs/policy.md names every daemon key, workload key, signal and action the loader knows."""
    text = (REPO / "docs" / "policy.md").read_text()
    words = [*DAEMON_KEYS, *WORKLOAD_KEYS, *SIGNALS, *(a.value for a in ActionKind),
             "log.format", "log.level", "limits.memory", "limits.runtime",
             "restart.policy", "restart.backoff", "restart.budget", "for", "release", "grace"]
    missing = [w for w in words if not re.search(rf"`{re.escape(w)}[`.]", text)]
    assert missing == []


def test_defaults_come_from_policy_dataclasses(tmp_path: Path) -> None:
    """A daemon file with no keys at all yields exactly DaemonPolicy()'s defaults."""
    write(tmp_path, "memguard.yaml", "{}\n")
    policy = load_config(tmp_path / "memguard.yaml")
    expected = DaemonPolicy(source=f"{os.path.normpath(tmp_path / 'memguard.yaml')}:1")
    assert policy == expected


# ---------------------------------------------------------------------------
# The broken configuration: one file per kind of mistake


@pytest.fixture(scope="module")
def broken() -> list[ConfigIssue]:
    return issues_of(BROKEN)


BROKEN_CASES = [
    # file, needle on the offending line, key path, words the message must contain
    ("typo_key.yaml", "relase:", "rules[0].relase", ["unknown key 'relase'", "did you mean 'release'?"]),
    ("bad_size.yaml", "8GiBB", "limits.memory", ["expected a size such as", "'8GiBB'"]),
    ("bad_duration.yaml", "grace: 20", "rules[1].grace", ["expected a duration such as", "20"]),
    ("unknown_action.yaml", "action: kil", "rules[0].action",
     ["expected one of " + ", ".join(a.value for a in ActionKind), "did you mean 'kill'?"]),
    ("bad_when_signal.yaml", "worker.memroy", "rules[0].when",
     ["unknown signal 'worker.memroy'", "did you mean 'worker.memory'?"]),
    ("bad_when_syntax.yaml", "(worker.memory", "rules[0].when", ["expected"]),
    ("memguard.yaml", "worker.memory > 4GiB", "rules[1].when", ["'worker.memory' is a worker signal"]),
    ("percent_without_limit.yaml", "worker.memory > 90%", "rules[1].when", ["limits.memory"]),
    ("grace_on_kill.yaml", "grace: 5s", "rules[0].grace", ["grace has no meaning for action kill"]),
    ("string_command.yaml", "command:", "command",
     ["expected a list of strings", "[python3, optimize.py, --trials, '100']"]),
    ("env_number.yaml", "OMP_NUM_THREADS", "environment.OMP_NUM_THREADS",
     ["expected a string", 'write it in quotes: OMP_NUM_THREADS: "4"']),
]


@pytest.mark.parametrize("file,needle,key_path,words", BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_file_reports_file_line_key_and_expectation(
    broken: list[ConfigIssue], file: str, needle: str, key_path: str, words: list[str]
) -> None:
    """Each broken fixture yields exactly its error, at its file, line and key path, saying what was expected."""
    path = BROKEN / file
    issue = only_issue(broken, path, key_path)
    assert issue.line == line_of(path, needle)
    for w in words:
        assert w in issue.message
    assert str(issue) == f"{os.path.normpath(path)}:{issue.line}: {key_path}: {issue.message}"
    assert [i for i in broken if i.file == os.path.normpath(path)] == [issue], "no other error in this file"


def test_broken_all_errors_reported_at_once(broken: list[ConfigIssue]) -> None:
    """load_config raises one ConfigError listing the errors of every file, one line each, in file order."""
    with pytest.raises(ConfigError) as exc:
        load_config(BROKEN / "memguard.yaml")
    errors = exc.value.errors
    assert errors == broken
    assert len(errors) == len(BROKEN_CASES)
    assert {Path(e.file).name for e in errors} == {c[0] for c in BROKEN_CASES}
    assert str(exc.value).splitlines() == [str(e) for e in errors]
    assert errors[0].file.endswith("memguard.yaml"), "the daemon file comes first"
    workload_files = [e.file for e in errors[1:]]
    assert workload_files == sorted(workload_files), "then workload files by name"


def test_config_error_survives_pickling(broken: list[ConfigIssue]) -> None:
    """A ConfigError crossing a process boundary keeps its structured issues."""
    err = pickle.loads(pickle.dumps(ConfigError(broken)))
    assert err.errors == broken


# ---------------------------------------------------------------------------
# More mistakes, written on the spot


def test_yaml_syntax_error_has_file_and_line(tmp_path: Path) -> None:
    """Bad YAML is reported with its file and line, not as a traceback."""
    p = write(tmp_path, "memguard.yaml", "poll_interval: 1s\nrules:\n  - {when: \"memory.available < 5%\", action: kill\n")
    [issue] = issues_of(p)
    assert issue.file == str(p) and issue.line >= 3
    assert issue.message.startswith("invalid YAML")


def test_tab_indentation_is_a_yaml_error(tmp_path: Path) -> None:
    """A tab in indentation is reported at its line."""
    p = write(tmp_path, "w.yaml", "name: w\ncommand:\n\t- python3\n")
    [issue] = issues_of(p)
    assert issue.line == 3 and "invalid YAML" in issue.message


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    """An empty file and a file holding a list are errors, not silently empty policies."""
    empty = write(tmp_path, "empty.yaml", "# nothing\n")
    listing = write(tmp_path, "list.yaml", "- a\n- b\n")
    [e] = issues_of(empty)
    assert "empty" in e.message
    [l] = issues_of(listing)
    assert l.line == 1 and "expected a mapping" in l.message and "got a list" in l.message


def test_missing_workloads_directory_names_the_key(tmp_path: Path) -> None:
    """A workloads directory that does not exist is an error on the workloads key."""
    p = write(tmp_path, "memguard.yaml", "poll_interval: 1s\nworkloads: nowhere/\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (2, "workloads")
    assert str(tmp_path / "nowhere") in issue.message and "does not exist" in issue.message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    """A key given twice is an error: YAML would otherwise keep the last one silently."""
    p = write(tmp_path, "w.yaml", "name: w\ncommand: [a]\nrules:\n  - when: \"worker.memory > 1GiB\"\n"
                                  "    action: block\n    action: kill\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (6, "rules[0].action")
    assert "duplicate key 'action' (first given at line 5)" in issue.message


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path) -> None:
    """An unknown key with no near match lists the keys that are allowed there."""
    p = write(tmp_path, "w.yaml", "name: w\ncommand: [a]\nrestart: {policy: always, zzz: 1}\n")
    [issue] = issues_of(p)
    assert issue.path == "restart.zzz"
    assert "known keys here: policy, backoff, budget" in issue.message


def test_key_in_the_wrong_file_says_where_it_belongs(tmp_path: Path) -> None:
    """A daemon key in a workload file, or a workload key in the daemon file, says which file it belongs in."""
    w = write(tmp_path, "w.yaml", "name: w\ncommand: [a]\npoll_interval: 1s\n")
    [issue] = issues_of(w)
    assert issue.path == "poll_interval" and "daemon file" in issue.message
    d = write(tmp_path / "d", "memguard.yaml", "poll_interval: 1s\nreplicas: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(d)
    [issue] = exc.value.errors
    assert (issue.line, issue.path) == (2, "replicas") and "workload file" in issue.message


def test_poll_intervals_are_ordered(tmp_path: Path) -> None:
    """fast_poll_interval longer than poll_interval is an error; zero intervals are errors."""
    p = write(tmp_path, "a.yaml", "poll_interval: 100ms\nfast_poll_interval: 1s\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (2, "fast_poll_interval")
    q = write(tmp_path / "b", "memguard.yaml", "poll_interval: 0s\n")
    [issue] = issues_of(q)
    assert issue.path == "poll_interval" and "greater than zero" in issue.message


def test_bare_number_duration_is_refused(tmp_path: Path) -> None:
    """poll_interval: 1 is ambiguous (second or millisecond?) and refused with the units' message."""
    p = write(tmp_path, "memguard.yaml", "poll_interval: 1\n")
    [issue] = issues_of(p)
    assert issue.path == "poll_interval" and "add a unit" in issue.message


def test_enumerations_suggest_the_nearest_value(tmp_path: Path) -> None:
    """scope, log.format, log.level and restart.policy accept only their values and suggest the nearest."""
    p = write(tmp_path, "memguard.yaml", "scope: hots\nlog: {format: jsn, level: warn}\n")
    issues = issues_of(p)
    assert "did you mean 'host'?" in only_issue(issues, p, "scope").message
    assert "did you mean 'json'?" in only_issue(issues, p, "log.format").message
    assert "did you mean 'warning'?" in only_issue(issues, p, "log.level").message


def test_workload_value_checks(tmp_path: Path) -> None:
    """replicas bounds, names, users, signals, backoff order, budget count and command items are all checked."""
    p = write(tmp_path, "w.yaml", "\n".join([
        "name: 'bad name'",                      # 1
        "command: [python3, 10, '']",            # 2
        "replicas: 0",                           # 3
        "user: -root",                           # 4
        "stop_signal: SIGTREM",                  # 5
        "restart: {backoff: 60s..1s, budget: 0/10m}",  # 6
        "limits: {runtime: 0s}",                 # 7
        "priority: 1.5",                         # 8
        "working_dir: 12",                       # 9
        "replicas_: 1",                          # 10
    ]) + "\n")
    issues = issues_of(p)
    by_path = {i.path: i for i in issues}
    assert by_path["name"].line == 1
    assert "put it in quotes" in by_path["command[1]"].message and by_path["command[1]"].line == 2
    assert "empty string" in by_path["command[2]"].message
    assert "at least 1" in by_path["replicas"].message
    assert "user name" in by_path["user"].message
    assert "did you mean 'SIGTERM'?" in by_path["stop_signal"].message
    assert "longer than its maximum" in by_path["restart.backoff"].message
    assert "at least 1 restart" in by_path["restart.budget"].message
    assert "greater than zero" in by_path["limits.runtime"].message
    assert "whole number" in by_path["priority"].message
    assert by_path["working_dir"].line == 9
    assert "did you mean 'replicas'?" in by_path["replicas_"].message
    assert len(issues) == 12


def test_backoff_forms(tmp_path: Path) -> None:
    """backoff takes MIN..MAX or one duration (a fixed wait); a zero minimum and a reversed range are refused."""
    for text, expected in [("2s..30s", (2.0, 30.0)), ("5s", (5.0, 5.0)), ("500ms..1m", (0.5, 60.0))]:
        p = write(tmp_path, "w.yaml", f"command: [a]\nrestart: {{backoff: {text}}}\n")
        r = load_workload_file(p).restart
        assert (r.backoff_min_s, r.backoff_max_s) == expected
    for text in ["0s..10s", "10s..1s", "1..10", "fast"]:
        p = write(tmp_path, "w.yaml", f"command: [a]\nrestart: {{backoff: {text}}}\n")
        [issue] = issues_of(p)
        assert (issue.line, issue.path) == (2, "restart.backoff"), text


def test_replicas_upper_bound(tmp_path: Path) -> None:
    """More than 1024 replicas is refused as a likely typo."""
    p = write(tmp_path, "w.yaml", "command: [a]\nreplicas: 10000\n")
    [issue] = issues_of(p)
    assert issue.path == "replicas" and "at most 1024" in issue.message


def test_stop_signal_forms(tmp_path: Path) -> None:
    """stop_signal accepts SIGINT, INT, a number, lower case; SIGSTOP is refused."""
    for text, expected in [("SIGINT", signal.SIGINT), ("INT", signal.SIGINT), ("15", signal.SIGTERM),
                           ("sigusr1", signal.SIGUSR1), ("'9'", signal.SIGKILL)]:
        p = write(tmp_path, "w.yaml", f"command: [a]\nstop_signal: {text}\n")
        assert load_workload_file(p).stop_signal == expected
    p = write(tmp_path, "w.yaml", "command: [a]\nstop_signal: SIGSTOP\n")
    [issue] = issues_of(p)
    assert issue.path == "stop_signal"


def test_workload_names_unique_across_files(tmp_path: Path) -> None:
    """Two workload files with the same name: the second one is an error pointing at the first."""
    write(tmp_path, "memguard.yaml", "workloads: w\n")
    write(tmp_path, "w/a.yaml", "name: same\ncommand: [a]\n")
    b = write(tmp_path, "w/b.yaml", "# b\nname: same\ncommand: [b]\n")
    issues = issues_of(tmp_path)
    [issue] = issues
    assert (issue.file, issue.line, issue.path) == (str(b), 2, "name")
    assert f"already used by {tmp_path / 'w' / 'a.yaml'}:1" in issue.message


def test_bare_number_size_in_expression_is_refused(tmp_path: Path) -> None:
    """'worker.memory > 50' would mean 50 bytes: refused, so a missing unit cannot disarm a rule."""
    p = write(tmp_path, "w.yaml", "command: [a]\nrules:\n  - {when: \"worker.memory > 50\", action: warn}\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (3, "rules[0].when")
    assert "50 bytes" in issue.message


def test_percentage_above_100_is_refused_where_impossible(tmp_path: Path) -> None:
    """memory.available < 150% is always true; the rule is refused. worker.memory > 120% is allowed."""
    p = write(tmp_path, "memguard.yaml", "rules:\n  - {when: \"memory.available < 150%\", action: warn}\n")
    [issue] = issues_of(p)
    assert issue.path == "rules[0].when" and "never above 100%" in issue.message
    q = write(tmp_path, "w.yaml", "command: [a]\nlimits: {memory: 1GiB}\n"
                                  "rules: [{when: \"worker.memory > 120%\", action: kill}]\n")
    assert load_workload_file(q).rules[0].when.threshold == 120.0  # type: ignore[union-attr]


def test_release_on_any_action_and_missing_keys(tmp_path: Path) -> None:
    """release is accepted on a kill rule; a rule without when or action names the missing key at the rule."""
    p = write(tmp_path, "w.yaml", "\n".join([
        "command: [a]",
        "rules:",
        "  - {when: \"worker.memory > 1GiB\", action: kill, release: \"worker.memory < 1GiB\"}",
        "  - {action: warn}",
        "  - {when: \"worker.memory > 1GiB\"}",
    ]) + "\n")
    issues = issues_of(p)
    assert [(i.line, i.path) for i in issues] == [(4, "rules[1].when"), (5, "rules[2].action")]
    assert all(i.message.startswith("missing") for i in issues)


def test_duplicate_rule_names(tmp_path: Path) -> None:
    """Two rules of one file with the same name: the second is an error."""
    p = write(tmp_path, "memguard.yaml", "rules:\n"
              "  - {name: x, when: \"memory.available < 5%\", action: warn}\n"
              "  - {name: x, when: \"memory.available < 2%\", action: kill}\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (3, "rules[1].name")


def test_max_fill_rate_forms(tmp_path: Path) -> None:
    """max_fill_rate takes a size per second, written bare or with /s, /m or /h."""
    for text, rate in [("6000MiB", 6000 * MiB), ("6000MiB/s", 6000 * MiB), ("60GiB/m", GiB)]:
        write(tmp_path, "memguard.yaml", f"max_fill_rate: {text}\n")
        assert load_config(tmp_path / "memguard.yaml").max_fill_rate_bytes_per_s == rate
    write(tmp_path, "memguard.yaml", "max_fill_rate: fast\n")
    [issue] = issues_of(tmp_path / "memguard.yaml")
    assert issue.path == "max_fill_rate"


def test_merge_keys_and_anchors(tmp_path: Path) -> None:
    """YAML anchors and << merges work inside one file; explicit keys win over merged ones."""
    p = write(tmp_path, "w.yaml", "\n".join([
        "command: [a]",
        "limits: {memory: 4GiB}",
        "rules:",
        "  - &base {when: \"worker.memory > 90%\", action: block, release: \"worker.memory < 80%\"}",
        "  - {<<: *base, action: warn, name: note}",
    ]) + "\n")
    w = load_workload_file(p)
    assert [(r.action, r.release_text, r.name) for r in w.rules] == [
        (ActionKind.BLOCK, "worker.memory < 80%", "rules[0]"),
        (ActionKind.WARN, "worker.memory < 80%", "note"),
    ]


def test_workloads_dir_ignores_other_files_and_may_be_the_config_dir(tmp_path: Path) -> None:
    """Only *.yaml/*.yml, non-hidden files are workloads; workloads: . skips the daemon file itself."""
    write(tmp_path, "memguard.yaml", "workloads: .\n")
    write(tmp_path, "a.yml", "command: [a]\n")
    write(tmp_path, "b.yaml.off", "command: [b]\n")
    write(tmp_path, ".c.yaml", "command: [c]\n")
    write(tmp_path, "sub/d.yaml", "command: [d]\n")
    policy = load_config(tmp_path / "memguard.yaml")
    assert [w.name for w in policy.workloads] == ["a"]


def test_check_path_detects_a_misspelt_workload_file(tmp_path: Path) -> None:
    """A workload file whose command: is misspelt is still checked as a workload, not as a daemon file."""
    p = write(tmp_path, "w.yaml", "name: w\ncomand: [a]\nreplicas: 2\n")
    issues = issues_of(p)
    assert "did you mean 'command'?" in only_issue(issues, p, "comand").message
    assert only_issue(issues, p, "command").message.startswith("missing")


def test_check_path_on_missing_path_and_empty_dir(tmp_path: Path) -> None:
    """check_path reports a missing path and a directory without YAML files instead of raising."""
    [issue] = issues_of(tmp_path / "nope")
    assert issue.line == 0 and str(issue) == f"{tmp_path / 'nope'}: no such file or directory"
    [issue] = issues_of(tmp_path)
    assert "no *.yaml" in issue.message


def test_check_path_dir_also_checks_loose_workload_files(tmp_path: Path) -> None:
    """In a directory with a daemon file, workload files its workloads: does not cover are checked too."""
    write(tmp_path, "memguard.yaml", "workloads: w\n")
    write(tmp_path, "w/a.yaml", "command: [a]\n")
    stray = write(tmp_path, "stray.yaml", "command: [a]\nreplicas: many\n")
    [issue] = issues_of(tmp_path)
    assert (issue.file, issue.path) == (str(stray), "replicas")


def test_non_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is an error with its line, not a crash."""
    p = tmp_path / "w.yaml"
    p.write_bytes(b"command: [a]\nname: \xff\n")
    [issue] = issues_of(p)
    assert issue.line == 2 and "UTF-8" in issue.message


# ---------------------------------------------------------------------------
# One error boundary: regressions, bounds, files that are no files


FUZZ_REGRESSIONS = sorted((BROKEN / "fuzz").glob("*.yaml"))


@pytest.mark.parametrize("path", FUZZ_REGRESSIONS, ids=[p.name for p in FUZZ_REGRESSIONS])
def test_inputs_that_crashed_the_loader_are_refused_cleanly(path: Path) -> None:
    """Each file once raised an exception out of the loader (its first line says which) or was wrongly accepted:
    now it is refused with its line and key, and neither check nor load raises anything but ConfigError."""
    result = check_config(path, host_checks=False)
    assert result.policy is None and result.errors
    for issue in result.errors:
        assert issue.line > 0 and "the file is refused" not in issue.message, str(issue)
    with pytest.raises(ConfigError):
        (load_config if b"command:" not in path.read_bytes() else load_workload_file)(path)


def test_check_cli_on_the_regressions_prints_no_traceback() -> None:
    """memguard check on the directory of former crashers: exit 1, one line per error, no traceback."""
    proc = run_memguard("check", "--no-host-checks", str(BROKEN / "fuzz"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"error(s) in {BROKEN / 'fuzz'}" in proc.stderr


def run_memguard(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = "import sys; from memguard.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          errors="replace")


def test_sizes_are_bounded_at_one_exbibyte(tmp_path: Path) -> None:
    """1 EiB (as a unit or in bytes) is the largest size; one byte more is refused, naming the bound."""
    for ok in ("1024PiB", "1EiB", str(2**60)):
        p = write(tmp_path, "w.yaml", f"command: [a]\nlimits: {{memory: {ok}}}\n")
        assert load_workload_file(p).limits.memory_bytes == 2**60
    for bad in ("1025PiB", str(2**60 + 1), "2EB", "9" * 60 + "GiB"):
        p = write(tmp_path, "w.yaml", f"command: [a]\nlimits: {{memory: {bad}}}\n")
        [issue] = issues_of(p)
        assert issue.path == "limits.memory" and "at most 1EiB" in issue.message, bad


def test_durations_are_bounded_at_a_year(tmp_path: Path) -> None:
    """365d is the longest duration; 366d is refused, naming the bound, in keys and in expressions alike."""
    p = write(tmp_path, "w.yaml", "command: [a]\nlimits: {runtime: 365d}\n")
    assert load_workload_file(p).limits.runtime_s == 365 * 86400
    p = write(tmp_path, "w.yaml", "command: [a]\nlimits: {runtime: 366d}\n")
    [issue] = issues_of(p)
    assert issue.path == "limits.runtime" and "at most 365d" in issue.message
    p = write(tmp_path, "w.yaml", "command: [a]\nrules: [{when: \"worker.age > 366d\", action: restart}]\n")
    [issue] = issues_of(p)
    assert issue.path == "rules[0].when" and "at most 365d" in issue.message


def test_counts_are_bounded(tmp_path: Path) -> None:
    """priority, restart budget, refusals and max_trials have stated ranges; past them, the bound is named."""
    cases = {
        "priority: 1000001": ("priority", "at most 1000000"),
        "restart: {budget: 1000001/1m}": ("restart.budget", "at most 1000000"),
        "restart_when_blocked: {refusals: 1000001}": ("restart_when_blocked.refusals", "at most 1000000"),
        "recycle: {max_trials: 1000001}": ("recycle.max_trials", "at most 1000000"),
        "oom_score_adj: 1001": ("oom_score_adj", "at most 1000"),
    }
    for line, (key, needle) in cases.items():
        p = write(tmp_path, "w.yaml", f"command: [a]\n{line}\n")
        [issue] = issues_of(p)
        assert issue.path == key and needle in issue.message, line


def test_numbers_longer_than_64_characters_are_not_converted(tmp_path: Path) -> None:
    """An int or float scalar of more than 64 characters is refused by its length (Python refuses 4300 digits)."""
    for text in ("9" * 65, "0x" + "f" * 63, ":".join(["59"] * 40), "1" + "0" * 70 + ".5"):
        p = write(tmp_path, "w.yaml", f"command: [a]\nreplicas: {text}\n")
        [issue] = issues_of(p)
        assert issue.path == "replicas" and "the longest memguard reads is 64" in issue.message, text


def test_file_size_is_bounded(tmp_path: Path) -> None:
    """A file of MAX_FILE_BYTES is read; one byte more is refused before it is read, naming the bound."""
    head = "command: [a]\n# "
    p = write(tmp_path, "w.yaml", head + "x" * (MAX_FILE_BYTES - len(head) - 1) + "\n")
    assert p.stat().st_size == MAX_FILE_BYTES
    assert load_workload_file(p).command == ("a",)
    p.write_text(head + "x" * (MAX_FILE_BYTES - len(head)) + "\n")
    [issue] = issues_of(p)
    assert issue.line == 0 and "the largest memguard reads is 256KiB" in issue.message


def test_total_size_of_a_configuration_is_bounded(tmp_path: Path) -> None:
    """Files that together pass MAX_TOTAL_BYTES: the first one past the bound says so."""
    write(tmp_path, "memguard.yaml", "workloads: w\n")
    per_file = MAX_FILE_BYTES - 10
    n = MAX_TOTAL_BYTES // per_file + 1
    for i in range(n):
        write(tmp_path, f"w/w{i}.yaml", "command: [a]\n# " + "x" * (per_file - 16) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "memguard.yaml")
    [issue] = exc.value.errors
    assert issue.file.endswith(f"w{n - 1}.yaml") and "together are larger than 1MiB" in issue.message


def test_number_of_workload_files_is_bounded(tmp_path: Path) -> None:
    """More than MAX_WORKLOAD_FILES workload files: one error on workloads:, none of them is read."""
    write(tmp_path, "memguard.yaml", "workloads: w\n")
    for i in range(MAX_WORKLOAD_FILES + 1):
        write(tmp_path, f"w/w{i:03}.yaml", "command: [a]\nreplicas: bad\n")
    [issue] = issues_of(tmp_path / "memguard.yaml")
    assert issue.path == "workloads" and f"at most {MAX_WORKLOAD_FILES}" in issue.message


def test_yaml_nesting_depth_is_bounded(tmp_path: Path) -> None:
    """MAX_YAML_DEPTH levels of nesting parse (and are then refused for their content); one more is a YAML error."""
    def nested(levels: int) -> str:  # the file's own mapping is the first level
        return "command: [a]\nrules: " + "[" * (levels - 1) + "]" * (levels - 1) + "\n"

    p = write(tmp_path, "w.yaml", nested(MAX_YAML_DEPTH))
    [issue] = issues_of(p)
    assert issue.path.startswith("rules[0]") and "nested deeper" not in issue.message
    p = write(tmp_path, "w.yaml", nested(MAX_YAML_DEPTH + 1))
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (2, "") and f"nested deeper than {MAX_YAML_DEPTH} levels" in issue.message


def test_number_of_yaml_values_is_bounded(tmp_path: Path) -> None:
    """More than MAX_NODES values in one configuration is refused at the line where the bound is passed."""
    p = write(tmp_path, "w.yaml", "command: [a]\nprotect:\n" + "  - a\n" * MAX_NODES)
    [issue] = issues_of(p)
    assert f"more than {MAX_NODES} YAML values" in issue.message and issue.line > 2


def test_list_lengths_and_rule_counts_are_bounded(tmp_path: Path) -> None:
    """Lists hold at most MAX_LIST_ITEMS entries and a file at most MAX_RULES rules."""
    p = write(tmp_path, "w.yaml", "command: [a]\ngpus: [" + ", ".join(["0"] * (MAX_LIST_ITEMS + 1)) + "]\n")
    [issue] = issues_of(p)
    assert issue.path == "gpus" and f"at most {MAX_LIST_ITEMS} are read" in issue.message
    rule = '  - {when: "worker.age > 1h", action: warn}\n'
    p = write(tmp_path, "w.yaml", "command: [a]\nrules:\n" + rule * (MAX_RULES + 1))
    [issue] = issues_of(p)
    assert issue.path == "rules" and f"at most {MAX_RULES} are read" in issue.message


def test_strings_the_kernel_cannot_pass_are_refused(tmp_path: Path) -> None:
    """Command words and environment values of MAX_ARG_STRLEN bytes or with a NUL are refused: exec would fail."""
    big = "x" * (128 * 1024)
    for body, key in ((f"command: [a, {big}]", "command[1]"), (f"command: [a]\nenvironment: {{A: {big}}}", "environment.A"),
                      ('command: ["a\\0b"]', "command[0]")):
        p = write(tmp_path, "w.yaml", body + "\n")
        [issue] = issues_of(p)
        assert issue.path == key, body[:40]


def test_issues_per_file_are_capped_with_a_count(tmp_path: Path) -> None:
    """A file of 250 unknown keys reports MAX_ISSUES_PER_FILE of them and one line saying how many more."""
    p = write(tmp_path, "w.yaml", "command: [a]\n" + "".join(f"k{i}: 1\n" for i in range(250)))
    issues = issues_of(p)
    assert len(issues) == MAX_ISSUES_PER_FILE + 1
    assert issues[-1].message.startswith("150 more problem(s) in this file not shown")


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO, a device, a directory and a symlink loop named as a config file are errors, never a hang."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    (tmp_path / "dir.yaml").mkdir()
    for path, needle in ((fifo, "special file"), (Path("/dev/zero"), "special file"), (loop, "cannot be read"),
                         (tmp_path / "dir.yaml", "got a directory")):
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        [issue] = exc.value.errors
        assert needle in issue.message, (path, issue)
    text_file = write(tmp_path, "plain.yaml", "x: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(text_file / "below.yaml")
    assert "cannot be read" in exc.value.errors[0].message


def test_binary_content_is_a_yaml_error_with_its_line(tmp_path: Path) -> None:
    """NUL and other control bytes are reported at their line, as YAML errors."""
    p = tmp_path / "w.yaml"
    p.write_bytes(b"command: [a]\nname: w\nx: \x00\x01\x02\n")
    [issue] = issues_of(p)
    assert issue.line == 3 and "not allowed in YAML text" in issue.message


def test_messages_quote_long_values_cut_short(tmp_path: Path) -> None:
    """A 100 000-character value in a message is cut to a short quote with its length."""
    p = write(tmp_path, "w.yaml", "command: [a]\nstop_signal: " + "x" * 100_000 + "\nworking_dir: " + "y" * 5000 + "\n")
    issues = issues_of(p)
    assert {i.path for i in issues} == {"stop_signal", "working_dir"}
    assert all(len(i.message) < 400 for i in issues), [len(i.message) for i in issues]


def test_load_config_is_safe_in_worker_threads() -> None:
    """load_config from eight threads at once, on good and hostile files alike, gives what it gives serially."""
    import concurrent.futures

    def outcome(path: Path) -> object:
        try:
            return load_config(path).workloads
        except ConfigError as e:
            return [str(i) for i in e.errors]

    paths = [GOOD / "memguard.yaml", BROKEN / "memguard.yaml"] + [p for p in FUZZ_REGRESSIONS if b"command:" not in
                                                                  p.read_bytes()]
    serial = [outcome(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(outcome, paths)) == serial


# ---------------------------------------------------------------------------
# A release must lie past the threshold


def test_overlapping_release_is_refused_with_file_and_line(tmp_path: Path) -> None:
    """when: worker.memory > 5%, release: worker.memory < 50%: both hold from 5% to 50%, the rule would flap."""
    p = write(tmp_path, "w.yaml", "command: [a]\nlimits: {memory: 8GiB}\nrules:\n"
                                  "  - {when: \"worker.memory > 5%\", action: block, release: \"worker.memory < 50%\"}\n")
    [issue] = issues_of(p)
    assert (issue.line, issue.path) == (4, "rules[0].release")
    assert "overlaps when 'worker.memory > 5%'" in issue.message and "both hold at once" in issue.message
    assert "worker.memory <= 5%" in issue.message, "it says what a release on the far side looks like"


@pytest.mark.parametrize("when, release, refused", [
    ("worker.memory > 85%", "worker.memory < 75%", False),
    ("worker.memory > 85%", "worker.memory <= 85%", False),
    ("worker.memory >= 85%", "worker.memory <= 85%", True),       # both hold at exactly 85%
    ("worker.memory > 85%", "worker.memory < 7GiB", True),        # 85% of 8GiB is 6.8GiB
    ("worker.memory > 85%", "worker.memory < 6GiB", False),
    ("worker.restarts > 2", "worker.restarts < 3", False),        # whole counts: no value between
    ("worker.restarts == 3", "worker.restarts != 4", True),
    ("worker.memory > 50% and memory.available < 10%", "memory.available > 5%", True),
    ("worker.memory > 50% and memory.available < 10%", "worker.memory < 40% or memory.available > 20%", False),
    ("worker.memory > 6GiB or worker.age > 1h", "worker.age < 2h", True),  # the or's second branch overlaps
    ("worker.growth > 5MiB/m", "worker.growth < 1MiB/s", True),
])
def test_overlap_of_worker_rules(tmp_path: Path, when: str, release: str, refused: bool) -> None:
    """Every operator, units converted through limits.memory, and/or on either side: refused only when both can hold."""
    p = write(tmp_path, "w.yaml", f"command: [a]\nlimits: {{memory: 8GiB}}\n"
                                  f"rules:\n  - {{when: \"{when}\", action: warn, release: \"{release}\"}}\n")
    issues = check_config(p, host_checks=False).errors
    assert bool(issues) == refused, issues
    if refused:
        [issue] = issues
        assert issue.path == "rules[0].release"


@pytest.mark.parametrize("when, release, refused", [
    ("memory.available < 15%", "memory.available > 25%", False),
    ("memory.available < 15%", "memory.used < 80%", False),      # used% = 100 - available%
    ("memory.available < 15%", "memory.used < 90%", True),
    ("memory.available < 15%", "memory.available > 1GiB", False),  # depends on the machine: not provable
    ("memory.available < 2GiB", "memory.available > 1GiB", True),
    ("gpu.used > 90%", "gpu.used < 80%", False),
    ("psi.some_avg10 > 20", "psi.some_avg10 < 30%", True),
])
def test_overlap_of_system_rules(tmp_path: Path, when: str, release: str, refused: bool) -> None:
    """System rules: percentages of used and available are one axis; sizes against percentages prove nothing."""
    p = write(tmp_path, "memguard.yaml", f"rules:\n  - {{when: \"{when}\", action: block, release: \"{release}\"}}\n")
    issues = check_config(p, host_checks=False).errors
    assert bool(issues) == refused, issues


def test_release_on_a_stopping_action_is_a_warning(tmp_path: Path) -> None:
    """A release on terminate has no effect (only block and warn hold): a warning, not an error, even if it overlaps."""
    p = write(tmp_path, "w.yaml", "command: [a]\nrules:\n"
                                  "  - {when: \"worker.age > 1h\", action: terminate, release: \"worker.age > 2h\"}\n")
    result = check_config(p, host_checks=False)
    assert result.ok and result.policy is not None
    [warning] = result.warnings
    assert (warning.line, warning.path) == (3, "rules[0].release") and "no effect" in warning.message


def test_shipped_release_rules_pass() -> None:
    """The shipped configurations' block rules all release past their thresholds."""
    for d in ("config", "config/demo", "src/memguard/data", "examples/optuna"):
        assert check_config(REPO / d / "memguard.yaml", host_checks=False).errors == [], d


# ---------------------------------------------------------------------------
# Checks against this machine


def _workload(tmp_path: Path, body: str) -> Path:
    return write(tmp_path, "w.yaml", "command: [python3]\n" + body)


def test_missing_user_group_directory_and_command_are_host_errors(tmp_path: Path) -> None:
    """A user, group or working_dir that does not exist here, and a command not found: errors at their lines;
    --no-host-checks (host_checks=False) accepts the same file."""
    p = write(tmp_path, "w.yaml", "\n".join([
        "command: [no-such-program-memguard]",
        "user: no-such-user-memguard",
        "group: no-such-group-memguard",
    ]) + "\n")
    errors = check_config(p).errors
    assert [(i.line, i.path) for i in errors] == [(1, "command[0]"), (2, "user"), (3, "group")]
    assert "not found in PATH=" in errors[0].message
    assert "user 'no-such-user-memguard' does not exist" in errors[1].message
    assert "group 'no-such-group-memguard' does not exist" in errors[2].message
    assert check_config(p, host_checks=False).ok
    q = _workload(tmp_path, "working_dir: nowhere\n")
    [issue] = check_config(q).errors
    assert (issue.line, issue.path) == (2, "working_dir") and f"{tmp_path / 'nowhere'} does not exist" in issue.message


def test_commands_resolve_like_exec_does(tmp_path: Path) -> None:
    """The command is looked up in PATH from the workload's environment, and relative to working_dir;
    a file that is not executable is an error."""
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (tmp_path / "bin" / "plain").write_text("data\n")
    ok = write(tmp_path, "a.yaml", f"command: [tool]\nenvironment: {{PATH: \"{tmp_path / 'bin'}\"}}\n")
    assert check_config(ok).ok
    rel = write(tmp_path, "b.yaml", "command: [./tool]\nworking_dir: bin\n")
    assert check_config(rel).ok
    not_exec = write(tmp_path, "c.yaml", "command: [./plain]\nworking_dir: bin\n")
    [issue] = check_config(not_exec).errors
    assert issue.path == "command[0]" and "is not executable" in issue.message
    missing = write(tmp_path, "d.yaml", "command: [tool]\n")  # not in the default PATH
    [issue] = check_config(missing).errors
    assert "'tool' is not found in PATH=" in issue.message


def test_numeric_user_without_an_entry_needs_a_group(tmp_path: Path) -> None:
    """uid 4242 with no passwd entry runs only with an explicit group (as act.children resolves it)."""
    import pwd

    try:
        pwd.getpwuid(4242)
        pytest.skip("uid 4242 exists on this machine")
    except KeyError:
        pass
    p = _workload(tmp_path, "user: 4242\n")
    [issue] = check_config(p).errors
    assert issue.path == "user" and "no primary group" in issue.message
    assert check_config(_workload(tmp_path, "user: 4242\ngroup: 4242\n")).ok
    assert check_config(_workload(tmp_path, "user: root\n")).ok


def test_gpu_rules_warn_when_gpu_sensing_is_off(tmp_path: Path) -> None:
    """Rules on gpu.* or worker.gpu_memory with gpu: off are a warning (not an error) at the rule's line;
    without gpu: off, whether they warn is what NVML says on this machine."""
    from memguard.sense.gpu import GpuSensor

    write(tmp_path, "memguard.yaml", "gpu: off\nworkloads: w\nrules: [{when: \"gpu.used > 90%\", action: warn}]\n")
    write(tmp_path, "w/a.yaml", "command: [python3]\nrules:\n  - {when: \"worker.gpu_memory > 2GiB\", action: kill}\n")
    result = check_config(tmp_path / "memguard.yaml", host_checks=False)
    assert result.ok
    assert [(Path(w.file).name, w.line, w.path) for w in result.warnings] == [
        ("memguard.yaml", 3, "rules[0].when"), ("a.yaml", 3, "rules[0].when")]
    assert all("gpu: off" in w.message and "never fires" in w.message for w in result.warnings)
    sensor = GpuSensor()
    try:
        here = sensor.start()
    finally:
        sensor.close()
    result = check_config(tmp_path / "w" / "a.yaml")
    assert result.ok
    if here.enabled:
        assert result.warnings == []
    else:
        [warning] = result.warnings
        assert "GPU sensing is off on this machine" in warning.message and here.reason in warning.message


def test_memory_high_warns_where_it_cannot_be_set(tmp_path: Path) -> None:
    """limits.memory_high is ignored with worker_cgroups: off, and on cgroup v1: a warning that says so."""
    from memguard.sense.cgroup import find_own_cgroup

    write(tmp_path, "memguard.yaml", "worker_cgroups: off\nworkloads: w\n")
    write(tmp_path, "w/a.yaml", "command: [python3]\nlimits: {memory: 2GiB, memory_high: 1GiB}\n")
    [warning] = check_config(tmp_path / "memguard.yaml", host_checks=False).warnings
    assert (warning.line, warning.path) == (2, "limits.memory_high") and "worker_cgroups: off" in warning.message
    result = check_config(tmp_path / "w" / "a.yaml")
    own = find_own_cgroup()
    if own is not None and own.version == 1:
        [warning] = result.warnings
        assert "cgroup v1" in warning.message and "ignored" in warning.message
    else:
        assert result.warnings == []
    assert check_config(tmp_path / "w" / "a.yaml", host_checks=False).warnings == []


# ---------------------------------------------------------------------------
# The command line


def test_check_without_a_path_checks_the_default_directory() -> None:
    """memguard check with no argument checks /etc/memguard, the directory the daemon's default file is in."""
    from memguard.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["check"]).path == DEFAULT_CONFIG_DIR == "/etc/memguard"
    assert parser.parse_args(["daemon"]).config == DEFAULT_CONFIG_FILE
    assert os.path.dirname(DEFAULT_CONFIG_FILE) == DEFAULT_CONFIG_DIR
    proc = run_memguard("check")
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
    assert "/etc/memguard" in proc.stdout + proc.stderr


def test_check_exit_codes_and_warnings() -> None:
    """Exit 0 and a summary on a good config, 0 with warnings printed, 1 with every error on stderr."""
    ok = run_memguard("check", "--no-host-checks", str(GOOD))
    assert ok.returncode == 0 and ok.stdout.startswith(f"{GOOD}: OK: 2 workload(s), 3 worker(s)")
    bad = run_memguard("check", str(BROKEN))
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1] == f"memguard check: {len(BROKEN_CASES)} error(s) in {BROKEN}"


def test_check_warnings_do_not_fail(tmp_path: Path) -> None:
    """A configuration with only warnings exits 0, prints them on stderr, and counts them in the summary."""
    write(tmp_path, "memguard.yaml", "gpu: off\nrules: [{when: \"gpu.used > 90%\", action: warn}]\n")
    proc = run_memguard("check", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"warning: {tmp_path / 'memguard.yaml'}:2: rules[0].when: GPU sensing is off")
    assert proc.stdout.strip().endswith("1 warning(s)")


def test_check_json(tmp_path: Path) -> None:
    """check --json prints ok, errors and warnings with file, line, key and message, and a summary."""
    proc = run_memguard("check", "--json", "--no-host-checks", str(BROKEN))
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["summary"] is None and doc["host_checks"] is False
    assert len(doc["errors"]) == len(BROKEN_CASES)
    first = doc["errors"][0]
    assert set(first) == {"file", "line", "key", "message"}
    assert (first["file"], first["line"], first["key"]) == (str(BROKEN / "memguard.yaml"), 6, "rules[1].when")
    proc = run_memguard("check", "--json", "--no-host-checks", str(GOOD))
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] is True and doc["errors"] == []
    assert doc["summary"] == {"workloads": 2, "workers": 3, "system_rules": 3, "workload_rules": 3}


def test_daemon_exits_78_on_a_config_error() -> None:
    """memguard daemon with a broken configuration exits 78 (EX_CONFIG) with every error and no traceback."""
    proc = run_memguard("daemon", "--config", str(BROKEN / "memguard.yaml"))
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{len(BROKEN_CASES)} error(s) in the configuration; not starting" in proc.stderr


# ---------------------------------------------------------------------------
# The JSON Schema


def _schema_validator(kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (the test extra) is not installed")
    proc = run_memguard("schema", kind)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


SHIPPED_DIRS = [REPO / "config", REPO / "config" / "demo", REPO / "src" / "memguard" / "data",
                REPO / "examples" / "optuna", GOOD]


def test_every_shipped_config_validates_against_the_schema() -> None:
    """memguard schema daemon/workload accept every shipped daemon file and workload file."""
    daemon, workload = _schema_validator("daemon"), _schema_validator("workload")
    for d in SHIPPED_DIRS:
        for p in [d / "memguard.yaml"]:
            assert [e.message for e in daemon.iter_errors(yaml.safe_load(p.read_text()))] == [], p
        for p in sorted((d / "workloads.d").glob("*.y*ml")):
            assert [e.message for e in workload.iter_errors(yaml.safe_load(p.read_text()))] == [], p


def test_the_schema_refuses_unknown_keys_and_knows_the_loaders_keys() -> None:
    """An unknown key is refused at every level, and the schema has exactly the keys the loader accepts."""
    daemon, workload = _schema_validator("daemon"), _schema_validator("workload")
    assert not daemon.is_valid({"poll_intervall": "1s"})
    assert not workload.is_valid({"command": ["a"], "limits": {"memroy": "1GiB"}})
    assert not workload.is_valid({"command": ["a"], "rules": [{"when": "worker.age > 1h", "action": "warn",
                                                                "relase": "x"}]})
    assert not workload.is_valid({"command": ["a"], "replicas": 1025})
    assert not workload.is_valid({"replicas": 2}), "command is required"
    assert workload.is_valid({"command": ["a"], "limits": {"memory": "8GiB"}, "stop_signal": "INT"})
    assert set(daemon.schema["properties"]) == set(DAEMON_KEYS)
    assert set(workload.schema["properties"]) == set(WORKLOAD_KEYS)
    assert set(workload.schema["properties"]["rules"]["items"]["properties"]) == set(RULE_KEYS)


def test_every_accepted_runtime_gives_a_runtime_rule(tmp_path: Path) -> None:
    """limits.runtime of 12 days (anything from 1e6 s) is accepted by the loader, so the core's runtime rule,
    built from it as expression text, must parse too (``:g`` would write 1.0368e+06s and crash the daemon)."""
    from memguard.decide.rules import runtime_rule

    p = write(tmp_path, "w.yaml", "command: [a]\nlimits: {runtime: 12d}\n")
    rule = runtime_rule(load_workload_file(p))
    assert rule is not None and rule.when.threshold == 12 * 86400  # type: ignore[union-attr]
