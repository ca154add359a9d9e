"""The embedded broker's cost as its log grows: why a long soak on it slows down.

    python bench/broker.py [--stored 0,8000] [--rate 5000] [--linger-ms 250] [--seconds 15]

For each count in ``--stored``, starts a fresh embedded broker, fills a 4-partition topic with
that many batches per partition (a 30-minute soak leaves about 7,200: four a second at a 250 ms
linger), then produces at ``--rate`` records/s and measures for ``--seconds`` the broker's share of
a core, first with the producer alone, then with a consumer configured as the worker's reading
the new records as they come. Prints the fetch requests per second, the consumer's round trip to
the broker and the broker's CPU in each case.

The embedded broker keeps its log in memory, one object per produced batch, and answers each
fetch by listing every object of the partition; it cannot delete records (no retention). So its
cost per fetch grows with the batches it holds, whatever the consumer asks for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import cpu_seconds, save_results  # noqa: E402

from abflow.local.stack import EmbeddedBroker  # noqa: E402
from stream_jobs.source import FETCH_BYTES_PER_PARTITION, FETCH_WAIT_MS  # noqa: E402

TOPIC = "bench-broker"
PARTITIONS = 4
RECORD = b"x" * 250  # about an invocation's size


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fill(bootstrap: str, batches: int) -> None:
    """``batches`` one-record batches in every partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
    for i in range(batches):
        for partition in range(PARTITIONS):
            producer.produce(TOPIC, RECORD, partition=partition)
        if i % 500 == 499:
            producer.flush()
            log(f"    {i + 1:,} of {batches:,} batches per partition")
    producer.flush()


def produce_steadily(bootstrap: str, rate: float, linger_ms: float, stop: threading.Event) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms})
    sent, started = 0, time.monotonic()
    while not stop.is_set():
        for _ in range(50):
            producer.produce(TOPIC, RECORD, key=str(sent).encode())
            sent += 1
        producer.poll(0)
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    producer.flush(10)


def broker_cpu_share(pid: int, seconds: float, consumer: Consumer | None = None) -> tuple[float, int]:
    """The broker's share of a core over ``seconds`` (the consumer, if any, reading meanwhile), and the
    records the consumer read."""
    before, read, started = cpu_seconds(pid), 0, time.monotonic()
    while time.monotonic() - started < seconds:
        if consumer is None:
            time.sleep(0.1)
        else:
            read += len(consumer.consume(10_000, 0.1))
    return (cpu_seconds(pid) - before) / seconds, read


def measure(stored: int, args) -> dict:
    home = Path(tempfile.mkdtemp(prefix="abflow-bench-broker-"))
    broker = EmbeddedBroker(home / "broker.log").start()
    stop = threading.Event()
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])[TOPIC].result(30)
        log(f"{stored:,} batches per partition stored beforehand")
        fill(broker.bootstrap, stored)
        producing = threading.Thread(target=produce_steadily,
                                     args=(broker.bootstrap, args.rate, args.linger_ms, stop), daemon=True)
        producing.start()
        time.sleep(3)
        alone, _ = broker_cpu_share(broker.process.pid, args.seconds)
        stats: dict = {}

        def on_statistics(raw: str) -> None:
            brokers = json.loads(raw)["brokers"].values()
            stats["fetches"] = sum(b.get("req", {}).get("Fetch", 0) for b in brokers)
            stats["rtt_ms"] = max((b.get("rtt", {}).get("avg", 0) / 1000 for b in brokers), default=0.0)

        # Read as the worker reads (stream_jobs.source.BatchSource), from the end: only new records.
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-broker",
                             "fetch.wait.max.ms": FETCH_WAIT_MS, "max.partition.fetch.bytes": FETCH_BYTES_PER_PARTITION,
                             "statistics.interval.ms": 1000, "stats_cb": on_statistics})
        consumer.assign([TopicPartition(TOPIC, p, -1) for p in range(PARTITIONS)])
        broker_cpu_share(broker.process.pid, 3, consumer)
        fetches_before = stats.get("fetches", 0)
        reading, read = broker_cpu_share(broker.process.pid, args.seconds, consumer)
        fetches = (stats.get("fetches", 0) - fetches_before) / args.seconds
        consumer.close()
        row = {"stored_batches_per_partition": stored, "broker_cpu_producer_alone": round(alone, 3),
               "broker_cpu_with_consumer": round(reading, 3), "fetch_requests_per_s": round(fetches, 1),
               "consumer_rtt_ms": round(stats.get("rtt_ms", 0.0), 2), "records_read_per_s": round(read / args.seconds)}
        log(f"    broker {alone:.0%} of a core with the producer alone, {reading:.0%} with the consumer too; "
            f"{fetches:.1f} fetches/s, round trip {row['consumer_rtt_ms']} ms, {row['records_read_per_s']:,} records/s read")
        return row
    finally:
        stop.set()
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", default="0,8000",
                        help="batches per partition stored before measuring, comma-separated (default 0,8000)")
    parser.add_argument("--rate", type=float, default=5000.0, help="records/s produced while measuring")
    parser.add_argument("--linger-ms", type=float, default=250.0, help="the producer's linger while measuring")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measurement")
    args = parser.parse_args()
    rows = [measure(int(n), args) for n in args.stored.split(",")]
    save_results("broker", {"rate": args.rate, "linger_ms": args.linger_ms, "seconds": args.seconds, "runs": rows})


if __name__ == "__main__":
    main()
