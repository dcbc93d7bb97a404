"""Engine fixtures: a migrated store on SQLite and, where it runs, on PostgreSQL.

PostgreSQL is found through ``TAPSIGN_TEST_DATABASE_URL`` or the local server this project's
machines run (127.0.0.1:5432, trust auth, database ``test``); every test gets a schema of
its own, dropped afterwards. Without a server the PostgreSQL half is skipped, with the reason.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from engine.service import Engine
from engine.settings import CallbackSettings, DatabaseSettings, EngineSettings
from engine.store import Store
from hsm.keyring import Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import Pkcs11Token
from hsm.verifier import BatchVerifier
from hsm.verify_backends import OpenSSLVerifyBackend

POSTGRES_URL = os.environ.get(
    "TAPSIGN_TEST_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)


def _postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure to connect means: skip, and say why
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}"
    return None


POSTGRES_MISSING = _postgres_available()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tapsign.db'}"
        return
    if POSTGRES_MISSING:
        pytest.skip(POSTGRES_MISSING)
    schema = f"test_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(DatabaseSettings(url=database_url, pool_size=4))
    store.migrate()
    yield store
    store.close()


@contextmanager
def clock_stopped(clock: trio.testing.MockClock) -> Iterator[None]:
    """Mock time stands still inside: no autojump while set-up waits for worker threads.

    The autojump clock jumps whenever every task waits, and waiting for a database thread
    counts; under load, set-up could otherwise let minutes of retries and deadlines pass.
    """
    threshold = clock.autojump_threshold
    clock.autojump_threshold = math.inf
    try:
        yield
    finally:
        clock.autojump_threshold = threshold


class TrioWallClock:
    """A UTC wall clock that follows Trio's clock, so MockClock jumps move it too."""

    def __init__(self) -> None:
        self._origin: tuple[datetime, float] | None = None

    def __call__(self) -> datetime:
        now = trio.current_time()
        if self._origin is None:
            self._origin = (datetime.now(UTC), now)
        wall, start = self._origin
        return wall + timedelta(seconds=now - start)


@pytest.fixture
def keyring(token: Pkcs11Token) -> Keyring:
    keyring = Keyring(Pkcs11KeyStore(token))
    keyring.ensure()
    return keyring


EngineFactory = Callable[..., AbstractAsyncContextManager[Engine]]


@pytest.fixture
def engine_factory(database_url: str, keyring: Keyring) -> EngineFactory:
    """Make engines on one database (several of them: a restart, or two processes)."""
    clock = TrioWallClock()

    @asynccontextmanager
    async def running(
        callbacks: CallbackSettings | None = None, peers_dir: str | None = None
    ) -> AsyncIterator[Engine]:
        engine = Engine(
            EngineSettings(
                database=DatabaseSettings(url=database_url, pool_size=4),
                # The tests' receivers listen on the loopback interface.
                callbacks=callbacks or CallbackSettings(allow_private_networks=True),
                peers_dir=peers_dir,
            ),
            keyring=keyring,
            verifier=BatchVerifier(OpenSSLVerifyBackend(), workers=2),
            issuer=ISSUER,
            clock=clock,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()

    return running


@pytest.fixture
async def engine(engine_factory: EngineFactory) -> AsyncIterator[Engine]:
    async with engine_factory() as running:
        yield running


ISSUER = "https://tapsign.test"
