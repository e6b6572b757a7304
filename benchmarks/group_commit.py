"""Group commit (issue 26, item 4): from an LLM call's end to its decision being published.

A burst of 64 queries against a local OpenAI-compatible endpoint that answers every call after
200 ms (``ArmServer`` in "slow" mode), one arm with ``max_in_flight`` 8: the calls end in 8
waves of 8. The service is warmed up with one query first (its connections open, its
statements prepared, the decisions topic's metadata known), then the burst is published at
once. For each query, the delay is the time from the arm writing its answer (``answered_at``,
``time.time()`` in this process) to the service sending the decision event (the event's
``CreateTime`` timestamp, set by the service's producer when it sends, same clock).

Three modes of the same service, side by side, interleaved run by run:

- ``group commit`` (the default, ``METALLM_GROUP_COMMIT_MS=50``): every ≤ 50 ms, the queries
  whose calls have ended are stored in one transaction and published;
- ``whole batch`` (``METALLM_GROUP_COMMIT_MS=0``, how the service worked before): a poll's
  batch is stored and published once its slowest call has ended;
- ``group commit (20 ms)``: a shorter interval, more transactions.

Target: p99 ≤ 100 ms with group commit. Prints p50, p99 and the maximum of each mode (medians
over ``--repeats`` runs), the transactions each took, and the machine's load; asserts nothing.
The service is ``metallm serve`` in a process of its own (``tests/faults/serve.py``: the fault
tests' hashing embedder, as this is about storing and publishing, not embedding); the arm
server runs in this process. Transactions are counted from the rows' ``xmin``. Results go to
``benchmarks/results/group_commit.md`` (``--no-write``: not).

    .venv/bin/python benchmarks/group_commit.py              # 3 runs of each mode, ~3 min
    .venv/bin/python benchmarks/group_commit.py --repeats 1 --no-write

Needs Postgres (``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1/test);
starts its own Tansu broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BURST = 64
ARM_DELAY_S = 0.2
IN_FLIGHT = 8
TARGET_P99_MS = 100.0
# the default first, the baseline second; a shorter interval beside them, for the trade-off
MODES = {"group commit (50 ms)": 50, "whole batch (0)": 0, "group commit (20 ms)": 20}
RESULTS = ROOT / "benchmarks" / "results" / "group_commit.md"
log = logging.getLogger("group_commit")


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (linear between order statistics)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Run:
    mode: str
    delays_ms: list[float]  # call's end → decision event sent, one per query
    seconds: float  # the burst, from its publication to its last decision stored
    transactions: int  # decision transactions (groups, or batches)
    to_decided_ms: list[float]  # call's end → its row built (decided_at), before the insert
    to_sent_ms: list[float]  # decided_at → its event sent (the transaction, then the send)

    @property
    def p50(self) -> float:
        return quantile(self.delays_ms, 0.5)

    @property
    def p99(self) -> float:
        return quantile(self.delays_ms, 0.99)

    @property
    def worst(self) -> float:
        return max(self.delays_ms)


def run_once(bootstrap: str, mode: str, commit_ms: int, folder: Path) -> Run:
    from consumers.kafka_io import create_topics, delete_topics
    from service.migrate import drop_schema, upgrade
    from service.settings import isolated_stream_names
    from service.storage import make_engine
    from tests.faults.harness import (
        ArmServer,
        ServiceProcess,
        arm_config,
        make_queries,
        publish,
        read_all,
        service_env,
        wait_until,
        write_config,
    )

    tag = uuid.uuid4().hex[:8]
    names = isolated_stream_names(f"group-{tag}")
    schema = f"group_{tag}"
    topics = [v for k, v in names.items() if k.endswith("_topic")]
    upgrade(DATABASE_URL, schema)
    create_topics(bootstrap, topics, 1)
    queries = make_queries(BURST, prefix=f"q-{tag}")
    warm = make_queries(1, prefix=f"w-{tag}")[0]
    server = ArmServer({q.query_id: q for q in [*queries, warm]}, {"arm": 0.8}).start()
    server.modes["arm"], server.delay["arm"] = "slow", ARM_DELAY_S
    config = write_config(
        folder / f"{tag}.yaml",
        arm_config(server, {"arm": (0.1, 0.2)}, arm={"max_in_flight": IN_FLIGHT}),
    )
    env = service_env(
        bootstrap,
        names,
        DATABASE_URL,
        schema,
        config,
        poll_max_records=BURST,
        group_commit_ms=commit_ms,
        topic_partitions=1,
    )
    engine = make_engine(DATABASE_URL, schema)
    service = ServiceProcess(env, folder / f"{tag}.log").start()
    try:
        wait_until(lambda: service.serving, 120, "the service serving", alive=lambda: service.alive)
        # one query first: the service warm (its connections, the decisions topic's metadata,
        # the statements prepared), as a service in steady state is
        publish(bootstrap, names["queries_topic"], [(warm.query_id.encode(), warm.event())])
        wait_until(lambda: _decided(engine) == 1, 60, "the warm-up query decided", interval=0.05)
        started = time.monotonic()
        publish(
            bootstrap, names["queries_topic"], [(q.query_id.encode(), q.event()) for q in queries]
        )
        wait_until(lambda: _decided(engine) == BURST + 1, 120, "the burst decided", interval=0.05)
        seconds = time.monotonic() - started
        events: list = []

        def all_published() -> bool:  # the events follow their transaction by moments
            events[:] = read_all(bootstrap, names["decisions_topic"])
            return len(events) >= BURST + 1

        wait_until(all_published, 60, "every decision published", interval=0.1)
        decided_at, transactions = _decided_at(engine)
        service.terminate()
    finally:
        service.kill()
        server.kill()
        engine.dispose()
        delete_topics(bootstrap, topics)
        drop_schema(DATABASE_URL, schema)
    burst = {q.query_id for q in queries}
    sent = {e.key.decode(): e.timestamp / 1000 for e in events if e.key.decode() in burst}
    delays = [(sent[q] - server.answered_at[q]) * 1000 for q in sent]
    if len(delays) != BURST:
        raise AssertionError(f"{mode}: {len(delays)} decision events for {BURST} queries")
    to_decided = [(decided_at[q] - server.answered_at[q]) * 1000 for q in sent]
    to_sent = [(sent[q] - decided_at[q]) * 1000 for q in sent]
    return Run(mode, delays, seconds, transactions - 1, to_decided, to_sent)


def _decided_at(engine) -> tuple[dict[str, float], int]:
    """Each decision's ``decided_at``, and how many transactions stored them (their xmin)."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = list(
            conn.execute(sa.text("SELECT query_id, decided_at, xmin::text AS tx FROM decisions"))
        )
    return {r.query_id: r.decided_at.timestamp() for r in rows}, len({r.tx for r in rows})


def _decided(engine) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one())


def p50_p99(runs: list[list[float]]) -> str:
    """The medians over runs of each run's p50 and p99."""
    p50 = statistics.median(quantile(r, 0.5) for r in runs)
    p99 = statistics.median(quantile(r, 0.99) for r in runs)
    return f"{p50:.1f} / {p99:.1f} ms"


def table(runs: dict[str, list[Run]]) -> list[str]:
    med = statistics.median
    lines = [
        "| mode | p50 | p99 | max | end → decided_at p50 / p99 | decided_at → sent p50 / p99 "
        "| transactions | burst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rs in runs.items():
        decided = p50_p99([r.to_decided_ms for r in rs])
        sent = p50_p99([r.to_sent_ms for r in rs])
        lines.append(
            f"| {mode} | {med(r.p50 for r in rs):.1f} ms | {med(r.p99 for r in rs):.1f} ms "
            f"| {med(r.worst for r in rs):.1f} ms | {decided} | {sent} "
            f"| {med(r.transactions for r in rs):.0f} | {med(r.seconds for r in rs):.2f} s |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from producers.local_broker import LocalBroker

    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    said: list[str] = []
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            for mode, commit_ms in MODES.items():  # interleaved: the machine is shared
                run = run_once(broker.bootstrap, mode, commit_ms, Path(folder))
                runs[mode].append(run)
                said.append(
                    f"- run {i + 1} {mode}: p50 {run.p50:.1f} ms, p99 {run.p99:.1f} ms, "
                    f"max {run.worst:.1f} ms, {run.transactions} transactions, "
                    f"{run.seconds:.2f} s (load {os.getloadavg()[0]:.1f})"
                )
                print(said[-1], flush=True)
    group, batch = (runs[m] for m in list(MODES)[:2])
    p99_group = statistics.median(r.p99 for r in group)
    p50_ratio = statistics.median(r.p50 for r in batch) / statistics.median(r.p50 for r in group)
    p99_ratio = statistics.median(r.p99 for r in batch) / p99_group
    lines = table(runs)
    verdict = "met" if p99_group <= TARGET_P99_MS else "missed"
    summary = [
        "",
        f"whole batch / group commit: p50 {p50_ratio:.1f}×, p99 {p99_ratio:.1f}×",
        f"target: p99 ≤ {TARGET_P99_MS:.0f} ms with group commit: {verdict} ({p99_group:.1f} ms)",
        f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
    ]
    print("\n".join(lines + summary))
    if not args.no_write:
        RESULTS.write_text(
            "# group_commit\n\n"
            f"A burst of {BURST} queries, one arm answering in {ARM_DELAY_S * 1000:.0f} ms with "
            f"`max_in_flight` {IN_FLIGHT}: from a call's end (the arm's answer) to its decision "
            f"event being sent, medians of {args.repeats} interleaved runs "
            "(`benchmarks/group_commit.py`).\n\n"
            + "\n".join(lines + summary + ["", "Each run:", "", *said])
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
