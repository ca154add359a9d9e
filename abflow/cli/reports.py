"""What operators read: `abflow report`, `totals`, `dead-letters` and `weights`."""

from __future__ import annotations

import json

import click

from abflow.cli.common import database
from abflow.core.text import format_table


@click.command()
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
    from bandit_service.report.build import build_report
    from bandit_service.report.load import load_report_input
    from bandit_service.report.render import render_html, render_text

    with database() as engine:
        data = build_report(load_report_input(engine, experiment_id))
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


@click.command()
@click.option("-e", "--experiment", "experiment_id", help="Only this experiment.")
def totals(experiment_id: str | None) -> None:
    """Print variant_totals: exact per-variant sums over all windows."""
    from storage.queries import variant_totals
    from storage.registry import get_experiment

    with database() as engine:
        if experiment_id is not None:
            get_experiment(engine, experiment_id)  # an unknown id is an error, not an empty table
        rows = variant_totals(engine, experiment_id)
    click.echo(format_table(rows, ["experiment_id", "variant", "invocations", "conversions", "conversion_rate",
                                   "reward_sum", "errors", "mean_latency_ms"]))


@click.command("dead-letters")
def dead_letters() -> None:
    """Count dead letters per topic and reason."""
    from storage.queries import dead_letter_totals

    with database() as engine:
        rows = dead_letter_totals(engine)
    if not rows:
        click.echo("no dead letters")
        return
    click.echo(format_table(rows, ["topic", "reason", "count", "last_seen_at"]))


@click.command()
@click.argument("experiment_id")
@click.option("--history", default=10, show_default=True, help="How many versions to list, newest first.")
def weights(experiment_id: str, history: int) -> None:
    """Show an experiment's allocation weights and how they moved."""
    from storage.queries import allocation_history
    from storage.registry import get_experiment

    with database() as engine:
        get_experiment(engine, experiment_id)
        rows = allocation_history(engine, experiment_id, history)
    if not rows:
        raise click.ClickException(f"no allocation weights for {experiment_id!r} yet (is `abflow refresher` running?)")
    names = list(rows[0]["weights"])
    table = [{"version": r["version"], "phase": r["phase"], "computed_at": r["computed_at"].strftime("%H:%M:%S.%f")[:-3],
              **{n: r["weights"].get(n) for n in names}} for r in rows]
    click.echo(format_table(table, ["version", "phase", "computed_at", *names]))


COMMANDS = (report, totals, dead_letters, weights)
