"""Alembic migrations of the tapsign database; run by :func:`engine.store.Store.migrate`."""
