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
    return set(re.findall(r'"(ABFLOW_[A-Z_]+)"', (ROOT / "abflow" / "settings.py").read_text()))


def test_services_and_images():
    assert {"kafka", "postgres", "migrate", "worker"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    for name in ("kafka", "postgres", "worker"):
        assert "healthcheck" in SERVICES[name], name


def test_environment_names_the_code_reads():
    known = known_settings()
    for name in ("migrate", "worker"):
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
    for name in ("migrate", "worker"):
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
    result = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
