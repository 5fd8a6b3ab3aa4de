"""workitems.job_id: the job that performs a workitem (the node's Task Performer, and the
workitem that mirrors every job the rules queue); unique, so a job has at most one workitem.

Revision ID: 0007
Revises: 0006
Created: 2026-12-05 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by a build between releases may already have the column: add it only when missing.
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("workitems")}
    if "job_id" in present:
        return
    with op.batch_alter_table("workitems", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_id", sa.Integer(), nullable=True))
        batch_op.create_index("ix_workitems_job_id", ["job_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("workitems", schema=None) as batch_op:
        batch_op.drop_index("ix_workitems_job_id")
        batch_op.drop_column("job_id")
