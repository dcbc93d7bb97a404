"""``tapsign bench memory``, its second figure: resident memory per *resumed* operation.

Stores ``count`` pending operations (one per user, each user with one phone) in a scratch
SQLite database, starts an engine on it (whose supervisor resumes every one of them as an
actor, as after a restart), and reports the growth of the process's resident set divided
by ``count``. The first figure, memory per operation started through the API, is
``api/benchmark.py``'s; this one isolates the engine from the HTTP server.
"""

from __future__ import annotations

import gc
import os
import resource
import secrets
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import msgspec
import trio
import trio.testing
from sqlalchemy.engine import Connection

from engine import statements as db
from engine.model import Device, DeviceStatus, Operation, Payee, Payment, Phase, User, UserStatus
from engine.service import Engine
from engine.settings import DatabaseSettings, EngineSettings
from hsm.keyring import Keyring
from hsm.verifier import BatchVerifier
from hsm.verify_backends import OpenSSLVerifyBackend
from tapsign_sdk.model import OperationKind


class MemoryReport(msgspec.Struct, frozen=True, kw_only=True):
    #: "api": started over HTTP (api/benchmark.py); "resumed": from the database.
    path: str
    operations: int
    resident_before_mib: float
    resident_after_mib: float
    bytes_per_operation: float


def resident_bytes(pid: int | None = None) -> int:
    """The resident set size of process ``pid`` (None: this one), from Linux's /proc;
    elsewhere this process's peak, from getrusage."""
    statm = Path(f"/proc/{pid or 'self'}/statm")
    if statm.exists() or pid is not None:
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - macOS


def seed_users(connection: Connection, count: int) -> list[tuple[User, Device]]:
    """``count`` active users named ``memory-bench-N``, each with one active phone."""
    now = datetime.now(UTC)
    users = [
        User(
            id=uuid4(),
            username=f"memory-bench-{number}",
            status=UserStatus.ACTIVE,
            attributes={},
            created_at=now,
            updated_at=now,
        )
        for number in range(count)
    ]
    devices = [
        Device(
            id=uuid4(),
            user_id=user.id,
            name="phone",
            platform="ios",
            public_key=b"\x04" + secrets.token_bytes(64),
            status=DeviceStatus.ACTIVE,
            enrolled_at=now,
            updated_at=now,
        )
        for user in users
    ]
    for user, device in zip(users, devices, strict=True):
        db.insert_user(connection, user)
        db.insert_device(connection, device)
    return list(zip(users, devices, strict=True))


def _seed(engine: Engine, count: int) -> None:
    now = datetime.now(UTC)
    payment = Payment(amount="42.00", currency="EUR", payee=Payee(name="Shop", account="DE89 3704"))
    with engine.store.transaction(write=True) as connection:
        db.insert_operations(
            connection,
            [
                Operation(
                    id=uuid4(),
                    kind=OperationKind.AUTHORISATION,
                    user_id=user.id,
                    device_id=device.id,
                    phase=Phase.CREATED,
                    version=1,
                    challenge=secrets.token_bytes(32),
                    created_at=now,
                    updated_at=now,
                    expires_at=now + timedelta(seconds=300),
                    message="Pay 42.00 EUR to Shop",
                    payment=payment,
                    require_user_verification=True,
                )
                for user, device in seed_users(connection, count)
            ],
        )


async def _measure(keyring: Keyring, count: int, directory: str) -> MemoryReport:
    engine = Engine(
        EngineSettings(
            database=DatabaseSettings(
                url=f"sqlite:///{directory}/bench.db", sqlite_synchronous="NORMAL"
            )
        ),
        keyring=keyring,
        verifier=BatchVerifier(OpenSSLVerifyBackend(), workers=1),
        issuer="https://tapsign.bench",
    )
    await trio.to_thread.run_sync(engine.store.migrate)
    await trio.to_thread.run_sync(_seed, engine, count)
    gc.collect()
    before = resident_bytes()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        while engine.supervisor.statistics().live_operations < count:  # noqa: ASYNC110
            await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = resident_bytes()
        nursery.cancel_scope.cancel()
    return MemoryReport(
        path="resumed",
        operations=count,
        resident_before_mib=round(before / 2**20, 1),
        resident_after_mib=round(after / 2**20, 1),
        bytes_per_operation=round((after - before) / count, 1),
    )


def bench_memory(keyring: Keyring, *, count: int) -> MemoryReport:
    with tempfile.TemporaryDirectory() as directory:
        return trio.run(_measure, keyring, count, directory)
