"""`abflow simulate`: publish simulated traffic for a registered experiment, with chaos and shadows."""

from __future__ import annotations

import click

from abflow.cli.common import database, load_settings
from abflow.core.errors import ExperimentNotFound
from abflow.core.text import format_table


@click.command()
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
    from abflow.core.config import parse_config
    from producers.publisher import Publisher
    from producers.sdk import ServingClient
    from producers.simulator import Scenario, VariantProfile, default_rates, parse_fault, parse_shadow, run
    from storage.registry import get_experiment

    settings = load_settings()
    with database(settings) as engine:
        try:
            e = get_experiment(engine, experiment_id)
        except ExperimentNotFound as exc:
            raise ExperimentNotFound(experiment_id, "register it with `abflow experiment create -f FILE`") from exc
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


COMMANDS = (simulate,)
