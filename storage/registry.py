"""The experiment registry in PostgreSQL: create, read, and the status state machine."""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from abflow.core.buckets import LAYER_BUCKETS, free_range, layer_size
from abflow.core.config import ExperimentConfig
from abflow.core.errors import Conflict, ExperimentExists, ExperimentNotFound
from storage.models import Champion, Experiment, Variant
from storage.queries import AGGREGATES_CHANNEL


class LayerFull(Conflict):
    """The experiment's share of its layer does not fit beside the running experiments there."""


def claim_buckets(session: Session, layer: str, traffic: float, prefer: tuple[int, int] | None = None
                  ) -> tuple[int, int]:
    """A free range of the layer's buckets for an experiment taking ``traffic`` of its units.

    Takes the layer's transaction lock, so two experiments created at once never get
    overlapping ranges. Stopped experiments no longer hold their buckets.
    """
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"abflow.layer.{layer}"))))
    taken = [(start, end) for start, end in session.execute(
        select(Experiment.layer_start, Experiment.layer_end)
        .where(Experiment.layer == layer, Experiment.status != "stopped"))]
    size = layer_size(traffic)
    found = free_range(taken, size, prefer)
    if found is None:
        free = LAYER_BUCKETS - sum(end - start for start, end in taken)
        raise LayerFull(f"layer {layer!r} has no free run of {size / LAYER_BUCKETS:.1%} of its units "
                        f"({free / LAYER_BUCKETS:.1%} free in all); stop an experiment there or lower 'traffic'")
    return found


def new_experiment(session: Session, config: ExperimentConfig, lineage: str | None = None, version: int = 1,
                   prefer: tuple[int, int] | None = None) -> Experiment:
    """Add the experiment to the session, holding its share of its layer."""
    if session.get(Experiment, config.experiment_id) is not None:
        raise ExperimentExists(config.experiment_id)
    layer = config.layer or config.experiment_id
    start, end = claim_buckets(session, layer, config.traffic, prefer)
    experiment = Experiment(
        experiment_id=config.experiment_id,
        strategy=config.strategy,
        epsilon=config.epsilon,
        warmup=config.warmup,
        unit=config.unit,
        min_weight=config.min_weight,
        reward_model=config.reward_model,
        status="running",
        config=config.to_dict(),
        layer=layer,
        layer_start=start,
        layer_end=end,
        lineage=lineage or config.experiment_id,
        version=version,
        variants=[
            Variant(
                name=v.name,
                position=i,
                initial_weight=v.initial_weight,
                model_version=v.model_version,
                role=v.role,
            )
            for i, v in enumerate(config.variants)
        ],
    )
    session.add(experiment)
    return experiment


def create_experiment(engine: Engine, config: ExperimentConfig) -> Experiment:
    """Register a new experiment; its declared champion starts the champions history of its lineage."""
    with Session(engine, expire_on_commit=False) as session:
        experiment = new_experiment(session, config)
        champion = next(v for v in config.variants if v.role == "champion")
        try:
            session.flush()  # the experiment first: the champions row refers to it
            session.add(Champion(lineage=config.experiment_id, version=1, experiment_id=config.experiment_id,
                                 variant=champion.name, model_version=champion.model_version, actor="config",
                                 reason="declared in the config", evidence={}))
            # Tell the weight refresher (on commit), so the first weights exist right away.
            session.execute(select(func.pg_notify(AGGREGATES_CHANNEL, config.experiment_id)))
            session.commit()
        except IntegrityError:
            raise ExperimentExists(config.experiment_id) from None
        session.refresh(experiment, ["variants"])
    return experiment


def list_experiments(engine: Engine) -> list[Experiment]:
    with Session(engine) as session:
        query = select(Experiment).options(selectinload(Experiment.variants)).order_by(Experiment.created_at)
        return list(session.scalars(query))


def get_experiment(engine: Engine, experiment_id: str) -> Experiment:
    with Session(engine) as session:
        query = (
            select(Experiment)
            .options(selectinload(Experiment.variants))
            .where(Experiment.experiment_id == experiment_id)
        )
        experiment = session.scalars(query).first()
    if experiment is None:
        raise ExperimentNotFound(experiment_id)
    return experiment


# action -> (the status it needs, None for any; the status it leads to)
STATUS_CHANGES = {"pause": ("running", "paused"), "resume": ("paused", "running"), "stop": (None, "stopped")}


def next_status(experiment_id: str, status: str, action: str) -> str:
    """The status ``action`` leads to from ``status``; ``Conflict`` when the status refuses it."""
    required, target = STATUS_CHANGES[action]
    if status == "stopped" and target != "stopped":
        raise Conflict(f"experiment {experiment_id!r} is stopped; it cannot {action}")
    if required is not None and status != required:
        raise Conflict(f"experiment {experiment_id!r} is {status}; {action} needs {required}")
    return target


def lock_experiment(session: Session, experiment_id: str) -> Experiment | None:
    """The experiment, row-locked until the session's transaction ends; None when there is none."""
    return session.scalars(select(Experiment).where(Experiment.experiment_id == experiment_id)
                           .with_for_update()).first()


def add_champion(session: Session, **fields) -> None:
    """Add a row to the champions history of a lineage (flushed, so it is in the transaction)."""
    session.add(Champion(**fields))
    session.flush()


def champion_history(engine: Engine, lineage: str) -> list[dict]:
    """The lineage's champions, first to newest."""
    with Session(engine) as session:
        rows = session.scalars(select(Champion).where(Champion.lineage == lineage).order_by(Champion.version))
        return [{"lineage": c.lineage, "version": c.version, "experiment_id": c.experiment_id, "variant": c.variant,
                 "model_version": c.model_version, "promoted_from": c.promoted_from,
                 "promoted_at": c.promoted_at.isoformat(), "actor": c.actor, "reason": c.reason,
                 "evidence": c.evidence} for c in rows]
