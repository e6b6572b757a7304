"""``metallm record``: run every configured arm on a labeled dataset, write an outcomes file.

Input: a labeled dataset (JSONL or CSV of ``query_id, text, task, label[, options]``, as
``metallm produce`` reads), or the built-in multi-task set (:func:`builtin_dataset`: 320 real
BIG-bench queries — sentiment, intent, yes/no — whose tasks are those of
``config/metallm.example.yaml``).

Each query is sent to every arm through the same gateway the service uses (prompt, answer
constrained to the label set, parse, price), with fallbacks and circuit breakers switched off so
each arm's own outcome is what gets recorded. Per arm the line holds ``prediction`` (the parsed
label; the raw answer when it could not be parsed; null when the call failed), ``cost_usd``,
``latency_ms``, tokens, ``raw_output`` and, as metallm extensions, ``status`` and ``error``.

The file is written line by line, in dataset order, and flushed as it goes: after an
interruption, running the same command again keeps the complete lines, drops a torn last line
and continues with the next query.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import AppConfig
from service.llm.base import CallRequest
from service.outcomes import OutcomeRecord, OutcomesError, parse_line
from service.tasks import build_prompt


class RecordError(ValueError):
    """The dataset, the config or an existing output file does not fit (message says why)."""


@dataclass(frozen=True)
class LabeledQuery:
    query_id: str
    text: str
    task: str
    label: str
    options: list[str] | None = None
    metadata: dict[str, Any] | None = None


def builtin_dataset() -> Path:
    """The built-in multi-task set shipped with metallm (see ``producers/data/NOTICE``)."""
    import producers

    return Path(producers.__file__).parent / "data" / "demo_queries.jsonl"


def load_dataset(path: str | Path) -> list[LabeledQuery]:
    """A labeled dataset file, validated row by row (bad rows are listed with line numbers).

    Raises :class:`producers.files.InputFileError` for malformed rows and
    :class:`RecordError` for rows without a label.
    """
    from producers.files import read_events

    path = Path(path)
    queries = read_events(path, "queries")
    labels = {e.query_id: e.label for e in read_events(path, "labels")}
    missing = [q.query_id for q in queries if q.query_id not in labels]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise RecordError(f"{path}: {len(missing)} queries have no label: {shown}")
    seen: set[str] = set()
    out = []
    for q in queries:
        if q.query_id in seen:
            raise RecordError(f"{path}: duplicate query_id {q.query_id!r}")
        seen.add(q.query_id)
        out.append(
            LabeledQuery(q.query_id, q.text, q.task, labels[q.query_id], q.options, q.metadata)
        )
    return out


def recording_config(config: AppConfig) -> AppConfig:
    """``config`` with fallbacks off and circuit breakers that never open: each arm answers for
    itself on every query."""
    arms = [
        arm.model_copy(update={"fallback": None, "breaker_failures": 1_000_000_000})
        for arm in config.arms
    ]
    gateway = config.gateway.model_copy(update={"fallback_arm": None})
    return config.model_copy(update={"arms": arms, "gateway": gateway})


def _canonical_label(label: str, options: Sequence[str]) -> str:
    """The option spelled as in the label set when the label matches one ignoring case/space."""
    for option in options:
        if option.strip().casefold() == label.strip().casefold():
            return option
    return label


def _arm_outcome(result) -> dict[str, Any]:
    if result.status == "ok":
        prediction = result.prediction
    elif result.status == "parse_error":
        prediction = result.raw_output if result.raw_output is not None else ""
    else:
        prediction = None
    out: dict[str, Any] = {
        "prediction": prediction,
        "cost_usd": float(result.cost_usd),
        "latency_ms": float(result.latency_ms),
        "status": result.status,
    }
    if result.input_tokens is not None:
        out["input_tokens"] = int(result.input_tokens)
    if result.output_tokens is not None:
        out["output_tokens"] = int(result.output_tokens)
    if result.raw_output is not None:
        out["raw_output"] = result.raw_output
    if result.error:
        out["error"] = result.error
    return out


def read_done(path: Path, dataset: Sequence[LabeledQuery], arms: Sequence[str]) -> int:
    """How many queries an existing output file already holds (0 if there is none).

    Complete lines must be valid outcomes for the first queries of ``dataset``, in order, with
    exactly ``arms``; a torn last line (no newline: the previous run was killed mid-write) is
    cut off. Anything else is an error, and the file is left alone.
    """
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # complete lines only
    lines = data[:keep].decode("utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            record = parse_line(line, i + 1)
        except OutcomesError as exc:
            raise RecordError(f"{path}: {exc}; fix or delete the file (or --overwrite)") from None
        if i >= len(dataset) or record.query_id != dataset[i].query_id:
            raise RecordError(
                f"{path}: line {i + 1} is query {record.query_id!r}, but the dataset's query "
                f"{i + 1} is {dataset[i].query_id if i < len(dataset) else 'missing'!r}: "
                "not a partial run of this dataset (use --overwrite to start again)"
            )
        if sorted(record.arms) != sorted(arms):
            raise RecordError(
                f"{path}: line {i + 1} has arms {sorted(record.arms)}, the config has "
                f"{sorted(arms)} (use --overwrite to start again)"
            )
    if keep < len(data):
        with path.open("r+b") as fh:
            fh.truncate(keep)
    return len(lines)


@dataclass
class RecordSummary:
    path: Path
    total: int
    resumed_from: int
    written: int
    seconds: float
    per_arm: dict[str, dict[str, float]]


def record(
    dataset: Sequence[LabeledQuery],
    config: AppConfig,
    out: str | Path,
    gateway=None,
    concurrency: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    on_line: Callable[[int], None] | None = None,
) -> RecordSummary:
    """Run every arm of ``config`` on ``dataset`` and append the outcomes to ``out``.

    ``gateway`` defaults to a :class:`~service.llm.gateway.Gateway` over
    :func:`recording_config`. ``concurrency`` queries are in flight at once (each to every
    arm); lines are still written in dataset order. ``on_line(i)`` is called after line ``i``
    (0-based) is flushed.
    """
    out = Path(out)
    arms = config.arm_names
    if len(arms) < 2:
        raise RecordError(f"an outcomes file needs at least 2 arms; the config has {arms}")
    unknown = sorted({q.task for q in dataset} - set(config.tasks))
    if unknown:
        raise RecordError(
            f"tasks not in the config: {', '.join(unknown)} "
            f"(configured: {', '.join(sorted(config.tasks))})"
        )
    if overwrite and out.exists():
        out.unlink()
    done = read_done(out, dataset, arms)
    out.parent.mkdir(parents=True, exist_ok=True)
    own_gateway = gateway is None
    if gateway is None:
        from service.llm.gateway import Gateway

        gateway = Gateway(recording_config(config))
    totals = {a: {"correct": 0.0, "cost_usd": 0.0, "failed": 0.0} for a in arms}
    started = time.monotonic()
    written = 0
    loop = asyncio.new_event_loop()
    try:
        with (
            out.open("a", encoding="utf-8") as fh,
            _progress(progress, len(dataset), done) as advance,
        ):
            for first in range(done, len(dataset), max(concurrency, 1)):
                chunk = dataset[first : first + max(concurrency, 1)]
                lines = loop.run_until_complete(_record_chunk(gateway, config, chunk, arms))
                for offset, line in enumerate(lines):
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                    fh.flush()
                    written += 1
                    for arm in arms:
                        outcome = line["arms"][arm]
                        totals[arm]["correct"] += outcome["prediction"] == line["label"]
                        totals[arm]["cost_usd"] += outcome["cost_usd"]
                        totals[arm]["failed"] += outcome["prediction"] is None
                    if on_line is not None:
                        on_line(first + offset)
                    advance()
                os.fsync(fh.fileno())
    finally:
        loop.close()
        if own_gateway:
            gateway.close()
    per_arm = {
        a: {
            "accuracy": t["correct"] / written if written else float("nan"),
            "cost_usd": t["cost_usd"],
            "failed": t["failed"],
        }
        for a, t in totals.items()
    }
    return RecordSummary(out, len(dataset), done, written, time.monotonic() - started, per_arm)


async def _record_chunk(
    gateway, config: AppConfig, chunk: Sequence[LabeledQuery], arms: Sequence[str]
) -> list[dict[str, Any]]:
    async def one(query: LabeledQuery) -> dict[str, Any]:
        task = config.tasks[query.task]
        options = list(query.options or task.labels)
        request = CallRequest(query.query_id, build_prompt(task, query.text, options))
        results = await asyncio.gather(*(gateway.call(arm, request) for arm in arms))
        line: dict[str, Any] = {
            "query_id": query.query_id,
            "task": query.task,
            "text": query.text,
            "options": options,
            "label": _canonical_label(query.label, options),
            "arms": {arm: _arm_outcome(r) for arm, r in zip(arms, results, strict=True)},
        }
        if query.metadata is not None:
            line["metadata"] = query.metadata
        OutcomeRecord.model_validate(line)  # what we write must read back
        return line

    return list(await asyncio.gather(*(one(q) for q in chunk)))


class _progress:
    """A rich progress bar with count, rate and ETA (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("recording"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._bar.__enter__()
        task = self._bar.add_task("record", total=self.total, completed=self.done)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
