"""``tapsign bench memory``: resident memory per pending operation.

Stores ``count`` pending operations in a scratch SQLite database, starts an engine on it
(whose supervisor resumes every one of them as an actor, as after a restart), and reports
the growth of the process's resident set divided by ``count``. Resuming is the same path
that starting takes after the database write, without ``count`` separate transactions.
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

from engine import store as db
from engine.model import Device, DeviceStatus, Operation, Payee, Payment, Phase, User, UserStatus
from engine.service import Engine
from engine.settings import DatabaseSettings, EngineSettings
from hsm.keyring import Keyring
from hsm.verifier import BatchVerifier
from hsm.verify_backends import OpenSSLVerifyBackend
from tapsign_sdk.model import OperationKind


class MemoryReport(msgspec.Struct, frozen=True, kw_only=True):
    operations: int
    resident_before_mib: float
    resident_after_mib: float
    bytes_per_operation: float


def resident_bytes() -> int:
    """The current resident set size (Linux /proc; elsewhere the peak, from getrusage)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - macOS


def _seed(engine: Engine, count: int) -> None:
    now = datetime.now(UTC)
    user = User(
        id=uuid4(),
        username="memory-bench",
        status=UserStatus.ACTIVE,
        attributes={},
        created_at=now,
        updated_at=now,
    )
    device = Device(
        id=uuid4(),
        user_id=user.id,
        name="phone",
        platform="ios",
        public_key=b"\x04" + secrets.token_bytes(64),
        status=DeviceStatus.ACTIVE,
        enrolled_at=now,
        updated_at=now,
    )
    payment = Payment(amount="42.00", currency="EUR", payee=Payee(name="Shop", account="DE89 3704"))
    with engine.store.transaction(write=True) as connection:
        db.insert_user(connection, user)
        db.insert_device(connection, device)
        for start in range(0, count, 10_000):
            batch = [
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
                for _ in range(min(10_000, count - start))
            ]
            db.insert_operations(connection, batch)


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
        operations=count,
        resident_before_mib=round(before / 2**20, 1),
        resident_after_mib=round(after / 2**20, 1),
        bytes_per_operation=round((after - before) / count, 1),
    )


def bench_memory(keyring: Keyring, *, count: int) -> MemoryReport:
    with tempfile.TemporaryDirectory() as directory:
        return trio.run(_measure, keyring, count, directory)
