"""Database engine and session factory shared by every stage (SQLite by default, PostgreSQL)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table of ainode (index, jobs, outbox, audit...)."""


# Every module that declares tables on Base; each stage owns its own tables.
TABLE_MODULES = ("node.index", "node.assembler", "node.jobs", "node.dispatcher", "node.audit")

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


def engine_for(url: str) -> Engine:
    """One engine per URL and process; creates the SQLite file's folder when needed."""
    if url in _engines:
        return _engines[url]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    _engines[url] = engine
    return engine


def init_db(url: str) -> Engine:
    """Create every table that does not exist yet and return the engine."""
    # Import the stage modules that define tables so they are registered on Base.metadata.
    import importlib

    for module in TABLE_MODULES:
        importlib.import_module(module)

    engine = engine_for(url)
    Base.metadata.create_all(engine)
    return engine


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
