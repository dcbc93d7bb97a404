"""The device API (``/device/v1``): what a phone calls (docs/reference/device-protocol.md).

An enrolled phone authenticates every request by signing it with its device key
(tapsign_sdk/request.py, checked by api/device_auth.py); a phone holding a dispatch token
(QR code, app link) may redeem it and answer that one transaction with it, which is how a
registration is answered.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from quart import Quart, request

from api.routing import Auth, Call, Services, route
from engine.actors import NOT_THIS_DEVICES
from engine.errors import OperationNotFound, OperationNotPending
from engine.model import FailureReason, Operation
from engine.tokens import TokenKind
from tapsign_sdk import wire
from tapsign_sdk.model import DeviceAnswer
from tapsign_sdk.payload import FORMAT
from tapsign_sdk.problems import InvalidInput


def device_view(operation: Operation) -> wire.DeviceOperation:
    payment = operation.payment
    return wire.DeviceOperation(
        id=operation.id,
        kind=operation.kind,
        user_id=operation.user_id,
        device_id=operation.device_id,
        challenge=operation.challenge,
        message=operation.message,
        pre_context=operation.pre_context,
        payment=None
        if payment is None
        else wire.PaymentView(
            amount=payment.amount,
            currency=payment.currency,
            payee=wire.Payee(name=payment.payee.name, account=payment.payee.account),
        ),
        text=operation.text,
        require_user_verification=operation.require_user_verification,
        expires_at=operation.expires_at,
        payload_format=FORMAT,
    )


#: Failures a phone is not told apart: which element of the authentication failed (the
#: possession proof or the user verification), or that the attestation of a new key did
#: not hold, is for the relying party and the audit trail only (PSD2 RTS art. 4(3)(a)).
_NOT_TOLD = frozenset(
    {
        FailureReason.BAD_SIGNATURE,
        FailureReason.USER_VERIFICATION_MISSING,
        FailureReason.ATTESTATION_FAILED,
    }
)


def _phone_reason(reason: FailureReason | None) -> str | None:
    if reason is None:
        return None
    return "authentication-failed" if reason in _NOT_TOLD else reason.value


PAGE_SIZE = 10
MAX_PAGE_SIZE = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cursor(operation: Operation) -> str:
    """Where the next page starts: after this operation (its creation time and id)."""
    microseconds = (operation.created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{microseconds}.{operation.id.hex}"


def _page(limit: str | None, after: str | None) -> tuple[int, tuple[datetime, UUID] | None]:
    """``?limit=`` and ``?after=`` of the fetch, checked."""
    size = PAGE_SIZE
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            raise InvalidInput(f"limit is 1 to {MAX_PAGE_SIZE}", field="limit")
        size = int(limit)
    if after is None:
        return size, None
    microseconds, _, identifier = after.partition(".")
    try:
        return size, (_EPOCH + timedelta(microseconds=int(microseconds)), UUID(hex=identifier))
    except (ValueError, OverflowError) as exc:
        raise InvalidInput("after is the next of a previous page", field="after") from exc


def register(app: Quart, services: Services) -> None:
    supervisor = services.engine.supervisor

    @route(
        app,
        services,
        "POST",
        "/device/v1/redeem",
        summary="Redeem a dispatch token (QR code, app link)",
        tag="device",
        auth=Auth.NONE,
        body=wire.Redeem,
        response=wire.DeviceOperation,
    )
    async def redeem(call: Call, body: wire.Redeem) -> wire.DeviceOperation:
        """The transaction to show. The token comes from the QR code or app link
        (``…/open?dispatchToken=…``); it is valid while the transaction is pending."""
        claims = services.tokens.verify(body.dispatch_token, TokenKind.DISPATCH)
        operation = await supervisor.dispatch(UUID(claims["sub"]), UUID(claims["dev"]))
        return device_view(operation)

    @route(
        app,
        services,
        "GET",
        "/device/v1/operations",
        summary="This device's pending transactions (the fetch channel)",
        tag="device",
        auth=Auth.DEVICE,
        response=wire.PendingOperations,
    )
    async def pending(call: Call) -> wire.PendingOperations:
        """What waits for the signing device, oldest first: used when the app opens, after a
        push, or when no push arrives at all. A page holds ``?limit=`` transactions (1 to
        50, default 10); ``next``, when there are more, is what to pass as ``?after=`` for
        the next page."""
        assert call.device is not None  # noqa: S101 - Auth.DEVICE guarantees it
        limit, after = _page(request.args.get("limit"), request.args.get("after"))
        page = await supervisor.pending_for_device(call.device.id, after=after, limit=limit + 1)
        shown = []
        for operation in page[:limit]:
            try:
                shown.append(device_view(await supervisor.dispatch(operation.id, call.device.id)))
            except (OperationNotFound, OperationNotPending):
                continue  # it ended (expired, cancelled) since the list was read
        more = len(page) > limit
        return wire.PendingOperations(
            operations=shown, next=_cursor(page[limit - 1]) if more else None
        )

    @route(
        app,
        services,
        "GET",
        "/device/v1/operations/{transactionId}",
        summary="One of this device's pending transactions, by its id",
        tag="device",
        auth=Auth.DEVICE,
        response=wire.DeviceOperation,
    )
    async def fetch(call: Call, transaction_id: UUID) -> wire.DeviceOperation:
        """The transaction to show, when the phone knows its id (from the push that woke
        it, for one): 404 for anything not this device's or unknown, 409 once it has
        ended. Served from memory by the process that holds the transaction."""
        assert call.device is not None  # noqa: S101 - Auth.DEVICE guarantees it
        return device_view(await supervisor.dispatch(transaction_id, call.device.id))

    @route(
        app,
        services,
        "POST",
        "/device/v1/operations/{transactionId}/answer",
        summary="Approve or decline a transaction",
        tag="device",
        auth=Auth.DEVICE_OR_DISPATCH,
        body=wire.Answer,
        response=wire.AnswerResult,
        spends_nonce=True,
    )
    async def answer(call: Call, body: wire.Answer, transaction_id: UUID) -> wire.AnswerResult:
        """The phone's decision, signed over the payload of docs/reference/signed-payload.md.
        Authenticated by a signed device request, or by the transaction's dispatch token (a
        registration, whose device has no enrolled key yet). A success of an
        authentication or authorisation carries ``postOperationContext``."""
        if call.device is not None:
            device_id = call.device.id
        else:
            grant = call.grant or {}
            if grant.get("sub") != str(transaction_id):
                raise OperationNotFound(NOT_THIS_DEVICES)
            device_id = UUID(str(grant["dev"]))
        result = await supervisor.answer(
            transaction_id,
            DeviceAnswer(
                device_id=device_id,
                decision=body.decision,
                user_verification=body.user_verification,
                counter=body.counter,
                signature=body.signature,
                public_key=body.public_key,
                device_name=body.name,
                platform=body.platform,
                attestation=body.attestation,
            ),
            nonce=call.nonce,
        )
        operation = result.operation
        return wire.AnswerResult(
            transaction_id=operation.id,
            status="failed" if operation.status in ("cancelled", "expired") else operation.status,  # type: ignore[arg-type]
            reason=_phone_reason(operation.failure_reason),
            authenticator_id=operation.device_id,
            post_operation_context=result.post_context,
        )
