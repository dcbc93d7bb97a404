"""The identity store on SQLite and PostgreSQL: users, devices, limits, audit."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa

from engine import statements as db
from engine.errors import (
    DeviceNotActive,
    DeviceNotFound,
    UsernameTaken,
    UserNotActive,
    UserNotFound,
)
from engine.identity import Identity
from engine.model import Device, DeviceStatus, UserStatus, utc_now
from engine.schema import audit_log, users
from engine.service import end_user
from engine.store import Store
from tapsign_sdk.problems import InvalidInput


@pytest.fixture
def identity(store: Store) -> Identity:
    return Identity(store)


def count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def add_device(store: Store, user_id: UUID, status: DeviceStatus = DeviceStatus.ACTIVE) -> Device:
    now = datetime.now(UTC)
    device = Device(
        id=uuid4(),
        user_id=user_id,
        name="phone",
        platform="ios",
        public_key=b"\x04" + bytes(64),
        status=status,
        enrolled_at=now,
        updated_at=now,
        failed_attempts=3,
    )
    with store.transaction(write=True) as connection:
        db.insert_device(connection, device)
    return device


async def test_create_get_find_and_update_attributes(identity: Identity, store: Store) -> None:
    user = await identity.create_user("user-17@bank", {"tier": "gold"}, actor="admin")
    assert user.status is UserStatus.NEW
    assert user.created_at.tzinfo is not None
    assert await identity.get_user(user.id) == user
    assert await identity.find_user("user-17@bank") == user

    updated = await identity.update_attributes(
        user.id, set_attributes={"segment": "retail"}, remove=["tier"], actor="admin"
    )
    assert updated.attributes == {"segment": "retail"}
    assert (await identity.get_user(user.id)).attributes == {"segment": "retail"}
    assert count(store, audit_log) == 2


@pytest.mark.parametrize(
    ("username", "attributes", "error", "message"),
    [
        ("has space", None, InvalidInput, r"^username must be 1 to 300 characters"),
        ("", None, InvalidInput, r"^username must be"),
        ("x" * 301, None, InvalidInput, r"^username must be"),
        ("ok", {f"k{i}": "v" for i in range(33)}, InvalidInput, r"^at most 32 attributes$"),
        ("ok", {"bad key": "v"}, InvalidInput, r"^attribute names are 1 to 64 characters"),
        ("ok", {"k": "v" * 1025}, InvalidInput, r"^attribute k: values are strings of at most"),
        ("ok", {"k": 5}, InvalidInput, r"^attribute k: values are strings"),
    ],
)
async def test_bad_input_writes_nothing(
    identity: Identity,
    store: Store,
    username: str,
    attributes: dict[str, object] | None,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await identity.create_user(username, attributes, actor="admin")
    assert count(store, users) == 0
    assert count(store, audit_log) == 0


async def test_username_is_unique(identity: Identity, store: Store) -> None:
    await identity.create_user("alice", actor="admin")
    with pytest.raises(UsernameTaken, match=r"^that username is taken$"):
        await identity.create_user("alice", actor="admin")
    assert count(store, users) == 1


async def test_attribute_update_over_the_limit_changes_nothing(identity: Identity) -> None:
    user = await identity.create_user("bob", {f"k{i}": "v" for i in range(32)}, actor="admin")
    with pytest.raises(InvalidInput, match=r"^at most 32 attributes$"):
        await identity.update_attributes(user.id, set_attributes={"one-more": "v"}, actor="admin")
    assert (await identity.get_user(user.id)).attributes == user.attributes


async def test_unknown_ids(identity: Identity) -> None:
    with pytest.raises(UserNotFound, match=r"^no user with that id$"):
        await identity.get_user(uuid4())
    with pytest.raises(UserNotFound, match=r"^no user with that username$"):
        await identity.find_user("nobody")
    with pytest.raises(UserNotFound):
        await identity.lock_user(uuid4(), actor="admin")
    with pytest.raises(DeviceNotFound, match=r"^no authenticator with that id$"):
        await identity.get_device(uuid4())


async def test_lock_unlock_and_final_deactivation(identity: Identity, store: Store) -> None:
    user = await identity.create_user("carol", actor="admin")
    first = add_device(store, user.id)
    second = add_device(store, user.id)
    assert (await identity.lock_user(user.id, actor="admin")).status is UserStatus.LOCKED
    # Unlocked, the user is active again because it has devices.
    assert (await identity.unlock_user(user.id, actor="admin")).status is UserStatus.ACTIVE

    deactivated, _ = await end_user(
        store, user.id, delete=False, actor="admin", clock=utc_now, lease=None
    )
    assert deactivated is not None
    assert deactivated.status is UserStatus.DEACTIVATED
    devices = await identity.list_devices(user.id)
    assert {device.id for device in devices} == {first.id, second.id}
    assert {device.status for device in devices} == {DeviceStatus.DEACTIVATED}
    with pytest.raises(UserNotActive, match=r"^the user is deactivated; that is final$"):
        await identity.unlock_user(user.id, actor="admin")


async def test_device_lock_unlock_resets_failures_deactivate_is_final(
    identity: Identity, store: Store
) -> None:
    user = await identity.create_user("dave", actor="admin")
    device = add_device(store, user.id)
    locked = await identity.lock_device(device.id, actor="admin")
    assert (locked.status, locked.failed_attempts) == (DeviceStatus.LOCKED, 3)
    unlocked = await identity.unlock_device(device.id, actor="admin")
    assert (unlocked.status, unlocked.failed_attempts) == (DeviceStatus.ACTIVE, 0)
    await identity.deactivate_device(device.id, actor="admin")
    with pytest.raises(DeviceNotActive, match=r"^the authenticator is deactivated; that is final$"):
        await identity.unlock_device(device.id, actor="admin")
    actions = await store.read(lambda connection: [e.action for e in db.read_audit(connection)[0]])
    assert actions == ["user.created", "device.locked", "device.unlocked", "device.deactivated"]


async def test_delete_removes_user_and_devices_but_not_the_audit_trail(
    identity: Identity, store: Store
) -> None:
    user = await identity.create_user("erin", actor="admin")
    add_device(store, user.id)
    await end_user(store, user.id, delete=True, actor="admin", clock=utc_now, lease=None)
    with pytest.raises(UserNotFound):
        await identity.get_user(user.id)
    entries, head, _ = await store.read(db.read_audit)
    assert [entry.action for entry in entries] == ["user.created", "user.deleted"]
    assert all(entry.user_id == user.id for entry in entries)
    assert head == 2
