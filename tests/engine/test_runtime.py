"""The runtime (supervisor, actors, their timer) with fake ports and Trio's MockClock: units of
work run inline in the Trio thread on a SQLite file, signatures are verified inline, and
callbacks are recorded instead of sent. No thread is started, so the autojump clock moves
time whenever every task waits: lifetimes and expiries are tested in no time."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import pytest
import trio
import trio.testing
from sqlalchemy.engine import Connection

from engine.actors import Context, Supervisor
from engine.attestation import Attestor
from engine.dispatch import WebhookDispatcher
from engine.model import AnswerResult, OperationRequest, Payee, Payment, Phase
from engine.peers import Peers
from engine.settings import AttestationSettings, DatabaseSettings, OperationSettings
from engine.statements import Lease, OutboxItem
from engine.store import Store
from hsm.keyring import KeyPurpose, Keyring
from hsm.tokens import TokenSigner
from hsm.verify_backends import OpenSSLVerifyBackend
from tapsign_sdk.device import Authenticator
from tapsign_sdk.model import Decision, OperationKind
from tapsign_sdk.problems import Conflict, TapsignError
from tests.engine.conftest import ISSUER, TrioWallClock

T = TypeVar("T")
PAYMENT = Payment(amount="42.00", currency="EUR", payee=Payee(name="Shop", account="DE89 3704"))
CALLBACK = "https://bank.example/callbacks"


class InlineUnits:
    """The store's port without a thread: each unit of work runs at once, in the caller's
    thread, in its own transaction (engine/store.py's, so audit head and commit are real)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.writes = 0

    async def write(
        self, work: Callable[[Connection], T], *, prepare: Callable[[], None] | None = None
    ) -> T:
        self.writes += 1
        if prepare is not None:
            prepare()
        with self.store.transaction(write=True) as connection:
            return work(connection)

    async def read(self, work: Callable[[Connection], T]) -> T:
        with self.store.transaction(write=False) as connection:
            return work(connection)


class InlineVerifier:
    """The verifier's port without a thread: libcrypto's verification, one at a time."""

    def __init__(self) -> None:
        self.backend = OpenSSLVerifyBackend()

    async def verify(self, *, public_key: bytes, message: bytes, signature: bytes) -> bool:
        (result,) = self.backend.verify_batch([(public_key, message, signature)])
        if isinstance(result, Exception):
            raise result
        return result


class RecordedCallbacks:
    """The callback queue's port: what would be delivered, in order."""

    def __init__(self) -> None:
        self.items: list[OutboxItem] = []

    def enqueue(self, items: Sequence[OutboxItem]) -> None:
        self.items.extend(items)

    def lease(self, now: datetime) -> Lease:
        return Lease(holder="runtime", until=now + timedelta(seconds=30))


class Runtime:
    def __init__(self, supervisor: Supervisor, units: InlineUnits, callbacks: RecordedCallbacks):
        self.supervisor = supervisor
        self.units = units
        self.callbacks = callbacks

    async def enrol(self) -> tuple[Authenticator, UUID]:
        phone = Authenticator()
        request = OperationRequest(
            kind=OperationKind.REGISTRATION, username="alice", create_user=True
        )
        operation = (await self.supervisor.start(request, actor="test")).operation
        result = await self.supervisor.answer(operation.id, phone.answer(operation))
        assert result.operation.phase is Phase.SUCCEEDED
        return phone, operation.user_id

    async def pay(self, user_id: UUID, **fields: object) -> UUID:
        request = OperationRequest(
            kind=OperationKind.AUTHORISATION,
            user_id=user_id,
            payment=PAYMENT,
            callback_url=CALLBACK,
            **fields,  # type: ignore[arg-type]
        )
        return (await self.supervisor.start(request, actor="test")).operation.id


@pytest.fixture
async def runtime(keyring: Keyring, tmp_path: Path) -> AsyncIterator[Runtime]:
    """The runtime on fake ports; its tests ask for ``autojump_clock`` (pytest-trio runs a
    test on the clock the test itself requests)."""
    store = Store(DatabaseSettings(url=f"sqlite:///{tmp_path / 'tapsign.db'}"))
    store.migrate()
    units, callbacks = InlineUnits(store), RecordedCallbacks()
    supervisor = Supervisor(
        Context(
            store=units,
            keyring=keyring,
            verifier=InlineVerifier(),
            attestor=Attestor(AttestationSettings()),
            consent=TokenSigner(keyring, KeyPurpose.CONSENT, issuer=ISSUER),
            tokens=TokenSigner(keyring, KeyPurpose.TOKEN, issuer=ISSUER),
            callbacks=callbacks,
            dispatcher=WebhookDispatcher(),
            peers=Peers(None),
            settings=OperationSettings(),
            clock=TrioWallClock(),
        )
    )
    threads = set(threading.enumerate())
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield Runtime(supervisor, units, callbacks)
        # The ports started no thread (one left over from an earlier test may have ended).
        assert set(threading.enumerate()) <= threads
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_payment_from_start_to_success(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    phone, user_id = await runtime.enrol()
    writes = runtime.units.writes
    transaction = await runtime.pay(user_id)
    shown = await runtime.supervisor.dispatch(transaction, await phone_device(runtime, transaction))
    result = await runtime.supervisor.answer(transaction, phone.answer(shown))
    assert result.operation.phase is Phase.SUCCEEDED
    assert result.operation.result_token is not None
    # The start's unit and the answer's unit; the fetch and the status touch nothing, and
    # the callback (the payment has a callback URL) is a row in the answer's unit.
    assert runtime.units.writes - writes == 2
    assert (await runtime.supervisor.get(transaction)).phase is Phase.SUCCEEDED
    assert [item.event for item in runtime.callbacks.items][-1] == "transaction.succeeded"


async def phone_device(runtime: Runtime, transaction: UUID) -> UUID:
    return (await runtime.supervisor.get(transaction)).device_id


async def test_an_unanswered_payment_expires_on_time_and_is_forgotten(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    _, user_id = await runtime.enrol()
    started = trio.current_time()
    transaction = await runtime.pay(user_id, expires_in=120)
    waited = await runtime.supervisor.wait(transaction, version=1)
    assert waited.phase is Phase.EXPIRED
    assert trio.current_time() - started == pytest.approx(120, abs=0.001)
    assert runtime.supervisor.statistics().live_operations == 0
    assert [item.event for item in runtime.callbacks.items][-1] == "transaction.expired"


async def test_an_answer_in_the_inbox_before_the_deadline_is_judged(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    """The expiry is queued behind the messages that arrived before it."""
    phone, user_id = await runtime.enrol()
    transaction = await runtime.pay(user_id, expires_in=60)
    shown = await runtime.supervisor.dispatch(transaction, await phone_device(runtime, transaction))
    await trio.sleep(59.5)
    result = await runtime.supervisor.answer(transaction, phone.answer(shown))
    assert result.operation.phase is Phase.SUCCEEDED


async def test_two_answers_at_once_one_is_taken(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    phone, user_id = await runtime.enrol()
    transaction = await runtime.pay(user_id)
    shown = await runtime.supervisor.dispatch(transaction, await phone_device(runtime, transaction))
    approve = phone.answer(shown)
    decline = phone.answer(shown, decision=Decision.DECLINE)
    outcomes: list[object] = []

    async def send(answer: object) -> None:
        try:
            outcomes.append(await runtime.supervisor.answer(transaction, answer))  # type: ignore[arg-type]
        except TapsignError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, approve)
        nursery.start_soon(send, decline)
    taken = [outcome for outcome in outcomes if not isinstance(outcome, TapsignError)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, TapsignError)]
    assert len(taken) == len(refused) == 1
    (won,) = taken
    assert isinstance(won, AnswerResult)
    assert str(refused[0]) == f"the transaction is {won.operation.status}"


async def test_a_full_inbox_refuses_with_a_conflict(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    _, user_id = await runtime.enrol()
    transaction = await runtime.pay(user_id)
    device = await phone_device(runtime, transaction)
    results: list[object] = []

    async def fetch() -> None:
        try:
            results.append(await runtime.supervisor.dispatch(transaction, device))
        except Conflict as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(OperationSettings().inbox_size + 2):
            nursery.start_soon(fetch)
    conflicts = [result for result in results if isinstance(result, Conflict)]
    assert len(conflicts) == 2
