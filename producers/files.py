"""Read query and label events from JSONL or CSV files, validating every row up front.

A labeled dataset file (``query_id, text, task, label[, options]``) serves both commands: the
query producer ignores ``label``, the label producer reads only ``query_id`` and ``label``.
CSV ``options`` are a JSON list or ``|``-separated; CSV ``metadata`` is a JSON object.

A field (or CSV column) that is neither a query's nor a label's is an error, not dropped: a
typo such as ``metdata`` would otherwise lose the metadata. So is an id given twice in one
file: two queries of one id get one decision, two labels of one id apply the first.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.events import LabelEvent, QueryEvent, describe_validation_error

QUERY_FIELDS = set(QueryEvent.model_fields)
LABEL_FIELDS = set(LabelEvent.model_fields)
#: every field a row may have: a labeled dataset's rows are both a query and its label
KNOWN_FIELDS = QUERY_FIELDS | LABEL_FIELDS


class InputFileError(ValueError):
    """The file has bad rows; the message lists them with line numbers. Nothing was sent."""


def unknown_fields(names: Collection[str], what: str = "field") -> str | None:
    """Why ``names`` are not all fields of a query or a label (with the nearest known name),
    or None.

    >>> unknown_fields(["query_id", "text", "task", "metdata"])
    "unknown field 'metdata' (did you mean 'metadata'?)"
    >>> unknown_fields(["query_id", "label"]) is None
    True
    """
    problems = []
    for name in names:
        if name in KNOWN_FIELDS:
            continue
        near = difflib.get_close_matches(str(name), sorted(KNOWN_FIELDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        problems.append(f"unknown {what} {name!r}{hint}")
    if not problems:
        return None
    if len(problems) == 1:
        return problems[0]
    return "; ".join(problems) + f" (known: {', '.join(sorted(KNOWN_FIELDS))})"


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            bad_columns = unknown_fields([c for c in reader.fieldnames or () if c], "column")
            if bad_columns:  # told once, for the header, not on every row
                yield 1, ValueError(bad_columns)
                return
            for row in reader:
                try:
                    yield reader.line_num, _from_csv(row)
                except (json.JSONDecodeError, AttributeError) as exc:
                    yield reader.line_num, ValueError(f"bad options/metadata cell: {exc}")
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield lineno, ValueError(f"not JSON: {exc.msg}")


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
    if "options" in out:
        raw = out["options"].strip()
        out["options"] = json.loads(raw) if raw.startswith("[") else raw.split("|")
    if "metadata" in out:
        out["metadata"] = json.loads(out["metadata"])
    if "score" in out:  # a number, else left for the event's validation to name
        with contextlib.suppress(ValueError):
            out["score"] = float(out["score"])
    return out


def read_events(
    path: Path,
    kind: str,
    max_errors: int = 10,
    tasks: Collection[str] | None = None,
    tasks_from: str = "the config",
) -> list[QueryEvent | LabelEvent]:
    """All events of ``kind`` ("queries" or "labels") in the file, or :class:`InputFileError`.
    With ``tasks`` (the task names of the config ``tasks_from``), a query whose task is not one
    of them is a bad row too."""
    model, fields = (QueryEvent, QUERY_FIELDS) if kind == "queries" else (LabelEvent, LABEL_FIELDS)
    events: list[QueryEvent | LabelEvent] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}  # each id's line, for telling a repeat
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        if isinstance(row, Exception):
            errors.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: expected an object")
            continue
        unknown = unknown_fields(row)
        if unknown:
            errors.append(f"{where}: {unknown}")
            continue
        if kind == "labels" and "label" not in row and "score" not in row:
            continue  # an unlabeled query in a labeled dataset
        try:
            event = model.model_validate({k: v for k, v in row.items() if k in fields})
        except ValidationError as exc:
            errors.append(f"{where}: {describe_validation_error(exc)}")
            continue
        if tasks is not None and isinstance(event, QueryEvent) and event.task not in tasks:
            errors.append(
                f"{where}: unknown task {event.task!r} (tasks in {tasks_from}: "
                f"{', '.join(sorted(tasks)) or 'none'})"
            )
            continue
        if event.query_id in first_line:
            errors.append(
                f"{where}: query_id {event.query_id!r} repeats line {first_line[event.query_id]} "
                "(an id is one query and one label)"
            )
            continue
        first_line[event.query_id] = lineno
        events.append(event)
    if errors:
        shown = "\n  ".join(errors[:max_errors])
        more = f"\n  … and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise InputFileError(f"{len(errors)} bad rows, nothing was sent:\n  {shown}{more}")
    return events
