"""Metrics over HTTP (report/endpoint.py, report/metrics.py) and the shipped Prometheus rules and dashboard.

The live endpoint of a real daemon is parsed with the Prometheus client's
own parser (``prometheus_client.parser``); the alerting rules are checked
and unit-tested with ``promtool``; the Grafana dashboard is checked for its
structure and every query in it is parsed by ``promtool`` too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from memguard.model import Notice, Observation, Pressure, ScopeMemory
from memguard.report.endpoint import MetricsServer
from memguard.report.metrics import Metrics
from memguard.sense.psi import parse_pressure

from daemonkit import REPO, Daemon, make_cgroup, worker_cmd, write_config

GiB = 1024**3
MiB = 1024**2
RULES = REPO / "contrib" / "prometheus" / "memguard.rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "memguard.rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "memguard.json"

parser = pytest.importorskip("prometheus_client.parser", reason="the Prometheus client (test extra) is needed to "
                                                                "parse the endpoint")


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in parser.text_string_to_metric_families(text) for s in f.samples
            if s.name == name]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return path


# ---------------------------------------------------------------------------
# the text


def test_psi_totals_are_read_in_seconds():
    """The total= field of a PSI file (microseconds) becomes seconds; a file without it leaves them unknown."""
    p = parse_pressure(b"some avg10=1.00 avg60=0.50 avg300=0.10 total=2500000\n"
                       b"full avg10=0.00 avg60=0.00 avg300=0.00 total=1000\n")
    assert p.some_total_s == 2.5 and p.full_total_s == 0.001 and p.some_avg10 == 1.0
    old = parse_pressure(b"some avg10=1.00 avg60=0.50 avg300=0.10\nfull avg10=0.00 avg60=0.00 avg300=0.00\n")
    assert str(old.some_total_s) == "unknown"


def test_metrics_text_parses_and_carries_the_new_series():
    """The rendered text parses with the Prometheus client; PSI counters, incidents by cause, kernel OOM kills by
    workload and the scope's OOM counter are there with the right types."""
    m = Metrics(None, "0.1.0")
    m.count([Notice("exit", workload="hog", fields={"cause": "host_oom", "kernel_oom": True})])
    m.incident("cuda_oom")
    m.incident("cuda_oom")
    m.alert("pager", "sent")
    obs = Observation(at=1.0, scope=ScopeMemory("host", 8 * GiB, 6 * GiB, 0, 0, 3),
                      pressure=Pressure(0.0, 0.0, 0.0, 0.0, 12.5, 1.25))
    m.write(obs, {})
    fams = families(m.text())
    assert fams["memguard_memory_pressure_waiting_seconds"].type == "counter"
    assert samples(m.text(), "memguard_memory_pressure_stalled_seconds_total") == [({"scope": "host"}, 1.25)]
    assert samples(m.text(), "memguard_incidents_total") == [({"cause": "cuda_oom"}, 2.0)]
    assert samples(m.text(), "memguard_kernel_oom_kills_total") == [({"workload": "hog"}, 1.0)]
    assert samples(m.text(), "memguard_scope_oom_kills_total") == [({"scope": "host"}, 3.0)]
    assert samples(m.text(), "memguard_alerts_total") == [({"hook": "pager", "outcome": "sent"}, 1.0)]


# ---------------------------------------------------------------------------
# the server alone


def test_endpoint_answers_metrics_and_refuses_the_rest():
    """GET /metrics answers the text with Prometheus' content type; HEAD has no body; other paths are 404,
    other methods 405; a client that sends nothing is dropped without stalling the next scrape."""
    async def main():
        server = MetricsServer("127.0.0.1:0", lambda: "memguard_build_info 1\n")
        await server.start()
        host, port = server.address
        base = f"http://{host}:{port}"
        idle = socket.create_connection((host, port))  # sends nothing

        def fetch(method: str, path: str) -> tuple[int, str, str]:
            req = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.headers["Content-Type"], r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read().decode()

        got = [await asyncio.to_thread(fetch, m, p) for m, p in
               (("GET", "/metrics"), ("HEAD", "/metrics"), ("GET", "/nope"), ("POST", "/metrics"))]
        idle.close()
        await server.close()
        return got

    got = asyncio.run(main())
    assert got[0] == (200, "text/plain; version=0.0.4; charset=utf-8", "memguard_build_info 1\n")
    assert got[1][0] == 200 and got[1][2] == ""
    assert got[2][0] == 404 and got[3][0] == 405


# ---------------------------------------------------------------------------
# the real daemon


@pytest.fixture
def memcg():
    cg = make_cgroup(2 * GiB)
    yield cg
    cg.cleanup()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def test_daemon_serves_metrics_with_limits_psi_and_kernel_oom_kills_by_workload(tmp_path, memcg):
    """memguard daemon with metrics: {listen: 127.0.0.1:0} says the port it took; the live endpoint parses with
    the Prometheus client and carries each worker's limit and state, PSI as _seconds_total counters, and the
    kernel OOM kill of a worker at its cgroup limit under its workload; an address already taken is an error
    event, not a crash."""
    cfg = write_config(tmp_path, "scope: host\nworkloads: workloads.d/\nmetrics: {listen: 127.0.0.1:0}\n", {
        "hog": f"name: hog\ncommand: {worker_cmd('--rate', '300')}\nlimits: {{memory: 128MiB}}\n"
               "restart: {policy: never}\n",
        "calm": f"name: calm\ncommand: {worker_cmd()}\nlimits: {{memory: 1GiB}}\n"})
    d = Daemon(cfg, cgroup=memcg)
    try:
        port = d.event("metrics_listening", timeout=30)["port"]
        assert d.event("exit", worker="hog-0", timeout=30)["kernel_oom"] is True
        d.event("spawn", worker="calm-0", timeout=30)
        # the exit event was logged in the same loop turn that counted it, before this scrape was served
        text = scrape(port)
        fams = families(text)
        assert samples(text, "memguard_kernel_oom_kills_total") == [({"workload": "hog"}, 1.0)]
        limits = dict((l["worker"], v) for l, v in samples(text, "memguard_worker_memory_limit_bytes"))
        assert limits == {"hog-0": 128 * MiB, "calm-0": 1 * GiB}
        states = {(l["worker"], l["state"]) for l, v in samples(text, "memguard_worker_state") if v == 1}
        assert ("hog-0", "stopped") in states
        if Path("/proc/pressure/memory").exists():
            assert fams["memguard_memory_pressure_waiting_seconds"].type == "counter"
            assert samples(text, "memguard_memory_pressure_waiting_seconds_total")[0][1] >= 0
        assert "memguard_incidents" in fams and "memguard_worker_memory_bytes" in fams

        # a second daemon whose listen address is taken keeps guarding and says why
        other = tmp_path / "other"
        other.mkdir()
        cfg2 = write_config(other, f"scope: host\nworkloads: workloads.d/\nmetrics: {{listen: 127.0.0.1:{port}}}\n",
                            {"calm": f"name: calm\ncommand: {worker_cmd()}\n"})
        d2 = Daemon(cfg2, cgroup=memcg)
        try:
            failed = d2.event("metrics_listen_failed", timeout=30)
            assert str(port) in failed["message"]
            d2.event("spawn", worker="calm-0", timeout=30)
        finally:
            assert d2.stop() == 0
    finally:
        assert d.stop() == 0


# ---------------------------------------------------------------------------
# the shipped rules and dashboard


def test_prometheus_rules_pass_promtool_check_and_their_unit_tests():
    """contrib/prometheus/memguard.rules.yml passes `promtool check rules`, and its unit tests (series in, alerts
    out: a worker near its limit, a failed worker, a kernel OOM kill, memguard down) pass `promtool test rules`."""
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    unit = subprocess.run([tool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60,
                          cwd=RULES.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_is_well_formed_and_its_queries_parse(tmp_path):
    """The dashboard is JSON with a uid, a title, unique panel ids, grid positions that fit 24 columns, a
    Prometheus data source variable; every query uses only memguard series the daemon exports (or `up`) and
    parses as PromQL (checked by promtool as recording rules, Grafana's variables filled in)."""
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "memguard" and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 8
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance", "workload"} <= names
    exported = set(re.findall(r"^# TYPE (\S+)", Metrics(None, "x").render(None, {}), re.M)) | {
        "memguard_scope_memory_total_bytes", "memguard_scope_memory_available_bytes", "memguard_scope_oom_kills_total",
        "memguard_memory_pressure_waiting_seconds_total", "memguard_memory_pressure_stalled_seconds_total",
        "memguard_gpu_memory_used_bytes", "memguard_gpu_memory_total_bytes"}
    for expr in _dashboard_exprs():
        for name in re.findall(r"\b(memguard_[a-z_]+)", expr):
            assert name in exported, f"{name} in the dashboard is not a series memguard exports"
    tool = promtool()
    filled = [e.replace("$__rate_interval", "5m").replace("$instance", ".+").replace("$workload", ".+")
              for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                        for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules))
    check = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
