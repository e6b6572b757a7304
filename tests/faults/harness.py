"""What the fault-injection tests (and ``benchmarks/faults_report.py``) run the service against.

- :class:`ArmServer`: an OpenAI-compatible HTTP endpoint (``/<arm>/v1/chat/completions``) in
  this process. It answers deterministically from the query id written into each query's text
  (``[q-00042] …``), can be switched per arm to slow, garbage, HTTP 500 or killed, and records
  every call *at the arm* — so a process that is killed cannot hide a call it made.
- :class:`HashEmbedder`: deterministic feature hashing standing in for MiniLM. These tests
  are about durability, not routing quality; MiniLM costs ~15 s to load and ~20 ms a query on
  a 2-core CI box, which a dozen restarts would pay again and again.
- :class:`ServiceProcess`: ``metallm serve`` as a subprocess (``tests/faults/serve.py``: the
  real CLI with the embedder swapped), to kill -9 and SIGTERM.
- :class:`PrivatePostgres`: a throw-away Postgres server on its own port, to restart without
  disturbing anybody else's connections.
- policy helpers: rebuild the policy an uninterrupted run would have from the stored rewards,
  and compare two policies' statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
QUERY_ID_IN_TEXT = re.compile(r"\[(q-[A-Za-z0-9_-]+)\]")

TASKS = {
    "sentiment": {"kind": "classification", "labels": ["positive", "negative"]},
    "yes_no": {"kind": "classification", "labels": ["yes", "no"]},
}
POLICY = "correctness_ucb"  # the service's default: learns correctness, prices its choices
POLICY_PARAMS = {"alpha": 1.0, "epsilon": 0.1, "seed": 0}
#: Set to a path, a clean stop of ``tests/faults/serve.py`` writes the instance's policy there.
POLICY_DUMP = "METALLM_TEST_POLICY_DUMP"


# --------------------------------------------------------------------------- embeddings
class HashEmbedder:
    """Signed feature hashing of lower-cased words into ``dim`` floats, L2-normalised."""

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.name = f"hash-{dim}"
        self._cache: dict[str, tuple[int, float]] = {}

    @classmethod
    def from_settings(cls, _settings: object) -> HashEmbedder:
        """In place of :meth:`Embedder.from_settings` (tests/faults/serve.py swaps the class)."""
        return cls()

    def _feature(self, word: str) -> tuple[int, float]:
        hit = self._cache.get(word)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 32) & 1 else -1.0)
            if len(self._cache) < 100_000:
                self._cache[word] = hit
        return hit

    def embed(self, texts: Iterable[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                j, sign = self._feature(word)
                out[i, j] += sign
            out[i, 0] += 0.5  # a bias feature, so no context is all zeros
            out[i] /= np.linalg.norm(out[i])
        return out


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    task: str
    label: str
    wrong: str

    def event(self) -> bytes:
        body = {"query_id": self.query_id, "text": self.text, "task": self.task}
        return json.dumps(body).encode()

    def label_event(self, label: str | None = None) -> bytes:
        return json.dumps({"query_id": self.query_id, "label": label or self.label}).encode()


def make_queries(n: int, prefix: str = "q", seed: int = 0) -> list[Query]:
    """``n`` labeled queries built from the demo data (real texts), each carrying its id."""
    import random

    rows = [
        json.loads(line)
        for line in (REPO / "producers" / "data" / "demo_queries.jsonl").read_text().splitlines()
    ]
    rows = [r for r in rows if r["task"] in TASKS]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        labels = TASKS[row["task"]]["labels"]
        wrong = rng.choice([x for x in labels if x != row["label"]])
        qid = f"{prefix}-{i:05d}"
        out.append(Query(qid, f"[{qid}] {row['text']}", row["task"], row["label"], wrong))
    return out


# --------------------------------------------------------------------------- the arms
@dataclass(frozen=True)
class Call:
    epoch: int
    arm: str
    query_id: str | None
    at: float  # time.monotonic() when the arm took the request
    caller: str | None = None  # the ``caller`` of :meth:`ArmServer.base_url`, if any
    wall: float = 0.0  # time.time() then: to compare with times the service records
    max_tokens: int | None = None  # the request's output limit
    temperature: float | None = None


def _unit(*parts: str) -> float:
    digest = hashlib.blake2b(":".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class ArmServer:
    """OpenAI chat completions for arms at ``{url}/{arm}/v1``.

    ``modes[arm]``: ``ok`` (answer; right with probability ``accuracy[arm]``, decided by a hash
    of arm and query id; the answer is the query's ``label`` or ``wrong``, free text for an
    open task's query), ``slow`` (answer after ``delay[arm]`` seconds), ``garbage`` (HTTP 200
    whose body is not JSON), ``nonsense`` (a well-formed reply whose answer is no label),
    ``error`` (HTTP 500), ``too_long`` (HTTP 400: the prompt exceeds the context length).
    ``delay_ids[query_id]`` delays one query's answer by so many seconds, whatever its arm's
    mode; ``answered_at`` holds when each query's last answer was written (``time.time()``). A
    caller given a base URL of its own (``base_url(arm, caller)``) has its calls recorded with
    its name. :meth:`kill` closes the listening socket and every
    open connection, as a crashed server would; :meth:`start` brings it back on the same port.
    A request with ``stream: true`` is answered in SSE chunks (see :meth:`_stream`);
    ``answers[query_id]`` sets a query's answer text. While ``answering`` is cleared, every
    call is held (recorded, in flight, unanswered) until it is set again.
    """

    def __init__(
        self,
        truth: dict[str, Query],
        accuracy: dict[str, float],
        parse_errors: float = 0.0,
        port: int = 0,
    ) -> None:
        self.truth = truth
        self.accuracy = accuracy
        self.parse_errors = parse_errors
        self.modes: dict[str, str] = {arm: "ok" for arm in accuracy}
        self.delay: dict[str, float] = {arm: 0.0 for arm in accuracy}
        self.fail_ids: set[str] = set()  # queries every arm answers with HTTP 500
        self.delay_ids: dict[str, float] = {}  # queries answered after so many seconds
        self.answered_at: dict[str, float] = {}  # time.time() of each query's last answer
        self.stream_delay = 0.0  # seconds between the chunks of a streamed answer
        self.break_ids: set[str] = set()  # streamed answers that fail after their 2nd chunk
        self.streamed: dict[str, list[str]] = {}  # each streamed query's pieces sent
        self.chunk_sent_at: dict[str, list[float]] = {}  # time.time() each piece was written
        self.answers: dict[str, str] = {}  # the answer of a query, whatever else would be
        self.answering = threading.Event()
        self.answering.set()
        self.epoch = 0
        self.calls: list[Call] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = port
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> ArmServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # the reply's headers and body are two writes: without this, Nagle holds the
                # body until the client's delayed ACK of the headers (~40 ms on Linux)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.in_flight += 1
                try:
                    server._serve(self)
                except OSError:
                    self.close_connection = True
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # a batch opens dozens of connections at once
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                """A connection the client dropped (a killed service resets its keep-alive
                connections) is expected here: a debug line, not a traceback on stderr."""
                failure = sys.exc_info()[1]
                if isinstance(failure, ConnectionError):
                    log.debug("arm server: %s dropped its connection: %s", client_address, failure)
                    return
                super().handle_error(request, client_address)

        httpd = Server(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return self

    def kill(self) -> None:
        """Stop answering at once: refuse new connections and cut the open ones. Calls held
        (``answering`` cleared) end with their connections instead of waiting on; ``answering``
        stays set after a restart."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.answering.set()  # their replies fail on the cut connections (OSError, handled)

    stop = kill

    def __enter__(self) -> ArmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def base_url(self, arm: str, caller: str | None = None) -> str:
        """The arm's endpoint; with ``caller``, one whose calls are recorded as that caller's
        (several service processes on one arm server, each told apart)."""
        return f"{self.url}/{arm}/v1" if caller is None else f"{self.url}/from-{caller}/{arm}/v1"

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- answering ------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        parts = h.path.strip("/").split("/")
        caller = parts.pop(0)[len("from-") :] if parts[0].startswith("from-") else None
        arm = parts[0]
        prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
        found = QUERY_ID_IN_TEXT.search(prompt)
        qid = found.group(1) if found else None
        with self._lock:
            self.calls.append(
                Call(
                    self.epoch,
                    arm,
                    qid,
                    time.monotonic(),
                    caller,
                    time.time(),
                    body.get("max_tokens"),
                    body.get("temperature"),
                )
            )
        self.answering.wait()
        mode = self.modes.get(arm, "ok")
        if qid in self.delay_ids:
            time.sleep(self.delay_ids[qid])
        elif mode == "slow":
            time.sleep(self.delay[arm])
        if mode == "error" or qid in self.fail_ids:
            self._reply(h, 500, {"error": {"message": "internal error", "type": "server_error"}})
            return
        if mode == "too_long":
            message = "This model's maximum context length is 2048 tokens"
            error = {"message": message, "code": "context_length_exceeded"}
            self._reply(h, 400, {"error": {**error, "type": "invalid_request_error"}})
            return
        if mode == "garbage":
            self._reply(h, 200, b"<html>\x00\xff garbage, not JSON")
            return
        query = self.truth.get(qid) if qid else None
        if mode == "nonsense" or query is None:
            answer = "I cannot say."
        elif _unit("parse", arm, qid) < self.parse_errors:
            answer = "maybe"
        else:
            answer = query.label if _unit(arm, qid) < self.accuracy.get(arm, 0.5) else query.wrong
        answer = self.answers.get(qid or "", answer)
        tokens_in = max(1, len(prompt) // 4)
        if body.get("stream"):
            self._stream(h, qid, answer, tokens_in, body)
            self._answered(qid)
            return
        self._reply(
            h,
            200,
            {
                "id": f"cmpl-{qid}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", arm),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": tokens_in,
                    "completion_tokens": 1,
                    "total_tokens": tokens_in + 1,
                },
            },
        )
        self._answered(qid)

    def _answered(self, qid: str | None) -> None:
        if qid is not None:
            with self._lock:
                self.answered_at[qid] = time.time()

    def _stream(
        self, h: BaseHTTPRequestHandler, qid: str | None, answer: str, tokens_in: int, body: dict
    ) -> None:
        """A streamed reply (SSE, as OpenAI's): a chunk per word of the answer, ``stream_delay``
        seconds apart, then the end and the usage; a query in ``break_ids`` gets an error event
        after its second chunk instead."""
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("connection", "close")  # the body ends when the connection does
        h.end_headers()
        h.close_connection = True
        key = qid or ""
        base = {"id": f"cmpl-{qid}", "object": "chat.completion.chunk", "created": 0}
        base["model"] = body.get("model", "")

        def send(data: object) -> None:
            h.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            h.wfile.flush()

        pieces = re.findall(r"\S+\s*", answer) or [answer]
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(self.stream_delay)
            if i == 2 and key in self.break_ids:
                send({"error": {"message": "the model crashed", "type": "server_error"}})
                return
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            send({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            with self._lock:
                self.streamed.setdefault(key, []).append(piece)
                self.chunk_sent_at.setdefault(key, []).append(time.time())
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": tokens_in, "completion_tokens": len(pieces)}
        send({**base, "choices": [], "usage": {**usage, "total_tokens": tokens_in + len(pieces)}})
        h.wfile.write(b"data: [DONE]\n\n")

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    # -- what reached the arms ------------------------------------------------------------
    def calls_by_query(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in list(self.calls):
            if c.query_id:
                out[c.query_id] = out.get(c.query_id, 0) + 1
        return out


def arm_config(
    server: ArmServer,
    arms: dict[str, tuple[float, float]],
    *,
    fallback: dict[str, str] | None = None,
    caller: str | None = None,
    **arm_overrides: Any,
) -> dict:
    """A config document: ``arms[name] = (input, output price per 1M tokens)``, each arm an
    ``openai`` arm on ``server`` (its calls recorded as ``caller``'s, if given)."""
    fallback = fallback or {}
    return {
        "tasks": TASKS,
        "arms": [
            {
                "name": name,
                "provider": "openai",
                "model": name,
                "base_url": server.base_url(name, caller),
                "input_price_per_1m": price_in,
                "output_price_per_1m": price_out,
                "timeout_seconds": 10.0,
                "max_retries": 0,
                **({"fallback": fallback[name]} if name in fallback else {}),
                **arm_overrides.get(name, {}),
            }
            for name, (price_in, price_out) in arms.items()
        ],
    }


# --------------------------------------------------------------------------- the service
def service_env(
    bootstrap: str,
    topics: dict[str, str],
    database_url: str,
    schema: str,
    config: Path,
    **settings: Any,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALLM_")}
    env.update(
        {
            "DATABASE_URL": database_url,
            "METALLM_DATABASE_SCHEMA": schema,
            "METALLM_KAFKA_BOOTSTRAP": bootstrap,
            "METALLM_CONFIG": str(config),
            "METALLM_SESSION_TIMEOUT_MS": "1500",
            "METALLM_HEARTBEAT_INTERVAL_MS": "400",
            "METALLM_METRICS_PORT": "0",
            "METALLM_POLICY": POLICY,
            "METALLM_POLICY_PARAMS": json.dumps(POLICY_PARAMS),
            "PYTHONPATH": str(REPO),
            **{f"METALLM_{k.upper()}": v for k, v in topics.items()},
            **{f"METALLM_{k.upper()}": str(v) for k, v in settings.items()},
        }
    )
    return env


def write_config(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


class ServiceProcess:
    """``metallm serve`` in a subprocess (see ``tests/faults/serve.py``)."""

    def __init__(self, env: dict[str, str], log_path: Path, standby: bool = False) -> None:
        self.env = env
        self.log_path = log_path
        self.standby = standby
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> ServiceProcess:
        """Spawn the process; a standby one serves only after :meth:`go`."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.serve", *["--standby"][: self.standby]],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.PIPE if self.standby else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        return self

    def go(self) -> ServiceProcess:
        """Let a standby process build the service and serve (it restores the policy now)."""
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write(b"go\n")
            self.process.stdin.close()
        except BrokenPipeError:  # it died while standing by: say why, not "broken pipe"
            code = self.process.wait(timeout=30)
            raise AssertionError(
                f"the standby service exited ({code}) before it was told to go; its log ends:\n"
                + self.log()[-3000:]
            ) from None
        self.started_at = time.monotonic()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def serving(self) -> bool:
        """Past start-up: its signal handlers are set and its consumers run (a SIGTERM before
        ``metallm serve`` set its handlers ends the process with the default action)."""
        return "app.application: serving:" in self.log()

    def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the service ignored SIGTERM for {timeout} s") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------- Postgres
class PrivatePostgres:
    """A Postgres server of our own (initdb in a temp dir, its own port), to stop and restart
    mid-stream without touching the shared server. Runs as ``postgres`` when we are root."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            raise RuntimeError("no Postgres server binaries under /usr/lib/postgresql")
        self.bin = versions[-1].parent
        from producers.local_broker import free_port

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="metallm-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PrivatePostgres:
        # Speed without giving up what the service relies on: a COMMIT that was acknowledged
        # survives a crash of the server (``stop("immediate")``). ``fsync=off`` and
        # ``full_page_writes=off`` only matter if the machine itself loses power: the WAL a
        # killed server wrote is still in the OS's page cache. ``synchronous_commit`` must stay
        # on: off, Postgres acknowledges a COMMIT before writing its WAL, and a crash drops the
        # last ~200 ms of acknowledged transactions — decisions and rewards whose Kafka offsets
        # the service then rightly committed, so nothing would ever bring them back.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
            "-c synchronous_commit=on -c full_page_writes=off -c shared_buffers=16MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-o",
            options,
            "-w",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- checks
def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


class StreamProducer:
    """Publishes ``queries`` in chunks of ``chunk`` on a thread of its own, chunk ``i`` once
    ``may_publish(i)``; with chunk ``i`` the labels of chunk ``i - 1``, 8 early labels of
    chunk ``i + 1`` (published before their query) and 3 repeats of labels of chunk
    ``i - 2``; the last chunk's labels at the end. Counts what it publishes on ``figures``
    (``labels_published``, ``early_labels``, ``duplicate_labels_published``). ``done`` is set
    once all is published; an error is kept in ``errors`` for the test's thread to raise."""

    def __init__(
        self,
        bootstrap: str,
        topics: dict[str, str],
        queries: list,
        chunk: int,
        seed: int,
        figures: Any,
        may_publish: Callable[[int], bool],
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.chunks = [queries[i : i + chunk] for i in range(0, len(queries), chunk)]
        self.rng = random.Random(seed)
        self.figures = figures
        self.may_publish = may_publish
        self.stop = threading.Event()
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self.run, name="fault-producer", daemon=True)

    def start(self) -> StreamProducer:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        chunks, f = self.chunks, self.figures
        queries_topic, labels_topic = self.topics["queries_topic"], self.topics["labels_topic"]
        labeled: set[str] = set()

        def label(q: Any, count_as: str = "") -> None:
            producer.send(labels_topic, key=q.query_id.encode(), value=q.label_event())
            f.labels_published += 1
            if count_as == "early":
                f.early_labels += 1
            elif count_as == "duplicate":
                f.duplicate_labels_published += 1

        try:
            for i, chunk in enumerate(chunks):
                while not self.stop.is_set() and not self.may_publish(i):
                    time.sleep(0.05)
                if self.stop.is_set():
                    return
                for q in chunk:
                    producer.send(queries_topic, key=q.query_id.encode(), value=q.event())
                if i >= 1:
                    for q in chunks[i - 1]:
                        if q.query_id not in labeled:
                            label(q)
                            labeled.add(q.query_id)
                if i + 1 < len(chunks):
                    for q in self.rng.sample(chunks[i + 1], 8):
                        label(q, "early")
                        labeled.add(q.query_id)
                if i >= 2:
                    for q in self.rng.sample(chunks[i - 2], 3):
                        label(q, "duplicate")
                producer.flush()
            for q in chunks[-1]:
                if q.query_id not in labeled:
                    label(q)
            producer.flush()
            self.done.set()
        except BaseException as exc:  # surfaced by the test's thread
            self.errors.append(exc)
        finally:
            producer.close()


def progress(engine: sa.Engine) -> tuple[int, int, int]:
    """(decisions, rewards applied, labels pending)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM decisions), "
                "(SELECT count(*) FROM decisions WHERE reward_seq IS NOT NULL), "
                "(SELECT count(*) FROM pending_labels)"
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


def fresh_policy(name: str = POLICY, params: dict | None = None):
    """A policy as a fresh service instance has it (shown the default context layout, which a
    policy that learns correctness shapes its prior by)."""
    from service.context import ContextBuilder, ContextLayout
    from service.policy import make_policy

    policy = make_policy(name, **(params or POLICY_PARAMS))
    if policy.learns_correctness:
        policy.context = ContextBuilder(ContextLayout())
    return policy


def teach(policy, reward) -> None:
    """Teach ``policy`` one reward of the log, as the service does: correctness and cost (with
    the decision's propensity and λ, at the default cost unit) to a policy that learns
    correctness, the scalar reward to any other."""
    if policy.learns_correctness:
        from service.policy import Pricing

        pricing = None if reward.lam is None else Pricing(reward.lam, 0.001)
        p = reward.propensity if pricing is not None else None
        policy.learn(reward.arm, reward.context, reward.correctness(), reward.cost_usd, p, pricing)
    else:
        policy.update(reward.arm, reward.context, reward.reward)


def rebuild_policy(engine: sa.Engine, name: str = POLICY, params: dict | None = None):
    """The policy of an uninterrupted run over the same decisions: a fresh policy, every
    stored reward applied once, in reward_seq order."""
    from service.log.transaction import rewards_after

    policy = fresh_policy(name, params)
    with engine.connect() as conn:
        for r in rewards_after(conn, 0):
            teach(policy, r)
    return policy


def restored_policy(engine: sa.Engine, name: str = POLICY, params: dict | None = None):
    """What a restarted service has: the newest checkpoint plus the rewards after it."""
    from tests.helpers import open_learning_log

    learning_log = open_learning_log(engine, name, params or POLICY_PARAMS, checkpoint_every=10**12)
    learning_log.restore()
    return learning_log


def policy_difference(a, b) -> float:
    """The largest absolute difference between two linear policies' per-arm statistics
    (A, A⁻¹, b, θ, counts, reward sums); arms one of them never updated count as the prior."""
    sa_, sb = a.stats, b.stats
    if sa_ is None or sb is None:
        return 0.0 if sa_ is sb else float("inf")
    arrays_a, arrays_b = sa_.arrays(), sb.arrays()
    worst = 0.0
    for arm in set(sa_.ids) | set(sb.ids):
        ia, ib = sa_.index.get(arm), sb.index.get(arm)
        if ia is None or ib is None:
            present, i = (sb, ib) if ia is None else (sa_, ia)
            if present.counts[i] != 0:
                return float("inf")
            continue
        for key in arrays_a:
            diff = np.max(np.abs(arrays_a[key][ia] - arrays_b[key][ib]))
            worst = max(worst, float(diff))
    return worst


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    message: str,
    interval: float = 0.1,
    alive: Callable[[], bool] | None = None,
    explain: Callable[[], str] | None = None,
) -> object:
    """Poll ``condition`` until it is true; on a timeout, the error says what ``explain``
    finds (say, :func:`missing_work`) so a failure can be diagnosed from its message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if alive is not None and not alive():
            raise AssertionError(f"the service exited while waiting for {message}")
        time.sleep(interval)
    detail = ""
    if explain is not None:
        try:
            detail = f"\n{explain()}"
        except Exception as exc:  # the database may be what is broken
            detail = f"\n(could not explain: {exc!r})"
    raise AssertionError(f"timed out after {timeout} s waiting for {message}{detail}")


def missing_work(engine: sa.Engine, query_ids: Iterable[str], limit: int = 10) -> str:
    """Which of ``query_ids`` have no decision, which decisions no reward, and which labels
    still wait in ``pending_labels`` (with the label consumer's stored progress)."""
    ids = list(query_ids)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT query_id, status, label, reward_seq, decision_seq, kafka_offset "
                "FROM decisions"
            )
        ).all()
        pending = conn.execute(
            sa.text("SELECT query_id, received_at, duplicates FROM pending_labels")
        ).all()
        offsets = conn.execute(
            sa.text("SELECT topic, partition, next_offset FROM label_offsets")
        ).all()
        seqs = conn.execute(sa.text("SELECT last_value, is_called FROM reward_seq")).one()
    decided = {r.query_id: r for r in rows}
    undecided = [q for q in ids if q not in decided]
    unrewarded = [decided[q] for q in ids if q in decided and decided[q].reward_seq is None]

    def head(items: list) -> str:
        return ", ".join(map(str, items[:limit])) + (" …" if len(items) > limit else "")

    return "\n".join(
        [
            f"{len(undecided)} queries without a decision: {head(undecided)}",
            f"{len(unrewarded)} decisions without a reward: "
            + head([(r.query_id, r.status, r.label) for r in unrewarded]),
            f"{len(pending)} labels pending: " + head([p.query_id for p in pending]),
            f"label_offsets: {[tuple(o) for o in offsets]}; reward_seq: {tuple(seqs)}",
        ]
    )


@dataclass
class Stopwatch:
    started: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return time.monotonic() - self.started


# --------------------------------------------------------------------------- a lossy link
class PgProxy:
    """A TCP proxy in front of Postgres that can cut a connection right after forwarding a
    ``COMMIT``, before the server's reply gets back: the server commits, the client sees its
    connection die and cannot know whether it did. Connect with ``sslmode=disable`` so the
    proxy can see the protocol. ``cut_at`` holds the COMMIT numbers to cut after."""

    def __init__(self, target_port: int = 5432, cut_at: Iterable[int] = ()) -> None:
        self.target = ("127.0.0.1", target_port)
        self.cut_at = set(cut_at)
        self.commits = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str = "test") -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
            "?sslmode=disable&gssencmode=disable"
        )

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            hold = threading.Event()
            threading.Thread(target=self._up, args=(client, server, hold), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, hold), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, hold: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                cut = False
                if b"COMMIT\x00" in data:
                    with self._lock:
                        self.commits += 1
                        cut = self.commits in self.cut_at
                    if cut:
                        hold.set()  # the reply to this COMMIT never reaches the client
                server.sendall(data)
                if cut:
                    time.sleep(0.3)  # the server commits
                    with self._lock:
                        self.cuts += 1
                    break
        except OSError:
            pass
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @staticmethod
    def _down(server: socket.socket, client: socket.socket, hold: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if hold.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass


# --------------------------------------------------------------------------- in process
def build_service(settings, config_document: dict):
    """The real :class:`~app.application.Application` in this process, with the hash embedder."""
    from app.application import Application
    from service.config import parse_config

    return Application.build(
        settings, config=parse_config(config_document), embedder=HashEmbedder()
    )


def publish(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]
) -> list[int]:
    """Send messages in order; returns where each landed, ``(partition, offset)``."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush()
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close()


def read_all(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every message of a topic, from the start to the high-water mark of each partition."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
            highwater = [consumer.highwater(tp) for tp in tps]
            if None not in highwater and all(
                consumer.position(tp) >= h for tp, h in zip(tps, highwater, strict=True)
            ):
                return out
        raise AssertionError(f"could not read {topic} to its end within {timeout} s")
    finally:
        consumer.close()


def decisions(engine: sa.Engine, where: str = "TRUE") -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT * FROM decisions WHERE {where} ORDER BY decided_at"))
        return [dict(r._mapping) for r in rows]


def wait_consumed(bootstrap: str, topics: dict[str, str], queries: int, labels: int) -> None:
    """Until both consumers have committed every event: the service is done, not just its data
    (a batch retried after a lost COMMIT reply republishes its decisions before committing)."""
    from tests.helpers import committed_offset

    wait_until(
        lambda: (
            committed_offset(bootstrap, topics["queries_topic"], topics["queries_group"]) == queries
            and committed_offset(bootstrap, topics["labels_topic"], topics["labels_group"])
            == labels
        ),
        60,
        "every event consumed",
        interval=0.5,
    )
