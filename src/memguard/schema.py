"""JSON Schemas (draft 2020-12) of the daemon file and of a workload file, for editors.

Generated from the tables the loader reads its keys and values with
(:data:`memguard.config.DAEMON_SECTION`, :data:`memguard.config.WORKLOAD_SECTION`),
so a key the loader knows is a key the schema knows, with the same kinds
of value. The schema describes form (keys, types, units, ranges); the
loader checks more (a release past its threshold, a percentage of a limit
that is set, users that exist), so ``memguard check`` has the last word.

``memguard schema daemon`` and ``memguard schema workload`` print them.
"""

from __future__ import annotations

from typing import Any

from .config import DAEMON_SECTION, WORKLOAD_SECTION, Key, Kind, ListOf, MapOf, Section

__all__ = ["daemon_schema", "workload_schema", "DIALECT"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _kind(kind: Kind | Section | ListOf | MapOf) -> dict[str, Any]:
    if isinstance(kind, Kind):
        return dict(kind.schema)
    if isinstance(kind, Section):
        return _section(kind, nullable=True)
    if isinstance(kind, ListOf):
        out: dict[str, Any] = {"type": "array" if kind.min_items else ["array", "null"],
                               "items": _kind(kind.item), "maxItems": kind.max_items}
        if kind.min_items:
            out["minItems"] = kind.min_items
        return out
    return {"type": ["object", "null"], "propertyNames": {"pattern": kind.key_pattern},
            "additionalProperties": _kind(kind.value), "maxProperties": kind.max_items}


def _key(key: Key) -> dict[str, Any]:
    out = _kind(key.kind)
    detail = out.pop("description", None)
    out["description"] = f"{key.doc} {detail}" if detail else key.doc
    return out


def _section(section: Section, nullable: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": ["object", "null"] if nullable else "object",
        "properties": {name: _key(key) for name, key in section.keys.items()},
        "additionalProperties": False,
    }
    required = [name for name, key in section.keys.items() if key.required]
    if required:
        out["required"] = required
    if section.scalar is not None:
        return {"anyOf": [dict(section.scalar.schema), out]}
    return out


def daemon_schema() -> dict[str, Any]:
    """The schema of ``memguard.yaml``, the daemon file."""
    return {"$schema": DIALECT, "title": "memguard daemon file (memguard.yaml)",
            "description": "How memguard watches the machine, its system rules, and where the workload files are. "
                           "See docs/policy.md.",
            **_section(DAEMON_SECTION, nullable=False)}


def workload_schema() -> dict[str, Any]:
    """The schema of a workload file (one file per workload in ``workloads.d/``)."""
    return {"$schema": DIALECT, "title": "memguard workload file (workloads.d/*.yaml)",
            "description": "How to run one kind of worker, its limits and its worker rules. See docs/policy.md.",
            **_section(WORKLOAD_SECTION, nullable=False)}
