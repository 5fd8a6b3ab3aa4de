"""studies.reopened_at (a reopened study's force-complete timer) and jobs.series_uids (the series a
study-level job selected): both nullable, NULL meaning "not recorded" for existing rows.

Revision ID: 0003
Revises: 0002
Created: 2026-12-05 00:05:42.331392
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database without a revision is stamped at 0001 (the release df2dddf); one made by a build
    # between releases may already have these columns: add only what is missing.
    present = {
        table: {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)} for table in ("jobs", "studies")
    }
    if "series_uids" not in present["jobs"]:
        with op.batch_alter_table("jobs", schema=None) as batch_op:
            batch_op.add_column(sa.Column("series_uids", sa.Text(), nullable=True))
    if "reopened_at" not in present["studies"]:
        with op.batch_alter_table("studies", schema=None) as batch_op:
            batch_op.add_column(sa.Column("reopened_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("reopened_at")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("series_uids")
