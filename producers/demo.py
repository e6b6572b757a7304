"""`make demo`: a local broker, the service with two real local LLMs, real labeled queries.

Streams the built-in BIG-bench sample (sentiment, intent, yes/no questions) through the whole
path — Kafka → embeddings → LinUCB → llama.cpp → Postgres — with each label published some
seconds after its query, then prints what the router did against each single arm.
Everything it started is stopped on exit or Ctrl-C.

    python -m producers.demo [--limit 300] [--rate 4] [--label-delay 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.live import Live
from rich.table import Table

from consumers.kafka_io import ensure_topics, make_producer
from consumers.runner import Service
from producers.files import read_events
from producers.local_broker import LocalBroker
from producers.publish import publish
from service.migrate import upgrade
from service.settings import Settings
from service.storage import make_engine

ROOT = Path(__file__).resolve().parents[1]
DATASET = Path(__file__).parent / "data" / "demo_queries.jsonl"
CONFIG = ROOT / "config" / "metallm.example.yaml"
SCHEMA = "metallm_demo"

console = Console()


def progress_table(engine: sa.Engine, total: int, started: float) -> Table:
    with engine.connect() as conn:
        decided, labeled, correct, cost = conn.execute(
            sa.text(
                "SELECT count(*), count(reward), count(*) FILTER (WHERE correct), "
                "coalesce(sum(cost_usd), 0) FROM decisions"
            )
        ).one()
        shares = conn.execute(
            sa.text("SELECT arm, count(*) FROM decisions GROUP BY arm ORDER BY arm")
        ).all()
    elapsed = max(time.monotonic() - started, 1e-9)
    table = Table(title="metallm demo — live", show_header=False)
    table.add_row("decided", f"{decided}/{total}  ({decided / elapsed:.1f}/s)")
    table.add_row("labeled", f"{labeled}/{total}")
    table.add_row("running accuracy", f"{correct / labeled:.1%}" if labeled else "–")
    table.add_row("cost so far", f"${cost:.6f}")
    table.add_row("arm share", "  ".join(f"{arm} {n / max(decided, 1):.0%}" for arm, n in shares))
    return table


def summary(engine: sa.Engine) -> Table:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT arm, count(*), avg(correct::int), sum(cost_usd), avg(cost_usd), "
                "avg(latency_ms) FROM decisions WHERE reward IS NOT NULL GROUP BY arm ORDER BY arm"
            )
        ).all()
        total = conn.execute(
            sa.text(
                "SELECT count(*), avg(correct::int), sum(cost_usd), avg(cost_usd), avg(latency_ms) "
                "FROM decisions WHERE reward IS NOT NULL"
            )
        ).one()
    table = Table(title="router vs the arms it chose (labeled decisions)")
    for col in ("", "decisions", "accuracy", "total cost", "cost/query", "latency"):
        table.add_column(col, justify="right")
    for arm, n, acc, cost, avg_cost, latency in rows:
        table.add_row(
            arm, str(n), f"{acc:.1%}", f"${cost:.6f}", f"${avg_cost:.2e}", f"{latency:.0f} ms"
        )
    n, acc, cost, avg_cost, latency = total
    if n:
        table.add_row(
            "[bold]router",
            str(n),
            f"[bold]{acc:.1%}",
            f"${cost:.6f}",
            f"${avg_cost:.2e}",
            f"{latency:.0f} ms",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="how many queries (max 320)")
    parser.add_argument("--rate", type=float, default=4.0, help="queries per second")
    parser.add_argument(
        "--label-delay", type=float, default=8.0, help="seconds between a query and its label"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = ROOT / "demo-output"
    out.mkdir(exist_ok=True)
    queries = read_events(DATASET, "queries")[: args.limit]
    labels = read_events(DATASET, "labels")[: args.limit]
    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

    with console.status("starting a local Kafka broker (Tansu)…"):
        broker = LocalBroker(log_path=out / "broker.log").start()
    service = None
    try:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            database_url=database_url,
            database_schema=SCHEMA,
            config=CONFIG,
            checkpoint_every=50,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            poll_max_records=16,
        )
        engine = make_engine(database_url)
        with engine.begin() as conn:  # each demo run starts from a clean slate
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))
        engine.dispose()
        with console.status("migrating the database…"):
            upgrade(database_url, SCHEMA)
        with console.status("loading the embedding model and two local LLMs…"):
            service = Service.build(settings)
            service.start()
        ensure_topics(settings, [settings.queries_topic, settings.labels_topic])
        console.print(
            f"broker {broker.bootstrap}, Postgres schema {SCHEMA!r}, "
            f"arms: {', '.join(service.config.arm_names)}"
        )

        producer = make_producer(settings)
        label_thread = threading.Thread(
            target=publish,
            daemon=True,
            kwargs=dict(
                producer=producer,
                topic=settings.labels_topic,
                events=labels,
                rate=args.rate,
                delay_seconds=args.label_delay,
                show_progress=False,
            ),
        )
        query_thread = threading.Thread(
            target=publish,
            daemon=True,
            kwargs=dict(
                producer=producer,
                topic=settings.queries_topic,
                events=queries,
                rate=args.rate,
                show_progress=False,
            ),
        )
        engine = make_engine(database_url, SCHEMA)
        started = time.monotonic()
        query_thread.start()
        label_thread.start()
        with Live(
            progress_table(engine, len(queries), started), console=console, refresh_per_second=2
        ) as live:
            while True:
                live.update(progress_table(engine, len(queries), started))
                with engine.connect() as conn:
                    done = conn.execute(sa.text("SELECT count(reward) FROM decisions")).scalar_one()
                if done >= len(queries) or service.crashed.is_set():
                    break
                time.sleep(0.5)
        producer.close()
        console.print(summary(engine))
        console.print(
            f"policy: {service.live.policy.n_updates} updates; "
            f"query decisions in Postgres schema {SCHEMA!r}: "
            f"METALLM_DATABASE_SCHEMA={SCHEMA} metallm decisions"
        )
        engine.dispose()
    except KeyboardInterrupt:
        console.print("interrupted; stopping")
    finally:
        if service is not None:
            with console.status("stopping the service (finishing calls, checkpointing)…"):
                service.stop()
        broker.stop()


if __name__ == "__main__":
    main()
