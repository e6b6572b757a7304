"""The deployment files: compose structure (no Docker engine here) and the database roles
(run for real against the local Postgres)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_kafka_in_kraft_mode_with_a_healthcheck(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "9092:9092" in kafka["ports"]
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/kafka/data") for v in kafka["volumes"])


def compose_default(value: str) -> str:
    """What compose makes of ``${NAME:-default}`` when NAME is not set."""
    match = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", value)
    assert match, f"not a variable with a default: {value!r}"
    return match.group(2)


def test_compose_creates_every_topic_the_service_uses(compose):
    from service.settings import Settings

    script = " ".join(compose["services"]["topics"]["command"])
    defaults = Settings.model_fields
    for name in ("queries_topic", "labels_topic", "decisions_topic", "dlq_topic"):
        assert defaults[name].default in script
    assert compose["services"]["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    # made with the partition count the service is told to expect (or it refuses to start)
    [made] = re.findall(r"--partitions (\S+)", script)
    told = compose["services"]["metallm"]["environment"]["METALLM_TOPIC_PARTITIONS"]
    assert made == told == "${METALLM_TOPIC_PARTITIONS:-6}"
    assert int(compose_default(told)) == defaults["topic_partitions"].default


def test_compose_scales_the_service_and_prometheus_finds_every_replica(compose):
    """``docker compose up --scale metallm=N``: no fixed host port for replicas to clash on
    (the door's is a range, one host port per replica);
    Prometheus finds each replica by the service name (compose's DNS answers it with one
    address per replica) and scrapes it on the metrics port."""
    app = compose["services"]["metallm"]
    # only the HTTP door's port is published, as a range of host ports: one per replica
    [door] = app["ports"]
    hosts, _, inside = door.rpartition(":")
    assert "-" in hosts and inside == app["environment"]["METALLM_HTTP_PORT"]
    first, last = map(int, hosts.split("-"))
    assert last - first + 1 >= 3  # the replicas `--scale metallm=3` makes
    assert "container_name" not in app  # a fixed name cannot be scaled either
    port = int(app["environment"]["METALLM_METRICS_PORT"])
    assert [str(port)] == app["expose"]

    prometheus = compose["services"]["prometheus"]
    assert any(
        v.startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml")
        for v in prometheus["volumes"]
    )
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    [job] = [j for j in scrape if j["job_name"] == "metallm"]
    assert "static_configs" not in job
    [dns] = job["dns_sd_configs"]
    assert dns["names"] == ["metallm"] and dns["type"] == "A" and dns["port"] == port


def test_compose_postgres_migrate_and_service_wiring(compose):
    services = compose["services"]
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any("postgres-init.sh:/docker-entrypoint-initdb.d/" in v for v in pg["volumes"])
    assert (ROOT / "deploy" / "postgres-init.sh").exists()

    migrate, app = services["migrate"], services["metallm"]
    assert migrate["command"] == ["migrate"] and app["command"] == ["serve"]
    assert migrate["build"] == "." and app["build"] == "." and (ROOT / "Dockerfile").exists()
    # the owner migrates, the service runs as the row-only role
    assert "metallm_owner:" in migrate["environment"]["DATABASE_URL"]
    assert "metallm_app:" in app["environment"]["DATABASE_URL"]
    assert app["environment"]["METALLM_KAFKA_BOOTSTRAP"] == "kafka:29092"
    assert app["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert f":{app['environment']['METALLM_METRICS_PORT']}/readyz" in app["healthcheck"]["test"][-1]
    # no secret is written into the file itself
    for value in app["environment"].values():
        assert "sk-" not in str(value)
    assert set(compose["volumes"]) == {"kafka-data", "pg-data", "prometheus-data", "grafana-data"}


def test_image_installs_what_the_default_embedding_backend_needs():
    """A plain install (and so the image) runs the default settings: ONNX Runtime is a base
    dependency when the default backend needs it, and the image exports the model at build
    time (not at every container start)."""
    import tomllib

    from service.settings import Settings

    dockerfile = (ROOT / "Dockerfile").read_text()
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0] for dep in base}
    backend = Settings.model_fields["embedding_backend"].default
    onnx = backend.startswith("onnx")
    assert {"onnxruntime", "onnx"} <= installed if onnx else "torch" in installed
    exported = "RUN python -m service.onnx_export" in dockerfile
    assert exported == onnx  # made at build time exactly when the default backend needs it
    if exported:
        export = dockerfile.index("RUN python -m service.onnx_export")
        assert dockerfile.index("USER metallm") < export  # into the service user's cache


def test_image_copies_every_package_the_install_includes():
    """The image installs from what it copied: each package pyproject.toml includes (the HTTP
    door's among them) is copied before ``pip install``."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in found["packages"]["find"]["include"]]
    install = dockerfile.index("RUN pip install")
    for package in packages:
        copy = f"COPY {package} ./{package}"
        assert copy in dockerfile and dockerfile.index(copy) < install, package


@pytest.mark.integration
def test_postgres_init_script_gives_the_service_rows_but_no_ddl(tmp_path):
    """Run deploy/postgres-init.sh against a fresh database, migrate as the owner, then act as
    the service's role: reads and writes work, DDL is refused."""
    from service.events import LabelEvent
    from service.log.decisions import insert_decisions
    from service.migrate import upgrade
    from service.pipeline import Learner, RewardSettings
    from service.storage import make_engine, vector_to_bytes
    from tests.helpers import legacy_context, open_learning_log

    db = f"roles_{uuid.uuid4().hex[:8]}"
    admin = make_engine(
        "postgresql://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text("DROP ROLE IF EXISTS metallm_app"))
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    try:
        env = {
            **os.environ,
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": db,
            "METALLM_APP_PASSWORD": "s3cret",
            "PGHOST": "127.0.0.1",
            "PGPORT": "5432",
        }
        subprocess.run(
            ["sh", str(ROOT / "deploy" / "postgres-init.sh")],
            env=env,
            check=True,
            capture_output=True,
        )
        upgrade(f"postgresql://postgres@127.0.0.1:5432/{db}")

        app = make_engine(f"postgresql://metallm_app:s3cret@127.0.0.1:5432/{db}")
        with app.begin() as conn:
            insert_decisions(
                conn,
                [
                    {
                        "query_id": "q1",
                        "task": "s",
                        "text": "t",
                        "options": ["a", "b"],
                        "arm": "m",
                        "propensity": 1.0,
                        "probabilities": {"m": 1.0},
                        "policy": "linucb",
                        "status": "ok",
                        "prediction": "a",
                        "cost_usd": 0.0,
                        "embedding_model": "e",
                        "context": vector_to_bytes(np.ones(3)),
                    }
                ],
            )
        learning_log = open_learning_log(
            app, "linucb", {"seed": 0}, checkpoint_every=1, context=legacy_context()
        )
        live = learning_log.live
        Learner(learning_log, RewardSettings(0.1, 0.001), 60).learn(
            [LabelEvent(query_id="q1", label="a"), LabelEvent(query_id="q2", label="b")]
        )
        assert live.policy.n_updates == 1  # reward stored, sequence used, checkpoint written
        with app.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM arm_summary")).scalar_one() == 1
            for ddl in (
                "CREATE TABLE evil (x int)",
                "DROP TABLE decisions",
                "ALTER TABLE decisions ADD COLUMN x int",
                "TRUNCATE decisions",
            ):
                with pytest.raises(sa.exc.ProgrammingError, match="permission denied|must be"):
                    conn.execute(sa.text(ddl))
                conn.rollback()
        app.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            conn.execute(sa.text("DROP ROLE IF EXISTS metallm_app"))
        admin.dispose()
