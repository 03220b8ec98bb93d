"""Alert hooks (report/alerts.py, act/hooks.py): real HTTP receivers, real hook scripts, the real daemon.

The component tests drive :class:`memguard.report.alerts.Alerts` on an
asyncio loop against a receiver from the standard library's http.server
on 127.0.0.1 and against shell scripts; the end-to-end tests run
``memguard daemon`` with an ``alerts:`` section and a worker that a rule
kills.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import textwrap
from pathlib import Path

import pytest

from httpkit import Receiver
from memguard.act.hooks import run_hook
from memguard.config import check_path
from memguard.policy import AlertHook
from memguard.report.alerts import Alerts, build_payload, matches

from daemonkit import Daemon, make_cgroup, wait_gone, worker_cmd, write_config

GiB = 1024**3
DEADLINE_S = 10.0

KILL = {"worker": "trials-0", "workload": "trials", "pid": 4242, "rule": "rules[0]", "action": "kill",
        "message": "trials-0 (pid 4242): kill: rule rules[0] [worker.memory 9.1GiB > 8GiB]"}


def hook(**kw) -> AlertHook:
    kw.setdefault("name", "test")
    kw.setdefault("backoff_s", 0.05)
    return AlertHook(**kw)


class Told:
    """What the component reported about itself (alert_failed, alert_suppressed, ...), awaitable."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.arrived = asyncio.Event()

    def __call__(self, level: str, event: str, fields: dict) -> None:
        self.events.append((level, event, fields))
        self.arrived.set()

    async def wait(self, event: str, timeout: float = DEADLINE_S) -> dict:
        async def find() -> dict:
            while True:
                for _, name, fields in self.events:
                    if name == event:
                        return fields
                self.arrived.clear()
                await self.arrived.wait()
        return await asyncio.wait_for(find(), timeout)

    def named(self, event: str) -> list[dict]:
        return [f for _, name, f in self.events if name == event]


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


# ---------------------------------------------------------------------------
# filters and payload


def test_filters_by_kind_cause_and_severity():
    """A hook with events gets exactly those kinds (an exit's cause counts as a kind); without events it gets
    warning and worse; alert_* events and output lines never match (no alert loops)."""
    listed = hook(webhook="http://x/", events=("kill", "kernel_oom"))
    assert matches(listed, "warning", "kill", KILL)
    assert not matches(listed, "warning", "terminate", KILL)
    assert matches(listed, "warning", "exit", {"cause": "kernel_oom"})
    assert matches(listed, "info", "kill", KILL)  # a listed kind is wanted at any level
    plain = hook(webhook="http://x/")
    assert matches(plain, "warning", "block", {}) and matches(plain, "error", "failed", {})
    assert not matches(plain, "info", "spawn", {})
    assert not matches(hook(webhook="http://x/", severity="error"), "warning", "kill", KILL)
    assert not matches(plain, "error", "alert_failed", {}) and not matches(hook(webhook="http://x/", events=(
        "output",)), "warning", "output", {})


def test_payload_has_a_slack_text_and_every_field():
    """The JSON carries a Slack-compatible text naming the host, the event and its sentence, plus the fields."""
    p = build_payload("warning", "kill", KILL, host="gpu-07", at=0.0, suppressed=3)
    assert p["text"].startswith("memguard on gpu-07: kill: trials-0 (pid 4242): kill")
    assert "+3 more" in p["text"] and p["suppressed"] == 3
    assert p["worker"] == "trials-0" and p["fields"]["pid"] == 4242 and p["time"].startswith("1970-01-01T00:00:00")
    json.dumps(p)


def test_alerts_config_reads_and_rejects(tmp_path):
    """The issue's example parses to two hooks; a bad entry gets one clear error per problem, with its line."""
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent("""\
        alerts:
          - {webhook: "http://127.0.0.1:9000/memguard", events: [terminate, kill, incident, failed]}
          - {exec: [/usr/local/bin/page-me], events: [kill], min_interval: 1m}
        metrics: {listen: 127.0.0.1:9464}
        """))
    policy, issues = check_path(str(good))
    assert not issues and policy is not None
    assert policy.alerts[0].webhook == "http://127.0.0.1:9000/memguard" and policy.alerts[1].min_interval_s == 60
    assert policy.alerts[1].exec == ("/usr/local/bin/page-me",) and policy.metrics_listen == "127.0.0.1:9464"
    bad = tmp_path / "bad.yaml"
    bad.write_text("alerts:\n  - {webhook: 'ftp://x', exec: [a]}\n  - {timeout: 0s, exec: [b], retries: 99}\n"
                   "metrics: {listen: nine}\n")
    policy, issues = check_path(str(bad))
    text = "\n".join(str(i) for i in issues)
    assert policy is None
    assert "alerts[0].webhook: expected an http:// or https:// URL" in text
    assert "alerts[0]: give exactly one of webhook: (a URL) or exec:" in text
    assert "alerts[1].timeout" in text and "alerts[1].retries" in text
    assert "metrics.listen: expected HOST:PORT" in text and "bad.yaml:4" in text


# ---------------------------------------------------------------------------
# webhooks against a real receiver


def test_webhook_gets_one_json_post_per_event_and_dedups_repeats():
    """Each kill is one POST of JSON with the text field; the same kill of the same worker within the dedup
    window is held back, and the next alert that goes out says one was held back."""
    async def main(r: Receiver):
        told = Told()
        alerts = Alerts([hook(webhook=r.url, events=("kill",))], report=told, host="box")
        alerts.submit("warning", "kill", KILL)
        alerts.submit("warning", "kill", KILL)  # a repeat: held back
        alerts.submit("warning", "kill", dict(KILL, worker="trials-1"))
        first, second = await asyncio.to_thread(r.next), await asyncio.to_thread(r.next)
        await alerts.close()
        return told, first, second

    with Receiver() as r:
        told, first, second = asyncio.run(main(r))
        assert r.drain() == []
    body = first.json()
    assert first.path == "/memguard" and first.headers["Content-Type"] == "application/json"
    assert body["event"] == "kill" and body["worker"] == "trials-0" and body["text"].startswith("memguard on box")
    assert second.json()["worker"] == "trials-1" and second.json()["suppressed"] == 1
    assert len(told.named("alert_suppressed")) == 1


def test_webhook_retries_a_5xx_and_gives_up_on_a_4xx():
    """A 503 is retried (with backoff) and the alert then arrives; a 404 is not retried: it fails at once
    and becomes an alert_failed event that says why."""
    async def main(r: Receiver):
        told = Told()
        alerts = Alerts([hook(webhook=r.url, retries=2)], report=told)
        alerts.submit("warning", "kill", KILL)
        got = [await asyncio.to_thread(r.next) for _ in range(2)]
        alerts.submit("error", "failed", {"worker": "trials-1", "message": "budget spent"})
        got.append(await asyncio.to_thread(r.next))
        failed = await told.wait("alert_failed")
        await alerts.close()
        return told, got, failed

    with Receiver(statuses=[503, 200, 404]) as r:
        told, got, failed = asyncio.run(main(r))
        assert r.drain() == []  # the 404 was not retried
    assert [g.json()["event"] for g in got] == ["kill", "kill", "failed"]
    assert "HTTP 404" in failed["message"] and failed["alert_event"] == "failed"
    assert len(told.named("alert_failed")) == 1


def test_a_webhook_that_never_answers_is_timed_out_and_reported():
    """A receiver that accepts the connection and never answers is cut off at the hook's timeout, retried,
    then reported as alert_failed; meanwhile the loop is free (a timer set before fires on time)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"

    async def main():
        told = Told()
        alerts = Alerts([hook(webhook=url, timeout_s=0.3, retries=1)], report=told)
        ticks = []
        loop = asyncio.get_running_loop()
        for i in range(5):
            loop.call_later(0.05 * i, ticks.append, i)
        alerts.submit("warning", "kill", KILL)
        failed = await told.wait("alert_failed")
        await alerts.close()
        return failed, ticks

    try:
        failed, ticks = asyncio.run(main())
    finally:
        silent.close()
    assert "timeout" in failed["reason"]
    assert ticks == [0, 1, 2, 3, 4]


def test_a_flood_is_rate_limited_per_hook():
    """A hundred kills of a hundred workers within a second: max_per_hour 5 lets five out, holds 95 back (said
    once), and counts them; with a 1-minute min_interval the next one after the pause carries the count."""
    now = [1000.0]
    outcomes: list[tuple[str, str]] = []

    async def main(r: Receiver):
        told = Told()
        alerts = Alerts([hook(webhook=r.url, max_per_hour=5, min_interval_s=0.0),
                         hook(name="pager", webhook=r.url + "/pager", min_interval_s=60.0)],
                        report=told, clock=lambda: now[0], on_outcome=lambda h, o: outcomes.append((h, o)))
        for i in range(100):
            alerts.submit("warning", "kill", dict(KILL, worker=f"trials-{i}"))
        got = [await asyncio.to_thread(r.next) for _ in range(6)]
        now[0] += 61.0
        alerts.submit("warning", "kill", dict(KILL, worker="trials-100"))
        got.append(await asyncio.to_thread(r.next))
        await alerts.close()
        return told, got

    with Receiver() as r:
        told, got = asyncio.run(main(r))
        assert r.drain() == []
    plain = [g for g in got if g.path == "/memguard"]
    pager = [g for g in got if g.path == "/memguard/pager"]
    assert len(plain) == 5 and len(pager) == 2
    assert pager[-1].json()["suppressed"] == 99 and pager[-1].json()["worker"] == "trials-100"
    assert outcomes.count(("test", "suppressed")) == 96 and outcomes.count(("pager", "suppressed")) == 99
    assert len(told.named("alert_suppressed")) == 2  # once per hook per burst


# ---------------------------------------------------------------------------
# exec hooks against real scripts


def test_exec_hook_gets_the_event_in_env_and_json_on_stdin(tmp_path):
    """Like earlyoom -N: the command runs with MEMGUARD_EVENT, MEMGUARD_WORKER, ... set and the JSON on stdin;
    memguard's own socket variables are not passed on."""
    out = tmp_path / "out"
    page = script(tmp_path, "page-me", f"""\
        {{ echo "$MEMGUARD_EVENT $MEMGUARD_WORKER $MEMGUARD_PID $MEMGUARD_RULE ${{MEMGUARD_TOKEN:-none}}"; cat; }} \\
            > {out}.tmp && mv {out}.tmp {out}
        """)
    os.environ["MEMGUARD_TOKEN"] = "secret"
    try:
        result = run_hook((str(page),), {"MEMGUARD_EVENT": "kill", "MEMGUARD_WORKER": "trials-0",
                                         "MEMGUARD_PID": "4242", "MEMGUARD_RULE": "rules[0]"},
                          b'{"event": "kill"}', 5.0)
    finally:
        del os.environ["MEMGUARD_TOKEN"]
    assert result.returncode == 0 and not result.timed_out
    head, body = out.read_text().split("\n", 1)
    assert head == "kill trials-0 4242 rules[0] none" and json.loads(body) == {"event": "kill"}


def test_exec_hook_that_hangs_is_killed_with_its_group_and_one_that_fails_is_retried(tmp_path):
    """A hook that hangs (with a child of its own) is killed, group and all, at its timeout and reported; a hook
    that exits 3 is run again (retries: 1) and then reported with its exit code and stderr."""
    pids = tmp_path / "pids"
    runs = tmp_path / "runs"
    hang = script(tmp_path, "hang", f"""\
        sleep 3600 &
        echo $$ $! > {pids}
        wait
        """)
    fail = script(tmp_path, "fail", f"""\
        echo run >> {runs}
        echo "cannot reach the pager" >&2
        exit 3
        """)

    async def main():
        told = Told()
        alerts = Alerts([hook(name="hang", exec=(str(hang),), timeout_s=0.5, retries=0),
                         hook(name="fail", exec=(str(fail),), retries=1)], report=told, run_exec=run_hook)
        alerts.submit("warning", "kill", KILL)
        await told.wait("alert_failed")
        while len(told.named("alert_failed")) < 2:
            told.arrived.clear()
            await asyncio.wait_for(told.arrived.wait(), DEADLINE_S)
        await alerts.close()
        return {f["hook"]: f for f in told.named("alert_failed")}

    failed = asyncio.run(main())
    assert "timeout" in failed["hang"]["reason"] and "killed" in failed["hang"]["reason"]
    assert wait_gone([int(p) for p in pids.read_text().split()], DEADLINE_S) == []
    assert failed["fail"]["reason"] == "exited 3: cannot reach the pager"
    assert runs.read_text().count("run") == 2


def test_exec_hook_that_cannot_start_is_reported_once():
    """A missing program is a permanent failure: reported at once, not retried."""
    async def main():
        told = Told()
        alerts = Alerts([hook(exec=("/nonexistent/page-me",), retries=3)], report=told, run_exec=run_hook)
        alerts.submit("warning", "kill", KILL)
        failed = await told.wait("alert_failed")
        await alerts.close()
        return failed

    failed = asyncio.run(main())
    assert "cannot run /nonexistent/page-me" in failed["reason"]


# ---------------------------------------------------------------------------
# the real daemon


@pytest.fixture
def memcg():
    cg = make_cgroup(2 * GiB)
    yield cg
    cg.cleanup()


def test_daemon_posts_each_kill_within_a_second_while_a_hanging_hook_is_cut_off(tmp_path, memcg):
    """memguard daemon with a webhook and a hanging exec hook: each kill of a leaking worker reaches the
    webhook as one JSON POST less than a second after it was decided; the hanging hook is killed at its
    timeout and reported as alert_failed, and guarding goes on (the restarted worker is killed again and
    that kill is posted too)."""
    hang = script(tmp_path, "hang", "exec sleep 3600\n")
    with Receiver() as r:
        cfg = write_config(tmp_path, f"""\
            scope: host
            workloads: workloads.d/
            alerts:
              - {{webhook: "{r.url}", events: [kill]}}
              - {{exec: ["{hang}"], events: [kill], timeout: 1s, retries: 0}}
            """, {"leak": f"""\
            name: leak
            command: {worker_cmd('--rate', '100')}
            restart: {{backoff: 0.2s}}
            rules:
              - {{when: "worker.memory > 60MiB", action: kill}}
            """})
        d = Daemon(cfg, cgroup=memcg)
        try:
            kill = d.event("kill", worker="leak-0", timeout=30)
            post = r.next(timeout=30)
            body = post.json()
            assert body["event"] == "kill" and body["worker"] == "leak-0" and "worker.memory" in body["text"]
            decided = body["time"]
            from datetime import datetime

            assert post.at - datetime.fromisoformat(decided).timestamp() < 1.0
            assert kill["pid"] == body["fields"]["pid"]
            failed = d.event("alert_failed", timeout=30)
            assert "timeout" in failed["reason"] and failed["hook"] == "alerts[1]"
            d.event("kill", worker="leak-0", timeout=30)  # guarding went on: the next incarnation is killed
            second = r.next(timeout=30).json()
            assert second["event"] == "kill" and second["fields"]["pid"] != body["fields"]["pid"]
        finally:
            assert d.stop() == 0
