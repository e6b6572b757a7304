"""`make demo`: a local broker, the service with two real local LLMs, real labeled queries.

Streams the built-in BIG-bench sample (sentiment, intent, yes/no questions) through the whole
path — Kafka → embeddings → the bandit router → llama.cpp → Postgres — with each label
published some seconds after its query, then prints what the router did against each single arm.
Everything it started is stopped on exit or Ctrl-C.

    python -m producers.demo [--limit 300] [--rate 4] [--label-delay 8]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from app.application import Application, stop_on_signals
from app.cli import EXIT_INPUT, warm_start_from
from consumers.kafka_io import ensure_topics, make_producer
from producers.demo_data import DATASET
from producers.demo_postgres import demo_database
from producers.demo_schema import PLAIN_NAME, SchemaRefused, prepare_demo_schema
from producers.files import read_events
from producers.local_broker import LocalBroker
from producers.publish import publish
from service.arguments import positive_int
from service.config import AppConfig, load_config
from service.log import read_models
from service.outcomes import read_outcomes
from service.report import percent, usd
from service.settings import Settings
from service.storage import make_engine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "metallm.example.yaml"
OUTCOMES = Path(__file__).parent / "data" / "demo_outcomes.jsonl"

console = Console()


def progress_table(engine: sa.Engine, total: int, started: float) -> Table:
    with engine.connect() as conn:
        now = read_models.progress(conn)
    decided, labeled = now.decided, now.labeled
    elapsed = max(time.monotonic() - started, 1e-9)
    table = Table(title="metallm demo — live", show_header=False)
    table.add_row("decided", f"{decided}/{total}  ({decided / elapsed:.1f}/s)")
    table.add_row("labeled", f"{labeled}/{total}")
    table.add_row("running accuracy", percent(now.correct / labeled) if labeled else "–")
    table.add_row("cost so far", usd(now.cost_usd))
    table.add_row("arm share", "  ".join(f"{a} {n / max(decided, 1):.0%}" for a, n in now.arms))
    return table


def comparison(engine: sa.Engine, outcomes_path: Path = OUTCOMES) -> list[dict]:
    """The router and each single arm on the same labeled queries: ``name, accuracy, cost``
    (total), ``queries``, ``kind`` ("arm", "arm when chosen" or "router"). Single arms come
    from a recording of every arm on the demo set (``metallm record``); without it, the
    router's own per-arm rows."""
    with engine.connect() as conn:
        rows = read_models.outcomes(conn, labeled_only=True)
    if not rows:
        return []
    out = []
    ids = {r.query_id for r in rows}
    recorded = (
        [o for o in read_outcomes(outcomes_path) if o.query_id in ids]
        if outcomes_path.exists()
        else []
    )
    if recorded:
        for arm in sorted(recorded[0].arms):
            out.append(
                {
                    "name": f"{arm} alone",
                    "kind": "arm",
                    "accuracy": sum(o.correct(arm) for o in recorded) / len(recorded),
                    "cost": sum(o.cost(arm) for o in recorded),
                    "queries": len(recorded),
                }
            )
    else:
        for arm in sorted({r.arm for r in rows}):
            mine = [r for r in rows if r.arm == arm]
            out.append(
                {
                    "name": f"{arm} (when chosen)",
                    "kind": "arm when chosen",
                    "accuracy": sum(r.correct for r in mine) / len(mine),
                    "cost": sum(r.cost_usd for r in mine),
                    "queries": len(mine),
                }
            )
    out.append(
        {
            "name": "router",
            "kind": "router",
            "accuracy": sum(r.correct for r in rows) / len(rows),
            "cost": sum(r.cost_usd for r in rows),
            "queries": len(rows),
        }
    )
    return out


def best_arm(rows: list[dict]) -> dict | None:
    """The single arm to beat: the most accurate, the cheaper of equals (None without a
    recording of every arm on the same queries)."""
    arms = [r for r in rows if r["kind"] == "arm"]
    return min(arms, key=lambda r: (-r["accuracy"], r["cost"])) if arms else None


def summary(engine: sa.Engine, outcomes_path: Path = OUTCOMES) -> Table:
    """The router against each single arm on the same queries, with the cost saved against
    the best single arm."""
    rows = comparison(engine, outcomes_path)
    n = rows[-1]["queries"] if rows else 0
    table = Table(title=f"router vs single arms on the same {n} labeled queries")
    for col in ("", "accuracy", "total cost", "cost / query", "cost vs best arm"):
        table.add_column(col, justify="right")
    best = best_arm(rows)
    for r in rows:
        versus = ""
        if best is not None and best["cost"] > 0:
            if r is best:
                versus = "(best arm)"
            else:
                change = r["cost"] / best["cost"] - 1
                versus = f"{change:+.0%}" if abs(change) >= 0.005 else "same"
        bold = "[bold]" if r["kind"] == "router" else ""
        table.add_row(
            f"{bold}{r['name']}",
            f"{bold}{percent(r['accuracy'])}",
            usd(r["cost"]),
            usd(r["cost"] / r["queries"]),
            f"{bold}{versus}",
        )
    return table


def verdict(rows: list[dict]) -> str:
    """One sentence: what the router saved (or spent) against the best single arm, and at
    what accuracy."""
    best = best_arm(rows)
    if not rows or best is None:
        return "no recording of every arm on these queries: no single-arm comparison"
    router = rows[-1]
    saved = best["cost"] - router["cost"]
    gap = (router["accuracy"] - best["accuracy"]) * 100
    accuracy = (
        f"{abs(gap):.1f} points {'more' if gap > 0 else 'less'} accurate"
        if abs(gap) >= 0.05
        else "as accurate"
    )
    if saved >= 0:
        share = saved / best["cost"] if best["cost"] else 0.0
        money = f"saved {usd(saved)} ({share:.0%} of the cost)"
    else:
        money = f"spent {usd(-saved)} more ({-saved / best['cost']:.0%})"
    return f"the router {money} against {best['name']}, the best single arm, and was {accuracy}"


def plot(engine: sa.Engine, path: Path) -> Path:
    """Running accuracy and each arm's share over the stream, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with engine.connect() as conn:
        rows = read_models.outcomes(conn)
    arms = sorted({r.arm for r in rows})
    n = np.arange(1, len(rows) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    labeled = np.array([r.correct is not None for r in rows])
    right = np.array([bool(r.correct) for r in rows])
    top.plot(n, np.cumsum(right) / np.maximum(np.cumsum(labeled), 1), label="router")
    top.set_ylabel("running accuracy")
    top.set_ylim(0, 1)
    top.legend()
    window = max(10, len(rows) // 10)
    for arm in arms:
        chosen = np.array([r.arm == arm for r in rows], dtype=float)
        share = np.convolve(chosen, np.ones(window) / window, mode="valid")
        bottom.plot(np.arange(window, len(rows) + 1), share, label=arm)
    bottom.set_ylabel(f"share (last {window})")
    bottom.set_xlabel("queries decided")
    bottom.set_ylim(0, 1)
    bottom.legend()
    fig.suptitle("metallm demo: what the router learned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def replay_config() -> AppConfig:
    """The example config with each arm answering from its recorded outcomes."""
    config = load_config(CONFIG)
    arms = [
        arm.model_copy(update={"provider": "replay", "model": arm.name, "outcomes": OUTCOMES})
        for arm in config.arms
    ]
    return config.model_copy(update={"arms": arms})


def schema_name(value: str) -> str:
    if not PLAIN_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"not a plain schema name: {value!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=positive_int, default=200, help="how many queries (1 to 320)"
    )
    parser.add_argument("--rate", type=float, default=4.0, help="queries per second")
    parser.add_argument(
        "--replay",
        action="store_true",
        help="answer from the recorded outcomes of the same two models instead of running them",
    )
    parser.add_argument(
        "--schema",
        default="metallm_demo",
        type=schema_name,
        help="Postgres schema for the demo, dropped and recreated on each run: only one the "
        "demo made (never public, nor a schema holding anything else)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "demo-output",
        help="where the plot and the broker log go",
    )
    parser.add_argument(
        "--label-delay", type=float, default=8.0, help="seconds between a query and its label"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start the router from nothing instead of warm-starting it from the recorded "
        "outcomes of the sample's other queries",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    queries, labels = read_events(DATASET, "queries"), read_events(DATASET, "labels")
    if args.limit > len(queries):  # not a shorter run than asked for, without a word
        parser.error(
            f"argument --limit: at most {len(queries)} (the sample's size), got {args.limit}"
        )
    queries, labels = queries[: args.limit], labels[: args.limit]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    # Ctrl-C as for `metallm serve`: it sets an event the streaming loop checks (start-up
    # finishes first; a second Ctrl-C ends the demo at once). A KeyboardInterrupt could land
    # anywhere, kafka-python's network loop included, which swallows it.
    stop = stop_on_signals()
    try:
        with contextlib.ExitStack() as stack:
            run(stack, queries, labels, args, out, stop)
    except KeyboardInterrupt:
        console.print("interrupted: everything the demo started has been stopped")
    except SchemaRefused as exc:
        print(f"demo: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None


def run(
    stack: contextlib.ExitStack,
    queries: list,
    labels: list,
    args,
    out: Path,
    stop: threading.Event,
) -> None:
    """Start everything on ``stack`` (so it is all stopped on exit or Ctrl-C), then stream."""
    default_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    with console.status("finding a Postgres…"):
        database_url, origin = stack.enter_context(
            demo_database(os.environ.get("DATABASE_URL", default_url))
        )
    with console.status("migrating the database…"):  # (a refused schema: before the broker)
        prepare_demo_schema(database_url, args.schema)  # each run starts from a clean slate
    with console.status("starting a local Kafka broker (Tansu)…"):
        broker = stack.enter_context(LocalBroker(log_path=out / "broker.log"))
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        database_url=database_url,
        database_schema=args.schema,
        config=CONFIG,
        checkpoint_every=50,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        poll_max_records=16,
        metrics_port=0,
    )
    config = replay_config() if args.replay else load_config(CONFIG)
    if not args.cold:
        warm_start(settings, queries)
    with console.status("loading the embedding model and two local LLMs…"):
        service = Application.build(settings, config=config)
        stack.callback(service.stop)
        service.start()
    ensure_topics(settings, [settings.queries_topic, settings.labels_topic])
    console.print(
        f"Kafka (Tansu) at {broker.bootstrap}; {origin}, schema {args.schema!r}; "
        f"arms: {', '.join(service.config.arm_names)}; "
        f"metrics: http://127.0.0.1:{service.metrics_server.port}/metrics"
    )
    producer = make_producer(settings)
    stack.callback(producer.close)
    for topic, events, delay in (
        (settings.queries_topic, queries, 0.0),
        (settings.labels_topic, labels, args.label_delay),
    ):
        threading.Thread(
            target=publish,
            daemon=True,
            kwargs=dict(
                producer=producer,
                topic=topic,
                events=events,
                rate=args.rate,
                delay_seconds=delay,
                show_progress=False,
            ),
        ).start()
    engine = make_engine(database_url, args.schema)
    stack.callback(engine.dispose)
    started = time.monotonic()
    with Live(
        progress_table(engine, len(queries), started), console=console, refresh_per_second=2
    ) as live:
        while not service.crashed.is_set():
            if stop.is_set():  # Ctrl-C (polled: see main)
                raise KeyboardInterrupt
            live.update(progress_table(engine, len(queries), started))
            with engine.connect() as conn:
                labeled = read_models.progress(conn).labeled
            if labeled >= len(queries):
                break
            time.sleep(0.5)
    console.print()
    console.print(summary(engine))
    console.print(verdict(comparison(engine)))
    png = plot(engine, out / "demo.png")
    console.print(f"plot saved: {png}")
    console.print(
        closing(
            len(queries),
            service.live.policy.n_updates,
            args.schema,
            origin != "the local Postgres",
            png,
            settings.policy,
        )
    )


def warm_start(settings: Settings, queries: list) -> int:
    """Warm-start the router, as a user with history would: from the recorded outcomes of the
    sample's queries that are NOT streamed (disjoint from ``queries``), both arms' outcome on
    each. Returns how many queries it learned from (0: every query is streamed)."""
    streamed = {q.query_id for q in queries}
    history = [r for r in read_outcomes(OUTCOMES) if r.query_id not in streamed]
    if not history:
        console.print("cold start: every recorded query is streamed, none is left to learn from")
        return 0
    with console.status(f"warm-starting the router from {len(history)} other queries…"):
        warm_start_from(settings, history)
    console.print(
        f"warm start: the router learned from the recorded outcomes of {len(history)} other "
        f"queries (both arms on each; none of the {len(queries)} streamed queries among them)"
    )
    return len(history)


def closing(n: int, updates: int, schema: str, embedded: bool, png: Path, policy: str) -> Group:
    """What the user just saw (``policy``: the router's, as configured), and where to look
    next."""
    saw = Text.assemble(
        ("What you just saw: ", "bold"),
        f"{n} labeled queries streamed through Kafka → embedding → the {policy} router → an LLM "
        f"→ Postgres. Each label came later, on its own topic, and the router learned from it "
        f"({updates} rewards), trading each arm's accuracy against its cost.",
    )
    env = f"METALLM_DATABASE_SCHEMA={schema} "
    steps = [
        ("accuracy, cost and share per arm", f"{env}.venv/bin/metallm stats"),
        ("why a query went to its arm", f"{env}.venv/bin/metallm decisions --explain ID"),
        (
            "the router against every baseline, offline",
            ".venv/bin/metallm bench producers/data/demo_outcomes.jsonl",
        ),
        ("running accuracy and each arm's share over the stream", str(png)),
        (
            "the live dashboard (Grafana, fed by Prometheus)",
            "docker compose up, then http://localhost:3000",
        ),
    ]
    lines = [Text.assemble(f"  {what}:\n    ", (where, "cyan")) for what, where in steps]
    kept = (
        "The embedded Postgres stopped with the demo: set DATABASE_URL to a Postgres of yours "
        "to keep the decisions for these commands."
        if embedded
        else f"The decisions stay in schema {schema!r}; the broker and the service are stopped."
    )
    return Group(
        Text(""), saw, Text(""), Text("Where to look next:", style="bold"), *lines, Text(kept)
    )


if __name__ == "__main__":
    main()
