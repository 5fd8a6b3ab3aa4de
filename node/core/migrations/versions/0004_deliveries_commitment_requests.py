"""deliveries.commitment_requested_at and commitment_requests: when the last Storage Commitment
request was sent and how many were sent (the commitment timeout asks again, then fails).

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
    # A database without a revision is stamped at 0001; one made by a build between releases may
    # already have these columns: add only what is missing (as 0003 does).
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("deliveries")}
    if {"commitment_requested_at", "commitment_requests"} <= present:
        return
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        if "commitment_requested_at" not in present:
            batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(timezone=True), nullable=True))
        if "commitment_requests" not in present:
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
