"""The long-running processes: `abflow worker`, `refresher` and `serve`."""

from __future__ import annotations

import signal
import threading

import click

from abflow.cli.common import load_settings, setup_logging
from abflow.settings import Settings


@click.command()
@click.option("--loglevel", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--healthcheck", is_flag=True,
              help="Exit 0 if a worker with this ABFLOW_HOME polled Kafka in the last 30 s and holds partitions "
                   "(or has waited for them less than five session timeouts), else 1 and the reason.")
def worker(loglevel: str, healthcheck: bool) -> None:
    """Run the stream worker (Faust): events from Kafka into window aggregates in PostgreSQL.

    Start several to share the partitions; each batch is applied exactly once.
    """
    if healthcheck:
        from stream_jobs.source import health

        problem = health(Settings.from_env())
        click.echo("healthy" if problem is None else f"unhealthy: {problem}")
        raise SystemExit(0 if problem is None else 1)
    from stream_jobs.app import run_worker

    run_worker(load_settings(), loglevel)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@click.command()
@click.option("--poll-seconds", default=5.0, show_default=True,
              help="Recompute every running experiment this often, besides reacting to new aggregates.")
def refresher(poll_seconds: float) -> None:
    """Run the weight refresher: new aggregates in, allocation weights out.

    Run several for availability: one leads (a PostgreSQL advisory lock), the
    others stand by and take over when it stops.
    """
    from bandit_service.refresher import WeightRefresher
    from producers.publisher import Publisher, ensure_topics

    settings = load_settings()
    setup_logging()
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    stop = _stop_on_signals()
    with Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
        WeightRefresher(settings, publisher, poll_seconds=poll_seconds).run(stop)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--refresher/--no-refresher", "with_refresher", default=True, show_default=True,
              help="Also run a weight refresher replica in this process.")
@click.option("--poll-seconds", default=5.0, show_default=True, help="The refresher's full-recompute interval.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="API server processes (uvicorn workers); the refresher stays one thread of this process.")
def serve(host: str, port: int, with_refresher: bool, poll_seconds: float, workers: int) -> None:
    """Run the HTTP API (OpenAPI at /docs) and a weight refresher replica.

    Every endpoint but /ping, /healthz and /metrics needs `Authorization: Bearer KEY` with a key of
    ABFLOW_API_KEYS_SERVING (assign, events, current weights), ABFLOW_API_KEYS_READ (every read) or
    ABFLOW_API_KEYS_ADMIN (everything); each a comma-separated list, so keys rotate without downtime.
    """
    import uvicorn

    from bandit_service.api import create_app
    from bandit_service.refresher import WeightRefresher
    from producers.publisher import Publisher, ensure_topics

    settings = load_settings()
    if not settings.api_keys.admin:
        raise click.ClickException("set ABFLOW_API_KEYS_ADMIN (and ABFLOW_API_KEYS_SERVING, ABFLOW_API_KEYS_READ): "
                                   "the API needs at least one admin key")
    setup_logging()
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    stop = threading.Event()
    refresher_thread = None
    publisher = Publisher(settings.require_kafka_bootstrap(), settings.topics)
    if with_refresher:
        refresher_publisher = Publisher(settings.require_kafka_bootstrap(), settings.topics)
        refresher_thread = threading.Thread(
            target=WeightRefresher(settings, refresher_publisher, poll_seconds=poll_seconds).run, args=(stop,),
            name="abflow-refresher", daemon=True)
        refresher_thread.start()
    try:
        if workers == 1:
            uvicorn.run(create_app(settings, publisher), host=host, port=port, log_level="warning")
        else:  # each worker process builds its own app (and publisher) from the same environment
            uvicorn.run("abflow.cli.services:api_from_environment", factory=True, workers=workers, host=host,
                        port=port, log_level="warning")
    finally:
        stop.set()
        if refresher_thread is not None:
            refresher_thread.join(10)
        publisher.close()


COMMANDS = (worker, refresher, serve)


def api_from_environment():
    """The API app of one `abflow serve --workers N` process."""
    from bandit_service.api import create_app

    return create_app(load_settings())
