"""What a person sees when a command cannot do its work: one line naming what is wrong and
what to do, and a documented exit code, never a traceback. Each case through the real CLI,
against the real Postgres and broker (or a port where nothing listens)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from app.cli import main
from app.exits import EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE
from consumers.kafka_io import partition_counts
from producers.demo_data import TASKS
from producers.local_broker import free_port
from service.migrate import drop_schema, head_revision, upgrade
from service.storage import make_engine
from tests.conftest import DATABASE_URL
from tests.helpers import metallm_cli

pytestmark = pytest.mark.integration

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")
OUTCOMES = Path(__file__).parents[1] / "producers" / "data" / "demo_outcomes.jsonl"


def one_line_error(out, code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    # (serve's log lines aside: it logs what it is starting)
    lines = [line for line in out.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("metallm: "), out.stderr
    return lines[0]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A valid config: the demo's tasks, two replay arms."""
    path = tmp_path / "metallm.yaml"
    arms = [
        {"name": a, "provider": "replay", "model": a, "outcomes": str(OUTCOMES)}
        for a in ("gemma-3-270m", "qwen2.5-0.5b")
    ]
    path.write_text(yaml.safe_dump({"tasks": TASKS, "arms": arms}))
    return path


@pytest.fixture
def fresh_schema():
    """A schema name nobody migrated (dropped afterwards, in case a test migrates it)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(DATABASE_URL, schema)


def test_version_and_plain_help():
    out = metallm_cli("public", "--version")
    assert out.returncode == 0 and out.stdout.startswith("metallm 0.")
    helptext = metallm_cli("public", "--help").stdout
    assert "``" not in helptext and "metallm: a streaming LLM router" in helptext
    assert "exit codes:" in helptext and "3  the database or the Kafka broker" in helptext


@pytest.mark.parametrize("command", [["stats"], ["decisions"], ["migrate"], ["serve"]])
def test_database_unreachable_is_one_line_without_the_password(command, broker, config_file):
    port = free_port()
    url = f"postgresql://metallm:s3cret-pw@127.0.0.1:{port}/metallm"
    env = {"DATABASE_URL": url, "METALLM_CONFIG": str(config_file)}
    out = metallm_cli("public", *command, env={**env, "METALLM_KAFKA_BOOTSTRAP": broker})
    line = one_line_error(out, EXIT_UNREACHABLE)
    assert f"cannot use the database at postgresql://metallm:***@127.0.0.1:{port}/metallm" in line
    assert "Connection refused" in line
    assert "s3cret-pw" not in out.stderr + out.stdout


def in_process(monkeypatch, capsys, schema: str, *args: str) -> subprocess.CompletedProcess:
    """``metallm *args`` on the test database, in ``schema``, through the CLI's main in this
    process (a subprocess each costs seconds): its exit code and what it printed."""
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("METALLM_DATABASE_SCHEMA", schema)
    code = main(list(args))
    return subprocess.CompletedProcess(["metallm", *args], code, *capsys.readouterr())


def test_a_schema_never_migrated_says_to_migrate(fresh_schema, monkeypatch, capsys):
    cli = functools.partial(in_process, monkeypatch, capsys, fresh_schema)
    for command in (["stats"], ["decisions"], ["decisions", "--explain", "q1"]):
        line = one_line_error(cli(*command), EXIT_INPUT)
        assert line == "metallm: the database has no metallm schema yet: run `metallm migrate`"
    # a command that reads the tables without checking first still says so
    line = one_line_error(cli("evaluate", "--from-db"), EXIT_INPUT)
    assert "schema is missing" in line and "run `metallm migrate`" in line


def test_a_schema_behind_the_code_names_its_revision(fresh_schema, monkeypatch, capsys):
    cli = functools.partial(in_process, monkeypatch, capsys, fresh_schema)
    upgrade(DATABASE_URL, fresh_schema, "0003")
    head = head_revision()
    line = one_line_error(cli("stats"), EXIT_INPUT)
    assert line == (
        f"metallm: the database schema is at revision 0003, this metallm needs {head}: "
        "run `metallm migrate`"
    )
    assert cli("migrate").returncode == 0
    assert cli("stats").returncode == 0

    engine = make_engine(DATABASE_URL, fresh_schema)
    with engine.begin() as conn:  # as if a newer metallm had migrated it
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    line = one_line_error(cli("stats"), EXIT_INPUT)
    assert "revision 9999, which this metallm does not know" in line and "upgrade metallm" in line


@pytest.mark.parametrize("command", ["produce", "serve"])
def test_broker_unreachable_names_the_servers_within_the_timeout(
    command, pg_schema, config_file, tmp_path
):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"query_id": "q1", "text": "fine", "task": "sentiment"}) + "\n")
    bootstrap = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    args = ["produce", "queries", str(data), "--quiet"] if command == "produce" else ["serve"]
    started = time.monotonic()
    out = metallm_cli(
        pg_schema,
        *args,
        env={"METALLM_KAFKA_BOOTSTRAP": bootstrap, "METALLM_CONFIG": str(config_file)},
        timeout=60,
    )
    elapsed = time.monotonic() - started
    line = one_line_error(out, EXIT_UNREACHABLE)
    assert f"cannot reach the Kafka broker at {bootstrap} within 10 s" in line
    assert elapsed < 25, elapsed  # the stated 10 s, and the interpreter's start


def test_config_missing_or_invalid(pg_schema, tmp_path, config_file):
    missing = tmp_path / "nope.yaml"
    line = one_line_error(
        metallm_cli(pg_schema, "serve", env={"METALLM_CONFIG": str(missing)}), EXIT_INPUT
    )
    assert line == f"metallm: cannot read config {missing}: No such file or directory"

    bad = yaml.safe_load(config_file.read_text())
    bad["arms"][1]["provider"] = "nonesuch"
    config_file.write_text(yaml.safe_dump(bad))
    out = metallm_cli(pg_schema, "serve", env={"METALLM_CONFIG": str(config_file)})
    assert out.returncode == EXIT_INPUT and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"metallm: invalid config {config_file}:")
    assert "arms.1.provider" in out.stderr  # the path of the bad key

    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("tasks: [unclosed\n")
    out = metallm_cli(pg_schema, "serve", env={"METALLM_CONFIG": str(not_yaml)})
    assert out.returncode == EXIT_INPUT and f"config {not_yaml} is not valid YAML" in out.stderr


def produce_queries(
    rows: list[dict], broker: str, topics: dict[str, str], config_file: Path, tmp_path: Path
) -> tuple[Path, dict[str, str], subprocess.CompletedProcess]:
    """``metallm produce queries`` of ``rows`` written to a file: (the file, the environment
    given, the outcome)."""
    data = tmp_path / "queries.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        "METALLM_KAFKA_BOOTSTRAP": broker,
        "METALLM_CONFIG": str(config_file),
        "METALLM_QUERIES_TOPIC": topics["queries_topic"],
    }
    return data, env, metallm_cli("public", "produce", "queries", str(data), "--quiet", env=env)


def test_produce_lists_unknown_tasks_and_sends_nothing(broker, topics, config_file, tmp_path):
    rows = [
        {"query_id": "q1", "text": "a fine film", "task": "sentiment"},
        {"query_id": "q2", "text": "what is the weather", "task": "weather"},
        {"query_id": "q3", "text": "is it", "task": "yes_no"},
        {"query_id": "q4", "text": "x", "task": "sentimnet"},
    ]
    data, env, out = produce_queries(rows, broker, topics, config_file, tmp_path)
    assert out.returncode == EXIT_INPUT, out.stderr
    assert "2 bad rows, nothing was sent" in out.stderr
    tasks = "intent, sentiment, yes_no"
    assert f"{data}:2: unknown task 'weather' (tasks in {config_file}: {tasks})" in out.stderr
    assert f"{data}:4: unknown task 'sentimnet'" in out.stderr
    queries = topics["queries_topic"]
    assert partition_counts(broker, [queries]) == {queries: None}  # not even created

    # without a readable config the rows go as they are (the service dead-letters them)
    env["METALLM_CONFIG"] = str(tmp_path / "absent.yaml")
    sent = metallm_cli("public", "produce", "queries", str(data), "--quiet", env=env)
    assert sent.returncode == 0, sent.stderr
    assert f"published 4 queries to {topics['queries_topic']}" in sent.stdout


def test_explain_of_an_unknown_query_exits_1(pg_schema):
    out = metallm_cli(pg_schema, "decisions", "--explain", "nope")
    assert one_line_error(out, EXIT_FAILED) == "metallm: no decision for query 'nope'"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [
                {"query_id": "q1", "text": "a fine film", "task": "sentiment"},
                {"query_id": "q2", "text": "dull", "task": "sentiment", "metdata": {"u": 1}},
            ],
            ":2: unknown field 'metdata' (did you mean 'metadata'?)",
        ),
        (
            [
                {"query_id": "q1", "text": "a fine film", "task": "sentiment"},
                {"query_id": "q2", "text": "dull", "task": "sentiment"},
                {"query_id": "q1", "text": "another film", "task": "sentiment"},
            ],
            ":3: query_id 'q1' repeats line 1",
        ),
    ],
    ids=["unknown-field", "repeated-id"],
)
def test_produce_refuses_a_typo_or_a_repeated_id_and_sends_nothing(
    rows, expected, broker, topics, config_file, tmp_path
):
    data, _, out = produce_queries(rows, broker, topics, config_file, tmp_path)
    assert out.returncode == EXIT_INPUT, out.stderr
    assert "1 bad rows, nothing was sent" in out.stderr and f"{data}{expected}" in out.stderr
    queries = topics["queries_topic"]
    assert partition_counts(broker, [queries]) == {queries: None}  # nothing sent, none created


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"METALLM_POLL_MAX_RECORDS": "many"},
            "metallm: invalid setting: METALLM_POLL_MAX_RECORDS='many': Input should be a "
            "valid integer, unable to parse string as an integer",
        ),
        (
            {"METALLM_POLICY_PARAMS": "{alpha: 1}"},
            "metallm: invalid setting: METALLM_POLICY_PARAMS is not JSON (Expecting property "
            "name enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        (
            {"METALLM_DATABASE_SCHEMA": "my-schema"},
            "metallm: invalid setting: METALLM_DATABASE_SCHEMA='my-schema': String should "
            "match pattern '^[A-Za-z0-9_]+$'",
        ),
        (
            {"DATABASE_URL": "metallm:s3cret-pw@127.0.0.1:5432/metallm"},
            "metallm: invalid setting: DATABASE_URL=(not shown): not a database URL: expected "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        ),
        (
            {"DATABASE_URL": "postgresql+psycopg2://metallm:s3cret-pw@127.0.0.1/metallm"},
            "metallm: invalid setting: DATABASE_URL=postgresql+psycopg2://metallm:***@127.0.0.1"
            "/metallm: the driver of 'postgresql+psycopg2' is not installed (no module "
            "'psycopg2'); postgresql://… uses psycopg 3, which metallm installs",
        ),
        (
            {"DATABASE_URL": "mysql://metallm:s3cret-pw@127.0.0.1/metallm"},
            "metallm: invalid setting: DATABASE_URL=mysql://metallm:***@127.0.0.1/metallm: "
            "metallm needs PostgreSQL, not 'mysql': expected "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        ),
        (
            {"METALLM_TOO_LONG_TEXT": "cut"},
            "metallm: invalid setting: METALLM_TOO_LONG_TEXT='cut': String should match "
            "pattern '^(dlq|truncate)$'",
        ),
        (
            {"METALLM_METRICS_PORT": "none"},
            "metallm: invalid setting: METALLM_METRICS_PORT='none': a port number, 0 for any "
            "free port, or off for none",
        ),
        (
            {"METALLM_PROGRESS_SECONDS": "-1"},
            "metallm: invalid setting: METALLM_PROGRESS_SECONDS='-1': Input should be greater "
            "than or equal to 0",
        ),
        (
            {"METALLM_KAFKA_SECURITY_PROTOCOL": "TLS"},
            "metallm: invalid setting: METALLM_KAFKA_SECURITY_PROTOCOL='TLS': String should "
            "match pattern '^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$'",
        ),
        (
            {"METALLM_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
            "metallm: invalid setting: METALLM_KAFKA_SSL_CAFILE='/nonexistent/ca.pem': Path "
            "does not point to a file",
        ),
        (
            {"METALLM_POLICY": "linucbb"},
            "metallm: invalid setting: METALLM_POLICY='linucbb': no such policy; choose from "
            "arm_means, auto, correctness_ucb, eps_greedy, hybrid_linucb, lin_ts, linucb, "
            "softmax, thompson, ucb",
        ),
        (
            {"METALLM_POLICY": "arm_means", "METALLM_POLICY_PARAMS": '{"epsilon": 2}'},
            'metallm: invalid setting: METALLM_POLICY_PARAMS={"epsilon": 2} for '
            "METALLM_POLICY=arm_means: epsilon must be in [0, 1]",
        ),
        (
            {"METALLM_POLICY": "ucb", "METALLM_POLICY_PARAMS": '{"alpah": 1}'},
            'metallm: invalid setting: METALLM_POLICY_PARAMS={"alpah": 1} for '
            "METALLM_POLICY=ucb: ucb takes no parameter 'alpah'; it takes delta, epsilon, seed",
        ),
        (
            {"METALLM_GROUP_COMMIT_MS": "-1"},
            "metallm: invalid setting: METALLM_GROUP_COMMIT_MS='-1': Input should be greater "
            "than or equal to 0",
        ),
        (
            {"METALLM_HTTP_MAX_BODY_BYTES": "100"},
            "metallm: invalid setting: METALLM_HTTP_MAX_BODY_BYTES='100': Input should be "
            "greater than or equal to 1024",
        ),
        (
            {"METALLM_HTTP_TIMEOUT_SECONDS": "0"},
            "metallm: invalid setting: METALLM_HTTP_TIMEOUT_SECONDS='0': Input should be "
            "greater than 0",
        ),
        (
            {"METALLM_HTTP_MAX_IN_FLIGHT": "0"},
            "metallm: invalid setting: METALLM_HTTP_MAX_IN_FLIGHT='0': Input should be "
            "greater than or equal to 1",
        ),
        (
            {"METALLM_HTTP_PORT": "70000"},
            "metallm: invalid setting: METALLM_HTTP_PORT='70000': Input should be less than "
            "or equal to 65535",
        ),
        (
            {"METALLM_KAFKA_CONSUMERS": "maybe"},
            "metallm: invalid setting: METALLM_KAFKA_CONSUMERS='maybe': Input should be a "
            "valid boolean, unable to interpret input",
        ),
        (
            {"METALLM_POLICY_PARAMS": '{"drift_shrink": 0}'},
            'metallm: invalid setting: METALLM_POLICY_PARAMS={"drift_shrink": 0} for '
            "METALLM_POLICY=correctness_ucb: drift >= 0, drift_shrink in (0, 1], "
            "drift_cost_halflife > 0",
        ),
    ],
    ids=[
        "not-an-int",
        "not-json",
        "schema-name",
        "no-scheme",
        "driver-missing",
        "not-postgres",
        "too-long-text",
        "metrics-port",
        "progress-seconds",
        "security-protocol",
        "tls-file",
        "unknown-policy",
        "policy-param-range",
        "policy-param-name",
        "group-commit-ms",
        "http-body-limit",
        "http-timeout",
        "http-in-flight",
        "http-port",
        "kafka-consumers",
        "drift-shrink",
    ],
)
def test_a_bad_setting_is_one_line_naming_it(env, expected, monkeypatch, capsys):
    """Through the CLI's main in this process (a subprocess each costs seconds)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["stats"])
    out = subprocess.CompletedProcess(["metallm", "stats"], code, *capsys.readouterr())
    assert one_line_error(out, EXIT_INPUT) == expected
    assert "s3cret-pw" not in out.stderr + out.stdout


def test_a_misspelt_model_names_the_arm(pg_schema, broker, tmp_path):
    config = tmp_path / "metallm.yaml"
    arm = {"name": "small", "provider": "llamacpp", "model": "gemma-3-27m"}
    config.write_text(yaml.safe_dump({"tasks": TASKS, "arms": [arm]}))
    env = {"METALLM_CONFIG": str(config), "METALLM_KAFKA_BOOTSTRAP": broker}
    line = one_line_error(metallm_cli(pg_schema, "serve", env=env), EXIT_INPUT)
    assert line.startswith("metallm: arm 'small' cannot start: llamacpp model 'gemma-3-27m' is ")
    assert "neither a known model (gemma-3-270m" in line


def test_an_input_file_that_cannot_be_read_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    line = one_line_error(metallm_cli("public", "produce", "queries", str(missing)), EXIT_INPUT)
    assert line == f"metallm: cannot read {missing}: No such file or directory"
    not_outcomes = tmp_path / "notes.txt"
    not_outcomes.write_text("these are notes\n")
    line = one_line_error(metallm_cli("public", "bench", str(not_outcomes)), EXIT_INPUT)
    assert line == f"metallm: {not_outcomes}: line 1: invalid JSON: Expecting value (column 1)"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["decisions", "--limit", "-1"], "must be at least 1, got -1"),
        (["decisions", "--limit", "ten"], "not a whole number: 'ten'"),
        (["warm-start", "outcomes.jsonl", "--limit", "0"], "must be at least 1, got 0"),
        (["bench", "outcomes.jsonl", "--limit", "-1"], "must be at least 1, got -1"),
        (["record", "--builtin", "--out", "o.jsonl", "--limit", "0"], "must be at least 1, got 0"),
    ],
)
def test_a_limit_below_one_is_refused_as_a_usage_error(args, says, capsys):
    """Before anything runs: a LIMIT below 1 would reach Postgres as a driver error, and the
    slices of warm-start, bench and record would drop the file's last records."""
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    assert f"argument --limit: {says}" in capsys.readouterr().err


def test_stats_refuses_a_negative_number_of_hours(capsys):
    """--hours -1 used to show an empty table headed "last -1 h"."""
    with pytest.raises(SystemExit) as done:
        main(["stats", "--hours", "-1"])
    assert done.value.code == 2
    assert "argument --hours: must be at least 0, got -1" in capsys.readouterr().err


def test_record_refuses_no_queries_in_flight(capsys):
    """--concurrency 0 used to be taken as 1 without a word."""
    with pytest.raises(SystemExit) as done:
        main(["record", "--builtin", "--out", "o.jsonl", "--concurrency", "0"])
    assert done.value.code == 2
    assert "argument --concurrency: must be at least 1, got 0" in capsys.readouterr().err
