"""The commands that show the log to people: ``metallm decisions`` (with ``--explain``) and
``metallm stats``. Rows for display are mappings of the columns shown, printed as a table that
fits the terminal, or every column with its exact value as CSV or JSON lines."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.exits import EXIT_FAILED
from service import report
from service.arguments import iso_datetime, non_negative_int, positive_int
from service.report import Column
from service.settings import Settings


def _schema_checked_engine(settings: Settings):
    """An engine on the configured database, once its schema is known to be this code's."""
    from app.application import check_schema
    from service.storage import make_engine

    engine = make_engine(settings.database_url, settings.database_schema)
    try:
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


DECISION_COLUMNS = [
    Column("query_id", "query_id", priority=0),
    Column("task", "task", priority=4),
    Column("arm", "arm", priority=0),
    Column("propensity", "propensity", report.decimal(3), priority=6, justify="right"),
    Column("status", "status", priority=1),
    Column("prediction", "prediction", report.short_text(24), priority=2),
    Column("cost_usd", "cost", report.usd, priority=3, justify="right"),
    Column("latency_ms", "latency", report.duration_ms, priority=4, justify="right"),
    Column("wait_ms", "wait", report.duration_ms, priority=6, justify="right"),
    Column("fallback_arm", "fallback", priority=6),
    Column("label", "label", report.short_text(24), priority=2),
    Column("correct", "correct", report.yes_no, priority=1),
    Column("score", "score", report.decimal(2), priority=5, justify="right"),
    Column("reward", "reward", report.decimal(3), priority=5, justify="right"),
    Column("decided_at", "decided at", report.timestamp, priority=3),
]
#: The columns of the ``metallm decisions`` table, in order (csv and json give every column).
COLUMNS = [c.key for c in DECISION_COLUMNS]


def cmd_decisions(settings: Settings, args: argparse.Namespace) -> int:
    from service.log.read_models import query_decisions

    if args.explain:
        return explain(settings, args.explain)
    engine = _schema_checked_engine(settings)
    try:
        with engine.connect() as conn:
            rows = query_decisions(
                conn, since=args.since, arm=args.arm, task=args.task, limit=args.limit
            )
    finally:
        engine.dispose()
    print_rows(rows, DECISION_COLUMNS, args.format, f"{len(rows)} decisions")
    return 0


def print_rows(
    rows: Sequence[Mapping[str, Any]], columns: list[Column], fmt: str, title: str
) -> None:
    """Rows as a table for people (the columns that fit the terminal), or every column with its
    exact value as CSV or JSON lines."""
    if fmt == "json":
        for row in rows:
            print(json.dumps(row, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(
            sys.stdout, fieldnames=list(rows[0]) if rows else [c.key for c in columns]
        )
        writer.writeheader()
        writer.writerows(rows)
    else:
        report.print_report(rows, columns, title)


EXPLAIN_COLUMNS = [
    Column("arm", "arm", priority=0),
    Column("score", "score", report.significant, priority=0, justify="right"),
    Column("probability", "probability", report.percent, priority=0, justify="right"),
    Column("chosen", "", priority=1),
]


def explain(settings: Settings, query_id: str) -> int:
    """Every arm's policy score and probability when the query was decided."""
    from rich.console import Console
    from rich.text import Text

    from service.log.read_models import decision_details

    engine = _schema_checked_engine(settings)
    try:
        with engine.connect() as conn:
            row = decision_details(conn, query_id)
    finally:
        engine.dispose()
    if row is None:
        print(f"metallm: no decision for query {query_id!r}", file=sys.stderr)
        return EXIT_FAILED
    scores = row.arm_scores or {}
    arms = [
        {"arm": arm, "score": scores.get(arm), "probability": p}
        | {"chosen": "← chosen" if arm == row.arm else ""}
        for arm, p in sorted(row.probabilities.items(), key=lambda kv: -kv[1])
    ]
    title = (
        f"{query_id}: {row.policy} chose {row.arm} "
        f"(p = {report.percent(row.propensity)}) at {report.timestamp(row.decided_at)}"
    )
    report.print_report(arms, EXPLAIN_COLUMNS, title)
    answer = row.prediction if row.options else report.short_text(60)(row.raw_output)
    outcome = f"status {row.status}, answer {answer!r}, cost {report.usd(row.cost_usd)}"
    if row.latency_ms is not None:
        outcome += f", latency {report.duration_ms(row.latency_ms)}"
    if row.wait_ms:
        outcome += f" after waiting {report.duration_ms(row.wait_ms)} for a slot"
    if row.fallback_arm:
        outcome += f", answered by fallback {row.fallback_arm}"
    if row.label is not None:
        verdict = "correct" if row.correct else "wrong"
        outcome += f"; label {row.label!r}: {verdict}, reward {report.decimal(3)(row.reward)}"
    elif row.score is not None:
        outcome += f"; score {row.score:g}, reward {report.decimal(3)(row.reward)}"
    else:
        outcome += "; no label yet"
    Console().print(Text(outcome))
    return 0


STATS_COLUMNS = [
    Column("arm", "arm", priority=0),
    Column("decisions", "decisions", report.count, priority=1, justify="right"),
    Column("share", "share", report.percent, priority=2, justify="right"),
    Column("labeled", "labeled", report.count, priority=4, justify="right"),
    Column("accuracy", "accuracy", report.percent, priority=1, justify="right"),
    Column("mean_score", "mean score", report.decimal(3), priority=3, justify="right"),
    Column("cost_usd", "cost", report.usd, priority=2, justify="right"),
    Column("cost_per_decision", "cost/decision", report.usd, priority=3, justify="right"),
    Column("mean_reward", "mean reward", report.decimal(3), priority=3, justify="right"),
    Column("mean_latency_ms", "latency", report.duration_ms, priority=4, justify="right"),
    Column("mean_wait_ms", "wait", report.duration_ms, priority=4, justify="right"),
    Column("failures", "failures", report.count, priority=5, justify="right"),
]
HOURLY_KEYS = (
    "arm",
    "decisions",
    "share",
    "labeled",
    "accuracy",
    "mean_score",
    "cost_usd",
    "mean_reward",
)
HOURLY_COLUMNS = [
    Column("hour", "hour", lambda v: v.strftime("%Y-%m-%d %H:00") if v else "", priority=0),
    *(c for c in STATS_COLUMNS if c.key in HOURLY_KEYS),
]


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    """The arm_summary view, and hourly_stats for the last ``--hours``."""
    from service.log.read_models import hourly_stats, stats_summary

    engine = _schema_checked_engine(settings)
    try:
        with engine.connect() as conn:
            summary = stats_summary(conn)
            hourly = hourly_stats(conn, args.hours)
    finally:
        engine.dispose()
    print_rows(summary, STATS_COLUMNS, args.format, "per arm (view arm_summary)")
    if args.hours:
        print_rows(
            hourly,
            HOURLY_COLUMNS,
            args.format,
            f"per hour, last {args.hours} h (view hourly_stats)",
        )
    return 0


def add_commands(sub: Any) -> dict[str, Callable[[Settings, argparse.Namespace], int]]:
    """Add ``decisions`` and ``stats`` to the ``metallm`` sub-parsers; their handlers by name."""
    dec = sub.add_parser("decisions", help="show decisions from Postgres")
    dec.add_argument("--since", type=iso_datetime, help="ISO date/time, e.g. 2026-11-27T10:00")
    dec.add_argument("--arm")
    dec.add_argument("--task")
    dec.add_argument(
        "--limit", type=positive_int, metavar="N", help="the first N (oldest first; see --since)"
    )
    dec.add_argument("--format", choices=["table", "csv", "json"], default="table")
    dec.add_argument(
        "--explain",
        metavar="QUERY_ID",
        help="every arm's score and probability when this query was decided",
    )

    stats = sub.add_parser("stats", help="accuracy, cost, share and reward per arm and hour")
    stats.add_argument(
        "--hours", type=non_negative_int, default=24, help="hourly rows to show (0: none)"
    )
    stats.add_argument("--format", choices=["table", "csv", "json"], default="table")

    return {"decisions": cmd_decisions, "stats": cmd_stats}
