"""The `abflow` commands against the real stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid

import pytest
from click.testing import CliRunner

from abflow.cli import main
from tests.conftest import wait_until


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
    from alembic.script import ScriptDirectory

    from storage.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    for _ in range(2):
        result = invoke("db", "upgrade")
        assert result.exit_code == 0
        assert f"database at revision {head}" in result.output


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
    assert shown["config"]["warmup"] == 50 and shown["layer"] == {"name": experiment_id, "buckets": [0, 10000]}
    assert shown["weights"] is None  # no allocation yet: the initial weights serve
    table = invoke("experiment", "show", experiment_id).output
    assert "Challenger" in table and "weights: the initial ones" in table
    assert "\nconfig:\n" in table and "strategy: UCB1" in table and "attribution_window_seconds: 86400.0" in table


def test_bad_config_and_unknown_experiment_are_clear_errors(settings, tmp_path):
    bad = write_config(tmp_path, "cli-bad", strategy="Greedy")
    result = CliRunner().invoke(main, ["experiment", "create", "-f", bad])
    assert result.exit_code == 1
    assert "strategy must be one of WeightedSampling, EpsilonGreedy, UCB1, ThompsonSampling, got 'Greedy'" in result.output
    # Every command that names an experiment says so when there is none, and exits non-zero.
    for args in (["experiment", "show"], ["experiment", "pause"], ["experiment", "resume"], ["experiment", "stop"],
                 ["experiment", "champions"], ["report"], ["weights"], ["rollout", "status"], ["rollout", "pause"],
                 ["rollout", "abort"], ["totals", "-e"], ["simulate", "--events", "10", "-e"]):
        missing = CliRunner().invoke(main, [*args, "no-such-experiment"])
        assert missing.exit_code == 1 and "no experiment 'no-such-experiment'" in missing.output, (args, missing.output)
    promote = CliRunner().invoke(main, ["experiment", "promote", "no-such-experiment", "B"])
    assert promote.exit_code == 1 and "no experiment 'no-such-experiment'" in promote.output


def test_pause_resume_stop_follow_the_same_rules_as_the_api(settings, tmp_path):
    experiment_id = f"cli-{uuid.uuid4().hex[:6]}"
    invoke("experiment", "create", "-f", write_config(tmp_path, experiment_id))
    resume_running = CliRunner().invoke(main, ["experiment", "resume", experiment_id])
    assert resume_running.exit_code == 1 and "is running; resume needs paused" in resume_running.output
    assert f"experiment '{experiment_id}' is paused" in invoke("experiment", "pause", experiment_id).output
    assert f"experiment '{experiment_id}' is running" in invoke("experiment", "resume", experiment_id).output
    assert f"experiment '{experiment_id}' is stopped" in invoke("experiment", "stop", experiment_id).output
    assert json.loads(invoke("experiment", "show", experiment_id, "--json").output)["status"] == "stopped"
    restart = CliRunner().invoke(main, ["experiment", "resume", experiment_id])
    assert restart.exit_code == 1 and "is stopped; it cannot resume" in restart.output
    missing = CliRunner().invoke(main, ["experiment", "pause", "no-such-experiment"])
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


def published_and_totals(out: str) -> tuple[dict, dict]:
    published = {name: (int(inv), int(conv))
                 for name, inv, conv in re.findall(r"(\w+): (\d+) invocations / (\d+) conversions", out)}
    totals = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["demo"] and len(parts) > 3:
            totals[parts[1]] = (int(parts[2]), int(parts[3]))
    return published, totals


def test_up_runs_the_demo_twice_and_ctrl_c_stops_everything(tmp_path, request):
    """The README's main command, end to end, on its own broker (the one the tests run on: the
    embedded one or Apache Kafka, `abflow up --broker kafka`) and embedded PostgreSQL.

    The second run restarts the broker against the PostgreSQL that kept the first run's offsets
    and dedup ids (the embedded broker's topics come back empty, with new ids; Apache Kafka's log
    is on disk and keeps them): its events must all count, on top of the first run's.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABFLOW_")}
    home = tmp_path / "home"
    env["ABFLOW_HOME"] = str(home)
    broker = request.config.getoption("--broker")
    command = [sys.executable, "-m", "abflow.cli", "up", "--events", "3000", "--rate", "0", "--broker", broker]
    first = subprocess.run([*command, "--exit-when-done"], env=env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "registered experiment 'demo'" in first.stdout
    published, totals = published_and_totals(first.stdout)
    assert sum(inv for inv, _ in published.values()) == 3000
    assert totals == published
    # The demo ends with the report: 3,000 visits are far below the power analysis' sample.
    assert "DECISION  KEEP RUNNING" in first.stdout
    assert "<svg" in (home / "demo-report.html").read_text()
    assert not (home / "stack.json").exists()  # stopped and cleaned up
    assert "stopped." in first.stderr
    assert "Warning" not in first.stderr, first.stderr  # a normal start is quiet
    remembered = json.loads((home / "local.json").read_text())  # ports and keys, for the next run

    # As from a terminal: SIGINT not ignored, even when the tests run in a background job (which ignores it).
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    errors: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(second.stdout), daemon=True)
    reader.start()
    # Its stderr (progress bars) is drained too: a pipe nobody reads blocks its writer once full.
    error_reader = threading.Thread(target=lambda: errors.extend(second.stderr), daemon=True)
    error_reader.start()
    try:
        wait_until(lambda: any("The stack is running" in line for line in lines) or second.poll() is not None,
                   300, message="the second demo")
        assert second.poll() is None, "".join(lines)
        out = "".join(lines)
        assert "experiment 'demo' is already registered" in out
        again, totals = published_and_totals(out)
        assert totals == {name: (published[name][0] + again[name][0], published[name][1] + again[name][1])
                          for name in published}
        # A restart keeps the ports and the keys, so shells with the last run's exports keep working.
        stack = json.loads((home / "stack.json").read_text())
        assert stack["kafka_bootstrap"] == f"127.0.0.1:{remembered['kafka_port']}"
        assert f":{remembered['postgres_port']}/" in stack["database_url"]
        assert stack["api_url"].endswith(f":{remembered['api_port']}")
        assert stack["api_keys"] == remembered["api_keys"]
        # Other commands find the running stack by themselves, from any directory below its home's.
        project = tmp_path / "project"
        (project / "src" / "deep").mkdir(parents=True)
        (project / ".abflow").symlink_to(home)
        no_home = {k: v for k, v in env.items() if k != "ABFLOW_HOME"}
        shown = subprocess.run([sys.executable, "-m", "abflow.cli", "env"], env=no_home, capture_output=True, text=True,
                               cwd=project / "src" / "deep")
        assert f"export ABFLOW_DATABASE_URL={stack['database_url']}" in shown.stdout, shown.stderr
        for role, keys in stack["api_keys"].items():
            assert keys and f"export ABFLOW_API_KEYS_{role.upper()}={','.join(keys)}" in shown.stdout
        # A shell with exports of a stack that is gone gets one line saying what to do.
        stale = subprocess.run([sys.executable, "-m", "abflow.cli", "experiment", "list"], capture_output=True, text=True,
                               env={**env, "ABFLOW_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/abflow",
                                    "ABFLOW_KAFKA_BOOTSTRAP": stack["kafka_bootstrap"]})
        assert stale.returncode == 1 and len(stale.stderr.strip().splitlines()) == 1, stale.stderr
        assert 'run `eval "$(abflow env)"` again' in stale.stderr
        # The API runs too, and its weights are the refresher's.
        request = urllib.request.Request(f"{stack['api_url']}/experiments/demo/weights",
                                         headers={"Authorization": f"Bearer {stack['api_keys']['serving'][0]}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            current = json.loads(response.read())
        assert current["version"] >= 1 and abs(sum(current["weights"].values()) - 1) < 1e-9
        second.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            assert second.wait(60) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("`abflow up` did not stop within 60 s of Ctrl-C; its stderr:\n" + "".join(errors)[-3000:])
    finally:
        if second.poll() is None:
            second.kill()
    reader.join(5)
    error_reader.join(5)
    assert "stopped." in "".join(errors)
    for pid in stack["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every process `abflow up` started is gone
    assert not (home / "stack.json").exists()


def test_up_starts_a_killed_worker_again_and_nothing_published_meanwhile_is_lost(tmp_path):
    """kill -9 of the worker used to stop the whole stack, the in-memory broker with it, so that every
    event published and not yet counted was lost. The broker and PostgreSQL now stay up, the worker
    is started again, and it counts what was published while it was down."""
    from producers.publisher import Publisher
    from storage.db import make_engine
    from tests.helpers import counted_events, invocation, make_experiment, now, publish

    env = {k: v for k, v in os.environ.items() if not k.startswith("ABFLOW_")}
    env["ABFLOW_HOME"] = str(tmp_path / "home")
    stack_file = tmp_path / "home" / "stack.json"
    up = subprocess.Popen([sys.executable, "-m", "abflow.cli", "up", "--no-demo"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(up.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: any("The stack is running" in line for line in lines) or up.poll() is not None, 120,
                   message="the stack")
        assert up.poll() is None, "".join(lines + errors)
        stack = json.loads(stack_file.read_text())
        engine = make_engine(stack["database_url"])
        experiment_id = make_experiment(engine)
        os.kill(stack["pids"]["worker"], signal.SIGKILL)
        with Publisher(stack["kafka_bootstrap"]) as publisher:
            for i in range(500):
                publish(publisher, "invocation", invocation(experiment_id, "Champion", now(), f"user-{i}"))
        wait_until(lambda: any("started abflow worker again" in line for line in errors), 60,
                   message="the worker started again")
        assert any("abflow worker exited with code -9" in line for line in errors), "".join(errors)
        restarted = json.loads(stack_file.read_text())
        assert restarted["pids"]["worker"] != stack["pids"]["worker"]
        assert restarted["pids"]["broker"] == stack["pids"]["broker"]  # the broker, and its events, stayed up
        wait_until(lambda: counted_events(engine, [experiment_id]) == 500, 90, message="the 500 events")
        engine.dispose()
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, "".join(errors)[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
    for pid in restarted["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_db_prune_deletes_only_what_is_older_than_the_retention(settings, engine):
    """Old windows, allocation versions and dead-letter counters go; recent ones stay, and so does
    every experiment's latest allocation however old. ``--dry-run`` deletes nothing."""
    import time
    from datetime import datetime, timezone

    from abflow.core.windowing import LATENCY_BUCKETS
    from storage.allocations import insert_next_allocation
    from storage.db import connect
    from storage.sink import add_dead_letter_counts, add_windows
    from tests.helpers import make_experiment

    experiment_id, all_old = make_experiment(engine, prefix="prune"), make_experiment(engine, prefix="prune-old")
    topic = f"prune-{uuid.uuid4().hex[:6]}"
    old, recent = time.time() - 100 * 86_400, time.time() - 60
    with connect(settings.database_url, autocommit=False) as conn:
        add_windows(conn, [(experiment_id, "Champion", start, 60, 1, 0, 0.0, 0.0, 0, 0, 0.0, [0] * LATENCY_BUCKETS)
                           for start in (old // 60 * 60, recent // 60 * 60)])
        for experiment, times in ((experiment_id, (old, recent)), (all_old, (old, old + 60))):
            for at in times:
                insert_next_allocation(conn, experiment, "ThompsonSampling", "policy", {"Champion": 0.5, "Challenger": 0.5},
                                       {}, datetime.fromtimestamp(at, timezone.utc), True)
        add_dead_letter_counts(conn, {(topic, "too_late"): 3, (topic, "malformed_json"): 2})
        conn.execute("UPDATE dead_letter_counts SET last_seen_at = to_timestamp(%s) WHERE topic = %s AND reason = %s",
                     (old, topic, "too_late"))
        conn.commit()

    def remaining() -> dict:
        with connect(settings.database_url) as conn:
            return {
                "windows": conn.execute("SELECT count(*) FROM variant_windows WHERE experiment_id = %s",
                                        (experiment_id,)).fetchone()[0],
                "versions": dict(conn.execute("SELECT experiment_id, count(*) FROM allocations "
                                              "WHERE experiment_id = ANY(%s) GROUP BY 1", ([experiment_id, all_old],))),
                "dead_letters": sorted(r for (r,) in conn.execute("SELECT reason FROM dead_letter_counts WHERE topic = %s",
                                                                  (topic,))),
            }

    before = remaining()
    assert before == {"windows": 2, "versions": {experiment_id: 2, all_old: 2}, "dead_letters": ["malformed_json", "too_late"]}
    dry = invoke("db", "prune", "--dry-run")
    assert dry.exit_code == 0 and "variant_windows      would delete" in dry.output, dry.output
    assert remaining() == before
    result = invoke("db", "prune")
    assert result.exit_code == 0 and "allocations          deleted" in result.output, result.output
    assert remaining() == {"windows": 1, "versions": {experiment_id: 1, all_old: 1}, "dead_letters": ["malformed_json"]}
