"""The Grafana dashboard and the Prometheus scrape config of docker-compose.yml, without
Docker: the files are valid and wired together, and a real Prometheus (Debian's package,
which ``make test`` installs) scraping two real ``metallm serve`` processes, on the real broker
and Postgres after real queries and labels, answers every panel's query with data of the type
the panel draws: the query parses, every metric it names is exported under that name, ``rate()``
and ``increase()`` are taken of counters only, and the labels its legend shows are there."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumers.kafka_io import ensure_topics
from tests.conftest import DATABASE_URL, wait_for
from tests.faults.harness import ServiceProcess, service_env, write_config
from tests.helpers import (
    ARMS,
    TASKS,
    count,
    demo_rows,
    label_bytes,
    query_bytes,
    send,
    settings_for,
    write_outcomes,
)

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "metallm.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus.yml"
METRIC = re.compile(r"\bmetallm_[a-z0-9_]+\b")
#: Series Prometheus makes itself, not the service
PROMETHEUS_OWN = {"up"}
NO_PROMETHEUS = (
    "no `prometheus` on the PATH: `make test` installs Debian's package "
    "(apt-get install prometheus) where apt is at hand"
)


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
    for topic in ("learning lag", "checkpoint", "discarded"):
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


def test_prometheus_accepts_the_scrape_config_of_compose():
    promtool = shutil.which("promtool") or pytest.skip(NO_PROMETHEUS)
    check = subprocess.run(
        [promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------ a real Prometheus
#: Grafana's built-in variables, as Grafana sets them over a 1 s scrape interval
#: ($__rate_interval: four scrape intervals at least, here more, for slow scrapes of a busy box)
GRAFANA_VARIABLES = {"__rate_interval": "20s", "__interval": "2s", "__range": "1m"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
RATED = re.compile(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)\s*(?:\{[^}]*\})?\s*\[")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
HISTOGRAM_PARTS = ("_bucket", "_count")  # counters; a histogram with negative buckets has no _sum


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server of the test's own: deploy/prometheus.yml with the compose DNS
    discovery swapped for ``targets``, scraping every second, its data in ``workdir``."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = config["scrape_configs"]
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": targets}]
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
            except OSError:
                return False

        wait_for(ready, timeout=timeout, message="Prometheus ready")

    def api(self, endpoint: str, **params: Any) -> Any:
        """``/api/v1/<endpoint>``'s data; a query Prometheus rejects fails with its reason."""
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            body = json.load(urllib.request.urlopen(url, timeout=10))
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body["status"] == "success", f"Prometheus: {body.get('error')} in {params}"
        return body["data"]

    def value(self, query: str) -> float | None:
        """The value of a query that yields one series (None: no series)."""
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def promql(expr: str, dashboard_variables: list[str]) -> str:
    """``expr`` as Grafana sends it: its built-in variables set, the dashboard's own ones
    (``$instance`` …) set to match anything (their "All")."""

    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        assert name in dashboard_variables, f"unknown variable ${name} in {expr}"
        return ".*"

    return VARIABLE.sub(value, expr)


def series_type(name: str, metadata: dict[str, list[dict]]) -> str:
    """The type the scraped targets declare for series ``name`` (a histogram's buckets and
    count are counters)."""
    if name in metadata:
        return metadata[name][0]["type"]
    for part in HISTOGRAM_PARTS:
        family = name.removesuffix(part)
        if family != name and metadata.get(family, [{}])[0].get("type") == "histogram":
            return "counter"
    raise AssertionError(f"no target exports a metric named {name}")


def check_query(
    prometheus: Prometheus, expr: str, legend: str = "", variables: list[str] | None = None
) -> None:
    """Run a panel's query as Grafana would, instant and over the last minute: Prometheus
    accepts it, it yields series (a vector, a matrix), each with the labels its legend shows;
    every metric it names is exported, and only counters are given to rate() or increase()."""
    query = promql(expr, variables or [])
    metadata = prometheus.api("metadata")
    for name in METRIC.findall(query):
        series_type(name, metadata)
    for function, name in RATED.findall(query):
        kind = series_type(name, metadata)
        assert kind == "counter", f"{function}() of {name}, a {kind}, in {expr}"
    now = time.time()
    for endpoint, params, shape in (
        ("query", {"time": now}, "vector"),
        ("query_range", {"start": now - 60, "end": now, "step": 2}, "matrix"),
    ):
        data = prometheus.api(endpoint, query=query, **params)
        assert data["resultType"] == shape, f"{expr}: a {data['resultType']}, not a {shape}"
        assert data["result"], f"no data for {expr}"
        for series in data["result"]:
            missing = set(LEGEND_LABEL.findall(legend)) - set(series["metric"])
            assert not missing, f"legend {legend!r} shows {missing}, not in {expr}'s series"


def replay_arms(outcomes: Path) -> dict:
    return {
        "tasks": TASKS,
        "arms": [
            {"name": a, "provider": "replay", "model": a, "outcomes": str(outcomes)} for a in ARMS
        ],
    }


def metrics_port(service: ServiceProcess) -> int:
    def port() -> int | None:
        assert service.alive, service.log()[-3000:]
        found = re.search(r"metrics on :(\d+)", service.log())
        return int(found.group(1)) if found else None

    return wait_for(port, timeout=60, interval=0.3, message="the service's metrics port")


@pytest.mark.integration
def test_a_real_prometheus_answers_every_panel_query_with_data_of_its_type(
    broker, topics, pg_schema, engine, tmp_path
):
    binary = shutil.which("prometheus") or pytest.skip(NO_PROMETHEUS)
    board = dashboard()
    variables = [v["name"] for v in board["templating"]["list"]]
    used = {name for q in queries() for name in METRIC.findall(q)}
    for q in queries():  # nothing but the service's metrics and Prometheus's own `up`
        others = set(re.findall(r"\b([a-z_]+)\{", q)) - PROMETHEUS_OWN
        assert not others - used, q

    n = 24
    rows = demo_rows(n)
    settings = settings_for(broker, topics, pg_schema, DATABASE_URL)
    ensure_topics(settings, [topics["queries_topic"], topics["labels_topic"]])
    config = write_config(
        tmp_path / "metallm.yaml",
        replay_arms(write_outcomes(tmp_path / "outcomes.jsonl", rows, ARMS)),
    )
    # a checkpoint due every 4 rewards: one of the instances takes the writer's role
    env = service_env(broker, topics, DATABASE_URL, pg_schema, config, checkpoint_every=4)
    services = [ServiceProcess(env, tmp_path / f"service-{i}.log").start() for i in range(2)]
    prometheus: Prometheus | None = None
    try:
        targets = [f"127.0.0.1:{metrics_port(s)}" for s in services]
        prometheus = Prometheus(binary, tmp_path, targets)
        prometheus.wait_ready()
        wait_for(lambda: all(s.serving for s in services), message="both services serving")
        queries_in = [(r["query_id"], query_bytes(r)) for r in rows]
        send(broker, topics["queries_topic"], [*queries_in, ("bad", b"not json")])
        wait_for(lambda: count(engine, "SELECT count(*) FROM decisions") == n, message="decided")
        labels = [(r["query_id"], label_bytes(r["query_id"], r["label"])) for r in rows]
        send(broker, topics["labels_topic"], labels)
        wait_for(
            lambda: count(engine, "SELECT count(reward_seq) FROM decisions") == n,
            message="rewards",
        )
        right = count(engine, "SELECT count(*) FROM decisions WHERE correct")

        # what Prometheus holds is what the services did and what Postgres holds (the
        # Postgres-backed gauges are refreshed every LEARNING_REFRESH_S)
        truth = {
            'count(up{job="metallm"} == 1)': 2,
            "sum(metallm_decisions_total)": n,  # each decision counted by the instance storing it
            "sum(metallm_dlq_events_total)": 1,
            "sum(max by (arm) (metallm_labeled_decisions))": n,
            "sum(max by (arm) (metallm_correct_decisions))": right,
            "max(metallm_policy_lag_rewards)": 0,
            "min(metallm_policy_updates)": n,  # every instance learned every reward
            "sum(metallm_checkpoint_writer)": 1,  # one writer of checkpoints
        }

        def seen() -> bool:
            return all(prometheus.value(q) == v for q, v in truth.items())

        try:
            wait_for(seen, timeout=40, interval=1.0, message="the services' figures")
        except AssertionError:
            raise AssertionError({q: prometheus.value(q) for q in truth}) from None
        time.sleep(3)  # a few more scrapes: a rate() over the window has points to draw

        checked = 0
        for panel in board["panels"]:
            for target in panel["targets"]:
                check_query(prometheus, target["expr"], target.get("legendFormat", ""), variables)
                checked += 1
        assert checked == len(queries())

        # the checks fail a query that would draw nothing or mislead
        wrong = {
            "sum by (instance) (rate(metallm_policy_updates[$__rate_interval]))": "a gauge",
            "sum by (arm) (rate(metallm_decisons_total[$__rate_interval]))": "no target exports",
            'sum(rate(metallm_decisions_total{statu="ok"}[$__rate_interval]))': "no data",
            "sum by (arm) (rate(metallm_decisions_total[$__rate_interval])": "parse error",
            "sum(rate(metallm_decisions_total[$__rate_intervall]))": "unknown variable",
            "sum(metallm_pending_labels)": "legend",  # legend {{arm}}: a label it drops
        }
        for expr, reason in wrong.items():
            with pytest.raises(AssertionError, match=reason):
                check_query(prometheus, expr, "{{arm}}" if reason == "legend" else "", variables)
    finally:
        for service in services:
            if service.alive:
                service.terminate()
        if prometheus is not None:
            prometheus.stop()
