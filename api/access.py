"""Relying-party access keys: random, shown once, stored only as a hash, scoped.

An access key reads ``tsk_<key id>_<secret>``. The key id finds the record; the SHA-256 of
the secret is compared in constant time with the stored one. A 256-bit random secret needs
no slow hash: guessing it is out of reach, and only its hash is on disk.

Scopes separate duties: ``users`` (user and authenticator management), ``operations``
(start, status, cancel, intent tokens), ``introspect`` (RFC 7662 token introspection).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from sqlalchemy.engine import Connection

from engine import statements as db
from engine.callbacks import check_destination
from engine.model import Clock
from engine.recent import Recent
from engine.settings import CallbackSettings
from engine.statements import AccessKeyRecord
from engine.store import Store
from tapsign_sdk.problems import InvalidInput, NotFound, Unauthorized
from tapsign_sdk.wire import CALLBACK_URL

SCOPES = frozenset({"users", "operations", "introspect"})
PREFIX = "tsk"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class AccessKeys:
    def __init__(self, store: Store, *, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        #: Revocation reaches the other processes with its change notice, or at the latest
        #: within this second (engine/recent.py).
        self._recent: Recent[str, AccessKeyRecord] = Recent(seconds=1.0, size=1024)

    def forget_all(self) -> None:
        """An access key, device or user changed status somewhere: read keys afresh."""
        self._recent.clear()

    async def create(
        self,
        *,
        name: str,
        scopes: Iterable[str] = SCOPES,
        callback_url: str | None = None,
        callbacks: CallbackSettings,
        possession_only: bool = False,
    ) -> tuple[AccessKeyRecord, str]:
        """A new key and its one-time display form ``tsk_<id>_<secret>``. ``callbacks`` are
        the settings its callback URL must keep to; ``possession_only`` lets it start
        authentications without user verification."""
        wanted = frozenset(scopes)
        if not wanted or not wanted <= SCOPES:
            raise InvalidInput(f"scopes are some of {', '.join(sorted(SCOPES))}", field="scopes")
        if not 1 <= len(name) <= 100:
            raise InvalidInput("a key name has 1 to 100 characters", field="name")
        if callback_url is not None:
            if not re.match(CALLBACK_URL, callback_url):
                raise InvalidInput("the callback URL is an http(s) URL", field="callbackUrl")
            check_destination(callback_url, callbacks)
        key_id, secret = secrets.token_hex(5), secrets.token_urlsafe(32)
        record = AccessKeyRecord(
            id=key_id,
            name=name,
            secret_hash=_digest(secret),
            scopes=wanted,
            callback_url=callback_url,
            created_at=self._clock(),
            possession_only=possession_only,
        )

        def insert(connection: Connection) -> None:
            db.insert_access_key(connection, record)
            db.append_audit(
                connection,
                at=record.created_at,
                actor="admin",
                action="access-key.created",
                outcome="ok",
                reason=f"{key_id} {' '.join(sorted(wanted))}"
                + (" possession-only" if possession_only else ""),
            )

        await self._store.write(insert)
        return record, f"{PREFIX}_{key_id}_{secret}"

    async def verify(self, presented: str) -> AccessKeyRecord:
        """The key's record; :class:`Unauthorized` (with the specific reason) otherwise."""
        prefix, _, rest = presented.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != PREFIX or not key_id or not secret:
            raise Unauthorized("not an access key")
        record = await self.get(key_id)
        # Compare even when the key is unknown, so that timing does not tell which it was.
        expected = record.secret_hash if record is not None else bytes(32)
        if not hmac.compare_digest(_digest(secret), expected) or record is None:
            raise Unauthorized(f"unknown access key or wrong secret ({key_id})")
        if record.revoked_at is not None:
            raise Unauthorized(f"revoked access key ({key_id})")
        return record

    async def get(self, key_id: str) -> AccessKeyRecord | None:
        """The record of the key ``key_id``, revoked or not, or None (no secret checked)."""
        record = self._recent.get(key_id)
        if record is None:
            record = await self._store.read(
                lambda connection: db.get_access_key(connection, key_id)
            )
            if record is not None:
                self._recent.put(key_id, record)
        return record

    async def list(self) -> list[AccessKeyRecord]:
        return await self._store.read(db.list_access_keys)

    async def revoke(self, key_id: str) -> None:
        now = self._clock()

        def revoke(connection: Connection) -> None:
            if not db.revoke_access_key(connection, key_id, now):
                raise NotFound("no active access key with that id")
            db.append_audit(
                connection,
                at=now,
                actor="admin",
                action="access-key.revoked",
                outcome="ok",
                reason=key_id,
            )

        await self._store.write(revoke)
        self._recent.forget(key_id)
