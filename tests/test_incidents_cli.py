"""`memguard incidents`: list, show (with the timeline drawn in the terminal), --json, export SVG and PNG.

The records are built by the real builders from a real flight recorder driven with virtual time, and
written to a store in a temporary directory; the command runs as `python -m memguard.cli` in a child
process, as a person would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from memguard.model import Explanation, Observation, ScopeMemory, Signal, WorkerSample
from memguard.report.incidents import IncidentStore, incident_for_action, incident_from_oom_kill
from memguard.report.recorder import FlightRecorder
from memguard.sense.containers import attribute_cgroup
from memguard.sense.kmsg import parse_oom_reports

GiB = 1 << 30
DATA = Path(__file__).resolve().parent / "data" / "kernel_oom"


def memguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memguard.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture()
def store(tmp_path: Path) -> IncidentStore:
    """Two incidents: memguard's own SIGTERM of a leaking worker (pending, then completed) and a kernel kill of a
    container, each with a recorded minute before it."""
    rec = FlightRecorder(window_s=120)
    ex = Explanation(rule="host-low", when="memory.available < 10%", signal="memory.available", value=1.2 * GiB,
                     threshold=1.6 * GiB, unit="bytes", display="memory.available 1.2GiB (7.5% of 16GiB) < 10% (1.6GiB)")
    act = Signal("trials-0", "trials", 4242, 3, 15, "terminate", "rule host-low", ex)
    for n in range(60):
        t = 1000.0 + n
        rec.record(Observation(at=t, scope=ScopeMemory("host", 16 * GiB, (12 - n * 0.18) * GiB),
                               workers={"trials-0": WorkerSample("trials-0", 4242, (2 + n * 0.18) * GiB)}))
    rec.record_actions(1059.0, [act])
    s = IncidentStore(tmp_path / "incidents")
    own = incident_for_action(act, wall=1.8e9, monotonic=1059.0, boot_id="b", command=["python", "train.py"],
                              ranking=[{"worker": "trials-0", "memory_bytes": 12 * GiB}],
                              timeline=rec.timeline(60, around=1059.0))
    s.write(own)
    s.complete(own.id, wall=1.8e9 + 1.5, signal=15)
    (kill,) = parse_oom_reports([l for l in (DATA / "this-machine-docker-6.18.kmsg").read_text().splitlines()
                                 if not l.startswith("#")])
    s.write(incident_from_oom_kill(kill, attribute_cgroup(kill.cgroup), wall=1.8e9 + 30, boot_id="b",
                                   timeline=rec.timeline(60, around=1059.0)))
    return s


def test_list_newest_first_and_by_query(store: IncidentStore) -> None:
    """One entry per incident, newest first, with cause and owner; a query narrows to a worker or a container."""
    out = memguard("incidents", "--dir", str(store.dir), "list")
    assert out.returncode == 0, out.stderr
    heads = [l for l in out.stdout.splitlines() if not l.startswith("    ")]
    assert len(heads) == 2 and "host_oom" in heads[0] and "docker container" in heads[0]
    assert "worker trials-0 pid 4242" in heads[1]
    only = memguard("incidents", "--dir", str(store.dir), "list", "trials-0")
    assert "trials-0" in only.stdout and "docker" not in only.stdout
    js = json.loads(memguard("incidents", "--dir", str(store.dir), "list", "--json").stdout)
    assert [i["cause"] for i in js] == ["host_oom", "host_oom"]
    bare = memguard("incidents", "--dir", str(store.dir))
    assert bare.stdout == out.stdout  # `memguard incidents` alone lists


def test_show_draws_the_timeline(store: IncidentStore) -> None:
    """show: what, how, why with the rule and the ranking, the outcome, and a block chart with the rule's
    threshold as a dashed row and the action as a mark."""
    (own,) = store.by_worker("trials-0")
    out = memguard("incidents", "--dir", str(store.dir), "show", own.id[:12])
    assert out.returncode == 1 and "2 incidents start with" in out.stderr  # both are from the same minute
    out = memguard("incidents", "--dir", str(store.dir), "show", own.id[:15])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "command: python train.py" in text
    assert "rule host-low: memory.available < 10%" in text and "1. trials-0 12GiB" in text
    assert "SIGTERM" in text and ", 1.5s after the signal" in text
    assert "memory used" in text and "╌ host-low 14.4GiB" in text  # available < 1.6GiB == used > 14.4GiB
    assert "▲" in text and "terminate trials-0" in text
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")
    js = json.loads(memguard("incidents", "--dir", str(store.dir), "show", own.id, "--json").stdout)
    assert js["id"] == own.id and js["why"]["rule"] == "host-low" and js["state"] == "complete"


def test_export_svg_and_png(store: IncidentStore, tmp_path: Path) -> None:
    """export writes a valid SVG (a line per series, the threshold dashed, the action marked) with nothing
    extra installed, and a PNG through matplotlib."""
    (own,) = store.by_worker("trials-0")
    svg = tmp_path / "t.svg"
    out = memguard("incidents", "--dir", str(store.dir), "export", own.id, "--output", str(svg))
    assert out.returncode == 0, out.stderr
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2  # memory used, trials-0 memory
    assert any(l.get("stroke-dasharray") for l in root.findall(f"{ns}line"))
    texts = [t.text or "" for t in root.iter(f"{ns}text")]
    assert "terminate trials-0" in texts and any("host-low" in t for t in texts)
    pytest.importorskip("matplotlib", reason="PNG export needs matplotlib (the plot extra)")
    png = tmp_path / "t.png"
    out = memguard("incidents", "--dir", str(store.dir), "export", own.id, "-o", str(png))
    assert out.returncode == 0, out.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_errors_are_sentences(store: IncidentStore, tmp_path: Path) -> None:
    """An unknown id, a wrong picture type, a damaged file: a sentence and an exit status, no traceback."""
    out = memguard("incidents", "--dir", str(store.dir), "show", "nope")
    assert out.returncode == 1 and "no incident 'nope'" in out.stderr and "Traceback" not in out.stderr
    (own,) = store.by_worker("trials-0")
    out = memguard("incidents", "--dir", str(store.dir), "export", own.id, "-o", str(tmp_path / "x.jpg"))
    assert out.returncode == 2 and ".svg or .png" in out.stderr
    (store.dir / "20990101-000000-deadbeef.json").write_text("{half")
    out = memguard("incidents", "--dir", str(store.dir), "list")
    assert out.returncode == 0 and "skipped" in out.stderr and "deadbeef" in out.stderr
    empty = memguard("incidents", "--dir", str(tmp_path / "none"), "list")
    assert empty.returncode == 0 and "no incidents" in empty.stdout
