"""Every SQL statement tapsign runs, each built once at import (building one per call costs
more than running it), as functions of a connection inside a unit of work (engine/store.py):
users, devices, operations (every change a compare-and-set on ``version``), the callback
outbox (leased rows), the audit trail and its head, access keys and one-time tokens. No
domain decision is taken here: callers pass the records as the core decided them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from engine import audit
from engine.audit import AuditEntry
from engine.mappers import (
    device_of,
    device_values,
    operation_of,
    operation_values,
    required_utc,
    user_of,
    user_values,
    utc,
)
from engine.model import (
    Device,
    Operation,
    Phase,
    User,
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

# Statements are built once: building one per call costs more than running it.
_INSERT_USER = users.insert()
_USER_BY_ID = users.select().where(users.c.id == sa.bindparam("key"))
_USER_BY_NAME = users.select().where(users.c.username == sa.bindparam("key"))
_UPDATE_USER = users.update().where(users.c.id == sa.bindparam("key"))


def insert_user(connection: Connection, user: User) -> None:
    connection.execute(_INSERT_USER, user_values(user))


def get_user(connection: Connection, user_id: UUID) -> User | None:
    row = connection.execute(_USER_BY_ID, {"key": user_id}).first()
    return None if row is None else user_of(row)


def find_user(connection: Connection, username: str) -> User | None:
    row = connection.execute(_USER_BY_NAME, {"key": username}).first()
    return None if row is None else user_of(row)


def username_taken(connection: Connection, username: str) -> bool:
    found = connection.execute(sa.select(users.c.id).where(users.c.username == username)).first()
    return found is not None


def update_user(connection: Connection, user: User) -> None:
    connection.execute(_UPDATE_USER, {"key": user.id, **user_values(user)})


_UPDATE_USER_IF = users.update().where(
    users.c.id == sa.bindparam("key"), users.c.status == sa.bindparam("status_was")
)


def update_user_if(connection: Connection, user: User, *, status_was: str) -> bool:
    """Store ``user`` if the stored one still has the status ``status_was``; False if it
    changed (locked, deactivated, deleted by someone else) and nothing was written."""
    values = {"key": user.id, "status_was": status_was, **user_values(user)}
    return connection.execute(_UPDATE_USER_IF, values).rowcount == 1


def delete_user(connection: Connection, user_id: UUID) -> None:
    connection.execute(devices.delete().where(devices.c.user_id == user_id))
    connection.execute(users.delete().where(users.c.id == user_id))


_INSERT_DEVICE = devices.insert()
_DEVICE_BY_ID = devices.select().where(devices.c.id == sa.bindparam("key"))
_DEVICES_OF_USER = (
    devices.select().where(devices.c.user_id == sa.bindparam("key")).order_by(devices.c.enrolled_at)
)
_UPDATE_DEVICE = devices.update().where(devices.c.id == sa.bindparam("key"))


def insert_device(connection: Connection, device: Device) -> None:
    connection.execute(_INSERT_DEVICE, device_values(device))


def get_device(connection: Connection, device_id: UUID) -> Device | None:
    row = connection.execute(_DEVICE_BY_ID, {"key": device_id}).first()
    return None if row is None else device_of(row)


def list_devices(connection: Connection, user_id: UUID) -> list[Device]:
    return [device_of(row) for row in connection.execute(_DEVICES_OF_USER, {"key": user_id})]


def update_device(connection: Connection, device: Device) -> None:
    connection.execute(_UPDATE_DEVICE, {"key": device.id, **device_values(device)})


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
        **device_values(device),
    }
    return connection.execute(_UPDATE_DEVICE_IF, values).rowcount == 1


_INSERT_OPERATION = operations.insert()
_OPERATION_BY_ID = operations.select().where(operations.c.id == sa.bindparam("key"))
_COMPARE_AND_SET = operations.update().where(
    operations.c.id == sa.bindparam("key"), operations.c.version == sa.bindparam("expected")
)


def insert_operations(connection: Connection, batch: Sequence[Operation]) -> None:
    connection.execute(_INSERT_OPERATION, [operation_values(operation) for operation in batch])


#: The PostgreSQL channel on which stored changes of operations are announced (engine/peers.py).
CHANGES_CHANNEL = "tapsign_operations"
_NOTIFY = sa.select(sa.func.pg_notify(sa.bindparam("channel"), sa.bindparam("payload")))


def notify_changed(connection: Connection, operation: Operation, *, origin: str) -> None:
    """On PostgreSQL, announce ``operation``'s new version to every listening process, in
    the transaction that stores it: delivered when it commits, never if it rolls back.
    ``origin`` names the announcing process (it ignores its own notices). Nothing on SQLite,
    whose processes are on one host and hear of changes over Unix sockets."""
    if connection.dialect.name == "postgresql":
        payload = f"{operation.id.hex}:{operation.version}:{origin}"
        connection.execute(_NOTIFY, {"channel": CHANGES_CHANNEL, "payload": payload})


#: The payload of a notice that an access key, device or user changed status (revoked,
#: locked, unlocked, deactivated, deleted): every process forgets what it cached of them.
RECORDS_CHANGED = "records"


def notify_records_changed(connection: Connection) -> None:
    """On PostgreSQL, tell every process of every host, when this transaction commits, that
    an access key, device or user changed status, so that none keeps a cached copy
    (engine/peers.py). On SQLite the changing process tells the others itself."""
    if connection.dialect.name == "postgresql":
        connection.execute(_NOTIFY, {"channel": CHANGES_CHANNEL, "payload": RECORDS_CHANGED})


#: The payload of a notice that callbacks nobody holds wait in the outbox: every process
#: claims what it can at once instead of at its next rescan (engine/callbacks.py).
OUTBOX_WAITING = "outbox"


def notify_outbox_waiting(connection: Connection) -> None:
    """On PostgreSQL, tell every process, when this transaction commits, that callbacks
    nobody holds wait (a command wrote them). On SQLite the command tells the sockets."""
    if connection.dialect.name == "postgresql":
        connection.execute(_NOTIFY, {"channel": CHANGES_CHANNEL, "payload": OUTBOX_WAITING})


def operation_versions(connection: Connection, ids: Sequence[UUID]) -> dict[UUID, int]:
    """The stored version of each of ``ids`` (one query per ten thousand)."""
    versions: dict[UUID, int] = {}
    for start in range(0, len(ids), 10_000):
        chunk = list(ids[start : start + 10_000])
        query = sa.select(operations.c.id, operations.c.version).where(operations.c.id.in_(chunk))
        versions.update((row.id, row.version) for row in connection.execute(query))
    return versions


def get_operation(connection: Connection, operation_id: UUID) -> Operation | None:
    row = connection.execute(_OPERATION_BY_ID, {"key": operation_id}).first()
    return None if row is None else operation_of(row)


def update_operation(
    connection: Connection, operation: Operation, *, expected_version: int
) -> bool:
    """Store ``operation`` if the stored one still has ``expected_version`` (compare-and-set).

    False means another actor or process changed it first: nothing was written.
    """
    result = connection.execute(
        _COMPARE_AND_SET,
        {"key": operation.id, "expected": expected_version, **operation_values(operation)},
    )
    return result.rowcount == 1


_PENDING = [phase.value for phase in (Phase.CREATED, Phase.DISPATCHED, Phase.RESPONDED)]


def overdue_operations(connection: Connection, *, before: datetime, limit: int) -> list[Operation]:
    """Pending operations whose deadline was before ``before``, earliest first."""
    rows = connection.execute(
        operations.select()
        .where(operations.c.phase.in_(_PENDING), operations.c.expires_at < before)
        .order_by(operations.c.expires_at)
        .limit(limit)
    )
    return [operation_of(row) for row in rows]


def pending_operations(connection: Connection) -> list[Operation]:
    rows = connection.execute(
        operations.select()
        .where(operations.c.phase.in_(_PENDING))
        .order_by(operations.c.expires_at)
    )
    return [operation_of(row) for row in rows]


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
    return [operation_of(row) for row in rows]


def pending_for_user(connection: Connection, user_id: UUID) -> list[Operation]:
    rows = connection.execute(
        operations.select().where(operations.c.user_id == user_id, operations.c.phase.in_(_PENDING))
    )
    return [operation_of(row) for row in rows]


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


class Lease(msgspec.Struct, frozen=True):
    """An outbox row is delivered by ``holder`` (a process's name in notices) alone until
    ``until`` unless renewed (engine/callbacks.py)."""

    holder: str
    until: datetime


def insert_outbox(
    connection: Connection,
    *,
    operation_id: UUID | None,
    event: str,
    url: str,
    body: bytes,
    now: datetime,
    lease: Lease | None,
) -> tuple[int, Lease | None]:
    """Write a callback, held under ``lease`` if it is the writer's turn to send the
    operation's callbacks (:func:`_in_turn`); returns its id and the lease it got. One
    written without a lease (by a command) is announced to every process on PostgreSQL,
    so that one claims it at once."""
    if lease is None:
        notify_outbox_waiting(connection)
    lease = _in_turn(connection, operation_id, lease)
    result = connection.execute(
        outbox.insert().values(
            operation_id=operation_id,
            event=event,
            url=url,
            body=body,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
            lease_until=None if lease is None else lease.until,
            leased_by=None if lease is None else lease.holder,
        )
    )
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - every supported database returns the new id
        raise RuntimeError("the database did not return the new outbox id")
    return int(key[0]), lease


_UNFINISHED = (outbox.c.delivered_at.is_(None), outbox.c.failed_at.is_(None))


def _in_turn(
    connection: Connection, operation_id: UUID | None, lease: Lease | None
) -> Lease | None:
    """``lease``, unless an unfinished callback of the operation is held by another process
    or by none (a relying party's callbacks of one transaction arrive in order, and one
    process queues them): then None, and the row waits unheld until the earlier ones are
    sent or given up, to be claimed (:func:`claim_undelivered`)."""
    if lease is None or operation_id is None:
        return lease
    elsewhere = connection.execute(
        sa.select(outbox.c.id)
        .where(
            outbox.c.operation_id == operation_id,
            *_UNFINISHED,
            sa.or_(outbox.c.leased_by.is_(None), outbox.c.leased_by != lease.holder),
        )
        .limit(1)
    ).first()
    return lease if elsewhere is None else None


def claim_undelivered(
    connection: Connection,
    *,
    now: datetime,
    lease: Lease,
    held: Sequence[int],
    limit: int,
) -> tuple[set[int], list[OutboxItem]]:
    """In a write transaction: extend ``lease`` over the callbacks its holder ``held`` and
    still holds, and give it at most ``limit`` others that nobody holds (never leased, as
    those a command wrote, or whose holder stopped renewing), oldest first. Returns the ids
    of ``held`` that are still the holder's (undelivered, not taken over) and the new rows.

    Writers take turns (the audit head is locked first), so no two processes claim a row;
    PostgreSQL's ``SKIP LOCKED`` keeps a claim from waiting on a row being delivered."""
    kept: set[int] = set()
    if held:
        kept = set(
            connection.execute(
                outbox.update()
                .where(outbox.c.id.in_(held), outbox.c.leased_by == lease.holder, *_UNFINISHED)
                .values(lease_until=lease.until)
                .returning(outbox.c.id)
            ).scalars()
        )
    earlier = outbox.alias("earlier")
    free = (
        sa.select(outbox.c.id)
        .where(
            *_UNFINISHED,
            sa.or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
            ~sa.exists().where(  # the operation's earlier callbacks go first
                earlier.c.operation_id == outbox.c.operation_id,
                earlier.c.id < outbox.c.id,
                earlier.c.delivered_at.is_(None),
                earlier.c.failed_at.is_(None),
            ),
        )
        .order_by(outbox.c.id)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        free = free.with_for_update(skip_locked=True)
    ids = list(connection.execute(free).scalars())
    if not ids:
        return kept, []
    connection.execute(
        outbox.update()
        .where(outbox.c.id.in_(ids))
        .values(lease_until=lease.until, leased_by=lease.holder)
    )
    rows = connection.execute(outbox.select().where(outbox.c.id.in_(ids)).order_by(outbox.c.id))
    return kept, [
        OutboxItem(
            id=row.id,
            operation_id=row.operation_id,
            event=row.event,
            url=row.url,
            body=bytes(row.body),
            attempts=row.attempts,
            created_at=required_utc(row.created_at),
            next_attempt_at=required_utc(row.next_attempt_at),
        )
        for row in rows
    ]


def record_delivery(
    connection: Connection,
    outbox_id: int,
    *,
    operation_id: UUID | None,
    now: datetime,
    delivered: bool,
    next_attempt_at: datetime | None,
    error: str | None,
) -> bool:
    """One attempt's outcome: delivered, to retry at ``next_attempt_at``, or given up.
    True if the callback is through and a later one of its operation waits, unheld, for it
    (:func:`_in_turn`): the caller claims it now rather than at its next rescan."""
    values: dict[str, Any] = {"attempts": outbox.c.attempts + 1, "last_error": error}
    if delivered:
        values["delivered_at"] = now
    elif next_attempt_at is None:
        values["failed_at"] = now
    else:
        values["next_attempt_at"] = next_attempt_at
    connection.execute(outbox.update().where(outbox.c.id == outbox_id).values(values))
    if operation_id is None or next_attempt_at is not None:
        return False
    waiting = connection.execute(
        sa.select(outbox.c.id)
        .where(
            outbox.c.operation_id == operation_id,
            outbox.c.id > outbox_id,
            outbox.c.leased_by.is_(None),
            *_UNFINISHED,
        )
        .limit(1)
    ).first()
    return waiting is not None


# -- audit ------------------------------------------------------------------------------


class AuditHead:
    """The newest ``(seq, hash)`` of the chain, read once per transaction and written back
    once, when the transaction commits, if it moved (:meth:`Store.transaction`)."""

    __slots__ = ("hash", "read_seq", "seq")

    def __init__(self, seq: int, digest: bytes) -> None:
        self.seq, self.hash = seq, digest
        self.read_seq = seq


def audit_head_of(connection: Connection) -> AuditHead:
    head = connection.info.get(_AUDIT)
    if head is None:
        row = connection.execute(
            sa.select(audit_head.c.seq, audit_head.c.hash)
            .where(audit_head.c.id == 1)
            .with_for_update()
        ).one()
        head = connection.info[_AUDIT] = AuditHead(row.seq, bytes(row.hash))
    return head


def write_audit_head(connection: Connection) -> None:
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
    head = audit_head_of(connection)
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
            at=required_utc(row.at),
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
        created_at=required_utc(row.created_at),
        revoked_at=utc(row.revoked_at),
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
    notify_records_changed(connection)
    return result.rowcount == 1


def purge_consumed_tokens(connection: Connection, *, now: datetime) -> None:
    """Forget the one-time tokens and nonces whose own lifetime is over (a replay of one
    is refused for its age by then)."""
    connection.execute(consumed_tokens.delete().where(consumed_tokens.c.expires_at < now))


def consume_token(connection: Connection, jti: str, *, now: datetime, expires_at: datetime) -> bool:
    """Record a one-time token as used; False if it was used before (a replay). Rows past
    their ``expires_at`` are purged apart (:func:`purge_consumed_tokens`): until then they
    refuse their token's replay a little longer than needed."""
    insert = sqlite_insert if connection.dialect.name == "sqlite" else postgresql_insert
    result = connection.execute(
        insert(consumed_tokens)
        .values(jti=jti, consumed_at=now, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=["jti"]),
        # SQLAlchemy reports the row count of an INSERT only when asked (PostgreSQL: -1).
        execution_options={"preserve_rowcount": True},
    )
    return result.rowcount == 1
