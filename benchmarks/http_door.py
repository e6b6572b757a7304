"""The HTTP door's router-added latency, against an instant local OpenAI-compatible endpoint.

One HTTP-only instance (the real service: MiniLM embedding, the default policy, Postgres), in a
process of its own, in front of ``ArmServer`` (tests/faults/harness.py, answering at once, in
this process), driven by the official OpenAI SDK from this process at a fixed rate of requests
per second (open loop: each request leaves at its time, whatever the others do), after
:data:`WARMUP_S` seconds of unmeasured requests to each router (a service in use is warm: its
first calls set up connections and caches). In the same run, at the same rates, the baseline:
the same SDK calling the endpoint directly. For each request through the door:

- in → arm: from the client sending it to the arm receiving its call (the door's parsing,
  embedding, choice; no reservation: the requests carry no id, so the door makes one);
- arm → out: from the arm receiving the call to the client holding the answer (the arm's
  answer, the decision's transaction, the response);
- added: the whole round trip less the direct call's median at that rate;
- embedding: the time the embedder took for the request's text (timed around the embedder
  itself), reported apart; added − embedding is the router's overhead without it;
- CPU per request: the CPU time (user + system) of the router's process and its children over
  the rate's run, per request (a figure the machine's load does not inflate the way it does
  latencies; metallm's Postgres backends' work is not in it).

Side by side, if LiteLLM is installed in its own virtualenv (``benchmarks/litellm_side.py``:
``/work/litellm-venv``, ``litellm[proxy]==1.81.13``; never in the project's): LiteLLM's proxy
in front of the same endpoint, driven by the same client at the same rates right after the
door, with the same columns (no embedding: LiteLLM does not embed). Without it, its rows are
skipped and the script says how to install it.

    .venv/bin/python benchmarks/http_door.py                 # 20 and 50 req/s, 15 s each
    .venv/bin/python benchmarks/http_door.py --rates 20 50 100 --seconds 10
    .venv/bin/python benchmarks/http_door.py --embedder hash   # without MiniLM's cost
    .venv/bin/python benchmarks/http_door.py --no-litellm      # metallm only

Results: ``benchmarks/results/http_door.md``, or ``http_door_hash.md`` with ``--embedder hash``
(``--no-write``: not written).
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
#: each router's unmeasured start, at the lowest rate: first calls, connections, caches
WARMUP_S = 3.0


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


def service_env(schema: str, in_flight: int, name: str | None = None) -> dict[str, str]:
    """The environment of an HTTP-only instance on ``schema`` (no broker, no metrics, no
    progress lines), with the door on a free port and ``in_flight`` requests at most."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALLM_")}
    env.update(
        DATABASE_URL=DATABASE_URL,
        METALLM_DATABASE_SCHEMA=schema,
        METALLM_KAFKA_CONSUMERS="false",
        METALLM_HTTP_PORT="0",
        METALLM_HTTP_MAX_IN_FLIGHT=str(in_flight),
        METALLM_METRICS_PORT="off",
        METALLM_PROGRESS_SECONDS="0",
        PYTHONPATH=str(ROOT),
    )
    if name is not None:
        env["METALLM_INSTANCE_ID"] = name
    return env


def serve(config: str, timings: str, kind: str) -> None:
    """The service's side, in a process of its own (the client and the endpoint stay in the
    parent): build and start an HTTP-only instance from the environment's settings, tell the
    door's port on stdout, serve until stdin closes, then write the embedding's timings."""
    import json

    from app.application import Application, settle_heap
    from service.config import load_config
    from service.embedding import Embedder
    from service.settings import Settings

    settings = Settings()
    if kind == "hash":  # the router without MiniLM's cost (the fault tests' embedder)
        from tests.faults.harness import HashEmbedder

        embedder = TimedEmbedder(HashEmbedder())
    else:
        embedder = TimedEmbedder(Embedder.from_settings(settings))
    service = Application.build(settings, config=load_config(Path(config)), embedder=embedder)
    settle_heap()  # as `metallm serve` does before it starts (Application.run_forever)
    service.start()
    print(f"PORT {service.door.port}", flush=True)
    sys.stdin.read()
    service.stop()
    Path(timings).write_text(json.dumps(embedder.seconds))


def run(rates: list[float], seconds: float, kind: str, litellm: Path | None) -> list[dict]:
    """Per rate, the direct calls then each router's; LiteLLM's proxy too if ``litellm``."""
    import json
    import subprocess
    import tempfile

    from benchmarks.litellm_side import Proxy
    from service.migrate import drop_schema, upgrade
    from tests.faults.harness import ArmServer, arm_config, write_config

    arms = ArmServer({}, {a: 0.5 for a in ARMS}).start()
    schema = f"bench_door_{uuid.uuid4().hex[:8]}"
    upgrade(DATABASE_URL, schema)
    folder = Path(tempfile.mkdtemp(prefix="metallm-door-bench-"))
    config = write_config(
        folder / "metallm.yaml",
        arm_config(arms, ARMS, **{a: {"max_in_flight": 256} for a in ARMS}),
    )
    env = service_env(schema, 256)
    timings = folder / "embedding.json"
    proxy = None if litellm is None else Proxy(litellm, {"small": arms.base_url("small")}, folder)
    command = [sys.executable, __file__, "--serve", str(config), str(timings), kind]
    child = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline().decode()
        assert line.startswith("PORT "), f"the service did not start: {line!r}"
        port = int(line.split()[1])
        targets = {"metallm": (f"http://127.0.0.1:{port}/v1", "metallm/sentiment", child.pid)}
        if proxy is not None:
            proxy.start()
            assert proxy.process is not None
            targets["litellm"] = (proxy.base_url, "small", proxy.process.pid)
        results = measure(arms, targets, rates, seconds)
        child.stdin.close()
        child.wait(120)
        spent = json.loads(timings.read_text())
    finally:
        if child.poll() is None:
            child.kill()
        if proxy is not None:
            proxy.stop()
        arms.kill()
        drop_schema(DATABASE_URL, schema)
    return [summarise(*r, spent if r[0] == "metallm" else {}) for r in results]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parent[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += used.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def measure(arms, targets: dict[str, tuple[str, str, int]], rates: list[float], seconds: float):
    """Per rate: the direct calls' median, then each router's requests (sent, answered) and
    when the arm took each one's call, the routers one after the other at the same rate."""
    import openai

    direct = openai.OpenAI(base_url=arms.base_url("small"), api_key="-", max_retries=0)
    clients = {
        name: openai.OpenAI(base_url=url, api_key="-", max_retries=0)
        for name, (url, _, _) in targets.items()
    }
    for name, (_, model, _) in targets.items():  # unmeasured: first calls, connections
        _one(arms, clients[name], model, f"{name}-warm", min(rates), WARMUP_S)
    out = []
    for rate in rates:
        tag = f"r{int(rate)}-{uuid.uuid4().hex[:4]}"

        def via_direct(i: int, tag=tag) -> None:
            direct.chat.completions.create(
                model="small",
                messages=[{"role": "user", "content": f"{tag} {i}: the film was a delight"}],
            )

        base = drive(rate, seconds, via_direct)
        base_median = statistics.median(b - a for _, a, b in base)
        for name, (_, model, pid) in targets.items():
            cpu = cpu_seconds(pid)
            sent = _one(arms, clients[name], model, f"{name}-{tag}", rate, seconds)
            cpu = (cpu_seconds(pid) - cpu) / max(1, len(sent[1]))
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            out.append((name, *sent, base_median, load, cpu))
    return out


def _one(arms, client, model: str, tag: str, rate: float, seconds: float) -> tuple:
    def text(i: int, tag: str = tag) -> str:
        return f"[q-{tag}-{i}] The film was a delight, said reviewer {i}."

    def send(i: int) -> None:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": text(i)}])

    calls_before = len(arms.calls)
    timed = drive(rate, seconds, send)
    at = {c.query_id: c.at for c in arms.calls[calls_before:] if c.query_id}
    return rate, timed, at, tag, text


def summarise(
    router, rate, timed, at, tag, text, base_median, load: str, cpu: float, spent: dict[str, float]
) -> dict:
    into, out, added, embed, bare = [], [], [], [], []
    for i, sent, answered in timed:
        qid = f"q-{tag}-{i}"
        if qid not in at:
            continue
        into.append(at[qid] - sent)
        out.append(answered - at[qid])
        total = answered - sent - base_median
        e = spent.get(text(i), 0.0)
        added.append(total)
        embed.append(e)
        bare.append(total - e)
    ms = 1000.0
    return {
        "router": router,
        "rate": rate,
        "load": load,
        "cpu_ms": cpu * 1000.0,
        "n": len(added),
        "direct_p50": base_median * ms,
        **{f"{k}_p50": pct(v, 0.5) * ms for k, v in _named(into, out, added, embed, bare)},
        **{f"{k}_p99": pct(v, 0.99) * ms for k, v in _named(into, out, added, embed, bare)},
    }


def _named(into, out, added, embed, bare):
    return [("in", into), ("out", out), ("added", added), ("embed", embed), ("bare", bare)]


def table(rows: list[dict]) -> str:
    head = (
        "| router | req/s | n | direct p50 | in→arm p50 / p99 | arm→out p50 / p99 "
        "| added p50 / p99 | embedding p50 / p99 | added − embedding p50 / p99 "
        "| CPU per request | load average |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = sorted(rows, key=lambda r: (r["rate"], r["router"] != "metallm"))
    lines = [
        f"| {r['router']} | {r['rate']:g} | {r['n']} | {r['direct_p50']:.1f} ms"
        + "".join(
            f" | {r[k + '_p50']:.1f} / {r[k + '_p99']:.1f} ms"
            for k in ("in", "out", "added", "embed", "bare")
        )
        + f" | {r['cpu_ms']:.1f} ms | {r['load']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0, 50.0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-write", action="store_true", help="do not write the results")
    parser.add_argument(
        "--embedder",
        choices=["minilm", "hash"],
        default="minilm",
        help="hash: feature hashing in place of MiniLM (the router's cost without the model)",
    )
    parser.add_argument(
        "--no-litellm", action="store_true", help="leave LiteLLM's proxy out even if installed"
    )
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    from benchmarks import litellm_side

    litellm = None if args.no_litellm else litellm_side.find()
    if litellm is None:
        print(f"LiteLLM's column skipped; to install it: {litellm_side.INSTALL}")
        side = "LiteLLM: not run."
    else:
        side = f"LiteLLM {litellm_side.version(litellm)}'s proxy (one worker, no database)."
    load_before = os.getloadavg()[0]
    rows = run(args.rates, args.seconds, args.embedder, litellm)
    text = table(rows)
    print(text)
    results = RESULTS.with_name("http_door_hash.md") if args.embedder == "hash" else RESULTS
    if not args.no_write:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        rates = " ".join(f"{r:g}" for r in args.rates)
        load = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
        results.write_text(
            f"# HTTP door: router-added latency\n\n{when}, {os.cpu_count()} cores, load average "
            f"{load} (before → after); `benchmarks/http_door.py --rates {rates}"
            f" --seconds {args.seconds:g} --embedder {args.embedder}`. Baseline (direct): the "
            "OpenAI SDK calling the same instant endpoint without the router, in the same run. "
            f"{side} The load average (1, 5, 15 min) is taken after each row's run."
            "\n\n" + text + "\n"
        )
        print(f"written to {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
