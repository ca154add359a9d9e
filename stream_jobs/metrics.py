"""The worker's Prometheus metrics, served on ``ABFLOW_WORKER_METRICS_PORT`` when it is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_seconds = Histogram(
            "abflow_worker_batch_seconds", "Time to apply one batch: validation and its PostgreSQL transaction",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=self.registry)
        self.events = Counter("abflow_worker_events", "Records applied, by topic and what became of them "
                              "(counted, duplicate, dead_letter)", ["topic", "result"], registry=self.registry)
        self.dead_letters = Counter("abflow_worker_dead_letters", "Records sent to the dead-letter topic, by reason",
                                    ["topic", "reason"], registry=self.registry)
        self.offset_gaps = Counter("abflow_worker_offset_gaps", "Offsets passed without a record read although "
                                   "the broker keeps them (a broker that lost or withheld records), by topic",
                                   ["topic"], registry=self.registry)
        self.lost_to_retention = Counter("abflow_worker_lost_to_retention", "Records the topic's retention deleted "
                                         "before a worker counted them, by topic", ["topic"], registry=self.registry)
        self.offset_rereads = Counter("abflow_worker_offset_rereads", "Partitions read again from an offset the "
                                      "broker's answer jumped ahead of, by topic", ["topic"], registry=self.registry)
        self.assigned = Gauge("abflow_worker_assigned_partitions", "Partitions this worker holds (0 for long: its "
                              "group may be stuck, or it has more workers than partitions)", registry=self.registry)
        self.unassigned_seconds = Gauge("abflow_worker_unassigned_seconds", "Seconds this worker has held no "
                                        "partition (0 while it holds some)", registry=self.registry)
        self.lag = Gauge("abflow_worker_consumer_lag", "Records not applied yet: from the last offset the worker "
                         "applied to the end of each partition it holds", ["topic", "partition"], registry=self.registry)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)  # noqa: S104 - scraped from outside
