"""Checking device requests signed with the device key (the request's canonical form is
the protocol's: tapsign_sdk/request.py; docs/reference/device-protocol.md).

The server accepts a timestamp within ``WINDOW`` of its clock and each nonce once in that
window, so a captured request cannot be replayed. Nonces are remembered in the database (the
table of consumed one-time tokens, keyed by a digest of the device and the nonce, kept for
twice the window), so every process and every host on the database refuses a nonce once it
has been used: a captured fetch replayed to another process shows nothing, and an answer's
challenge is accepted once anyway.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import timedelta
from uuid import UUID

from engine.model import Clock, Device, DeviceStatus
from engine.recent import Recent
from engine.replay import Nonce, nonce_of, spend
from engine.service import Engine
from hsm.errors import InvalidPublicKey
from tapsign_sdk.problems import NotFound, Unauthorized
from tapsign_sdk.request import (
    HEADER_AUTHENTICATOR,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    canonical_request,
)

#: Seconds a device request's timestamp may differ from the server's clock.
WINDOW = 60.0
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class DeviceRequests:
    """Checks signed device requests; remembers nonces for twice the window."""

    def __init__(self, engine: Engine, *, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        #: Devices read in the last second (engine/recent.py), forgotten when a status
        #: changes anywhere.
        self._recent: Recent[UUID, Device] = Recent(seconds=1.0, size=10_000)

    def forget_all(self) -> None:
        """An access key, device or user changed status somewhere: read devices afresh."""
        self._recent.clear()

    async def authenticate(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        spend_now: bool = True,
    ) -> tuple[Device, Nonce | None]:
        """The requesting device, and its request's nonce unless ``spend_now`` spent it
        already (the caller then spends it in its own unit of work: engine/replay.py);
        :class:`Unauthorized` with the specific reason otherwise.

        ``headers`` has lower-case names.
        """
        try:
            device_id = UUID(headers[HEADER_AUTHENTICATOR.lower()])
            timestamp = headers[HEADER_TIMESTAMP.lower()]
            nonce = headers[HEADER_NONCE.lower()]
            signature = base64.urlsafe_b64decode(headers[HEADER_SIGNATURE.lower()] + "==")
        except (KeyError, ValueError, binascii.Error) as exc:
            raise Unauthorized("missing or malformed device request headers") from exc
        now = self._clock()
        if not timestamp.isdigit() or abs(int(timestamp) - now.timestamp()) > WINDOW:
            raise Unauthorized(f"device request timestamp outside ±{WINDOW:.0f} s")
        if not _NONCE.match(nonce):
            raise Unauthorized("malformed device request nonce")
        device = self._recent.get(device_id)
        if device is None:
            try:
                device = await self._engine.identity.get_device(device_id)
            except NotFound as exc:
                raise Unauthorized(f"unknown authenticator {device_id}") from exc
            self._recent.put(device_id, device)
        if device.status is DeviceStatus.DEACTIVATED:
            raise Unauthorized(f"deactivated authenticator {device_id}")
        message = canonical_request(method, path, timestamp, nonce, body)
        try:
            valid = await self._engine.verifier.verify(
                public_key=device.public_key, message=message, signature=signature
            )
        except InvalidPublicKey as exc:  # pragma: no cover - stored keys were validated
            raise Unauthorized("the authenticator's stored key is unusable") from exc
        if not valid:
            raise Unauthorized(f"bad device request signature from {device_id}")
        # Spent only once the signature holds: nobody spends another device's nonces.
        used = nonce_of(
            device_id, nonce, seen_at=now, expires_at=now + timedelta(seconds=2 * WINDOW)
        )
        if not spend_now:
            return device, used
        await self._engine.store.write(lambda connection: spend(connection, used))
        return device, None

    def forget(self, device_id: UUID) -> None:
        """Read the device afresh next time: its state was changed through this process."""
        self._recent.forget(device_id)
