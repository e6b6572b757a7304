"""The HTTP door's router-added latency, against an instant local OpenAI-compatible endpoint.

One HTTP-only instance (the real service: MiniLM embedding, the default policy, Postgres) in
front of ``ArmServer`` (tests/faults/harness.py, answering at once), driven by the official
OpenAI SDK at a fixed rate of requests per second (open loop: each request leaves at its
time, whatever the others do). In the same run, at the same rates, the baseline: the same SDK
calling the endpoint directly. For each request through the door:

- in → arm: from the client sending it to the arm receiving its call (the door's parsing,
  reservation, embedding, choice);
- arm → out: from the arm receiving the call to the client holding the answer (the arm's
  answer, the decision's transaction, the response);
- added: the whole round trip less the direct call's median at that rate;
- embedding: the time the embedder took for the request's text (timed around the embedder
  itself), reported apart; added − embedding is the router's overhead without it.

    .venv/bin/python benchmarks/http_door.py                 # 20 and 50 req/s, 15 s each
    .venv/bin/python benchmarks/http_door.py --rates 20 50 100 --seconds 10

Results: ``benchmarks/results/http_door.md`` (``--no-write``: not written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "http_door.md"
DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ARMS = {"small": (0.1, 0.2), "big": (3.0, 6.0)}


class TimedEmbedder:
    """The real embedder, timing each call by the texts it embedded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def embed(self, texts):
        texts = list(texts)
        start = time.perf_counter()
        out = self.inner.embed(texts)
        took = time.perf_counter() - start
        with self._lock:
            for t in texts:
                self.seconds[t] = took
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def drive(rate: float, seconds: float, send) -> list[tuple[int, float, float]]:
    """Send ``rate`` requests a second for ``seconds`` (open loop); each one's (index, sent,
    answered) in ``time.monotonic()`` seconds."""
    n = int(rate * seconds)
    out: list[tuple[int, float, float]] = []
    start = time.monotonic() + 0.2

    def one(i: int) -> None:
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        sent = time.monotonic()
        send(i)
        out.append((i, sent, time.monotonic()))

    with ThreadPoolExecutor(min(256, n)) as pool:
        list(pool.map(one, range(n)))
    return out


def run(rates: list[float], seconds: float) -> list[dict]:
    import openai

    from service.embedding import Embedder
    from service.migrate import drop_schema, upgrade
    from service.settings import Settings
    from tests.faults.harness import ArmServer, arm_config

    arms = ArmServer({}, {a: 0.5 for a in ARMS}).start()
    schema = f"bench_door_{uuid.uuid4().hex[:8]}"
    upgrade(DATABASE_URL, schema)
    settings = Settings(
        database_url=DATABASE_URL,
        database_schema=schema,
        kafka_consumers=False,
        http_port=0,
        http_max_in_flight=256,
        metrics_port=None,
        progress_seconds=0,
    )
    embedder = TimedEmbedder(Embedder.from_settings(settings))
    from app.application import Application
    from service.config import parse_config

    config = parse_config(arm_config(arms, ARMS, **{a: {"max_in_flight": 256} for a in ARMS}))
    service = Application.build(settings, config=config, embedder=embedder)
    service.start()
    door = openai.OpenAI(
        base_url=f"http://127.0.0.1:{service.door.port}/v1", api_key="-", max_retries=0
    )
    direct = openai.OpenAI(base_url=arms.base_url("small"), api_key="-", max_retries=0)
    rows = []
    try:
        for rate in rates:
            tag = f"r{int(rate)}-{uuid.uuid4().hex[:4]}"

            def text(i: int, tag: str = tag) -> str:
                return f"[q-{tag}-{i}] The film was a delight, said reviewer {i}."

            def via_direct(i: int) -> None:
                direct.chat.completions.create(
                    model="small", messages=[{"role": "user", "content": text(i) + " direct"}]
                )

            def via_door(i: int) -> None:
                door.chat.completions.create(
                    model="metallm/sentiment", messages=[{"role": "user", "content": text(i)}]
                )

            base = drive(rate, seconds, via_direct)
            base_median = statistics.median(b - a for _, a, b in base)
            calls_before = len(arms.calls)
            timed = drive(rate, seconds, via_door)
            at = {c.query_id: c.at for c in arms.calls[calls_before:] if c.query_id}
            rows.append(summarise(rate, timed, at, tag, embedder, text, base_median))
    finally:
        service.stop()
        arms.kill()
        drop_schema(DATABASE_URL, schema)
    return rows


def summarise(rate, timed, at, tag, embedder, text, base_median) -> dict:
    into, out, added, embed, bare = [], [], [], [], []
    for i, sent, answered in timed:
        qid = f"q-{tag}-{i}"
        if qid not in at:
            continue
        into.append(at[qid] - sent)
        out.append(answered - at[qid])
        total = answered - sent - base_median
        e = embedder.seconds.get(text(i), 0.0)
        added.append(total)
        embed.append(e)
        bare.append(total - e)
    ms = 1000.0
    return {
        "rate": rate,
        "n": len(added),
        "direct_p50": base_median * ms,
        **{f"{k}_p50": pct(v, 0.5) * ms for k, v in _named(into, out, added, embed, bare)},
        **{f"{k}_p99": pct(v, 0.99) * ms for k, v in _named(into, out, added, embed, bare)},
    }


def _named(into, out, added, embed, bare):
    return [("in", into), ("out", out), ("added", added), ("embed", embed), ("bare", bare)]


def table(rows: list[dict]) -> str:
    head = (
        "| req/s | n | direct p50 | in→arm p50 / p99 | arm→out p50 / p99 | added p50 / p99 "
        "| embedding p50 / p99 | added − embedding p50 / p99 |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['rate']:g} | {r['n']} | {r['direct_p50']:.1f} ms"
        + "".join(
            f" | {r[k + '_p50']:.1f} / {r[k + '_p99']:.1f} ms"
            for k in ("in", "out", "added", "embed", "bare")
        )
        + " |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 50.0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-write", action="store_true", help="do not write the results")
    args = parser.parse_args()
    rows = run(args.rates, args.seconds)
    text = table(rows)
    print(text)
    if not args.no_write:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()[0]
        RESULTS.write_text(
            f"# HTTP door: router-added latency\n\n{when}, {os.cpu_count()} cores, load "
            f"{load:.1f}; `benchmarks/http_door.py --rates {' '.join(f'{r:g}' for r in args.rates)}"
            f" --seconds {args.seconds:g}`. Baseline (direct): the OpenAI SDK calling the same "
            "instant endpoint without the router, in the same run.\n\n" + text + "\n"
        )
        print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
