"""`abflow up`, `down`, `env` and `db`: the local stack and the schema."""

from __future__ import annotations

import signal
import time

import click

from abflow.cli.common import load_settings
from abflow.local.stack import command_name


@click.command()
@click.option("--demo/--no-demo", default=True, show_default=True, help="Register the demo experiment and simulate traffic.")
@click.option("--events", "invocations", default=30_000, show_default=True, help="Invocations the demo simulates.")
@click.option("--rate", default=3_000.0, show_default=True, help="Invocations per second (0: as fast as possible).")
@click.option("--seed", default=1, show_default=True, help="Seed of the simulated traffic.")
@click.option("--exit-when-done", is_flag=True, help="Stop the stack once the demo's aggregates are complete.")
@click.option("--kafka-port", type=int, help="The embedded broker's port (default: the last run's, while free).")
@click.option("--postgres-port", type=int, help="The embedded PostgreSQL's port (default: the last run's, while free).")
@click.option("--api-port", type=int, help="The API's port (default: the last run's, while free).")
@click.option("--new-keys", is_flag=True, help="New API keys (default: the last run's, or the ABFLOW_API_KEYS_* ones).")
@click.option("--broker", type=click.Choice(["embedded", "kafka"]), default="embedded", show_default=True,
              help="The local broker when ABFLOW_KAFKA_BOOTSTRAP is unset: the embedded one (in memory, starts in "
                   "a second) or Apache Kafka (fetched once from Maven Central; needs Java 17+ and Maven; keeps its "
                   "log on disk in $ABFLOW_HOME/kafka-data).")
def up(demo: bool, invocations: int, rate: float, seed: int, exit_when_done: bool, kafka_port: int | None,
       postgres_port: int | None, api_port: int | None, new_keys: bool, broker: str) -> None:
    """Start the stack (worker, API, weight refresher) and run the demo; Ctrl-C stops everything.

    Without ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL it starts an embedded
    Kafka-protocol broker and an embedded PostgreSQL whose data is kept in
    $ABFLOW_HOME (default: the nearest .abflow directory here or above, else
    ./.abflow). A restart keeps the ports and API keys of the last run, so
    shells that ran `eval "$(abflow env)"` keep working. The demo routes
    simulated users through the serving SDK on the live bandit weights and
    prints how they moved.
    """
    from abflow.local.run import LocalRun
    from abflow.local.stack import read_stack_file, stop_recorded_stack

    settings = load_settings(stack=False)
    if read_stack_file(settings.home) is not None:
        raise click.ClickException(f"a stack is already running from {settings.home} "
                                   "(see `abflow env`; stop it with `abflow down`)")
    leftovers = stop_recorded_stack(settings.home)  # of an `abflow up` that was killed
    if leftovers:
        click.echo(f"stopped leftovers of an earlier run: {', '.join(leftovers)}", err=True)
    run = LocalRun(settings, {"kafka": kafka_port, "postgres": postgres_port, "api": api_port}, new_keys, broker)

    def on_signal(signum, frame):  # noqa: ARG001 - SIGTERM (`abflow down`) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        run.start()
        if demo:
            run.run_demo(invocations, rate, seed)
        if not exit_when_done:
            click.echo("\nThe stack is running. Ctrl-C stops it. In another shell:")
            name = command_name()
            click.echo(f"  eval \"$({name} env)\"   # or: {name} totals, {name} experiment list")
            while True:
                run.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        run.stop()


@click.command()
def down() -> None:
    """Stop the stack that `abflow up` started."""
    from abflow.local.stack import STACK_FILE, stop_recorded_stack

    settings = load_settings(stack=False)
    if not (settings.home / STACK_FILE).exists():
        raise click.ClickException(f"no stack recorded in {settings.home / STACK_FILE}")
    stopped = stop_recorded_stack(settings.home)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@click.command()
def env() -> None:
    """Print the exports that point other shells and tools at the running stack.

    The running local stack's addresses and keys win over the environment's, so that
    `eval "$(abflow env)"` also mends a shell whose exports are left from an earlier run.
    """
    from abflow.local.stack import read_stack_file
    from abflow.settings import ApiKeys

    stack = read_stack_file(load_settings(stack=False).home)
    if stack is not None:
        addresses = {"ABFLOW_KAFKA_BOOTSTRAP": stack["kafka_bootstrap"], "ABFLOW_DATABASE_URL": stack["database_url"],
                     "ABFLOW_API_URL": stack.get("api_url"), **ApiKeys.from_dict(stack.get("api_keys") or {}).as_env()}
    else:
        settings = load_settings()  # the environment's, or the error that says how to start a stack
        addresses = {"ABFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "ABFLOW_DATABASE_URL": settings.database_url,
                     **settings.api_keys.as_env()}
    for name, value in addresses.items():
        if value:
            click.echo(f"export {name}={value}")


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply the migrations (up to REVISION, default: the newest)."""
    from storage.db import current_revision, upgrade

    settings = load_settings()
    upgrade(settings.require_database_url(), revision)
    click.echo(f"database at revision {current_revision(settings.require_database_url())}")


@db.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def db_prune(dry_run: bool) -> None:
    """Delete what is older than the retention: per-minute windows (ABFLOW_RETENTION_WINDOWS_DAYS,
    default 30), allocation history (ABFLOW_RETENTION_ALLOCATIONS_DAYS, default 90; each experiment
    keeps its latest weights), dead-letter counters (ABFLOW_RETENTION_DEAD_LETTERS_DAYS, default 30)
    and dedup ids past their horizon. 0 keeps a kind for ever. `abflow serve` runs this every hour."""
    from storage.db import connect
    from storage.retention import Retention, prune

    settings = load_settings()
    with connect(settings.require_database_url(), autocommit=False, connect_timeout=5) as conn:
        deleted = prune(conn, Retention.from_settings(settings), time.time(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for table, rows in deleted.items():
        click.echo(f"{table:<20} {verb} {rows:,} rows")


COMMANDS = (up, down, env, db)
