"""Routes in process: the whole application (engine, SoftHSM2 token, SQLite) driven through
Quart's test client, without a server process or a socket. Request in, response out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio

from api.access import AccessKeys
from api.server import build_app
from api.settings import ServerSettings, Settings
from engine.model import utc_now
from engine.settings import CallbackSettings, DatabaseSettings
from engine.store import Store
from hsm.keyring import Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import Pkcs11Token
from hsm.settings import HsmSettings
from tests.conftest import USER_PIN


class InProcess:
    """An application running in this process, its test client and an access key."""

    def __init__(self, app: QuartTrio, client: TestClientProtocol, access_key: str) -> None:
        self.app = app
        self.client = client
        self.headers = {"Authorization": f"Bearer {access_key}"}


def app_settings(hsm: HsmSettings, directory: Path) -> Settings:
    return Settings(
        hsm=hsm,
        database=DatabaseSettings(url=f"sqlite:///{directory}/tapsign.db"),
        server=ServerSettings(peers_dir=str(directory / "peers")),
    )


async def _access_key(database: DatabaseSettings) -> str:
    store = Store(database)
    try:
        await trio.to_thread.run_sync(store.migrate)
        _, key = await AccessKeys(store, clock=utc_now).create(
            name="route tests", callbacks=CallbackSettings()
        )
        return key
    finally:
        store.close()


@pytest.fixture
async def in_process(
    token: Pkcs11Token, hsm_settings: HsmSettings, tmp_path: Path
) -> AsyncIterator[InProcess]:
    Keyring(Pkcs11KeyStore(token)).ensure()
    settings = app_settings(hsm_settings, tmp_path)
    access_key = await _access_key(settings.database)
    app = build_app(settings, {"TAPSIGN_HSM_PIN": USER_PIN})
    async with app.test_app() as running:
        yield InProcess(app, running.test_client(), access_key)
