"""Databases that an older release's create_all made, brought level with revision 0001.

Before df2dddf, a database kept the tables it was first made with: indexes added to a table
later, and deliveries.job_id (text until it named a job row as an integer), were put right by
init_db at every start. Such a database is stamped at 0001 like any other made by create_all;
this revision does that repair once. It changes nothing in a database made at 0001 or later.

Revision ID: 0002
Revises: 0001
Created: 2026-11-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Every index of revision 0001: (name, table, columns, unique).
INDEXES = (
    ("ix_deliveries_delivered_at", "deliveries", ["delivered_at"], False),
    ("ix_deliveries_destination", "deliveries", ["destination"], False),
    ("ix_deliveries_job_id", "deliveries", ["job_id"], False),
    ("ix_deliveries_state", "deliveries", ["state"], False),
    ("ix_mpps_steps_applied", "mpps_steps", ["applied"], False),
    ("ix_mpps_steps_sop_instance_uid", "mpps_steps", ["sop_instance_uid"], True),
    ("ix_mpps_steps_status", "mpps_steps", ["status"], False),
    ("ix_patients_key", "patients", ["patient_id", "issuer"], True),
    ("ix_studies_last_received_at", "studies", ["last_received_at"], False),
    ("ix_studies_patient_pk", "studies", ["patient_pk"], False),
    ("ix_studies_ready_at", "studies", ["ready_at"], False),
    ("ix_studies_state", "studies", ["state"], False),
    ("ix_studies_study_uid", "studies", ["study_uid"], True),
    ("ix_series_modality", "series", ["modality"], False),
    ("ix_series_series_uid", "series", ["series_uid"], True),
    ("ix_series_state", "series", ["state"], False),
    ("ix_series_study_pk", "series", ["study_pk"], False),
    ("ix_instances_series_pk", "instances", ["series_pk"], False),
    ("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"], True),
    ("ix_jobs_key", "jobs", ["key"], False),
    ("ix_jobs_priority_rank", "jobs", ["priority_rank"], False),
    ("ix_jobs_state", "jobs", ["state"], False),
    ("ix_jobs_study_pk", "jobs", ["study_pk"], False),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    made = {table: {index["name"] for index in inspector.get_indexes(table)} for table in {i[1] for i in INDEXES}}
    for name, table, columns, unique in INDEXES:
        if name not in made[table]:
            op.create_index(name, table, columns, unique=unique)
    # SQLite compares an integer with a text value either way (column affinity): only
    # PostgreSQL needs the column converted.
    if op.get_bind().dialect.name == "postgresql":
        job_id = next(column for column in inspector.get_columns("deliveries") if column["name"] == "job_id")
        if not isinstance(job_id["type"], sa.Integer):
            op.alter_column(
                "deliveries", "job_id", type_=sa.Integer(), existing_nullable=False, postgresql_using="job_id::integer"
            )


def downgrade() -> None:
    # Nothing to undo: a database at 0001 may have every index and an integer job_id.
    pass
