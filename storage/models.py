"""SQLAlchemy models of abflow's tables. The migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (Index("experiments_layer", "layer"),)

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    strategy: Mapped[str] = mapped_column(String(32))
    epsilon: Mapped[float] = mapped_column(Float, default=0.1)
    warmup: Mapped[int] = mapped_column(Integer, default=0)
    unit: Mapped[str] = mapped_column(String(16), default="user")
    min_weight: Mapped[float] = mapped_column(Float, default=0.0)
    reward_model: Mapped[str] = mapped_column(String(16), default="binary")
    status: Mapped[str] = mapped_column(String(16), default="running")
    config: Mapped[dict] = mapped_column(JSONB)
    # The buckets [layer_start, layer_end) of its layer's hash space that it holds (see abflow.core.buckets).
    layer: Mapped[str] = mapped_column(String(128))
    layer_start: Mapped[int] = mapped_column(Integer, default=0)
    layer_end: Mapped[int] = mapped_column(Integer, default=10_000)
    # Experiments of one lineage follow each other as champions are promoted; a promoted
    # experiment is stopped and serves its winner to everyone.
    lineage: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, default=1)
    winner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    variants: Mapped[list["Variant"]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", order_by="Variant.position"
    )


class Variant(Base):
    __tablename__ = "variants"
    __table_args__ = (
        ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
        CheckConstraint("initial_weight >= 0", name="variants_initial_weight_nonnegative"),
    )

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    initial_weight: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(256), nullable=True)
    role: Mapped[str] = mapped_column(String(16))

    experiment: Mapped[Experiment] = relationship(back_populates="variants")


class VariantWindow(Base):
    """Additive aggregates of one variant over one tumbling event-time window."""

    __tablename__ = "variant_windows"

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    window_seconds: Mapped[int] = mapped_column(Integer)
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    conversions: Mapped[int] = mapped_column(BigInteger, default=0)
    reward_sum: Mapped[float] = mapped_column(Float, default=0.0)
    reward_sq_sum: Mapped[float] = mapped_column(Float, default=0.0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_count: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    # Counts per bucket of abflow.core.windowing.LATENCY_BUCKET_EDGES_MS.
    latency_hist: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ShadowWindow(Base):
    """Additive aggregates of a shadow variant beside the variant that was served, per window."""

    __tablename__ = "shadow_windows"

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    served_variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    window_seconds: Mapped[int] = mapped_column(Integer)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    compared: Mapped[int] = mapped_column(BigInteger, default=0)  # both sides answered
    agreements: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    served_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    both_errors: Mapped[int] = mapped_column(BigInteger, default=0)  # requests on which both sides failed
    latency_count: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_hist: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    served_latency_count: Mapped[int] = mapped_column(BigInteger, default=0)
    served_latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    served_latency_hist: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SinkOffset(Base):
    """The next offset of each partition not yet applied to the aggregates."""

    __tablename__ = "sink_offsets"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The topic's id: a recreated topic (a broker that lost its logs) starts again at 0.
    topic_id: Mapped[str] = mapped_column(String(64))
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DedupBatch(Base):
    """The event ids counted in one sink batch of one partition, kept for the dedup horizon."""

    __tablename__ = "dedup_batches"
    __table_args__ = (Index("dedup_batches_partition_time", "topic", "partition", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(255))
    partition: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Newline-separated; event ids cannot contain control characters.
    event_ids: Mapped[str] = mapped_column(Text)


class DeadLetterCount(Base):
    __tablename__ = "dead_letter_counts"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StreamCounter(Base):
    """Per source topic: events counted, duplicates dropped, dead letters; exact like the aggregates."""

    __tablename__ = "stream_counters"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    counted: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    dead_letters: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AllocationVersion(Base):
    """Every change of an experiment's weights, with the statistics that produced it."""

    __tablename__ = "allocations"
    __table_args__ = (ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),)

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    strategy: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(32))  # "warmup" or the strategy that decided
    weights: Mapped[dict] = mapped_column(JSONB)
    statistics: Mapped[dict] = mapped_column(JSONB)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # False for a rollout's: serving places every unit by its hash, returning ones too (migration 0007).
    sticky: Mapped[bool] = mapped_column(Boolean, server_default="true")


class Assignment(Base):
    """The variant a unit (user or session) was first given, kept for the experiment's life."""

    __tablename__ = "assignments"
    __table_args__ = (ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),)

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    unit_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128))
    propensity: Mapped[float] = mapped_column(Float)
    allocation_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Rollout(Base):
    """The durable state of a progressive rollout (``bandit_service.rollouts.machine``)."""

    __tablename__ = "rollouts"
    __table_args__ = (ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),)

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[int] = mapped_column(Integer)
    stage_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    failed_checks: Mapped[int] = mapped_column(Integer, default=0)
    last_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_check: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RolloutTransition(Base):
    """Every change of a rollout's state or stage, with who made it, why, and the figures behind it."""

    __tablename__ = "rollout_transitions"
    __table_args__ = (
        ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
        Index("rollout_transitions_experiment", "experiment_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    from_stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_stage: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    figures: Mapped[dict] = mapped_column(JSONB)
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    notification: Mapped[str | None] = mapped_column(Text, nullable=True)


class Champion(Base):
    """Each lineage's champions in order: the declared one (version 1), then every promoted winner."""

    __tablename__ = "champions"
    __table_args__ = (ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),)

    lineage: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[str] = mapped_column(String(128))
    variant: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(256), nullable=True)
    promoted_from: Mapped[str | None] = mapped_column(String(128), nullable=True)
    promoted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict] = mapped_column(JSONB)


class UnitState(Base):
    """A unit's exposure to an experiment and its attributed sums (``storage.units``)."""

    __tablename__ = "unit_state"
    __table_args__ = {"postgresql_with": {"fillfactor": 75}}

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    unit_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128))
    exposed_at: Mapped[float] = mapped_column(Float)  # epoch seconds
    propensity: Mapped[float | None] = mapped_column(Float, nullable=True)
    multiple: Mapped[bool] = mapped_column(Boolean, default=False)
    invocations: Mapped[float] = mapped_column(Float, default=0.0)
    conversions: Mapped[float] = mapped_column(Float, default=0.0)
    reward: Mapped[float] = mapped_column(Float, default=0.0)
    errors: Mapped[float] = mapped_column(Float, default=0.0)
    value_sums: Mapped[dict] = mapped_column(JSONB, default=dict)


class StageUnit(Base):
    """A unit's events in one stage of a running rollout, for the stage's judgement (``storage.units``)."""

    __tablename__ = "stage_units"
    __table_args__ = {"postgresql_with": {"fillfactor": 75}}

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    stage_start: Mapped[float] = mapped_column(Float, primary_key=True)  # epoch seconds
    unit_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128))
    multiple: Mapped[bool] = mapped_column(Boolean, default=False)
    invocations: Mapped[float] = mapped_column(Float, default=0.0)
    conversions: Mapped[float] = mapped_column(Float, default=0.0)
    reward: Mapped[float] = mapped_column(Float, default=0.0)
    errors: Mapped[float] = mapped_column(Float, default=0.0)
    value_sums: Mapped[dict] = mapped_column(JSONB, default=dict)


class HeldOutcome(Base):
    """An outcome that arrived before its unit's exposure, waiting for it."""

    __tablename__ = "held_outcomes"
    __table_args__ = (Index("held_outcomes_unit", "experiment_id", "unit_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(String(128))
    unit_id: Mapped[str] = mapped_column(String(256))
    variant: Mapped[str] = mapped_column(String(128))
    ts: Mapped[float] = mapped_column(Float)
    reward: Mapped[float] = mapped_column(Float)
    vals: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    attribution_seconds: Mapped[float] = mapped_column(Float)
    held_at: Mapped[float] = mapped_column(Float)


class AttributedTotal(Base):
    """The attributed invocations and outcomes per experiment and variant of exposure (the bandits' input)."""

    __tablename__ = "attributed_totals"

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    conversions: Mapped[int] = mapped_column(BigInteger, default=0)
    reward_sum: Mapped[float] = mapped_column(Float, default=0.0)
    reward_sq_sum: Mapped[float] = mapped_column(Float, default=0.0)


class AttributionCount(Base):
    """Events that did not count as they claimed, per experiment, variant and reason."""

    __tablename__ = "attribution_counts"

    experiment_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
