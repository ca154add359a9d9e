"""What `abflow up` runs: the local stack's services as child processes, and the demo experiment.

``LocalRun`` starts the embedded broker and PostgreSQL (unless the environment
names real ones), the stream worker and ``abflow serve``, records them in the
stack file, runs the demo through the serving SDK on the live weights, starts a
service that exits again (with backoff; the broker and PostgreSQL stay up), and
stops everything in reverse order.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib import resources

import click
from tqdm import tqdm

from abflow.core.config import load_config_text
from abflow.core.errors import ExperimentExists, ExperimentNotFound
from abflow.core.text import format_table
from abflow.local.stack import (
    EmbeddedBroker,
    EmbeddedPostgres,
    StackError,
    choose_port,
    command_name,
    die_with_parent,
    read_local_file,
    remove_stack_file,
    wait_for_port,
    write_local_file,
    write_stack_file,
)
from abflow.settings import API_ROLES, ApiKeys, Settings
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from bandit_service.report.render import render_html, render_text
from producers.publisher import ensure_topics
from producers.sdk import ServingClient
from producers.simulator import Scenario, VariantProfile, default_rates, run
from storage.db import engine_for, upgrade
from storage.queries import allocation_history, events_applied, variant_totals
from storage.registry import create_experiment

DEMO_CONFIG = "demo-experiment.yaml"


@dataclasses.dataclass
class Restarts:
    """How a supervised service has been restarted: the delay doubles (1 s up to 30 s) while it keeps
    exiting within a minute of its start, and falls back to 1 s once it stayed up longer."""

    count: int = 0
    delay: float = 0.0
    started_at: float = 0.0
    due_at: float | None = None

    STABLE_SECONDS = 60.0
    MAX_DELAY = 30.0

    def started(self, now: float) -> None:
        if self.due_at is not None:
            self.count += 1
        self.started_at, self.due_at = now, None

    def next_delay(self, now: float) -> float:
        quick = now - self.started_at < self.STABLE_SECONDS
        self.delay = min(self.MAX_DELAY, self.delay * 2) if quick and self.delay else 1.0
        return self.delay


class LocalRun:
    """What `abflow up` started, in start order, so it stops in reverse."""

    def __init__(self, settings: Settings, ports: dict[str, int | None] | None = None, new_keys: bool = False,
                 broker: str = "embedded"):
        self.settings = settings
        self.broker_kind = broker  # "embedded" (Tansu, in memory) or "kafka" (Apache Kafka, log on disk)
        # Fixed ports asked for ("kafka", "postgres", "api"); otherwise those of the last run while free,
        # so that shells with its exports keep working.
        self.ports = ports or {}
        self.new_keys = new_keys
        self.broker = None
        self.postgres = None
        self.services: dict[str, subprocess.Popen] = {}  # worker, serve (API + refresher)
        self.api_url: str | None = None
        self.logs = settings.home / "logs"
        self._commands: dict[str, list[str]] = {}  # each service's arguments, to start it again
        self._env: dict[str, str] = {}
        self._restarts: dict[str, Restarts] = {}
        self._stack_record: dict = {}  # what the stack file holds besides the pids

    def start(self) -> None:
        s = self.settings
        pids = {"up": os.getpid()}
        last = read_local_file(s.home)
        remembered = {}
        bootstrap, database_url = s.kafka_bootstrap, s.database_url
        if not bootstrap:
            port = choose_port(self.ports.get("kafka"), last.get("kafka_port"), "the broker")
            if self.broker_kind == "kafka":
                from abflow.local.kafka import ApacheKafka

                click.echo(f"starting Apache Kafka (log in {s.home / 'kafka-data'}; fetched once from Maven "
                           "Central)…", err=True)
                self.broker = ApacheKafka(s.home / "kafka-data", self.logs / "broker.log", port).start()
            else:
                click.echo("starting the embedded Kafka-protocol broker…", err=True)
                self.broker = EmbeddedBroker(self.logs / "broker.log", port).start()
            bootstrap = self.broker.bootstrap
            pids["broker"] = self.broker.process.pid
            remembered["kafka_port"] = port
        if not database_url:
            click.echo(f"starting the embedded PostgreSQL (data in {s.home / 'pgdata'})…", err=True)
            port = choose_port(self.ports.get("postgres"), last.get("postgres_port"), "PostgreSQL")
            self.postgres = EmbeddedPostgres(s.home / "pgdata", self.logs / "postgres.log", port).start()
            database_url = self.postgres.url
            pids["postgres"] = self.postgres.process.pid
            remembered["postgres_port"] = port
        self.settings = s = dataclasses.replace(s, kafka_bootstrap=bootstrap, database_url=database_url)
        click.echo("applying migrations…", err=True)
        upgrade(database_url)
        ensure_topics(bootstrap, s.topics, s.partitions)
        self.logs.mkdir(parents=True, exist_ok=True)
        # The environment's keys; else the last run's (unless new ones are asked for); else one new key per role.
        api_keys = s.api_keys or (None if self.new_keys else ApiKeys.from_dict(last.get("api_keys") or {})) \
            or ApiKeys(*((secrets.token_urlsafe(24),) for _ in API_ROLES))
        api_port = choose_port(self.ports.get("api"), last.get("api_port"), "the API")
        write_local_file(s.home, {**remembered, "api_port": api_port,
                                  "api_keys": None if s.api_keys else api_keys.to_dict()})
        env = {**os.environ, "ABFLOW_KAFKA_BOOTSTRAP": bootstrap, "ABFLOW_DATABASE_URL": database_url,
               **api_keys.as_env()}
        services = (("worker", "the stream worker", []),
                    ("serve", "the API and weight refresher", ["--port", str(api_port)]))
        self._env = env
        for name, what, args in services:
            click.echo(f"starting {what} (log: {self.logs / f'{name}.log'})…", err=True)
            self._commands[name] = [name, *args]
            self._restarts[name] = Restarts()
            self._spawn(name)
            pids[name] = self.services[name].pid
        wait_for_port(api_port, 60, self.services["serve"], "the API")
        self._wait_for_worker()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self._stack_record = {"kafka_bootstrap": bootstrap, "database_url": database_url,
                              "pids": {k: v for k, v in pids.items() if k not in self.services},
                              "api_url": self.api_url, "api_keys": api_keys.to_dict()}
        self._write_stack_file()
        click.echo(f"Kafka:      {bootstrap}")
        click.echo(f"PostgreSQL: {database_url}")
        click.echo(f"API:        {self.api_url}  (OpenAPI: {self.api_url}/docs; a key per role: "
                   f"`{command_name()} env`)")

    def _wait_for_worker(self, timeout: float = 60) -> None:
        """Until the worker holds partitions (a consumer group join takes a few seconds)."""
        from stream_jobs.source import assigned_partitions

        deadline = time.monotonic() + timeout
        while not assigned_partitions(self.settings):
            self.check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"the worker got no partitions in {timeout:.0f}s; see {self.logs / 'worker.log'}")
            time.sleep(0.1)

    def _spawn(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.services[name] = subprocess.Popen(
                [sys.executable, "-m", "abflow.cli", *self._commands[name]], env=self._env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        self._restarts[name].started(time.monotonic())

    def _write_stack_file(self) -> None:
        record = dict(self._stack_record)
        pids = {**record.pop("pids"), **{name: process.pid for name, process in self.services.items()}}
        write_stack_file(self.settings.home, record.pop("kafka_bootstrap"), record.pop("database_url"), pids, **record)

    def check_alive(self) -> None:
        """Start again, with backoff, a service that exited: the broker and PostgreSQL (and the events
        they hold) stay up, and a restarted worker goes on from the offsets stored with the aggregates."""
        for name, process in self.services.items():
            if process.poll() is None:
                continue
            restarts = self._restarts[name]
            now = time.monotonic()
            if restarts.due_at is None:
                restarts.due_at = now + restarts.next_delay(now)
                click.echo(f"abflow {name} exited with code {process.returncode} (see {self.logs / f'{name}.log'}); "
                           f"starting it again in {restarts.due_at - now:.0f} s", err=True)
            elif now >= restarts.due_at:
                self._spawn(name)
                click.echo(f"started abflow {name} again (pid {self.services[name].pid}; restart "
                           f"{restarts.count})", err=True)
                if self._stack_record:
                    self._write_stack_file()

    def run_demo(self, invocations: int, rate: float, seed: int) -> None:
        config = load_config_text(resources.files("abflow.examples").joinpath(DEMO_CONFIG).read_text(), DEMO_CONFIG)
        with engine_for(self.settings.require_database_url()) as engine:
            try:
                create_experiment(engine, config)
                click.echo(f"registered experiment {config.experiment_id!r}")
            except ExperimentExists:
                click.echo(f"experiment {config.experiment_id!r} is already registered")
            rates = default_rates([v.name for v in config.variants])
            scenario = Scenario(
                experiment_id=config.experiment_id,
                variants=tuple(VariantProfile(v.name, v.initial_weight, rates[v.name]) for v in config.variants),
                seed=seed,
            )
            before = events_applied(engine)
            served: Counter = Counter()  # (weights version, variant) of each invocation
            with ServingClient(self.settings.kafka_bootstrap, self.settings.topics) as client:
                self._wait_for_weights(client, config.experiment_id)

                def route(user_id: str) -> tuple[str, float]:
                    choice = client.assign(config.experiment_id, user_id)
                    served[(choice.version, choice.variant)] += 1
                    return choice.variant, choice.propensity

                published = run(scenario, client.publisher, invocations, rate=rate, progress=True, router=route)
            target = before + published.total
            self._wait_for(engine, target, published.total)
            rows = variant_totals(engine, config.experiment_id)
            click.echo(f"\nvariant_totals for {config.experiment_id!r} (all runs so far):")
            click.echo(format_table(rows, ["experiment_id", "variant", "invocations", "conversions", "conversion_rate",
                                           "reward_sum", "errors"]))
            self._show_weights(engine, config.experiment_id, sum(row["invocations"] for row in rows))
            self._show_assignments(engine, config.experiment_id, served, [v.name for v in config.variants])
            click.echo("\nthis run published: " + ", ".join(
                f"{name}: {published.invocations[name]} invocations / {published.conversions[name]} conversions"
                for name in sorted(published.invocations)))
            self._show_report(engine, config.experiment_id)

    def _show_report(self, engine, experiment_id: str) -> None:
        report = build_report(load_report_input(engine, experiment_id))
        page = self.settings.home / f"{experiment_id}-report.html"
        page.write_text(render_html(report))
        click.echo(f"\n{'=' * 30} abflow report {experiment_id} {'=' * 30}\n")
        click.echo(render_text(report))
        click.echo(f"\nwrote {page} (plots; opens offline). Again any time: {command_name()} report {experiment_id} "
                   "--html FILE")

    def _wait_for_weights(self, client, experiment_id: str, timeout: float = 30) -> None:
        client.wait_ready(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.weights(experiment_id)
                return
            except ExperimentNotFound:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise StackError(f"no weights for {experiment_id!r} after {timeout:.0f}s; "
                                               f"see {self.logs / 'serve.log'}") from None
                time.sleep(0.1)

    def _show_assignments(self, engine, experiment_id: str, served: Counter, names: list[str]) -> None:
        """This run's assignments by the phase of the weights that routed them, and by variant."""
        phases = {row["version"]: row["phase"] for row in allocation_history(engine, experiment_id, 1_000_000)}
        by_phase: dict[str, Counter] = {}
        for (version, variant), count in served.items():
            by_phase.setdefault(phases.get(version, "?"), Counter())[variant] += count
        rows = [{"phase": phase, **{n: counts[n] for n in names}, "total": sum(counts.values())}
                for phase, counts in by_phase.items()]
        rows.append({"phase": "all", **{n: sum(c[n] for c in by_phase.values()) for n in names},
                     "total": sum(served.values())})
        click.echo("\nthis run's assignments by the phase of the weights that routed them:")
        click.echo(format_table(rows, ["phase", *names, "total"]))

    def _show_weights(self, engine, experiment_id: str, invocations: int) -> None:
        """How the weights moved, once the refresher has used every invocation (or 10 s passed)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = allocation_history(engine, experiment_id, 10)
            used = sum(v["invocations"] for v in rows[0]["statistics"]["variants"].values()) if rows else 0
            if used >= invocations:
                break
            time.sleep(0.2)
        if rows:
            names = list(rows[0]["weights"])
            table = [{"version": r["version"], "phase": r["phase"], **r["weights"]} for r in reversed(rows)]
            click.echo(f"\nallocation weights of {experiment_id!r} (last {len(rows)} versions, oldest first):")
            click.echo(format_table(table, ["version", "phase", *names]))

    def _wait_for(self, engine, target: int, published: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        start = events_applied(engine)
        with tqdm(total=published, initial=published - (target - start), unit="ev", desc="aggregated", mininterval=0.5) as bar:
            while True:
                applied = events_applied(engine)
                bar.n = published - (target - applied)
                bar.refresh()
                if applied >= target:
                    return
                self.check_alive()
                if time.monotonic() > deadline:
                    raise StackError(f"aggregates still {target - applied} events short after {timeout:.0f}s")
                time.sleep(0.2)

    def stop(self) -> None:
        for process in reversed(self.services.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        for part in (self.broker, self.postgres):
            if part is not None:
                part.stop()
        remove_stack_file(self.settings.home)
        click.echo("stopped.", err=True)
