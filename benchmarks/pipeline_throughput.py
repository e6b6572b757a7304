"""Pipeline throughput: Kafka → embed → policy → LLM → Postgres, with an OpenAI-compatible arm.

(a) Concurrency. The arms answer after 200 ms. The same pipeline runs with calls bounded to
    64 in flight and with one call at a time; the script prints decisions/s of both, their
    ratio and the peak number of calls in flight (targets: ≥ 40 in flight, ≥ 30× serial).
(b) Overhead. The arms answer at once. End-to-end decisions/s against the raw embedding rate
    of the same texts (``Embedder.embed`` in batches of 64) measured in the same run
    (target: ≥ 0.8); and the gateway alone on the OpenAI SDK's two transports (aiohttp, the
    default, and httpx), for the CPU each costs per call, next to the same requests POSTed
    by plain aiohttp (:func:`plain_post_provider`, a benchmark-only provider: what the SDK's
    request path costs). A what-if leg runs the pipeline again with that provider: what (b)
    would be without the SDK.

Both use the service's embedding backend (``METALLM_EMBEDDING_BACKEND``, default ``onnx``;
``--backend`` to choose another): a faster backend raises (b)'s baseline as much as the
pipeline, so (b) measures what the rest of the pipeline costs next to embedding.

Queries are published before the service starts; the clock runs from the moment the service
starts on its first batch (embedding and calling it) to the last decision in Postgres
(consumer start-up is not counted). Each measurement is repeated, interleaved, and the median
printed with the machine's load average (other processes on the cores skew every figure);
targets are printed, never asserted.

The endpoint is a tiny asyncio HTTP/1.1 server in its own process (a load generator, not a
test of the adapter: the adapter's tests use the real llama_cpp.server). It answers chat
completions with the first allowed label of the prompt, with real usage counts.

    .venv/bin/python benchmarks/pipeline_throughput.py              # ~3-5 minutes
    .venv/bin/python benchmarks/pipeline_throughput.py --quick      # smaller, ~2 minutes
    .venv/bin/python benchmarks/pipeline_throughput.py --gateway --repeats 5   # ~1 minute
    .venv/bin/python benchmarks/pipeline_throughput.py --backend onnx-int8
    .venv/bin/python benchmarks/pipeline_throughput.py --quick --trace   # + the embedder's time

Needs Postgres (``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1/test);
starts its own Tansu broker. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producers.demo_data import TASKS, demo_rows  # noqa: E402

BATCH = 64


# ------------------------------------------------------------------------------ the endpoint
async def _serve(port: int, delay: float) -> None:
    """A minimal OpenAI-compatible chat endpoint (keep-alive HTTP/1.1, no framework)."""
    stats = {"in_flight": 0, "peak": 0, "requests": 0}
    choices = re.compile(r"Answer with exactly one of: ([^.\n]+)")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
                body = await reader.readexactly(length) if length else b""
                if path.startswith("/stats"):
                    payload = dict(stats)
                    if path.endswith("reset"):
                        stats.update(peak=0, requests=0)
                else:
                    stats["in_flight"] += 1
                    stats["requests"] += 1
                    stats["peak"] = max(stats["peak"], stats["in_flight"])
                    try:
                        if delay:
                            await asyncio.sleep(delay)
                        request = json.loads(body)
                        prompt = request["messages"][0]["content"]
                        found = choices.search(prompt)
                        answer = found.group(1).split(", ")[0] if found else "yes"
                        payload = {
                            "id": "chatcmpl-bench",
                            "object": "chat.completion",
                            "created": 0,
                            "model": request.get("model", "bench"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": len(prompt) // 4,
                                "completion_tokens": 1,
                                "total_tokens": len(prompt) // 4 + 1,
                            },
                        }
                    finally:
                        stats["in_flight"] -= 1
                data = json.dumps(payload).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


class Endpoint:
    """The endpoint in a subprocess, so it does not share the pipeline's GIL."""

    def __init__(self, delay: float) -> None:
        from producers.local_broker import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the endpoint did not start")

    def stats(self, reset: bool = False) -> dict:
        import urllib.request

        path = "/stats/reset" if reset else "/stats"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# ------------------------------------------------------------------------------ a pipeline run
class RunTimes:
    """``--trace``: every run of the ONNX embedder timed (wall clock and thread CPU), to tell
    an embedder waiting for work (no run going) from one losing its cores (a run going, its
    thread off the core). ONNX backends only."""

    def __init__(self, embedder) -> None:
        session = embedder._impl.session
        run, self.threads = session.run, embedder.threads
        self.spans: list[tuple[float, float, float]] = []  # (start, end, thread CPU)

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return run(*args, **kwargs)
            finally:
                self.spans.append((start, time.perf_counter(), time.thread_time() - cpu))

        session.run = timed

    def summary(self) -> dict[str, float]:
        """Over the window from the first run's start to the last run's end: the share of the
        threads' time inside a run, the share of that on a core, and the share of the window
        with no run going at all."""
        spans, self.spans = self.spans, []
        first, last = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
        inside = sum(e - s for s, e, _ in spans)
        edges = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
        idle, going, since = 0.0, 0, first
        for at, step in edges:
            if going == 0:
                idle += at - since
            going, since = going + step, at
        return {
            "inside": inside / (self.threads * (last - first)),
            "on_core": sum(c for _, _, c in spans) / inside,
            "no_run": idle / (last - first),
        }


def rows(n: int) -> list[dict]:
    """``n`` queries: the demo texts, each made unique (the service caches the vectors of texts
    it has seen, and the raw embedding rate it is compared with embeds every text)."""
    data = demo_rows()
    tag = uuid.uuid4().hex[:6]
    return [
        {
            **data[i % len(data)],
            "query_id": f"{tag}-{i}",
            "text": f"{data[i % len(data)]['text']} (ref {tag}-{i})",
        }
        for i in range(n)
    ]


def plain_post_provider(arm):
    """The openai adapter with its request POSTed by plain aiohttp instead of the SDK: a
    what-if reference for (b), not a service option (the issue asks for the official SDK).
    Same body and reply parsing as the adapter. For the benchmark's local endpoint only: no
    API key, and no error mapping beyond the status (a connection error is a provider bug)."""
    import aiohttp

    from service.llm.base import RETRYABLE_STATUS, LLMError
    from service.llm.openai_api import OpenAIProvider

    class PlainPost(OpenAIProvider):
        session: aiohttp.ClientSession | None = None

        async def _create(self, text, extra_body=None, **kwargs):
            if self.session is None:  # made on the calls' loop, at its first call
                self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            path, body = self.request_body(text, extra_body, **kwargs)
            async with self.session.post(
                f"{str(self.arm.base_url).rstrip('/')}{path}",
                data=json.dumps(body).encode(),
                headers={"Authorization": "Bearer unused", "Content-Type": "application/json"},
            ) as response:
                if response.status >= 400:
                    raise LLMError(f"HTTP {response.status}", response.status in RETRYABLE_STATUS)
                raw = await response.read()
            return self.read_reply(raw, "logprobs" in body)

        async def aclose(self) -> None:
            if self.session is not None:
                await self.session.close()
            await super().aclose()

    return PlainPost(arm)


def run_pipeline(
    broker: str,
    database_url: str,
    embedder,
    endpoint: Endpoint,
    n: int,
    in_flight: int,
    times: RunTimes | None = None,
    plain_post: bool = False,
) -> dict:
    """Publish ``n`` queries, run the service until all are decided; steady-state rate (and,
    with ``times``, how the embedder spent the run). ``plain_post``: the arms send their
    requests with :func:`plain_post_provider` instead of the SDK."""
    import sqlalchemy as sa
    from kafka import KafkaProducer

    from app.application import Application
    from service.config import parse_config
    from service.migrate import drop_schema, upgrade
    from service.settings import Settings, isolated_stream_names
    from service.storage import make_engine

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    upgrade(database_url, schema)
    tag = uuid.uuid4().hex[:8]
    arm = {
        "provider": "openai",
        "model": "bench",
        "base_url": endpoint.url,
        "max_in_flight": in_flight,
        "timeout_seconds": 30,
        "input_price_per_1m": 0.1,
        "output_price_per_1m": 0.4,
    }
    config = parse_config(
        {
            "tasks": TASKS,
            "arms": [{**arm, "name": "small"}, {**arm, "name": "large", "input_price_per_1m": 1}],
            "gateway": {"max_in_flight": in_flight},
        }
    )
    settings = Settings(
        kafka_bootstrap=broker,
        database_url=database_url,
        database_schema=schema,
        **isolated_stream_names(f"bench-{tag}"),
        poll_max_records=BATCH,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    from consumers.kafka_io import ensure_topics

    ensure_topics(settings, [settings.queries_topic])
    producer = KafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=5)
    for row in rows(n):
        value = json.dumps({k: row[k] for k in ("query_id", "text", "task")}).encode()
        producer.send(settings.queries_topic, key=row["query_id"].encode(), value=value)
    producer.flush()
    producer.close()

    engine = make_engine(database_url, schema)
    endpoint.stats(reset=True)
    gateway = None
    if plain_post:
        from service.llm.gateway import Gateway

        gateway = Gateway(config, {a.name: plain_post_provider(a) for a in config.arms})
    service = Application.build(settings, config=config, embedder=embedder, gateway=gateway)
    started: list[float] = []
    call_ahead = service.decider.call_ahead

    def timed_call_ahead(events):
        if events and not started:  # (an empty poll before the group is joined: not yet)
            started.append(time.monotonic())
        return call_ahead(events)

    # the clock starts with the first batch: the consumer hands every batch it polls (all
    # queries here are valid) to call_ahead before deciding it
    service.decider.call_ahead = timed_call_ahead
    if times is not None:
        times.spans.clear()  # (the warm-up and the raw rate's runs are not this run's)
    service.start()
    try:
        deadline = time.monotonic() + 900
        # one connection, polled every 50 ms: the watching costs the cores the service runs
        # on (a new pooled connection every 20 ms took ~0.04 of a core); the end is seen at
        # most 50 ms late, against the service
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
            while True:
                done = watch.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one()
                now = time.monotonic()
                if done >= n:
                    break
                if now > deadline:
                    raise RuntimeError(f"only {done}/{n} decisions after 900 s")
                time.sleep(0.05)
        elapsed = now - started[0]
        with engine.connect() as conn:
            statuses = {
                status: count
                for status, count in conn.execute(
                    sa.text("SELECT status, count(*) FROM decisions GROUP BY status")
                )
            }
    finally:
        service.stop()
        engine.dispose()
        drop_schema(database_url, schema)
    return {
        "rate": n / elapsed,
        "peak_in_flight": endpoint.stats()["peak"],
        "statuses": statuses,
        **({"embedder": times.summary()} if times is not None else {}),
    }


def gateway_rate(
    endpoint: Endpoint, n: int, in_flight: int, transport: str = "aiohttp"
) -> tuple[float, float]:
    """Calls/s through the Gateway alone (no Kafka, embedding or Postgres) and this process's
    CPU µs per call (the endpoint runs in its own process; nothing else of this one is busy
    meanwhile). ``transport``: the OpenAI SDK's ``aiohttp`` or ``httpx`` one, or ``plain``
    (:func:`plain_post_provider`: no SDK, what its request path costs)."""
    from service.config import TaskConfig, parse_config
    from service.llm.base import CallRequest
    from service.llm.gateway import Gateway
    from service.tasks import build_prompt

    arm = {
        "name": "a",
        "provider": "openai",
        "model": "bench",
        "base_url": endpoint.url,
        "http_client": "aiohttp" if transport == "plain" else transport,
    }
    config = parse_config(
        {
            "tasks": TASKS,
            "arms": [{**arm, "max_in_flight": in_flight}],
            "gateway": {"max_in_flight": in_flight},
        }
    )
    task = TaskConfig(**TASKS["sentiment"])
    requests = [
        CallRequest(r["query_id"], build_prompt(task, r["text"], task.labels)) for r in rows(n)
    ]

    async def run() -> tuple[float, float]:
        providers = {"a": plain_post_provider(config.arms[0])} if transport == "plain" else None
        gateway = Gateway(config, providers)
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(gateway.call("a", r) for r in requests))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await gateway.aclose()
        return n / elapsed, cpu / n * 1e6

    return asyncio.run(run())


def print_gateway(transports: dict[str, list[tuple[float, float]]]) -> None:
    """The gateway alone, 64 in flight, on each of the OpenAI SDK's transports, and the plain
    aiohttp reference (``transports["plain"]``)."""
    print("  the gateway alone, 64 in flight, by the OpenAI SDK's transport:")
    for name, runs in transports.items():
        label = "plain aiohttp POSTs, no SDK (reference)" if name == "plain" else name
        print(f"  {label}")
        print(f"  {'':<8} calls/s {median_of([r for r, _ in runs])}")
        print(f"  {'':<8} CPU µs/call {median_of([c for _, c in runs])}")
    rates = {name: statistics.median(r for r, _ in runs) for name, runs in transports.items()}
    print(f"  aiohttp/httpx  {rates['aiohttp'] / rates['httpx']:8.2f}×")


def gateway_only(repeats: int, n: int) -> None:
    """``--gateway``: only the gateway alone against the instant endpoint (no broker, no
    embedding, no Postgres), e.g. to compare the adapter's CPU per call between commits."""
    instant = Endpoint(0.0)
    try:
        transports: dict[str, list[tuple[float, float]]] = {"aiohttp": [], "httpx": [], "plain": []}
        gateway_rate(instant, 64, 64)  # warm-up: imports, first connections
        for _ in range(repeats):
            for name, runs in transports.items():
                runs.append(gateway_rate(instant, n, 64, name))
        print_gateway(transports)
        print(f"\nload average at the end: {load()}")
    finally:
        instant.close()


def print_trace(traced: dict[str, list[dict[str, float]]]) -> None:
    """``--trace``: how the embedding threads spent the 64-in-flight runs (medians)."""
    print("\nthe embedder in the pipeline runs (--trace): shares, medians of the runs")
    print(f"  {'':<6}{'inside a run':>14}{'on a core then':>16}{'no run going':>14}")
    for leg, runs in traced.items():
        inside, on_core, no_run = (
            statistics.median(r[key] for r in runs) for key in ("inside", "on_core", "no_run")
        )
        print(f"  {leg:<6}{inside:>14.2f}{on_core:>16.2f}{no_run:>14.2f}")


def embedding_rate(embedder, n: int) -> float:
    texts = [r["text"] for r in rows(n)]
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        embedder.embed(texts[i : i + BATCH])
    return n / (time.perf_counter() - start)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def median_of(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f}  (runs: {', '.join(f'{v:.1f}' for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DELAY"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer queries and repeats")
    parser.add_argument(
        "--gateway", action="store_true", help="only the gateway alone (calls/s, CPU per call)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="time the embedder's runs: waiting for work, or losing its cores (onnx backends)",
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "onnx", "onnx-int8"],
        default=None,
        help="embedding backend (default: the service's, METALLM_EMBEDDING_BACKEND)",
    )
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(int(args.serve[0]), float(args.serve[1])))
        return 0

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = args.repeats or (2 if args.quick else 3)
    if args.gateway:
        print(f"cores: {os.cpu_count()}; repeats: {repeats}; load: {load()}")
        gateway_only(repeats, 1280 if args.quick else 3000)
        return 0
    n_concurrent, n_serial, n_instant = (640, 20, 640) if args.quick else (1280, 30, 1280)
    database_url = os.environ.get(
        "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )

    from producers.local_broker import LocalBroker
    from service.embedding import Embedder
    from service.settings import Settings

    backend = args.backend or Settings().embedding_backend
    embedder = Embedder(backend=backend)
    embedder.embed(["warm-up"] * BATCH)
    if args.trace and embedder.threads is None:
        parser.error("--trace times ONNX Runtime's runs: use an onnx backend")
    times = RunTimes(embedder) if args.trace else None
    traced: dict[str, list[dict[str, float]]] = {"(a)": [], "(b)": []}
    print(
        f"cores: {os.cpu_count()}; repeats: {repeats}; batch: {BATCH}; "
        f"embedding backend: {backend} ({embedder.threads or 'PyTorch-managed'} threads); "
        f"load: {load()}"
    )
    with LocalBroker() as broker:
        slow, instant = Endpoint(0.2), Endpoint(0.0)
        try:
            concurrent, serial, peaks, gw_many, gw_one = [], [], [], [], []
            for _ in range(repeats):  # interleaved, so both see the same machine noise
                gw_many.append(gateway_rate(slow, 640, 64)[0])
                gw_one.append(gateway_rate(slow, 15, 1)[0])
                result = run_pipeline(
                    broker.bootstrap, database_url, embedder, slow, n_concurrent, 64, times
                )
                traced["(a)"].extend([result["embedder"]] if times else [])
                concurrent.append(result["rate"])
                peaks.append(result["peak_in_flight"])
                result = run_pipeline(broker.bootstrap, database_url, embedder, slow, n_serial, 1)
                serial.append(result["rate"])
            print("\n(a) 200 ms endpoint: decisions/s")
            print(f"  64 in flight   {median_of(concurrent)}")
            print(f"  one at a time  {median_of(serial)}")
            speedup = statistics.median(concurrent) / statistics.median(serial)
            print(f"  speed-up       {speedup:8.1f}×   target ≥ 30×")
            print(f"  peak in flight {max(peaks):8d}    target ≥ 40  (runs: {peaks})")
            print("  the gateway alone (no Kafka, embedding, Postgres): calls/s")
            print(f"  64 in flight   {median_of(gw_many)}")
            print(f"  one at a time  {median_of(gw_one)}")
            ratio = statistics.median(gw_many) / statistics.median(gw_one)
            print(f"  speed-up       {ratio:8.1f}×")

            raw: list[float] = []
            legs: dict[str, list[dict]] = {"sdk": [], "plain": []}  # each run's result
            transports: dict[str, list[tuple[float, float]]] = {
                "aiohttp": [],
                "httpx": [],
                "plain": [],
            }
            for repeat in range(repeats):
                for name, runs in transports.items():
                    runs.append(gateway_rate(instant, n_instant, 64, name))
                raw.append(embedding_rate(embedder, n_instant))
                # the SDK and the what-if in turn, each first every other repeat
                for leg in ("sdk", "plain") if repeat % 2 == 0 else ("plain", "sdk"):
                    leg_times = times if leg == "sdk" else None
                    result = run_pipeline(
                        broker.bootstrap,
                        database_url,
                        embedder,
                        instant,
                        n_instant,
                        64,
                        leg_times,
                        plain_post=leg == "plain",
                    )
                    legs[leg].append(result)
                    traced["(b)"].extend([result["embedder"]] if leg_times else [])
            print("\n(b) instant endpoint: events/s")
            print(f"  raw embedding  {median_of(raw)}")
            for leg in ("sdk", "plain"):
                if leg == "plain":
                    print(
                        "  what-if (benchmark only, not a service option): the arms' requests "
                        "POSTed by plain aiohttp, not the OpenAI SDK"
                    )
                rates = [r["rate"] for r in legs[leg]]
                ratio = statistics.median(rates) / statistics.median(raw)
                print(f"  end to end     {median_of(rates)}")
                target = "    target ≥ 0.8" if leg == "sdk" else ""
                print(f"  ratio          {ratio:8.2f}{target}")
                print(f"  statuses of the last run: {legs[leg][-1]['statuses']}")
            print_gateway(transports)
            if times is not None:
                print_trace(traced)
            print(f"\nload average at the end: {load()}")
        finally:
            slow.close()
            instant.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
