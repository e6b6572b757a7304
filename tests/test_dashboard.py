"""The Grafana dashboard and the Prometheus scrape config of docker-compose.yml, without
Docker: the files are valid and wired together, and every metric the dashboard's queries use
is exported by a running service's /metrics (the real service, on the real broker and
Postgres, after real queries and labels)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from consumers.kafka_io import ensure_topics
from tests.conftest import DATABASE_URL, wait_for
from tests.helpers import (
    ARMS,
    build_service,
    count,
    demo_rows,
    label_bytes,
    query_bytes,
    replay_config,
    send,
    settings_for,
    write_outcomes,
)

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "metallm.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
METRIC = re.compile(r"\bmetallm_[a-z0-9_]+\b")
#: Series Prometheus makes itself, not the service
PROMETHEUS_OWN = {"up"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_dashboard_is_valid_and_provisioned_against_the_prometheus_of_compose():
    board = dashboard()
    assert board["uid"] == "metallm" and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    source = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (prometheus,) = source["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    for panel in board["panels"]:
        assert panel["title"] and panel["targets"], panel
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == prometheus["uid"]
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for topic in ("decisions per second", "accuracy", "cost", "share", "reward", "latency"):
        assert topic in titles
    for topic in ("consumer lag", "dead-letter", "pending labels", "policy lag"):
        assert topic in titles

    services = compose()["services"]
    grafana, scraper = services["grafana"], services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])  # source: target[:ro]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "metallm.yml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in scraper["volumes"]
    assert "prometheus" in grafana["depends_on"]


def test_prometheus_scrapes_every_replica_of_the_service():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "metallm"]
    (sd,) = job["dns_sd_configs"]  # the service name resolves to every replica's address
    app = compose()["services"]["metallm"]
    assert sd["names"] == ["metallm"] and sd["type"] == "A"
    assert sd["port"] == int(app["environment"]["METALLM_METRICS_PORT"])
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert all('job="metallm"' in q for q in queries() if "up{" in q)


def exported_samples(port: int) -> set[str]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.mark.integration
def test_every_metric_the_dashboard_queries_is_exported_by_a_running_service(
    broker, topics, pg_schema, engine, embedder, tmp_path
):
    used = {name for q in queries() for name in METRIC.findall(q)}
    assert len(used) >= 12, used
    for q in queries():  # nothing but the service's metrics and Prometheus's own `up`
        others = set(re.findall(r"\b([a-z_]+)\{", q)) - PROMETHEUS_OWN
        assert not others - used, q

    rows = demo_rows(12)
    outcomes = write_outcomes(tmp_path / "outcomes.jsonl", rows, ARMS)
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    service = build_service(settings, replay_config(outcomes, list(ARMS)), embedder)
    service.start()
    try:
        send(
            broker,
            topics["queries_topic"],
            [(r["query_id"], query_bytes(r)) for r in rows] + [("bad", b"not json")],
        )
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == 12, message="decided")
        send(
            broker,
            topics["labels_topic"],
            [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in rows],
        )
        wait_for(
            lambda: count(engine, "SELECT count(reward_seq) FROM decisions") == 12,
            message="rewards",
        )
        port = service.metrics_server.port

        def all_exported() -> set[str] | None:
            missing = used - exported_samples(port)
            return None if missing else used

        try:
            wait_for(all_exported, timeout=40, interval=1.0, message="every metric")
        except AssertionError:
            missing = sorted(used - exported_samples(port))
            raise AssertionError(f"the dashboard queries metrics not exported: {missing}") from None

        def labeled_gauges() -> dict | None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            labeled = families["metallm_labeled_decisions"].samples
            return families if sum(s.value for s in labeled) == 12 else None

        # the Postgres-backed gauges are refreshed every LEARNING_REFRESH_S
        families = wait_for(labeled_gauges, timeout=30, interval=1.0, message="12 labeled")
        arms = {s.labels["arm"] for s in families["metallm_labeled_decisions"].samples}
        assert arms <= set(ARMS)  # this database's arms only
        correct = {s.labels["arm"]: s.value for s in families["metallm_correct_decisions"].samples}
        assert 0 <= sum(correct.values()) <= 12
        with engine.connect() as conn:
            right = conn.execute(sa.text("SELECT count(*) FROM decisions WHERE correct")).scalar()
        assert sum(correct.values()) == right
        assert families["metallm_policy_updates"].samples[0].value == 12
        assert families["metallm_policy_lag_rewards"].samples[0].value == 0
    finally:
        service.stop()
