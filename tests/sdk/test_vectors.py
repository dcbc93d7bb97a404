"""docs/reference/test-vectors.json: current, and what the SDK builds and the server accepts."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hsm import ecdsa
from hsm.verify_backends import OpenSSLVerifyBackend
from tapsign_sdk import wire
from tapsign_sdk.model import Decision, UserVerification
from tapsign_sdk.payload import signed_payload
from tapsign_sdk.request import canonical_request
from tests.sdk.vectors import rendered

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "reference" / "test-vectors.json"
VECTORS: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
POINT = base64.b64decode(VECTORS["device"]["publicPoint"])


def test_the_published_vectors_are_the_ones_the_generator_makes() -> None:
    assert DOCUMENT.read_text(encoding="utf-8") == rendered(), (
        "regenerate: .venv/bin/python -m tests.sdk.vectors > docs/reference/test-vectors.json"
    )


def test_the_point_and_the_spki_are_the_same_key() -> None:
    spki = base64.b64decode(VECTORS["device"]["publicKeySpki"])
    assert ecdsa.encode_point(ecdsa.load_public_key(spki)) == POINT
    scalar = int(VECTORS["device"]["privateScalar"], 16)
    assert ecdsa.encode_point(ec.derive_private_key(scalar, ec.SECP256R1()).public_key()) == POINT


@pytest.mark.parametrize("case", VECTORS["payloads"], ids=lambda case: case["name"])
def test_the_sdk_builds_each_payload_from_what_the_phone_is_sent(case: dict[str, Any]) -> None:
    operation = msgspec.convert(case["deviceOperation"], wire.DeviceOperation)
    answer = msgspec.convert(case["answerBody"], wire.Answer)
    payload = signed_payload(
        operation,
        device_id=operation.device_id,
        decision=Decision(case["decision"]),
        user_verification=UserVerification(case["userVerification"]),
        counter=case["counter"],
        public_key=answer.public_key,
    )
    assert payload == case["payload"].encode("ascii")
    assert answer.signature == base64.b64decode(case["signature"])


def _verified(message: bytes, signature: bytes) -> bool:
    """As the server verifies a phone's signature (its batched verifier's backend)."""
    (outcome,) = OpenSSLVerifyBackend().verify_batch([(POINT, message, signature)])
    return outcome is True


@pytest.mark.parametrize("case", VECTORS["payloads"], ids=lambda case: case["name"])
def test_the_server_accepts_each_payload_signature(case: dict[str, Any]) -> None:
    payload, signature = case["payload"].encode("ascii"), base64.b64decode(case["signature"])
    assert _verified(payload, signature)
    assert not _verified(payload + b" ", signature)
    # Raw r || s is accepted as well as DER.
    raw = ecdsa.raw_signature(signature)
    assert raw is not None
    assert _verified(payload, raw)


@pytest.mark.parametrize("case", VECTORS["requests"], ids=lambda case: case["name"])
def test_each_canonical_request_and_its_signature(case: dict[str, Any]) -> None:
    canonical = canonical_request(
        case["method"], case["path"], case["timestamp"], case["nonce"], case["body"].encode()
    )
    assert canonical == case["canonical"].encode("utf-8")
    header = case["headers"]["Tapsign-Signature"]
    signature = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    assert _verified(canonical, signature)
