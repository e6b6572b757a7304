"""Read query and label events from JSONL or CSV files, validating every row up front.

A labeled dataset file (``query_id, text, task, label[, options]``) serves both commands: the
query producer ignores ``label``, the label producer reads only ``query_id`` and ``label``.
CSV ``options`` are a JSON list or ``|``-separated; CSV ``metadata`` is a JSON object.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.events import LabelEvent, QueryEvent, describe_validation_error

QUERY_FIELDS = set(QueryEvent.model_fields)
LABEL_FIELDS = set(LabelEvent.model_fields)


class InputFileError(ValueError):
    """The file has bad rows; the message lists them with line numbers. Nothing was sent."""


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
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
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        if isinstance(row, Exception):
            errors.append(f"{where}: {row}")
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: expected an object")
            continue
        if kind == "labels" and "label" not in row:
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
        events.append(event)
    if errors:
        shown = "\n  ".join(errors[:max_errors])
        more = f"\n  … and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise InputFileError(f"{len(errors)} bad rows, nothing was sent:\n  {shown}{more}")
    return events
