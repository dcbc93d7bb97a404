"""The protocol's vocabulary, shared by the phone, the relying party and the server: the
kinds of operation, the decision, how the user was verified, the attestation of a new
device key, the phone's answer, and the limits of what may be shown and signed.

The server imports these (engine/model.py holds its own records: users, devices,
operations); nothing here knows about the server. The limits are documented in
docs/reference/limits.md.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from uuid import UUID

import msgspec

USERNAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,300}$"
ATTRIBUTE_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_VALUE = 1024
MAX_MESSAGE = 500
MAX_CONSENT_TEXT = 16_384
MAX_CONTEXT = 2048
MAX_DEVICE_NAME = 100
MAX_PAYEE_NAME = 140
MAX_PAYEE_ACCOUNT = 70
#: Certificates in an attestation's chain (Android's have 3 to 5).
MAX_CERTIFICATE_CHAIN = 8

Username = Annotated[str, msgspec.Meta(pattern=USERNAME_PATTERN)]
DeviceName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DEVICE_NAME)]
Platform = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,32}$")]


class OperationKind(StrEnum):
    REGISTRATION = "registration"
    AUTHENTICATION = "authentication"
    AUTHORISATION = "authorisation"
    SIGNATURE = "signature"


class Decision(StrEnum):
    APPROVE = "approve"
    DECLINE = "decline"


class UserVerification(StrEnum):
    """How the phone verified its user before signing (PSD2 RTS arts. 6-9)."""

    BIOMETRIC = "biometric"  # inherence
    PIN = "pin"  # knowledge
    NONE = "none"  # possession only


class AndroidKeyAttestation(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    rename="camel",
    tag="android-key",
    tag_field="format",
):
    """The new key's certificate chain from the Android Keystore, leaf first, DER in base64
    (``KeyStore.getCertificateChain`` after ``setAttestationChallenge(challenge)``)."""

    certificate_chain: Annotated[
        list[bytes], msgspec.Meta(min_length=1, max_length=MAX_CERTIFICATE_CHAIN)
    ]


class AppleAppAttestation(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    rename="camel",
    tag="apple-appattest",
    tag_field="format",
):
    """``DCAppAttestService.attestKey`` over clientDataHash = SHA-256(challenge || the new
    65-byte public key), and the App Attest key id; both base64."""

    key_id: bytes
    attestation_object: bytes


#: A device-key attestation, as the phone sends it (the wire form, ``format`` tells which).
Attestation = AndroidKeyAttestation | AppleAppAttestation


class DeviceAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What the phone sends back: its decision, signed over tapsign_sdk/payload.py's bytes."""

    device_id: UUID
    decision: Decision
    user_verification: UserVerification
    counter: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    signature: bytes
    #: Registration only: the new key (uncompressed point or SPKI) and how the device calls itself.
    public_key: bytes | None = None
    device_name: DeviceName | None = None
    platform: Platform | None = None
    attestation: Attestation | None = None
