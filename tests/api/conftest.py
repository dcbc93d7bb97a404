"""Routes in process: the whole application (engine, SoftHSM2 token, SQLite) driven through
Quart's test client, without a server process or a socket. Request in, response out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import trio
from quart.testing import QuartClient
from quart_trio import QuartTrio

from api.access import AccessKeys
from api.server import build_app
from api.settings import ServerSettings, Settings
from engine import statements as db
from engine.model import Device, DeviceStatus, User, UserStatus, utc_now
from engine.settings import CallbackSettings, DatabaseSettings
from engine.store import Store
from hsm.keyring import Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import Pkcs11Token
from hsm.settings import HsmSettings
from tapsign_sdk.device import Authenticator
from tapsign_sdk.request import sign_headers
from tests.conftest import USER_PIN


class InProcess:
    """An application running in this process, its test client, an access key, and a user
    (``alice``) with an enrolled phone."""

    def __init__(
        self,
        app: QuartTrio,
        client: QuartClient,
        access_key: str,
        phone: tuple[Authenticator, UUID],
    ) -> None:
        self.app = app
        self.client = client
        self.headers = {"Authorization": f"Bearer {access_key}"}
        self.phone, self.device_id = phone

    def signed(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """The headers of ``method path`` with ``body`` signed by the phone."""
        return sign_headers(
            authenticator_id=self.device_id,
            signer=self.phone,
            method=method,
            path=path,
            body=body,
        )


def app_settings(hsm: HsmSettings, directory: Path) -> Settings:
    return Settings(
        hsm=hsm,
        database=DatabaseSettings(url=f"sqlite:///{directory}/tapsign.db"),
        server=ServerSettings(peers_dir=str(directory / "peers")),
    )


async def _prepare(database: DatabaseSettings) -> tuple[str, tuple[Authenticator, UUID]]:
    """An access key, and alice with her phone, stored before the app starts."""
    store = Store(database)
    try:
        await trio.to_thread.run_sync(store.migrate)
        _, key = await AccessKeys(store, clock=utc_now).create(
            name="route tests", callbacks=CallbackSettings()
        )
        phone = Authenticator()
        now = utc_now()
        user = User(
            id=uuid4(),
            username="alice",
            status=UserStatus.ACTIVE,
            attributes={},
            created_at=now,
            updated_at=now,
        )
        device = Device(
            id=(device_id := uuid4()),
            user_id=user.id,
            name="phone",
            platform="ios",
            public_key=phone.public_key,
            status=DeviceStatus.ACTIVE,
            enrolled_at=now,
            updated_at=now,
        )
        with store.transaction(write=True) as connection:
            db.insert_user(connection, user)
            db.insert_device(connection, device)
        return key, (phone, device_id)
    finally:
        store.close()


@pytest.fixture
async def in_process(
    token: Pkcs11Token, hsm_settings: HsmSettings, tmp_path: Path
) -> AsyncIterator[InProcess]:
    Keyring(Pkcs11KeyStore(token)).ensure()
    settings = app_settings(hsm_settings, tmp_path)
    access_key, phone = await _prepare(settings.database)
    app = build_app(settings, {"TAPSIGN_HSM_PIN": USER_PIN})
    async with app.test_app() as running:
        client = running.test_client()
        assert isinstance(client, QuartClient)  # quart.typing's protocol lacks open()'s defaults
        yield InProcess(app, client, access_key, phone)
