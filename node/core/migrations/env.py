"""Alembic's environment for ainode: run by ``node.core.migrations`` on a connection it holds.

Nothing here reads a file or the environment: the caller puts the connection (inside its locked
transaction) and the tables' metadata into the Alembic config's attributes.
"""

from __future__ import annotations

import logging

from alembic import context

log = logging.getLogger("ainode.db")


def _applied(step, **_: object) -> None:  # type: ignore[no-untyped-def]
    log.info("schema revision %s applied: %s", step.up_revision_id, step.up_revision.doc.splitlines()[0])


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("target_metadata"),
    compare_type=True,
    # SQLite alters a table by copying it: revisions use op.batch_alter_table, and autogenerate
    # writes them that way.
    render_as_batch=connection.dialect.name == "sqlite",
    on_version_apply=_applied,
)
with context.begin_transaction():
    context.run_migrations()
