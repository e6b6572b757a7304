"""Security of the edges: Kafka SASL/SSL settings reach every client, hostile values are only
ever bound parameters (they round-trip through every write path unchanged), and secrets in
settings never reach an error message or a log line.
(The least-privilege database role is tested in ``tests/test_deploy.py``.)"""

from __future__ import annotations

import itertools
import logging

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import consumers.kafka_io as kafka_io
from consumers.failures import describe
from service.config import parse_config
from service.events import LabelEvent, QueryEvent
from service.llm.base import CallRequest, Completion, LLMError
from service.llm.gateway import Gateway
from service.log import read_models
from service.pipeline import Decider, Learner, QueryRecord, RewardSettings
from service.reward import labels_match
from service.settings import Settings
from service.storage import make_engine
from tests.faults.harness import HashEmbedder, scalar
from tests.helpers import open_learning_log

SECRET = "pa55-w0rd-that-must-not-leak"


def sasl_settings() -> Settings:
    return Settings(
        kafka_bootstrap="broker-a:9093,broker-b:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="metallm",
        kafka_sasl_password=SECRET,
    )


def test_sasl_ssl_settings_reach_every_kafka_client(monkeypatch):
    seen: dict[str, dict] = {}

    def capture(kind):
        def make(*args, **kwargs):
            seen[kind] = kwargs
            raise RuntimeError("captured")  # no network: only the options matter here

        return make

    monkeypatch.setattr(kafka_io, "SteadyConsumer", capture("consumer"))
    monkeypatch.setattr(kafka_io, "KafkaProducer", capture("producer"))
    monkeypatch.setattr(kafka_io, "KafkaAdminClient", capture("admin"))
    settings = sasl_settings()
    for make in (
        lambda: kafka_io.make_consumer(settings, "t", "g"),
        lambda: kafka_io.make_producer(settings),
        lambda: kafka_io.ensure_topics(settings, ["t"]),
    ):
        with pytest.raises(RuntimeError, match="captured"):
            make()
    for kind in ("consumer", "producer", "admin"):
        options = seen[kind]
        assert options["bootstrap_servers"] == ["broker-a:9093", "broker-b:9093"], kind
        assert options["security_protocol"] == "SASL_SSL", kind
        assert options["sasl_mechanism"] == "SCRAM-SHA-512", kind
        assert options["sasl_plain_username"] == "metallm", kind
        assert options["sasl_plain_password"] == SECRET, kind


def test_sasl_settings_come_from_the_environment(monkeypatch, tmp_path):
    cafile = tmp_path / "private-ca.pem"  # a TLS file setting must name a file that exists
    cafile.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("METALLM_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("METALLM_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("METALLM_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("METALLM_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("METALLM_KAFKA_SSL_CAFILE", str(cafile))
    settings = Settings(_env_file=None)
    options = kafka_io.client_options(settings)
    assert (options["security_protocol"], options["sasl_plain_password"]) == ("SSL", SECRET)
    assert options["ssl_cafile"] == str(cafile)
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


# Values a query, a label or an arm's answer may carry that would break SQL built from text:
# quotes, backslashes, placeholders, comment and statement separators, casts, and any
# unicode Postgres stores (everything but NUL and unpaired surrogates).
SQL_FRAGMENTS = st.sampled_from(
    [
        "'",
        "''",
        '"',
        "\\",
        "\\'",
        "%s",
        "%(x)s",
        "$1",
        ":name",
        "?",
        ";",
        "--",
        "/*",
        "*/",
        "'; DROP TABLE decisions; --",
        "' OR '1'='1",
        "E'\\x41'",
        "::jsonb",
        "$$",
        "\\u0000",
        "{}",
        "{0}",
    ]
)
UNICODE = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
hostile = st.lists(SQL_FRAGMENTS | UNICODE, min_size=1, max_size=6).map("".join)
# numbers JSONB gives back as they were sent (it prints a whole float of 17 digits as an int)
numbers = st.integers() | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | hostile,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile, inner, max_size=3),
    max_leaves=8,
)
options = st.lists(hostile.filter(str.strip), min_size=2, max_size=4, unique=True)


#: An arm whose circuit never opens: every example's error is its own.
ARM = {"name": "a", "provider": "replay", "model": "a", "outcomes": "-", "breaker_failures": 10**9}


class Answers:
    """An arm whose answer (or error message) is whatever the example gives it."""

    def __init__(self) -> None:
        self.output = ""
        self.error: str | None = None

    async def complete(self, request: CallRequest) -> Completion:
        if self.error is not None:
            raise LLMError(self.error)
        return Completion(self.output, 10, 2)

    def close(self) -> None:
        pass


@pytest.mark.integration
def test_hostile_values_round_trip_through_every_write_path(engine) -> None:
    """Hostile text in every value that reaches Postgres (query ids, texts, options, metadata,
    labels kept before their query, applied to its decision or rejected (outside its label set),
    an arm's answer or error)
    is stored and read back unchanged, and no statement fails: every value is bound."""
    config = parse_config(
        {
            "tasks": {"t": {"kind": "classification", "labels": ["yes", "no"]}},
            "arms": [ARM],
        }
    )
    arm = Answers()
    learning_log = open_learning_log(engine, "linucb", {"seed": 0}, checkpoint_every=10_000)
    rewards = RewardSettings(lam=0.1, cost_unit=0.001)
    learner = Learner(learning_log, rewards, pending_ttl_seconds=3600)
    decider = Decider(config, learning_log, HashEmbedder(), Gateway(config, {"a": arm}), rewards)
    examples = itertools.count()

    @settings(max_examples=60, deadline=None, database=None)
    @given(
        query_id=hostile,
        text=hostile,
        choices=st.none() | options,
        metadata=st.none() | st.dictionaries(hostile, json_values, max_size=4),
        label=hostile.filter(lambda t: len(t) <= 1024),
        pick=st.none() | st.integers(0, 3),  # the label: one of the label set, else ``label``
        output=hostile,
        error=st.none() | hostile,
        label_first=st.booleans(),
    )
    def example(query_id, text, choices, metadata, label, pick, output, error, label_first):
        query_id = f"{next(examples)}:{query_id}"[:128]  # each example a query of its own
        allowed = choices or ["yes", "no"]
        label = label if pick is None else allowed[pick % len(allowed)]
        in_set = any(labels_match(o, label) for o in allowed)
        arm.output, arm.error = output, error
        if label_first:  # kept until its query is decided, then applied with it
            assert learner.learn([LabelEvent(query_id=query_id, label=label)]).pending == 1
        event = QueryEvent(
            query_id=query_id, text=text, task="t", options=choices, metadata=metadata
        )
        assert [d.query_id for d in decider.decide([QueryRecord(event)]).new] == [query_id]
        if not label_first:
            learner.learn([LabelEvent(query_id=query_id, label=label)])
        with engine.connect() as conn:
            row = read_models.decision_details(conn, query_id)
        assert row is not None
        assert (row.query_id, row.text, row.options) == (
            query_id,
            text,
            choices or ["yes", "no"],
        )
        assert row.metadata == metadata
        assert row.label == (label if in_set else None)
        if label_first and not in_set:  # recorded as rejected when its decision arrived
            rejected = scalar(
                engine, "SELECT label FROM rejected_labels WHERE query_id = :q", q=query_id
            )
            assert rejected == label
        if error is None:
            assert (row.raw_output, row.error) == (output, None)
        else:
            assert (row.status, row.raw_output, row.error) == ("llm_error", None, error)

    try:
        example()
    finally:
        decider.close()


@pytest.mark.parametrize("schema", ['x"; DROP TABLE decisions; --', "a b", "a-b", 'a"b', "a;b"])
def test_schema_names_are_validated_before_use(schema):
    with pytest.raises(ValueError, match="schema name"):
        make_engine("postgresql://postgres@127.0.0.1:5432/test", schema)


def test_database_password_never_in_errors_or_logs(caplog):
    """A failing connection's error (what the consumers log and the DLQ would carry) names the
    server, never the password in DATABASE_URL."""
    from producers.local_broker import free_port

    engine = make_engine(f"postgresql://metallm:{SECRET}@127.0.0.1:{free_port()}/x")
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(sa.exc.OperationalError) as failure,
        engine.connect(),
    ):
        pass
    assert "Connection refused" in describe(failure.value) or "connect" in describe(failure.value)
    for text in (describe(failure.value), str(failure.value), repr(engine), caplog.text):
        assert SECRET not in text
    engine.dispose()
