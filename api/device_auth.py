"""Device requests signed with the device key: no bearer secret lives on the phone.

An enrolled phone signs each request to the device API (fetching its pending operations,
answering one) with its P-256 key over::

    tapsign-device-request/1
    <METHOD>
    <path, with its query string>
    <timestamp: unix seconds>
    <nonce: 16 to 64 base64url characters>
    <base64url SHA-256 of the body, empty body included>

joined by ``\\n``, and sends ``Tapsign-Authenticator`` (its id), ``Tapsign-Timestamp``,
``Tapsign-Nonce`` and ``Tapsign-Signature`` (DER or raw ``r || s``, base64url). The server
accepts a timestamp within ``WINDOW`` of its clock and each nonce once in that window, so a
captured request cannot be replayed (docs/reference/device-protocol.md).

Nonces are remembered per process. A replay to another tapsign process within the window
could fetch the phone's pending operations (read-only); an answer cannot be replayed
anywhere, because its challenge is accepted once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol
from uuid import UUID

from api.recent import Recent
from engine.errors import NotFound, Unauthorized
from engine.model import Clock, Device, DeviceStatus
from engine.service import Engine
from hsm.errors import InvalidPublicKey

WINDOW = 60.0
FORMAT = "tapsign-device-request/1"
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
HEADER_AUTHENTICATOR = "Tapsign-Authenticator"
HEADER_TIMESTAMP = "Tapsign-Timestamp"
HEADER_NONCE = "Tapsign-Nonce"
HEADER_SIGNATURE = "Tapsign-Signature"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes a phone signs for one request (defined here only; the SDK imports it)."""
    lines = (FORMAT, method.upper(), path, timestamp, nonce, b64url(hashlib.sha256(body).digest()))
    return "\n".join(lines).encode("utf-8")


class Signer(Protocol):
    def sign(self, payload: bytes) -> bytes: ...


def sign_headers(
    *, authenticator_id: UUID, signer: Signer, method: str, path: str, body: bytes
) -> dict[str, str]:
    """Headers of a signed device request (what the device SDK sends)."""
    timestamp = str(int(time.time()))
    nonce = secrets.token_urlsafe(18)
    signature = signer.sign(canonical_request(method, path, timestamp, nonce, body))
    return {
        HEADER_AUTHENTICATOR: str(authenticator_id),
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64url(signature),
    }


class DeviceRequests:
    """Checks signed device requests; remembers nonces for twice the window."""

    def __init__(self, engine: Engine, *, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._nonces: OrderedDict[str, float] = OrderedDict()
        #: Devices read in the last second (api/recent.py).
        self._recent: Recent[UUID, Device] = Recent(seconds=1.0, size=10_000)

    async def authenticate(
        self, *, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Device:
        """The requesting device; :class:`Unauthorized` with the specific reason otherwise.

        ``headers`` has lower-case names.
        """
        try:
            device_id = UUID(headers[HEADER_AUTHENTICATOR.lower()])
            timestamp = headers[HEADER_TIMESTAMP.lower()]
            nonce = headers[HEADER_NONCE.lower()]
            signature = base64.urlsafe_b64decode(headers[HEADER_SIGNATURE.lower()] + "==")
        except (KeyError, ValueError, binascii.Error) as exc:
            raise Unauthorized("missing or malformed device request headers") from exc
        now = self._clock().timestamp()
        if not timestamp.isdigit() or abs(int(timestamp) - now) > WINDOW:
            raise Unauthorized(f"device request timestamp outside ±{WINDOW:.0f} s")
        if not _NONCE.match(nonce):
            raise Unauthorized("malformed device request nonce")
        self._forget_old(now)
        if nonce in self._nonces:
            raise Unauthorized("device request nonce used before (replay)")
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
        if nonce in self._nonces:  # a twin request verified meanwhile
            raise Unauthorized("device request nonce used before (replay)")
        self._nonces[nonce] = now + 2 * WINDOW
        return device

    def forget(self, device_id: UUID) -> None:
        """Read the device afresh next time: its state was changed through this process."""
        self._recent.forget(device_id)

    def _forget_old(self, now: float) -> None:
        while self._nonces:
            nonce, expires = next(iter(self._nonces.items()))
            if expires > now:
                return
            del self._nonces[nonce]
