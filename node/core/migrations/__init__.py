"""Schema migrations: the revisions of ainode's tables (Alembic), applied by ``init_db``.

The revisions live in ``versions/`` beside this module and ship in the wheel; Alembic is
configured here in code, so no ``alembic.ini`` is read at run time. Every function takes a
connection that the caller holds (``init_db`` holds it inside the schema lock): nothing here
opens one of its own, so this module needs nothing from ``node.core.db``.
"""

from __future__ import annotations

import logging
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData, create_engine, inspect

log = logging.getLogger("ainode.db")
# Alembic says at INFO which dialect it found, every time a context is made (each start reads the
# revision): env.py logs each revision applied instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

FOLDER = Path(__file__).parent
# The revision that a database made by create_all (no alembic_version table) is stamped at.
CREATE_ALL_REVISION = "0001"


class SchemaError(RuntimeError):
    """The database's schema is one this release cannot use or upgrade (the message says why)."""


def alembic_config(connection: Connection | None = None, metadata: MetaData | None = None) -> Config:
    """Alembic's configuration for ainode's revisions, with the connection env.py runs on."""
    config = Config()
    config.set_main_option("script_location", str(FOLDER))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    config.attributes["target_metadata"] = metadata
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The revision this release's tables are at (the newest in versions/)."""
    newest = _scripts().get_current_head()
    assert newest is not None, "no revision in node/core/migrations/versions"
    return newest


def current_revision(conn: Connection) -> str | None:
    """The revision the database says it is at; None when it has no alembic_version table.

    Raises SchemaError when the revision is unknown to this release: a newer release upgraded
    the database, and this one would misread its tables.
    """
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        try:
            _scripts().get_revision(revision)
        except CommandError:
            raise SchemaError(
                f"the database's schema is at revision {revision}, which this ainode release does not know "
                f"(its newest is {head()}): a newer release upgraded it. Run that release, or restore the "
                "backup taken before the upgrade."
            ) from None
    return revision


def upgrade(conn: Connection, metadata: MetaData) -> tuple[str | None, str]:
    """Bring the database on ``conn`` to the head revision; returns (revision before, after).

    A database without alembic_version that holds ainode's tables was made by create_all (the
    release before migrations, or an older one): it is stamped at CREATE_ALL_REVISION once its
    tables are checked, then upgraded. An empty database is built from the first revision.
    """
    before = current_revision(conn)
    config = alembic_config(conn, metadata)
    if before is None and _made_by_create_all(conn):
        command.stamp(config, CREATE_ALL_REVISION)
        log.info("database made before schema migrations: stamped at revision %s", CREATE_ALL_REVISION)
    if before != head():
        command.upgrade(config, "head")
        log.info("schema upgraded from %s to revision %s", before or "an empty database", head())
    return before, head()


def _made_by_create_all(conn: Connection) -> bool:
    tables: tuple[str, ...] = _scripts().get_revision(CREATE_ALL_REVISION).module.TABLES
    present = set(inspect(conn).get_table_names())
    if not present & set(tables):
        return False
    missing = sorted(set(tables) - present)
    if missing:
        raise SchemaError(
            f"the database holds some of ainode's tables but not {', '.join(missing)}, and no schema "
            "revision: it was not made by an ainode release. Restore a backup, or start on an empty database."
        )
    return True


def differences(conn: Connection, metadata: MetaData) -> list[Any]:
    """What the tables in ``metadata`` have that the database on ``conn`` does not, and back
    (Alembic's autogenerate comparison; empty when the two agree)."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return compare_metadata(context, metadata)


def new_revision(message: str, metadata: MetaData) -> Path:
    """Write a revision that takes the head's schema to ``metadata`` (for developers).

    Autogenerate compares the models with a scratch SQLite database upgraded to the head, and
    writes batch operations (SQLite alters a table by copying it; they work on PostgreSQL too).
    The file is a draft: review it, add any data changes, and test the upgrade.
    """
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{folder}/head.db")
        try:
            with engine.begin() as conn:
                upgrade(conn, metadata)
                script = command.revision(
                    alembic_config(conn, metadata), message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}"
                )
        finally:
            engine.dispose()
    assert script is not None and not isinstance(script, list)
    _scripts.cache_clear()
    return Path(script.path)
