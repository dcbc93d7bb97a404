"""The relying-party API (``/api/v1``, Bearer access key).

Paths, field names, status codes and status values follow Nevis Authentication Cloud
where it has the same endpoint (enroll, approval, status, introspect, intent, users,
authenticators), so that an integrator can switch by changing the base URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

import msgspec
import trio
from quart import Quart, request

from api.qr import qr_code
from api.routing import Auth, Call, Services, record_refusal, route
from engine.actors import StartedOperation, check_request
from engine.callbacks import check_callback_url
from engine.errors import OperationNotFound, UserNotFound
from engine.model import Device, DeviceStatus, Operation, OperationRequest, Payee, Payment, User
from engine.recent import Recent
from engine.store import AccessKeyRecord
from engine.tokens import INTENT_LIFETIME, TokenKind
from tapsign_sdk import wire
from tapsign_sdk.model import OperationKind
from tapsign_sdk.problems import Forbidden, InvalidInput, TapsignError, Unauthorized

LONG_POLL_LIMIT = 30.0
#: What a front end holding an intent token may set itself: which of the intent's user's
#: identifiers it gives, and the channel.
_FRONT_END_FIELDS = frozenset({"username", "user_id", "channel"})


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

    callbacks = engine.settings.callbacks

    def operation_request(
        kind: OperationKind,
        fields: wire.Approval | wire.Signature | wire.IntentBinding,
        *,
        client: AccessKeyRecord | None,
        user_id: UUID | None,
        username: str | None,
        channel: str,
        payment: Payment | None = None,
        text: str | None = None,
        post_context: str | None = None,
        callback_url: str | None = None,
    ) -> OperationRequest:
        """What approvals, signatures and intents ask of the engine alike. The callback URL
        is the access key's own unless the request names another it may use."""
        own = client.callback_url if client is not None else None
        return OperationRequest(
            kind=kind,
            user_id=user_id,
            username=username,
            device_id=fields.authenticator_id,
            message=fields.message,
            payment=payment,
            text=text,
            pre_context=fields.pre_operation_context,
            post_context=post_context,
            require_user_verification=fields.require_user_verification,
            allow_possession_only=client is not None and client.possession_only,
            expires_in=fields.expires_in,
            callback_url=own
            if callback_url is None
            else check_callback_url(callback_url, own=own, settings=callbacks),
            client_id=client.id if client is not None else None,
            push_notification=fields.notification_message or fields.message
            if channel == "push"
            else None,
        )

    def payment_of(fields: wire.Approval | wire.IntentBinding) -> Payment | None:
        if fields.amount is not None and fields.currency is not None and fields.payee is not None:
            return Payment(
                amount=fields.amount,
                currency=fields.currency,
                payee=Payee(name=fields.payee.name, account=fields.payee.account),
            )
        if fields.amount is not None or fields.currency is not None or fields.payee is not None:
            raise InvalidInput("a payment needs amount, currency and payee", field="amount")
        return None

    def approval_kind(payment: Payment | None) -> OperationKind:
        return OperationKind.AUTHORISATION if payment else OperationKind.AUTHENTICATION

    async def redeem_intent(
        call: Call, body: wire.Enroll | wire.Approval
    ) -> tuple[AccessKeyRecord, UUID | None, str, wire.IntentBinding]:
        """The issuing access key, the user and the binding of the intent token the request
        came with, which it consumes. The front end may name the intent's user (by the
        identifiers the intent has) and choose the channel; everything else was bound by the
        backend when it issued the intent."""
        grant = call.grant or {}
        for field in msgspec.structs.fields(body):
            if field.name not in _FRONT_END_FIELDS and getattr(body, field.name) != field.default:
                raise Forbidden(
                    f"with an intent token, {field.encode_name} is the backend's: it is bound "
                    "when the intent is issued"
                )
        bound_id, bound_name = grant.get("uid"), str(grant.get("usr"))
        if (body.user_id is not None and str(body.user_id) != bound_id) or (
            body.username is not None and body.username != bound_name
        ):
            raise Forbidden("this intent token is for another user")
        issuer = await services.access_keys.get(str(grant.get("cid")))
        if issuer is None or issuer.revoked_at is not None:
            raise Unauthorized("the access key that issued this intent token is revoked")
        if not await services.tokens.consume(grant):
            raise Forbidden("this intent token has been used")
        binding = msgspec.convert(grant.get("bind", {}), wire.IntentBinding)
        return issuer, None if bound_id is None else UUID(str(bound_id)), bound_name, binding

    async def links(operation: Operation) -> tuple[wire.QrCode, str]:
        """QR code and app link (holding the dispatch token) of an operation."""
        async with cancelled_on_failure(operation):
            dispatch_token = await services.tokens.issue(
                TokenKind.DISPATCH,
                subject=str(operation.id),
                expires_at=operation.expires_at,
                claims={"dev": str(operation.device_id)},
            )
        app_link = f"{services.base_url}/open?dispatchToken={dispatch_token}"
        # A 300 px PNG takes milliseconds of pure Python: off the event loop.
        qr = await trio.to_thread.run_sync(qr_code, app_link)
        return qr, app_link

    @contextlib.asynccontextmanager
    async def cancelled_on_failure(operation: Operation) -> AsyncIterator[None]:
        """A stored operation whose dispatch token cannot be made (the HSM is away) is
        cancelled before the error goes out: a caller told 503 has no transaction waiting on
        a phone. (The status token is made with the operation, by its writer.)"""
        try:
            yield
        except TapsignError:
            with contextlib.suppress(TapsignError):
                await supervisor.cancel(operation.id)
            raise

    async def started(begun: StartedOperation, channel: str) -> wire.Started:
        operation = begun.operation
        qr, app_link = await links(operation) if channel == "app" else (None, None)
        return wire.Started(
            transaction_id=operation.id,
            status_token=begun.status_token,
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
        count = None
        if status == "succeeded" and operation.kind is OperationKind.REGISTRATION:
            with contextlib.suppress(UserNotFound):
                count = sum(
                    device.status is not DeviceStatus.DEACTIVATED
                    for device in await identity.list_devices(operation.user_id)
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
            token=operation.result_token,
            consent=operation.result,
            authenticator_count=count,
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
        client, user_id, username = call.client, body.user_id, body.username
        message, expires_in, explicit_callback = body.message, body.expires_in, body.callback_url
        if call.grant is not None:
            client, user_id, username, binding = await redeem_intent(call, body)
            message, expires_in = binding.message, binding.expires_in
        own = client.callback_url if client is not None else None
        begun = await supervisor.start(
            OperationRequest(
                kind=OperationKind.REGISTRATION,
                user_id=user_id,
                username=username,
                create_user=user_id is None,
                message=message,
                callback_url=own
                if explicit_callback is None
                else check_callback_url(explicit_callback, own=own, settings=callbacks),
                expires_in=expires_in,
                client_id=client.id if client is not None else None,
            ),
            actor=call.actor,
        )
        operation = begun.operation
        user = await identity.get_user(operation.user_id)
        devices = await identity.list_devices(user.id)
        qr, app_link = await links(operation)
        return wire.Enrolled(
            user_id=user.id,
            username=user.username,
            status=user.status.value,
            created_at=user.created_at,
            updated_at=user.updated_at,
            authenticators=[authenticator_view(device) for device in devices],
            enrollment=wire.Enrollment(
                transaction_id=operation.id,
                status_token=begun.status_token,
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
        if call.grant is not None:
            client, user_id, username, binding = await redeem_intent(call, body)
            payment = payment_of(binding)
            request = operation_request(
                approval_kind(payment),
                binding,
                client=client,
                user_id=user_id,
                username=username,
                channel=body.channel,
                payment=payment,
            )
        else:
            payment = payment_of(body)
            request = operation_request(
                approval_kind(payment),
                body,
                client=call.client,
                user_id=body.user_id,
                username=body.username,
                channel=body.channel,
                payment=payment,
                post_context=body.post_operation_context,
                callback_url=body.callback_url,
            )
        return await started(await supervisor.start(request, actor=call.actor), body.channel)

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
        begun = await supervisor.start(
            operation_request(
                OperationKind.SIGNATURE,
                body,
                client=call.client,
                user_id=body.user_id,
                username=body.username,
                channel=body.channel,
                text=body.text,
                post_context=body.post_operation_context,
                callback_url=body.callback_url,
            ),
            actor=call.actor,
        )
        return await started(begun, body.channel)

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
        so clients need not poll every 1.5 s; a few such long-polls are held per transaction
        and per client address (``[server] long_polls_per_*``), any more are answered at
        once. ``failed`` carries a ``reason``: declined, bad-signature,
        user-verification-missing, attestation-failed, device-locked, device-deactivated,
        user-inactive, cancelled or expired. On success, ``token`` is the result token (the
        same on every call; consumable once through introspection) and, for signatures,
        ``consent``."""
        claims = services.tokens.verify(body.status_token, TokenKind.STATUS)
        transaction = UUID(claims["sub"])
        try:
            operation = await supervisor.get(transaction)
            with (
                services.long_polls.hold(transaction, request.remote_addr or "") as held,
                trio.move_on_after(min(body.wait, LONG_POLL_LIMIT)),
                services.admission.waiting(),
            ):
                while operation.status == "pending" and body.wait > 0 and held:
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
        start an enrolment (``enroll``) or an approval (``approve``) for this one user, with
        what the operation shows and signs bound now: the front end can choose the channel
        and nothing else. An ``approve`` intent is for a user that exists; an ``enroll``
        intent may name a new username."""
        assert call.client is not None  # noqa: S101 - Auth.ACCESS_KEY guarantees it
        if body.username is None and body.user_id is None:
            raise InvalidInput("give a username or a userId", field="username")
        user: User | None = None
        if body.user_id is not None:
            user = await identity.get_user(body.user_id)
            if body.username not in (None, user.username):
                raise InvalidInput("userId and username name different users", field="username")
        else:
            try:
                user = await identity.find_user(str(body.username))
            except UserNotFound:
                if body.operation == "approve":
                    raise
        username = user.username if user is not None else str(body.username)
        binding = wire.IntentBinding(
            **{name: getattr(body, name) for name in wire.IntentBinding.__struct_fields__}
        )
        if body.operation == "enroll":
            bound = msgspec.structs.replace(binding, message="", expires_in=None)
            if bound != wire.IntentBinding():
                raise InvalidInput("an enroll intent binds message and expiresIn only")
        else:
            # What the intent will start is checked now, not when the front end uses it.
            payment = payment_of(binding)
            check_request(
                operation_request(
                    approval_kind(payment),
                    binding,
                    client=call.client,
                    user_id=None if user is None else user.id,
                    username=username,
                    channel="push",
                    payment=payment,
                ),
                engine.settings.operations,
            )
        expires_at = services.clock() + INTENT_LIFETIME
        claims: dict[str, object] = {
            "op": body.operation,
            "usr": username,
            "cid": call.client.id,
            "bind": msgspec.to_builtins(binding),
        }
        if user is not None:
            claims["uid"] = str(user.id)
        token = await services.tokens.issue(
            TokenKind.INTENT,
            subject=username if user is None else str(user.id),
            expires_at=expires_at,
            claims=claims,
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
