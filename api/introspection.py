"""Token introspection for the relying party (``POST /api/v1/introspect``, RFC 7662)."""

from __future__ import annotations

from uuid import UUID

from quart import Quart

from api.routing import Auth, Call, Services, record_refusal, route
from engine.errors import OperationNotFound
from engine.tokens import TokenKind
from tapsign_sdk import wire
from tapsign_sdk.problems import Unauthorized


def register(app: Quart, services: Services) -> None:
    supervisor = services.engine.supervisor

    @route(
        app,
        services,
        "POST",
        "/api/v1/introspect",
        summary="Token introspection (RFC 7662)",
        tag="operations",
        auth=Auth.ACCESS_KEY,
        scope="introspect",
        form=True,
        response=wire.Introspection,
    )
    async def introspect(call: Call, form: dict[str, str]) -> wire.Introspection:
        """Form-encoded ``token=…``: an access key, or a status, dispatch, result or intent
        token. Anything expired, consumed, forged or unknown is ``{"active": false}`` and
        nothing more. A result token is consumed by its first introspection."""
        token = form.get("token", "")
        inactive = wire.Introspection(active=False)
        if token.startswith("tsk_"):
            try:
                key = await services.access_keys.verify(token)
            except Unauthorized as exc:
                # Not active, and nothing else said; but a guessed key is audited as a
                # refusal like any other (RTS art. 4(3)(a)).
                await record_refusal(services, exc, call.actor)
                return inactive
            return wire.Introspection(
                active=True,
                token_type="access_key",  # noqa: S106 - a token type name
                iat=int(key.created_at.timestamp()),
                sub=key.id,
                aud="api",
                iss=services.tokens.issuer,
                scope=" ".join(sorted(key.scopes)),
            )
        found = services.tokens.kind_of(token)
        if found is None:
            return inactive
        kind, claims = found
        if kind is TokenKind.RESULT and not await services.tokens.consume(claims):
            return inactive
        transaction_id = claims.get("txn") or (
            claims["sub"] if kind in (TokenKind.STATUS, TokenKind.DISPATCH) else None
        )
        status_value = None
        if transaction_id is not None:
            try:
                status_value = (await supervisor.get(UUID(str(transaction_id)))).status
            except (OperationNotFound, ValueError):
                return inactive
        return wire.Introspection(
            active=True,
            token_type=kind.value,
            iat=claims.get("iat"),
            exp=claims.get("exp"),
            sub=str(claims.get("sub")),
            aud=str(claims.get("aud")),
            iss=str(claims.get("iss")),
            transaction_id=None if transaction_id is None else str(transaction_id),
            user_id=str(claims["sub"]) if kind is TokenKind.RESULT else None,
            status=status_value,
        )
