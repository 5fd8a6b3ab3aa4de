"""Database engine and session factory shared by every stage (SQLite by default, PostgreSQL)."""

from __future__ import annotations

import importlib
import sqlite3
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table of ainode (index, jobs, outbox, audit...)."""


# Every module that declares tables on Base; each stage owns its own tables.
TABLE_MODULES = (
    "node.index",
    "node.ingest.mpps",
    "node.assembler",
    "node.jobs.table",
    "node.dispatch.table",
    "node.core.audit",
)

_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the receivers write while the assembler and API read; synchronous=FULL keeps
    # every committed transaction on disk through a power loss (our Success promise).
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def sqlite_file(url: str) -> str | None:
    """The database file of an SQLite URL; None for an in-memory database or another server."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return path if path and path != ":memory:" else None


def engine_for(url: str) -> Engine:
    """One engine per URL and process; creates the SQLite file's folder when needed."""
    if url in _engines:
        return _engines[url]
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a statement's error message would otherwise quote its values (patient
        # names among them), and error messages reach the logs.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)
    _engines[url] = engine
    return engine


# The key of the PostgreSQL advisory lock that init_db holds while it changes the schema: any
# fixed 64-bit number, the same in every process and release (advisory locks are per database).
SCHEMA_LOCK_KEY = 0x61696E6F6465  # "ainode"


def init_db(url: str) -> Engine:
    """Create every table and index that does not exist yet, upgrade old columns, return the engine.

    Safe when several processes start together (the node, its workers, ``ainode status``): the
    whole schema change is one transaction that holds the database's schema lock, so the others
    wait for it and then find every table made.
    """
    # The stages' table modules are imported by name: core sits below every stage and must not
    # import them (import-linter holds that); this is the one place that names them all.
    for module in TABLE_MODULES:
        importlib.import_module(module)

    engine = engine_for(url)
    with _schema_transaction(engine) as conn:
        Base.metadata.create_all(conn)
        # create_all skips tables that exist: indexes added to a table since its database was
        # made (an upgraded node) are created here.
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
        _add_missing_columns(conn)
        _upgrade_columns(conn)
        _add_new_columns(conn)
    return engine


def _add_missing_columns(conn: Connection) -> None:
    """Columns added to a table since its database was made (an upgraded node): created empty.

    Only nullable columns are added this way (a new column is nullable for that reason); the rows
    that exist get NULL, which the code reads as "not known then".
    """
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable:
                continue
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


@contextmanager
def _schema_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction, committed on success, that no other process changes the schema beside.

    Without it two processes creating the tables at once both see a table missing and both create
    it: the slower one fails (PostgreSQL: UniqueViolation on pg_type; SQLite: "table already
    exists"). PostgreSQL runs DDL in transactions: an advisory lock held to the commit makes the
    next process wait, then its checks see the committed tables. SQLite: BEGIN IMMEDIATE takes the
    database's write lock before the first check (waiting up to the busy timeout) and keeps it to
    the commit.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            yield conn
    elif engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            # pysqlite begins transactions itself, and only before DML: this BEGIN is explicit,
            # and the CREATE statements after it run inside it until the commit.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
    else:
        with engine.begin() as conn:
            yield conn


def _upgrade_columns(conn: Connection) -> None:
    # deliveries.job_id names a job row; databases made before it was an integer hold text. SQLite
    # compares either way (column affinity); PostgreSQL needs the column converted once.
    if conn.dialect.name != "postgresql":
        return
    kind = conn.execute(
        text(
            "SELECT data_type FROM information_schema.columns WHERE table_name = 'deliveries' "
            "AND column_name = 'job_id' AND table_schema = current_schema()"
        )
    ).scalar()
    if kind is not None and kind != "integer":
        conn.execute(text("ALTER TABLE deliveries ALTER COLUMN job_id TYPE integer USING job_id::integer"))


def _add_new_columns(conn: Connection) -> None:
    """Nullable columns added to a table since its database was made (an upgraded node), e.g.
    ``jobs.series_uids``: added empty, which every reader takes as "not recorded"."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable and column.server_default is None:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def dispose_engines() -> None:
    """Close pooled connections (after fork, or at shutdown)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class ChangeGate:
    """Tells a polling loop whether the database may have changed since its last full pass.

    Background stages poll the database several times a second so that a new study is picked up
    at once; on a node that is idle for hours those passes are pure cost (tens of ms of CPU per
    second). The gate reads a cheap change token instead — SQLite's ``PRAGMA data_version``
    (changes whenever another connection, in any process, commits) or PostgreSQL's WAL insert
    position (moves on any write) — and says a pass is due only when the token moved, or at
    least every ``max_quiet_s`` seconds (for time-based conditions a token cannot show, such
    as a heartbeat growing stale). The token is read *before* the pass, so a commit made while
    the pass runs makes the next one due: no change is missed. No token (an in-memory
    database, an error reading it) means every pass is due.
    """

    def __init__(self, url: str, max_quiet_s: float = 5.0):
        self.url = url
        self.max_quiet_s = max_quiet_s
        self._token: object = None
        self._passed_at = float("-inf")
        self._sqlite: Any = None

    def due(self) -> bool:
        """True when a full pass should run now (and remember this moment as its start)."""
        now = time.monotonic()
        try:
            token = self._read_token()
        except Exception:  # noqa: BLE001 - unknown means "maybe changed"
            self._close()
            token = None
        if token is not None and token == self._token and now - self._passed_at < self.max_quiet_s:
            return False
        self._token, self._passed_at = token, now
        return True

    def _read_token(self) -> object:
        if self.url.startswith("sqlite"):
            path = sqlite_file(self.url)
            if path is None:
                return None  # in memory: no token to read, every pass is due
            if self._sqlite is None:
                # Its own autocommit connection: data_version is per connection and only
                # moves between transactions.
                self._sqlite = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
            return self._sqlite.execute("PRAGMA data_version").fetchone()[0]
        with engine_for(self.url).connect() as conn:
            return conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()

    def _close(self) -> None:
        if self._sqlite is not None:
            try:
                self._sqlite.close()
            finally:
                self._sqlite = None


def database_session(url: str) -> AbstractContextManager[Session]:
    """A session on the database at ``url`` (its pooled engine) that commits on success and rolls
    back on error: what every stage needs for one unit of work."""
    return session_scope(engine_for(url))
