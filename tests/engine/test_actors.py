"""Operations end to end inside the engine: real store (SQLite and PostgreSQL), real SoftHSM2
keyring, real batched verifier, and a phone signing with its own key."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import jwt
import msgspec
import pytest
import sqlalchemy as sa
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from engine import statements as db
from engine.errors import (
    DeviceNotActive,
    OperationNotFound,
    OperationNotPending,
    UserNotActive,
    UserNotFound,
)
from engine.model import (
    DeviceStatus,
    FailureReason,
    Operation,
    OperationRequest,
    Payee,
    Payment,
    Phase,
    UserStatus,
)
from engine.schema import audit_log, operations, outbox
from engine.service import Engine
from hsm.keyring import Keyring
from tapsign_sdk.device import Authenticator
from tapsign_sdk.model import Decision, DeviceAnswer, OperationKind, UserVerification
from tapsign_sdk.problems import InvalidInput
from tests.engine.conftest import ISSUER, EngineFactory, clock_stopped

PAYMENT = Payment(amount="42.00", currency="EUR", payee=Payee(name="Shop", account="DE89 3704"))
CALLBACK = "http://127.0.0.1:9/callbacks"  # discard port: deliveries fail, rows stay queued


async def enrol(engine: Engine, username: str = "alice") -> tuple[Authenticator, UUID, UUID]:
    """Register a phone for a new user; returns the phone, the user id and the device id."""
    phone = Authenticator()
    operation = (
        await engine.supervisor.start(
            OperationRequest(kind=OperationKind.REGISTRATION, username=username, create_user=True),
            actor="test",
        )
    ).operation
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    assert result.operation.phase is Phase.SUCCEEDED
    return phone, operation.user_id, operation.device_id


async def start(engine: Engine, user_id: UUID, **fields: Any) -> Operation:
    request = OperationRequest(
        kind=fields.pop("kind", OperationKind.AUTHENTICATION), user_id=user_id, **fields
    )
    return (await engine.supervisor.start(request, actor="test")).operation


def rows(engine: Engine, table: sa.Table) -> list[Any]:
    with engine.store.engine.connect() as connection:
        return list(connection.execute(table.select()))


async def test_registration_creates_the_user_and_device(engine: Engine) -> None:
    phone, user_id, device_id = await enrol(engine)
    user = await engine.identity.get_user(user_id)
    device = await engine.identity.get_device(device_id)
    assert user.status is UserStatus.ACTIVE
    assert user.last_login_at is not None
    assert (device.user_id, device.public_key, device.status) == (
        user_id,
        phone.public_key,
        DeviceStatus.ACTIVE,
    )
    assert (device.name, device.platform, device.counter) == ("test phone", "ios", 1)


async def test_registration_proves_possession_of_the_new_key(engine: Engine) -> None:
    operation = (
        await engine.supervisor.start(
            OperationRequest(kind=OperationKind.REGISTRATION, username="mallory", create_user=True),
            actor="test",
        )
    ).operation
    honest, impostor = Authenticator(), Authenticator()
    answer = honest.answer(operation)
    forged = msgspec.structs.replace(answer, public_key=impostor.public_key)
    result = await engine.supervisor.answer(operation.id, forged)
    assert (result.operation.phase, result.operation.failure_reason) == (
        Phase.FAILED,
        FailureReason.BAD_SIGNATURE,
    )
    assert await engine.identity.list_devices(operation.user_id) == []


async def test_authentication_and_the_status_waiter(engine: Engine) -> None:
    phone, user_id, device_id = await enrol(engine)
    operation = await start(engine, user_id, message="Log in to Bank")
    assert (operation.status, operation.device_id, operation.require_user_verification) == (
        "pending",
        device_id,
        True,  # two factors by default, for authentications too
    )
    woken: list[Operation] = []

    async def wait() -> None:
        woken.append(await engine.supervisor.wait(operation.id, version=operation.version))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        fetched = await engine.supervisor.dispatch(operation.id, device_id)
        assert fetched.phase is Phase.DISPATCHED
        assert (fetched.version, woken) == (operation.version, [])  # not stored, no wake-up
        result = await engine.supervisor.answer(operation.id, phone.answer(fetched))
        assert result.operation.phase is Phase.SUCCEEDED
    assert woken == [result.operation]
    assert (await engine.supervisor.get(operation.id)).phase is Phase.SUCCEEDED
    device = await engine.identity.get_device(device_id)
    assert device.counter == 2
    assert device.last_used_at is not None


async def test_payment_with_dynamic_linking(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    operation = await start(engine, user_id, kind=OperationKind.AUTHORISATION, payment=PAYMENT)
    assert operation.require_user_verification  # two factors by default for payments
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    assert result.operation.phase is Phase.SUCCEEDED
    assert result.operation.payment == PAYMENT


async def test_amount_changed_after_the_user_saw_it_breaks_the_signature(engine: Engine) -> None:
    phone, user_id, device_id = await enrol(engine)
    operation = await start(engine, user_id, kind=OperationKind.AUTHORISATION, payment=PAYMENT)
    # The phone showed (and signed) 4.20, but the stored operation says 42.00.
    shown = msgspec.structs.replace(
        operation, payment=msgspec.structs.replace(PAYMENT, amount="4.20")
    )
    result = await engine.supervisor.answer(operation.id, phone.answer(shown))
    assert (result.operation.phase, result.operation.failure_reason) == (
        Phase.FAILED,
        FailureReason.BAD_SIGNATURE,
    )
    assert result.post_context is None
    assert (await engine.identity.get_device(device_id)).failed_attempts == 1


async def test_declines_are_signed(engine: Engine) -> None:
    phone, user_id, device_id = await enrol(engine)
    operation = await start(engine, user_id)
    declined = await engine.supervisor.answer(
        operation.id, phone.answer(operation, decision=Decision.DECLINE)
    )
    assert declined.operation.failure_reason is FailureReason.DECLINED
    assert declined.operation.decision is Decision.DECLINE

    # A decline someone else made up does not count as the user's decline.
    operation = await start(engine, user_id)
    forged = msgspec.structs.replace(
        phone.answer(operation, decision=Decision.APPROVE), decision=Decision.DECLINE
    )
    result = await engine.supervisor.answer(operation.id, forged)
    assert result.operation.failure_reason is FailureReason.BAD_SIGNATURE
    assert (await engine.identity.get_device(device_id)).failed_attempts == 1


async def test_possession_only_authentications_when_the_caller_may(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    operation = await start(
        engine, user_id, require_user_verification=False, allow_possession_only=True
    )
    assert not operation.require_user_verification
    result = await engine.supervisor.answer(
        operation.id, phone.answer(operation, user_verification=UserVerification.NONE)
    )
    assert result.operation.phase is Phase.SUCCEEDED


async def test_user_verification_can_be_required(engine: Engine) -> None:
    phone, user_id, device_id = await enrol(engine)
    operation = await start(engine, user_id, require_user_verification=True)
    result = await engine.supervisor.answer(
        operation.id, phone.answer(operation, user_verification=UserVerification.NONE)
    )
    assert result.operation.failure_reason is FailureReason.USER_VERIFICATION_MISSING
    assert (await engine.identity.get_device(device_id)).failed_attempts == 1


async def test_a_replayed_answer_changes_nothing(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    operation = await start(engine, user_id)
    answer = phone.answer(operation)
    first = await engine.supervisor.answer(operation.id, answer)
    assert first.operation.phase is Phase.SUCCEEDED
    with pytest.raises(OperationNotPending, match=r"^the transaction is succeeded$"):
        await engine.supervisor.answer(operation.id, answer)
    with pytest.raises(OperationNotPending):
        await engine.supervisor.answer(
            operation.id, phone.answer(operation, decision=Decision.DECLINE)
        )
    assert await engine.supervisor.get(operation.id) == first.operation


async def test_an_answer_from_another_users_device_is_refused(engine: Engine) -> None:
    _, alice, _ = await enrol(engine, "alice")
    bob_phone, _, bob_device = await enrol(engine, "bob")
    operation = await start(engine, alice)
    answer = msgspec.structs.replace(bob_phone.answer(operation), device_id=bob_device)
    with pytest.raises(OperationNotFound, match=r"^no such transaction for this authenticator$"):
        await engine.supervisor.answer(operation.id, answer)
    assert (await engine.supervisor.get(operation.id)).phase is Phase.CREATED


async def test_five_failures_lock_the_device_and_the_sixth_is_never_verified(
    engine: Engine,
) -> None:
    phone, user_id, device_id = await enrol(engine)
    thief = Authenticator(phone.private_key)  # right key, wrong payload: a bad signature
    for attempt in range(1, 6):
        operation = await start(engine, user_id, callback_url=CALLBACK)
        wrong = msgspec.structs.replace(operation, message="something else")
        result = await engine.supervisor.answer(operation.id, thief.answer(wrong))
        assert result.operation.failure_reason is FailureReason.BAD_SIGNATURE
        device = await engine.identity.get_device(device_id)
        assert device.failed_attempts == attempt
    assert device.status is DeviceStatus.LOCKED
    events = [row.event for row in rows(engine, outbox)]
    assert events.count("authenticator.locked") == 1
    assert "device.locked" in [row.action for row in rows(engine, audit_log)]

    # The device is locked: new operations cannot be started for it ...
    with pytest.raises(DeviceNotActive, match=r"^the user has no active authenticator$"):
        await start(engine, user_id)
    # ... and an answer to one started before the lock is not verified at all.
    await engine.identity.unlock_device(device_id, actor="admin")
    operation = await start(engine, user_id)
    await engine.identity.lock_device(device_id, actor="admin")
    verified_before = engine.verifier.statistics()
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    assert result.operation.failure_reason is FailureReason.DEVICE_LOCKED
    after = engine.verifier.statistics()
    assert (after.verified, after.failed) == (verified_before.verified, verified_before.failed)

    # Unlocking resets the count; the honest phone works again.
    unlocked = await engine.identity.unlock_device(device_id, actor="admin")
    assert (unlocked.status, unlocked.failed_attempts) == (DeviceStatus.ACTIVE, 0)
    operation = await start(engine, user_id)
    assert (
        await engine.supervisor.answer(operation.id, phone.answer(operation))
    ).operation.phase is Phase.SUCCEEDED


async def test_a_counter_that_does_not_increase_is_a_risk_signal(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    phone.counter = 0  # e.g. a cloned key starting over
    operation = await start(engine, user_id)
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    assert result.operation.phase is Phase.SUCCEEDED
    risks = [row for row in rows(engine, audit_log) if row.outcome == "risk"]
    assert [(row.action, row.reason) for row in risks] == [
        ("device.counter-not-increasing", "counter 1 after 1")
    ]


async def test_cancel(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    operation = await start(engine, user_id)
    cancelled = await engine.supervisor.cancel(operation.id)
    assert cancelled.phase is Phase.CANCELLED
    with pytest.raises(OperationNotPending, match=r"^the transaction is cancelled$"):
        await engine.supervisor.answer(operation.id, phone.answer(operation))
    with pytest.raises(OperationNotPending):
        await engine.supervisor.cancel(operation.id)


async def test_operations_expire_on_time(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    with clock_stopped(autojump_clock):
        phone, user_id, _ = await enrol(engine)
        operation = await start(
            engine, user_id, kind=OperationKind.AUTHORISATION, payment=PAYMENT, expires_in=120
        )
    await trio.sleep(119)
    assert (await engine.supervisor.get(operation.id)).phase is Phase.CREATED
    await trio.sleep(2)
    expired = await engine.supervisor.wait(operation.id, version=operation.version)
    assert expired.phase is Phase.EXPIRED
    with pytest.raises(OperationNotPending, match=r"^the transaction is expired$"):
        await engine.supervisor.answer(operation.id, phone.answer(operation))


async def test_post_operation_context_only_after_success_and_never_stored_in_clear(
    engine: Engine,
) -> None:
    phone, user_id, _ = await enrol(engine)
    secret = "card PIN 9876"
    operation = await start(engine, user_id, post_context=secret)
    stored = rows(engine, operations)[-1]
    assert stored.post_context_sealed is not None
    assert secret.encode() not in bytes(stored.post_context_sealed)
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    assert result.post_context == secret
    assert rows(engine, operations)[-1].post_context_sealed is None  # gone once delivered

    declined = await start(engine, user_id, post_context=secret)
    result = await engine.supervisor.answer(
        declined.id, phone.answer(declined, decision=Decision.DECLINE)
    )
    assert result.post_context is None
    assert rows(engine, operations)[-1].post_context_sealed is None


async def test_consent_jwt_is_evidence_anyone_can_check(engine: Engine, keyring: Keyring) -> None:
    phone, user_id, device_id = await enrol(engine)
    operation = await start(
        engine, user_id, kind=OperationKind.SIGNATURE, text="I accept the loan terms v3."
    )
    result = await engine.supervisor.answer(operation.id, phone.answer(operation))
    token = result.operation.result
    assert token is not None
    # tapsign's signature, from the published JWKS alone:
    key = jwt.PyJWKSet.from_dict(keyring.jwks())[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key=key, algorithms=["ES256"], issuer=ISSUER)
    assert (claims["jti"], claims["sub"], claims["authenticator"]) == (
        str(operation.id),
        str(user_id),
        str(device_id),
    )
    assert claims["consent"]["text"] == "I accept the loan terms v3."

    # ... and the phone's own signature over the payload, from the key in the token:
    def unb64(value: str) -> bytes:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    device_key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), unb64(claims["devicePublicKey"])
    )
    payload = unb64(claims["signedPayload"])
    device_key.verify(unb64(claims["deviceSignature"]), payload, ec.ECDSA(hashes.SHA256()))
    assert json.loads(payload)["text"] == "I accept the loan terms v3."


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"user_id": None, "username": "nobody"}, UserNotFound, r"^no user with that username$"),
        ({"user_id": uuid4()}, UserNotFound, r"^no user with that id$"),
        ({"message": "x" * 501}, InvalidInput, r"^the message has at most 500 characters$"),
        (
            {"payment": PAYMENT},
            InvalidInput,
            r"^amount, currency and payee belong to authorisations$",
        ),
        ({"kind": OperationKind.AUTHORISATION}, InvalidInput, r"^amount, currency and payee"),
        (
            {"kind": OperationKind.AUTHORISATION, "payment": PAYMENT, "expires_in": 301},
            InvalidInput,
            r"^this operation lives 5 to 300 seconds$",
        ),
        ({"kind": OperationKind.SIGNATURE}, InvalidInput, r"^a signature, and only a signature"),
        ({"device_id": uuid4()}, InvalidInput, r"^the user has no authenticator with that id$"),
        ({"pre_context": "c" * 2049}, InvalidInput, r"^a context has at most 2048 characters$"),
        ({"callback_url": "ftp://x"}, InvalidInput, r"^the callback URL is an http\(s\) URL$"),
        (
            {"require_user_verification": False},
            InvalidInput,
            r"^this access key may not start authentications without user verification$",
        ),
        (
            {
                "kind": OperationKind.AUTHORISATION,
                "payment": PAYMENT,
                "require_user_verification": False,
                "allow_possession_only": True,
            },
            InvalidInput,
            r"^an authorisation or a signature always needs the user verified on the phone$",
        ),
        (
            {
                "kind": OperationKind.SIGNATURE,
                "text": "I agree",
                "require_user_verification": False,
                "allow_possession_only": True,
            },
            InvalidInput,
            r"^an authorisation or a signature always needs the user verified on the phone$",
        ),
        ({"username": "someone-else"}, InvalidInput, r"^userId and username name different users$"),
    ],
)
async def test_bad_requests_write_nothing(
    engine: Engine, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    _, user_id, _ = await enrol(engine)
    before = (len(rows(engine, operations)), len(rows(engine, audit_log)))
    with pytest.raises(error, match=message):
        await start(engine, **{"user_id": user_id, **fields})
    assert (len(rows(engine, operations)), len(rows(engine, audit_log))) == before


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("0", "EUR"), ("-1", "EUR"), ("1e3", "EUR"), ("1.00", "EURO"), ("1.00", "ZZZ")],
)
def test_invalid_amounts_and_currencies(amount: str, currency: str) -> None:
    with pytest.raises(InvalidInput):
        Payment(amount=amount, currency=currency, payee=PAYMENT.payee)


async def test_locked_and_deactivated_users_and_devices(engine: Engine) -> None:
    _, user_id, device_id = await enrol(engine)
    second_phone = Authenticator()
    registration = (
        await engine.supervisor.start(
            OperationRequest(kind=OperationKind.REGISTRATION, user_id=user_id), actor="test"
        )
    ).operation
    await engine.supervisor.answer(registration.id, second_phone.answer(registration))
    await engine.identity.deactivate_device(device_id, actor="admin")
    written = (len(rows(engine, operations)), len(rows(engine, audit_log)))
    with pytest.raises(DeviceNotActive, match=r"^the authenticator is deactivated$"):
        await start(engine, user_id, device_id=device_id)
    # Without a device named, the newest active one is asked.
    assert (await start(engine, user_id)).device_id == registration.device_id
    written = (written[0] + 1, written[1] + 1)

    await engine.identity.lock_user(user_id, actor="admin")
    with pytest.raises(UserNotActive, match=r"^the user is locked$"):
        await start(engine, user_id)
    assert (len(rows(engine, operations)), len(rows(engine, audit_log))) == (
        written[0],
        written[1] + 1,  # the lock itself
    )
    await engine.identity.unlock_user(user_id, actor="admin")
    pending = await start(engine, user_id)
    await engine.deactivate_user(user_id, actor="admin")
    assert (await engine.supervisor.get(pending.id)).phase is Phase.CANCELLED
    with pytest.raises(OperationNotPending):
        await engine.supervisor.answer(pending.id, second_phone.answer(pending))
    with pytest.raises(UserNotActive, match=r"^the user is deactivated$"):
        await start(engine, user_id)


async def test_two_answers_at_once_in_one_process(engine: Engine) -> None:
    phone, user_id, _ = await enrol(engine)
    operation = await start(engine, user_id)
    approve = phone.answer(operation)
    decline = phone.answer(operation, decision=Decision.DECLINE)
    outcomes: list[str] = []

    async def send(answer: DeviceAnswer) -> None:
        try:
            outcomes.append((await engine.supervisor.answer(operation.id, answer)).operation.phase)
        except OperationNotPending:
            outcomes.append("conflict")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, approve)
        nursery.start_soon(send, decline)
    assert sorted(outcomes) in (["conflict", "failed"], ["conflict", "succeeded"])


async def test_pending_operations_resume_after_a_restart(engine_factory: EngineFactory) -> None:
    async with engine_factory() as first:
        phone, user_id, device_id = await enrol(first)
        waiting = await start(first, user_id, message="still there after the restart")
        assert (await first.supervisor.pending_for_device(device_id, limit=10))[0].id == waiting.id
    async with engine_factory() as second:
        assert second.supervisor.statistics().resumed == 1
        result = await second.supervisor.answer(waiting.id, phone.answer(waiting))
        assert result.operation.phase is Phase.SUCCEEDED
        assert await second.supervisor.pending_for_device(device_id, limit=10) == []


async def test_overdue_operations_expire_at_start_up(
    engine_factory: EngineFactory, autojump_clock: trio.testing.MockClock
) -> None:
    with clock_stopped(autojump_clock):
        async with engine_factory() as first:
            _, user_id, _ = await enrol(first)
            operation = await start(first, user_id, expires_in=60)
    await trio.sleep(61)  # tapsign was down while the operation ran out
    async with engine_factory() as second:
        expired = await second.supervisor.wait(operation.id, version=operation.version)
        assert expired.phase is Phase.EXPIRED


async def test_two_processes_answer_at_once_and_exactly_one_wins(
    engine_factory: EngineFactory,
) -> None:
    async with engine_factory() as first, engine_factory() as second:
        phone, user_id, _ = await enrol(first)
        operation = await start(first, user_id)
        answer = phone.answer(operation)
        outcomes: list[str] = []

        async def send(engine: Engine) -> None:
            try:
                result = await engine.supervisor.answer(operation.id, answer)
                outcomes.append(result.operation.phase.value)
            except OperationNotPending:
                outcomes.append("conflict")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, first)
            nursery.start_soon(send, second)
        assert sorted(outcomes) == ["conflict", "succeeded"]
        stored = await second.store.read(
            lambda connection: db.get_operation(connection, operation.id)
        )
        assert stored is not None
        assert stored.phase is Phase.SUCCEEDED
        assert stored.version == operation.version + 1
        succeeded = [row for row in rows(first, audit_log) if row.action == "operation.succeeded"]
        assert len(succeeded) == 2  # the registration's and this one's: nothing twice


async def test_a_long_poll_in_one_process_ends_when_another_stores_the_answer(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    peers = str(tmp_path / "peers")
    async with (
        engine_factory(peers_dir=peers) as first,
        engine_factory(peers_dir=peers) as second,
    ):
        phone, user_id, _ = await enrol(first)
        owned_by_first = await start(first, user_id)
        owned_by_second = await start(second, user_id)
        woken: dict[UUID, Operation] = {}

        async def wait(operation: Operation) -> None:
            # The bound only keeps a broken wake-up from hanging the suite.
            with trio.fail_after(20):
                woken[operation.id] = await first.supervisor.wait(
                    operation.id, version=operation.version
                )

        async with trio.open_nursery() as nursery:
            # The first waits on its own (now stale) actor, then on a watch: no actor here.
            nursery.start_soon(wait, owned_by_first)
            nursery.start_soon(wait, owned_by_second)
            await trio.testing.wait_all_tasks_blocked()
            for operation in (owned_by_first, owned_by_second):
                result = await second.supervisor.answer(operation.id, phone.answer(operation))
                assert result.operation.phase is Phase.SUCCEEDED
        assert {key: value.phase for key, value in woken.items()} == {
            owned_by_first.id: Phase.SUCCEEDED,
            owned_by_second.id: Phase.SUCCEEDED,
        }
        assert first.supervisor.statistics().changed_elsewhere == 1
        assert first.supervisor.statistics().live_operations == 0  # the stale actor ended
        assert second.peers.statistics().sent == 2
        assert first.peers.statistics().received == 2


@pytest.fixture
def without_notices(database_url: str) -> None:
    if database_url.startswith("postgresql"):
        pytest.skip("on PostgreSQL a process hears of another's answer (LISTEN/NOTIFY)")


@pytest.mark.usefixtures("without_notices")
async def test_a_stale_actor_that_expires_takes_the_stored_end(
    engine_factory: EngineFactory, autojump_clock: trio.testing.MockClock
) -> None:
    # No peers: the first process never hears that the second stored the answer.
    async with engine_factory() as first, engine_factory() as second:
        with clock_stopped(autojump_clock):
            phone, user_id, _ = await enrol(first)
            operation = await start(first, user_id, expires_in=60)
            await second.supervisor.answer(operation.id, phone.answer(operation))
            assert (await first.supervisor.get(operation.id)).phase is Phase.CREATED
        await trio.sleep(61)
        # Its expiry lost the compare-and-set: the actor ended with the stored state.
        ended = await first.supervisor.wait(operation.id, version=operation.version)
        assert ended.phase is Phase.SUCCEEDED
        await trio.testing.wait_all_tasks_blocked()
        assert first.supervisor.statistics().live_operations == 0


async def test_the_operations_of_a_process_that_died_are_expired_by_another(
    engine_factory: EngineFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Nobody holds them any more (a host gone for good): another process's sweep expires
    them once overdue by a sweep period (5 s), with their audit entry and callback."""
    async with engine_factory() as survivor:
        with clock_stopped(autojump_clock):
            async with engine_factory() as doomed:
                _, user_id, _ = await enrol(doomed)
                operation = await start(doomed, user_id, expires_in=60, callback_url=CALLBACK)
            # The process is gone; its operation is pending in the database, held by nobody.
            assert survivor.supervisor.statistics().live_operations == 0
            autojump_clock.jump(60 + 5 + 1)  # the survivor's next sweep finds it overdue

            for _ in range(200):  # the sweep reads and writes in threads: real time
                ended = await survivor.store.read(
                    lambda connection: db.get_operation(connection, operation.id)
                )
                if ended is not None and ended.phase.terminal:
                    break
                await trio.to_thread.run_sync(time.sleep, 0.05)
        assert ended is not None
        assert ended.phase is Phase.EXPIRED
        expired = [row for row in rows(survivor, audit_log) if row.action == "operation.expired"]
        assert [(row.operation_id, row.actor) for row in expired] == [(operation.id, "system")]
        events = [row.event for row in rows(survivor, outbox) if row.operation_id == operation.id]
        assert events == ["transaction.expired"]


async def test_an_answer_judged_on_facts_changed_elsewhere_is_judged_again(
    engine_factory: EngineFactory,
) -> None:
    """An actor holds the user and device it judges with (no read per answer); the answer's
    write is conditional on them, so a lock made by another process is found then."""
    async with engine_factory() as first, engine_factory() as second:
        phone, user_id, device_id = await enrol(first)
        operation = await start(first, user_id)
        await second.identity.lock_device(device_id, actor="admin")
        reads = first.store.statistics().reads
        result = await first.supervisor.answer(operation.id, phone.answer(operation))
        assert result.operation.failure_reason is FailureReason.DEVICE_LOCKED
        assert first.store.statistics().reads == reads + 1  # the facts, read again once
        device = await first.identity.get_device(device_id)
        # The answer counted nothing against the locked device, nor for it.
        assert (device.status, device.failed_attempts, device.counter) == (
            DeviceStatus.LOCKED,
            0,
            1,
        )
