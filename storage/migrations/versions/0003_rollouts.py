"""Progressive rollouts: their durable state and every transition, with its reason and figures.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("stage_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failed_checks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_check_at", sa.DateTime(timezone=True)),
        sa.Column("last_check", postgresql.JSONB),  # the figures of the newest check
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
    )
    op.create_table(
        "rollout_transitions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(32), nullable=False),  # controller, operator, or the webhook gate
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("from_stage", sa.Integer),
        sa.Column("to_stage", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("figures", postgresql.JSONB, nullable=False),
        # The webhook: when it was delivered (or given up on), and how it went.
        sa.Column("notified_at", sa.DateTime(timezone=True)),
        sa.Column("notification", sa.Text),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
    )
    op.create_index("rollout_transitions_experiment", "rollout_transitions", ["experiment_id", "id"])


def downgrade() -> None:
    op.drop_table("rollout_transitions")
    op.drop_table("rollouts")
