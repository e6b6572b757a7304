"""What a running service says about itself: a start block, progress lines, the known noise.

The start block names everything an operator would otherwise have to guess: the config file,
its tasks and arms, the database (password hidden), the topics and groups, the instance, the
policy and its context layout, and where the metrics are. Progress lines follow at a steady
cadence (``METALLM_PROGRESS_SECONDS``) with what the last interval did.

    >>> before = Counts(decided=10, failed_calls=1, labels=8, dead_lettered=0, retries=0,
    ...                 rewards=8)
    >>> after = Counts(decided=70, failed_calls=3, labels=50, dead_lettered=1, retries=0,
    ...                rewards=50)
    >>> print(progress_line(before, after, 30.0, since_start=after))
    last 30 s: 60 decided (2 failed calls), 42 labels read, 1 dead-lettered, 0 batch retries; \
since start: 70 decided, 50 labels, 50 rewards learned
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

from prometheus_client import Counter

from service import metrics
from service.config import AppConfig
from service.settings import Settings, shown_url

log = logging.getLogger("metallm")


@dataclass(frozen=True)
class Counts:
    """What this process has done so far (from its Prometheus counters)."""

    decided: int = 0
    failed_calls: int = 0  # decisions whose call (and fallback) failed
    labels: int = 0  # label events read
    dead_lettered: int = 0
    retries: int = 0  # batches retried after Postgres or the broker failed
    rewards: int = 0  # rewards the policy learned (this instance's and the others')

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def _total(counter: Counter, where: Callable[[dict[str, str]], bool] = lambda _: True) -> int:
    """The sum of a counter's ``_total`` samples whose labels pass ``where``."""
    return int(
        sum(
            s.value
            for metric in counter.collect()
            for s in metric.samples
            if s.name.endswith("_total") and where(s.labels)
        )
    )


def current_counts(labels_read: Callable[[], int], rewards: Callable[[], int]) -> Counts:
    """This process's counts now: decisions, DLQ and retries from its counters, the labels
    read and the rewards learned from the callables given."""
    return Counts(
        decided=_total(metrics.DECISIONS),
        failed_calls=_total(metrics.DECISIONS, lambda labels: labels.get("status") != "ok"),
        labels=labels_read(),
        dead_lettered=_total(metrics.DLQ),
        retries=_total(metrics.BATCH_FAILURES),
        rewards=rewards(),
    )


def progress_line(before: Counts, now: Counts, seconds: float, since_start: Counts) -> str:
    """One line: what the last ``seconds`` did, and the totals since the service started."""
    d = now - before
    return (
        f"last {seconds:g} s: {d.decided} decided ({d.failed_calls} failed calls), "
        f"{d.labels} labels read, {d.dead_lettered} dead-lettered, {d.retries} batch retries; "
        f"since start: {since_start.decided} decided, {since_start.labels} labels, "
        f"{since_start.rewards} rewards learned"
    )


class ProgressLogger:
    """Logs :func:`progress_line` every ``every_s`` seconds in a daemon thread, until stopped
    (``every_s`` 0: never)."""

    def __init__(self, counts: Callable[[], Counts], every_s: float) -> None:
        self.counts = counts
        self.every_s = every_s
        self.start_counts = counts()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metallm-progress")

    def start(self) -> ProgressLogger:
        if self.every_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        before = self.start_counts
        while not self._stop.wait(self.every_s):
            try:
                now = self.counts()
                log.info(progress_line(before, now, self.every_s, now - self.start_counts))
                before = now
            except Exception:  # a report must never stop the service
                log.warning("progress report failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def start_block(
    settings: Settings,
    config: AppConfig,
    *,
    policy: str,
    context: str,
    metrics_port: int | None,
    door: str | None = None,
) -> str:
    """The lines ``serve`` logs once it runs: what it reads, calls, stores and serves.
    ``policy`` describes the restored policy, ``context`` its layout; ``metrics_port`` is the
    bound port (None: metrics off); ``door`` the HTTP door's base URL (None: no door)."""
    s = settings
    arms = ", ".join(f"{a.name} ({a.provider} {a.model})" for a in config.arms)
    database = shown_url(s.database_url)
    if s.database_schema:
        database += f", schema {s.database_schema}"
    if metrics_port is None:
        served = "off (METALLM_METRICS_PORT=off: no /metrics, /healthz or /readyz)"
    else:
        served = f"http://127.0.0.1:{metrics_port}/metrics, /healthz, /readyz (all interfaces)"
    progress = f"every {s.progress_seconds:g} s" if s.progress_seconds > 0 else "off"
    kafka: tuple[tuple[str, str], ...] = (
        (
            "broker",
            s.kafka_bootstrap
            + (
                ""
                if s.kafka_security_protocol == "PLAINTEXT"
                else f" ({s.kafka_security_protocol})"
            ),
        ),
        (
            "reads",
            f"{s.queries_topic} (group {s.queries_group}) and {s.labels_topic} (group "
            f"{s.labels_group}), {s.topic_partitions} partitions each",
        ),
        ("writes", f"{s.decisions_topic}, dead letters to {s.dlq_topic}"),
    )
    if not s.kafka_consumers:
        kafka = (("kafka", "off (METALLM_KAFKA_CONSUMERS=false: HTTP only)"),)
    rows: Iterable[tuple[str, str]] = (
        ("config", f"{s.config.resolve()}"),
        ("tasks", ", ".join(config.tasks)),
        ("arms", arms),
        ("database", database),
        *kafka,
        ("instance", s.instance_id),
        ("policy", policy),
        ("context", context),
        ("door", door or "off (METALLM_HTTP_PORT unset)"),
        ("metrics", served),
        ("progress", progress),
    )
    width = max(len(name) for name, _ in rows)
    return "serving:\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


#: Library log records that say nothing an operator can act on, by logger and message start:
#: kafka-python warns when a consumer subscribes again to its topics (the consumers do, to
#: add their rebalance listener), and logs an error for the metadata refresh a closing client
#: cancels on its way out; llama.cpp warns that a model with a sliding attention window gets
#: a full-size cache (a note on memory, which a 2,048-token context keeps small).
KNOWN_NOISE = {
    "kafka.consumer.subscription_state": ("subscription unchanged by change_subscription",),
    "kafka.cluster": ("Metadata refresh: failed Cancelled",),
    "llama_cpp": ("llama_kv_cache_iswa: using full-size SWA cache",),
}
#: llama.cpp's log levels (ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT)
_GGML_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_llama_log_callback = None  # the ctypes callback, kept alive while llama.cpp may call it


def silence_known_noise(config: AppConfig | None = None) -> None:
    """Filter :data:`KNOWN_NOISE` from the loggers that emit it (once per process). With a
    ``config`` that has llama.cpp arms, llama.cpp's own log goes through the ``llama_cpp``
    logger too (warnings and errors only): llama-cpp-python prints it to stderr, at levels
    its table of an older llama.cpp misreads (a warning shows as an error)."""
    for name, starts in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*starts))
    if config is not None and any(arm.provider == "llamacpp" for arm in config.arms):
        _route_llama_cpp_log()


def _route_llama_cpp_log() -> None:
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    try:
        import ctypes

        import llama_cpp
        import llama_cpp._logger  # noqa: F401 - installs its callback on import: ours replaces it
    except ImportError:  # the arm's build tells which extra is missing
        return
    logger = logging.getLogger("llama_cpp")
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level != 5:  # 5: the continuation of the previous message
            last[0] = _GGML_LEVELS.get(level, logging.DEBUG)
        message = text.decode("utf-8", errors="replace").strip()
        if message and last[0] >= logging.WARNING:
            logger.log(last[0], message)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _llama_log_callback = callback


@contextlib.contextmanager
def waiting_for(what: str, every_s: float = 5.0) -> Iterator[None]:
    """Run the block, logging every ``every_s`` seconds it lasts that the stop is still
    waiting for ``what`` (a stop that says nothing for 30 s looks stuck)."""
    done = threading.Event()
    started = time.monotonic()

    def tell() -> None:
        while not done.wait(every_s):
            log.info("stopping: waiting for %s (%.0f s)", what, time.monotonic() - started)

    teller = threading.Thread(target=tell, daemon=True, name="metallm-stop-teller")
    teller.start()
    try:
        yield
    finally:
        done.set()
        teller.join()
