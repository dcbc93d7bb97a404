"""Persistence: SQLAlchemy Core over SQLite (WAL, the embedded default) or PostgreSQL.

SQLAlchemy is synchronous, so every unit of work runs in a worker thread
(:meth:`Store.write` / :meth:`Store.read` from Trio), at most ``pool_size`` at a time. A
write is one transaction; a Trio caller cancelled meanwhile still waits for the commit or
rollback (``trio.to_thread`` does not abandon the thread), so nothing is half-done.

Consistency rules kept here:

* every change of an operation is a compare-and-set on its ``version``
  (:func:`update_operation`), so two actors or two processes can never both complete it;
* the audit trail is appended in the transaction of the change it records, one entry at a
  time: SQLite write transactions begin ``IMMEDIATE`` (one writer at a time), PostgreSQL
  writers lock the audit head row (``SELECT … FOR UPDATE``).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import msgspec
import outcome
import sqlalchemy as sa
import trio
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from engine import audit
from engine.audit import AuditEntry
from engine.model import (
    Device,
    DeviceStatus,
    FailureReason,
    Operation,
    Payee,
    Payment,
    Phase,
    User,
    UserStatus,
)
from engine.schema import (
    access_keys,
    audit_head,
    audit_log,
    consumed_tokens,
    devices,
    operations,
    outbox,
    users,
)
from engine.settings import DatabaseSettings
from tapsign_sdk.model import Decision, OperationKind, UserVerification
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
                        _audit_head(connection)
                    yield connection
                    _write_audit_head(connection)
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
                head = _audit_head(connection)
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


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything tapsign stores is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _required_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- users ------------------------------------------------------------------------------


def _user(row: sa.Row[Any]) -> User:
    return User(
        id=row.id,
        username=row.username,
        status=UserStatus(row.status),
        attributes=dict(row.attributes),
        created_at=_required_utc(row.created_at),
        updated_at=_required_utc(row.updated_at),
        last_login_at=_utc(row.last_login_at),
        last_failed_login_at=_utc(row.last_failed_login_at),
    )


def _user_values(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "status": user.status.value,
        "attributes": user.attributes,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
        "last_login_at": user.last_login_at,
        "last_failed_login_at": user.last_failed_login_at,
    }


# Statements are built once: building one per call costs more than running it.
_INSERT_USER = users.insert()
_USER_BY_ID = users.select().where(users.c.id == sa.bindparam("key"))
_USER_BY_NAME = users.select().where(users.c.username == sa.bindparam("key"))
_UPDATE_USER = users.update().where(users.c.id == sa.bindparam("key"))


def insert_user(connection: Connection, user: User) -> None:
    connection.execute(_INSERT_USER, _user_values(user))


def get_user(connection: Connection, user_id: UUID) -> User | None:
    row = connection.execute(_USER_BY_ID, {"key": user_id}).first()
    return None if row is None else _user(row)


def find_user(connection: Connection, username: str) -> User | None:
    row = connection.execute(_USER_BY_NAME, {"key": username}).first()
    return None if row is None else _user(row)


def username_taken(connection: Connection, username: str) -> bool:
    found = connection.execute(sa.select(users.c.id).where(users.c.username == username)).first()
    return found is not None


def update_user(connection: Connection, user: User) -> None:
    connection.execute(_UPDATE_USER, {"key": user.id, **_user_values(user)})


_UPDATE_USER_IF = users.update().where(
    users.c.id == sa.bindparam("key"), users.c.status == sa.bindparam("status_was")
)


def update_user_if(connection: Connection, user: User, *, status_was: str) -> bool:
    """Store ``user`` if the stored one still has the status ``status_was``; False if it
    changed (locked, deactivated, deleted by someone else) and nothing was written."""
    values = {"key": user.id, "status_was": status_was, **_user_values(user)}
    return connection.execute(_UPDATE_USER_IF, values).rowcount == 1


def delete_user(connection: Connection, user_id: UUID) -> None:
    connection.execute(devices.delete().where(devices.c.user_id == user_id))
    connection.execute(users.delete().where(users.c.id == user_id))


# -- devices ----------------------------------------------------------------------------


def _device(row: sa.Row[Any]) -> Device:
    return Device(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        platform=row.platform,
        public_key=bytes(row.public_key),
        status=DeviceStatus(row.status),
        enrolled_at=_required_utc(row.enrolled_at),
        updated_at=_required_utc(row.updated_at),
        last_used_at=_utc(row.last_used_at),
        counter=row.counter,
        failed_attempts=row.failed_attempts,
        attestation=row.attestation,
    )


def _device_values(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "user_id": device.user_id,
        "name": device.name,
        "platform": device.platform,
        "public_key": device.public_key,
        "status": device.status.value,
        "enrolled_at": device.enrolled_at,
        "updated_at": device.updated_at,
        "last_used_at": device.last_used_at,
        "counter": device.counter,
        "failed_attempts": device.failed_attempts,
        "attestation": device.attestation,
    }


_INSERT_DEVICE = devices.insert()
_DEVICE_BY_ID = devices.select().where(devices.c.id == sa.bindparam("key"))
_DEVICES_OF_USER = (
    devices.select().where(devices.c.user_id == sa.bindparam("key")).order_by(devices.c.enrolled_at)
)
_UPDATE_DEVICE = devices.update().where(devices.c.id == sa.bindparam("key"))


def insert_device(connection: Connection, device: Device) -> None:
    connection.execute(_INSERT_DEVICE, _device_values(device))


def get_device(connection: Connection, device_id: UUID) -> Device | None:
    row = connection.execute(_DEVICE_BY_ID, {"key": device_id}).first()
    return None if row is None else _device(row)


def list_devices(connection: Connection, user_id: UUID) -> list[Device]:
    return [_device(row) for row in connection.execute(_DEVICES_OF_USER, {"key": user_id})]


def update_device(connection: Connection, device: Device) -> None:
    connection.execute(_UPDATE_DEVICE, {"key": device.id, **_device_values(device)})


_UPDATE_DEVICE_IF = devices.update().where(
    devices.c.id == sa.bindparam("key"),
    devices.c.status == sa.bindparam("status_was"),
    devices.c.failed_attempts == sa.bindparam("failed_was"),
    devices.c.counter == sa.bindparam("counter_was"),
)


def update_device_if(connection: Connection, device: Device, *, was: Device) -> bool:
    """Store ``device`` if the stored one is still as ``was`` (status, failed attempts,
    counter); False if it changed meanwhile and nothing was written."""
    values = {
        "key": device.id,
        "status_was": was.status.value,
        "failed_was": was.failed_attempts,
        "counter_was": was.counter,
        **_device_values(device),
    }
    return connection.execute(_UPDATE_DEVICE_IF, values).rowcount == 1


# -- operations -------------------------------------------------------------------------


def _operation(row: sa.Row[Any]) -> Operation:
    payment = None
    if row.amount is not None:
        payment = Payment(
            amount=row.amount,
            currency=row.currency,
            payee=Payee(name=row.payee_name, account=row.payee_account),
        )
    return Operation(
        id=row.id,
        kind=OperationKind(row.kind),
        user_id=row.user_id,
        device_id=row.device_id,
        client_id=row.client_id,
        phase=Phase(row.phase),
        version=row.version,
        challenge=bytes(row.challenge),
        created_at=_required_utc(row.created_at),
        updated_at=_required_utc(row.updated_at),
        expires_at=_required_utc(row.expires_at),
        completed_at=_utc(row.completed_at),
        message=row.message,
        payment=payment,
        text=row.text,
        pre_context=row.pre_context,
        post_context_sealed=None
        if row.post_context_sealed is None
        else bytes(row.post_context_sealed),
        require_user_verification=row.require_user_verification,
        callback_url=row.callback_url,
        device_name=row.device_name,
        device_platform=row.device_platform,
        public_key=None if row.public_key is None else bytes(row.public_key),
        decision=None if row.decision is None else Decision(row.decision),
        user_verification=(
            None if row.user_verification is None else UserVerification(row.user_verification)
        ),
        counter=row.counter,
        device_signature=None if row.device_signature is None else bytes(row.device_signature),
        failure_reason=None if row.failure_reason is None else FailureReason(row.failure_reason),
        result=row.result,
        result_token=row.result_token,
    )


def _operation_values(operation: Operation) -> dict[str, Any]:
    payment = operation.payment
    return {
        "id": operation.id,
        "kind": operation.kind.value,
        "user_id": operation.user_id,
        "device_id": operation.device_id,
        "client_id": operation.client_id,
        "phase": operation.phase.value,
        "version": operation.version,
        "challenge": operation.challenge,
        "created_at": operation.created_at,
        "updated_at": operation.updated_at,
        "expires_at": operation.expires_at,
        "completed_at": operation.completed_at,
        "message": operation.message,
        "amount": None if payment is None else payment.amount,
        "currency": None if payment is None else payment.currency,
        "payee_name": None if payment is None else payment.payee.name,
        "payee_account": None if payment is None else payment.payee.account,
        "text": operation.text,
        "pre_context": operation.pre_context,
        "post_context_sealed": operation.post_context_sealed,
        "require_user_verification": operation.require_user_verification,
        "callback_url": operation.callback_url,
        "device_name": operation.device_name,
        "device_platform": operation.device_platform,
        "public_key": operation.public_key,
        "decision": None if operation.decision is None else operation.decision.value,
        "user_verification": (
            None if operation.user_verification is None else operation.user_verification.value
        ),
        "counter": operation.counter,
        "device_signature": operation.device_signature,
        "failure_reason": (
            None if operation.failure_reason is None else operation.failure_reason.value
        ),
        "result": operation.result,
        "result_token": operation.result_token,
    }


_INSERT_OPERATION = operations.insert()
_OPERATION_BY_ID = operations.select().where(operations.c.id == sa.bindparam("key"))
_COMPARE_AND_SET = operations.update().where(
    operations.c.id == sa.bindparam("key"), operations.c.version == sa.bindparam("expected")
)


def insert_operations(connection: Connection, batch: Sequence[Operation]) -> None:
    connection.execute(_INSERT_OPERATION, [_operation_values(operation) for operation in batch])


def get_operation(connection: Connection, operation_id: UUID) -> Operation | None:
    row = connection.execute(_OPERATION_BY_ID, {"key": operation_id}).first()
    return None if row is None else _operation(row)


def update_operation(
    connection: Connection, operation: Operation, *, expected_version: int
) -> bool:
    """Store ``operation`` if the stored one still has ``expected_version`` (compare-and-set).

    False means another actor or process changed it first: nothing was written.
    """
    result = connection.execute(
        _COMPARE_AND_SET,
        {"key": operation.id, "expected": expected_version, **_operation_values(operation)},
    )
    return result.rowcount == 1


_PENDING = [phase.value for phase in (Phase.CREATED, Phase.DISPATCHED, Phase.RESPONDED)]


def pending_operations(connection: Connection) -> list[Operation]:
    rows = connection.execute(
        operations.select()
        .where(operations.c.phase.in_(_PENDING))
        .order_by(operations.c.expires_at)
    )
    return [_operation(row) for row in rows]


def pending_for_device(
    connection: Connection,
    device_id: UUID,
    now: datetime,
    *,
    after: tuple[datetime, UUID] | None = None,
    limit: int,
) -> list[Operation]:
    """The device's pending operations, oldest first, from just after ``after`` (the
    ``(created_at, id)`` of the last one of the previous page), at most ``limit``."""
    query = operations.select().where(
        operations.c.device_id == device_id,
        operations.c.phase.in_(_PENDING),
        operations.c.expires_at > now,
    )
    if after is not None:
        query = query.where(sa.tuple_(operations.c.created_at, operations.c.id) > after)
    rows = connection.execute(query.order_by(operations.c.created_at, operations.c.id).limit(limit))
    return [_operation(row) for row in rows]


def pending_for_user(connection: Connection, user_id: UUID) -> list[Operation]:
    rows = connection.execute(
        operations.select().where(operations.c.user_id == user_id, operations.c.phase.in_(_PENDING))
    )
    return [_operation(row) for row in rows]


# -- callback outbox --------------------------------------------------------------------


class OutboxItem(msgspec.Struct, frozen=True, kw_only=True):
    """A callback waiting for delivery."""

    id: int
    operation_id: UUID | None
    event: str
    url: str
    body: bytes
    attempts: int
    created_at: datetime
    next_attempt_at: datetime


def insert_outbox(
    connection: Connection,
    *,
    operation_id: UUID | None,
    event: str,
    url: str,
    body: bytes,
    now: datetime,
    lease_until: datetime | None,
) -> int:
    result = connection.execute(
        outbox.insert().values(
            operation_id=operation_id,
            event=event,
            url=url,
            body=body,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
            lease_until=lease_until,
        )
    )
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - every supported database returns the new id
        raise RuntimeError("the database did not return the new outbox id")
    return int(key[0])


_UNFINISHED = (outbox.c.delivered_at.is_(None), outbox.c.failed_at.is_(None))


def claim_undelivered(
    connection: Connection,
    *,
    now: datetime,
    lease_until: datetime,
    held: Sequence[int],
    limit: int,
) -> list[OutboxItem]:
    """In a write transaction: extend the lease of the callbacks this process ``held``, and
    claim (lease until ``lease_until``) at most ``limit`` others that nobody holds (never
    leased, as those a command wrote, or whose holder stopped renewing), oldest first.

    Writers take turns (the audit head is locked first), so no two processes claim a row;
    PostgreSQL's ``SKIP LOCKED`` keeps a claim from waiting on a row being delivered."""
    if held:
        connection.execute(
            outbox.update()
            .where(outbox.c.id.in_(held), *_UNFINISHED)
            .values(lease_until=lease_until)
        )
    free = (
        sa.select(outbox.c.id)
        .where(*_UNFINISHED, sa.or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now))
        .order_by(outbox.c.id)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        free = free.with_for_update(skip_locked=True)
    ids = list(connection.execute(free).scalars())
    if not ids:
        return []
    connection.execute(outbox.update().where(outbox.c.id.in_(ids)).values(lease_until=lease_until))
    rows = connection.execute(outbox.select().where(outbox.c.id.in_(ids)).order_by(outbox.c.id))
    return [
        OutboxItem(
            id=row.id,
            operation_id=row.operation_id,
            event=row.event,
            url=row.url,
            body=bytes(row.body),
            attempts=row.attempts,
            created_at=_required_utc(row.created_at),
            next_attempt_at=_required_utc(row.next_attempt_at),
        )
        for row in rows
    ]


def record_delivery(
    connection: Connection,
    outbox_id: int,
    *,
    now: datetime,
    delivered: bool,
    next_attempt_at: datetime | None,
    error: str | None,
) -> None:
    """One attempt's outcome: delivered, to retry at ``next_attempt_at``, or given up."""
    values: dict[str, Any] = {"attempts": outbox.c.attempts + 1, "last_error": error}
    if delivered:
        values["delivered_at"] = now
    elif next_attempt_at is None:
        values["failed_at"] = now
    else:
        values["next_attempt_at"] = next_attempt_at
    connection.execute(outbox.update().where(outbox.c.id == outbox_id).values(values))


# -- audit ------------------------------------------------------------------------------


class _AuditHead:
    """The newest ``(seq, hash)`` of the chain, read once per transaction and written back
    once, when the transaction commits, if it moved (:meth:`Store.transaction`)."""

    __slots__ = ("hash", "read_seq", "seq")

    def __init__(self, seq: int, digest: bytes) -> None:
        self.seq, self.hash = seq, digest
        self.read_seq = seq


def _audit_head(connection: Connection) -> _AuditHead:
    head = connection.info.get(_AUDIT)
    if head is None:
        row = connection.execute(
            sa.select(audit_head.c.seq, audit_head.c.hash)
            .where(audit_head.c.id == 1)
            .with_for_update()
        ).one()
        head = connection.info[_AUDIT] = _AuditHead(row.seq, bytes(row.hash))
    return head


def _write_audit_head(connection: Connection) -> None:
    head = connection.info.pop(_AUDIT, None)
    if head is not None and head.seq != head.read_seq:
        connection.execute(
            audit_head.update().where(audit_head.c.id == 1).values(seq=head.seq, hash=head.hash)
        )


_AUDIT = "tapsign.audit-head"
_INSERT_AUDIT = audit_log.insert()


def append_audit(
    connection: Connection,
    *,
    at: datetime,
    actor: str,
    action: str,
    outcome: str,
    operation_id: UUID | None = None,
    user_id: UUID | None = None,
    device_id: UUID | None = None,
    reason: str | None = None,
) -> AuditEntry:
    """Append an entry to the hash chain, in the caller's transaction.

    The head row is locked when the write transaction begins (``FOR UPDATE`` on
    PostgreSQL; SQLite write transactions are ``IMMEDIATE``) and written once, at commit.
    """
    head = _audit_head(connection)
    entry = AuditEntry(
        seq=head.seq + 1,
        at=at,
        actor=actor,
        action=action,
        operation_id=operation_id,
        user_id=user_id,
        device_id=device_id,
        outcome=outcome,
        reason=reason,
        prev_hash=head.hash,
    )
    entry_hash = audit.entry_hash(entry, entry.prev_hash)
    connection.execute(
        _INSERT_AUDIT,
        {
            "seq": entry.seq,
            "at": at,
            "actor": actor,
            "action": action,
            "operation_id": operation_id,
            "user_id": user_id,
            "device_id": device_id,
            "outcome": outcome,
            "reason": reason,
            "prev_hash": entry.prev_hash,
            "hash": entry_hash,
        },
    )
    head.seq, head.hash = entry.seq, entry_hash
    return msgspec.structs.replace(entry, hash=entry_hash)


def read_audit(connection: Connection) -> tuple[list[AuditEntry], int, bytes]:
    """Every entry in ``seq`` order, and the head's ``(seq, hash)``."""
    head = connection.execute(sa.select(audit_head.c.seq, audit_head.c.hash)).one()
    entries = [
        AuditEntry(
            seq=row.seq,
            at=_required_utc(row.at),
            actor=row.actor,
            action=row.action,
            operation_id=row.operation_id,
            user_id=row.user_id,
            device_id=row.device_id,
            outcome=row.outcome,
            reason=row.reason,
            prev_hash=bytes(row.prev_hash),
            hash=bytes(row.hash),
        )
        for row in connection.execute(audit_log.select().order_by(audit_log.c.seq))
    ]
    return entries, head.seq, bytes(head.hash)


# -- access keys and one-time tokens ----------------------------------------------------


class AccessKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    secret_hash: bytes
    scopes: frozenset[str]
    callback_url: str | None
    created_at: datetime
    revoked_at: datetime | None = None
    #: May start authentications without user verification (possession only).
    possession_only: bool = False


def insert_access_key(connection: Connection, record: AccessKeyRecord) -> None:
    connection.execute(
        access_keys.insert().values(
            id=record.id,
            name=record.name,
            secret_hash=record.secret_hash,
            scopes=" ".join(sorted(record.scopes)),
            callback_url=record.callback_url,
            created_at=record.created_at,
            revoked_at=record.revoked_at,
            possession_only=record.possession_only,
        )
    )


def _access_key(row: sa.Row[Any]) -> AccessKeyRecord:
    return AccessKeyRecord(
        id=row.id,
        name=row.name,
        secret_hash=bytes(row.secret_hash),
        scopes=frozenset(row.scopes.split()),
        callback_url=row.callback_url,
        created_at=_required_utc(row.created_at),
        revoked_at=_utc(row.revoked_at),
        possession_only=row.possession_only,
    )


def get_access_key(connection: Connection, key_id: str) -> AccessKeyRecord | None:
    row = connection.execute(access_keys.select().where(access_keys.c.id == key_id)).first()
    return None if row is None else _access_key(row)


def list_access_keys(connection: Connection) -> list[AccessKeyRecord]:
    rows = connection.execute(access_keys.select().order_by(access_keys.c.created_at))
    return [_access_key(row) for row in rows]


def revoke_access_key(connection: Connection, key_id: str, now: datetime) -> bool:
    result = connection.execute(
        access_keys.update()
        .where(access_keys.c.id == key_id, access_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return result.rowcount == 1


def consume_token(connection: Connection, jti: str, *, now: datetime, expires_at: datetime) -> bool:
    """Record a one-time token as used; False if it was used before (a replay)."""
    connection.execute(consumed_tokens.delete().where(consumed_tokens.c.expires_at < now))
    insert = sqlite_insert if connection.dialect.name == "sqlite" else postgresql_insert
    result = connection.execute(
        insert(consumed_tokens)
        .values(jti=jti, consumed_at=now, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=["jti"]),
        # SQLAlchemy reports the row count of an INSERT only when asked (PostgreSQL: -1).
        execution_options={"preserve_rowcount": True},
    )
    return result.rowcount == 1
