"""Apache Kafka on this machine, without Docker: the broker from Maven Central, run as one KRaft node.

``fetch`` turns ``kafka-pom.xml`` (Apache Kafka's broker and its runtime dependencies, nothing of
ours) into a classpath with ``mvn dependency:copy-dependencies``, once, in a cache directory
(``ABFLOW_KAFKA_HOME``, default ``~/.cache/abflow/kafka-<version>``). ``ApacheKafka`` writes a
``server.properties`` (broker and controller in one process, replication factor 1, retention set, a
heap that fits a laptop), formats its log directory the first time and starts ``kafka.Kafka``; its
log stays on disk, so topics and offsets survive a restart. ``python -m abflow.local.kafka`` fetches
(what `make kafka` runs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from abflow.local.stack import StackError, _stop_process, die_with_parent, free_port, wait_for_port

POM = "kafka-pom.xml"
LOG_CONFIG = "kafka-log4j2.yaml"
HEAP = ("-Xms128m", "-Xmx512m")  # a single-node broker for tests and a laptop
RETENTION_HOURS = 168  # Kafka's default: a week of events to replay
RETENTION_BYTES_PER_PARTITION = 1 << 30


def _resource(name: str) -> str:
    return resources.files("abflow.local").joinpath(name).read_text()


def kafka_version() -> str:
    text = _resource(POM)
    return text.split("<kafka.version>", 1)[1].split("</kafka.version>", 1)[0]


def cache_dir() -> Path:
    configured = os.environ.get("ABFLOW_KAFKA_HOME")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "abflow" / f"kafka-{kafka_version()}"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StackError(f"Apache Kafka needs `{name}` (Java 17+ and Maven; Debian: apt-get install "
                         "default-jre-headless maven), or use the embedded broker (--broker embedded)")
    return path


def fetch(directory: Path | None = None, quiet: bool = True) -> Path:
    """The broker's classpath directory, fetched from Maven Central the first time (and again when
    ``kafka-pom.xml`` changes). Safe to run again: a complete fetch is marked, a partial one redone."""
    directory = directory or cache_dir()
    pom = _resource(POM)
    marker = directory / "fetched.sha256"
    digest = hashlib.sha256(pom.encode()).hexdigest()
    lib = directory / "lib"
    if marker.exists() and marker.read_text() == digest and any(lib.glob("kafka_2.13-*.jar")):
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pom.xml").write_text(pom)
    staging = directory / "lib.partial"
    shutil.rmtree(staging, ignore_errors=True)
    command = [_tool("mvn"), "-B", *(["-q"] if quiet else []), "-f", str(directory / "pom.xml"),
               "dependency:copy-dependencies", f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(f"fetching Apache Kafka {kafka_version()} from Maven Central failed "
                         f"({' '.join(command)}):\n{(result.stdout + result.stderr)[-3000:]}")
    shutil.rmtree(lib, ignore_errors=True)
    staging.replace(lib)
    marker.write_text(digest)
    return lib


# What abflow relies on from its broker, wherever it runs: docker-compose.yml sets the same (a test
# compares them).
BROKER_SETTINGS: dict[str, str | int] = {
    "process.roles": "broker,controller",  # KRaft, one node
    "offsets.topic.replication.factor": 1,
    "transaction.state.log.replication.factor": 1,
    "transaction.state.log.min.isr": 1,
    "share.coordinator.state.topic.replication.factor": 1,
    # A group forms as soon as its members joined (the default waits 3 s for more): a worker that
    # starts or restarts counts at once.
    "group.initial.rebalance.delay.ms": 0,
    # abflow creates its topics with their partitions and settings; a misspelt name is an error.
    "auto.create.topics.enable": "false",
    "log.retention.hours": RETENTION_HOURS,
}

# On this machine only: a laptop's disk, a quick start and the tests' short sessions.
LOCAL_SETTINGS: dict[str, str | int] = {
    "log.retention.bytes": RETENTION_BYTES_PER_PARTITION,
    "log.segment.bytes": 64 << 20,  # retention deletes whole segments: smaller steps
    "offsets.topic.num.partitions": 4,  # the default 50 are 50 more logs to open at start
    "group.min.session.timeout.ms": 1000,  # the default minimum is 6 s; the tests use 3 s
}


def server_properties(data_dir: Path, port: int, controller_port: int) -> str:
    """One node, broker and controller, on 127.0.0.1."""
    settings = {
        "node.id": 1,
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        **BROKER_SETTINGS,
        **LOCAL_SETTINGS,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class ApacheKafka:
    """Apache Kafka as a single KRaft node on 127.0.0.1, its log in ``data_dir``."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None, lib: Path | None = None):
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.controller_port = free_port()
        self.lib = lib
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "ApacheKafka":
        self.lib = self.lib or fetch()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config = self.data_dir.parent / f"{self.data_dir.name}.server.properties"
        config.write_text(server_properties(self.data_dir, self.port, self.controller_port))
        log_config = self.data_dir.parent / f"{self.data_dir.name}.log4j2.yaml"
        log_config.write_text(_resource(LOG_CONFIG))
        java = [_tool("java"), f"-Dlog4j2.configurationFile={log_config}", "-cp", str(self.lib / "*")]
        if not (self.data_dir / "meta.properties").exists():
            cluster = subprocess.run([*java, "kafka.tools.StorageTool", "random-uuid"], capture_output=True,
                                     text=True, check=True).stdout.strip()
            formatted = subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(config),
                                        "--standalone"], capture_output=True, text=True)
            if formatted.returncode != 0:
                raise StackError(f"formatting Kafka's log directory failed:\n{formatted.stdout}{formatted.stderr}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [java[0], *HEAP, *java[1:], "kafka.Kafka", str(config)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        wait_for_port(self.port, timeout, self.process, "Apache Kafka")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the broker answers metadata with itself in it (it listens before it has joined its quorum)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log.connection.close": False})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(f"Apache Kafka exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if admin.list_topics(timeout=2).brokers:
                    return
            except KafkaException:
                pass
            time.sleep(0.2)
        raise StackError(f"Apache Kafka did not answer within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, signal.SIGTERM, timeout=30)  # a controlled shutdown


if __name__ == "__main__":
    print(fetch(quiet="-v" not in sys.argv))
