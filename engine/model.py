"""The domain's vocabulary: users, devices, operations and the device's answer.

Records are frozen msgspec structs: the store builds them from rows, the engine passes them
around, nothing mutates them. Input limits live here, as ``msgspec.Meta`` constraints and
the constants below, and are documented in docs/reference/limits.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated
from uuid import UUID

import msgspec

from tapsign_sdk.model import (
    MAX_PAYEE_ACCOUNT,
    MAX_PAYEE_NAME,
    Decision,
    OperationKind,
    UserVerification,
)
from tapsign_sdk.problems import InvalidInput

#: A positive decimal amount, at most 15 integer and 4 fraction digits, no sign, no exponent.
AMOUNT_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,14})(\.[0-9]{1,4})?$")

#: The wall clock, injectable so that tests can drive it with Trio's mock clock.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class UserStatus(StrEnum):
    NEW = "new"  # no device yet
    ACTIVE = "active"
    LOCKED = "locked"
    DEACTIVATED = "deactivated"  # irreversible


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    LOCKED = "locked"
    DEACTIVATED = "deactivated"  # irreversible (PSD2 RTS art. 27: revoked)


class Phase(StrEnum):
    """The state machine's states (engine/operations.py). The public status derives from it."""

    CREATED = "created"
    DISPATCHED = "dispatched"
    RESPONDED = "responded"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def status(self) -> str:
        """``pending``, ``succeeded``, ``failed``, ``cancelled`` or ``expired``."""
        return "pending" if self in PENDING_PHASES else self.value


PENDING_PHASES = frozenset({Phase.CREATED, Phase.DISPATCHED, Phase.RESPONDED})
TERMINAL_PHASES = frozenset(Phase) - PENDING_PHASES


class FailureReason(StrEnum):
    DECLINED = "declined"
    BAD_SIGNATURE = "bad-signature"
    DEVICE_LOCKED = "device-locked"
    DEVICE_DEACTIVATED = "device-deactivated"
    USER_INACTIVE = "user-inactive"
    USER_VERIFICATION_MISSING = "user-verification-missing"
    #: A registration whose device-key attestation was missing (when required) or failed.
    ATTESTATION_FAILED = "attestation-failed"


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    username: str
    status: UserStatus
    attributes: dict[str, str]
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None = None
    last_failed_login_at: datetime | None = None


class Device(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    user_id: UUID
    name: str
    platform: str
    #: The 65-byte uncompressed P-256 point.
    public_key: bytes
    status: DeviceStatus
    enrolled_at: datetime
    updated_at: datetime
    last_used_at: datetime | None = None
    #: The highest signature counter seen from this device.
    counter: int = 0
    #: Consecutive failed verifications; reset by a success or an unlock.
    failed_attempts: int = 0
    #: What the enrolment's attestation proved (engine/attestation.py), None without one.
    attestation: str | None = None


class Payee(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PAYEE_NAME)]
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PAYEE_ACCOUNT)]


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    """What an authorisation binds (PSD2 RTS art. 5 dynamic linking)."""

    amount: str
    currency: str
    payee: Payee

    def __post_init__(self) -> None:
        if not AMOUNT_PATTERN.match(self.amount) or Decimal(self.amount) <= 0:
            raise InvalidInput(
                "amount must be a positive decimal string such as '12.50'", field="amount"
            )
        if self.currency not in ISO_4217:
            raise InvalidInput("currency must be an ISO 4217 code such as 'EUR'", field="currency")


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    kind: OperationKind
    user_id: UUID
    #: The device asked to answer; for a registration, the id the new device will have.
    device_id: UUID
    phase: Phase
    #: Incremented by every stored change: the compare-and-set token.
    version: int
    challenge: bytes
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    message: str = ""
    payment: Payment | None = None
    #: The consent text of a signature operation.
    text: str | None = None
    #: Shown on the device before the answer, and signed with it.
    pre_context: str | None = None
    #: Sealed by the keyring (never in clear at rest); released to the device on success.
    post_context_sealed: bytes | None = None
    require_user_verification: bool = False
    callback_url: str | None = None
    client_id: str | None = None
    #: Registration only: what the new device said about itself.
    device_name: str | None = None
    device_platform: str | None = None
    public_key: bytes | None = None
    #: Filled by the answer.
    decision: Decision | None = None
    user_verification: UserVerification | None = None
    counter: int | None = None
    device_signature: bytes | None = None
    failure_reason: FailureReason | None = None
    completed_at: datetime | None = None
    #: The consent JWT of a successful signature operation.
    result: str | None = None
    #: The result token of a success, made once (engine/tokens.py).
    result_token: str | None = None

    @property
    def status(self) -> str:
        return self.phase.status


class OperationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a relying party asks for. Checked by :func:`engine.operations.check_request`."""

    kind: OperationKind
    #: The user, by id or by username; both if they name the same user.
    user_id: UUID | None = None
    username: str | None = None
    #: Registration only: create the user if the username is unknown.
    create_user: bool = False
    #: The device to ask; default: the user's most recently enrolled active device.
    device_id: UUID | None = None
    message: str = ""
    payment: Payment | None = None
    text: str | None = None
    pre_context: str | None = None
    post_context: str | None = None
    #: Require inherence or knowledge besides possession (PSD2 RTS arts. 4, 6-9): always for
    #: authorisations and signatures, by default for authentications, which may be
    #: possession-only when the caller is allowed them; never asked of a registration.
    require_user_verification: bool | None = None
    #: The caller (its access key) may start possession-only authentications.
    allow_possession_only: bool = False
    #: Lifetime in seconds; default and bounds in :class:`engine.settings.OperationSettings`.
    expires_in: int | None = None
    callback_url: str | None = None
    client_id: str | None = None
    #: Ask the relying party to push a notification to the phone (a ``push.created``
    #: callback: tapsign's webhook dispatcher), with this text for the notification. Without
    #: a callback URL nothing is pushed: the phone finds the operation when it fetches.
    push_notification: str | None = None


class AnswerResult(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine tells the device after its answer was judged and stored."""

    operation: Operation
    #: The post-operation context, in clear, only after a success (PSD2: seed 000).
    post_context: str | None = None


#: Active ISO 4217 alphabetic codes (fund and precious-metal codes excluded).
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP
    MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
    TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER
    ZAR ZMW ZWG
    """.split()  # noqa: SIM905 - a table of codes reads better than a list literal
)
