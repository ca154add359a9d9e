"""Property-based fuzzing of the live API (Schemathesis, from its OpenAPI schema) on the real broker
and PostgreSQL: no 5xx, every response as the schema documents it, with and without keys; the
worker and the API's refresher keep running."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from abflow.local.stack import free_port, wait_for_port
from producers.publisher import ensure_topics
from tests.conftest import ADMIN, API_KEYS

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def fuzz(url: str, report: Path, *headers: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", CHECKS,
               "--max-examples", "30", "--seed", "1", "--phases", "examples,fuzzing",
               "--generation-database", "none", "--no-color", "--request-timeout", "10", "--workers", "2",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
    for header in headers:
        command += ["--header", header]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("who", ["admin", "serving", "no key"])
def test_the_fuzzer_finds_no_server_error_and_no_undocumented_response(settings, services, tmp_path, who):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    port = free_port()
    worker = services("worker")
    server = services("serve", "--port", str(port), name="serve")
    wait_for_port(port, 60, server.process, "the API")
    url = f"http://127.0.0.1:{port}"
    # An experiment for the generated requests to find now and then.
    request = urllib.request.Request(f"{url}/experiments", method="POST", headers={**ADMIN, "Content-Type": "application/json"},
                                     data=json.dumps({"experiment_id": "fuzz", "strategy": "ThompsonSampling",
                                                      "variants": [{"name": "A"}, {"name": "B"}]}).encode())
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 409  # registered by an earlier case
    headers = [] if who == "no key" else [f"Authorization: Bearer {API_KEYS[who]}"]
    result = fuzz(url, tmp_path / "fuzz.ndjson", *headers)
    (tmp_path / "schemathesis.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert worker.alive() and server.alive(), (worker.log()[-2000:], server.log()[-2000:])
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
        assert response.status == 200
