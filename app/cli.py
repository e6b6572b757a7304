"""The ``metallm`` command line.

Every command fails with one line on stderr, not a traceback, for what a person can fix: a
database that does not answer (its URL shown without the password), a schema never migrated
or behind the code, a Kafka broker that does not answer within
:data:`consumers.kafka_io.BROKER_TIMEOUT_S`, a config or input file with bad entries. The exit
codes are :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.exits import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_OK,
    fail,
    run_told,
)
from app.show import add_commands as show_commands
from evaluation.cli import add_commands as evaluation_commands
from service.arguments import positive_int
from service.settings import Settings, describe_settings_error

DESCRIPTION = (
    "metallm: a streaming LLM router. It reads queries and labels from Kafka (and, with its "
    "HTTP door on, OpenAI-compatible requests and feedback), routes each query to the LLM "
    "most likely to answer it well for the money, learns from the labels and scores, and "
    "stores every decision in Postgres."
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
    from service.outcomes import read_outcomes

    records = read_outcomes(args.outcomes)
    if args.limit:
        records = records[: args.limit]
    n = warm_start_from(settings, records)
    arms = sorted({a for r in records for a in r.arms})
    print(
        f"warm start: {n} updates over {len(records)} queries and arms {', '.join(arms)}; "
        "checkpoint stored: `metallm serve` starts from it"
    )
    return 0


def warm_start_from(settings: Settings, records: list) -> int:
    """Train the configured policy with full information on outcome ``records`` and store it
    as the first checkpoint of the configured database (what ``metallm warm-start`` and the
    demo do); returns the updates made."""
    from app.application import check_schema
    from service.config import load_config
    from service.embedding import Embedder
    from service.learning import LivePolicy
    from service.log.transaction import LearningLog
    from service.storage import make_engine

    # the tasks' declared features are part of the context layout `serve` will use
    declared = load_config(settings.config).declared_features() if settings.config.exists() else {}
    engine = make_engine(settings.database_url, settings.database_schema)
    check_schema(engine)
    live = LivePolicy(
        settings.policy,
        settings.policy_params,
        context=settings.context_builder(declared),
        cost_unit=settings.cost_unit_usd,
    )
    learning_log = LearningLog(engine, live, checkpoint_every=settings.checkpoint_every)
    learning_log.restore()
    learning_log.checkpoints.check_fresh()  # refused before the file is embedded
    print(f"embedding {len(records)} queries…", file=sys.stderr)
    embedder = Embedder.from_settings(settings)
    embeddings = embedder.embed([r.text for r in records])
    contexts = live.context.stream([(r.task, r.text, r.metadata) for r in records], embeddings)
    n = learning_log.checkpoints.warm_start(
        records, contexts, settings.reward_lambda, settings.cost_unit_usd
    )
    engine.dispose()
    return n


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.migrate import upgrade

    upgrade(settings.database_url, settings.database_schema)
    print("database schema is up to date")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from app.application import Application, health_endpoint, stop_on_signals
    from consumers.kafka_io import check_broker
    from service.config import load_config

    stop = stop_on_signals()  # before the slow start-up, so a SIGTERM then exits cleanly
    config = load_config(settings.config)
    if settings.kafka_consumers:  # an HTTP-only instance needs no broker
        check_broker(settings)  # told now, not after loading the model
    logging.getLogger("metallm").info(
        "starting: loading the embedding model and the arms, restoring the policy"
    )
    endpoint = health_endpoint(settings)  # /readyz says "not ready" while restoring
    try:
        service = Application.build(settings, config=config, health_endpoint=endpoint)
    except BaseException:
        if endpoint[1] is not None:
            endpoint[1].stop()
        raise
    return service.run_forever(stop)


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


def cmd_ask(settings: Settings, args: argparse.Namespace) -> int:
    """Publish one query, wait for its decision, print the answer (stdout) and how it was
    decided (stderr)."""
    from consumers.kafka_io import check_broker
    from producers.client import AnswerTimeout, Client, QueryRejected
    from service import report
    from service.events import QueryEvent, describe_validation_error

    try:
        QueryEvent(query_id=args.query_id or "q", text=args.text, task=args.task)
    except ValidationError as exc:
        return fail(f"not a query: {describe_validation_error(exc)}", EXIT_INPUT)
    tasks = _known_tasks(settings)
    if tasks is not None and args.task not in tasks:
        return fail(f"unknown task {args.task!r}: the config has {', '.join(tasks)}", EXIT_INPUT)
    check_broker(settings)
    with Client(settings) as client:
        try:
            answer = client.ask(args.text, args.task, args.query_id, timeout=args.timeout)
        except (QueryRejected, AnswerTimeout) as exc:
            return fail(str(exc), EXIT_INPUT if isinstance(exc, QueryRejected) else EXIT_FAILED)
    how = [f"query {answer.query_id}", f"arm {answer.arm}", answer.status]
    how += [report.usd(answer.cost_usd), report.duration_ms(answer.latency_ms)]
    if answer.fallback_arm:
        how.append(f"answered by the fallback {answer.fallback_arm}")
    print(" · ".join(part for part in how if part), file=sys.stderr)
    if answer.status == "llm_error":
        return fail(f"the arm failed: {answer.error}", EXIT_FAILED)
    print(answer.prediction if answer.prediction is not None else answer.answer or "")
    return EXIT_OK


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


def _add_event_commands(sub: argparse._SubParsersAction) -> None:
    """``produce`` and ``ask``: publish events, or one query and wait for its answer."""
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

    ask = sub.add_parser(
        "ask",
        help="publish one query and print its answer (waits for the decision)",
        description="Publish one query to the queries topic and wait for its decision on the "
        "decisions topic (or its rejection on the dead-letter topic). Prints the answer on "
        "stdout and the arm, status, cost and latency on stderr. Needs `metallm serve` running "
        "on the same topics.",
    )
    ask.add_argument("text", help="the query's text")
    ask.add_argument("--task", required=True, help="a task of the config")
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    ask.add_argument("--query-id", help="the query's id (default: a new random one)")


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
    warm.add_argument("--limit", type=positive_int, help="use only the first N queries")
    sub.add_parser(
        "serve", help="run the query and label consumers and, when configured, the HTTP door"
    )
    brk = sub.add_parser(
        "broker",
        help="run a local Kafka-wire broker (Tansu, in memory) in the foreground",
        description="A local Kafka-wire broker for trying metallm without Docker: Tansu, "
        "memory only (its topics are gone when it stops), listening on 127.0.0.1. Ctrl-C "
        "stops it.",
    )
    brk.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (9092)")

    _add_event_commands(sub)
    COMMANDS.update(show_commands(sub))
    COMMANDS.update(evaluation_commands(sub))
    return p


COMMANDS = {
    "migrate": cmd_migrate,
    "warm-start": cmd_warm_start,
    "serve": cmd_serve,
    "produce": cmd_produce,
    "ask": cmd_ask,
    "broker": cmd_broker,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metallm")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # libpq's own wait for a database that does not answer (none by default: for ever)
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        return fail(describe_settings_error(exc), EXIT_INPUT)

    def command() -> int:
        _setup_logging(args.log_level, settings.log_format)
        return COMMANDS[args.command](settings, args)

    return run_told(settings, command)


if __name__ == "__main__":
    sys.exit(main())
