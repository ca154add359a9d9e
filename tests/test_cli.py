"""The `abflow` commands against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from click.testing import CliRunner

from abflow.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_config(tmp_path, experiment_id: str, suffix: str = ".yaml", **overrides) -> str:
    config = {"experiment_id": experiment_id, "strategy": "UCB1", "warmup": 50,
              "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.7, "model_version": "1"},
                           {"name": "Challenger", "role": "challenger", "initial_weight": 0.3, "model_version": "2"}]}
    config.update(overrides)
    path = tmp_path / f"{experiment_id}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config))
    return str(path)


def test_db_upgrade_is_idempotent(settings):
    for _ in range(2):
        result = invoke("db", "upgrade")
        assert result.exit_code == 0
        assert "database at revision 0001" in result.output


def test_experiment_create_list_show(settings, tmp_path):
    experiment_id = f"cli-{uuid.uuid4().hex[:6]}"
    result = invoke("experiment", "create", "-f", write_config(tmp_path, experiment_id))
    assert result.exit_code == 0, result.output
    assert f"created experiment '{experiment_id}'" in result.output
    assert "Champion (champion, weight 0.7)" in result.output

    again = CliRunner().invoke(main, ["experiment", "create", "-f", write_config(tmp_path, experiment_id, ".json")])
    assert again.exit_code == 1
    assert "already exists" in again.output

    listing = invoke("experiment", "list")
    assert experiment_id in listing.output and "UCB1" in listing.output

    shown = json.loads(invoke("experiment", "show", experiment_id, "--json").output)
    assert shown["strategy"] == "UCB1" and shown["warmup"] == 50
    assert [(v["variant"], v["role"], v["initial_weight"], v["invocations"]) for v in shown["variants"]] == [
        ("Champion", "champion", 0.7, 0), ("Challenger", "challenger", 0.3, 0)]
    table = invoke("experiment", "show", experiment_id).output
    assert "Challenger" in table and "strategy UCB1" in table


def test_bad_config_and_unknown_experiment_are_clear_errors(settings, tmp_path):
    bad = write_config(tmp_path, "cli-bad", strategy="Greedy")
    result = CliRunner().invoke(main, ["experiment", "create", "-f", bad])
    assert result.exit_code == 1
    assert "strategy must be one of WeightedSampling, EpsilonGreedy, UCB1, ThompsonSampling, got 'Greedy'" in result.output
    missing = CliRunner().invoke(main, ["experiment", "show", "no-such-experiment"])
    assert missing.exit_code == 1 and "no experiment 'no-such-experiment'" in missing.output


def test_env_prints_the_settings(settings):
    output = invoke("env").output
    assert f"export ABFLOW_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}" in output
    assert f"export ABFLOW_DATABASE_URL={settings.database_url}" in output


def test_commands_without_a_stack_say_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("ABFLOW_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("ABFLOW_DATABASE_URL", raising=False)
    monkeypatch.setenv("ABFLOW_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["experiment", "list"])
    assert result.exit_code == 1
    assert "abflow up" in result.output and "ABFLOW_DATABASE_URL" in result.output
    down = CliRunner().invoke(main, ["down"])
    assert down.exit_code == 1 and "no stack recorded" in down.output


def test_worker_healthcheck_without_a_worker_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("ABFLOW_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["worker", "--healthcheck"])
    assert result.exit_code == 1 and "unhealthy" in result.output


def test_simulate_worker_totals_and_dead_letters(settings, run_env, workers, engine, tmp_path):
    from tests.conftest import wait_until
    from tests.helpers import counted_events

    experiment_id = f"cli-{uuid.uuid4().hex[:6]}"
    invoke("experiment", "create", "-f", write_config(tmp_path, experiment_id))
    worker = workers()
    result = invoke("simulate", "-e", experiment_id, "--events", "2000", "--rate", "0", "--seed", "5",
                    "--conversion-rate", "Challenger=0.5")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith(("Champion", "Challenger"))]
    published = {name: (int(inv), int(conv)) for name, inv, conv, _ in rows}
    assert sum(inv for inv, _ in published.values()) == 2000
    total = sum(inv + conv for inv, conv in published.values())
    wait_until(lambda: counted_events(engine, [experiment_id]) == total, 60, message="simulated events", workers=[worker])
    totals = invoke("totals", "-e", experiment_id).output
    for name, (inv, conv) in published.items():
        line = next(line for line in totals.splitlines() if f" {name} " in line)
        assert line.split()[2:4] == [str(inv), str(conv)], line
    assert published["Challenger"][1] > 0.4 * published["Challenger"][0]  # the 50 % rate we asked for
    assert worker.alive()
    bad = CliRunner().invoke(main, ["simulate", "-e", experiment_id, "--conversion-rate", "Nope=0.1"])
    assert bad.exit_code == 2 and "'Nope' is not a variant" in bad.output


def test_up_runs_the_demo_on_the_embedded_stack(tmp_path):
    """The README's main command, end to end, on its own embedded broker and PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABFLOW_")}
    env["ABFLOW_HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-m", "abflow.cli", "up", "--events", "3000", "--rate", "0", "--exit-when-done"],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "registered experiment 'demo'" in out
    published = dict(
        (name, (int(inv), int(conv)))
        for name, inv, conv in __import__("re").findall(r"(\w+): (\d+) invocations / (\d+) conversions", out)
    )
    assert sum(inv for inv, _ in published.values()) == 3000
    for name, (inv, conv) in published.items():
        line = next(line for line in out.splitlines() if line.startswith("demo ") and f" {name} " in line)
        assert line.split()[2:4] == [str(inv), str(conv)], line
    assert not (tmp_path / "home" / "stack.json").exists()  # stopped and cleaned up
    assert "stopped." in result.stderr
