"""The PSD2 rules on a judged answer's device and user (engine.operations.consequences), as
plain functions over every verdict, device state and counter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from hypothesis import given
from hypothesis import strategies as st

from engine.model import Device, DeviceStatus, FailureReason, User, UserStatus
from engine.operations import Note, Verdict, consequences, judge, precheck
from tapsign_sdk.model import Decision, UserVerification

THEN = datetime(2026, 12, 1, tzinfo=UTC)
NOW = THEN + timedelta(minutes=3)
MAX = 5


def device(*, status: DeviceStatus, failed: int, counter: int) -> Device:
    return Device(
        id=uuid4(),
        user_id=uuid4(),
        name="phone",
        platform="ios",
        public_key=b"\x04" + bytes(64),
        status=status,
        enrolled_at=THEN,
        updated_at=THEN,
        counter=counter,
        failed_attempts=failed,
    )


def user(status: UserStatus) -> User:
    return User(
        id=uuid4(), username="u", status=status, attributes={}, created_at=THEN, updated_at=THEN
    )


verdicts = st.builds(
    judge,
    signature_valid=st.booleans(),
    decision=st.sampled_from(Decision),
    user_verification=st.sampled_from(UserVerification),
    require_user_verification=st.booleans(),
) | st.sampled_from(
    [
        precheck(device_status=DeviceStatus.LOCKED, user_status=UserStatus.ACTIVE),
        precheck(device_status=DeviceStatus.ACTIVE, user_status=UserStatus.DEACTIVATED),
    ]
)


@given(
    verdict=verdicts,
    status=st.sampled_from([DeviceStatus.ACTIVE, DeviceStatus.LOCKED]),
    failed=st.integers(0, MAX + 1),
    stored_counter=st.integers(0, 10),
    counter=st.integers(0, 10),
    user_status=st.sampled_from([UserStatus.NEW, UserStatus.ACTIVE]),
)
def test_the_device_and_user_after_any_verdict(
    verdict: Verdict | None,
    status: DeviceStatus,
    failed: int,
    stored_counter: int,
    counter: int,
    user_status: UserStatus,
) -> None:
    assert verdict is not None
    held = device(status=status, failed=failed, counter=stored_counter)
    holder = user(user_status)
    decided = consequences(
        verdict, device=held, user=holder, counter=counter, now=NOW, max_failed_attempts=MAX
    )
    actions = [note.action for note in decided.notes]
    if not (verdict.failed_attempt or verdict.verified):
        # Judged without verifying anything: nothing changes, nothing is noted.
        assert decided.device is None
        assert decided.user is None
        assert decided.notes == ()
        assert not decided.locked
        return
    assert decided.device is not None
    assert decided.user is not None
    assert decided.device.updated_at == decided.user.updated_at == NOW
    if verdict.failed_attempt:
        # RTS art. 4(3)(b): consecutive failures counted, the fifth locks an active device.
        assert decided.device.failed_attempts == failed + 1
        assert decided.locked == (failed + 1 >= MAX and status is DeviceStatus.ACTIVE)
        expected = DeviceStatus.LOCKED if decided.locked else status
        assert decided.device.status is expected
        assert actions == (["device.locked"] if decided.locked else [])
        assert decided.device.counter == stored_counter
        assert decided.user.last_failed_login_at == NOW
        assert decided.user.last_login_at is None
    else:
        assert decided.device.failed_attempts == 0
        assert decided.device.counter == max(stored_counter, counter)
        assert decided.device.last_used_at == NOW
        assert not decided.locked
        assert decided.device.status is status
        risky = (stored_counter or counter) and counter <= stored_counter
        assert actions == (["device.counter-not-increasing"] if risky else [])
    if verdict.succeeded:
        assert decided.user.last_login_at == NOW
        assert decided.user.status is UserStatus.ACTIVE
    else:
        assert decided.user.status is user_status


def test_the_fifth_failure_locks_and_says_so() -> None:
    bad = judge(
        signature_valid=False,
        decision=Decision.APPROVE,
        user_verification=UserVerification.BIOMETRIC,
        require_user_verification=True,
    )
    assert bad.reason is FailureReason.BAD_SIGNATURE
    held = device(status=DeviceStatus.ACTIVE, failed=MAX - 1, counter=3)
    decided = consequences(bad, device=held, user=None, counter=4, now=NOW, max_failed_attempts=MAX)
    assert decided.locked
    assert decided.notes == (Note("device.locked", "ok", "5 consecutive failed verifications"),)
    assert decided.user is None


def test_a_registration_changes_only_the_user() -> None:
    good = judge(
        signature_valid=True,
        decision=Decision.APPROVE,
        user_verification=UserVerification.BIOMETRIC,
        require_user_verification=True,
    )
    decided = consequences(
        good, device=None, user=user(UserStatus.NEW), counter=1, now=NOW, max_failed_attempts=MAX
    )
    assert decided.device is None
    assert decided.user is not None
    assert decided.user.status is UserStatus.ACTIVE
