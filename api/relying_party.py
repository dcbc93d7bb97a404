"""The relying-party API (``/api/v1``, Bearer access key).

Paths, field names, status codes and status values follow Nevis Authentication Cloud
where it has the same endpoint (enroll, approval, status, introspect, intent, users,
authenticators), so that an integrator can switch by changing the base URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

import trio
from quart import Quart, request

from api import wire
from api.qr import qr_code
from api.recent import Recent
from api.routing import Auth, Call, Services, route
from api.tokens import INTENT_LIFETIME, RESULT_LIFETIME, STATUS_GRACE, TokenKind
from engine.errors import (
    Forbidden,
    InvalidInput,
    OperationNotFound,
    TapsignError,
    UserNotFound,
)
from engine.model import (
    Device,
    Operation,
    OperationKind,
    OperationRequest,
    Payee,
    Payment,
    User,
)

LONG_POLL_LIMIT = 30.0


def authenticator_view(device: Device) -> wire.Authenticator:
    return wire.Authenticator(
        authenticator_id=device.id,
        name=device.name,
        type=device.platform,
        state=device.status.value,
        enrolled_at=device.enrolled_at,
        updated_at=device.updated_at,
        last_used_at=device.last_used_at,
        failed_attempts=device.failed_attempts,
        attestation=device.attestation,
    )


def user_view(user: User, devices: list[Device]) -> wire.User:
    return wire.User(
        user_id=user.id,
        username=user.username,
        status=user.status.value,
        created_at=user.created_at,
        updated_at=user.updated_at,
        last_login_date_success=user.last_login_at,
        last_login_date_failure=user.last_failed_login_at,
        attributes=user.attributes,
        authenticators=[authenticator_view(device) for device in devices],
    )


def register(app: Quart, services: Services) -> None:
    engine = services.engine
    identity = engine.identity
    supervisor = engine.supervisor
    #: Usernames never change; a status answer names the user, and a transaction has
    #: one or more status calls.
    usernames: Recent[UUID, str] = Recent(seconds=60.0, size=10_000)

    def callback_url(call: Call, explicit: str | None) -> str | None:
        return explicit or (call.client.callback_url if call.client is not None else None)

    def client_id(call: Call) -> str | None:
        return call.client.id if call.client is not None else None

    def operation_request(
        call: Call,
        body: wire.Approval | wire.Signature,
        kind: OperationKind,
        *,
        payment: Payment | None = None,
        text: str | None = None,
    ) -> OperationRequest:
        """What approvals and signatures ask of the engine alike, and their own part."""
        return OperationRequest(
            kind=kind,
            user_id=body.user_id,
            username=body.username if body.user_id is None else None,
            device_id=body.authenticator_id,
            message=body.message,
            payment=payment,
            text=text,
            pre_context=body.pre_operation_context,
            post_context=body.post_operation_context,
            require_user_verification=body.require_user_verification,
            expires_in=body.expires_in,
            callback_url=callback_url(call, body.callback_url),
            client_id=client_id(call),
            push_notification=body.notification_message or body.message
            if body.channel == "push"
            else None,
        )

    async def check_intent(call: Call, user_id: UUID | None, username: str | None) -> None:
        """An intent token is bound to one user: the request must name that user."""
        if call.grant is None:
            return
        subject = call.grant.get("sub")
        if subject not in (str(user_id) if user_id else None, username):
            raise Forbidden("this intent token is for another user")
        if not await services.tokens.consume(call.grant):
            raise Forbidden("this intent token has been used")

    async def issue(kind: TokenKind, operation: Operation) -> str:
        if kind is TokenKind.STATUS:
            return await services.tokens.issue(
                kind, subject=str(operation.id), expires_at=operation.expires_at + STATUS_GRACE
            )
        return await services.tokens.issue(
            kind,
            subject=str(operation.id),
            expires_at=operation.expires_at,
            claims={"dev": str(operation.device_id)},
        )

    async def links(operation: Operation) -> tuple[str, wire.QrCode, str]:
        """Status token, QR code and app link (holding the dispatch token) of an operation."""
        async with cancelled_on_failure(operation):
            status_token = await issue(TokenKind.STATUS, operation)
            dispatch_token = await issue(TokenKind.DISPATCH, operation)
        app_link = f"{services.base_url}/open?dispatchToken={dispatch_token}"
        # A 300 px PNG takes milliseconds of pure Python: off the event loop.
        qr = await trio.to_thread.run_sync(qr_code, app_link)
        return status_token, qr, app_link

    @contextlib.asynccontextmanager
    async def cancelled_on_failure(operation: Operation) -> AsyncIterator[None]:
        """A stored operation whose tokens cannot be made (the HSM is away) is cancelled
        before the error goes out: a caller told 503 has no transaction waiting on a phone."""
        try:
            yield
        except TapsignError:
            with contextlib.suppress(TapsignError):
                await supervisor.cancel(operation.id)
            raise

    async def started(operation: Operation, channel: str) -> wire.Started:
        if channel == "app":
            status_token, qr, app_link = await links(operation)
        else:
            async with cancelled_on_failure(operation):
                status_token, qr, app_link = await issue(TokenKind.STATUS, operation), None, None
        return wire.Started(
            transaction_id=operation.id,
            status_token=status_token,
            qr_code=qr,
            app_link_uri=app_link,
            user_id=operation.user_id,
            authenticator_id=operation.device_id,
            expires_at=operation.expires_at,
        )

    async def status_view(operation: Operation) -> wire.Status:
        status = operation.status
        reason = None
        if status in ("cancelled", "expired"):
            status, reason = "failed", operation.status
        elif operation.failure_reason is not None:
            reason = operation.failure_reason.value
        token = None
        if status == "succeeded":
            token = await services.tokens.issue(
                TokenKind.RESULT,
                subject=str(operation.user_id),
                expires_at=services.clock() + RESULT_LIFETIME,
                claims={"txn": str(operation.id), "kind": operation.kind.value},
            )
        username = usernames.get(operation.user_id)
        if username is None:
            try:
                username = (await identity.get_user(operation.user_id)).username
            except UserNotFound:
                username = None
            else:
                usernames.put(operation.user_id, username)
        return wire.Status(
            transaction_id=operation.id,
            status=status,  # type: ignore[arg-type] # pending, succeeded or failed here
            reason=reason,
            kind=operation.kind,
            user_id=operation.user_id,
            username=username,
            authenticator_id=operation.device_id,
            token=token,
            consent=operation.result,
            created_at=operation.created_at,
            last_updated_at=operation.updated_at,
            expires_at=operation.expires_at,
        )

    # -- operations -----------------------------------------------------------------------

    @route(
        app,
        services,
        "POST",
        "/api/v1/users/enroll",
        summary="Register a phone (creates the user if needed)",
        tag="operations",
        auth=Auth.ACCESS_KEY_OR_INTENT,
        scope="operations",
        intent="enroll",
        body=wire.Enroll,
        response=wire.Enrolled,
        status=201,
        starts=True,
    )
    async def enroll(call: Call, body: wire.Enroll) -> wire.Enrolled:
        """Starts a registration. The phone scans ``enrollment.qrCode`` or opens
        ``enrollment.appLinkUri``, signs the registration with its new key, and the relying
        party follows ``enrollment.statusToken``. Give ``username`` (a new user is created
        if it is unknown) or ``userId``."""
        if body.username is None and body.user_id is None:
            raise InvalidInput("give a username or a userId", field="username")
        await check_intent(call, body.user_id, body.username)
        operation = await supervisor.start(
            OperationRequest(
                kind=OperationKind.REGISTRATION,
                user_id=body.user_id,
                username=body.username if body.user_id is None else None,
                create_user=body.user_id is None,
                message=body.message,
                callback_url=callback_url(call, body.callback_url),
                expires_in=body.expires_in,
                client_id=client_id(call),
            ),
            actor=call.actor,
        )
        user = await identity.get_user(operation.user_id)
        devices = await identity.list_devices(user.id)
        status_token, qr, app_link = await links(operation)
        return wire.Enrolled(
            user_id=user.id,
            username=user.username,
            status=user.status.value,
            created_at=user.created_at,
            updated_at=user.updated_at,
            authenticators=[authenticator_view(device) for device in devices],
            enrollment=wire.Enrollment(
                transaction_id=operation.id,
                status_token=status_token,
                qr_code=qr,
                app_link_uri=app_link,
                expires_at=operation.expires_at,
            ),
        )

    @route(
        app,
        services,
        "POST",
        "/api/v1/approval",
        summary="Authenticate the user, or have a payment approved",
        tag="operations",
        auth=Auth.ACCESS_KEY_OR_INTENT,
        scope="operations",
        intent="approve",
        body=wire.Approval,
        response=wire.Started,
        starts=True,
    )
    async def approval(call: Call, body: wire.Approval) -> wire.Started:
        """An authentication; an authorisation (payment approval, PSD2 dynamic linking) when
        ``amount``, ``currency`` and ``payee`` are given, which the phone shows and signs.
        ``channel: push`` (default) asks the relying party (``push.created`` callback, if it
        has a callback URL) to notify the phone, which then fetches; ``app`` also returns a
        QR code and an app link, for a phone other than the device in use."""
        await check_intent(call, body.user_id, body.username)
        payment = None
        if body.amount is not None and body.currency is not None and body.payee is not None:
            payment = Payment(
                amount=body.amount,
                currency=body.currency,
                payee=Payee(name=body.payee.name, account=body.payee.account),
            )
        elif body.amount is not None or body.currency is not None or body.payee is not None:
            raise InvalidInput("a payment needs amount, currency and payee", field="amount")
        kind = OperationKind.AUTHORISATION if payment else OperationKind.AUTHENTICATION
        operation = await supervisor.start(
            operation_request(call, body, kind, payment=payment), actor=call.actor
        )
        return await started(operation, body.channel)

    @route(
        app,
        services,
        "POST",
        "/api/v1/signature",
        summary="Have the user sign a consent",
        tag="operations",
        auth=Auth.ACCESS_KEY,
        scope="operations",
        body=wire.Signature,
        response=wire.Started,
        starts=True,
    )
    async def signature(call: Call, body: wire.Signature) -> wire.Started:
        """The user reads ``text`` on the phone and signs it. On success the status carries
        ``consent``: a JWT signed in tapsign's HSM, verifiable from the JWKS, holding the
        text, the transaction, user and authenticator, the time and the phone's own
        signature."""
        operation = await supervisor.start(
            operation_request(call, body, OperationKind.SIGNATURE, text=body.text),
            actor=call.actor,
        )
        return await started(operation, body.channel)

    @route(
        app,
        services,
        "POST",
        "/api/v1/status",
        summary="Status of a transaction, by its status token (long-poll with wait)",
        tag="operations",
        auth=Auth.NONE,
        body=wire.StatusQuery,
        response=wire.Status,
    )
    async def status(call: Call, body: wire.StatusQuery) -> wire.Status:
        """No access key: the status token is the credential, safe to hand to a front end.
        With ``wait`` (seconds, at most 30) the answer is held until the status changes,
        so clients need not poll every 1.5 s. ``failed`` carries a ``reason``: declined,
        bad-signature, user-verification-missing, attestation-failed, device-locked,
        device-deactivated, user-inactive, cancelled or expired. On success, ``token`` is the
        result token (consumable once through introspection) and, for signatures,
        ``consent``."""
        claims = services.tokens.verify(body.status_token, TokenKind.STATUS)
        transaction = UUID(claims["sub"])
        try:
            operation = await supervisor.get(transaction)
            with (
                trio.move_on_after(min(body.wait, LONG_POLL_LIMIT)),
                services.admission.waiting(),
            ):
                while operation.status == "pending" and body.wait > 0:
                    await supervisor.wait(transaction, version=operation.version)
                    operation = await supervisor.get(transaction)
            operation = await supervisor.get(transaction)
        except OperationNotFound:
            return wire.Status(transaction_id=transaction, status="unknown")
        return await status_view(operation)

    @route(
        app,
        services,
        "GET",
        "/api/v1/transactions/{transactionId}",
        summary="Status of a transaction, by its id",
        tag="operations",
        auth=Auth.ACCESS_KEY,
        scope="operations",
        response=wire.Status,
    )
    async def transaction(call: Call, transaction_id: UUID) -> wire.Status:
        """The same answer as ``/api/v1/status``, for the relying party's backend."""
        return await status_view(await supervisor.get(transaction_id))

    @route(
        app,
        services,
        "POST",
        "/api/v1/transactions/{transactionId}/cancel",
        summary="Cancel a pending transaction",
        tag="operations",
        auth=Auth.ACCESS_KEY,
        scope="operations",
        response=wire.Status,
    )
    async def cancel(call: Call, transaction_id: UUID) -> wire.Status:
        """Ends a pending transaction as cancelled (``failed`` with reason ``cancelled``);
        409 ``transaction-not-pending`` if it has ended."""
        return await status_view(await supervisor.cancel(transaction_id))

    @route(
        app,
        services,
        "POST",
        "/api/v1/intent",
        summary="A one-time token for a front end",
        tag="operations",
        auth=Auth.ACCESS_KEY,
        scope="operations",
        body=wire.Intent,
        response=wire.IntentToken,
    )
    async def intent(call: Call, body: wire.Intent) -> wire.IntentToken:
        """A short-lived token a front end may use, once, in place of the access key, to
        start an enrolment (``enroll``) or an approval (``approve``) for this one user."""
        if (body.username is None) == (body.user_id is None):
            raise InvalidInput("give a username or a userId", field="username")
        if body.user_id is not None:
            await identity.get_user(body.user_id)
        expires_at = services.clock() + INTENT_LIFETIME
        subject = str(body.user_id) if body.user_id is not None else str(body.username)
        token = await services.tokens.issue(
            TokenKind.INTENT, subject=subject, expires_at=expires_at, claims={"op": body.operation}
        )
        return wire.IntentToken(token=token, expires_at=expires_at)

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
            except Exception:  # any failure means: not active, and say nothing else
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

    # -- users and authenticators ---------------------------------------------------------

    async def full_user(user: User) -> wire.User:
        return user_view(user, await identity.list_devices(user.id))

    @route(
        app,
        services,
        "POST",
        "/api/v1/users",
        summary="Create a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        body=wire.CreateUser,
        response=wire.User,
        status=201,
    )
    async def create_user(call: Call, body: wire.CreateUser) -> wire.User:
        """A user without a device yet (status ``new``); 409 ``username-taken`` if taken."""
        user = await identity.create_user(body.username, body.attributes, actor=call.actor)
        return user_view(user, [])

    @route(
        app,
        services,
        "GET",
        "/api/v1/users",
        summary="Find a user by username",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.User,
    )
    async def find_user(call: Call) -> wire.User:
        """``?username=…``; 404 ``user-not-found`` if there is none."""
        username = request.args.get("username")
        if not username:
            raise InvalidInput("give ?username=", field="username")
        return await full_user(await identity.find_user(username))

    @route(
        app,
        services,
        "GET",
        "/api/v1/users/{userId}",
        summary="Get a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.User,
    )
    async def get_user(call: Call, user_id: UUID) -> wire.User:
        """The user with attributes and ``authenticators[]``."""
        return await full_user(await identity.get_user(user_id))

    @route(
        app,
        services,
        "PATCH",
        "/api/v1/users/{userId}/attributes",
        summary="Set and remove attributes",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        body=wire.UpdateAttributes,
        response=wire.User,
    )
    async def update_attributes(
        call: Call, body: wire.UpdateAttributes, user_id: UUID
    ) -> wire.User:
        """Sets the keys of ``set`` and removes those of ``remove``; at most 32 keys remain."""
        user = await identity.update_attributes(
            user_id, set_attributes=body.set, remove=body.remove, actor=call.actor
        )
        return await full_user(user)

    def user_action(action: str, summary: str, description: str) -> None:
        @route(
            app,
            services,
            "POST",
            f"/api/v1/users/{{userId}}/{action}",
            summary=summary,
            tag="users",
            auth=Auth.ACCESS_KEY,
            scope="users",
            response=wire.User,
        )
        async def change(call: Call, user_id: UUID) -> wire.User:
            if action == "lock":
                user = await identity.lock_user(user_id, actor=call.actor)
            elif action == "unlock":
                user = await identity.unlock_user(user_id, actor=call.actor)
            else:
                user = await engine.deactivate_user(user_id, actor=call.actor)
                for device in await identity.list_devices(user_id):
                    services.devices.forget(device.id)  # refused from the next request on
            return await full_user(user)

        change.__doc__ = description

    user_action("lock", "Lock a user", "A locked user cannot start or complete operations.")
    user_action("unlock", "Unlock a user", "Active again (``new`` if no device is enrolled).")
    user_action(
        "deactivate",
        "Deactivate a user (final)",
        "Final: every authenticator of the user is revoked at once (PSD2 RTS art. 27) and "
        "pending transactions are cancelled.",
    )

    @route(
        app,
        services,
        "DELETE",
        "/api/v1/users/{userId}",
        summary="Delete a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        status=204,
    )
    async def delete_user(call: Call, user_id: UUID) -> None:
        """Deletes the user and its authenticators (204); the audit trail keeps its entries."""
        devices = await identity.list_devices(user_id)
        await engine.delete_user(user_id, actor=call.actor)
        for device in devices:
            services.devices.forget(device.id)

    @route(
        app,
        services,
        "GET",
        "/api/v1/authenticators/{authenticatorId}",
        summary="Get an authenticator",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.Authenticator,
    )
    async def get_authenticator(call: Call, authenticator_id: UUID) -> wire.Authenticator:
        """A device: name, type (platform), state, times, consecutive failed attempts."""
        return authenticator_view(await identity.get_device(authenticator_id))

    def device_action(action: str, summary: str, description: str) -> None:
        @route(
            app,
            services,
            "POST",
            f"/api/v1/authenticators/{{authenticatorId}}/{action}",
            summary=summary,
            tag="users",
            auth=Auth.ACCESS_KEY,
            scope="users",
            response=wire.Authenticator,
        )
        async def change(call: Call, authenticator_id: UUID) -> wire.Authenticator:
            if action == "lock":
                device = await identity.lock_device(authenticator_id, actor=call.actor)
            else:
                device = await identity.unlock_device(authenticator_id, actor=call.actor)
            services.devices.forget(authenticator_id)
            return authenticator_view(device)

        change.__doc__ = description

    device_action("lock", "Lock an authenticator", "Its answers are refused until unlocked.")
    device_action(
        "unlock",
        "Unlock an authenticator",
        "Active again, with its count of failed attempts reset (PSD2 RTS art. 4(4)).",
    )

    @route(
        app,
        services,
        "DELETE",
        "/api/v1/authenticators/{authenticatorId}",
        summary="Revoke an authenticator",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        status=204,
    )
    async def delete_authenticator(call: Call, authenticator_id: UUID) -> None:
        """Revokes the authenticator at once and for good (PSD2 RTS art. 27): its
        signatures are refused from now on. The record stays, deactivated, for the audit."""
        await identity.deactivate_device(authenticator_id, actor=call.actor)
        services.devices.forget(authenticator_id)
