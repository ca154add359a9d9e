"""The ``abflow`` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import click

from abflow.settings import Settings, SettingsError
from abflow.text import format_table

DEMO_CONFIG = "demo-experiment.yaml"


def _settings(stack: bool = True) -> Settings:
    try:
        settings = Settings.from_env()
        return settings.with_stack() if stack else settings
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _engine(settings: Settings):
    from storage.db import make_engine

    return make_engine(settings.require_database_url())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="abflow")
def main() -> None:
    """abflow: A/B tests and bandits between ML model variants on a live event stream.

    Kafka and PostgreSQL come from ABFLOW_KAFKA_BOOTSTRAP and ABFLOW_DATABASE_URL;
    when those are unset, commands use the local stack that `abflow up` started.
    """


# -- the local stack ----------------------------------------------------------------


@main.command()
@click.option("--demo/--no-demo", default=True, show_default=True, help="Register the demo experiment and simulate traffic.")
@click.option("--events", "invocations", default=30_000, show_default=True, help="Invocations the demo simulates.")
@click.option("--rate", default=3_000.0, show_default=True, help="Invocations per second (0: as fast as possible).")
@click.option("--seed", default=1, show_default=True, help="Seed of the simulated traffic.")
@click.option("--exit-when-done", is_flag=True, help="Stop the stack once the demo's aggregates are complete.")
def up(demo: bool, invocations: int, rate: float, seed: int, exit_when_done: bool) -> None:
    """Start the stack (worker, API, weight refresher) and run the demo; Ctrl-C stops everything.

    Without ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL it starts an embedded
    Kafka-protocol broker and an embedded PostgreSQL whose data is kept in
    $ABFLOW_HOME (default ./.abflow). The demo routes simulated users through
    the serving SDK on the live bandit weights and prints how they moved.
    """
    from abflow.localstack import read_stack_file, stop_recorded_stack

    settings = _settings(stack=False)
    if read_stack_file(settings.home) is not None:
        raise click.ClickException(f"a stack is already running from {settings.home} (see `abflow env`; stop it with `abflow down`)")
    leftovers = stop_recorded_stack(settings.home)  # of an `abflow up` that was killed
    if leftovers:
        click.echo(f"stopped leftovers of an earlier run: {', '.join(leftovers)}", err=True)
    stack = LocalRun(settings)

    def on_signal(signum, frame):  # noqa: ARG001 - SIGTERM (`abflow down`) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        if demo:
            stack.run_demo(invocations, rate, seed)
        if not exit_when_done:
            click.echo("\nThe stack is running. Ctrl-C stops it. In another shell:")
            click.echo("  eval \"$(abflow env)\"   # or: abflow totals, abflow experiment list")
            while True:
                stack.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        stack.stop()


class LocalRun:
    """What `abflow up` started, in start order, so it stops in reverse."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.broker = None
        self.postgres = None
        self.services: dict[str, subprocess.Popen] = {}  # worker, serve (API + refresher)
        self.api_url: str | None = None
        self.logs = settings.home / "logs"

    def start(self) -> None:
        from abflow.localstack import EmbeddedBroker, EmbeddedPostgres, write_stack_file
        from producers.publisher import ensure_topics
        from storage.db import upgrade

        s = self.settings
        pids = {"up": os.getpid()}
        bootstrap, database_url = s.kafka_bootstrap, s.database_url
        if not bootstrap:
            click.echo("starting the embedded Kafka-protocol broker…", err=True)
            self.broker = EmbeddedBroker(self.logs / "broker.log").start()
            bootstrap = self.broker.bootstrap
            pids["broker"] = self.broker.process.pid
        if not database_url:
            click.echo(f"starting the embedded PostgreSQL (data in {s.home / 'pgdata'})…", err=True)
            self.postgres = EmbeddedPostgres(s.home / "pgdata", self.logs / "postgres.log").start()
            database_url = self.postgres.url
            pids["postgres"] = self.postgres.process.pid
        self.settings = s = dataclasses.replace(s, kafka_bootstrap=bootstrap, database_url=database_url)
        click.echo("applying migrations…", err=True)
        upgrade(database_url)
        ensure_topics(bootstrap, s.topics, s.partitions)
        self.logs.mkdir(parents=True, exist_ok=True)
        from abflow.localstack import die_with_parent, free_port, wait_for_port

        api_token = s.api_token or secrets.token_urlsafe(24)
        api_port = free_port()
        env = {**os.environ, "ABFLOW_KAFKA_BOOTSTRAP": bootstrap, "ABFLOW_DATABASE_URL": database_url,
               "ABFLOW_API_TOKEN": api_token}
        services = (("worker", "the stream worker", []),
                    ("serve", "the API and weight refresher", ["--port", str(api_port)]))
        for name, what, args in services:
            click.echo(f"starting {what} (log: {self.logs / f'{name}.log'})…", err=True)
            with open(self.logs / f"{name}.log", "ab") as log:
                self.services[name] = subprocess.Popen(
                    [sys.executable, "-m", "abflow.cli", name, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
                )
            pids[name] = self.services[name].pid
        wait_for_port(api_port, 60, self.services["serve"], "the API")
        self._wait_for_worker()
        self.api_url = f"http://127.0.0.1:{api_port}"
        write_stack_file(s.home, bootstrap, database_url, pids, api_url=self.api_url, api_token=api_token)
        click.echo(f"Kafka:      {bootstrap}")
        click.echo(f"PostgreSQL: {database_url}")
        click.echo(f"API:        {self.api_url}  (OpenAPI: {self.api_url}/docs; token: `abflow env`)")

    def _wait_for_worker(self, timeout: float = 60) -> None:
        """Until the worker holds partitions (a consumer group join takes a few seconds)."""
        from stream_jobs.app import assigned_partitions

        deadline = time.monotonic() + timeout
        while not assigned_partitions(self.settings):
            self.check_alive()
            if time.monotonic() > deadline:
                raise click.ClickException(f"the worker got no partitions in {timeout:.0f}s; see {self.logs / 'worker.log'}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        for name, process in self.services.items():
            if process.poll() is not None:
                raise click.ClickException(f"abflow {name} exited with code {process.returncode}; see {self.logs / f'{name}.log'}")

    def run_demo(self, invocations: int, rate: float, seed: int) -> None:
        from producers.sdk import ServingClient
        from producers.simulator import Scenario, VariantProfile, default_rates, run
        from storage.experiment_config import load_config_text
        from storage.queries import events_applied, variant_totals
        from storage.registry import ExperimentExists, create_experiment

        config = load_config_text(resources.files("abflow.examples").joinpath(DEMO_CONFIG).read_text(), DEMO_CONFIG)
        engine = _engine(self.settings)
        try:
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
            for row in rows:
                row["conversion_rate"] = row["conversions"] / row["invocations"] if row["invocations"] else None
            click.echo(f"\nvariant_totals for {config.experiment_id!r} (all runs so far):")
            click.echo(format_table(rows, ["experiment_id", "variant", "invocations", "conversions", "conversion_rate", "reward_sum", "errors"]))
            self._show_weights(engine, config.experiment_id, sum(row["invocations"] for row in rows))
            self._show_assignments(engine, config.experiment_id, served, [v.name for v in config.variants])
            click.echo("\nthis run published: " + ", ".join(
                f"{name}: {published.invocations[name]} invocations / {published.conversions[name]} conversions"
                for name in sorted(published.invocations)))
            self._show_report(engine, config.experiment_id)
        finally:
            engine.dispose()

    def _show_report(self, engine, experiment_id: str) -> None:
        from bandit_service.report import build_report, load_report_input
        from bandit_service.report_render import render_html, render_text

        report = build_report(load_report_input(engine, experiment_id))
        page = self.settings.home / f"{experiment_id}-report.html"
        page.write_text(render_html(report))
        click.echo(f"\n{'=' * 30} abflow report {experiment_id} {'=' * 30}\n")
        click.echo(render_text(report))
        click.echo(f"\nwrote {page} (plots; opens offline). Again any time: abflow report {experiment_id} --html FILE")

    def _wait_for_weights(self, client, experiment_id: str, timeout: float = 30) -> None:
        from producers.sdk import UnknownExperiment

        client.wait_ready(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.weights(experiment_id)
                return
            except UnknownExperiment:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise click.ClickException(f"no weights for {experiment_id!r} after {timeout:.0f}s; "
                                               f"see {self.logs / 'serve.log'}") from None
                time.sleep(0.1)

    def _show_assignments(self, engine, experiment_id: str, served: Counter, names: list[str]) -> None:
        """This run's assignments by the phase of the weights that routed them, and by variant."""
        from storage.queries import allocation_history

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
        from storage.queries import allocation_history

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
        from tqdm import tqdm

        from storage.queries import events_applied

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
                    raise click.ClickException(f"aggregates still {target - applied} events short after {timeout:.0f}s")
                time.sleep(0.2)

    def stop(self) -> None:
        from abflow.localstack import remove_stack_file

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


@main.command()
def down() -> None:
    """Stop the stack that `abflow up` started."""
    from abflow.localstack import stop_recorded_stack

    settings = _settings(stack=False)
    if not (settings.home / "stack.json").exists():
        raise click.ClickException(f"no stack recorded in {settings.home / 'stack.json'}")
    stopped = stop_recorded_stack(settings.home)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@main.command()
def env() -> None:
    """Print the exports that point other shells and tools at the running stack."""
    from abflow.localstack import read_stack_file

    settings = _settings()
    click.echo(f"export ABFLOW_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}")
    click.echo(f"export ABFLOW_DATABASE_URL={settings.database_url}")
    stack = read_stack_file(settings.home) or {}
    if stack.get("api_url"):
        click.echo(f"export ABFLOW_API_URL={stack['api_url']}")
    if settings.api_token:
        click.echo(f"export ABFLOW_API_TOKEN={settings.api_token}")


# -- database -------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply the migrations (up to REVISION, default: the newest)."""
    from storage.db import current_revision, upgrade

    settings = _settings()
    upgrade(settings.require_database_url(), revision)
    click.echo(f"database at revision {current_revision(settings.require_database_url())}")


# -- experiments ----------------------------------------------------------------------


@main.group()
def experiment() -> None:
    """The experiment registry."""


@experiment.command("create")
@click.option("-f", "--file", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Experiment config, JSON or YAML.")
@click.option("--id", "experiment_id", help="Register it under this id instead of the file's experiment_id.")
def experiment_create(path: Path, experiment_id: str | None) -> None:
    """Register an experiment from a config file."""
    from storage.experiment_config import ConfigError, load_config_text, parse_config
    from bandit_service.assignment import LAYER_BUCKETS
    from storage.registry import ExperimentExists, LayerFull, create_experiment

    try:
        config = load_config_text(path.read_text(), path.name)
        if experiment_id is not None:
            config = parse_config({**config.to_dict(), "experiment_id": experiment_id})
    except ConfigError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    engine = _engine(_settings())
    try:
        created = create_experiment(engine, config)
    except (ExperimentExists, LayerFull) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(f"created experiment {config.experiment_id!r} with variants "
               + ", ".join(f"{v.name} ({v.role}, weight {w:.3g})" for v, w in zip(config.variants, config.normalised_weights.values())))
    if config.layer is not None or config.traffic < 1:
        click.echo(f"layer {created.layer!r}: buckets {created.layer_start}-{created.layer_end} "
                   f"({(created.layer_end - created.layer_start) / LAYER_BUCKETS:.1%} of its units)")


@experiment.command("list")
def experiment_list() -> None:
    """List experiments."""
    from storage.registry import list_experiments

    engine = _engine(_settings())
    try:
        rows = [
            {"experiment_id": e.experiment_id, "strategy": e.strategy, "status": e.status,
             "variants": ", ".join(v.name for v in e.variants), "created_at": e.created_at.strftime("%Y-%m-%d %H:%M:%S")}
            for e in list_experiments(engine)
        ]
    finally:
        engine.dispose()
    if not rows:
        click.echo("no experiments yet; create one with `abflow experiment create -f FILE`")
        return
    click.echo(format_table(rows, ["experiment_id", "strategy", "status", "variants", "created_at"]))


@experiment.command("show")
@click.argument("experiment_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiment_show(experiment_id: str, as_json: bool) -> None:
    """Show one experiment: config, variants and current totals."""
    from storage.queries import variant_totals
    from storage.registry import ExperimentNotFound, get_experiment

    engine = _engine(_settings())
    try:
        try:
            e = get_experiment(engine, experiment_id)
        except ExperimentNotFound as exc:
            raise click.ClickException(str(exc)) from None
        totals = {row["variant"]: row for row in variant_totals(engine, experiment_id)}
    finally:
        engine.dispose()
    variants = []
    for v in e.variants:
        t = totals.get(v.name, {})
        variants.append({"variant": v.name, "role": v.role, "initial_weight": v.initial_weight,
                         "model_version": v.model_version, "invocations": t.get("invocations", 0),
                         "conversions": t.get("conversions", 0), "reward_sum": t.get("reward_sum", 0.0),
                         "errors": t.get("errors", 0)})
    if as_json:
        click.echo(json.dumps({"experiment_id": e.experiment_id, "strategy": e.strategy, "epsilon": e.epsilon,
                               "warmup": e.warmup, "unit": e.unit, "status": e.status,
                               "created_at": e.created_at.isoformat(), "variants": variants}, indent=2))
        return
    click.echo(f"experiment {e.experiment_id}  strategy {e.strategy}  epsilon {e.epsilon}  warmup {e.warmup}  "
               f"unit {e.unit}  status {e.status}")
    click.echo(format_table(variants, ["variant", "role", "initial_weight", "model_version", "invocations",
                                       "conversions", "reward_sum", "errors"]))


@experiment.command("promote")
@click.argument("experiment_id", metavar="EXPERIMENT")
@click.argument("variant")
@click.option("--challenger", "challengers", multiple=True, metavar="NAME[=MODEL_VERSION]",
              help="A new challenger for the next version (repeatable).")
@click.option("--reason", help="Why; stored in the champions history.")
@click.option("--force", is_flag=True, help="Promote without a completed rollout or a SHIP decision for VARIANT.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def experiment_promote(experiment_id: str, variant: str, challengers: tuple[str, ...], reason: str | None,
                       force: bool, as_json: bool) -> None:
    """Make VARIANT, a challenger that won, the champion of EXPERIMENT's lineage.

    Needs evidence: a completed rollout of VARIANT, or a SHIP decision for it in
    `abflow report` (or --force with a --reason). EXPERIMENT stops and serves
    VARIANT to everyone; the next version `<lineage>-v<N>` starts with VARIANT as
    champion, the other challengers and any --challenger, in the same share of
    the same layer. `abflow experiment champions` lists the lineage's history.
    """
    from bandit_service.lifecycle import PromotionRefused, promote
    from producers.publisher import Publisher
    from storage.registry import ExperimentExists, ExperimentNotFound, LayerFull

    new = {}
    for item in challengers:
        name, _, model_version = item.partition("=")
        new[name] = model_version or None
    settings = _settings()
    engine = _engine(settings)
    try:
        with Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
            result = promote(engine, publisher, settings.topics.allocations, experiment_id, variant, new,
                             "operator", reason, force)
    except (PromotionRefused, ExperimentNotFound, ExperimentExists, LayerFull) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"{variant} is champion {result['version']} of lineage {result['lineage']!r} "
               f"(evidence: {result['evidence']['source']}); {experiment_id} is stopped and serves it to everyone")
    if result["next_experiment_id"]:
        click.echo(f"next version: {result['next_experiment_id']} with {', '.join(result['next_variants'])}")
    else:
        click.echo("no challenger left, so no next version; add challengers with --challenger next time")


@experiment.command("champions")
@click.argument("experiment_id", metavar="EXPERIMENT")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiment_champions(experiment_id: str, as_json: bool) -> None:
    """The champions of EXPERIMENT's lineage, first to newest, with who promoted them and why."""
    from bandit_service.lifecycle import champion_history
    from storage.registry import ExperimentNotFound, get_experiment

    engine = _engine(_settings())
    try:
        try:
            lineage = get_experiment(engine, experiment_id).lineage
        except ExperimentNotFound as exc:
            raise click.ClickException(str(exc)) from None
        history = champion_history(engine, lineage)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(history, indent=2, default=str))
        return
    rows = [{"version": c["version"], "champion": c["variant"], "model_version": c["model_version"] or "",
             "experiment": c["experiment_id"], "won in": c["promoted_from"] or "", "evidence": c["evidence"].get("source", ""),
             "at": c["promoted_at"][:19].replace("T", " "), "reason": c["reason"]} for c in history]
    click.echo(f"lineage {lineage}")
    click.echo(format_table(rows, list(rows[0])))


@main.command()
@click.argument("experiment_id")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Also write the report as JSON to this file ('-': standard output, instead of the table).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML page with plots (works offline) to this file.")
def report(experiment_id: str, json_path: str | None, html_path: str | None) -> None:
    """Is a challenger better, by how much, how sure, and may it ship? The full analysis of EXPERIMENT.

    Prints the decision (ship, do not ship, keep running, stop for harm) with
    its reasons, each variant's figures, every challenger against the
    champion on the primary and secondary metrics (with intervals, fixed-
    horizon and always-valid p-values corrected for many comparisons), the
    guardrails, the sample-ratio check and the Bayesian view. Estimates are
    stratified by allocation period, so they stay valid when a bandit moved
    the weights. Metrics, margins, alpha, power and the MDE come from the
    experiment config's `metrics` and `analysis` sections.
    """
    from bandit_service.report import build_report, load_report_input
    from bandit_service.report_render import render_html, render_text
    from storage.registry import ExperimentNotFound

    engine = _engine(_settings())
    try:
        try:
            data = build_report(load_report_input(engine, experiment_id))
        except ExperimentNotFound as exc:
            raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    if json_path == "-":
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_text(data))
        if json_path:
            with open(json_path, "w") as out:
                json.dump(data, out, indent=2)
            click.echo(f"\nwrote {json_path}")
    if html_path:
        with open(html_path, "w") as out:
            out.write(render_html(data))
        click.echo(f"wrote {html_path}", err=json_path == "-")


# -- rollouts ---------------------------------------------------------------------------


@main.group()
def rollout() -> None:
    """Progressive rollouts: watch one, or take the wheel.

    An experiment whose config has a `rollout:` section is driven by the
    controller inside `abflow serve` / `abflow refresher`: the challenger's
    share climbs through the stages while the guardrails hold, and falls to 0 %
    when one fails. These commands act on PostgreSQL directly; the controller
    publishes the resulting weights within a second.
    """


def _rollout_command(experiment_id: str, action: str | None, reason: str | None = None, as_json: bool = False) -> None:
    import psycopg

    from bandit_service import rollout_controller
    from bandit_service.rollout import TransitionRefused

    settings = _settings()
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        try:
            if action is None:
                status = rollout_controller.status(conn, experiment_id)
            else:
                status = rollout_controller.operate(conn, experiment_id, action, "operator", reason)
        except (rollout_controller.NoRollout, TransitionRefused) as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
        return
    click.echo(_render_rollout(status))


def _render_rollout(status: dict) -> str:
    from abflow.text import format_table

    stages = " -> ".join(f"{p:g}%" for p in status["stages"])
    lines = [f"rollout of {status['challenger']} in {status['experiment_id']}: {status['state'].upper()}"
             + (f" at stage {status['stage'] + 1}/{len(status['stages'])} ({status['percent']:g}%)"
                if status["stage"] is not None else ""), f"stages: {stages}"]
    if status["weights"]:
        w = status["weights"]
        lines.append(f"weights (version {w['version']}, {w['phase']}): "
                     + ", ".join(f"{k} {v:.1%}" for k, v in w["weights"].items()))
    check = status.get("last_check")
    if check:
        lines.append(f"last check {status['last_check_at']}: {check.get('action')}")
        lines += [f"  - {reason}" for reason in check.get("reasons", [])]
        rows = [{"metric": g["metric"], "margin": g.get("margin"), "excess": g.get("excess"),
                 "interval": "" if "low" not in g else f"[{g['low']:+.4g}, {g['high']:+.4g}]",
                 "status": g.get("status") or g.get("error", "")} for g in check.get("guardrails", [])]
        if rows:
            lines += ["", format_table(rows, ["metric", "margin", "excess", "interval", "status"])]
    if status["transitions"]:
        lines += ["", "transitions:"]
        rows = [{"at": t["at"][:19].replace("T", " "), "actor": t["actor"], "action": t["action"],
                 "state": t["to_state"], "stage": f"{status['stages'][t['to_stage']]:g}%", "reason": t["reason"]}
                for t in status["transitions"]]
        lines.append(format_table(rows, ["at", "actor", "action", "state", "stage", "reason"]))
    return "\n".join(lines)


@rollout.command("status")
@click.argument("experiment_id", metavar="EXPERIMENT")
@click.option("--json", "as_json", is_flag=True, help="Print the status and transitions as JSON.")
def rollout_status(experiment_id: str, as_json: bool) -> None:
    """State, stage, weights, the newest check's guardrails, and every transition with its reason."""
    _rollout_command(experiment_id, None, as_json=as_json)


def _operator_action(action: str, summary: str):
    @rollout.command(action, help=summary)
    @click.argument("experiment_id", metavar="EXPERIMENT")
    @click.option("--reason", help="Why; stored with the transition.")
    @click.option("--json", "as_json", is_flag=True, help="Print the new status as JSON.")
    def command(experiment_id: str, reason: str | None, as_json: bool) -> None:
        _rollout_command(experiment_id, action, reason, as_json)

    return command


_operator_action("pause", "Hold the rollout at its stage: the weights stay, no check advances or rolls back.")
_operator_action("resume", "Let a paused rollout run again; its stage's deadline starts again.")
_operator_action("promote", "Skip the remaining stages: the challenger gets 100 %.")
_operator_action("abort", "Stop the rollout and send all traffic back to the champion.")


@main.command()
@click.option("-e", "--experiment", "experiment_id", help="Only this experiment.")
def totals(experiment_id: str | None) -> None:
    """Print variant_totals: exact per-variant sums over all windows."""
    from storage.queries import variant_totals

    engine = _engine(_settings())
    try:
        rows = variant_totals(engine, experiment_id)
    finally:
        engine.dispose()
    for row in rows:
        row["conversion_rate"] = row["conversions"] / row["invocations"] if row["invocations"] else None
        row["mean_latency_ms"] = row["latency_ms_sum"] / row["latency_count"] if row["latency_count"] else None
    click.echo(format_table(rows, ["experiment_id", "variant", "invocations", "conversions", "conversion_rate",
                                   "reward_sum", "errors", "mean_latency_ms"]))


@main.command("dead-letters")
def dead_letters() -> None:
    """Count dead letters per topic and reason."""
    from storage.queries import dead_letter_totals

    engine = _engine(_settings())
    try:
        rows = dead_letter_totals(engine)
    finally:
        engine.dispose()
    if not rows:
        click.echo("no dead letters")
        return
    click.echo(format_table(rows, ["topic", "reason", "count", "last_seen_at"]))


# -- stream and traffic ---------------------------------------------------------------


@main.command()
@click.option("--loglevel", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--healthcheck", is_flag=True, help="Exit 0 if a worker with this ABFLOW_HOME polled Kafka in the last 30 s, else 1.")
def worker(loglevel: str, healthcheck: bool) -> None:
    """Run the stream worker (Faust): events from Kafka into window aggregates in PostgreSQL.

    Start several to share the partitions; each batch is applied exactly once.
    """
    if healthcheck:
        from stream_jobs.app import healthy

        ok = healthy(Settings.from_env())
        click.echo("healthy" if ok else "unhealthy: no heartbeat in the last 30 s")
        raise SystemExit(0 if ok else 1)
    from stream_jobs.app import run_worker

    run_worker(_settings(), loglevel)


@main.command()
@click.option("--poll-seconds", default=5.0, show_default=True,
              help="Recompute every running experiment this often, besides reacting to new aggregates.")
def refresher(poll_seconds: float) -> None:
    """Run the weight refresher: new aggregates in, allocation weights out.

    Run several for availability: one leads (a PostgreSQL advisory lock), the
    others stand by and take over when it stops.
    """
    import logging
    import threading

    from bandit_service.refresher import WeightRefresher
    from producers.publisher import Publisher, ensure_topics

    settings = _settings()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
        WeightRefresher(settings, publisher, poll_seconds=poll_seconds).run(stop)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--refresher/--no-refresher", "with_refresher", default=True, show_default=True,
              help="Also run a weight refresher replica in this process.")
@click.option("--poll-seconds", default=5.0, show_default=True, help="The refresher's full-recompute interval.")
def serve(host: str, port: int, with_refresher: bool, poll_seconds: float) -> None:
    """Run the HTTP API (OpenAPI at /docs) and a weight refresher replica.

    State-changing endpoints need `Authorization: Bearer $ABFLOW_API_TOKEN`.
    """
    import logging
    import threading

    import uvicorn

    from bandit_service.api import create_app
    from bandit_service.refresher import WeightRefresher
    from producers.publisher import Publisher, ensure_topics

    settings = _settings()
    if not settings.api_token:
        raise click.ClickException("set ABFLOW_API_TOKEN: the API's state-changing endpoints need a bearer token")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
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
        uvicorn.run(create_app(settings, settings.api_token, publisher), host=host, port=port, log_level="warning")
    finally:
        stop.set()
        if refresher_thread is not None:
            refresher_thread.join(10)
        publisher.close()


@main.command()
@click.argument("experiment_id")
@click.option("--history", default=10, show_default=True, help="How many versions to list, newest first.")
def weights(experiment_id: str, history: int) -> None:
    """Show an experiment's allocation weights and how they moved."""
    from storage.queries import allocation_history

    engine = _engine(_settings())
    try:
        rows = allocation_history(engine, experiment_id, history)
    finally:
        engine.dispose()
    if not rows:
        raise click.ClickException(f"no allocation weights for {experiment_id!r} yet (is `abflow refresher` running?)")
    names = list(rows[0]["weights"])
    table = [{"version": r["version"], "phase": r["phase"], "computed_at": r["computed_at"].strftime("%H:%M:%S.%f")[:-3],
              **{n: r["weights"].get(n) for n in names}} for r in rows]
    click.echo(format_table(table, ["version", "phase", "computed_at", *names]))


@main.command()
@click.option("-e", "--experiment", "experiment_id", default="demo", show_default=True, help="A registered experiment.")
@click.option("--events", "invocations", default=10_000, show_default=True, help="Invocations to publish.")
@click.option("--rate", default=1_000.0, show_default=True, help="Invocations per second (0: as fast as possible).")
@click.option("--users", default=10_000, show_default=True, help="Distinct users.")
@click.option("--conversion-rate", "rates", multiple=True, metavar="VARIANT=P",
              help="True conversion rate of a variant (repeatable); default 4.5 %, 5.2 %, … in variant order.")
@click.option("--conversion-delay", default=5.0, show_default=True, help="Mean seconds from invocation to conversion.")
@click.option("--live-weights", is_flag=True,
              help="Route users with the serving SDK on the live weights (bandits, rollouts) instead of the "
                   "initial weights.")
@click.option("--fault", "faults", multiple=True, metavar="VARIANT:KEY=V,…",
              help="Chaos, repeatable: e.g. Challenger:errors=0.3,latency_ms=200,conversion=0.5,after=30 makes "
                   "Challenger fail 30 % of requests, 200 ms slower and convert half as often from 30 s into the run.")
@click.option("--shadow", "shadows", multiple=True, metavar="NAME[:KEY=V,…]",
              help="Call a shadow the experiment declares beside every request (repeatable): e.g. "
                   "model-v3:agree=0.9,errors=0.02,latency_ms=60 agrees with the served answer 90 % of the time, "
                   "fails 2 % of requests and answers in 60 ms (median).")
@click.option("--seed", default=1, show_default=True)
def simulate(experiment_id: str, invocations: int, rate: float, users: int, rates: tuple[str, ...],
             conversion_delay: float, live_weights: bool, faults: tuple[str, ...], shadows: tuple[str, ...],
             seed: int) -> None:
    """Publish simulated traffic for a registered experiment.

    With --fault, prove the guardrails: inject errors, latency or a drop in
    conversions into one variant from a given moment and watch `abflow
    rollout status` or `abflow report` catch it. With --shadow, see the
    report's SHADOWS section fill.
    """
    from producers.publisher import Publisher
    from producers.sdk import ServingClient
    from producers.simulator import Scenario, VariantProfile, default_rates, parse_fault, parse_shadow, run
    from storage.experiment_config import parse_config
    from storage.registry import ExperimentNotFound, get_experiment

    settings = _settings()
    engine = _engine(settings)
    try:
        e = get_experiment(engine, experiment_id)
    except ExperimentNotFound as exc:
        raise click.ClickException(f"{exc}; register it with `abflow experiment create -f FILE`") from None
    finally:
        engine.dispose()
    true_rates = default_rates([v.name for v in e.variants])
    for item in rates:
        name, _, value = item.partition("=")
        if name not in true_rates:
            raise click.BadParameter(f"{name!r} is not a variant of {experiment_id!r}", param_hint="--conversion-rate")
        try:
            true_rates[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected VARIANT=P", param_hint="--conversion-rate") from None
        if not 0 <= true_rates[name] <= 1:
            raise click.BadParameter(f"{item!r}: P must be in [0, 1]", param_hint="--conversion-rate")
    try:
        chaos = tuple(parse_fault(text) for text in faults)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    for fault in chaos:
        if fault.variant not in true_rates:
            raise click.BadParameter(f"{fault.variant!r} is not a variant of {experiment_id!r}", param_hint="--fault")
    try:
        shadow_profiles = tuple(parse_shadow(text) for text in shadows)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--shadow") from None
    declared = [s.name for s in parse_config(e.config).shadows]
    for profile in shadow_profiles:
        if profile.name not in declared:
            raise click.BadParameter(
                f"{profile.name!r} is not a shadow of {experiment_id!r} (declared: {', '.join(declared) or 'none'}; "
                "add it under 'shadows:' in the config)", param_hint="--shadow")
    scenario = Scenario(
        experiment_id=experiment_id,
        variants=tuple(VariantProfile(v.name, v.initial_weight, true_rates[v.name]) for v in e.variants),
        users=users, conversion_delay_mean_s=conversion_delay, seed=seed, faults=chaos, shadows=shadow_profiles,
    )
    if live_weights:
        with ServingClient(settings.require_kafka_bootstrap(), settings.topics) as client:
            if not client.wait_ready(30):
                raise click.ClickException("could not read the allocations topic within 30 s")

            def route(user_id: str) -> tuple[str, float]:
                served = client.assign(experiment_id, user_id)
                return served.variant, served.propensity

            published = run(scenario, client.publisher, invocations, rate=rate, router=route)
    else:
        with Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
            published = run(scenario, publisher, invocations, rate=rate)
    rows = [{"variant": name, "invocations": published.invocations[name], "conversions": published.conversions[name],
             "errors": published.errors[name]} for name in true_rates]
    click.echo(format_table(rows, ["variant", "invocations", "conversions", "errors"]))
    if shadow_profiles:
        rows = [{"shadow": p.name, "requests": published.shadows[p.name], "errors": published.shadow_errors[p.name]}
                for p in shadow_profiles]
        click.echo(format_table(rows, ["shadow", "requests", "errors"]))


if __name__ == "__main__":
    main()
