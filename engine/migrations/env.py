"""Alembic environment: tapsign runs migrations in-process on a connection it passes in
(``config.attributes["connection"]``), never from an ini file or a URL of its own."""

from __future__ import annotations

from alembic import context

from engine.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
