"""Wire types of the HTTP API: what goes over the wire, and nothing else.

One base, ``Wire`` (frozen, keyword-only, unknown fields refused, camelCase on the wire);
constraints are ``msgspec.Meta`` annotations, so the decoder rejects bad input with a
message that names the field, and the OpenAPI document is generated from these types.
Where Nevis Authentication Cloud has the same endpoint, the field names are Nevis's
(docs/reference/api.md), so that an integrator can switch by changing the base URL.
The device SDK and the relying-party SDK use these same types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

from tapsign_sdk.model import (
    ATTRIBUTE_KEY_PATTERN,
    MAX_ATTRIBUTE_VALUE,
    MAX_CONSENT_TEXT,
    MAX_CONTEXT,
    MAX_MESSAGE,
    MAX_PAYEE_ACCOUNT,
    MAX_PAYEE_NAME,
    USERNAME_PATTERN,
    Attestation,
    Decision,
    DeviceName,
    OperationKind,
    Platform,
    UserVerification,
)


class Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    """Base of every request and response body. (Subclasses repeat ``frozen`` and
    ``kw_only`` for type checkers, which do not see inherited struct options.)"""


Username = Annotated[
    str,
    msgspec.Meta(
        pattern=USERNAME_PATTERN,
        description="Opaque, stable identifier chosen by the relying party; no personal data.",
        examples=["u12345"],
    ),
]
Message = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)]
Context = Annotated[str, msgspec.Meta(max_length=MAX_CONTEXT)]
Attributes = Annotated[
    dict[
        Annotated[str, msgspec.Meta(pattern=ATTRIBUTE_KEY_PATTERN)],
        Annotated[str, msgspec.Meta(max_length=MAX_ATTRIBUTE_VALUE)],
    ],
    msgspec.Meta(max_length=32),
]
Amount = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(0|[1-9][0-9]{0,14})(\.[0-9]{1,4})?$",
        description="Positive decimal amount as a string.",
        examples=["12.50"],
    ),
]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", examples=["EUR"])]
#: An http(s) URL with a host name or bracketed IPv6 address, in printable ASCII without
#: spaces or user information.
CALLBACK_URL = (
    r"^(?!.*\s)https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?([/?#][!-~]*)?$"
)
CallbackUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=CALLBACK_URL,
        max_length=2000,
        description="Where the callbacks of this transaction go (http or https).",
    ),
]
ExpiresIn = Annotated[int, msgspec.Meta(ge=5, le=86_400, description="Lifetime in seconds.")]


class Payee(Wire, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PAYEE_NAME)]
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PAYEE_ACCOUNT)]


# -- users and authenticators -----------------------------------------------------------


class Authenticator(Wire, frozen=True, kw_only=True):
    authenticator_id: UUID
    name: str
    type: str
    authenticator_type: Literal["app"] = "app"
    state: str
    enrolled_at: datetime
    updated_at: datetime
    last_used_at: datetime | None = None
    failed_attempts: int = 0
    #: What the enrolment's attestation proved: ``android-key/strongbox``,
    #: ``android-key/trusted-environment``, ``apple-appattest``; null without one.
    attestation: str | None = None


class User(Wire, frozen=True, kw_only=True):
    user_id: UUID
    username: str
    status: str
    created_at: datetime
    updated_at: datetime
    last_login_date_success: datetime | None = None
    last_login_date_failure: datetime | None = None
    attributes: dict[str, str] = {}
    authenticators: list[Authenticator] = []


class CreateUser(Wire, frozen=True, kw_only=True):
    username: Username
    attributes: Attributes = {}


class UpdateAttributes(Wire, frozen=True, kw_only=True):
    set: Attributes = {}
    remove: list[Annotated[str, msgspec.Meta(max_length=64)]] = []


# -- operations -------------------------------------------------------------------------


class QrCode(Wire, frozen=True, kw_only=True):
    type: Literal["image/png"] = "image/png"
    size: int
    data_uri: str


class Enrollment(Wire, frozen=True, kw_only=True):
    transaction_id: UUID
    status_token: str
    qr_code: QrCode
    app_link_uri: str
    expires_at: datetime


class Enroll(Wire, frozen=True, kw_only=True):
    """``POST /api/v1/users/enroll``: register a phone; creates the user if needed."""

    username: Username | None = None
    user_id: UUID | None = None
    channel: Literal["app"] = "app"
    message: Message = ""
    callback_url: CallbackUrl | None = None
    expires_in: ExpiresIn | None = None


class Enrolled(Wire, frozen=True, kw_only=True):
    user_id: UUID
    username: str
    status: str
    created_at: datetime
    updated_at: datetime
    authenticators: list[Authenticator]
    enrollment: Enrollment


class Approval(Wire, frozen=True, kw_only=True):
    """``POST /api/v1/approval``: an authentication, or a payment authorisation when
    ``amount``, ``currency`` and ``payee`` are given (PSD2 dynamic linking)."""

    username: Username | None = None
    user_id: UUID | None = None
    authenticator_id: UUID | None = None
    #: ``push`` (default, as Nevis): the phone is nudged (``push.created`` callback to the
    #: relying party, if it has a callback URL) and fetches; ``app``: also a QR code and an
    #: app link for a phone that is not the one the user is using.
    channel: Literal["app", "push"] = "push"
    message: Message = ""
    notification_message: Annotated[str, msgspec.Meta(max_length=200)] = ""
    amount: Amount | None = None
    currency: Currency | None = None
    payee: Payee | None = None
    pre_operation_context: Context | None = None
    post_operation_context: Context | None = None
    require_user_verification: bool | None = None
    callback_url: CallbackUrl | None = None
    expires_in: ExpiresIn | None = None


class Signature(Wire, frozen=True, kw_only=True):
    """``POST /api/v1/signature``: a consent the user signs; success carries a consent JWT."""

    username: Username | None = None
    user_id: UUID | None = None
    authenticator_id: UUID | None = None
    channel: Literal["app", "push"] = "push"
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CONSENT_TEXT)]
    message: Message = ""
    notification_message: Annotated[str, msgspec.Meta(max_length=200)] = ""
    pre_operation_context: Context | None = None
    post_operation_context: Context | None = None
    require_user_verification: bool | None = None
    callback_url: CallbackUrl | None = None
    expires_in: ExpiresIn | None = None


class Started(Wire, frozen=True, kw_only=True):
    transaction_id: UUID
    status_token: str
    user_id: UUID
    authenticator_id: UUID
    expires_at: datetime
    #: Channel ``app`` only.
    qr_code: QrCode | None = None
    app_link_uri: str | None = None


class StatusQuery(Wire, frozen=True, kw_only=True):
    """``POST /api/v1/status``. ``wait``: hold the answer up to that many seconds until the
    status changes (long-poll), instead of polling every 1.5 s."""

    status_token: str
    wait: Annotated[float, msgspec.Meta(ge=0, le=30)] = 0


class Status(Wire, frozen=True, kw_only=True):
    transaction_id: UUID
    status: Literal["pending", "succeeded", "failed", "unknown"]
    reason: str | None = None
    kind: OperationKind | None = None
    user_id: UUID | None = None
    username: str | None = None
    authenticator_id: UUID | None = None
    #: The result token, on success: consumable once through ``/api/v1/introspect``.
    token: str | None = None
    #: The consent JWT of a successful signature.
    consent: str | None = None
    #: A registration that succeeded: how many authenticators the user has now (active or
    #: locked). More than one: approvals go to the newest unless ``authenticatorId`` names
    #: another.
    authenticator_count: int | None = None
    created_at: datetime | None = None
    last_updated_at: datetime | None = None
    expires_at: datetime | None = None


class IntentBinding(Wire, frozen=True, kw_only=True, omit_defaults=True):
    """What an intent token fixes of the operation it starts, when the backend issues it.
    The front end holding the token chooses none of it: the amount, payee and text of a
    payment are the backend's, and so are the callback URL (the issuing access key's own)
    and whether the user must be verified. A post-operation context cannot be bound (the
    token is readable by the front end)."""

    authenticator_id: UUID | None = None
    message: Message = ""
    notification_message: Annotated[str, msgspec.Meta(max_length=200)] = ""
    amount: Amount | None = None
    currency: Currency | None = None
    payee: Payee | None = None
    pre_operation_context: Context | None = None
    require_user_verification: bool | None = None
    expires_in: ExpiresIn | None = None


class Intent(IntentBinding, frozen=True, kw_only=True):
    """``POST /api/v1/intent``: a one-time token for a front end, bound to a user, a call and
    what the operation will show and sign (an ``enroll`` intent binds ``message`` and
    ``expiresIn`` only)."""

    username: Username | None = None
    user_id: UUID | None = None
    operation: Literal["enroll", "approve"]


class IntentToken(Wire, frozen=True, kw_only=True):
    token: str
    expires_at: datetime


class Introspection(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 7662 §2.2 (snake_case as the RFC writes it). Inactive tokens say nothing more."""

    active: bool
    token_type: str | None = None
    iat: int | None = None
    exp: int | None = None
    sub: str | None = None
    aud: str | None = None
    iss: str | None = None
    scope: str | None = None
    transaction_id: str | None = None
    user_id: str | None = None
    status: str | None = None


class AccessKeyCreated(Wire, frozen=True, kw_only=True):
    key_id: str
    #: Shown once; only its hash is stored.
    access_key: str
    scopes: list[str]


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    #: The offending field, when one is to blame.
    field: str | None = None


# -- device API -------------------------------------------------------------------------


class Redeem(Wire, frozen=True, kw_only=True):
    """``POST /device/v1/redeem``: the dispatch token from the QR code or app link."""

    dispatch_token: str


class DeviceOperation(Wire, frozen=True, kw_only=True):
    """What the phone shows and signs. The field names mirror the signed payload's inputs
    (tapsign_sdk/payload.py) so the SDK builds the payload from exactly what it shows."""

    id: UUID = msgspec.field(name="transactionId")
    kind: OperationKind
    user_id: UUID
    device_id: UUID = msgspec.field(name="authenticatorId")
    challenge: bytes
    message: str
    pre_context: str | None = msgspec.field(default=None, name="preOperationContext")
    payment: PaymentView | None = None
    text: str | None = None
    require_user_verification: bool
    expires_at: datetime
    payload_format: str


class PaymentView(Wire, frozen=True, kw_only=True):
    amount: str
    currency: str
    payee: Payee


class PendingOperations(Wire, frozen=True, kw_only=True):
    operations: list[DeviceOperation]
    #: When there are more: pass it as ``?after=`` for the next page.
    next: str | None = None


class Answer(Wire, frozen=True, kw_only=True):
    """The phone's answer, signed over the payload; registration answers add the new key
    and may attest it."""

    decision: Decision
    user_verification: UserVerification
    counter: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    signature: bytes
    public_key: bytes | None = None
    name: DeviceName | None = None
    platform: Platform | None = None
    attestation: Attestation | None = None


class AnswerResult(Wire, frozen=True, kw_only=True):
    transaction_id: UUID
    status: Literal["pending", "succeeded", "failed", "unknown"]
    reason: str | None = None
    authenticator_id: UUID
    #: Released to the phone only after a success (e.g. a card PIN to show).
    post_operation_context: str | None = None
