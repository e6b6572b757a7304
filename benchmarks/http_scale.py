"""HTTP door scale-out (issue 26): decisions/s with 1, 2 and 3 HTTP-only instances on one database.

The LLM-bound regime: every arm is a local OpenAI-compatible endpoint (``ArmServer`` in "slow"
mode, in a process of its own) answering after 200 ms, and each instance answers at most
``--in-flight`` requests at once (``METALLM_HTTP_MAX_IN_FLIGHT``), so one instance's ceiling is
``in-flight / 0.2 s`` decisions/s whatever the CPU; each arm's ``max_in_flight`` is the same
number, so no single arm is the bottleneck (the policy may send every call to one arm). Each
instance is the real service (``benchmarks/http_door.py --serve``: ``Application.build`` with
the door on, no Kafka consumers, Postgres), on one shared schema.

The load: a closed loop of ``--in-flight`` clients per instance (aiohttp, in this process),
each sending its next ``POST /v1/chat/completions`` as soon as its last one is answered, every
query text unique. The rate is the answered requests (HTTP 200) between ``--warm-up`` and the
end of the run, over that time; it is checked against the decisions stored in Postgres. Any
``429`` (the door's backpressure) is counted and reported: with one client per slot there
should be none. Configurations are interleaved (1, 2, 3, 1, 2, 3, …) and every figure is the
median of ``--repeats`` runs, printed with the load average (the 2 cores are shared).

Embedders: ``hash`` (the fault tests' feature hashing: the router without MiniLM's CPU) and
``minilm`` (the default ONNX MiniLM in every instance: on 2 cores the embedding's CPU caps
the machine at ~150-250 texts/s, see ``pipeline_throughput.py``). Targets: ≥ 1.8× one
instance's rate with 2 instances, ≥ 2.5× with 3.

    .venv/bin/python benchmarks/http_scale.py                          # both embedders, ~12 min
    .venv/bin/python benchmarks/http_scale.py --embedders hash --repeats 1 --no-write

Results: ``benchmarks/results/http_scale.md`` (``--no-write``: not written). Needs Postgres
(``METALLM_TEST_DATABASE_URL``, default postgresql://postgres@127.0.0.1:5432/test); no broker.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.http_door import service_env  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "http_scale.md"
DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ARMS = {"small": (0.1, 0.2), "big": (3.0, 6.0)}  # price in / out per 1M tokens
ARM_DELAY_S = 0.2
TARGETS = {2: 1.8, 3: 2.5}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Arms:
    """The arm server of the child process, seen from here (its URLs only)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def base_url(self, arm: str, caller: str | None = None) -> str:
        return f"{self.url}/{arm}/v1" if caller is None else f"{self.url}/from-{caller}/{arm}/v1"


def serve_arms() -> None:
    """The arm server's process: every arm answers after ``ARM_DELAY_S``; its URL on stdout,
    served until stdin closes."""
    from tests.faults.harness import ArmServer

    server = ArmServer({}, {a: 0.5 for a in ARMS}).start()
    for arm in ARMS:
        server.modes[arm] = "slow"
        server.delay[arm] = ARM_DELAY_S
    print(f"URL {server.url}", flush=True)
    sys.stdin.read()
    server.kill()


def child(args: list[str], env: dict[str, str], prefix: str, log: Path) -> tuple:
    """A child process of this script and the value it announced on stdout (``prefix value``)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith(prefix + " "):
        proc.kill()
        raise RuntimeError(f"{args} did not start ({line!r}); see {log}")
    return proc, line.split()[1]


def cpu_times() -> tuple[int, int]:
    """The machine's (busy, total) CPU jiffies so far, from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Until the door answers ``/readyz`` (its port is bound before uvicorn listens)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def closed_loop(ports: list[int], clients: int, seconds: float, tag: str) -> list[tuple]:
    """``clients`` closed-loop clients per door for ``seconds``: each request's (start, end,
    status) in ``time.monotonic()`` seconds."""
    import aiohttp

    out: list[tuple[float, float, int]] = []
    deadline = time.monotonic() + seconds

    async def client(session, port: int, c: int) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        i = 0
        while time.monotonic() < deadline:
            i += 1
            text = f"[q-{tag}-{port}-{c}-{i}] The film was a delight, said reviewer {c}.{i}."
            body = {"model": "metallm/sentiment", "messages": [{"role": "user", "content": text}]}
            start = time.monotonic()
            try:
                async with session.post(url, json=body) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:  # counted as failed (e.g. Postgres cut by another job)
                status = 0
            out.append((start, time.monotonic(), status))
            if status != 200:
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            *(client(session, p, c) for p in ports for c in range(clients)),
        )
    return out


def one_run(k: int, embedder: str, arms: Arms, args, folder: Path) -> dict:
    """``k`` fresh instances on a fresh schema, driven for ``args.seconds``."""
    from service.migrate import drop_schema, upgrade
    from service.storage import make_engine
    from tests.faults.harness import arm_config, write_config

    schema = f"bench_http_scale_{uuid.uuid4().hex[:8]}"
    upgrade(DATABASE_URL, schema)
    limits = {a: {"max_in_flight": args.in_flight} for a in ARMS}
    config = write_config(folder / f"{schema}.yaml", arm_config(arms, ARMS, **limits))
    procs = []
    try:
        ports = []
        for n in range(k):
            name = f"door-{n}"
            command = [__file__.replace("http_scale", "http_door"), "--serve", str(config)]
            command += [str(folder / f"{schema}-{name}.json"), embedder]
            proc, port = child(
                command, service_env(schema, args.in_flight, name), "PORT", folder / f"{name}.log"
            )
            procs.append(proc)
            ports.append(int(port))
        for port in ports:
            wait_ready(port)
        asyncio.run(closed_loop(ports, 2, 2.0, "warm"))  # connections, first choices, caches
        before = load()
        began, cpu_before = time.monotonic(), cpu_times()
        done = asyncio.run(closed_loop(ports, args.in_flight, args.seconds, uuid.uuid4().hex[:6]))
        busy, total = (b - a for a, b in zip(cpu_before, cpu_times(), strict=True))
        window = (began + args.warm_up, began + args.seconds)
        ok = [e for s, e, st in done if st == 200 and window[0] <= e <= window[1]]
        latencies = [e - s for s, e, st in done if st == 200]
        with make_engine(DATABASE_URL, schema).connect() as conn:
            import sqlalchemy as sa

            stored = conn.execute(sa.text("SELECT count(*) FROM decisions")).scalar_one()
        return {
            "k": k,
            "rate": len(ok) / (window[1] - window[0]),
            "answered": sum(1 for *_, st in done if st == 200),
            "refused": sum(1 for *_, st in done if st == 429),
            "failed": sum(1 for *_, st in done if st not in (200, 429)),
            "stored": stored,
            "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "load": f"{before} → {load()}",
            "cpu": busy / total if total else float("nan"),
        }
    finally:
        for proc in procs:
            stop(proc)
        drop_schema(DATABASE_URL, schema)


def run(embedder: str, args, folder: Path, arms: Arms) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = {k: [] for k in args.instances}
    for repeat in range(args.repeats):
        for k in args.instances:
            r = one_run(k, embedder, arms, args, folder)
            runs[k].append(r)
            print(
                f"{embedder} repeat {repeat + 1}, {k} instance(s): {r['rate']:.1f} decisions/s, "
                f"{r['answered']} answered, {r['refused']} 429, {r['failed']} failed, "
                f"{r['stored']} stored, p50 {r['p50']:.0f} ms, CPU busy {r['cpu']:.0%}, "
                f"load {r['load']}",
                flush=True,
            )
    return runs


def report(results: dict[str, dict[int, list[dict]]], args) -> str:
    lines = [
        "| embedder | instances | decisions/s (median) | runs | × 1 instance | target "
        "| request p50 | machine's CPU busy | 429s | load average (before → after, per run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for embedder, runs in results.items():
        base = statistics.median(r["rate"] for r in runs[min(runs)])
        for k, rs in runs.items():
            rate = statistics.median(r["rate"] for r in rs)
            goal = TARGETS.get(k)
            target = f"≥ {goal}×: {'met' if rate / base >= goal else 'missed'}" if goal else "–"
            lines.append(
                f"| {embedder} | {k} | {rate:.1f} | "
                + ", ".join(f"{r['rate']:.1f}" for r in rs)
                + f" | {rate / base:.2f}× | {target} | "
                + f"{statistics.median(r['p50'] for r in rs):.0f} ms | "
                + f"{statistics.median(r['cpu'] for r in rs):.0%} | "
                + f"{sum(r['refused'] for r in rs)} | "
                + "; ".join(r["load"] for r in rs)
                + " |"
            )
    ceiling = args.in_flight / ARM_DELAY_S
    return "\n".join(lines) + (
        f"\n\nSettings: arms answer after {ARM_DELAY_S * 1000:.0f} ms; per instance "
        f"`METALLM_HTTP_MAX_IN_FLIGHT={args.in_flight}`, each arm's `max_in_flight: "
        f"{args.in_flight}`, {args.in_flight} closed-loop clients; one instance's ceiling "
        f"{ceiling:.0f} decisions/s (in flight / 200 ms). {args.seconds:g} s a run, the first "
        f"{args.warm_up:g} s not counted; medians of {args.repeats}, configurations interleaved."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--embedders", nargs="+", choices=["hash", "minilm"], default=["hash", "minilm"]
    )
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--in-flight", type=int, default=8, help="per instance; default 8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warm-up", type=float, default=3.0)
    parser.add_argument("--no-write", action="store_true", help="do not write the results")
    parser.add_argument("--arms", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arms:
        serve_arms()
        return
    folder = Path(tempfile.mkdtemp(prefix="metallm-http-scale-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arm_proc, url = child([__file__, "--arms"], env, "URL", folder / "arms.log")
    try:
        results = {e: run(e, args, folder, Arms(url)) for e in args.embedders}
    finally:
        stop(arm_proc)
    text = report(results, args)
    print(text)
    if not args.no_write:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = " ".join(sys.argv[1:])
        RESULTS.write_text(
            f"# HTTP door: decisions/s with 1, 2 and 3 instances\n\n{when}, {os.cpu_count()} "
            f"cores; `benchmarks/http_scale.py {command}`.\n\n{text}\n"
        )
        print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
