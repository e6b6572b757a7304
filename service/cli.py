"""The ``metallm`` command line."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from service.settings import Settings


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    for noisy in ("kafka", "sentence_transformers", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_warm_start(settings: Settings, args: argparse.Namespace) -> int:
    """Train the policy offline on an outcomes file and store it as the first checkpoint."""
    from consumers.runner import check_schema
    from service.config import load_config
    from service.embedding import Embedder
    from service.learning import LivePolicy
    from service.outcomes import read_outcomes
    from service.storage import make_engine

    records = read_outcomes(args.outcomes)
    if args.limit:
        records = records[: args.limit]
    # the tasks' declared features are part of the context layout `serve` will use
    declared = load_config(settings.config).declared_features() if settings.config.exists() else {}
    engine = make_engine(settings.database_url, settings.database_schema)
    check_schema(engine)
    live = LivePolicy(
        engine,
        settings.policy,
        settings.policy_params,
        settings.checkpoint_every,
        context=settings.context_builder(declared),
    )
    live.restore()
    print(f"embedding {len(records)} queries…", file=sys.stderr)
    embedder = Embedder.from_settings(settings)
    embeddings = embedder.embed([r.text for r in records])
    contexts = live.context.stream([(r.task, r.text, r.metadata) for r in records], embeddings)
    n = live.warm_start(records, contexts, settings.reward_lambda, settings.cost_unit_usd)
    engine.dispose()
    arms = sorted({a for r in records for a in r.arms})
    print(
        f"warm start: {n} updates over {len(records)} queries and arms {', '.join(arms)}; "
        "checkpoint stored: `metallm serve` starts from it"
    )
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import upgrade

    upgrade(settings.database_url, settings.database_schema)
    print("database schema is up to date")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.runner import Service, stop_on_signals

    stop = stop_on_signals()  # before the slow start-up, so a SIGTERM then exits cleanly
    logging.getLogger("metallm").info(
        "starting: loading the embedding model and the arms, restoring the policy"
    )
    return Service.build(settings).run_forever(stop)


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.kafka_io import ensure_topics, make_producer
    from producers.files import read_events
    from producers.publish import publish

    events = read_events(Path(args.file), args.kind)
    topic = settings.queries_topic if args.kind == "queries" else settings.labels_topic
    ensure_topics(settings, [topic])
    producer = make_producer(settings)
    try:
        n = publish(
            producer,
            topic,
            events,
            rate=args.rate,
            delay_seconds=args.delay_seconds,
            show_progress=not args.quiet,
            description=f"{args.kind} → {topic}",
        )
    finally:
        producer.close()
    print(f"published {n} {args.kind} to {topic}")
    return 0


COLUMNS = [
    "query_id",
    "task",
    "arm",
    "propensity",
    "status",
    "prediction",
    "cost_usd",
    "latency_ms",
    "fallback_arm",
    "label",
    "correct",
    "reward",
    "decided_at",
]


def cmd_decisions(settings: Settings, args: argparse.Namespace) -> int:
    from service.storage import make_engine, query_decisions

    if args.explain:
        return explain(settings, args.explain)
    engine = make_engine(settings.database_url, settings.database_schema)
    with engine.connect() as conn:
        rows = query_decisions(
            conn, since=args.since, arm=args.arm, task=args.task, limit=args.limit
        )
    engine.dispose()
    print_rows(rows, COLUMNS, args.format, f"{len(rows)} decisions")
    return 0


def print_rows(rows: list[dict], columns: list[str], fmt: str, title: str) -> None:
    """Rows as a rich table, CSV (all columns) or JSON lines (all columns)."""
    if fmt == "json":
        for row in rows:
            print(json.dumps(row, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in columns))
        Console().print(table)


def explain(settings: Settings, query_id: str) -> int:
    """Every arm's policy score and probability when the query was decided."""
    from rich.console import Console
    from rich.table import Table

    from service.storage import decision_details, make_engine

    engine = make_engine(settings.database_url, settings.database_schema)
    with engine.connect() as conn:
        row = decision_details(conn, query_id)
    engine.dispose()
    if row is None:
        print(f"metallm: no decision for query {query_id!r}", file=sys.stderr)
        return 1
    scores = row["arm_scores"] or {}
    table = Table(
        title=f"{query_id}: {row['policy']} chose {row['arm']} "
        f"(p={row['propensity']:.3f}) at {_cell(row['decided_at'])}"
    )
    for col in ("arm", "score", "probability", ""):
        table.add_column(col)
    for arm, p in sorted(row["probabilities"].items(), key=lambda kv: -kv[1]):
        table.add_row(
            arm, _cell(scores.get(arm)), f"{p:.4f}", "← chosen" if arm == row["arm"] else ""
        )
    console = Console()
    console.print(table)
    outcome = f"status {row['status']}, answer {row['prediction']!r}, cost ${row['cost_usd']:.6g}"
    if row["fallback_arm"]:
        outcome += f", answered by fallback {row['fallback_arm']}"
    if row["label"] is not None:
        outcome += (
            f"; label {row['label']!r} → correct={row['correct']}, reward {row['reward']:.4g}"
        )
    else:
        outcome += "; no label yet"
    console.print(outcome)
    return 0


STATS_COLUMNS = [
    "arm",
    "decisions",
    "share",
    "labeled",
    "accuracy",
    "cost_usd",
    "cost_per_decision",
    "mean_reward",
    "mean_latency_ms",
    "failures",
]
HOURLY_COLUMNS = [
    "hour",
    "arm",
    "decisions",
    "share",
    "labeled",
    "accuracy",
    "cost_usd",
    "mean_reward",
]


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    """The arm_summary view, and hourly_stats for the last ``--hours``."""
    from service.storage import hourly_stats, make_engine, stats_summary

    engine = make_engine(settings.database_url, settings.database_schema)
    with engine.connect() as conn:
        summary = stats_summary(conn)
        hourly = hourly_stats(conn, args.hours)
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


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _since(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metallm", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    warm = sub.add_parser(
        "warm-start", help="train the policy on an outcomes file before serving (full information)"
    )
    warm.add_argument("outcomes", type=Path, help="outcomes file (see docs/evaluation.md)")
    warm.add_argument("--limit", type=int, help="use only the first N queries")
    sub.add_parser("serve", help="run the query and label consumers")

    prod = sub.add_parser("produce", help="publish query or label events from a JSONL/CSV file")
    prod.add_argument("kind", choices=["queries", "labels"])
    prod.add_argument("file")
    prod.add_argument(
        "--delay-seconds", type=float, default=0.0, help="wait this long before publishing"
    )
    prod.add_argument("--rate", type=float, default=None, help="events per second (default: max)")
    prod.add_argument("--quiet", action="store_true", help="no progress bar")

    dec = sub.add_parser("decisions", help="show decisions from Postgres")
    dec.add_argument("--since", type=_since, help="ISO date/time, e.g. 2026-11-27T10:00")
    dec.add_argument("--arm")
    dec.add_argument("--task")
    dec.add_argument("--limit", type=int)
    dec.add_argument("--format", choices=["table", "csv", "json"], default="table")
    dec.add_argument(
        "--explain",
        metavar="QUERY_ID",
        help="every arm's score and probability when this query was decided",
    )

    stats = sub.add_parser("stats", help="accuracy, cost, share and reward per arm and hour")
    stats.add_argument("--hours", type=int, default=24, help="hourly rows to show (0: none)")
    stats.add_argument("--format", choices=["table", "csv", "json"], default="table")

    from service.evaluation.cli import add_commands  # record, bench, evaluate

    COMMANDS.update(add_commands(sub))
    return p


COMMANDS = {
    "migrate": cmd_migrate,
    "warm-start": cmd_warm_start,
    "serve": cmd_serve,
    "produce": cmd_produce,
    "decisions": cmd_decisions,
    "stats": cmd_stats,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pydantic import ValidationError

    from consumers.runner import SchemaMissing
    from producers.files import InputFileError
    from service.config import ConfigError
    from service.learning import ContextMismatch, WarmStartRefused
    from service.outcomes import OutcomesError

    try:
        settings = Settings()
        _setup_logging(args.log_level, settings.log_format)
        return COMMANDS[args.command](settings, args)
    except (
        ConfigError,
        ContextMismatch,
        InputFileError,
        SchemaMissing,
        OutcomesError,
        WarmStartRefused,
    ) as exc:
        print(f"metallm: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"metallm: invalid settings: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
