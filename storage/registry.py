"""The experiment registry in PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from storage.experiment_config import ExperimentConfig
from storage.models import Experiment, Variant
from storage.queries import AGGREGATES_CHANNEL


class ExperimentExists(ValueError):
    pass


class ExperimentNotFound(LookupError):
    pass


def create_experiment(engine: Engine, config: ExperimentConfig) -> Experiment:
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
    with Session(engine, expire_on_commit=False) as session:
        session.add(experiment)
        try:
            # Tell the weight refresher (on commit), so the first weights exist right away.
            session.execute(select(func.pg_notify(AGGREGATES_CHANNEL, config.experiment_id)))
            session.commit()
        except IntegrityError:
            raise ExperimentExists(f"experiment {config.experiment_id!r} already exists") from None
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
        raise ExperimentNotFound(f"no experiment {experiment_id!r}")
    return experiment
