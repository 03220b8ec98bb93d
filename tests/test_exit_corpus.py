"""The exit classifier against real messages: tests/corpus/exit_messages.yaml.

Every entry is text quoted from a public bug report, forum post or documentation
page (its ``source``), with the exit status the report gives or implies and the
cause memguard must give. The tests hold the classifier to a recall of at least
95 % and no false positive for every cause, and check that an exit 0 is never a
failure whatever the text. The corpus file's own header says how entries are
written.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import yaml

from memguard.diagnose import CAUSES, NONE, diagnose_exit

CORPUS = Path(__file__).resolve().parent / "corpus" / "exit_messages.yaml"
MIN_RECALL = 0.95
"""Recall each cause must reach on the corpus."""
MIN_ENTRIES = 100
"""The corpus must hold at least this many real messages."""


def _load() -> list[dict]:
    return yaml.safe_load(CORPUS.read_text(encoding="utf-8"))


ENTRIES = _load()


def _status(entry: dict) -> tuple[int | None, int | None]:
    """(returncode, signal): the entry's, or a plain failure (exit 1) where it gives none."""
    if "signal" in entry:
        return entry.get("returncode"), entry["signal"]
    return entry.get("returncode", 1), None


def _run(entry: dict):
    returncode, sig = _status(entry)
    return diagnose_exit(returncode, sig, entry["text"].splitlines())


def test_the_corpus_is_well_formed():
    """At least 100 entries, unique ids, each with a cause from the vocabulary, an https source, a framework and
    a non-empty text; recovered entries (cause none) name the kind of line they printed."""
    assert len(ENTRIES) >= MIN_ENTRIES
    ids = [e["id"] for e in ENTRIES]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    allowed = {"id", "cause", "returncode", "signal", "evidence", "source", "framework", "text", "note"}
    for e in ENTRIES:
        assert set(e) <= allowed, (e["id"], set(e) - allowed)
        assert e["cause"] in CAUSES, e["id"]
        assert str(e["source"]).startswith("https://"), e["id"]
        assert e.get("framework") and e["text"].strip(), e["id"]
        if e["cause"] == NONE:
            assert e.get("returncode") == 0 and e.get("evidence"), e["id"]


def test_the_corpus_covers_every_kind_of_message():
    """GPU and host out-of-memory deaths, full disks, time limits, kills, near misses and recovered OOMs are
    all there, several of each."""
    counts = collections.Counter(e["cause"] for e in ENTRIES)
    for cause, least in (("gpu_oom", 30), ("host_oom", 30), ("disk_full", 5), ("timeout", 5), ("killed", 5),
                         ("exit", 10), ("none", 3)):
        assert counts[cause] >= least, (cause, counts[cause])


def test_recall_and_precision_per_cause():
    """Per cause: recall >= 95 % and no false positive (no entry of another cause classified as this one).
    A recovered entry (cause none) must also quote the line it recovered from."""
    got: dict[str, str] = {}
    misses: list[str] = []
    for e in ENTRIES:
        v = _run(e)
        got[e["id"]] = v.cause
        ok = v.cause == e["cause"]
        if ok and e.get("evidence"):
            ok = any(d.kind == e["evidence"] for d in v.findings)
        if not ok:
            misses.append(f"  {e['id']}: expected {e['cause']}, got {v.cause} ({v.detail})\n      {e['source']}")
    report = []
    for cause in sorted({e["cause"] for e in ENTRIES}):
        expected = [e["id"] for e in ENTRIES if e["cause"] == cause]
        hits = sum(got[i] == cause for i in expected)
        false_pos = [e["id"] for e in ENTRIES if e["cause"] != cause and got[e["id"]] == cause]
        recall = hits / len(expected)
        if recall < MIN_RECALL or false_pos:
            report.append(f"{cause}: recall {hits}/{len(expected)} = {recall:.0%}; false positives: "
                          f"{', '.join(false_pos) or 'none'}")
    assert not report, "\n".join(report) + "\nmisclassified:\n" + "\n".join(misses)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_exit_0_is_never_a_failure(entry):
    """Whatever a program printed, exit 0 is cause none."""
    v = diagnose_exit(0, None, entry["text"].splitlines())
    assert v.cause == NONE and not v.failed
