"""The API's Prometheus metrics, in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("abflow_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("abflow_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=self.registry)
        self.assignments = Counter("abflow_assignments", "Assignments served", ["experiment_id", "variant", "new"],
                                   registry=self.registry)
        self.refresh_lag = Gauge("abflow_refresh_lag_seconds",
                                 "Newest aggregate update minus newest weights computation, per experiment",
                                 ["experiment_id"], registry=self.registry)
