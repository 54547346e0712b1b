"""Reads gtr-run's run.json through its schema, the table in docs/run-record.md.

    from models.run_record import read_run_record
    record = read_run_record("runs/mar-tiny-gtr-seed0")   # a dict, checked

A record missing a field the table says it has (for its state: finished or not, merged or not,
adaptive, profiled), or holding a value of another type, raises RunRecordError naming the folder
and the field. A row whose `when` adds a condition to its state ("adaptive, once an image is
written", "with `--replay` (absent in older records)") is checked where the field is present.
Fields the table does not know are kept (newer gtr-run versions may add some).
"""
from __future__ import annotations

import json
import os
import re

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DOC = os.path.join(_REPO, "docs", "run-record.md")

_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "list of integers": list,
    "list of objects": list,
}


class RunRecordError(ValueError):
    pass


def schema(path: str = SCHEMA_DOC) -> list[tuple[str, str, bool, str, bool]]:
    """The table's rows: (field, type, nullable, state, required): `state` is the first word of
    the `when` cell; `required` when that word is the whole cell (else the field is checked only
    where present)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|", line)
            if not m:
                continue
            field, kind, when = m.groups()
            nullable = kind.endswith(" or null")
            state = when.split()[0].rstrip(",")
            rows.append((field, kind.removesuffix(" or null"), nullable, state, when == state))
    if not rows:
        raise RunRecordError(f"{path}: no field table found")
    return rows


_MISSING = object()


def _values(node, parts: list[str]):
    """Every value at the path `parts` ('a[]', 'b', ...) under `node`, _MISSING where a field is
    absent; nothing below a null (its fields do not apply)."""
    if not parts:
        yield node
        return
    if node is None:
        return
    name = parts[0].removesuffix("[]")
    if not isinstance(node, dict) or name not in node:
        yield _MISSING
        return
    value = node[name]
    if parts[0].endswith("[]"):
        if not isinstance(value, list):
            yield _MISSING
            return
        for element in value:
            yield from _values(element, parts[1:])
    else:
        yield from _values(value, parts[1:])


def check(record: dict, where: str = "run.json") -> dict:
    """Checks `record` against the schema; returns it."""
    if not isinstance(record, dict) or "gtr_run_version" not in record:
        raise RunRecordError(f"{where}: not a gtr-run record (no `gtr_run_version`)")
    states = {"always"}
    states.add("finished" if record.get("finished", True) else "unfinished")
    if record.get("parts"):
        states.add("merged")
    if "adaptive_candidates" in (record.get("cost_per_image") or {}):
        states.add("adaptive")
    if any(isinstance(g, dict) and "kernels" in g for g in record.get("graphs") or []):
        states.add("profiled")
    for field, kind, nullable, state, required in schema():
        if required and state not in states:
            continue
        for value in _values(record, field.split(".")):
            if value is _MISSING:
                if required:
                    raise RunRecordError(f"{where}: `{field}` is missing")
                continue
            if value is None:
                if not nullable:
                    raise RunRecordError(f"{where}: `{field}` is null")
                continue
            want = _TYPES.get(kind)
            numeric = kind in ("integer", "number")
            if want and (not isinstance(value, want) or (numeric and isinstance(value, bool))):
                raise RunRecordError(f"{where}: `{field}` should be {kind}, found {type(value).__name__}")
            if kind == "list of integers" and not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in value):
                raise RunRecordError(f"{where}: `{field}` should be {kind}")
    return record


def read_run_record(folder: str) -> dict:
    """The checked record of the run in `folder`."""
    path = os.path.join(folder, "run.json")
    with open(path, encoding="utf-8") as f:
        return check(json.load(f), path)
