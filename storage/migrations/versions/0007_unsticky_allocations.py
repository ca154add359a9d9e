"""Allocations say whether serving keeps units where they were first put.

A bandit's or an A/B test's allocation is *sticky*: a unit keeps the variant it was first
assigned while that variant has weight. A rollout's is not: each unit is placed by its hash on
the stage's weights, so a stage's share is the share of all units, returning ones included, and
a unit on the challenger at one stage stays there at the next (the challenger's slice only grows).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("allocations", sa.Column("sticky", sa.Boolean, nullable=False, server_default="true"))


def downgrade() -> None:
    op.drop_column("allocations", "sticky")
