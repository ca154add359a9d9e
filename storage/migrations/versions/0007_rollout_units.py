"""Rollouts place every unit by its hash, and judge each stage on every unit it served.

A bandit's or an A/B test's allocation is *sticky*: a unit keeps the variant it was first
assigned while that variant has weight. A rollout's is not (``allocations.sticky``): each unit is
placed by its hash on the stage's weights, so a stage's share is the share of all units,
returning ones included, and a unit on the challenger at one stage stays there at the next (the
challenger's slice only grows).

``stage_units`` holds, per running rollout stage (keyed by its start) and unit, the variant the
stage served it and the sums of its events in the stage: what the stage is judged on, returning
units included (``unit_state`` keeps each unit in the variant of its first exposure, which a
rollout changes).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("allocations", sa.Column("sticky", sa.Boolean, nullable=False, server_default="true"))
    op.create_table(
        "stage_units",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("stage_start", sa.Float, primary_key=True),  # epoch seconds: rollouts.stage_started_at
        sa.Column("unit_id", sa.String(256), primary_key=True),
        sa.Column("variant", sa.String(128), nullable=False),  # of its latest invocation in the stage
        sa.Column("multiple", sa.Boolean, nullable=False, server_default="false"),  # claimed another one too
        sa.Column("invocations", sa.Float, nullable=False, server_default="0"),
        sa.Column("conversions", sa.Float, nullable=False, server_default="0"),
        sa.Column("reward", sa.Float, nullable=False, server_default="0"),
        sa.Column("errors", sa.Float, nullable=False, server_default="0"),
        sa.Column("value_sums", postgresql.JSONB, nullable=False, server_default="{}"),
        postgresql_with={"fillfactor": 75},
    )


def downgrade() -> None:
    op.drop_table("stage_units")
    op.drop_column("allocations", "sticky")
