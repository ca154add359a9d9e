"""`abflow experiment …`: the registry (create, list, show), status changes (pause, resume, stop)
and champion promotion."""

from __future__ import annotations

import json
from pathlib import Path

import click

from abflow.cli.common import database, json_option, load_settings
from abflow.core.text import format_table


@click.group()
def experiment() -> None:
    """The experiment registry."""


@experiment.command("create")
@click.option("-f", "--file", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Experiment config, JSON or YAML.")
@click.option("--id", "experiment_id", help="Register it under this id instead of the file's experiment_id.")
def experiment_create(path: Path, experiment_id: str | None) -> None:
    """Register an experiment from a config file."""
    from abflow.core.buckets import LAYER_BUCKETS
    from abflow.core.config import ConfigError, load_config_text, parse_config
    from storage.registry import create_experiment

    try:
        config = load_config_text(path.read_text(), path.name)
        if experiment_id is not None:
            config = parse_config({**config.to_dict(), "experiment_id": experiment_id})
    except ConfigError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    with database() as engine:
        created = create_experiment(engine, config)
    # What it will serve first: a rollout starts at its first stage, not at the initial weights.
    weights, served = config.normalised_weights, ""
    if config.rollout is not None:
        from bandit_service.rollouts.machine import RUNNING, stage_weights

        weights = stage_weights(config, RUNNING, 0)
        served = f" (the rollout's first stage, {config.rollout.stages[0]:g} %)"
    click.echo(f"created experiment {config.experiment_id!r} with variants "
               + ", ".join(f"{v.name} ({v.role}, weight {weights[v.name]:.3g})" for v in config.variants) + served)
    if config.layer is not None or config.traffic < 1:
        click.echo(f"layer {created.layer!r}: buckets {created.layer_start}-{created.layer_end} "
                   f"({(created.layer_end - created.layer_start) / LAYER_BUCKETS:.1%} of its units)")


@experiment.command("list")
def experiment_list() -> None:
    """List experiments."""
    from storage.registry import list_experiments

    with database() as engine:
        rows = [
            {"experiment_id": e.experiment_id, "strategy": e.strategy, "status": e.status,
             "variants": ", ".join(v.name for v in e.variants), "created_at": e.created_at.strftime("%Y-%m-%d %H:%M:%S")}
            for e in list_experiments(engine)
        ]
    if not rows:
        click.echo("no experiments yet; create one with `abflow experiment create -f FILE`")
        return
    click.echo(format_table(rows, ["experiment_id", "strategy", "status", "variants", "created_at"]))


@experiment.command("show")
@click.argument("experiment_id")
@json_option()
def experiment_show(experiment_id: str, as_json: bool) -> None:
    """Show one experiment: its whole config, its layer share, the weights in force, and each
    variant's totals."""
    import yaml

    from abflow.core.config import parse_config
    from storage.queries import allocation_history, variant_totals
    from storage.registry import get_experiment

    with database() as engine:
        e = get_experiment(engine, experiment_id)
        totals = {row["variant"]: row for row in variant_totals(engine, experiment_id)}
        newest = allocation_history(engine, experiment_id, 1)
    weights = None
    if newest:
        weights = {"version": newest[0]["version"], "phase": newest[0]["phase"], "weights": newest[0]["weights"],
                   "computed_at": newest[0]["computed_at"].isoformat()}
    variants = []
    for v in e.variants:
        t = totals.get(v.name, {})
        variants.append({"variant": v.name, "role": v.role, "initial_weight": v.initial_weight,
                         "model_version": v.model_version, "invocations": t.get("invocations", 0),
                         "conversions": t.get("conversions", 0), "reward_sum": t.get("reward_sum", 0.0),
                         "errors": t.get("errors", 0)})
    layer = {"name": e.layer, "buckets": [e.layer_start, e.layer_end]}
    if as_json:
        click.echo(json.dumps({"experiment_id": e.experiment_id, "strategy": e.strategy, "epsilon": e.epsilon,
                               "warmup": e.warmup, "unit": e.unit, "status": e.status, "winner": e.winner,
                               "lineage": e.lineage, "version": e.version, "layer": layer,
                               "created_at": e.created_at.isoformat(), "weights": weights, "variants": variants,
                               "config": e.config}, indent=2))
        return
    click.echo(f"experiment {e.experiment_id}  status {e.status}" + (f" (promoted {e.winner})" if e.winner else "")
               + f"  lineage {e.lineage} version {e.version}  layer {e.layer} buckets [{e.layer_start}, "
               f"{e.layer_end})  created {e.created_at:%Y-%m-%d %H:%M:%S}")
    if weights is None:
        click.echo("weights: the initial ones (no allocation yet)")
    else:
        click.echo(f"weights (version {weights['version']}, {weights['phase']}, {weights['computed_at'][:19]}): "
                   + ", ".join(f"{k} {v:.1%}" for k, v in weights["weights"].items()))
    click.echo(format_table(variants, ["variant", "role", "initial_weight", "model_version", "invocations",
                                       "conversions", "reward_sum", "errors"]))
    # In the config's own order (PostgreSQL's jsonb keeps its keys sorted by length).
    click.echo("\nconfig:\n" + yaml.safe_dump(parse_config(e.config).to_dict(), sort_keys=False).rstrip())


def _status_command(action: str, summary: str) -> None:
    @experiment.command(action, help=summary)
    @click.argument("experiment_id", metavar="EXPERIMENT")
    def command(experiment_id: str) -> None:
        from bandit_service.lifecycle import change_status
        from producers.publisher import Publisher, ensure_topics

        settings = load_settings()
        # The allocations topic may not exist yet on a broker that does not create topics by itself.
        ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
        with database(settings) as engine, Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
            changed = change_status(engine, publisher, settings.topics.allocations, experiment_id, action)
        click.echo(f"experiment {experiment_id!r} is {changed.status}")


_status_command("pause", "Pause: assigned units keep their variant, new units get the champion (unstored).")
_status_command("resume", "Resume a paused experiment.")
_status_command("stop", "Stop: everyone gets the champion (or the promoted winner); frees its share of its layer.")


@experiment.command("promote")
@click.argument("experiment_id", metavar="EXPERIMENT")
@click.argument("variant")
@click.option("--challenger", "challengers", multiple=True, metavar="NAME[=MODEL_VERSION]",
              help="A new challenger for the next version (repeatable).")
@click.option("--reason", help="Why; stored in the champions history.")
@click.option("--force", is_flag=True, help="Promote without a completed rollout or a SHIP decision for VARIANT.")
@click.option("--no-rollout", "no_rollout", is_flag=True,
              help="Start the next version without EXPERIMENT's rollout plan (default: its challenger is a canary).")
@json_option("Print the result as JSON.")
def experiment_promote(experiment_id: str, variant: str, challengers: tuple[str, ...], reason: str | None,
                       force: bool, no_rollout: bool, as_json: bool) -> None:
    """Make VARIANT, a challenger that won, the champion of EXPERIMENT's lineage.

    Needs evidence: a completed rollout of VARIANT, or a SHIP decision for it in
    `abflow report` (or --force with a --reason). EXPERIMENT stops and serves
    VARIANT to everyone; the next version `<lineage>-v<N>` starts with VARIANT as
    champion, the other challengers and any --challenger, in the same share of
    the same layer. When EXPERIMENT had a rollout plan, the next version keeps it:
    its one challenger starts as a canary at the first stage (--no-rollout: an
    ordinary experiment at equal shares). `abflow experiment champions` lists the
    lineage's history.
    """
    from bandit_service.lifecycle import promote
    from producers.publisher import Publisher, ensure_topics

    new = {}
    for item in challengers:
        name, _, model_version = item.partition("=")
        new[name] = model_version or None
    settings = load_settings()
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    with database(settings) as engine, Publisher(settings.require_kafka_bootstrap(), settings.topics) as publisher:
        result = promote(engine, publisher, settings.topics.allocations, experiment_id, variant, new,
                         "operator", reason, force, keep_rollout=not no_rollout)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"{variant} is champion {result['version']} of lineage {result['lineage']!r} "
               f"(evidence: {result['evidence']['source']}); {experiment_id} is stopped and serves it to everyone")
    if result["next_experiment_id"]:
        click.echo(f"next version: {result['next_experiment_id']} with {', '.join(result['next_variants'])}")
        plan = result["next_rollout"]
        if plan:
            click.echo(f"  a canary of {plan['challenger']}: stages {', '.join(f'{p:g}%' for p in plan['stages'])} "
                       "(--no-rollout to start it at equal shares instead)")
    else:
        click.echo("no challenger left, so no next version; add challengers with --challenger next time")


@experiment.command("champions")
@click.argument("experiment_id", metavar="EXPERIMENT")
@json_option()
def experiment_champions(experiment_id: str, as_json: bool) -> None:
    """The champions of EXPERIMENT's lineage, first to newest, with who promoted them and why."""
    from bandit_service.lifecycle import champion_history
    from storage.registry import get_experiment

    with database() as engine:
        lineage = get_experiment(engine, experiment_id).lineage
        history = champion_history(engine, lineage)
    if as_json:
        click.echo(json.dumps(history, indent=2, default=str))
        return
    rows = [{"version": c["version"], "champion": c["variant"], "model_version": c["model_version"] or "",
             "experiment": c["experiment_id"], "won in": c["promoted_from"] or "", "evidence": c["evidence"].get("source", ""),
             "at": c["promoted_at"][:19].replace("T", " "), "reason": c["reason"]} for c in history]
    click.echo(f"lineage {lineage}")
    click.echo(format_table(rows, list(rows[0])))


COMMANDS = (experiment,)
