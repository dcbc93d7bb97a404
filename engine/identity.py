"""Users and their devices (authenticators): the identity store's rules.

(The clock is read in the Trio thread, before a unit of work goes to its worker thread.)

Usernames are opaque identifiers chosen by the relying party; they must not carry personal
data (docs/reference/limits.md). Every change is one transaction with its audit entry; bad
input raises a typed error before anything is written.

Status rules:

* a user is ``new`` until a registration succeeds, then ``active``; ``locked`` users cannot
  start or complete operations; ``deactivated`` is final and revokes every device of the
  user at once (PSD2 RTS art. 27); deactivating and deleting also cancel what the user has
  pending, so they are engine/service.py's ``end_user``;
* a device is ``active``, ``locked`` (after too many failed verifications, or by request;
  unlocking resets the failure count) or ``deactivated`` (final).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from uuid import UUID, uuid4

import msgspec
from sqlalchemy.engine import Connection

from engine import statements as db
from engine.errors import (
    DeviceNotActive,
    DeviceNotFound,
    UsernameTaken,
    UserNotActive,
    UserNotFound,
)
from engine.model import Clock, Device, DeviceStatus, User, UserStatus, utc_now
from engine.operations import check_attributes, check_username
from engine.store import Store


def require_user(connection: Connection, user_id: UUID) -> User:
    user = db.get_user(connection, user_id)
    if user is None:
        raise UserNotFound("no user with that id")
    return user


def require_device(connection: Connection, device_id: UUID) -> Device:
    device = db.get_device(connection, device_id)
    if device is None:
        raise DeviceNotFound("no authenticator with that id")
    return device


def new_user(
    connection: Connection, username: str, attributes: dict[str, str], now: datetime
) -> User:
    """Insert a ``new`` user (no device yet), after checking the username is free."""
    if db.username_taken(connection, username):
        raise UsernameTaken("that username is taken")
    user = User(
        id=uuid4(),
        username=username,
        status=UserStatus.NEW,
        attributes=attributes,
        created_at=now,
        updated_at=now,
    )
    db.insert_user(connection, user)
    return user


class Identity:
    """Users and devices, for the relying party's API and for the administrator."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock = utc_now,
        changed: Callable[[User | Device], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        #: Told of every user or device whose status this process changed, once stored
        #: (the engine's actors hold them: engine/actors.py Facts).
        self._changed = changed or (lambda record: None)

    async def create_user(
        self, username: str, attributes: Mapping[str, object] | None = None, *, actor: str
    ) -> User:
        check_username(username)
        checked = check_attributes(attributes or {})

        now = self._clock()

        def create(connection: Connection) -> User:
            user = new_user(connection, username, checked, now)
            db.append_audit(
                connection,
                at=now,
                actor=actor,
                action="user.created",
                outcome="ok",
                user_id=user.id,
            )
            return user

        return await self._store.write(create)

    async def get_user(self, user_id: UUID) -> User:
        return await self._store.read(lambda connection: require_user(connection, user_id))

    async def find_user(self, username: str) -> User:
        check_username(username)

        def find(connection: Connection) -> User:
            user = db.find_user(connection, username)
            if user is None:
                raise UserNotFound("no user with that username")
            return user

        return await self._store.read(find)

    async def update_attributes(
        self,
        user_id: UUID,
        *,
        set_attributes: Mapping[str, object] | None = None,
        remove: Iterable[str] = (),
        actor: str,
    ) -> User:
        """Set some keys and remove others; the result must still be within the limits."""
        updates = check_attributes(set_attributes or {})
        removals = list(remove)

        now = self._clock()

        def update(connection: Connection) -> User:
            user = require_user(connection, user_id)
            attributes = {
                key: value for key, value in user.attributes.items() if key not in removals
            }
            attributes.update(updates)
            check_attributes(attributes)
            changed = msgspec.structs.replace(user, attributes=attributes, updated_at=now)
            db.update_user(connection, changed)
            db.append_audit(
                connection,
                at=now,
                actor=actor,
                action="user.attributes-updated",
                outcome="ok",
                user_id=user_id,
            )
            return changed

        return await self._store.write(update)

    async def lock_user(self, user_id: UUID, *, actor: str) -> User:
        return await self._set_user_status(user_id, UserStatus.LOCKED, actor=actor)

    async def unlock_user(self, user_id: UUID, *, actor: str) -> User:
        return await self._set_user_status(user_id, UserStatus.ACTIVE, actor=actor)

    async def _set_user_status(self, user_id: UUID, target: UserStatus, *, actor: str) -> User:
        now = self._clock()
        user = await self._store.write(
            lambda connection: set_user_status(connection, user_id, target, now=now, actor=actor)
        )
        self._changed(user)
        return user

    async def list_devices(self, user_id: UUID) -> list[Device]:
        def devices(connection: Connection) -> list[Device]:
            require_user(connection, user_id)
            return db.list_devices(connection, user_id)

        return await self._store.read(devices)

    async def get_device(self, device_id: UUID) -> Device:
        return await self._store.read(lambda connection: require_device(connection, device_id))

    async def lock_device(self, device_id: UUID, *, actor: str) -> Device:
        return await self._set_device_status(device_id, DeviceStatus.LOCKED, actor=actor)

    async def unlock_device(self, device_id: UUID, *, actor: str) -> Device:
        """Active again, with the count of failed attempts reset (RTS art. 4(4))."""
        return await self._set_device_status(device_id, DeviceStatus.ACTIVE, actor=actor)

    async def deactivate_device(self, device_id: UUID, *, actor: str) -> Device:
        """Final: the device's signatures are refused from now on (RTS art. 27)."""
        return await self._set_device_status(device_id, DeviceStatus.DEACTIVATED, actor=actor)

    async def _set_device_status(
        self, device_id: UUID, target: DeviceStatus, *, actor: str
    ) -> Device:
        now = self._clock()

        def change(connection: Connection) -> Device:
            device = require_device(connection, device_id)
            if device.status is DeviceStatus.DEACTIVATED:
                raise DeviceNotActive("the authenticator is deactivated; that is final")
            unlocking = target is DeviceStatus.ACTIVE
            if device.status is target and not (unlocking and device.failed_attempts):
                return device
            if target is DeviceStatus.DEACTIVATED:
                return revoke_device(connection, device, now=now, actor=actor)
            changed = msgspec.structs.replace(
                device,
                status=target,
                failed_attempts=0 if unlocking else device.failed_attempts,
                updated_at=now,
            )
            db.update_device(connection, changed)
            db.notify_records_changed(connection)
            db.append_audit(
                connection,
                at=now,
                actor=actor,
                action="device.locked" if target is DeviceStatus.LOCKED else "device.unlocked",
                outcome="ok",
                user_id=device.user_id,
                device_id=device_id,
            )
            return changed

        device = await self._store.write(change)
        self._changed(device)
        return device


def revoke_device(connection: Connection, device: Device, *, now: datetime, actor: str) -> Device:
    changed = msgspec.structs.replace(device, status=DeviceStatus.DEACTIVATED, updated_at=now)
    db.update_device(connection, changed)
    db.notify_records_changed(connection)
    db.append_audit(
        connection,
        at=now,
        actor=actor,
        action="device.deactivated",
        outcome="ok",
        user_id=device.user_id,
        device_id=device.id,
    )
    return changed


def set_user_status(
    connection: Connection, user_id: UUID, target: UserStatus, *, now: datetime, actor: str
) -> User:
    """Lock, unlock or deactivate a user, in the caller's transaction. Deactivating is final
    and revokes every device of the user (RTS art. 27)."""
    user = require_user(connection, user_id)
    if user.status is UserStatus.DEACTIVATED:
        raise UserNotActive("the user is deactivated; that is final")
    status = target
    if target is UserStatus.ACTIVE:
        if user.status is not UserStatus.LOCKED:
            return user
        active = any(
            device.status is not DeviceStatus.DEACTIVATED
            for device in db.list_devices(connection, user_id)
        )
        status = UserStatus.ACTIVE if active else UserStatus.NEW
    elif user.status is target:
        return user
    changed = msgspec.structs.replace(user, status=status, updated_at=now)
    db.update_user(connection, changed)
    db.notify_records_changed(connection)
    action = {
        UserStatus.LOCKED: "user.locked",
        UserStatus.DEACTIVATED: "user.deactivated",
    }.get(target, "user.unlocked")
    db.append_audit(connection, at=now, actor=actor, action=action, outcome="ok", user_id=user_id)
    if target is UserStatus.DEACTIVATED:
        for device in db.list_devices(connection, user_id):
            if device.status is not DeviceStatus.DEACTIVATED:
                revoke_device(connection, device, now=now, actor=actor)
    return changed


def delete_user(connection: Connection, user_id: UUID, *, now: datetime, actor: str) -> None:
    """Delete the user and the user's devices, in the caller's transaction."""
    require_user(connection, user_id)
    db.delete_user(connection, user_id)
    db.notify_records_changed(connection)
    db.append_audit(
        connection, at=now, actor=actor, action="user.deleted", outcome="ok", user_id=user_id
    )
