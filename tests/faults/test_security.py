"""Security of the edges: Kafka SASL/SSL settings reach every client, SQL is only ever bound
parameters, and secrets in settings never reach an error message or a log line.
(The least-privilege database role is tested in ``tests/test_deploy.py``.)"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

import consumers.kafka_io as kafka_io
from consumers.batch import describe
from service.settings import Settings
from service.storage import make_engine

REPO = Path(__file__).resolve().parents[2]
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

    monkeypatch.setattr(kafka_io, "KafkaConsumer", capture("consumer"))
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


def test_sasl_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("METALLM_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("METALLM_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("METALLM_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("METALLM_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("METALLM_KAFKA_SSL_CAFILE", "/etc/ssl/private-ca.pem")
    settings = Settings(_env_file=None)
    options = kafka_io.client_options(settings)
    assert (options["security_protocol"], options["sasl_plain_password"]) == ("SSL", SECRET)
    assert options["ssl_cafile"] == "/etc/ssl/private-ca.pem"
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


def _text_calls(path: Path):
    """Every ``text(...)`` / ``exec_driver_sql(...)`` call whose SQL is not a plain literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        if name in {"text", "exec_driver_sql"} and not (
            isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        ):
            yield f"{path.relative_to(REPO)}:{node.lineno}"


def test_sql_is_never_built_from_values():
    """SQL is literal text with bound parameters. The two exceptions create and drop the
    schema named in settings (identifiers cannot be bound), after make_engine has validated
    that name."""
    allowed = {"migrations/env.py:19", "service/migrate.py:40"}
    found = {
        where
        for folder in ("service", "consumers", "migrations", "producers")
        for path in sorted((REPO / folder).rglob("*.py"))
        for where in _text_calls(path)
    }
    assert found <= allowed, sorted(found - allowed)
    assert 'CREATE SCHEMA IF NOT EXISTS "{schema}"' in (REPO / "migrations/env.py").read_text()
    assert "make_engine(database_url, schema)" in (REPO / "service/migrate.py").read_text()


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
