"""The UPS Task Manager's tables: workitems, ups_subscriptions, ups_events (node.workflow).

Revision ID: 0006
Revises: 0005
Created: 2026-12-05 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _now() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    # A database made by a build between releases may already hold them: create what is missing.
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "workitems" not in present:
        op.create_table(
            "workitems",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("sop_instance_uid", sa.String(64), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("transaction_uid", sa.String(64), nullable=False),
            sa.Column("dataset", sa.Text(), nullable=False),
            sa.Column("patient_id", sa.String(64), nullable=False),
            sa.Column("scheduled_start", sa.String(26), nullable=False),
            sa.Column("creator_ae", sa.String(16), nullable=False),
            sa.Column("performer_ae", sa.String(16), nullable=False),
            sa.Column("cancel_requested", sa.Boolean(), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            _now(),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        )
        op.create_index("ix_workitems_sop_instance_uid", "workitems", ["sop_instance_uid"], unique=True)
        op.create_index("ix_workitems_state", "workitems", ["state"])
        op.create_index("ix_workitems_patient_id", "workitems", ["patient_id"])
        op.create_index("ix_workitems_finished_at", "workitems", ["finished_at"])
    if "ups_subscriptions" not in present:
        op.create_table(
            "ups_subscriptions",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("ae_title", sa.String(16), nullable=False),
            sa.Column("workitem_uid", sa.String(64), nullable=False),
            sa.Column("deletion_lock", sa.Boolean(), nullable=False),
            sa.Column("filter", sa.Text(), nullable=False),
            _now(),
            sa.UniqueConstraint("ae_title", "workitem_uid", name="uq_ups_subscription"),
        )
        op.create_index("ix_ups_subscriptions_ae_title", "ups_subscriptions", ["ae_title"])
        op.create_index("ix_ups_subscriptions_workitem_uid", "ups_subscriptions", ["workitem_uid"])
    if "ups_events" not in present:
        op.create_table(
            "ups_events",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("subscriber_ae", sa.String(16), nullable=False),
            sa.Column("workitem_uid", sa.String(64), nullable=False),
            sa.Column("event_type", sa.Integer(), nullable=False),
            sa.Column("info", sa.Text(), nullable=False),
            sa.Column("state", sa.String(12), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=False),
            _now(),
            sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        )
        op.create_index("ix_ups_events_subscriber_ae", "ups_events", ["subscriber_ae"])
        op.create_index("ix_ups_events_state", "ups_events", ["state"])
        op.create_index("ix_ups_events_delivered_at", "ups_events", ["delivered_at"])


def downgrade() -> None:
    op.drop_table("ups_events")
    op.drop_table("ups_subscriptions")
    op.drop_table("workitems")
