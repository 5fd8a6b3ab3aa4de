"""Database engine and session factory shared by every stage (SQLite by default, PostgreSQL)."""

from __future__ import annotations

import fcntl
import importlib
import logging
import sqlite3
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from node.core import migrations

log = logging.getLogger("ainode.db")


class Base(DeclarativeBase):
    """Declarative base for every table of ainode (index, jobs, outbox, audit...)."""


# Every module that declares tables on Base; each stage owns its own tables.
TABLE_MODULES = (
    "node.index",
    "node.ingest.mpps",
    "node.assembler",
    "node.jobs.table",
    "node.dispatch.table",
    "node.workflow.table",
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
    if not url.startswith("sqlite") or "///" not in url:
        return None  # another server, or sqlite:// (in memory)
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


def load_tables() -> None:
    """Declare every table on Base.metadata (by importing each stage's table module)."""
    # The stages' table modules are imported by name: core sits below every stage and must not
    # import them (import-linter holds that); this is the one place that names them all.
    for module in TABLE_MODULES:
        importlib.import_module(module)


def init_db(url: str) -> Engine:
    """Bring the database's schema to this release's revision (migrations), return the engine.

    Safe when several processes start together (the node, its workers, ``ainode status``): one
    migrates while holding the database's schema lock; the others wait for it (and say so), then
    find the schema at the head revision. A database already there costs one query. A database
    from a newer release (a revision this one does not know) raises ``migrations.SchemaError``.
    """
    load_tables()
    engine = engine_for(url)
    with engine.connect() as conn:
        if migrations.current_revision(conn) == migrations.head():
            return engine
    with _schema_transaction(engine) as conn:
        migrations.upgrade(conn, Base.metadata)
    return engine


def schema_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: no alembic_version table)."""
    with engine_for(url).connect() as conn:
        return migrations.current_revision(conn)


@contextmanager
def _schema_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction, committed on success, that no other process changes the schema beside.

    Without it two processes creating the tables at once both see a table missing and both create
    it: the slower one fails (PostgreSQL: UniqueViolation on pg_type; SQLite: "table already
    exists"). PostgreSQL runs DDL in transactions: an advisory lock held to the commit makes the
    next process wait, then it finds the revision committed. SQLite: a file lock beside the
    database (waits as long as the migration takes, unlike the 30 s busy timeout), then
    BEGIN IMMEDIATE so that no writer comes between the steps.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY}).scalar():
                with _waiting():
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            yield conn
    elif engine.dialect.name == "sqlite":
        # The URL's own database part: str(engine.url) escapes characters such as ":".
        path = engine.url.database if engine.url.database not in (None, "", ":memory:") else None
        with _file_lock(Path(f"{path}.schema-lock")) if path else nullcontext():
            with _sqlite_schema_transaction(engine) as conn:
                yield conn
    else:
        with engine.begin() as conn:
            yield conn


@contextmanager
def _sqlite_schema_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        # SQLite alters a table by copying it (Alembic's batch mode) and dropping the old one; with
        # foreign keys on, that drop would delete or null out the rows that point at it. The
        # pragma only changes outside a transaction: off before BEGIN, checked before COMMIT.
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            # pysqlite begins transactions itself, and only before DML: this BEGIN is explicit,
            # and the DDL after it runs inside it until the commit.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the schema migration left {len(broken)} rows pointing at no row")
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (made if missing), held by this process until the block ends."""
    with open(path, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with _waiting():
                fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _waiting() -> Iterator[None]:
    # Another process holds the schema lock: it is migrating (or checking) the schema.
    log.info("waiting for the schema migration in another process")
    started = time.monotonic()
    yield
    log.info("schema migration by another process done; waited %.1f s", time.monotonic() - started)


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
