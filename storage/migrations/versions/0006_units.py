"""Units: each unit's exposure and attributed sums, the outcomes that wait for an exposure, and
the attribution counters.

``unit_state`` holds, per (experiment, unit), the exposure (variant, time, propensity),
whether the unit was exposed to another variant too, and its attributed sums (of the stream's
own variables, and of the named values its events carried). The report groups
these rows by variant and allocation period of exposure for the units' moments. ``held_outcomes`` holds the
outcomes that arrived before their unit's exposure. ``attributed_totals`` adds the attributed
events up per variant (of exposure): what the bandits learn from. ``attribution_counts`` counts, per variant
and reason, the events that did not count as they claimed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unit_state",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("unit_id", sa.String(256), primary_key=True),
        sa.Column("variant", sa.String(128), nullable=False),
        sa.Column("exposed_at", sa.Float, nullable=False),  # epoch seconds
        sa.Column("propensity", sa.Float),
        sa.Column("multiple", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("invocations", sa.Float, nullable=False, server_default="0"),
        sa.Column("conversions", sa.Float, nullable=False, server_default="0"),
        sa.Column("reward", sa.Float, nullable=False, server_default="0"),
        sa.Column("errors", sa.Float, nullable=False, server_default="0"),
        # The sums of the named values the unit's events carried: {"revenue": 31.5, "tp": 4, …}.
        sa.Column("value_sums", postgresql.JSONB, nullable=False, server_default="{}"),
        # Room on each page, so that updating a unit's sums rewrites it in place (a HOT update).
        postgresql_with={"fillfactor": 75},
    )
    op.create_table(
        "held_outcomes",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("experiment_id", sa.String(128), nullable=False),
        sa.Column("unit_id", sa.String(256), nullable=False),
        sa.Column("variant", sa.String(128), nullable=False),  # as the outcome claimed
        sa.Column("ts", sa.Float, nullable=False),  # epoch seconds
        sa.Column("reward", sa.Float, nullable=False),
        sa.Column("vals", postgresql.JSONB),  # the outcome's named values
        sa.Column("attribution_seconds", sa.Float, nullable=False),
        sa.Column("held_at", sa.Float, nullable=False),  # epoch seconds
    )
    op.create_index("held_outcomes_unit", "held_outcomes", ["experiment_id", "unit_id"])
    # Adds two {name: number} objects key by key (a unit's value sums and a batch's).
    op.execute("""
        CREATE FUNCTION abflow_add_values(a jsonb, b jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
          SELECT coalesce(jsonb_object_agg(k, coalesce((a ->> k)::float8, 0) + coalesce((b ->> k)::float8, 0)), '{}')
          FROM (SELECT jsonb_object_keys(a) UNION SELECT jsonb_object_keys(b)) AS keys(k)
        $$""")
    op.create_table(
        "attributed_totals",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("variant", sa.String(128), primary_key=True),
        sa.Column("invocations", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("conversions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reward_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("reward_sq_sum", sa.Float, nullable=False, server_default="0"),
    )
    op.create_table(
        "attribution_counts",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("variant", sa.String(128), primary_key=True),
        sa.Column("reason", sa.String(32), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    for table in ("attribution_counts", "attributed_totals", "held_outcomes", "unit_state"):
        op.drop_table(table)
    op.execute("DROP FUNCTION abflow_add_values(jsonb, jsonb)")
