"""The ``metallm`` command line.

Every command fails with one line on stderr, not a traceback, for what a person can fix: a
database that does not answer (its URL shown without the password), a schema never migrated
or behind the code, a Kafka broker that does not answer within
:data:`consumers.kafka_io.BROKER_TIMEOUT_S`, a config or input file with bad entries. The exit
codes are :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import textwrap
from datetime import datetime
from pathlib import Path

from evaluation.cli import add_commands as evaluation_commands
from service import report
from service.report import Column
from service.settings import Settings, describe_settings_error, shown_url

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and failed (a consumer crashed, no such decision, …)
EXIT_INPUT = 2  # fix something first: arguments, settings, config or input file, the schema
EXIT_UNREACHABLE = 3  # the database or the Kafka broker did not answer
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the command ran and failed (a consumer crashed, the final checkpoint failed, "
    "no such decision, the service decided differently in bench --through-service)",
    EXIT_INPUT: "bad arguments, settings, config file (or an arm of it that cannot start) or "
    "input file, METALLM_METRICS_PORT taken, a database schema "
    "missing or behind the code (run `metallm migrate`), or queries and labels topics without "
    "METALLM_TOPIC_PARTITIONS partitions",
    EXIT_UNREACHABLE: "the database or the Kafka broker cannot be reached",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
DESCRIPTION = (
    "metallm: a streaming LLM router. It reads queries and labels from Kafka, routes each "
    "query to the LLM most likely to answer it correctly for the money, learns from the "
    "labels, and stores every decision in Postgres."
)


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
    for noisy in ("kafka", "sentence_transformers", "alembic.runtime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_warm_start(settings: Settings, args: argparse.Namespace) -> int:
    """Train the policy offline on an outcomes file and store it as the first checkpoint."""
    from app.application import check_schema
    from service.config import load_config
    from service.embedding import Embedder
    from service.learning import LivePolicy
    from service.log.transaction import LearningLog
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
        settings.policy, settings.policy_params, context=settings.context_builder(declared)
    )
    learning_log = LearningLog(engine, live, checkpoint_every=settings.checkpoint_every)
    learning_log.restore()
    print(f"embedding {len(records)} queries…", file=sys.stderr)
    embedder = Embedder.from_settings(settings)
    embeddings = embedder.embed([r.text for r in records])
    contexts = live.context.stream([(r.task, r.text, r.metadata) for r in records], embeddings)
    n = learning_log.checkpoints.warm_start(
        records, contexts, settings.reward_lambda, settings.cost_unit_usd
    )
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
    from app.application import Application, stop_on_signals
    from consumers.kafka_io import check_broker
    from service.config import load_config

    stop = stop_on_signals()  # before the slow start-up, so a SIGTERM then exits cleanly
    config = load_config(settings.config)
    check_broker(settings)  # told now, not after loading the model
    logging.getLogger("metallm").info(
        "starting: loading the embedding model and the arms, restoring the policy"
    )
    return Application.build(settings, config=config).run_forever(stop)


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from consumers.kafka_io import check_broker, ensure_topics, make_producer
    from producers.files import read_events
    from producers.publish import publish

    tasks = _known_tasks(settings) if args.kind == "queries" else None
    events = read_events(Path(args.file), args.kind, tasks=tasks, tasks_from=str(settings.config))
    topic = settings.queries_topic if args.kind == "queries" else settings.labels_topic
    check_broker(settings)
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


def _known_tasks(settings: Settings) -> list[str] | None:
    """The config's task names (for checking queries before they are sent), or None when no
    config is readable: then the service is the one to tell (it dead-letters unknown tasks)."""
    from service.config import ConfigError, load_config

    path = Path(settings.config)
    if not path.exists():
        return None
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"metallm: not checking the queries' tasks: {exc}", file=sys.stderr)
        return None
    return list(config.tasks)


def cmd_broker(settings: Settings, args: argparse.Namespace) -> int:
    """A local Kafka-wire broker (Tansu, in memory) in the foreground, until Ctrl-C."""
    import socket
    import time

    from app.application import stop_on_signals
    from producers.local_broker import LocalBroker

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError:
            print(
                f"metallm: port {args.port} is already in use (a broker running already?); "
                "choose another with --port",
                file=sys.stderr,
            )
            return EXIT_INPUT
    stop = stop_on_signals()
    broker = LocalBroker(port=args.port).start()
    try:
        print(
            f"Kafka broker (Tansu, in memory: its topics are gone when it stops) at "
            f"{broker.bootstrap}; Ctrl-C stops it",
            flush=True,
        )
        if args.port != 9092:
            print(f"  export METALLM_KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
        while not stop.is_set():
            if broker.process is not None and broker.process.poll() is not None:
                print(
                    f"metallm: the broker exited with code {broker.process.returncode}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            time.sleep(0.2)
    finally:
        broker.stop()
    print("broker stopped", flush=True)
    return EXIT_OK


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
    Column("fallback_arm", "fallback", priority=6),
    Column("label", "label", report.short_text(24), priority=2),
    Column("correct", "correct", report.yes_no, priority=1),
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


def print_rows(rows: list[dict], columns: list[Column], fmt: str, title: str) -> None:
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
    scores = row["arm_scores"] or {}
    arms = [
        {"arm": arm, "score": scores.get(arm), "probability": p}
        | {"chosen": "← chosen" if arm == row["arm"] else ""}
        for arm, p in sorted(row["probabilities"].items(), key=lambda kv: -kv[1])
    ]
    title = (
        f"{query_id}: {row['policy']} chose {row['arm']} "
        f"(p = {report.percent(row['propensity'])}) at {report.timestamp(row['decided_at'])}"
    )
    report.print_report(arms, EXPLAIN_COLUMNS, title)
    outcome = (
        f"status {row['status']}, answer {row['prediction']!r}, cost {report.usd(row['cost_usd'])}"
    )
    if row["latency_ms"] is not None:
        outcome += f", latency {report.duration_ms(row['latency_ms'])}"
    if row["fallback_arm"]:
        outcome += f", answered by fallback {row['fallback_arm']}"
    if row["label"] is not None:
        verdict = "correct" if row["correct"] else "wrong"
        outcome += f"; label {row['label']!r}: {verdict}, reward {report.decimal(3)(row['reward'])}"
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
    Column("cost_usd", "cost", report.usd, priority=2, justify="right"),
    Column("cost_per_decision", "cost/decision", report.usd, priority=3, justify="right"),
    Column("mean_reward", "mean reward", report.decimal(3), priority=3, justify="right"),
    Column("mean_latency_ms", "latency", report.duration_ms, priority=4, justify="right"),
    Column("failures", "failures", report.count, priority=5, justify="right"),
]
HOURLY_KEYS = ("arm", "decisions", "share", "labeled", "accuracy", "cost_usd", "mean_reward")
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


def _since(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(
        textwrap.fill(f"{code:>5}  {meaning}", 78, subsequent_indent=" " * 7)
        for code, meaning in EXIT_CODES.items()
    )
    p = argparse.ArgumentParser(
        prog="metallm",
        description="\n".join(textwrap.wrap(DESCRIPTION, 78)),
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"metallm {_version()}")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    warm = sub.add_parser(
        "warm-start", help="train the policy on an outcomes file before serving (full information)"
    )
    warm.add_argument("outcomes", type=Path, help="outcomes file (see docs/evaluation.md)")
    warm.add_argument("--limit", type=int, help="use only the first N queries")
    sub.add_parser("serve", help="run the query and label consumers")
    brk = sub.add_parser(
        "broker",
        help="run a local Kafka-wire broker (Tansu, in memory) in the foreground",
        description="A local Kafka-wire broker for trying metallm without Docker: Tansu, "
        "memory only (its topics are gone when it stops), listening on 127.0.0.1. Ctrl-C "
        "stops it.",
    )
    brk.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (9092)")

    prod = sub.add_parser(
        "produce",
        help="publish query or label events from a JSONL/CSV file",
        description="Publish query or label events from a JSONL or CSV file. Every row is "
        "checked first (and, for queries, its task against the config METALLM_CONFIG when "
        "that file is readable): if any is bad, they are listed with their line numbers and "
        "nothing is sent.",
    )
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

    COMMANDS.update(evaluation_commands(sub))
    return p


COMMANDS = {
    "migrate": cmd_migrate,
    "warm-start": cmd_warm_start,
    "serve": cmd_serve,
    "produce": cmd_produce,
    "decisions": cmd_decisions,
    "stats": cmd_stats,
    "broker": cmd_broker,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metallm")
    except PackageNotFoundError:
        return "(not installed)"


def _fail(message: str, code: int) -> int:
    print(f"metallm: {message}", file=sys.stderr)
    return code


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import sqlalchemy.exc as sa_exc
    from kafka.errors import KafkaError
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.application import SchemaMissing
    from consumers.kafka_io import BrokerUnreachable, TopicMismatch
    from producers.files import InputFileError
    from service.config import ConfigError
    from service.learning import ContextMismatch
    from service.log.checkpoints import WarmStartRefused
    from service.log.session import InstanceNameTaken
    from service.metrics import MetricsPortUnavailable
    from service.outcomes import OutcomesError

    # libpq's own wait for a database that does not answer (none by default: for ever)
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        return _fail(describe_settings_error(exc), EXIT_INPUT)
    try:
        _setup_logging(args.log_level, settings.log_format)
        return COMMANDS[args.command](settings, args)
    except (
        ConfigError,
        ContextMismatch,
        InputFileError,
        InstanceNameTaken,
        MetricsPortUnavailable,
        SchemaMissing,
        TopicMismatch,
        OutcomesError,
        WarmStartRefused,
    ) as exc:
        return _fail(str(exc), EXIT_INPUT)
    except ValidationError as exc:
        return _fail(describe_settings_error(exc), EXIT_INPUT)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # a file named on the command line or in a setting (an input, outcomes or model file)
        return _fail(
            f"cannot read {exc.filename}: {exc.strerror}" if exc.filename else str(exc),
            EXIT_INPUT,
        )
    except BrokerUnreachable as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except KafkaError as exc:
        return _fail(
            f"Kafka broker at {settings.kafka_bootstrap}: {_first_line(exc)} "
            "(METALLM_KAFKA_BOOTSTRAP)",
            EXIT_UNREACHABLE,
        )
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        reason = _first_line(exc.orig if exc.orig is not None else exc)
        return _fail(
            f"cannot use the database at {shown_url(settings.database_url)}: {reason}",
            EXIT_UNREACHABLE,
        )
    except sa_exc.ProgrammingError as exc:
        import psycopg.errors

        missing = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)
        if not isinstance(exc.orig, missing):
            raise
        return _fail(
            f"the database schema is missing ({_first_line(exc.orig)}): run `metallm migrate`",
            EXIT_INPUT,
        )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
