"""The README's SDK and Publisher examples run as written against a running stack (its broker and
PostgreSQL, the default topic names, the demo experiment with weights)."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

from abflow.core.config import parse_config
from abflow.settings import Topics
from bandit_service.allocations import publish_allocation
from producers.publisher import Publisher, ensure_topics
from storage.registry import create_experiment

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def example(marker: str) -> str:
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"one README example with {marker!r}, found {len(found)}"
    return found[0]


def test_the_sdk_and_publisher_examples_run_as_written(stack, settings, engine, monkeypatch):
    monkeypatch.setenv("ABFLOW_KAFKA_BOOTSTRAP", stack.kafka_bootstrap)
    topics = Topics()  # what the examples use: the default names
    ensure_topics(stack.kafka_bootstrap, topics, settings.partitions)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        # An earlier test may have left a "demo" in this database, paused or stopped (the fuzzer uses the
        # schema's example ids): the examples need a running one.
        conn.execute("DELETE FROM experiments WHERE experiment_id = 'demo'")
    create_experiment(engine, parse_config({"experiment_id": "demo", "strategy": "ThompsonSampling",
                                            "variants": [{"name": "Champion", "role": "champion"},
                                                         {"name": "Challenger", "role": "challenger"}]}))
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn, Publisher(stack.kafka_bootstrap, topics) as pub:
        publish_allocation(conn, pub, topics.allocations, "demo", "ThompsonSampling", "warmup",
                           {"Champion": 0.5, "Challenger": 0.5}, {})

    sdk: dict = {}
    exec(example("from producers.sdk import ServingClient"), sdk)
    assert sdk["served"].variant in ("Champion", "Challenger") and sdk["answer"] in (True, False)
    assert sdk["client"].publisher.delivered == 2  # the invocation and the conversion

    publisher: dict = {}
    exec(example("from producers.publisher import Publisher"), publisher)
    assert publisher["publisher"].delivered == 2
