"""Layers for concurrent experiments, shadow-release aggregates, and the history of champions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Layers: an experiment holds the buckets [layer_start, layer_end) of its layer's hash space.
    # Before layers every experiment was alone in a layer of its own, holding all of it.
    op.add_column("experiments", sa.Column("layer", sa.String(128)))
    op.add_column("experiments", sa.Column("layer_start", sa.Integer, nullable=False, server_default="0"))
    op.add_column("experiments", sa.Column("layer_end", sa.Integer, nullable=False, server_default="10000"))
    # Versions: experiments of one lineage follow each other as champions are promoted.
    op.add_column("experiments", sa.Column("lineage", sa.String(128)))
    op.add_column("experiments", sa.Column("version", sa.Integer, nullable=False, server_default="1"))
    op.add_column("experiments", sa.Column("winner", sa.String(128)))  # served to everyone once promoted
    op.execute("UPDATE experiments SET layer = experiment_id, lineage = experiment_id")
    op.alter_column("experiments", "layer", nullable=False)
    op.alter_column("experiments", "lineage", nullable=False)
    op.create_index("experiments_layer", "experiments", ["layer"])

    op.create_table(
        "shadow_windows",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("variant", sa.String(128), primary_key=True),  # the shadow
        sa.Column("served_variant", sa.String(128), primary_key=True),  # whose answer was served
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("window_seconds", sa.Integer, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("compared", sa.BigInteger, nullable=False, server_default="0"),  # both answered
        sa.Column("agreements", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("errors", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("served_errors", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_ms_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("latency_hist", postgresql.ARRAY(sa.BigInteger), nullable=False),
        sa.Column("served_latency_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("served_latency_ms_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("served_latency_hist", postgresql.ARRAY(sa.BigInteger), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )

    op.create_table(
        "champions",
        sa.Column("lineage", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("experiment_id", sa.String(128), nullable=False),  # the version it is champion of
        sa.Column("variant", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256)),
        sa.Column("promoted_from", sa.String(128)),  # the experiment it won; None for a lineage's first
        sa.Column("promoted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("evidence", postgresql.JSONB, nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
    )
    # Every existing experiment starts its lineage with its declared champion.
    op.execute(
        "INSERT INTO champions (lineage, version, experiment_id, variant, model_version, actor, reason, evidence) "
        "SELECT e.experiment_id, 1, e.experiment_id, v.name, v.model_version, 'config', 'declared in the config', "
        "'{}'::jsonb FROM experiments e JOIN variants v ON v.experiment_id = e.experiment_id AND v.role = 'champion'"
    )


def downgrade() -> None:
    op.drop_table("champions")
    op.drop_table("shadow_windows")
    op.drop_index("experiments_layer", "experiments")
    for column in ("winner", "version", "lineage", "layer_end", "layer_start", "layer"):
        op.drop_column("experiments", column)
