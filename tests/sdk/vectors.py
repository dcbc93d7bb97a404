"""Test vectors of the protocol, for implementations in other languages:
docs/reference/test-vectors.json is what :func:`vectors` returns, and tests/sdk/test_vectors.py
checks both against the SDK and the server.

Everything is fixed, the device's key included (a test key: never use it), and the
signatures are deterministic (RFC 6979), so the file is the same on every run.

    .venv/bin/python -m tests.sdk.vectors > docs/reference/test-vectors.json
"""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tapsign_sdk import wire
from tapsign_sdk.model import Decision, OperationKind, UserVerification
from tapsign_sdk.payload import FORMAT, b64url, signed_payload
from tapsign_sdk.request import canonical_request

#: The test device's private scalar. A published key: it proves nothing, anywhere.
PRIVATE_SCALAR = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
KEY = ec.derive_private_key(PRIVATE_SCALAR, ec.SECP256R1())
USER = UUID("00000000-0000-4000-8000-000000000001")
DEVICE = UUID("00000000-0000-4000-8000-000000000002")
CHALLENGE = bytes(range(32))


def sign(message: bytes) -> bytes:
    """DER ECDSA P-256/SHA-256, deterministic (RFC 6979)."""
    return KEY.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def _operation(transaction: str, kind: OperationKind, **fields: Any) -> wire.DeviceOperation:
    return wire.DeviceOperation(
        id=UUID(transaction),
        kind=kind,
        user_id=USER,
        device_id=DEVICE,
        challenge=CHALLENGE,
        message=fields.pop("message", ""),
        require_user_verification=kind is not OperationKind.REGISTRATION,
        expires_at=datetime(2027, 1, 1, 12, 5, tzinfo=UTC),
        payload_format=FORMAT,
        **fields,
    )


def _payload_case(
    name: str,
    operation: wire.DeviceOperation,
    *,
    decision: Decision,
    user_verification: UserVerification,
    counter: int,
) -> dict[str, Any]:
    public_key = (
        KEY.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        if operation.kind is OperationKind.REGISTRATION
        else None
    )
    payload = signed_payload(
        operation,
        device_id=operation.device_id,
        decision=decision,
        user_verification=user_verification,
        counter=counter,
        public_key=public_key,
    )
    signature = sign(payload)
    answer = wire.Answer(
        decision=decision,
        user_verification=user_verification,
        counter=counter,
        signature=signature,
        public_key=public_key,
    )
    return {
        "name": name,
        "deviceOperation": json.loads(msgspec.json.encode(operation)),
        "decision": decision.value,
        "userVerification": user_verification.value,
        "counter": counter,
        "payload": payload.decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
        "answerBody": json.loads(msgspec.json.encode(answer)),
    }


def _request_case(
    name: str, method: str, path: str, body: bytes, *, timestamp: str, nonce: str
) -> dict[str, Any]:
    canonical = canonical_request(method, path, timestamp, nonce, body)
    return {
        "name": name,
        "method": method,
        "path": path,
        "timestamp": timestamp,
        "nonce": nonce,
        "body": body.decode("utf-8"),
        "canonical": canonical.decode("utf-8"),
        "headers": {
            "Tapsign-Authenticator": str(DEVICE),
            "Tapsign-Timestamp": timestamp,
            "Tapsign-Nonce": nonce,
            "Tapsign-Signature": b64url(sign(canonical)),
        },
    }


def vectors() -> dict[str, Any]:
    point = KEY.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    spki = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payment = wire.PaymentView(
        amount="12.50",
        currency="EUR",
        payee=wire.Payee(name="Café", account="CH93 0076 2011 6238 5295 7"),
    )
    payloads = [
        _payload_case(
            "an authorisation, approved with a biometric",
            _operation(
                "6f9619ff-8b86-4011-b42d-00c04fc964ff",
                OperationKind.AUTHORISATION,
                message="Pay 12.50 EUR to Café Zürich",
                pre_context="card ending 1234",
                payment=payment,
            ),
            decision=Decision.APPROVE,
            user_verification=UserVerification.BIOMETRIC,
            counter=7,
        ),
        _payload_case(
            "a registration: the new key's point is signed with that key",
            _operation(
                "0b5c1d6e-3f41-4b8a-9c2d-7e8f90a1b2c3",
                OperationKind.REGISTRATION,
                message="Welcome",
            ),
            decision=Decision.APPROVE,
            user_verification=UserVerification.PIN,
            counter=1,
        ),
        _payload_case(
            "a consent, declined: the text has every kind of character that is escaped",
            _operation(
                "9d2e3f40-5162-4738-8a9b-0c1d2e3f4051",
                OperationKind.SIGNATURE,
                text='I agree to "the terms" \\ A/B\ttab\nline \x7fDEL \x01 é € 😀',
            ),
            decision=Decision.DECLINE,
            user_verification=UserVerification.NONE,
            counter=8,
        ),
        _payload_case(
            "an authentication without user verification (possession only)",
            _operation(
                "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
                OperationKind.AUTHENTICATION,
                message="Log in to Demo Bank",
            ),
            decision=Decision.APPROVE,
            user_verification=UserVerification.NONE,
            counter=9,
        ),
    ]
    answer = msgspec.json.encode(payloads[0]["answerBody"])
    requests = [
        _request_case(
            "the second page of the fetch",
            "GET",
            "/device/v1/operations?limit=2&after=1798804800000000.6f9619ff8b864011b42d00c04fc964ff",
            b"",
            timestamp="1798804800",
            nonce="bm9uY2UtMDAwMDAwMDE",
        ),
        _request_case(
            "the answer to the authorisation above",
            "POST",
            "/device/v1/operations/6f9619ff-8b86-4011-b42d-00c04fc964ff/answer",
            answer,
            timestamp="1798804801",
            nonce="bm9uY2UtMDAwMDAwMDI",
        ),
    ]
    return {
        "description": (
            "tapsign protocol test vectors (docs/reference/device-protocol.md). The device "
            "key is a published test key. Signatures are deterministic ECDSA P-256/SHA-256 "
            "(RFC 6979); any valid signature is accepted, these are only reproducible."
        ),
        "device": {
            "authenticatorId": str(DEVICE),
            "userId": str(USER),
            "privateScalar": f"{PRIVATE_SCALAR:064x}",
            "publicPoint": base64.b64encode(point).decode("ascii"),
            "publicKeySpki": base64.b64encode(spki).decode("ascii"),
        },
        "payloads": payloads,
        "requests": requests,
    }


def rendered() -> str:
    """The vectors as docs/reference/test-vectors.json holds them."""
    return json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(rendered())
