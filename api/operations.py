"""The relying party's operations (``/api/v1``, Bearer access key or intent token):
enrolment, approval, signature, their status, a transaction by id and its cancellation,
and intent tokens for a front end.

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

from api.authenticators import authenticator_view
from api.qr import qr_code
from api.routing import Auth, Call, Services, route
from engine.actors import StartedOperation
from engine.callbacks import check_callback_url
from engine.errors import OperationNotFound, UserNotFound
from engine.model import DeviceStatus, Operation, OperationRequest, Payee, Payment, User
from engine.operations import check_request
from engine.recent import Recent
from engine.statements import AccessKeyRecord
from engine.tokens import INTENT_LIFETIME, TokenKind
from tapsign_sdk import wire
from tapsign_sdk.model import OperationKind
from tapsign_sdk.problems import Forbidden, InvalidInput, TapsignError, Unauthorized

LONG_POLL_LIMIT = 30.0
#: What a front end holding an intent token may set itself: which of the intent's user's
#: identifiers it gives, and the channel.
_FRONT_END_FIELDS = frozenset({"username", "user_id", "channel"})


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
