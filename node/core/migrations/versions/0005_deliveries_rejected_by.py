"""deliveries.rejected_by: the IHE IOCM rejection note that withdrew a delivered result at its
destination after a re-run superseded it ("" while the result stands).

Revision ID: 0005
Revises: 0004
Created: 2026-12-05 03:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database without a revision is stamped at 0001; one made by a build between releases may
    # already have the column: add it only when missing (as 0003 and 0004 do).
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("deliveries")}
    if "rejected_by" in present:
        return
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rejected_by", sa.String(length=64), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("rejected_by")
