"""Prometheus metrics and the health endpoints, served on one HTTP port.

GET /metrics   Prometheus text format
GET /healthz   200 while the process runs
GET /readyz    200 while serving (not restoring, not stopping) with both consumers running and
               the broker and Postgres answering (service.health), else 503

>>> DECISIONS.labels(arm="small", status="ok").inc()
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

DECISIONS = Counter("metallm_decisions", "Decisions made", ["arm", "status"])
COST = Counter("metallm_cost_usd", "Money spent on LLM calls (USD)", ["arm"])
LLM_LATENCY = Histogram(
    "metallm_llm_latency_seconds",
    "LLM call latency",
    ["arm"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
REWARD = Histogram(
    "metallm_reward",
    "Rewards applied to the policy",
    ["arm"],
    buckets=(-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0),
)
LABEL_DELAY = Histogram(
    "metallm_label_delay_seconds",
    "Time from a decision to its label being applied",
    buckets=(1, 5, 30, 60, 300, 1800, 3600, 6 * 3600, 86400, 7 * 86400),
)
PENDING_LABELS = Gauge("metallm_pending_labels", "Labels waiting for their decision")
DLQ = Counter("metallm_dlq_events", "Events sent to the dead-letter topic", ["topic"])
CONSUMER_LAG = Gauge("metallm_consumer_lag", "Messages not yet consumed", ["topic", "partition"])
BATCH_FAILURES = Counter("metallm_batch_failures", "Batches retried after an error", ["consumer"])
# From Postgres, refreshed by the label consumer every LEARNING_REFRESH_S (the same values on
# every replica): a label can be applied by either consumer (an early one, by the query
# consumer), so only the database knows every outcome.
LABELED = Gauge("metallm_labeled_decisions", "Decisions that have their label, per arm", ["arm"])
CORRECT = Gauge(
    "metallm_correct_decisions", "Labeled decisions whose answer was right, per arm", ["arm"]
)
MEAN_REWARD = Gauge(
    "metallm_mean_reward",
    "Mean reward the policy learned per arm (metallm_reward has negative buckets: no _sum)",
    ["arm"],
)
POLICY_LAG = Gauge(
    "metallm_policy_lag_rewards",
    "Rewards committed to Postgres that this process's policy has not applied yet",
)
POLICY_UPDATES = Gauge("metallm_policy_updates", "Rewards this process's policy has learned from")
LEARNING_LAG = Histogram(
    "metallm_learning_lag_seconds",
    "Time from a reward's transaction to this process's policy applying it (any instance's)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHECKPOINT_WRITER = Gauge(
    "metallm_checkpoint_writer", "1 while this instance is the one that writes policy checkpoints"
)
CHECKPOINT_FAILURES = Counter(
    "metallm_checkpoint_failures",
    "Policy checkpoints that could not be stored (the rewards are in Postgres: a restart "
    "replays them from the previous checkpoint)",
)
CALLS_DISCARDED = Counter(
    "metallm_calls_discarded",
    "LLM calls whose decision this instance did not store: another instance stored the "
    "query's decision first, or a rebalance took the query's partition away",
    ["reason"],
)
for _reason in ("decided_elsewhere", "rebalance"):  # exported as 0 before the first discard
    CALLS_DISCARDED.labels(_reason)
QUERIES_AGAIN = Counter(
    "metallm_queries_again",
    "Query events whose id was decided before: the same query (its decision published "
    "again) or another query (rejected to the DLQ: the id is taken)",
    ["outcome"],
)
for _outcome in ("republished", "rejected"):
    QUERIES_AGAIN.labels(_outcome)
DEPENDENCY_UP = Gauge(
    "metallm_dependency_up",
    "1 while the dependency answers this instance's probes (each second), 0 while it does not",
    ["dependency"],
)
# no sample before the application has used a dependency (app.application sets each one its
# roles need: an HTTP-only instance exports no kafka)
LEARNING_REFRESH_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], bool] = staticmethod(lambda: True)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            self._send(200, b"ok\n")
        elif self.path == "/readyz":
            ok = self.ready()
            self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes every few seconds would drown the service's own logs


class MetricsPortUnavailable(RuntimeError):
    """The metrics port cannot be bound (another process has it); the message says what to do."""


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on ``host:port`` in a daemon thread."""

    def __init__(self, port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> None:
        handler = type("Handler", (_Handler,), {"ready": staticmethod(ready)})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise MetricsPortUnavailable(
                f"cannot serve metrics on port {port}: {exc.strerror}; set METALLM_METRICS_PORT "
                "to another port, 0 for any free one, or off for none (no /healthz, /readyz)"
            ) from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, daemon=True, name="metallm-metrics"
        )

    def serve_readiness(self, ready: Callable[[], bool]) -> None:
        """Answer /readyz with ``ready`` from now on."""
        self.server.RequestHandlerClass.ready = staticmethod(ready)  # type: ignore[attr-defined]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
