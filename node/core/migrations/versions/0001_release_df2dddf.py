"""The schema of the previous release (commit df2dddf), as its create_all made it.

Rendered by Alembic's autogenerate from that release's tables against an empty database. A
database made by that release (or an older one) has no ``alembic_version`` table: ``init_db``
stamps it at this revision after checking that its tables are there, and upgrades it from here.

Revision ID: 0001
Revises:
Created: 2026-11-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The tables of this revision: a database that has them but no alembic_version table was made
# by create_all (this release or an older one), and is stamped here.
TABLES = (
    "patients",
    "studies",
    "series",
    "instances",
    "series_expectations",
    "mpps_steps",
    "jobs",
    "deliveries",
    "destination_health",
)


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("commitment", sa.String(length=16), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_object"),
    )
    op.create_index("ix_deliveries_delivered_at", "deliveries", ["delivered_at"], unique=False)
    op.create_index("ix_deliveries_destination", "deliveries", ["destination"], unique=False)
    op.create_index("ix_deliveries_job_id", "deliveries", ["job_id"], unique=False)
    op.create_index("ix_deliveries_state", "deliveries", ["state"], unique=False)
    op.create_table(
        "destination_health",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "mpps_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("study_uids", sa.Text(), nullable=False),
        sa.Column("performed_instances", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_mpps_steps_applied", "mpps_steps", ["applied"], unique=False)
    op.create_index("ix_mpps_steps_sop_instance_uid", "mpps_steps", ["sop_instance_uid"], unique=True)
    op.create_index("ix_mpps_steps_status", "mpps_steps", ["status"], unique=False)
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=324), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("sex", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_patients_key", "patients", ["patient_id", "issuer"], unique=True)
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("referring_physician", sa.String(length=324), nullable=False),
        sa.Column("study_id", sa.String(length=16), nullable=False),
        sa.Column("patient_age", sa.String(length=4), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ready_reason", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patients.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"], unique=False)
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"], unique=False)
    op.create_index("ix_studies_ready_at", "studies", ["ready_at"], unique=False)
    op.create_index("ix_studies_state", "studies", ["state"], unique=False)
    op.create_index("ix_studies_study_uid", "studies", ["study_uid"], unique=True)
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("body_part", sa.String(length=16), nullable=False),
        sa.Column("station_name", sa.String(length=16), nullable=False),
        sa.Column("manufacturer", sa.String(length=64), nullable=False),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_series_modality", "series", ["modality"], unique=False)
    op.create_index("ix_series_series_uid", "series", ["series_uid"], unique=True)
    op.create_index("ix_series_state", "series", ["state"], unique=False)
    op.create_index("ix_series_study_pk", "series", ["study_pk"], unique=False)
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"], unique=False)
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"], unique=True)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=True),
        sa.Column("series_pk", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("analysis", sa.String(length=128), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("destinations", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("priority_rank", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=16), nullable=False),
        sa.Column("soft_time_limit_s", sa.Integer(), nullable=False),
        sa.Column("time_limit_s", sa.Integer(), nullable=False),
        sa.Column("input_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("supersedes_job_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("publish_count", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["series_pk"], ["series.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_key", "jobs", ["key"], unique=False)
    op.create_index("ix_jobs_priority_rank", "jobs", ["priority_rank"], unique=False)
    op.create_index("ix_jobs_state", "jobs", ["state"], unique=False)
    op.create_index("ix_jobs_study_pk", "jobs", ["study_pk"], unique=False)
    op.create_table(
        "series_expectations",
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["series_pk"], ["series.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("series_pk"),
    )


def downgrade() -> None:
    op.drop_table("series_expectations")
    op.drop_index("ix_jobs_study_pk", table_name="jobs")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.drop_index("ix_jobs_priority_rank", table_name="jobs")
    op.drop_index("ix_jobs_key", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_instances_sop_instance_uid", table_name="instances")
    op.drop_index("ix_instances_series_pk", table_name="instances")
    op.drop_table("instances")
    op.drop_index("ix_series_study_pk", table_name="series")
    op.drop_index("ix_series_state", table_name="series")
    op.drop_index("ix_series_series_uid", table_name="series")
    op.drop_index("ix_series_modality", table_name="series")
    op.drop_table("series")
    op.drop_index("ix_studies_study_uid", table_name="studies")
    op.drop_index("ix_studies_state", table_name="studies")
    op.drop_index("ix_studies_ready_at", table_name="studies")
    op.drop_index("ix_studies_patient_pk", table_name="studies")
    op.drop_index("ix_studies_last_received_at", table_name="studies")
    op.drop_table("studies")
    op.drop_index("ix_patients_key", table_name="patients")
    op.drop_table("patients")
    op.drop_index("ix_mpps_steps_status", table_name="mpps_steps")
    op.drop_index("ix_mpps_steps_sop_instance_uid", table_name="mpps_steps")
    op.drop_index("ix_mpps_steps_applied", table_name="mpps_steps")
    op.drop_table("mpps_steps")
    op.drop_table("destination_health")
    op.drop_index("ix_deliveries_state", table_name="deliveries")
    op.drop_index("ix_deliveries_job_id", table_name="deliveries")
    op.drop_index("ix_deliveries_destination", table_name="deliveries")
    op.drop_index("ix_deliveries_delivered_at", table_name="deliveries")
    op.drop_table("deliveries")
