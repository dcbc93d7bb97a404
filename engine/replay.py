"""A signed device request is taken once, by every process and host: its nonce is spent in
the database (the table of consumed one-time tokens, keyed by a digest of the device and
the nonce, kept for twice the window the timestamp is accepted in; api/device_auth.py).

Most requests spend their nonce in a write of its own as soon as their signature holds.
An answer spends it in the answer's own unit of work instead (engine/actors.py), so that
storing the answer and refusing its replay are one transaction and one thread hop.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from uuid import UUID

import msgspec
from sqlalchemy.engine import Connection

from engine import statements as db
from tapsign_sdk.payload import b64url
from tapsign_sdk.problems import Unauthorized


class Nonce(msgspec.Struct, frozen=True, kw_only=True):
    """A device request's nonce, to be spent: its key and until when it is remembered."""

    key: str
    seen_at: datetime
    expires_at: datetime


def nonce_of(device_id: UUID, nonce: str, *, seen_at: datetime, expires_at: datetime) -> Nonce:
    """The key is a digest (43 characters, unlike any ``jti``), so that a nonce chosen to equal
    some token's ``jti`` consumes nothing."""
    key = "n" + b64url(hashlib.sha256(device_id.bytes + nonce.encode()).digest())[:42]
    return Nonce(key=key, seen_at=seen_at, expires_at=expires_at)


def spend(connection: Connection, nonce: Nonce) -> None:
    """Spend ``nonce`` in the caller's transaction; :class:`Unauthorized` if it was spent."""
    if not db.consume_token(connection, nonce.key, now=nonce.seen_at, expires_at=nonce.expires_at):
        raise Unauthorized("device request nonce used before (replay)")
