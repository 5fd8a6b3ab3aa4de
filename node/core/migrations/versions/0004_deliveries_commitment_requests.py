"""deliveries.commitment_requested_at and commitment_requests

Revision ID: 0004
Revises: 0003
Created: 2026-12-05 00:32:00.916580
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("commitment_requests", sa.Integer(), server_default="0", nullable=False))
    # Commitments already waiting were asked once, right after delivery: the timeout applies to them too.
    op.execute(
        "UPDATE deliveries SET commitment_requested_at = delivered_at, commitment_requests = 1 "
        "WHERE commitment = 'requested'"
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("commitment_requests")
        batch_op.drop_column("commitment_requested_at")
