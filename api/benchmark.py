"""``tapsign bench memory``: resident memory per pending operation, started through the API.

The path users take: a one-process ``tapsign serve`` of this configuration (its HSM) on a
scratch SQLite database and a free loopback port; ``count`` users with a phone each are
stored in that database beforehand, then one payment approval per user is started over
HTTP (``POST /api/v1/approval``, four clients at once). The figure is the growth of the
server's resident set over those approvals divided by ``count``, after a warm-up of a
tenth as many (so that what every process allocates once is not counted).
engine/benchmark.py gives the second figure, operations resumed from the database.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import trio

from api.access import AccessKeys
from api.server import local_server
from api.settings import Settings
from engine.benchmark import MemoryReport, resident_bytes, seed_users
from engine.model import utc_now
from engine.settings import DatabaseSettings
from engine.store import Store
from tapsign_sdk.client import Client
from tapsign_sdk.wire import Payee

CLIENTS = 4
SHOP = Payee(name="Shop", account="DE89 3704 0044 0532 0130 00")


def _prepare(database: DatabaseSettings, settings: Settings, users: int) -> tuple[list[UUID], str]:
    """The users (one phone each) and an access key, stored before the server starts."""

    async def prepare() -> tuple[list[UUID], str]:
        store = Store(database)
        try:
            await trio.to_thread.run_sync(store.migrate)
            with store.transaction(write=True) as connection:
                seeded = seed_users(connection, users)
            _, key = await AccessKeys(store, clock=utc_now).create(
                name="bench memory", callbacks=settings.callbacks
            )
            return [user.id for user, _ in seeded], key
        finally:
            store.close()

    return trio.run(prepare)


def _approve(url: str, access_key: str, users: Sequence[UUID]) -> None:
    """One payment approval per user, from ``CLIENTS`` clients at once."""

    def run(share: Sequence[UUID]) -> None:
        with Client(url, access_key) as client:
            for user_id in share:
                client.approve(user_id=user_id, amount="42.00", currency="EUR", payee=SHOP)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in [pool.submit(run, users[part::CLIENTS]) for part in range(CLIENTS)]:
            done.result()


def bench_memory_api(settings: Settings, *, count: int, config: str | None) -> MemoryReport:
    """``config``: the configuration file the server reads (None: the default lookup)."""
    warm_up = max(count // 10, 10)
    with tempfile.TemporaryDirectory() as directory:
        database = DatabaseSettings(url=f"sqlite:///{directory}/bench.db")
        users, access_key = _prepare(database, settings, warm_up + count)
        environment = {
            **os.environ,
            "TAPSIGN_DATABASE_URL": database.url,
            "TAPSIGN_SERVER_PEERS_DIR": f"{directory}/peers",
            **({"TAPSIGN_CONFIG": config} if config else {}),
        }
        with local_server("benchmark", environment=environment, workers=1) as (pid, url):
            _approve(url, access_key, users[:warm_up])
            time.sleep(1)
            before = resident_bytes(pid)
            _approve(url, access_key, users[warm_up:])
            time.sleep(1)
            after = resident_bytes(pid)
    return MemoryReport(
        path="api",
        operations=count,
        resident_before_mib=round(before / 2**20, 1),
        resident_after_mib=round(after / 2**20, 1),
        bytes_per_operation=round((after - before) / count, 1),
    )
