"""What a stored change leaves behind, decided by the pure core (engine/operations.py): the
audit entry, the callback, the result token's and the consent JWT's claims."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import msgspec
import pytest

from engine.model import FailureReason, Operation, Phase
from engine.operations import (
    callback,
    consent_claims,
    counts_authenticators,
    result_claims,
    transition_note,
)
from engine.tokens import RESULT_LIFETIME, TokenKind
from tapsign_sdk.model import Decision, DeviceAnswer, OperationKind, UserVerification

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def operation(kind: OperationKind, phase: Phase, **fields: object) -> Operation:
    return Operation(
        id=uuid4(),
        kind=kind,
        user_id=uuid4(),
        device_id=uuid4(),
        phase=phase,
        version=2,
        challenge=bytes(32),
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        **fields,  # type: ignore[arg-type]
    )


def unpadded(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_audit_entry_names_the_state_and_the_reason() -> None:
    failed = operation(
        OperationKind.AUTHORISATION, Phase.FAILED, failure_reason=FailureReason.BAD_SIGNATURE
    )
    note = transition_note(failed)
    assert (note.action, note.outcome, note.reason) == (
        "operation.failed",
        failed.status,
        "bad-signature",
    )
    assert transition_note(operation(OperationKind.SIGNATURE, Phase.EXPIRED)).reason is None


@pytest.mark.parametrize("kind", list(OperationKind))
@pytest.mark.parametrize("phase", [phase for phase in Phase if phase.terminal])
def test_the_callback_says_the_state_and_counts_authenticators_after_an_enrolment(
    kind: OperationKind, phase: Phase
) -> None:
    ended = operation(kind, phase)
    counted = counts_authenticators(ended)
    assert counted == (kind is OperationKind.REGISTRATION and phase is Phase.SUCCEEDED)
    event, body = callback(ended, authenticators=3 if counted else None)
    assert event == f"transaction.{phase.value}"
    assert body["status"] == ended.status
    assert body["kind"] == kind.value
    assert body["userId"] == str(ended.user_id)
    assert body["authenticatorId"] == str(ended.device_id)
    assert ("authenticatorCount" in body) == counted


def test_a_result_token_names_its_transaction_and_lives_its_lifetime() -> None:
    done = operation(OperationKind.AUTHORISATION, Phase.SUCCEEDED)
    claims = result_claims(done, now=NOW)
    assert claims["aud"] == TokenKind.RESULT.audience
    assert claims["sub"] == str(done.user_id)
    assert claims["txn"] == str(done.id)
    assert claims["kind"] == "authorisation"
    assert claims["exp"] - claims["iat"] == RESULT_LIFETIME.total_seconds()
    assert result_claims(done, now=NOW)["jti"] != claims["jti"]


def test_the_consent_claims_carry_the_evidence() -> None:
    signed = operation(
        OperationKind.SIGNATURE, Phase.SUCCEEDED, text="I agree \u2013 to this", pre_context=None
    )
    answer = DeviceAnswer(
        device_id=signed.device_id,
        decision=Decision.APPROVE,
        user_verification=UserVerification.BIOMETRIC,
        counter=7,
        signature=b"\x30\x45signature",
    )
    claims = consent_claims(signed, answer, payload=b"payload", point=b"\x04point", now=NOW)
    assert claims["consent"] == {
        "text": "I agree \u2013 to this",
        "sha256": unpadded(hashlib.sha256("I agree \u2013 to this".encode()).digest()),
        "context": "",
    }
    assert claims["signedPayload"] == unpadded(b"payload")
    assert claims["deviceSignature"] == unpadded(b"\x30\x45signature")
    assert claims["devicePublicKey"] == unpadded(b"\x04point")
    assert claims["userVerification"] == "biometric"
    assert claims["jti"] == claims["txn"] == str(signed.id)
    assert "exp" not in claims
    assert "aud" not in claims
    # The claims are plain data: what the HSM signs is exactly this, as JSON.
    assert msgspec.json.decode(msgspec.json.encode(claims)) == claims
