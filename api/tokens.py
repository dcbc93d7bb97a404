"""The tokens tapsign issues and checks: JWTs signed by the token-signing key in the HSM.

Their kinds, lifetimes and claims are engine/tokens.py's. One-time tokens are consumed by
recording their ``jti`` (engine/store.py ``consume_token``). Verifying needs no HSM: only the
public keys of the keyring.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jwt
import trio

from engine import statements as db
from engine.model import Clock
from engine.store import Store
from engine.tokens import TokenKind, token_claims
from hsm.errors import InvalidToken
from hsm.keyring import KeyPurpose, Keyring
from hsm.tokens import TokenSigner
from tapsign_sdk.problems import Unauthorized


class Tokens:
    def __init__(self, keyring: Keyring, store: Store, *, issuer: str, clock: Clock) -> None:
        self._signer = TokenSigner(keyring, KeyPurpose.TOKEN, issuer=issuer)
        self._store = store
        self._clock = clock
        self.issuer = issuer

    async def issue(
        self,
        kind: TokenKind,
        *,
        subject: str,
        expires_at: datetime,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token of ``kind`` (signing happens in the HSM, in a worker thread)."""
        document = token_claims(
            kind, subject=subject, now=self._clock(), expires_at=expires_at, claims=claims
        )
        return await trio.to_thread.run_sync(
            functools.partial(self._signer.encode, document, token_type=kind.media_type)
        )

    def verify(self, token: str, kind: TokenKind) -> dict[str, Any]:
        """The claims of a valid, unexpired token of ``kind``; :class:`Unauthorized` otherwise
        (its ``reason`` says why, for the audit trail)."""
        try:
            return self._signer.decode(token, audience=kind.audience)
        except InvalidToken as exc:
            raise Unauthorized(f"{kind.value} token refused: {exc.reason}") from exc

    def kind_of(self, token: str) -> tuple[TokenKind, dict[str, Any]] | None:
        """Which kind of valid token this is, with its claims; None if it is not one."""
        try:
            audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
        except jwt.PyJWTError:
            return None
        kind = next((kind for kind in TokenKind if kind.audience == audience), None)
        if kind is None:
            return None
        try:
            return kind, self._signer.decode(token, audience=kind.audience)
        except InvalidToken:
            return None

    async def consume(self, claims: dict[str, Any]) -> bool:
        """Mark a one-time token used; False if it had been used already (a replay)."""
        now = self._clock()
        expires_at = datetime.fromtimestamp(int(claims["exp"]), tz=now.tzinfo)
        jti = str(claims["jti"])
        return await self._store.write(
            lambda connection: db.consume_token(connection, jti, now=now, expires_at=expires_at)
        )
