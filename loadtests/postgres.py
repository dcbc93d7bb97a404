"""What PostgreSQL did during a load test: commits, WAL records, bytes and flushes
(``pg_stat_database``, ``pg_stat_wal``), the statements run (``pg_stat_statements``, when
the server preloads it), and the CPU of every PostgreSQL process of this machine. Counted
for the whole database cluster: run nothing else against it meanwhile."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

STATEMENTS_SHOWN = 12


#: CPU seconds so far of a process and its descendants (loadtests/run.py ``sample``).
CpuOf = Callable[[int], float]


class Snapshot:
    def __init__(self, connection: sa.Connection, cpu_of: CpuOf) -> None:
        self.commits = connection.execute(
            sa.text("SELECT sum(xact_commit) FROM pg_stat_database")
        ).scalar_one()
        self.wal = connection.execute(
            sa.text("SELECT wal_records, wal_bytes, wal_sync FROM pg_stat_wal")
        ).one()
        self.cpu = _postgres_cpu(connection, cpu_of)


def _postgres_cpu(connection: sa.Connection, cpu_of: CpuOf) -> float:
    """CPU seconds of the postmaster and its children so far (0 where it is not local)."""
    try:
        directory = connection.execute(sa.text("SHOW data_directory")).scalar_one()
        postmaster = int(Path(directory, "postmaster.pid").read_text().split()[0])
    except (sa.exc.DBAPIError, OSError, ValueError):
        return 0.0
    return cpu_of(postmaster)


def _statements_available(connection: sa.Connection) -> bool:
    return bool(
        connection.execute(
            sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")
        ).scalar_one()
    )


@contextlib.contextmanager
def measured(database_url: str, cpu_of: CpuOf) -> Iterator[dict[str, Any]]:
    """Measure the block; the figures are in the dict yielded once it ends."""
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    figures: dict[str, Any] = {}
    try:
        with engine.connect() as connection:
            statements = _statements_available(connection)
            if statements:
                connection.execute(sa.text("SELECT pg_stat_statements_reset()"))
            connection.execute(sa.text("SELECT pg_stat_reset_shared('wal')"))
            before = Snapshot(connection, cpu_of)
        yield figures
        with engine.connect() as connection:
            after = Snapshot(connection, cpu_of)
            figures.update(
                commits=int(after.commits - before.commits),
                wal_records=int(after.wal.wal_records - before.wal.wal_records),
                wal_bytes=int(after.wal.wal_bytes - before.wal.wal_bytes),
                wal_flushes=int(after.wal.wal_sync - before.wal.wal_sync),
                cpu_seconds=after.cpu - before.cpu,
            )
            if statements:
                rows = connection.execute(
                    sa.text(
                        "SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', "
                        "'g'), 110) FROM pg_stat_statements s JOIN pg_database d ON d.oid = "
                        "s.dbid WHERE d.datname = current_database() ORDER BY calls DESC"
                    )
                ).all()
                figures["statements"] = int(sum(row[0] for row in rows))
                figures["statement_ms"] = float(sum(row[1] for row in rows))
                figures["top_statements"] = [
                    {"calls": int(calls), "ms": round(float(ms), 1), "query": query}
                    for calls, ms, query in rows[:STATEMENTS_SHOWN]
                ]
            else:
                figures["statements"] = None  # shared_preload_libraries lacks it
    finally:
        engine.dispose()


def per_transaction(figures: dict[str, Any], transactions: int) -> dict[str, Any]:
    """The figures divided by the transactions completed meanwhile."""
    if not transactions:
        return {}
    keys = ("commits", "wal_records", "wal_bytes", "wal_flushes", "statements", "statement_ms")
    each = {
        key: round(figures[key] / transactions, 3) for key in keys if figures.get(key) is not None
    }
    each["cpu_ms"] = round(1000 * figures["cpu_seconds"] / transactions, 3)
    return each
