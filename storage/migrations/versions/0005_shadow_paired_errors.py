"""Shadow windows count the requests on which both sides failed, for paired error comparisons.

With both sides' error counts and this one, the report has the whole 2×2 table of
(shadow failed, served failed) per request: what McNemar's test and a paired
interval need. Windows written before this revision count 0 here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shadow_windows", sa.Column("both_errors", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("shadow_windows", "both_errors")
