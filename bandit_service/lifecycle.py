"""Champion / challenger lifecycle: pause, resume and stop an experiment; promote a winning
challenger to champion.

A status change is also a new allocation version with the same weights, so that serving processes
that follow the allocations topic (the SDK) learn it as the API does: paused, units already placed
keep their variant and new ones get the champion outside the experiment; stopped, every unit gets
the champion (or the promoted winner) outside it, and its share of the layer is free for another.

Promotion, in one transaction:
- the experiment stops and from then on serves the winner to every unit (API: the
  ``winner`` column; SDK: a last allocation with the winner at weight 1, phase "promoted");
- the lineage's champions history gains a row with the evidence behind it;
- the next version ``<lineage>-v<N>`` is created with the winner as champion and the
  challengers that remain (and any new ones), in the same share of the same layer, so
  services move to it when they are ready. With no challenger left there is no next
  version: the promoted experiment serves the champion until one is created.

The evidence must be a finished rollout of that challenger or a SHIP decision for it
from the report; ``force`` promotes without it (the reason is stored).
"""

from __future__ import annotations

from sqlalchemy import Engine, func
from sqlalchemy.orm import Session

from abflow.core.config import ExperimentConfig, parse_config
from abflow.core.errors import Conflict, ExperimentNotFound
from bandit_service.allocations import publish_allocation
from bandit_service.assignment import current_weights
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from bandit_service.rollouts.machine import COMPLETED
from bandit_service.stats.decision import SHIP
from producers.publisher import Publisher
from storage.allocations import latest_allocation
from storage.models import Experiment
from storage.queries import notify_aggregates, rollout_state
from storage.registry import (
    add_champion,
    champion_history,
    get_experiment,
    lock_experiment,
    new_experiment,
    next_status,
)

__all__ = ["PromotionRefused", "champion_history", "change_status", "evidence_for", "next_version_config", "promote"]

PROMOTED_PHASE = "promoted"
STATUS_PHASES = {"pause": "paused", "resume": "resumed", "stop": "stopped"}


def change_status(engine: Engine, publisher: Publisher, topic: str, experiment_id: str, action: str) -> Experiment:
    """Pause, resume or stop (``storage.registry.next_status``; row-locked, so concurrent changes
    serialise) and publish the status with the weights in force; ``Conflict`` when the status refuses."""
    with Session(engine) as session:
        experiment = lock_experiment(session, experiment_id)
        if experiment is None:
            raise ExperimentNotFound(experiment_id)
        experiment.status = next_status(experiment_id, experiment.status, action)
        experiment.updated_at = func.now()
        session.flush()
        conn = session.connection().connection.driver_connection
        weights, _ = current_weights(conn, experiment_id)
        latest = latest_allocation(conn, experiment_id)
        publish_allocation(conn, publisher, topic, experiment_id, experiment.strategy, STATUS_PHASES[action], weights,
                           {"status": experiment.status}, sticky=latest is None or latest[3])
        session.commit()
    return get_experiment(engine, experiment_id)


class PromotionRefused(Conflict):
    """The promotion is not allowed (no evidence, not a challenger, already promoted)."""


def next_version_config(config: ExperimentConfig, winner: str, experiment_id: str,
                        new_challengers: dict[str, str | None], keep_rollout: bool = True) -> ExperimentConfig | None:
    """The next version's config: the winner as champion, the other challengers and the new ones
    (name → model version). None when that leaves no challenger. A rollout plan carries over
    (unless ``keep_rollout`` is false): the next version's one challenger starts as a canary at the
    plan's first stage, never at an equal share."""
    data = config.to_dict()
    plan = data.pop("rollout", None)
    variants = []
    for variant in data["variants"]:
        if variant["name"] == winner:
            variants.insert(0, {**variant, "role": "champion"})
        elif variant["role"] == "challenger":
            variants.append(variant)
    variants += [{"name": name, "model_version": model_version, "role": "challenger"}
                 for name, model_version in new_challengers.items()]
    if len(variants) < 2:
        return None
    if plan is not None and keep_rollout:
        if len(variants) != 2:
            raise PromotionRefused(
                f"{config.experiment_id!r} has a rollout plan, which takes one challenger, but the next version would "
                f"have {len(variants) - 1} ({', '.join(v['name'] for v in variants[1:])}): promote with one new "
                "challenger, or without the plan (--no-rollout; the API's \"rollout\": false)")
        first = plan["stages"][0] / 100.0
        variants[0]["initial_weight"], variants[1]["initial_weight"] = 1.0 - first, first
        data["rollout"] = {**plan, "challenger": variants[1]["name"]}
        return parse_config({**data, "experiment_id": experiment_id, "variants": variants})
    for variant in variants:  # equal shares to start with, as a fresh experiment would
        variant["initial_weight"] = 1.0 / len(variants)
    return parse_config({**data, "experiment_id": experiment_id, "variants": variants})


def evidence_for(engine: Engine, config: ExperimentConfig, variant: str) -> dict | None:
    """Why ``variant`` may be promoted: a completed rollout of it, or the report's SHIP for it."""
    state = rollout_state(engine, config.experiment_id)
    if state == COMPLETED and config.rollout is not None and config.rollout.challenger == variant:
        return {"source": "rollout", "state": state}
    decision = build_report(load_report_input(engine, config.experiment_id))["decision"]
    if decision["verdict"] == SHIP and decision["variant"] == variant:
        return {"source": "decision", **decision}
    return None


def promote(engine: Engine, publisher: Publisher, topic: str, experiment_id: str, variant: str,
            new_challengers: dict[str, str | None] | None = None, actor: str = "operator",
            reason: str | None = None, force: bool = False, keep_rollout: bool = True) -> dict:
    """Promote ``variant`` of ``experiment_id`` to champion (see the module's notes); returns what was done."""
    new_challengers = new_challengers or {}
    with Session(engine) as session:
        experiment = lock_experiment(session, experiment_id)
        if experiment is None:
            raise ExperimentNotFound(experiment_id)
        config = parse_config(experiment.config)
        if experiment.winner is not None:
            raise PromotionRefused(f"{experiment_id!r} already promoted {experiment.winner!r}")
        roles = {v.name: v.role for v in config.variants}
        if roles.get(variant) != "challenger":
            raise PromotionRefused(f"{variant!r} is not a challenger of {experiment_id!r} "
                                   f"(challengers: {', '.join(n for n, r in roles.items() if r == 'challenger')})")
        clash = sorted(set(new_challengers) & set(roles))
        if clash:
            raise PromotionRefused(f"new challengers must have new names; already variants: {', '.join(clash)}")
        evidence = evidence_for(engine, config, variant)
        if evidence is None:
            if not force:
                raise PromotionRefused(
                    f"no evidence that {variant!r} won: its rollout has not completed and the report does not say "
                    f"SHIP for it (see `abflow report {experiment_id}`); force it with a reason if you must")
            evidence = {"source": "forced"}
        lineage, version = experiment.lineage, experiment.version + 1
        next_id = f"{lineage}-v{version}"
        next_config = next_version_config(config, variant, next_id, new_challengers, keep_rollout)

        experiment.status, experiment.winner = "stopped", variant
        session.flush()  # frees its share of the layer for the next version
        if next_config is not None:
            new_experiment(session, next_config, lineage=lineage, version=version,
                           prefer=(experiment.layer_start, experiment.layer_end))
            session.flush()
        model_version = next(v.model_version for v in config.variants if v.name == variant)
        add_champion(session, lineage=lineage, version=version,
                     experiment_id=next_id if next_config is not None else experiment_id,
                     variant=variant, model_version=model_version, promoted_from=experiment_id, actor=actor,
                     reason=reason or f"promoted by the {actor}", evidence=evidence)
        # The promoted experiment's last weights: the winner for everyone, on the same channel as ever.
        conn = session.connection().connection.driver_connection
        weights = {v.name: 1.0 if v.name == variant else 0.0 for v in config.variants}
        allocation = publish_allocation(conn, publisher, topic, experiment_id, config.strategy, PROMOTED_PHASE,
                                        weights, {"promoted": variant})
        if next_config is not None:
            notify_aggregates(conn, next_id)
        session.commit()
    return {"experiment_id": experiment_id, "champion": variant, "model_version": model_version,
            "lineage": lineage, "version": version, "allocation_version": allocation,
            "next_experiment_id": next_id if next_config is not None else None,
            "next_variants": [v.name for v in next_config.variants] if next_config is not None else [],
            "next_rollout": next_config.to_dict()["rollout"] if next_config is not None and next_config.rollout
            else None,
            "evidence": evidence}
