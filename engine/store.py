"""Persistence: SQLAlchemy Core over SQLite (WAL, the embedded default) or PostgreSQL.

SQLAlchemy is synchronous, so every unit of work runs in a worker thread
(:meth:`Store.write` / :meth:`Store.read` from Trio), at most ``pool_size`` at a time. A
write is one transaction; a Trio caller cancelled meanwhile still waits for the commit or
rollback (``trio.to_thread`` does not abandon the thread), so nothing is half-done.

This module is the unit of work (connections, transactions, grouped writes, migrations);
the statements are engine/statements.py's, the row mappers engine/mappers.py's.
Consistency rules kept across them:

* every change of an operation is a compare-and-set on its ``version``
  (``statements.update_operation``), so two actors or two processes can never both
  complete it;
* the audit trail is appended in the transaction of the change it records, one entry at a
  time: SQLite write transactions begin ``IMMEDIATE`` (one writer at a time), PostgreSQL
  writers lock the audit head row (``SELECT … FOR UPDATE``), and the head is written
  back once when the transaction commits.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import outcome
import sqlalchemy as sa
import trio
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from engine.settings import DatabaseSettings
from engine.statements import audit_head_of, write_audit_head
from tapsign_sdk.problems import InvalidInput, ServiceUnavailable

log = logging.getLogger(__name__)

#: The connection or the server is gone (PostgreSQL restarted, SQLite locked past its
#: timeout): the transaction is lost as a whole and the caller may retry.
_CONNECTION_LOST = (sa.exc.OperationalError, sa.exc.InterfaceError)

T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")


#: The most units of work committed together.
GROUP_LIMIT = 256


class StoreStatistics(msgspec.Struct, frozen=True, kw_only=True):
    queued_writes: int
    #: Transactions the grouped writer committed, and the units of work they held.
    groups: int
    grouped_writes: int
    largest_group: int
    #: Units of work written and read transactions, each one thread hop for its caller.
    writes: int
    reads: int


class _Unit:
    __slots__ = ("done", "prepare", "result", "work")

    def __init__(
        self, work: Callable[[Connection], Any], prepare: Callable[[], None] | None
    ) -> None:
        self.work = work
        self.prepare = prepare
        self.done = trio.Event()
        self.result: outcome.Outcome[Any] | None = None


class Store:
    """The database, its connection pool and the threads that talk to it."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.url = sa.make_url(settings.url)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        self._writer_lock: Path | None = None
        if self.sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                self._writer_lock = Path(f"{database}.writer-lock")
            self.engine: Engine = sa.create_engine(
                self.url,
                pool_size=settings.pool_size,
                connect_args={"timeout": 30, "check_same_thread": False},
            )
            _configure_sqlite(self.engine, settings.sqlite_synchronous)
        else:
            self.engine = sa.create_engine(
                self.url, pool_size=settings.pool_size, max_overflow=0, pool_pre_ping=True
            )
        self._limiter = trio.CapacityLimiter(settings.pool_size)
        self._queue: deque[_Unit] | None = None
        self._pending = trio.lowlevel.ParkingLot()
        self._groups = 0
        self._grouped = 0
        self._largest_group = 0
        self._writes = 0
        self._reads = 0

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._writing(), self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Connection]:
        """A connection in a transaction: committed on success, rolled back on any error."""
        try:
            with self._writing() if write else nullcontext(), self.engine.connect() as connection:
                if write:
                    connection = connection.execution_options(tapsign_write=True)
                with connection.begin():
                    if write:
                        # Every writer locks the audit head first, whatever it writes, so that
                        # all write transactions take their locks in one order. Locked at the
                        # first audit entry instead, a grouped write holding the head and then
                        # updating an operation deadlocked on PostgreSQL with another process's
                        # write holding that operation's row and waiting for the head.
                        audit_head_of(connection)
                    yield connection
                    write_audit_head(connection)
        except _CONNECTION_LOST as exc:
            # The database went away or is locked beyond the timeout: retry later.
            log.warning("database unavailable: %s", type(exc.orig).__name__)
            raise ServiceUnavailable("the database is unavailable", retry_after=1.0) from exc
        except sa.exc.DataError as exc:
            raise _unstorable(exc) from exc

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite: the processes on one database file write one at a time, queued by the
        kernel (``flock`` on ``<database>.writer-lock``). Left to SQLite, a writer that finds
        the database locked polls with sleeps of up to 100 ms, so two processes took turns
        slowly and the tail latency grew (docs/discussion/performance.md). The lock is held
        for one transaction; a process that dies releases it."""
        if self._writer_lock is None:
            yield
            return
        descriptor = os.open(self._writer_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    async def write(
        self, work: Callable[[Connection], T], *, prepare: Callable[[], None] | None = None
    ) -> T:
        """Run ``work`` in a write transaction, in a worker thread; committed on return.

        ``prepare``, if given, runs first in that same thread hop, before the transaction
        begins: the HSM signatures and decryptions a unit needs (a result token, a consent
        JWT, a sealed context), so that they cost no extra hop and hold no lock. Should it
        fail, ``work`` is not run.

        While :meth:`run` serves, units of work are grouped: the writer runs everything
        queued in one transaction, each unit in a savepoint of its own (a unit that fails
        is rolled back alone and gets its error), and commits once. One commit, one fsync,
        for a whole group: the terminal state of every operation in it is durable before
        any of their callers hears back.
        """
        self._writes += 1
        if self._queue is None:
            return await trio.to_thread.run_sync(
                self._run_prepared, work, prepare, limiter=self._limiter
            )
        unit = _Unit(work, prepare)
        self._queue.append(unit)
        if self._pending:
            self._pending.unpark()
        await unit.done.wait()
        assert unit.result is not None  # noqa: S101 - set before done
        return unit.result.unwrap()  # type: ignore[no-any-return]

    async def read(self, work: Callable[[Connection], T]) -> T:
        self._reads += 1
        return await trio.to_thread.run_sync(self._run, work, False, limiter=self._limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve grouped writes until cancelled (then :meth:`write` works unit by unit)."""
        self._queue = deque()
        task_status.started()
        try:
            while True:
                if not self._queue:
                    await self._pending.park()
                    continue
                group = [self._queue.popleft() for _ in range(min(len(self._queue), GROUP_LIMIT))]
                self._groups += 1
                self._grouped += len(group)
                self._largest_group = max(self._largest_group, len(group))
                with trio.CancelScope(shield=True):  # a group, once begun, is committed
                    await trio.to_thread.run_sync(self._commit_group, group, limiter=self._limiter)
                for unit in group:
                    unit.done.set()
        finally:
            queued, self._queue = self._queue, None
            stopped = ServiceUnavailable("the database writer stopped", retry_after=1.0)
            for unit in queued:
                unit.result = outcome.Error(stopped)
                unit.done.set()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            queued_writes=len(self._queue or ()),
            groups=self._groups,
            grouped_writes=self._grouped,
            largest_group=self._largest_group,
            writes=self._writes,
            reads=self._reads,
        )

    def _commit_group(self, group: list[_Unit]) -> None:
        for unit in group:
            if unit.prepare is not None:
                try:
                    unit.prepare()
                except Exception as exc:
                    unit.result = outcome.Error(exc)
        ready = [unit for unit in group if unit.result is None]
        if not ready:
            return
        try:
            with self.transaction(write=True) as connection:
                head = audit_head_of(connection)
                for unit in ready:
                    saved = head.seq, head.hash
                    try:
                        with connection.begin_nested():
                            unit.result = outcome.Value(unit.work(connection))
                    except _CONNECTION_LOST:
                        raise  # nothing of the group is committed: every unit gets the 503
                    except Exception as exc:
                        # The unit's savepoint is rolled back: so are its audit entries.
                        unit.result = outcome.Error(_unstorable(exc))
                        head.seq, head.hash = saved
        except Exception as exc:
            for unit in ready:
                unit.result = outcome.Error(exc)

    def _run_prepared(
        self, work: Callable[[Connection], T], prepare: Callable[[], None] | None
    ) -> T:
        if prepare is not None:
            prepare()
        return self._run(work, True)

    def _run(self, work: Callable[[Connection], T], write: bool) -> T:
        with self.transaction(write=write) as connection:
            return work(connection)

    def close(self) -> None:
        self.engine.dispose()


def _unstorable(error: Exception) -> Exception:
    """A value the database cannot store (PostgreSQL refuses NUL characters in text) is the
    request's fault: 422, not a server error. Anything else is returned as it is."""
    if isinstance(error, sa.exc.DataError):
        return InvalidInput(f"a value cannot be stored: {type(error.orig).__name__}")
    return error


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @sa.event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, _: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN, so writes can begin IMMEDIATE: a
        # deferred transaction that reads the audit head and then writes could deadlock
        # against another writer (SQLITE_BUSY) instead of waiting its turn.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("tapsign_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
