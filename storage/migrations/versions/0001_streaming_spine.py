"""Experiment registry, window aggregates, sink offsets, dedup ids, dead-letter counts.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("epsilon", sa.Float, nullable=False),
        sa.Column("warmup", sa.Integer, nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", postgresql.JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "variants",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("initial_weight", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(256)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"], ondelete="CASCADE"),
        sa.CheckConstraint("initial_weight >= 0", name="variants_initial_weight_nonnegative"),
    )
    op.create_table(
        "variant_windows",
        sa.Column("experiment_id", sa.String(128), primary_key=True),
        sa.Column("variant", sa.String(128), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("window_seconds", sa.Integer, nullable=False),
        sa.Column("invocations", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("conversions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reward_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("reward_sq_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("errors", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_ms_sum", sa.Float, nullable=False, server_default="0"),
        sa.Column("latency_hist", postgresql.ARRAY(sa.BigInteger), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "sink_offsets",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("topic_id", sa.String(64), nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "dedup_batches",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("event_ids", sa.Text, nullable=False),
    )
    op.create_index("dedup_batches_partition_time", "dedup_batches", ["topic", "partition", "created_at"])
    op.create_table(
        "dead_letter_counts",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "stream_counters",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("counted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("dead_letters", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    # Element-wise sum of two histograms, for the additive upsert of latency_hist.
    op.execute(
        """
        CREATE FUNCTION abflow_add_counts(a bigint[], b bigint[]) RETURNS bigint[]
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT coalesce(array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i), '{}')
            FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i)
        $$
        """
    )
    op.execute(
        """
        CREATE AGGREGATE abflow_sum_counts(bigint[]) (SFUNC = abflow_add_counts, STYPE = bigint[], INITCOND = '{}')
        """
    )
    op.execute(
        """
        CREATE VIEW variant_totals AS
        SELECT experiment_id, variant,
               sum(invocations)::bigint AS invocations,
               sum(conversions)::bigint AS conversions,
               sum(reward_sum) AS reward_sum,
               sum(reward_sq_sum) AS reward_sq_sum,
               sum(errors)::bigint AS errors,
               sum(latency_count)::bigint AS latency_count,
               sum(latency_ms_sum) AS latency_ms_sum,
               abflow_sum_counts(latency_hist) AS latency_hist,
               min(window_start) AS first_window,
               max(window_start) AS last_window
        FROM variant_windows
        GROUP BY experiment_id, variant
        """
    )
    op.execute(
        """
        CREATE VIEW dead_letter_totals AS
        SELECT reason, sum(count)::bigint AS count, max(last_seen_at) AS last_seen_at
        FROM dead_letter_counts GROUP BY reason
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW dead_letter_totals")
    op.execute("DROP VIEW variant_totals")
    op.execute("DROP AGGREGATE abflow_sum_counts(bigint[])")
    op.execute("DROP FUNCTION abflow_add_counts(bigint[], bigint[])")
    for table in ["stream_counters", "dead_letter_counts", "dedup_batches", "sink_offsets", "variant_windows", "variants", "experiments"]:
        op.drop_table(table)
