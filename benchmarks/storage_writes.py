"""Storage writes: the CPU a batch of 64 decisions costs, client and Postgres server.

For each poll batch the decider looks up which queries are decided (by id), inserts the
decision rows (their decision_seq comes back with the insert) and takes any labels that came
first. This script times those statements as the service sends them (``service.storage``)
against SQLAlchemy's defaults for the same work, in the same run: a multi-row
``INSERT … VALUES`` (its "insertmanyvalues", ~30 parameters a row) and three lookups with
``IN (…)``, a parameter per id (the third reads back the costs, which the service's insert
returns). It prints the median CPU per batch of this process (time.thread_time) and of the Postgres
backend serving it (/proc/<pid>/stat, 10 ms ticks: averaged over the rounds), and the
ratios.

    .venv/bin/python benchmarks/storage_writes.py              # ~5 s
    .venv/bin/python benchmarks/storage_writes.py --rounds 100

Needs Postgres (``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1/test);
works in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from sqlalchemy.dialects import postgresql  # noqa: E402

from service import storage  # noqa: E402
from service.log import decisions as decision_sql  # noqa: E402
from service.log import labels as label_sql  # noqa: E402
from service.migrate import drop_schema, upgrade  # noqa: E402

BATCH = 64


def rows(tag: str) -> list[dict]:
    """A poll batch of decision rows shaped like the decider's (every column it writes)."""
    now = datetime.now(UTC)
    return [
        {
            "query_id": f"{tag}-{i}",
            "task": "sentiment",
            "text": f"the acting was fine but the plot dragged on for far too long ({tag}-{i})",
            "options": ["positive", "negative"],
            "metadata": {},
            "sent_at": now,
            "decided_at": now,
            "arm": "small",
            "propensity": 0.93,
            "probabilities": {"small": 0.93, "large": 0.07},
            "policy": "linucb",
            "status": "ok",
            "prediction": "positive",
            "raw_output": "positive",
            "error": None,
            "input_tokens": 40,
            "output_tokens": 1,
            "cost_usd": 4.4e-6,
            "latency_ms": 3.2,
            "attempts": 1,
            "fallback_arm": None,
            "answer_scores": None,
            "arm_scores": {"small": 0.5, "large": 0.4},
            "embedding_model": "all-MiniLM-L6-v2",
            "context": storage.vector_to_bytes(np.random.rand(384)),
            "kafka_partition": 0,
            "kafka_offset": i,
        }
        for i in range(BATCH)
    ]


# --------------------------------------------------------------- SQLAlchemy's default way
def insert_multirow(conn: sa.Connection, batch: list[dict]) -> set[str]:
    stmt = (
        postgresql.insert(storage.decisions)
        .on_conflict_do_nothing(index_elements=["query_id"])
        .returning(storage.decisions.c.query_id)
    )
    return set(conn.execute(stmt, batch).scalars())


def lookups_in(conn: sa.Connection, ids: list[str]) -> None:
    d, p = storage.decisions, storage.pending_labels
    conn.execute(sa.select(d.c.query_id).where(d.c.query_id.in_(ids))).all()
    conn.execute(sa.select(d.c.decision_seq, d.c.cost_usd).where(d.c.query_id.in_(ids))).all()
    conn.execute(sa.delete(p).where(p.c.query_id.in_(ids)).returning(p.c.query_id)).all()


# --------------------------------------------------------------- the service's way
def lookups_any(conn: sa.Connection, ids: list[str]) -> None:
    decision_sql.existing_query_ids(conn, ids)
    label_sql.take_pending_labels(conn, ids)  # (the costs come back with the insert)


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a local Postgres backend, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    url = os.environ.get("METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    upgrade(url, schema)
    engine = storage.make_engine(url, schema, pool_size=1, max_overflow=0)  # one backend
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        ways: dict[str, Callable[[sa.Connection, list[dict]], object]] = {
            "insert: multi-row VALUES (SQLAlchemy default)": insert_multirow,
            "insert: insert_decisions": decision_sql.insert_decisions,
            "lookups: 3 with IN (SQLAlchemy default)": lambda c, b: lookups_in(c, ids_of(b)),
            "lookups: 2 with = ANY(array)": lambda c, b: lookups_any(c, ids_of(b)),
        }
        client: dict[str, list[float]] = {name: [] for name in ways}
        server: dict[str, list[float]] = {name: [] for name in ways}
        print(f"cores: {os.cpu_count()}; batch: {BATCH}; rounds: {args.rounds}", flush=True)
        for round_ in range(args.rounds + 5):  # the first 5 warm up (and let Postgres prepare)
            for name, way in ways.items():  # interleaved: every way sees the same noise
                batch = rows(uuid.uuid4().hex[:8])
                if name.startswith("lookups"):
                    with engine.begin() as conn:
                        decision_sql.insert_decisions(conn, batch)
                s, c = backend_cpu(pid), time.thread_time()
                with engine.begin() as conn:
                    way(conn, batch)
                if round_ >= 5:
                    client[name].append(time.thread_time() - c)
                    server[name].append(backend_cpu(pid) - s)
        print(f"\n{'CPU per batch of 64, ms':<48}{'client (median)':>16}{'server (mean)':>15}")
        for name in ways:
            c, s = statistics.median(client[name]) * 1e3, statistics.mean(server[name]) * 1e3
            print(f"{name:<48}{c:>16.2f}{s:>15.2f}")
        for default, ours in (("insert: multi", "insert: storage"), ("lookups: 3", "lookups: 2")):
            a = next(n for n in ways if n.startswith(default))
            b = next(n for n in ways if n.startswith(ours))
            total_a = statistics.median(client[a]) + statistics.mean(server[a])
            total_b = statistics.median(client[b]) + statistics.mean(server[b])
            print(f"{b.split(':')[0]}: client + server, default/storage = {total_a / total_b:.2f}×")
    finally:
        engine.dispose()
        drop_schema(url, schema)
    return 0


def ids_of(batch: list[dict]) -> list[str]:
    return [row["query_id"] for row in batch]


if __name__ == "__main__":
    sys.exit(main())
