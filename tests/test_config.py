"""The configuration loader: YAML in, policy objects out, every mistake reported with file, line and key."""

from __future__ import annotations

import os
import pickle
import re
import signal
from pathlib import Path

import pytest

from memguard.config import (
    DAEMON_KEYS,
    WORKLOAD_KEYS,
    ConfigError,
    ConfigIssue,
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
