"""A device request signed with the device key: no bearer secret lives on the phone.

An enrolled phone signs each request to the device API (fetching its pending operations,
answering one) with its P-256 key over these lines, joined by ``\\n``::

    tapsign-device-request/1
    <METHOD>
    <path, with its query string>
    <timestamp: unix seconds>
    <nonce: 16 to 64 base64url characters>
    <base64url SHA-256 of the body, empty body included>

and sends ``Tapsign-Authenticator`` (its id), ``Tapsign-Timestamp``, ``Tapsign-Nonce`` and
``Tapsign-Signature`` (DER or raw ``r || s``, base64url). Defined here only: the server
checks requests against :func:`canonical_request` (docs/reference/device-protocol.md).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Protocol
from uuid import UUID

from tapsign_sdk.payload import b64url

FORMAT = "tapsign-device-request/1"
HEADER_AUTHENTICATOR = "Tapsign-Authenticator"
HEADER_TIMESTAMP = "Tapsign-Timestamp"
HEADER_NONCE = "Tapsign-Nonce"
HEADER_SIGNATURE = "Tapsign-Signature"


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes a phone signs for one request."""
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
