"""The bytes a phone signs. Defined here and nowhere else; documented in
docs/reference/signed-payload.md.

The server never takes these bytes from the phone: it rebuilds them from its own stored
operation (challenge, ids, kind, what was shown, amount, currency, payee) plus the three
things only the phone knows (its decision, how it verified its user, its counter), and
verifies the phone's signature over them. Any change to amount or payee after the user saw
them therefore breaks the signature (PSD2 RTS art. 5(1)(b)-(d), dynamic linking), and so
does any change to the decision: a decline is signed too, so it cannot be forged, and "no
user verification" cannot be turned into "biometric" on the way.

Format: a JSON object, UTF-8, keys sorted, no whitespace (``separators=(",", ":")``),
every value a string except ``counter`` (an integer), non-ASCII characters escaped as
``\\uXXXX``: exactly what ``json.dumps(payload, sort_keys=True, separators=(",", ":"))``
produces. The ``format`` field versions it.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol
from uuid import UUID

from tapsign_sdk.model import Decision, OperationKind, UserVerification
from tapsign_sdk.problems import InvalidInput

FORMAT = "tapsign-sca/1"


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5), as in JOSE."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _Payee(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def account(self) -> str: ...


class _Payment(Protocol):
    @property
    def amount(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def payee(self) -> _Payee: ...


class Signable(Protocol):
    """What the payload is built from: the server's stored ``engine.model.Operation`` and
    the phone's ``api.wire.DeviceOperation`` both have these, under these names."""

    @property
    def id(self) -> UUID: ...
    @property
    def kind(self) -> OperationKind: ...
    @property
    def challenge(self) -> bytes: ...
    @property
    def user_id(self) -> UUID: ...
    @property
    def message(self) -> str: ...
    @property
    def pre_context(self) -> str | None: ...
    @property
    def payment(self) -> _Payment | None: ...
    @property
    def text(self) -> str | None: ...


def signed_payload(
    operation: Signable,
    *,
    device_id: UUID,
    decision: Decision,
    user_verification: UserVerification,
    counter: int,
    public_key: bytes | None = None,
) -> bytes:
    """The canonical bytes the phone signs for ``operation``.

    ``public_key`` is the new device key of a registration (the 65-byte point), signed
    with that same key as proof of possession.
    """
    payload: dict[str, Any] = {
        "format": FORMAT,
        "kind": operation.kind.value,
        "operation": str(operation.id),
        "challenge": b64url(operation.challenge),
        "user": str(operation.user_id),
        "device": str(device_id),
        "message": operation.message,
        "context": operation.pre_context or "",
        "decision": decision.value,
        "userVerification": user_verification.value,
        "counter": counter,
    }
    if operation.kind is OperationKind.AUTHORISATION:
        if operation.payment is None:
            raise InvalidInput("an authorisation needs a payment", field="payment")
        payload["amount"] = operation.payment.amount
        payload["currency"] = operation.payment.currency
        payload["payeeName"] = operation.payment.payee.name
        payload["payeeAccount"] = operation.payment.payee.account
    elif operation.kind is OperationKind.SIGNATURE:
        payload["text"] = operation.text or ""
    elif operation.kind is OperationKind.REGISTRATION:
        if public_key is None:
            raise InvalidInput(
                "a registration answer carries the new public key", field="publicKey"
            )
        payload["publicKey"] = b64url(public_key)
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("ascii")
