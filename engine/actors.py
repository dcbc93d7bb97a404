"""Operations as actors: one object per live operation, held by the supervisor.

Theory of operation
-------------------
The :class:`Supervisor` holds an :class:`OperationActor` for every pending operation:
those it creates, and at start-up those the store still holds (each resumes with its
remaining time, or expires at once). The actor owns its operation until it ends. The API
talks to it by message (fetch, answer, cancel) into a bounded inbox and waits for the
reply; the supervisor's one timer posts the expiry when the deadline passes. An idle actor
has no task: the first message starts one in the supervisor's nursery that processes the
messages one at a time and ends when the inbox is empty, so an operation never judges two
answers at once: the second finds the operation ended (PSD2 RTS art. 4(1): a challenge is
accepted once).

For each message the actor asks the pure state machine (engine/operations.py) what
happens and performs the effects: verify through the batched verifier, persist with a
compare-and-set on the version (one transaction also holding the audit entry, the device's
failure count and the callback's outbox row), then wake status waiters and release the
post-operation context. The terminal state is committed before anyone is told. If the
compare-and-set fails another actor (this process or another one on the same database)
changed the operation first: the actor reloads it and the loser gets a clean conflict.
Every stored change is announced to the other processes on this host (engine/peers.py);
one that holds an actor or a waiter for that operation reads it again.

The deadline bounds the wait for a message, not the work on one: an answer that arrived
in time is judged even if judging ends after the deadline. Nothing polls the database.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import heapq
import logging
import math
import secrets
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar
from uuid import UUID, uuid4

import msgspec
import outcome
import trio
from sqlalchemy.engine import Connection

from engine import statements as db
from engine.attestation import AttestationRefused, Attestor
from engine.callbacks import outbox_row
from engine.dispatch import Dispatcher
from engine.errors import (
    DeviceNotActive,
    IllegalTransition,
    OperationNotFound,
    OperationNotPending,
    TooManyAuthenticators,
    TooManyPending,
    UserNotActive,
    UserNotFound,
)
from engine.histogram import TRANSACTION_SECONDS, Histograms
from engine.identity import new_user
from engine.model import (
    AnswerResult,
    Clock,
    Device,
    DeviceStatus,
    FailureReason,
    Operation,
    OperationRequest,
    Phase,
    User,
    UserStatus,
)
from engine.operations import (
    NEEDS_USER_VERIFICATION,
    Answer,
    Cancel,
    Decided,
    Dispatch,
    Effect,
    Event,
    Expire,
    State,
    Transition,
    Verdict,
    callback,
    check_request,
    counts_authenticators,
    decide_answer,
    decide_end,
    handle,
    judge,
    precheck,
)
from engine.peers import Notices
from engine.recent import Recent
from engine.replay import Nonce, spend
from engine.settings import OperationSettings
from engine.statements import Lease, OutboxItem
from engine.tokens import STATUS_GRACE, TokenKind, token_claims
from hsm import ecdsa
from hsm.keyring import Keyring
from hsm.tokens import TokenSigner
from tapsign_sdk.model import (
    DeviceAnswer,
    OperationKind,
)
from tapsign_sdk.payload import signed_payload
from tapsign_sdk.problems import Conflict, InvalidInput, ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
#: How long, and how many, ended operations are kept in memory for their statuses.
ENDED_SECONDS = 600.0
ENDED_SIZE = 4096
#: What a phone is told of a transaction that is not its own, or does not exist.
NOT_THIS_DEVICES = "no such transaction for this authenticator"


class CallbackQueue(Protocol):
    def enqueue(self, items: Sequence[OutboxItem]) -> None:
        """Deliver these committed outbox rows (engine/callbacks.py)."""

    def lease(self, now: datetime) -> Lease:
        """This process's lease, from ``now``, on the rows it writes (engine/callbacks.py)."""


class Units(Protocol):
    """The store as the runtime uses it (engine/store.py's :class:`Store`): units of work,
    each in one thread hop and one transaction."""

    async def write(
        self, work: Callable[[Connection], T], *, prepare: Callable[[], None] | None = None
    ) -> T: ...

    async def read(self, work: Callable[[Connection], T]) -> T: ...


class Verifier(Protocol):
    """The batched verifier as the runtime uses it (hsm/verifier.py)."""

    async def verify(self, *, public_key: bytes, message: bytes, signature: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class Context:
    """What every actor shares: its ports (the store, the verifier, the keyring and its
    signers, the callback queue, the dispatcher, the peers) and its settings and clock."""

    store: Units
    keyring: Keyring
    verifier: Verifier
    attestor: Attestor
    consent: TokenSigner
    #: Signs result tokens.
    tokens: TokenSigner
    callbacks: CallbackQueue
    dispatcher: Dispatcher
    peers: Notices
    settings: OperationSettings
    clock: Clock
    #: Seconds from start to end of the transactions this process ended, per kind.
    durations: Histograms = field(default_factory=lambda: Histograms(TRANSACTION_SECONDS))


class Facts(msgspec.Struct, frozen=True, kw_only=True, weakref=True):
    """What an actor holds besides its operation, to judge an answer without reading: the
    user, and the device asked to answer (None: a registration's device, not enrolled yet;
    or a user or device deleted meanwhile). The answer's write is conditional on them (a
    compare-and-set on their state), so a change made elsewhere is found when storing."""

    user: User | None
    device: Device | None


class _Stale(Exception):
    """The user or device changed since the actor read them: read again and judge again.
    ``valid``: the answer's signature, if it was verified (it needs no second look)."""

    def __init__(self, valid: bool | None) -> None:
        super().__init__("the user or authenticator changed")
        self.valid = valid


#: Overdue operations one sweep expires at most (engine/actors.py ``_expire_overdue``).
SWEEP_LIMIT = 1000
#: Judgements of one answer before giving up on facts that keep changing.
STALE_TRIES = 3


def read_facts(connection: Connection, operation: Operation) -> Facts:
    return Facts(
        user=db.get_user(connection, operation.user_id),
        device=db.get_device(connection, operation.device_id),
    )


def _as_stored(facts: Facts, operation: Operation) -> Facts:
    """``facts`` as :func:`read_facts` would read them now, if nothing changed: a
    registration's device is not stored yet."""
    if operation.kind is OperationKind.REGISTRATION:
        return Facts(user=facts.user, device=None)
    return facts


class _Message:
    __slots__ = ("answer", "done", "event", "nonce", "result")

    def __init__(
        self, event: Event, answer: DeviceAnswer | None = None, nonce: Nonce | None = None
    ) -> None:
        self.event = event
        self.answer = answer
        self.nonce = nonce
        self.done = trio.Event()
        self.result: outcome.Outcome[Any] | None = None


class OperationActor:
    """Owns one pending operation until it ends; see the module docstring.

    An idle actor is a plain object, not a task: its inbox is a short list (at most
    ``inbox_size`` messages) drained by a task the supervisor starts when the first message
    arrives and that ends when the inbox is empty; its deadline is in the supervisor's
    timer. A pending operation then costs its records and little more, which matters with
    a hundred thousand of them (docs/discussion/performance.md).
    """

    __slots__ = (
        "_busy",
        "_changed",
        "_closed",
        "_inbox",
        "_supervisor",
        "context",
        "facts",
        "operation",
    )

    def __init__(
        self, context: Context, operation: Operation, facts: Facts, *, supervisor: Supervisor
    ) -> None:
        self.context = context
        self.operation = operation
        self.facts = facts
        self._supervisor = supervisor
        self._inbox: list[_Message] = []
        self._busy = False  # a task drains the inbox
        self._closed = False
        #: Made when somebody waits for a change, dropped when the change happens.
        self._changed: trio.Event | None = None

    # -- the API's side --------------------------------------------------------------------

    async def ask(
        self, event: Event, answer: DeviceAnswer | None = None, nonce: Nonce | None = None
    ) -> Any:
        """Send a message and wait for the actor's reply (or its error)."""
        message = _Message(event, answer, nonce)
        self._post(message)
        await message.done.wait()
        if message.result is None:  # pragma: no cover - always set before done
            raise ServiceUnavailable("no reply from the transaction")
        return message.result.unwrap()

    def expire(self) -> None:
        """The deadline passed (the supervisor's timer): end the operation as expired,
        after the messages that arrived before (an answer in time is judged)."""
        if not self._closed:
            self._post(_Message(Expire()), bounded=False)

    def _post(self, message: _Message, *, bounded: bool = True) -> None:
        if self._closed:
            raise OperationNotPending(f"the transaction is {self.operation.status}")
        if bounded and len(self._inbox) >= self.context.settings.inbox_size:
            raise Conflict("this transaction is busy with other requests; retry")
        if not self._busy:
            self._supervisor.start_soon(self._drain)  # raises if the engine has stopped
            self._busy = True
        self._inbox.append(message)

    def refresh(self, stored: Operation) -> None:
        """Another process stored a newer version: take it, and end if it has ended."""
        if stored.version > self.operation.version:
            self._changed_to(stored)
            if stored.phase.terminal and not self._busy:
                self._close(OperationNotPending(f"the transaction is {stored.status}"))

    async def wait_for_change(self, version: int) -> Operation:
        """The operation once its version is past ``version`` (callers bound the wait)."""
        while self.operation.version <= version and not self.operation.phase.terminal:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self.operation

    # -- the actor's side ------------------------------------------------------------------

    async def _drain(self) -> None:
        try:
            while self._inbox and not self.operation.phase.terminal:
                await self._process(self._inbox.pop(0))
        finally:
            self._busy = False
            if self.operation.phase.terminal:
                self._close(OperationNotPending(f"the transaction is {self.operation.status}"))
            elif self._inbox:  # cancelled: the server is shutting down
                self._close(ServiceUnavailable("tapsign is shutting down"))

    def _close(self, error: Exception) -> None:
        """No more messages: tell those still waiting ``error``, and leave the supervisor."""
        if not self._closed:
            self._closed = True
            self._supervisor.forget(self)
        while self._inbox:
            message = self._inbox.pop(0)
            message.result = outcome.Error(error)
            message.done.set()

    async def _process(self, message: _Message) -> None:
        try:
            if isinstance(message.event, Dispatch):
                result: Any = await self._dispatch()
            elif isinstance(message.event, Cancel):
                result = await self._end(Cancel())
            elif isinstance(message.event, Expire):
                # Another process may have ended it first: then the operation is as stored.
                with contextlib.suppress(OperationNotPending):
                    await self._end(Expire())
                result = self.operation
            elif message.answer is not None:
                result = await self._answer(message.answer, message.nonce)
            else:  # pragma: no cover - the supervisor only sends these three
                raise IllegalTransition("unknown message")
            message.result = outcome.Value(result)
        except Exception as exc:
            message.result = outcome.Error(exc)
        except BaseException:
            message.result = outcome.Error(ServiceUnavailable("tapsign is shutting down"))
            raise
        finally:
            message.done.set()

    def _transition(self, event: Event) -> Transition:
        try:
            return handle(State(self.operation.phase, self.operation.failure_reason), event)
        except IllegalTransition as exc:
            raise OperationNotPending(f"the transaction is {self.operation.status}") from exc

    async def _expire_if_due(self) -> None:
        if self.context.clock() >= self.operation.expires_at:
            await self._end(Expire())
            raise OperationNotPending("the transaction has expired")

    async def _dispatch(self) -> Operation:
        await self._expire_if_due()
        transition = self._transition(Dispatch())
        self.operation = msgspec.structs.replace(self.operation, phase=transition.state.phase)
        return self.operation

    async def _end(self, event: Cancel | Expire) -> Operation:
        actor = (
            "system"
            if isinstance(event, Expire)
            else f"relying-party:{self.operation.client_id or '-'}"
        )
        try:
            decided = decide_end(self.operation, event, actor=actor, now=self.context.clock())
        except IllegalTransition as exc:
            raise OperationNotPending(f"the transaction is {self.operation.status}") from exc
        stored, _ = await self._store(decided, before=self.operation)
        return stored

    async def _store(
        self,
        decided: Decided,
        *,
        before: Operation,
        judged: Facts | None = None,
        valid: bool | None = None,
        nonce: Nonce | None = None,
    ) -> tuple[Operation, str | None]:
        """Store ``decided``, decided on ``before``, in one unit of work (compare-and-set on
        the version of ``before``) whose thread hop also signs what it asks signed and
        unseals the context it releases; then notify. Returns the stored operation and the
        released context. The loser of a race reloads.

        ``before`` is the operation the decision was made on, not ``self.operation``: while an
        answer is being verified, another process may store its own answer and this actor
        take that newer version in (:meth:`refresh`); a compare-and-set against it would
        succeed and the transaction would take two answers. ``judged``: the facts an answer
        was judged on; if they changed, the unit rolls back and :class:`_Stale` (with the
        signature's validity ``valid``) says to judge again. ``nonce``: the answer's
        request's, spent in the same unit (a replay of it rolls everything back,
        engine/replay.py).
        """
        signed: dict[str, str] = {}
        released: list[str] = []

        def prepare() -> None:
            """In the writer's thread hop, before its transaction: the HSM's part."""
            if decided.result_claims is not None:
                signed["result_token"] = self.context.tokens.encode(
                    decided.result_claims, token_type=TokenKind.RESULT.media_type
                )
            if decided.consent_claims is not None:
                signed["result"] = self.context.consent.encode(
                    decided.consent_claims,
                    token_type="consent+jwt",  # noqa: S106 - a JWT type, not a password
                )
            sealed = before.post_context_sealed
            if Effect.RELEASE_CONTEXT in decided.transition.effects and sealed is not None:
                released.append(self.context.keyring.decrypt(sealed, aad=before.id.bytes).decode())

        stored: list[Operation] = []

        def persist(connection: Connection) -> list[OutboxItem] | None:
            after = msgspec.structs.replace(decided.operation, **signed)
            items = _store_decided(
                connection,
                decided,
                after,
                before=before,
                judged=judged,
                lease=self.context.callbacks.lease(after.updated_at),
                origin=self.context.peers.origin,
            )
            if items is not None and nonce is not None:
                spend(connection, nonce)
            stored.append(after)
            return items

        try:
            with trio.CancelScope(shield=True):  # a terminal state, once decided, is stored
                items = await self.context.store.write(persist, prepare=prepare)
        except _Stale:
            raise _Stale(valid) from None
        if items is None:
            current = await self.context.store.read(
                lambda connection: db.get_operation(connection, before.id)
            )
            if current is not None:
                self._changed_to(current)
            raise OperationNotPending(f"the transaction is {self.operation.status}")
        after = stored[-1]
        self._changed_to(after)
        _announce(self.context, after)
        if items:
            self.context.callbacks.enqueue(items)
        return after, released[0] if released else None

    def _changed_to(self, operation: Operation) -> None:
        self.operation = operation
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _answer(self, answer: DeviceAnswer, nonce: Nonce | None) -> AnswerResult:
        operation = self.operation
        if answer.device_id != operation.device_id:
            # Not this device's transaction: say nothing about it (another user's device).
            raise OperationNotFound(NOT_THIS_DEVICES)
        await self._expire_if_due()
        # Refuses a second answer or a replay. ``responded`` is held while the answer is
        # judged, not stored: a restart meanwhile leaves the operation open for an answer.
        responded = self._transition(Answer())
        registering = operation.kind is OperationKind.REGISTRATION
        if registering and answer.public_key is None:
            raise InvalidInput(
                "a registration answer carries the new public key", field="publicKey"
            )

        valid: bool | None = None  # the signature, once verified: it does not change
        for _ in range(STALE_TRIES):
            try:
                return await self._judge(responded, operation, answer, nonce, valid_before=valid)
            except _Stale as stale:
                valid = stale.valid
                self.facts = await self.context.store.read(
                    lambda connection: read_facts(connection, operation)
                )
        raise ServiceUnavailable("the user or authenticator keeps changing; retry")

    async def _judge(
        self,
        responded: Transition,
        operation: Operation,
        answer: DeviceAnswer,
        nonce: Nonce | None,
        *,
        valid_before: bool | None,
    ) -> AnswerResult:
        """Judge ``answer`` against the facts held, and store the outcome; :class:`_Stale`
        (with the signature's validity) if the user or device changed meanwhile."""
        registering = operation.kind is OperationKind.REGISTRATION
        user, device = self.facts.user, self.facts.device
        valid = valid_before
        point = (
            ecdsa.encode_point(ecdsa.load_public_key(answer.public_key))
            if registering and answer.public_key is not None
            else (device.public_key if device is not None else b"")
        )
        device_status = (
            DeviceStatus.ACTIVE
            if registering
            else (device.status if device is not None else DeviceStatus.DEACTIVATED)
        )
        verdict = precheck(
            device_status=device_status,
            user_status=user.status if user is not None else UserStatus.DEACTIVATED,
        )
        payload = b""
        if verdict is None:
            payload = signed_payload(
                operation,
                device_id=answer.device_id,
                decision=answer.decision,
                user_verification=answer.user_verification,
                counter=answer.counter,
                public_key=point if registering else None,
            )
            if valid is None:
                valid = await self.context.verifier.verify(
                    public_key=point, message=payload, signature=answer.signature
                )
            verdict = judge(
                signature_valid=valid,
                decision=answer.decision,
                user_verification=answer.user_verification,
                # Operations stored before every authorisation and signature had to be
                # verified (PSD2 RTS art. 4) may say otherwise.
                require_user_verification=operation.require_user_verification
                or operation.kind in NEEDS_USER_VERIFICATION,
            )
        attestation: str | None = None
        refusal: str | None = None
        if registering and verdict.succeeded:
            attestation, refusal = await self._attest(answer, point)
            if refusal is not None:
                verdict = Verdict(succeeded=False, reason=FailureReason.ATTESTATION_FAILED)
        facts = self.facts
        decided = decide_answer(
            responded,
            operation,
            answer,
            verdict,
            device=device,
            user=user,
            point=point,
            payload=payload,
            attestation=attestation,
            refusal=refusal,
            now=self.context.clock(),
            max_failed_attempts=self.context.settings.max_failed_attempts,
        )
        committed, released = await self._store(
            decided, before=operation, judged=facts, valid=valid, nonce=nonce
        )
        self.facts = Facts(
            user=decided.user or facts.user,
            device=None if registering else decided.device or facts.device,
        )
        return AnswerResult(operation=committed, post_context=released)

    async def _attest(self, answer: DeviceAnswer, point: bytes) -> tuple[str | None, str | None]:
        """What the registration's attestation proved, or why it is refused."""
        attestor = self.context.attestor
        if answer.attestation is None:
            return None, ("no attestation, and one is required" if attestor.required else None)
        try:
            attested = await trio.to_thread.run_sync(
                functools.partial(
                    attestor.check,
                    answer.attestation,
                    challenge=self.operation.challenge,
                    public_key=point,
                    now=self.context.clock(),
                )
            )
        except AttestationRefused as exc:
            return None, str(exc)
        return attested, None


def _announce(context: Context, operation: Operation) -> None:
    """Tell the other processes that this one stored ``operation``; time it if it ended."""
    context.peers.announce(operation.id, operation.version)
    if operation.completed_at is not None:
        seconds = (operation.completed_at - operation.created_at).total_seconds()
        context.durations.observe(f'kind="{operation.kind.value}"', seconds)


def _store_decided(
    connection: Connection,
    decided: Decided,
    after: Operation,
    *,
    before: Operation,
    lease: Lease | None,
    origin: str,
    judged: Facts | None = None,
) -> list[OutboxItem] | None:
    """Write ``decided`` (``after``: its operation with what the HSM signed): the operation
    if it is still at ``before``'s version (compare-and-set), a new device, the audit
    entries, the device and user if they are still as ``judged`` (else :class:`_Stale`, and
    the caller's unit rolls back), and the callbacks; on PostgreSQL, the change's notice to
    the other processes (``origin``: this one's name, engine/peers.py). None if another
    actor or process changed the operation first (nothing is written then)."""
    if not db.update_operation(connection, after, expected_version=before.version):
        return None
    db.notify_changed(connection, after, origin=origin)
    # Judged on the facts alone (a locked device, an inactive user), without an update to
    # guard: they must still hold.
    if (
        judged is not None
        and decided.device is None
        and decided.user is None
        and read_facts(connection, before) != _as_stored(judged, before)
    ):
        raise _Stale(None)
    if decided.new_device is not None:
        db.insert_device(connection, decided.new_device)
    for note in decided.notes:
        if note.action == "device.counter-not-increasing":
            log.warning("non-increasing signature counter from device %s", after.device_id)
        db.append_audit(
            connection,
            at=after.updated_at,
            actor=note.actor,
            action=note.action,
            outcome=note.outcome,
            operation_id=after.id,
            user_id=after.user_id,
            device_id=after.device_id,
            reason=note.reason,
        )
    # The device and user are stored only if they are still as they were judged.
    was_device = judged.device if judged is not None else None
    if (
        decided.device is not None
        and was_device is not None
        and not db.update_device_if(connection, decided.device, was=was_device)
    ):
        raise _Stale(None)
    was_user = judged.user if judged is not None else None
    if (
        decided.user is not None
        and was_user is not None
        and not db.update_user_if(connection, decided.user, status_was=was_user.status.value)
    ):
        raise _Stale(None)
    now = after.updated_at
    written = [
        outbox_row(connection, after, now, event=event, body=body, lease=lease)
        for event, body in decided.callbacks
    ]
    if Effect.CALLBACK in decided.transition.effects and after.callback_url:
        written.append(_operation_callback(connection, after, now, lease=lease))
    return [item for item in written if item is not None]


def _end_each(
    connection: Connection,
    pending: list[Operation],
    event: Cancel | Expire,
    *,
    actor: str,
    now: datetime,
    lease: Lease | None,
    origin: str,
) -> list[tuple[Operation, list[OutboxItem]]]:
    """End each of ``pending`` with ``event`` in the caller's transaction, unless another
    actor or process ended it first; returns those ended here with their callbacks. The
    actors holding them are told after the commit (:meth:`Supervisor.changed_here`,
    engine/peers.py)."""
    ended = []
    for before in pending:
        decided = decide_end(before, event, actor=actor, now=now)
        items = _store_decided(
            connection,
            decided,
            decided.operation,
            before=before,
            lease=lease,
            origin=origin,
        )
        if items is not None:
            ended.append((decided.operation, items))
    return ended


def cancel_pending_of_user(
    connection: Connection,
    user_id: UUID,
    *,
    now: datetime,
    actor: str,
    lease: Lease | None,
    origin: str,
) -> list[tuple[Operation, list[OutboxItem]]]:
    """Cancel every operation ``user_id`` has pending, in the caller's transaction: a user
    deactivated or deleted keeps nothing that could still be approved."""
    return _end_each(
        connection,
        db.pending_for_user(connection, user_id),
        Cancel(),
        actor=actor,
        now=now,
        lease=lease,
        origin=origin,
    )


def _operation_callback(
    connection: Connection, operation: Operation, now: datetime, *, lease: Lease | None
) -> OutboxItem | None:
    authenticators = (
        sum(
            device.status is not DeviceStatus.DEACTIVATED
            for device in db.list_devices(connection, operation.user_id)
        )
        if counts_authenticators(operation)
        else None
    )
    event, body = callback(operation, authenticators=authenticators)
    return outbox_row(connection, operation, now, event=event, body=body, lease=lease)


class StartedOperation(msgspec.Struct, frozen=True, kw_only=True):
    """A stored operation and its status token (engine/tokens.py)."""

    operation: Operation
    status_token: str


class SupervisorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    live_operations: int
    started: int
    resumed: int
    changed_elsewhere: int


class _Watch:
    """Waiters here on an operation that no actor of this process owns."""

    __slots__ = ("changed", "waiters")

    def __init__(self) -> None:
        self.changed = trio.Event()
        self.waiters = 0


class Supervisor:
    """Starts operations and the actors that own them; the API's way into operations."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._actors: dict[UUID, OperationActor] = {}
        #: Operations that ended lately: a status or a late answer after the end reads
        #: nothing (an ended operation never changes again).
        self._ended: Recent[UUID, Operation] = Recent(seconds=ENDED_SECONDS, size=ENDED_SIZE)
        self._watches: dict[UUID, _Watch] = {}
        #: The deadlines of the live operations, earliest first (a heap); the timer task
        #: sleeps until the first and is woken when an earlier one arrives.
        self._deadlines: list[tuple[datetime, UUID]] = []
        self._earlier_deadline = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._spawning_context = contextvars.copy_context()
        #: The facts actors hold, one object per user and device while any actor holds it.
        self._facts: weakref.WeakValueDictionary[tuple[UUID, UUID], Facts] = (
            weakref.WeakValueDictionary()
        )
        self._started = 0
        self._resumed = 0
        self._changed_elsewhere = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume the stored pending operations, then supervise until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Actors' tasks start in the engine's context, not in that of the request that
            # started them: a task keeps a copy of the context it was started from, and a
            # request's (Quart keeps the request there) would stay alive as long as the task.
            self._spawning_context = contextvars.copy_context()
            nursery.start_soon(self._expire_when_due)
            nursery.start_soon(self._expire_overdue)

            def pending(connection: Connection) -> list[tuple[Operation, Facts]]:
                return [
                    (operation, read_facts(connection, operation))
                    for operation in db.pending_operations(connection)
                ]

            for operation, facts in await self.context.store.read(pending):
                self._spawn(operation, facts)
                self._resumed += 1
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            live_operations=len(self._actors),
            started=self._started,
            resumed=self._resumed,
            changed_elsewhere=self._changed_elsewhere,
        )

    def start_soon(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run an actor's ``task`` in the supervisor's nursery."""
        if self._nursery is None:
            raise ServiceUnavailable("the engine is not running")
        self._spawning_context.run(self._nursery.start_soon, task)

    async def _expire_when_due(self) -> None:
        """Tell each actor when its deadline has passed: one timer for all of them."""
        while True:
            now = self.context.clock()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, operation_id = heapq.heappop(self._deadlines)
                actor = self._actors.get(operation_id)
                if actor is not None:
                    actor.expire()
            self._earlier_deadline = trio.Event()
            wait = (self._deadlines[0][0] - now).total_seconds() if self._deadlines else math.inf
            with trio.move_on_after(wait):
                await self._earlier_deadline.wait()

    async def _expire_overdue(self) -> None:
        """Expire the pending operations no actor here holds once they are overdue by a
        sweep period: those of a process that died, on this host or another, whose own
        timer is gone (a restart would resume them, but a host may not come back). The
        compare-and-set keeps a slow owner and several sweepers from ending one twice.
        Each sweep also purges the spent nonces and one-time tokens that have expired."""
        while True:
            await trio.sleep(self.context.settings.sweep_seconds)
            now = self.context.clock()
            await self._sweep(now)
            # Spent nonces and tokens are purged here rather than by every spend: that
            # DELETE was the costliest statement of a payment on PostgreSQL.
            await self.context.store.write(functools.partial(db.purge_consumed_tokens, now=now))

    async def _sweep(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.context.settings.sweep_seconds)
        overdue = await self.context.store.read(
            lambda connection: db.overdue_operations(connection, before=cutoff, limit=SWEEP_LIMIT)
        )
        unheld = [operation for operation in overdue if operation.id not in self._actors]
        if not unheld:
            return
        lease = self.context.callbacks.lease(now)
        origin = self.context.peers.origin
        expired = await self.context.store.write(
            lambda connection: _end_each(
                connection,
                unheld,
                Expire(),
                actor="system",
                now=now,
                lease=lease,
                origin=origin,
            )
        )
        for operation, items in expired:
            log.info("expired %s, overdue and held by no process", operation.id)
            self.changed_here(operation)
            self.context.callbacks.enqueue(items)

    def changed_elsewhere(self, operation_id: UUID, version: int) -> None:
        """Another process stored ``version`` of the operation (engine/peers.py)."""
        watch = self._watches.pop(operation_id, None)
        if watch is not None:
            watch.changed.set()
        actor = self._actors.get(operation_id)
        if actor is not None and actor.operation.version < version and self._nursery is not None:
            self._changed_elsewhere += 1
            self._nursery.start_soon(self._refresh, actor)

    async def resync(self) -> None:
        """Notices may have been lost (engine/peers.py): read the versions of every operation
        held here in one query, refresh the actors whose operation moved, and wake every
        waiter on a watch to read again."""
        held = list(self._actors)
        if held:
            stored = await self.context.store.read(
                lambda connection: db.operation_versions(connection, held)
            )
            for operation_id, version in stored.items():
                self.changed_elsewhere(operation_id, version)
        for operation_id in list(self._watches):
            self._watches.pop(operation_id).changed.set()

    async def _refresh(self, actor: OperationActor) -> None:
        stored = await self.context.store.read(
            lambda connection: db.get_operation(connection, actor.operation.id)
        )
        if stored is not None:
            actor.refresh(stored)

    def _spawn(self, operation: Operation, facts: Facts) -> OperationActor:
        if self._nursery is None:
            raise ServiceUnavailable("the engine is not running")
        # The operations of one user and device hold one copy of the same facts.
        key = (operation.user_id, operation.device_id)
        held = self._facts.get(key)
        if held is None or held != facts:
            self._facts[key] = held = facts
        actor = OperationActor(self.context, operation, held, supervisor=self)
        self._actors[operation.id] = actor
        heapq.heappush(self._deadlines, (operation.expires_at, operation.id))
        if self._deadlines[0][1] == operation.id:
            self._earlier_deadline.set()
        watch = self._watches.pop(operation.id, None)
        if watch is not None:
            watch.changed.set()  # its waiters now wait on the actor
        return actor

    def forget(self, actor: OperationActor) -> None:
        """``actor`` ended (its deadline's entry goes when it comes due)."""
        if self._actors.get(actor.operation.id) is actor:
            del self._actors[actor.operation.id]
        if actor.operation.phase.terminal:
            self._ended.put(actor.operation.id, actor.operation)

    async def _live(self, operation_id: UUID, device_id: UUID | None = None) -> OperationActor:
        """The operation's actor here. A pending operation without one (created by another
        process) gets one; an ended operation refuses with its status.

        With ``device_id`` (a phone asks), an operation that is not that device's is refused
        exactly as one that does not exist, whatever its state: a phone learns nothing of
        another user's transactions."""
        actor = self._actors.get(operation_id)
        operation = actor.operation if actor is not None else await self._read(operation_id)
        if device_id is not None and (operation is None or operation.device_id != device_id):
            raise OperationNotFound(NOT_THIS_DEVICES)
        if operation is None:
            raise OperationNotFound("no transaction with that id")
        if actor is not None:
            return actor
        if operation.phase.terminal:
            raise OperationNotPending(f"the transaction is {operation.status}")
        facts = await self.context.store.read(lambda connection: read_facts(connection, operation))
        return self._actors.get(operation_id) or self._spawn(operation, facts)

    async def start(self, request: OperationRequest, *, actor: str) -> StartedOperation:
        """Check, store and start an operation; its actor runs until it ends.

        One thread hop: the writer seals the post-operation context and signs the status
        token in the HSM, then stores the operation, its audit entry and its push callback
        in one transaction."""
        seconds = check_request(request, self.context.settings)
        operation_id = uuid4()
        now = self.context.clock()
        expires_at = now + timedelta(seconds=seconds)
        settings = self.context.settings
        prepared: dict[str, Any] = {}

        def prepare() -> None:
            if request.post_context is not None:
                prepared["sealed"] = self.context.keyring.encrypt(
                    request.post_context.encode(), aad=operation_id.bytes
                )
            claims = token_claims(
                TokenKind.STATUS,
                subject=str(operation_id),
                now=now,
                expires_at=expires_at + STATUS_GRACE,
            )
            prepared["status"] = self.context.tokens.encode(
                claims, token_type=TokenKind.STATUS.media_type
            )

        def create(connection: Connection) -> tuple[Operation, Facts]:
            user = _resolve_user(connection, request, now)
            if user.status in (UserStatus.LOCKED, UserStatus.DEACTIVATED):
                raise UserNotActive(f"the user is {user.status}")
            # Writers take turns (the audit head is locked first), so these counts hold
            # against concurrent starts, in other processes too.
            pending = [op for op in db.pending_for_user(connection, user.id) if op.expires_at > now]
            if len(pending) >= settings.max_pending_per_user:
                raise TooManyPending(
                    f"the user has {len(pending)} pending transactions, the most "
                    "[operations] max_pending_per_user allows: one must end first",
                    retry_after=(min(op.expires_at for op in pending) - now).total_seconds(),
                )
            devices = db.list_devices(connection, user.id)
            if request.kind is OperationKind.REGISTRATION:
                enrolling = sum(op.kind is OperationKind.REGISTRATION for op in pending)
                usable = sum(device.status is not DeviceStatus.DEACTIVATED for device in devices)
                if usable + enrolling >= settings.max_authenticators_per_user:
                    raise TooManyAuthenticators(
                        f"the user has {usable + enrolling} authenticators, enrolled or "
                        "being enrolled, the most [operations] max_authenticators_per_user "
                        "allows: revoke one first"
                    )
                device_id, target = uuid4(), None
            else:
                target = _target_device(devices, request.device_id)
                device_id = target.id
            operation = Operation(
                id=operation_id,
                kind=request.kind,
                user_id=user.id,
                device_id=device_id,
                client_id=request.client_id,
                phase=Phase.CREATED,
                version=1,
                challenge=secrets.token_bytes(32),
                created_at=now,
                updated_at=now,
                expires_at=expires_at,
                message=request.message,
                payment=request.payment,
                text=request.text,
                pre_context=request.pre_context,
                post_context_sealed=prepared.get("sealed"),
                require_user_verification=request.kind is not OperationKind.REGISTRATION
                and request.require_user_verification is not False,
                callback_url=request.callback_url,
            )
            db.insert_operations(connection, [operation])
            db.append_audit(
                connection,
                at=now,
                actor=actor,
                action="operation.created",
                outcome="pending",
                operation_id=operation.id,
                user_id=user.id,
                device_id=device_id,
                reason=operation.kind.value,
            )
            # What the actor holds to judge the answer without reading (Facts).
            return operation, Facts(user=user, device=target)

        pushed: list[OutboxItem] = []

        def create_and_dispatch(connection: Connection) -> tuple[Operation, Facts]:
            operation, facts = create(connection)
            if request.push_notification is not None and operation.callback_url is not None:
                pushed.extend(
                    self.context.dispatcher.dispatch(
                        connection,
                        operation,
                        notification=request.push_notification,
                        now=now,
                        lease=self.context.callbacks.lease(now),
                    )
                )
            return operation, facts

        operation, facts = await self.context.store.write(create_and_dispatch, prepare=prepare)
        if pushed:
            self.context.callbacks.enqueue(pushed)
        self._spawn(operation, facts)
        self._started += 1
        return StartedOperation(operation=operation, status_token=prepared["status"])

    async def get(self, operation_id: UUID) -> Operation:
        """The operation as its actor here knows it, else as stored."""
        actor = self._actors.get(operation_id)
        if actor is not None:
            return actor.operation
        return await self._stored(operation_id)

    async def wait(self, operation_id: UUID, *, version: int) -> Operation:
        """Return as soon as the operation's version passes ``version``.

        Callers bound the wait with a cancel scope (long-poll), then read :meth:`get`. An
        operation owned by an actor of this process wakes its waiters itself; one owned by
        another process is read again when that process announces a change (engine/peers.py).
        """
        while True:
            actor = self._actors.get(operation_id)
            if actor is not None:
                return await actor.wait_for_change(version)
            watch = self._watches.get(operation_id)
            if watch is None:
                watch = self._watches[operation_id] = _Watch()
            watch.waiters += 1
            try:
                # Watching before reading: a change announced meanwhile is not missed. The
                # watch is set by a notice, or when an actor here takes the operation on.
                operation = await self._stored(operation_id)
                if operation.version > version or operation.phase.terminal:
                    return operation
                if operation_id not in self._actors:
                    await watch.changed.wait()
            finally:
                watch.waiters -= 1
                if watch.waiters == 0 and self._watches.get(operation_id) is watch:
                    del self._watches[operation_id]

    async def _stored(self, operation_id: UUID) -> Operation:
        operation = await self._read(operation_id)
        if operation is None:
            raise OperationNotFound("no transaction with that id")
        return operation

    async def _read(self, operation_id: UUID) -> Operation | None:
        ended = self._ended.get(operation_id)
        if ended is not None:
            return ended
        operation = await self.context.store.read(
            lambda connection: db.get_operation(connection, operation_id)
        )
        if operation is not None and operation.phase.terminal:
            self._ended.put(operation_id, operation)
        return operation

    async def dispatch(self, operation_id: UUID, device_id: UUID) -> Operation:
        """The phone fetched the operation (by push, QR code, app link or polling)."""
        actor = await self._live(operation_id, device_id)
        result: Operation = await actor.ask(Dispatch())
        return result

    async def answer(
        self, operation_id: UUID, answer: DeviceAnswer, *, nonce: Nonce | None = None
    ) -> AnswerResult:
        """Judge and store ``answer``; its signed request's ``nonce`` is spent with the
        outcome, or, if the answer is refused before (the transaction ended, or is not
        this device's), then, so that a replay is refused as one."""
        try:
            actor = await self._live(operation_id, answer.device_id)
            result: AnswerResult = await actor.ask(Answer(), answer, nonce)
        except (OperationNotPending, OperationNotFound):
            if nonce is not None:
                spent = nonce
                await self.context.store.write(lambda connection: spend(connection, spent))
            raise
        return result

    async def cancel(self, operation_id: UUID) -> Operation:
        actor = await self._live(operation_id)
        result: Operation = await actor.ask(Cancel())
        return result

    async def pending_for_device(
        self, device_id: UUID, *, after: tuple[datetime, UUID] | None = None, limit: int
    ) -> list[Operation]:
        """A page of the device's pending operations
        (:func:`engine.statements.pending_for_device`)."""
        now = self.context.clock()
        return await self.context.store.read(
            lambda connection: db.pending_for_device(
                connection, device_id, now, after=after, limit=limit
            )
        )

    def facts_changed(self, record: User | Device) -> None:
        """A user's or device's status was changed through this process: the actors holding
        it take the new one, so that a locked device's next answer is not even verified
        (RTS art. 4(3)(b)). (Changes made elsewhere are found when an answer is stored:
        :class:`Facts`.)"""
        for actor in self._actors.values():
            facts = actor.facts
            if isinstance(record, User) and actor.operation.user_id == record.id:
                actor.facts = msgspec.structs.replace(facts, user=record)
            elif isinstance(record, Device) and actor.operation.device_id == record.id:
                actor.facts = msgspec.structs.replace(facts, device=record)

    def changed_here(self, operation: Operation) -> None:
        """This process stored ``operation`` outside its actor (its user was deactivated or
        deleted): the actor here, if any, takes the stored version, waiters wake, and the
        other processes are told."""
        actor = self._actors.get(operation.id)
        if actor is not None:
            actor.refresh(operation)
        watch = self._watches.pop(operation.id, None)
        if watch is not None:
            watch.changed.set()
        _announce(self.context, operation)


def _resolve_user(connection: Connection, request: OperationRequest, now: datetime) -> User:
    if request.user_id is not None:
        user = db.get_user(connection, request.user_id)
        if user is None:
            raise UserNotFound("no user with that id")
        if request.username is not None and request.username != user.username:
            # Neither may silently win: an intent bound to one of them would follow the other.
            raise InvalidInput("userId and username name different users", field="username")
        return user
    username = request.username or ""
    user = db.find_user(connection, username)
    if user is not None:
        return user
    if request.create_user:
        return new_user(connection, username, {}, now)
    raise UserNotFound("no user with that username")


def _target_device(devices: list[Device], device_id: UUID | None) -> Device:
    if device_id is not None:
        device = next((device for device in devices if device.id == device_id), None)
        if device is None:
            raise InvalidInput(
                "the user has no authenticator with that id", field="authenticatorId"
            )
        if device.status is not DeviceStatus.ACTIVE:
            raise DeviceNotActive(f"the authenticator is {device.status}")
        return device
    active = [device for device in devices if device.status is DeviceStatus.ACTIVE]
    if not active:
        raise DeviceNotActive("the user has no active authenticator")
    return max(active, key=lambda device: device.enrolled_at)
