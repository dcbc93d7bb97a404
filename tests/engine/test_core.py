"""The decisions of the pure core (engine/operations.py) that end an operation, as data:
the new version, the audit entries, the device and user, the callbacks, the result token's
and the consent JWT's claims."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import msgspec
import pytest

from engine.errors import IllegalTransition
from engine.model import Device, DeviceStatus, FailureReason, Operation, Phase, User, UserStatus
from engine.operations import (
    Answer,
    Cancel,
    Decided,
    Effect,
    Expire,
    Note,
    State,
    Verdict,
    callback,
    consent_claims,
    counts_authenticators,
    decide_answer,
    decide_end,
    handle,
    judge,
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
    note = transition_note(failed, actor="device:x")
    assert (note.action, note.outcome, note.reason, note.actor) == (
        "operation.failed",
        failed.status,
        "bad-signature",
        "device:x",
    )
    expired = operation(OperationKind.SIGNATURE, Phase.EXPIRED)
    assert transition_note(expired, actor="system").reason is None


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


# -- the decisions that end an operation -------------------------------------------------


def device_of(owner: Operation, *, failed: int = 0) -> Device:
    return Device(
        id=owner.device_id,
        user_id=owner.user_id,
        name="phone",
        platform="ios",
        public_key=b"\x04" + bytes(64),
        status=DeviceStatus.ACTIVE,
        enrolled_at=NOW,
        updated_at=NOW,
        counter=4,
        failed_attempts=failed,
    )


def user_of(owner: Operation, status: UserStatus = UserStatus.ACTIVE) -> User:
    return User(
        id=owner.user_id,
        username="u",
        status=status,
        attributes={},
        created_at=NOW,
        updated_at=NOW,
    )


def answer_to(owner: Operation, decision: Decision = Decision.APPROVE) -> DeviceAnswer:
    return DeviceAnswer(
        device_id=owner.device_id,
        decision=decision,
        user_verification=UserVerification.BIOMETRIC,
        counter=5,
        signature=b"sig",
        public_key=b"\x04" + bytes(64),
        device_name="new phone",
        platform="android",
    )


def verdict_on(*, valid: bool, decision: Decision = Decision.APPROVE) -> Verdict:
    return judge(
        signature_valid=valid,
        decision=decision,
        user_verification=UserVerification.BIOMETRIC,
        require_user_verification=True,
    )


LATER = NOW + timedelta(seconds=30)


def decided_answer(
    owner: Operation,
    verdict: Verdict,
    *,
    failed: int = 0,
    refusal: str | None = None,
    decision: Decision = Decision.APPROVE,
) -> Decided:
    registering = owner.kind is OperationKind.REGISTRATION
    return decide_answer(
        handle(State(owner.phase), Answer()),
        owner,
        answer_to(owner, decision),
        verdict,
        device=None if registering else device_of(owner, failed=failed),
        user=user_of(owner, UserStatus.NEW if registering else UserStatus.ACTIVE),
        point=b"\x04point",
        payload=b"payload",
        attestation=None,
        refusal=refusal,
        now=LATER,
        max_failed_attempts=5,
    )


@pytest.mark.parametrize("event", [Cancel(), Expire()])
def test_an_end_is_the_next_version_without_its_sealed_context(event: Cancel | Expire) -> None:
    pending = operation(OperationKind.AUTHORISATION, Phase.DISPATCHED, post_context_sealed=b"s")
    decided = decide_end(pending, event, actor="system", now=LATER)
    ended = decided.operation
    expected = Phase.CANCELLED if isinstance(event, Cancel) else Phase.EXPIRED
    assert (ended.phase, ended.version, ended.completed_at) == (expected, 3, LATER)
    assert ended.post_context_sealed is None
    assert decided.notes == (Note(f"operation.{expected.value}", ended.status, None, "system"),)
    assert (decided.device, decided.user, decided.result_claims) == (None, None, None)
    with pytest.raises(IllegalTransition, match=r"^cancel is not allowed"):
        decide_end(ended, Cancel(), actor="system", now=LATER)


@pytest.mark.parametrize("kind", [OperationKind.AUTHORISATION, OperationKind.SIGNATURE])
def test_an_approval_succeeds_signs_and_releases(kind: OperationKind) -> None:
    pending = operation(kind, Phase.DISPATCHED, text="I agree")
    decided = decided_answer(pending, verdict_on(valid=True))
    done = decided.operation
    assert done.phase is Phase.SUCCEEDED
    assert (done.decision, done.counter, done.device_signature) == (Decision.APPROVE, 5, b"sig")
    assert Effect.RELEASE_CONTEXT in decided.transition.effects
    assert decided.result_claims is not None
    assert decided.result_claims["txn"] == str(pending.id)
    assert (decided.consent_claims is not None) == (kind is OperationKind.SIGNATURE)
    assert decided.notes[0] == Note(
        "operation.succeeded", done.status, None, f"device:{pending.device_id}"
    )
    assert decided.device is not None
    assert decided.device.counter == 5
    assert decided.user is not None
    assert decided.user.last_login_at == LATER
    assert decided.new_device is None


def test_a_decline_signs_nothing_and_resets_the_count() -> None:
    pending = operation(OperationKind.AUTHORISATION, Phase.CREATED)
    decided = decided_answer(
        pending,
        verdict_on(valid=True, decision=Decision.DECLINE),
        failed=3,
        decision=Decision.DECLINE,
    )
    assert decided.operation.failure_reason is FailureReason.DECLINED
    assert decided.result_claims is None
    assert decided.consent_claims is None
    assert decided.device is not None
    assert decided.device.failed_attempts == 0


@pytest.mark.parametrize("callback_url", [None, "https://bank.example/hook"])
def test_the_fifth_bad_signature_locks_and_calls_back_if_asked(callback_url: str | None) -> None:
    pending = operation(OperationKind.AUTHORISATION, Phase.CREATED, callback_url=callback_url)
    decided = decided_answer(pending, verdict_on(valid=False), failed=4)
    assert decided.operation.failure_reason is FailureReason.BAD_SIGNATURE
    assert decided.device is not None
    assert decided.device.status is DeviceStatus.LOCKED
    assert [note.action for note in decided.notes] == ["operation.failed", "device.locked"]
    locked = [event for event, _ in decided.callbacks]
    assert locked == (["authenticator.locked"] if callback_url else [])


def test_a_registration_enrols_its_device_or_notes_the_refused_attestation() -> None:
    pending = operation(OperationKind.REGISTRATION, Phase.DISPATCHED)
    enrolled = decided_answer(pending, verdict_on(valid=True))
    assert enrolled.new_device is not None
    assert (enrolled.new_device.id, enrolled.new_device.public_key) == (
        pending.device_id,
        b"\x04point",
    )
    assert enrolled.new_device.name == "new phone"
    assert [note.action for note in enrolled.notes] == ["operation.succeeded", "device.enrolled"]
    assert enrolled.user is not None
    assert enrolled.user.status is UserStatus.ACTIVE
    assert enrolled.operation.public_key == b"\x04point"

    refused = decided_answer(
        pending,
        Verdict(succeeded=False, reason=FailureReason.ATTESTATION_FAILED),
        refusal="not a genuine phone",
    )
    assert refused.new_device is None
    assert refused.operation.failure_reason is FailureReason.ATTESTATION_FAILED
    assert [note.action for note in refused.notes] == [
        "operation.failed",
        "device.attestation-refused",
    ]
    assert refused.result_claims is None
