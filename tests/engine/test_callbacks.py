"""Callbacks: signed, delivered in order, retried with backoff, surviving restarts, and a
failing endpoint holding up nobody else. A real HTTP server plays the relying party."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import jwt
import msgspec
import pytest
import sqlalchemy as sa
import trio
import trio.testing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from engine.callbacks import check_callback_url
from engine.model import FailureReason, OperationRequest, Phase, utc_now
from engine.peers import announce_to
from engine.schema import outbox
from engine.service import Engine, end_user
from engine.settings import CallbackSettings
from hsm.keyring import Keyring
from tapsign_sdk.device import Authenticator
from tapsign_sdk.model import OperationKind
from tapsign_sdk.problems import InvalidInput
from tests.engine.conftest import EngineFactory, clock_stopped
from tests.receiver import Received, Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        yield receiver
        nursery.cancel_scope.cancel()


async def enrol(engine: Engine) -> tuple[Authenticator, UUID]:
    phone = Authenticator()
    operation = (
        await engine.supervisor.start(
            OperationRequest(kind=OperationKind.REGISTRATION, username="alice", create_user=True),
            actor="test",
        )
    ).operation
    await engine.supervisor.answer(operation.id, phone.answer(operation))
    return phone, operation.user_id


async def start(engine: Engine, user_id: UUID, url: str) -> UUID:
    operation = (
        await engine.supervisor.start(
            OperationRequest(kind=OperationKind.AUTHENTICATION, user_id=user_id, callback_url=url),
            actor="test",
        )
    ).operation
    return operation.id


async def until(receiver: Receiver, count: int) -> list[Received]:
    while len(receiver.received) < count:
        await receiver.arrived.wait()
    return receiver.received


async def eventually(condition: Callable[[], bool], *, limit: float = 86_400) -> None:
    """Let (mock) time pass in steps until ``condition`` holds.

    With the autojump clock, time jumps whenever every task waits, including while worker
    threads write to the database, so progress is checked, not assumed from elapsed time.
    """
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the state lives in the database
            await trio.sleep(1)


async def delivered(engine: Engine, count: int) -> None:
    """Wait until the deliverer has recorded ``count`` deliveries (its database write follows
    the receiver's answer)."""
    with trio.fail_after(10):
        while engine.callbacks.statistics().delivered < count:  # noqa: ASYNC110 - see eventually
            await trio.sleep(0.01)


def outbox_rows(engine: Engine) -> list[sa.Row[tuple[object, ...]]]:
    with engine.store.engine.connect() as connection:
        return list(connection.execute(outbox.select().order_by(outbox.c.id)))


def unb64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


async def test_callbacks_are_signed_with_the_published_key(
    engine: Engine, receiver: Receiver, keyring: Keyring
) -> None:
    phone, user_id = await enrol(engine)
    operation_id = await start(engine, user_id, receiver.url())
    await engine.supervisor.answer(
        operation_id, phone.answer(await engine.supervisor.get(operation_id))
    )
    (received,) = await until(receiver, 1)
    body = msgspec.json.decode(received.body)
    assert body["event"] == "transaction.succeeded"
    assert (body["transactionId"], body["status"], body["userId"]) == (
        str(operation_id),
        "succeeded",
        str(user_id),
    )
    assert received.headers["tapsign-event"] == "transaction.succeeded"
    fields = dict(part.split("=", 1) for part in received.headers["tapsign-signature"].split(","))
    key = jwt.PyJWKSet.from_dict(keyring.jwks())[fields["kid"]].key
    raw = unb64(fields["es256"])
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, fields["t"].encode() + b"." + received.body, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(
            der, fields["t"].encode() + b"." + received.body + b" ", ec.ECDSA(hashes.SHA256())
        )
    await delivered(engine, 1)
    assert outbox_rows(engine)[-1].delivered_at is not None


async def test_receiver_down_for_minutes_then_everything_arrives_in_order(
    engine_factory: EngineFactory, autojump_clock: trio.testing.MockClock
) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    settings = CallbackSettings(
        first_retry_seconds=1, max_retry_seconds=60, allow_private_networks=True
    )
    async with engine_factory(settings) as engine:
        with clock_stopped(autojump_clock):
            phone, user_id = await enrol(engine)
            thief = Authenticator(phone.private_key)
            first = await start(engine, user_id, receiver.url())
            operation = await engine.supervisor.get(first)
            # Approvals do not wait for callbacks: this returns while deliveries fail.
            await engine.supervisor.answer(first, phone.answer(operation))
            second = await start(engine, user_id, receiver.url())
            await engine.supervisor.cancel(second)
            for _ in range(5):  # the fifth failure also locks the device: two events
                failing = await start(engine, user_id, receiver.url())
                wrong = msgspec.structs.replace(await engine.supervisor.get(failing), message="x")
                result = await engine.supervisor.answer(failing, thief.answer(wrong))
                assert result.operation.failure_reason is FailureReason.BAD_SIGNATURE

        # Minutes of refused connections: every operation's first callback retries with
        # backoff (1, 2, 4, 8 s ...); the second callback of the last operation waits
        # behind its first, untried.
        await eventually(lambda: all(row.attempts >= 4 for row in outbox_rows(engine)[:7]))
        rows = outbox_rows(engine)
        assert len(rows) == 8
        assert all(row.delivered_at is None for row in rows)
        assert rows[-1].attempts == 0
        assert all((row.next_attempt_at - row.created_at).total_seconds() >= 15 for row in rows[:7])

        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve)
            received = await until(receiver, 8)
            nursery.cancel_scope.cancel()
    events = [
        (msgspec.json.decode(r.body)["transactionId"], r.headers["tapsign-event"]) for r in received
    ]
    assert (str(first), "transaction.succeeded") in events
    assert (str(second), "transaction.cancelled") in events
    last = str(failing)
    mine = [event for transaction, event in events if transaction == last]
    assert mine == ["authenticator.locked", "transaction.failed"]  # in the order they happened


async def test_a_failing_endpoint_holds_up_no_one_else(
    engine: Engine, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.status = lambda path: 500 if path == "/broken" else 204
    with clock_stopped(autojump_clock):
        _, user_id = await enrol(engine)
        broken = await start(engine, user_id, receiver.url("/broken"))
        await engine.supervisor.cancel(broken)
        healthy = await start(engine, user_id, receiver.url("/fine"))
        await engine.supervisor.cancel(healthy)
    while not [r for r in receiver.received if r.path == "/fine"]:
        await receiver.arrived.wait()
    attempts_on_broken = [r for r in receiver.received if r.path == "/broken"]
    assert attempts_on_broken  # tried, failed, and did not block /fine
    await eventually(lambda: engine.callbacks.statistics().retried >= 5)
    assert engine.callbacks.statistics().delivered == 1
    row = next(row for row in outbox_rows(engine) if row.url.endswith("/broken"))
    assert (row.delivered_at, row.last_error) == (None, "HTTP 500")


async def test_a_slow_receiver_holds_its_own_slots_only(engine_factory: EngineFactory) -> None:
    """A receiver that never answers (a tarpit) does not delay another relying party's
    callbacks: it holds its destination's slots, not everyone's."""
    slow, fast = Receiver(), Receiver()
    slow.delay = lambda path: math.inf
    settings = CallbackSettings(
        concurrency=4, per_destination=2, timeout_seconds=60, allow_private_networks=True
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(slow.serve)
        await nursery.start(fast.serve)
        async with engine_factory(settings) as engine:
            _, user_id = await enrol(engine)
            for _ in range(8):
                await engine.supervisor.cancel(await start(engine, user_id, slow.url()))
            await engine.supervisor.cancel(await start(engine, user_id, fast.url()))
            # Before each destination had slots of its own, this waited for the tarpit.
            with trio.fail_after(20):
                await until(fast, 1)
            assert len(slow.received) == 2  # its two slots, both still waiting for answers
        nursery.cancel_scope.cancel()


async def test_callbacks_to_private_addresses_are_refused_unless_allowed(
    engine_factory: EngineFactory, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    settings = CallbackSettings(first_retry_seconds=1, max_retry_seconds=1, give_up_seconds=5)
    async with engine_factory(settings) as engine:
        with clock_stopped(autojump_clock):
            _, user_id = await enrol(engine)
            await engine.supervisor.cancel(await start(engine, user_id, receiver.url()))
        await eventually(lambda: engine.callbacks.statistics().given_up == 1)
        (row,) = outbox_rows(engine)
        assert row.last_error == "destination address not allowed"
    assert receiver.received == []


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://bank.example/own", True),
        ("https://hooks.example/tapsign/", True),
        ("https://hooks.example/tapsign/payments?x=1", True),
        ("https://HOOKS.example:443/tapsign/x", True),
        ("https://hooks.example/other", False),
        ("http://hooks.example/tapsign/x", False),
        ("https://hooks.example:8443/tapsign/x", False),
        ("https://hooks.example.evil.test/tapsign/x", False),
        ("https://attacker.test/", False),
    ],
)
def test_callback_urls_are_the_keys_own_or_allowed(url: str, allowed: bool) -> None:
    settings = CallbackSettings(allowed_urls=["https://hooks.example/tapsign/"])
    if allowed:
        assert check_callback_url(url, own="https://bank.example/own", settings=settings) == url
    else:
        with pytest.raises(InvalidInput, match=r"^the callback URL must be the access key's own"):
            check_callback_url(url, own="https://bank.example/own", settings=settings)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://localhost/",
        "http://api.localhost/",
    ],
)
def test_private_destinations_are_refused_unless_allowed(url: str) -> None:
    settings = CallbackSettings(allowed_urls=[url])
    with pytest.raises(InvalidInput, match=r"^callbacks to loopback, link-local and private"):
        check_callback_url(url, own=None, settings=settings)
    allowing = msgspec.structs.replace(settings, allow_private_networks=True)
    assert check_callback_url(url, own=None, settings=allowing) == url


@pytest.mark.parametrize("url", ["http://[0]/", "http://a:99999/", "http://[::1/"])
def test_malformed_callback_urls_are_invalid_input(url: str) -> None:
    settings = CallbackSettings(allowed_urls=["http://a/"], allow_private_networks=True)
    with pytest.raises(InvalidInput, match=r"^the callback URL is an http\(s\) URL$"):
        check_callback_url(url, own=None, settings=settings)


async def test_a_url_that_cannot_be_sent_to_fails_its_callback_only(
    engine: Engine, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    """The API refuses such URLs (tapsign_sdk/wire.py); one stored before, or written by another
    version, must not stop the deliverer and with it the engine."""
    with clock_stopped(autojump_clock):
        _, user_id = await enrol(engine)
        broken = await start(engine, user_id, "http://a\u007f/")
        await engine.supervisor.cancel(broken)
        healthy = await start(engine, user_id, receiver.url("/fine"))
        await engine.supervisor.cancel(healthy)
    await eventually(lambda: engine.callbacks.statistics().delivered == 1)
    await eventually(lambda: engine.callbacks.statistics().retried >= 1)
    row = next(row for row in outbox_rows(engine) if row.operation_id == broken)
    assert (row.delivered_at, row.last_error) == (None, "InvalidURL")
    assert [received.path for received in receiver.received] == ["/fine"]


async def test_deliveries_are_given_up_after_the_limit(
    engine_factory: EngineFactory, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.status = lambda path: 503
    settings = CallbackSettings(
        first_retry_seconds=1,
        max_retry_seconds=10,
        give_up_seconds=60,
        allow_private_networks=True,
    )
    async with engine_factory(settings) as engine:
        with clock_stopped(autojump_clock):
            _, user_id = await enrol(engine)
            operation_id = await start(engine, user_id, receiver.url())
            await engine.supervisor.cancel(operation_id)
        await eventually(lambda: engine.callbacks.statistics().given_up == 1)
        (row,) = outbox_rows(engine)
        assert row.failed_at is not None
        assert row.delivered_at is None
        assert (row.failed_at - row.created_at).total_seconds() >= 60
        tries = len(receiver.received)
        await trio.sleep(600)
        assert len(receiver.received) == tries  # given up means no more tries


async def test_undelivered_callbacks_survive_a_restart(
    engine_factory: EngineFactory, receiver: Receiver
) -> None:
    receiver.status = lambda path: 500
    # Short leases: the restarted process takes the rows up once its predecessor's run out.
    settings = CallbackSettings(
        first_retry_seconds=3600, rescan_seconds=0.2, lease_seconds=0.6, allow_private_networks=True
    )
    async with engine_factory(settings) as first:
        _, user_id = await enrol(first)
        operation_id = await start(first, user_id, receiver.url())
        await first.supervisor.cancel(operation_id)
        await until(receiver, 1)
    receiver.status = lambda path: 200
    async with engine_factory(settings) as second:
        second_try = await until(receiver, 2)
        first_delivery, second_delivery = (r.headers["tapsign-delivery"] for r in second_try)
        assert first_delivery == second_delivery
        await delivered(second, 1)
        assert outbox_rows(second)[0].delivered_at is not None
        assert (await second.supervisor.get(operation_id)).phase is Phase.CANCELLED


async def test_each_callback_goes_out_once_from_one_of_several_processes(
    engine_factory: EngineFactory, receiver: Receiver
) -> None:
    """Two processes on one database: a callback a command wrote (no process holds it) is
    delivered by one of them, once; one a process wrote and still holds (its receiver
    failing) is not taken by the other."""
    settings = CallbackSettings(
        first_retry_seconds=3600, rescan_seconds=0.1, allow_private_networks=True
    )
    async with engine_factory(settings) as first, engine_factory(settings) as second:
        _, user_id = await enrol(first)
        receiver.status = lambda path: 500 if path == "/held" else 200
        held = await start(first, user_id, receiver.url("/held"))
        await first.supervisor.cancel(held)
        await until(receiver, 1)
        commanded = await start(first, user_id, receiver.url("/commanded"))
        # What tapsign users deactivate does, from outside both processes.
        await end_user(first.store, user_id, delete=False, actor="admin", clock=utc_now, lease=None)
        with trio.fail_after(10):
            while not [r for r in receiver.received if r.path == "/commanded"]:
                await receiver.arrived.wait()
        await trio.sleep(1)  # ten rescans of each
        assert [r.path for r in receiver.received] == ["/held", "/commanded"]
        assert (await second.supervisor.get(commanded)).phase is Phase.CANCELLED
        queued = {engine: engine.callbacks.statistics().queued for engine in (first, second)}
        assert queued == {first: 1, second: 0}  # the failing one stays with its writer


async def test_a_process_whose_lease_was_taken_over_stops_sending(
    engine_factory: EngineFactory, receiver: Receiver
) -> None:
    """A process that renewed too late (its lease ran out and another process holds the
    row now) learns it at its next renewal and sends that callback no more; once that
    other lease runs out, one of the two sends it, once."""
    settings = CallbackSettings(
        first_retry_seconds=0.2,
        max_retry_seconds=0.2,
        rescan_seconds=0.1,
        allow_private_networks=True,
    )
    async with engine_factory(settings) as first, engine_factory(settings) as second:
        _, user_id = await enrol(first)
        receiver.status = lambda path: 500
        operation_id = await start(first, user_id, receiver.url())
        await first.supervisor.cancel(operation_id)
        await until(receiver, 2)  # first is retrying

        def lease_to_another(until: timedelta) -> None:
            with first.store.engine.begin() as connection:
                connection.execute(
                    outbox.update().values(leased_by="another", lease_until=utc_now() + until)
                )

        lease_to_another(timedelta(days=1))
        await eventually(lambda: first.callbacks.statistics().queued == 0, limit=10)
        tries = len(receiver.received)
        receiver.status = lambda path: 200
        await trio.sleep(1)  # ten renewals of each, five retries
        assert len(receiver.received) == tries  # the other holds it: neither sends it
        lease_to_another(timedelta(days=-1))  # that holder died
        await until(receiver, tries + 1)
        await trio.sleep(1)
        assert len(receiver.received) == tries + 1
        (row,) = outbox_rows(second)
        assert row.delivered_at is not None
        assert first.callbacks.statistics().queued + second.callbacks.statistics().queued == 0


async def test_a_transactions_callbacks_arrive_in_order_whichever_process_wrote_them(
    engine_factory: EngineFactory, receiver: Receiver
) -> None:
    """The push of a transaction started by one process is still being retried when
    another process cancels it: the cancellation's callback waits, unheld, until the push
    is through, and is claimed at once then by the process that sent the push (the
    rescans are an hour apart here)."""
    settings = CallbackSettings(
        first_retry_seconds=0.2,
        max_retry_seconds=0.2,
        rescan_seconds=3600,
        allow_private_networks=True,
    )
    async with engine_factory(settings) as first, engine_factory(settings) as second:
        _, user_id = await enrol(first)
        receiver.status = lambda path: 500
        started = await first.supervisor.start(
            OperationRequest(
                kind=OperationKind.AUTHENTICATION,
                user_id=user_id,
                callback_url=receiver.url(),
                push_notification="Approve your login",
            ),
            actor="test",
        )
        await until(receiver, 2)  # first is retrying the push
        await second.supervisor.cancel(started.operation.id)
        await trio.sleep(1)  # five retries of the push: nobody sends the cancellation
        assert {r.headers["tapsign-event"] for r in receiver.received} == {"push.created"}
        receiver.status = lambda path: 200
        await eventually(lambda: all(row.delivered_at for row in outbox_rows(first)), limit=10)
    delivered_events = [r.headers["tapsign-event"] for r in receiver.received]
    assert delivered_events[-2:] == ["push.created", "transaction.cancelled"]
    assert delivered_events.count("transaction.cancelled") == 1


async def test_callbacks_a_command_wrote_are_claimed_at_once(
    engine_factory: EngineFactory, receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    """``tapsign users deactivate`` cancels a user's transactions from outside the servers:
    its callbacks, held by nobody, are claimed as soon as the servers hear of them (the
    rescans are an hour apart here)."""
    settings = CallbackSettings(rescan_seconds=3600, allow_private_networks=True)
    peers = str(tmp_path / "peers")
    async with engine_factory(settings, peers) as first, engine_factory(settings, peers):
        _, user_id = await enrol(first)
        operation_id = await start(first, user_id, receiver.url("/commanded"))
        _, cancelled = await end_user(
            first.store, user_id, delete=False, actor="admin", clock=utc_now, lease=None
        )
        if not database_url.startswith("postgresql"):  # there, the transaction told them
            announce_to(peers, [(operation.id, operation.version) for operation, _ in cancelled])
        with trio.fail_after(10):
            (delivered,) = await until(receiver, 1)
        assert msgspec.json.decode(delivered.body)["transactionId"] == str(operation_id)
        assert (await first.supervisor.get(operation_id)).phase is Phase.CANCELLED


async def test_the_webhook_dispatcher_asks_the_relying_party_to_push(
    engine: Engine, receiver: Receiver
) -> None:
    phone, user_id = await enrol(engine)
    operation = (
        await engine.supervisor.start(
            OperationRequest(
                kind=OperationKind.AUTHENTICATION,
                user_id=user_id,
                callback_url=receiver.url(),
                push_notification="Approve your login",
            ),
            actor="test",
        )
    ).operation
    (push,) = await until(receiver, 1)
    body = msgspec.json.decode(push.body)
    assert (push.headers["tapsign-event"], body["notificationMessage"]) == (
        "push.created",
        "Approve your login",
    )
    assert body["authenticatorId"] == str(operation.device_id)
    assert "challenge" not in body  # the push wakes the app; the content is fetched
    await engine.supervisor.answer(operation.id, phone.answer(operation))
    received = await until(receiver, 2)
    assert [r.headers["tapsign-event"] for r in received] == [
        "push.created",
        "transaction.succeeded",
    ]
