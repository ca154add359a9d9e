"""What the benchmarks share: the stack they run on, reading a process's metrics, and where their figures go."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from abflow.local.stack import EmbeddedBroker, EmbeddedPostgres  # noqa: E402
from abflow.settings import Settings  # noqa: E402
from storage.db import make_engine, upgrade  # noqa: E402

BROKERS = ("embedded", "kafka")


def add_broker_option(parser) -> None:
    parser.add_argument("--broker", choices=BROKERS, default="embedded",
                        help="the local broker when ABFLOW_KAFKA_BOOTSTRAP is unset: the embedded one, or Apache "
                             "Kafka (abflow.local.kafka; `make kafka` fetches it)")


class Stack:
    """ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL when set, else a local broker (embedded or Apache Kafka)
    and the embedded PostgreSQL, in a temporary directory (the processes' logs too) that ``close``
    removes unless ``keep``: a soak's database and broker log reach gigabytes."""

    def __init__(self, prefix: str = "abflow-bench-", keep: bool = False, broker: str = "embedded"):
        settings = Settings.from_env()
        self.home = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.parts = []
        self.broker_kind = broker if not settings.kafka_bootstrap else "external"
        self.bootstrap, self.database_url = settings.kafka_bootstrap, settings.database_url
        if not self.bootstrap:
            if broker == "kafka":
                from abflow.local.kafka import ApacheKafka

                started = ApacheKafka(self.home / "kafka-data", self.home / "broker.log").start()
            else:
                started = EmbeddedBroker(self.home / "broker.log").start()
            self.parts.append(started)
            self.bootstrap = started.bootstrap
        if not self.database_url:
            postgres = EmbeddedPostgres(self.home / "pgdata", self.home / "postgres.log").start()
            self.parts.append(postgres)
            self.database_url = postgres.url
        upgrade(self.database_url)
        self.engine = make_engine(self.database_url)

    @property
    def kind(self) -> str:
        """The broker the figures came from: embedded, kafka (Apache Kafka, local) or external."""
        return self.broker_kind

    def close(self) -> None:
        self.engine.dispose()
        for part in reversed(self.parts):
            part.stop()
        if self.keep:
            print(f"kept: {self.home}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(self.home, ignore_errors=True)


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time of a process and its children, living and exited (PostgreSQL's backends), in seconds."""
    if pid is None:
        return None
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return None
    for index, p in enumerate(pids):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if index == 0:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: children that exited
    return total / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> str:
    """A process's Prometheus metrics, as text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE))


def save_results(name: str, results: dict) -> None:
    """Print the figures, and keep them in bench/results/ (not versioned)."""
    print(json.dumps(results, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
