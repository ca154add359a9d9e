"""Allocation weights history, sticky assignments, and the policy settings of experiments.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("experiments", sa.Column("min_weight", sa.Float, nullable=False, server_default="0"))
    op.add_column("experiments", sa.Column("reward_model", sa.String(16), nullable=False, server_default="binary"))
    op.create_table(
        "allocations",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("weights", postgresql.JSONB, nullable=False),
        sa.Column("statistics", postgresql.JSONB, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
    )
    op.create_table(
        "assignments",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("unit_id", sa.String(256), primary_key=True),
        sa.Column("variant", sa.String(128), nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("allocation_version", sa.Integer),
        sa.Column("assigned_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("assignments")
    op.drop_table("allocations")
    op.drop_column("experiments", "reward_model")
    op.drop_column("experiments", "min_weight")
