"""Fixtures shared by every test area."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards (skips without a server)."""
    from sqlalchemy import create_engine, text

    name = f"ainode_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not available: {type(err).__name__}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    from node.core.db import dispose_engines

    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
