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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "sentence_transformers", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import upgrade

    upgrade(settings.database_url, settings.database_schema)
    print("database schema is up to date")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.runner import Service

    return Service.build(settings).run_forever()


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
    "label",
    "correct",
    "reward",
    "decided_at",
]


def cmd_decisions(settings: Settings, args: argparse.Namespace) -> int:
    from service.storage import make_engine, query_decisions

    engine = make_engine(settings.database_url, settings.database_schema)
    with engine.connect() as conn:
        rows = query_decisions(
            conn, since=args.since, arm=args.arm, task=args.task, limit=args.limit
        )
    engine.dispose()
    if args.format == "json":
        for row in rows:
            print(json.dumps(row, default=str))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} decisions")
        for col in COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in COLUMNS))
        Console().print(table)
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
    return p


COMMANDS = {
    "migrate": cmd_migrate,
    "serve": cmd_serve,
    "produce": cmd_produce,
    "decisions": cmd_decisions,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.log_level)
    from pydantic import ValidationError

    from consumers.runner import SchemaMissing
    from producers.files import InputFileError
    from service.config import ConfigError

    try:
        settings = Settings()
        return COMMANDS[args.command](settings, args)
    except (ConfigError, InputFileError, SchemaMissing) as exc:
        print(f"metallm: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"metallm: invalid settings: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
