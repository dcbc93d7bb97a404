"""The migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from engine.schema import metadata
from engine.store import Store


def test_migrated_database_matches_the_tables(store: Store) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []


def test_migrate_is_idempotent(store: Store) -> None:
    store.migrate()
    with store.engine.connect() as connection:
        version = connection.execute(sa.text("select version_num from alembic_version")).scalar()
        head = connection.execute(sa.text("select seq from audit_head")).scalar()
    assert version == "0005"
    assert head == 0


def test_sqlite_runs_in_wal_mode(store: Store) -> None:
    if not store.sqlite:
        pytest.skip("a SQLite setting")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
