"""The core of operations: pure code, no I/O (no trio, database or HSM here; an import
contract in ``make lint`` keeps it so). The state machine, what a request may ask
(:func:`check_request`), how an answer is judged and what it does to its device and user
(the PSD2 rules, :func:`consequences`), and what a stored change leaves behind: its audit
entry, its callback, the result token's and the consent JWT's claims. The actor
(engine/actors.py) performs what these decide.

Theory of operation
-------------------
An operation (registration, authentication, authorisation or signature) is created by the
relying party and lives until it succeeds, fails, is cancelled or expires:

* ``created`` -- stored, waiting for the phone;
* ``dispatched`` -- the phone has fetched it (it may fetch again); kept in the actor's
  memory, not stored;
* ``responded`` -- an answer arrived and is being judged: device and user checked, then
  the signature verified. Exactly one answer gets here: the challenge is accepted once
  (PSD2 RTS art. 4(1)); a second answer, or a replay, is an illegal event;
* ``succeeded`` / ``failed`` / ``cancelled`` / ``expired`` -- terminal, nothing leaves them.

``handle(state, event)`` returns the next state and the effects the actor must perform;
it never performs them. Every legal ``(phase, event)`` pair is a row of ``TRANSITIONS``;
any other pair raises :class:`IllegalTransition` and the caller's state is unchanged
(states are immutable). The state diagram in docs/reference/state-machine.md is generated
from the table (``mermaid()``), and a test keeps the two equal.

The actor performs effects in one fixed order, whatever their order in the tuple:
``VERIFY`` (ask the batched verifier, then feed back a :class:`Verdict`); then ``PERSIST``,
one transaction holding the new phase (compare-and-set on the version), the audit entry
and, when present, ``CALLBACK`` (an outbox row) and ``COUNT_FAILED_ATTEMPT`` or
``RESET_FAILED_ATTEMPTS`` (the device's counter); only after that commit, ``NOTIFY``
(wake status waiters) and ``RELEASE_CONTEXT`` (hand the post-operation context to the
device). So a terminal state is durable before anyone hears of it.

How an answer is judged is pure too: :func:`precheck` (device and user must be active:
a locked device's answer is never verified, RTS art. 4(3)(b)), :func:`judge` (signature,
decision, user verification) and :func:`consequences` (failure count and lock, signature
counter, login marks, and the audit entries they call for).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

from engine.errors import IllegalTransition
from engine.model import (
    Device,
    DeviceStatus,
    FailureReason,
    Operation,
    OperationRequest,
    Phase,
    User,
    UserStatus,
)
from engine.settings import MIN_SECONDS, PSD2_MAX_SECONDS, OperationSettings
from engine.tokens import RESULT_LIFETIME, TokenKind, token_claims
from tapsign_sdk.model import (
    ATTRIBUTE_KEY_PATTERN,
    MAX_ATTRIBUTE_VALUE,
    MAX_ATTRIBUTES,
    MAX_CONSENT_TEXT,
    MAX_CONTEXT,
    MAX_MESSAGE,
    USERNAME_PATTERN,
    Decision,
    DeviceAnswer,
    OperationKind,
    UserVerification,
)
from tapsign_sdk.payload import b64url
from tapsign_sdk.problems import InvalidInput


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to an operation."""


@dataclass(frozen=True, slots=True)
class Dispatch(Event):
    """The phone fetched the operation (by push, QR code, app link or the fetch channel)."""


@dataclass(frozen=True, slots=True)
class Answer(Event):
    """The phone's answer arrived; it has not been judged yet."""


@dataclass(frozen=True, slots=True)
class Verdict(Event):
    """The judgement of the answer: see :func:`precheck` and :func:`judge`."""

    succeeded: bool
    reason: FailureReason | None = None
    #: The signature was checked and failed, or proved possession without the required
    #: user verification: counts towards the device's lock (RTS art. 4(3)(b)).
    failed_attempt: bool = False
    #: The signature was checked and proved possession: resets the device's count.
    verified: bool = False


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    """The relying party withdrew the operation."""


@dataclass(frozen=True, slots=True)
class Expire(Event):
    """The operation's deadline passed."""


class Effect(StrEnum):
    VERIFY = "verify"
    PERSIST = "persist"
    CALLBACK = "callback"
    COUNT_FAILED_ATTEMPT = "count-failed-attempt"
    RESET_FAILED_ATTEMPTS = "reset-failed-attempts"
    NOTIFY = "notify"
    RELEASE_CONTEXT = "release-context"


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase
    reason: FailureReason | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    state: State
    effects: tuple[Effect, ...]


_ENDED = (Effect.PERSIST, Effect.CALLBACK, Effect.NOTIFY)


def _dispatch(state: State, event: Event) -> Transition:
    # Kept by the actor only: the relying party, the audit trail and a restart need nothing
    # from it, and not storing it saves a write per operation.
    return Transition(State(Phase.DISPATCHED), ())


def _redispatch(state: State, event: Event) -> Transition:
    return Transition(state, ())


def _answer(state: State, event: Event) -> Transition:
    return Transition(State(Phase.RESPONDED), (Effect.VERIFY,))


def _verdict(state: State, event: Event) -> Transition:
    if not isinstance(event, Verdict):  # pragma: no cover - the table routes by type
        raise IllegalTransition("a verdict was expected")
    device: tuple[Effect, ...] = ()
    if event.failed_attempt:
        device = (Effect.COUNT_FAILED_ATTEMPT,)
    elif event.verified:
        device = (Effect.RESET_FAILED_ATTEMPTS,)
    if event.succeeded:
        return Transition(State(Phase.SUCCEEDED), (*_ENDED, *device, Effect.RELEASE_CONTEXT))
    return Transition(State(Phase.FAILED, event.reason), (*_ENDED, *device))


def _cancel(state: State, event: Event) -> Transition:
    return Transition(State(Phase.CANCELLED), _ENDED)


def _expire(state: State, event: Event) -> Transition:
    return Transition(State(Phase.EXPIRED), _ENDED)


Handler = Callable[[State, Event], Transition]

TRANSITIONS: dict[tuple[Phase, type[Event]], Handler] = {
    (Phase.CREATED, Dispatch): _dispatch,
    (Phase.CREATED, Answer): _answer,
    (Phase.CREATED, Cancel): _cancel,
    (Phase.CREATED, Expire): _expire,
    (Phase.DISPATCHED, Dispatch): _redispatch,
    (Phase.DISPATCHED, Answer): _answer,
    (Phase.DISPATCHED, Cancel): _cancel,
    (Phase.DISPATCHED, Expire): _expire,
    (Phase.RESPONDED, Verdict): _verdict,
}

EVENT_TYPES: tuple[type[Event], ...] = (Dispatch, Answer, Verdict, Cancel, Expire)


def handle(state: State, event: Event) -> Transition:
    """The next state and the effects to perform; :class:`IllegalTransition` if not allowed."""
    handler = TRANSITIONS.get((state.phase, type(event)))
    if handler is None:
        raise IllegalTransition(
            f"{type(event).__name__.lower()} is not allowed when the operation is {state.phase}"
        )
    return handler(state, event)


def precheck(*, device_status: DeviceStatus, user_status: UserStatus) -> Verdict | None:
    """A failing verdict reached without verifying anything, or None to go on and verify.

    A locked device's answers are not verified at all (RTS art. 4(3)(b): the sixth attempt
    never gets verified), and neither are a deactivated device's (RTS art. 27).
    """
    if device_status is DeviceStatus.LOCKED:
        return Verdict(succeeded=False, reason=FailureReason.DEVICE_LOCKED)
    if device_status is DeviceStatus.DEACTIVATED:
        return Verdict(succeeded=False, reason=FailureReason.DEVICE_DEACTIVATED)
    if user_status not in (UserStatus.ACTIVE, UserStatus.NEW):
        return Verdict(succeeded=False, reason=FailureReason.USER_INACTIVE)
    return None


def judge(
    *,
    signature_valid: bool,
    decision: Decision,
    user_verification: UserVerification,
    require_user_verification: bool,
) -> Verdict:
    """The verdict on a verified answer.

    The decision and the way the user was verified are inside the signed payload, so a
    decline cannot be forged (and does not count against the device), and "none" cannot
    be turned into "biometric" on the way.
    """
    if not signature_valid:
        return Verdict(succeeded=False, reason=FailureReason.BAD_SIGNATURE, failed_attempt=True)
    if decision is Decision.DECLINE:
        return Verdict(succeeded=False, reason=FailureReason.DECLINED, verified=True)
    if require_user_verification and user_verification is UserVerification.NONE:
        # Possession alone where possession plus inherence or knowledge was required
        # (RTS arts. 6-9): a failed authentication attempt.
        return Verdict(
            succeeded=False,
            reason=FailureReason.USER_VERIFICATION_MISSING,
            failed_attempt=True,
        )
    return Verdict(succeeded=True, verified=True)


@dataclass(frozen=True, slots=True)
class Note:
    """An audit entry a decision asks for, written in the transaction that stores it."""

    action: str
    outcome: str
    reason: str | None
    actor: str = "system"


@dataclass(frozen=True, slots=True)
class Consequences:
    """What a judged answer does to its device and user, as data for the runtime to store:
    the records as they must be stored (None: unchanged), the audit entries, and whether
    this answer locked the device (the ``authenticator.locked`` callback)."""

    device: Device | None
    user: User | None
    notes: tuple[Note, ...] = ()
    locked: bool = False


def consequences(
    verdict: Verdict,
    *,
    device: Device | None,
    user: User | None,
    counter: int,
    now: datetime,
    max_failed_attempts: int,
) -> Consequences:
    """The PSD2 rules on the device and the user once an answer is judged.

    A failed attempt counts against the device, and the count reaching
    ``max_failed_attempts`` locks it (RTS art. 4(3)(b): at most five consecutive failures);
    a verified signature resets the count and advances the device's signature counter,
    where a counter that does not increase is recorded as a risk signal (a cloned key,
    WebAuthn §6.1.1), not a failure. A success marks the user's login and activates a new
    user. A verdict reached without verifying anything (a locked device, an inactive user)
    changes neither. ``device`` is None for a registration (its device is new).
    """
    if not (verdict.failed_attempt or verdict.verified):
        return Consequences(device=None, user=None)
    notes: list[Note] = []
    locked = False
    changed_device = None
    if device is not None:
        if verdict.failed_attempt:
            failed = device.failed_attempts + 1
            locked = failed >= max_failed_attempts and device.status is DeviceStatus.ACTIVE
            if locked:
                notes.append(
                    Note("device.locked", "ok", f"{failed} consecutive failed verifications")
                )
            changed_device = msgspec.structs.replace(
                device,
                failed_attempts=failed,
                status=DeviceStatus.LOCKED if locked else device.status,
                updated_at=now,
            )
        else:
            if (device.counter or counter) and counter <= device.counter:
                notes.append(
                    Note(
                        "device.counter-not-increasing",
                        "risk",
                        f"counter {counter} after {device.counter}",
                    )
                )
            changed_device = msgspec.structs.replace(
                device,
                failed_attempts=0,
                counter=max(device.counter, counter),
                last_used_at=now,
                updated_at=now,
            )
    changed_user = None
    if user is not None:
        if verdict.succeeded:
            changed_user = msgspec.structs.replace(
                user,
                last_login_at=now,
                status=UserStatus.ACTIVE if user.status is UserStatus.NEW else user.status,
                updated_at=now,
            )
        elif verdict.failed_attempt:
            changed_user = msgspec.structs.replace(user, last_failed_login_at=now, updated_at=now)
        else:
            changed_user = msgspec.structs.replace(user, updated_at=now)
    return Consequences(device=changed_device, user=changed_user, notes=tuple(notes), locked=locked)


# -- what a request may ask -------------------------------------------------------------

#: Kinds that always need the user verified on the phone (PSD2 RTS art. 4).
NEEDS_USER_VERIFICATION = frozenset({OperationKind.AUTHORISATION, OperationKind.SIGNATURE})
_USERNAME = re.compile(USERNAME_PATTERN)
_ATTRIBUTE_KEY = re.compile(ATTRIBUTE_KEY_PATTERN)


def check_username(username: str) -> str:
    if not _USERNAME.match(username):
        raise InvalidInput(
            "username must be 1 to 300 characters of A-Z, a-z, 0-9 and _ . @ -", field="username"
        )
    return username


def check_attributes(attributes: Mapping[str, object]) -> dict[str, str]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidInput(f"at most {MAX_ATTRIBUTES} attributes", field="attributes")
    checked: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not _ATTRIBUTE_KEY.match(key):
            raise InvalidInput(
                "attribute names are 1 to 64 characters of A-Z, a-z, 0-9 and _ . -",
                field="attributes",
            )
        if not isinstance(value, str) or len(value) > MAX_ATTRIBUTE_VALUE:
            raise InvalidInput(
                f"attribute {key}: values are strings of at most {MAX_ATTRIBUTE_VALUE} characters",
                field=f"attributes.{key}",
            )
        checked[key] = value
    return checked


def check_request(request: OperationRequest, settings: OperationSettings) -> int:
    """Check a request against the rules of its kind; the lifetime in seconds if it passes."""
    kind = request.kind
    if request.user_id is None and request.username is None:
        raise InvalidInput("give the user by userId or by username", field="userId")
    if request.username is not None:
        check_username(request.username)
    if request.create_user and kind is not OperationKind.REGISTRATION:
        raise InvalidInput("only a registration creates users", field="createUser")
    if kind is OperationKind.REGISTRATION and request.device_id is not None:
        raise InvalidInput("a registration enrols a new authenticator", field="authenticatorId")
    if (request.payment is None) != (kind is not OperationKind.AUTHORISATION):
        raise InvalidInput("amount, currency and payee belong to authorisations", field="payment")
    if (request.text is None) != (kind is not OperationKind.SIGNATURE):
        raise InvalidInput("a signature, and only a signature, has a consent text", field="text")
    if request.text is not None and not 0 < len(request.text) <= MAX_CONSENT_TEXT:
        raise InvalidInput(f"the consent text has 1 to {MAX_CONSENT_TEXT} characters", field="text")
    if len(request.message) > MAX_MESSAGE:
        raise InvalidInput(f"the message has at most {MAX_MESSAGE} characters", field="message")
    for name, context in (
        ("preContext", request.pre_context),
        ("postContext", request.post_context),
    ):
        if context is not None and len(context) > MAX_CONTEXT:
            raise InvalidInput(f"a context has at most {MAX_CONTEXT} characters", field=name)
    if request.callback_url is not None and (
        not request.callback_url.startswith(("https://", "http://"))
        or len(request.callback_url) > 2000
    ):
        raise InvalidInput("the callback URL is an http(s) URL", field="callbackUrl")
    if request.require_user_verification is False and kind is not OperationKind.REGISTRATION:
        if kind in NEEDS_USER_VERIFICATION:
            # Strong customer authentication is possession plus a second factor, for every
            # payment and every signed consent (PSD2 RTS art. 4).
            raise InvalidInput(
                "an authorisation or a signature always needs the user verified on the phone",
                field="requireUserVerification",
            )
        if not request.allow_possession_only:
            raise InvalidInput(
                "this access key may not start authentications without user verification",
                field="requireUserVerification",
            )
    limit = PSD2_MAX_SECONDS if kind in NEEDS_USER_VERIFICATION else settings.max_seconds
    seconds = request.expires_in or min(settings.default_seconds, limit)
    if not MIN_SECONDS <= seconds <= limit:
        raise InvalidInput(
            f"this operation lives {MIN_SECONDS} to {limit} seconds", field="expiresIn"
        )
    return seconds


# -- what a stored change leaves: audit entry, callback, token claims --------------------


def transition_note(operation: Operation, *, actor: str) -> Note:
    """The audit entry of ``operation``'s new state, changed by ``actor``."""
    reason = None if operation.failure_reason is None else operation.failure_reason.value
    return Note(f"operation.{operation.phase.value}", operation.status, reason, actor)


# -- the decisions that end an operation, as data -------------------------------------


@dataclass(frozen=True, slots=True)
class Decided:
    """Everything an ended operation writes, decided: the runtime stores it in one unit of
    work (one thread hop, one commit) and performs the transition's effects, nothing more.

    ``operation`` is the new version, stored by compare-and-set on the version it was
    decided on; ``notes`` are its audit entries in order; ``device`` and ``user`` the
    records as they must be stored (None: unchanged), stored only if they are still as
    they were judged; ``new_device`` a registration's; ``callbacks`` events besides the
    operation's own (whose body the runtime completes, engine/actors.py); the claims are
    what the HSM signs in the unit's hop (the result token, a signature's consent JWT).
    """

    operation: Operation
    transition: Transition
    notes: tuple[Note, ...]
    device: Device | None = None
    user: User | None = None
    new_device: Device | None = None
    callbacks: tuple[tuple[str, dict[str, Any]], ...] = ()
    result_claims: dict[str, Any] | None = None
    consent_claims: dict[str, Any] | None = None


def advanced(
    before: Operation, transition: Transition, now: datetime, changes: Mapping[str, Any]
) -> Operation:
    """``before`` moved to the state of ``transition``, with ``changes``."""
    phase = transition.state.phase
    return msgspec.structs.replace(
        before,
        phase=phase,
        failure_reason=transition.state.reason,
        version=before.version + 1,
        updated_at=now,
        completed_at=now if phase.terminal else None,
        # Sealed data goes as soon as it is no longer needed.
        post_context_sealed=None if phase.terminal else before.post_context_sealed,
        **changes,
    )


def decide_end(
    operation: Operation, event: Cancel | Expire, *, actor: str, now: datetime
) -> Decided:
    """A cancellation or an expiry; :class:`IllegalTransition` if the operation has ended."""
    transition = handle(State(operation.phase, operation.failure_reason), event)
    after = advanced(operation, transition, now, {})
    return Decided(after, transition, (transition_note(after, actor=actor),))


def decide_answer(
    responded: Transition,
    operation: Operation,
    answer: DeviceAnswer,
    verdict: Verdict,
    *,
    device: Device | None,
    user: User | None,
    point: bytes,
    payload: bytes,
    attestation: str | None,
    refusal: str | None,
    now: datetime,
    max_failed_attempts: int,
) -> Decided:
    """A judged answer: the operation's end, what it does to the device and user (or the
    new device of a registration), the audit entries, the callbacks and what is signed.

    ``responded`` is the answer's transition; ``verdict`` the judgement (:func:`precheck`,
    :func:`judge`, or an attestation refused: ``refusal``); ``point`` the key the payload
    was verified with, ``payload`` the signed bytes (empty when nothing was verified).
    """
    transition = handle(responded.state, verdict)
    registering = operation.kind is OperationKind.REGISTRATION
    changes: dict[str, Any] = {}
    if verdict.verified or verdict.failed_attempt:
        changes = {
            "decision": answer.decision,
            "user_verification": answer.user_verification,
            "counter": answer.counter,
            "device_signature": answer.signature,
        }
    if registering:
        changes.update(
            public_key=point, device_name=answer.device_name, device_platform=answer.platform
        )
    after = advanced(operation, transition, now, changes)
    by_device = f"device:{answer.device_id}"
    notes = [transition_note(after, actor=by_device)]
    if refusal is not None:
        notes.append(Note("device.attestation-refused", "refused", refusal[:300], by_device))
    new_device = None
    if registering and after.phase is Phase.SUCCEEDED:
        # A new device: nothing to count against yet.
        new_device = Device(
            id=operation.device_id,
            user_id=operation.user_id,
            name=answer.device_name or "authenticator",
            platform=answer.platform or "unknown",
            public_key=point,
            status=DeviceStatus.ACTIVE,
            enrolled_at=now,
            updated_at=now,
            last_used_at=now,
            counter=answer.counter,
            attestation=attestation,
        )
        notes.append(
            Note("device.enrolled", "ok", f"attestation {attestation or 'none'}", by_device)
        )
    decided = consequences(
        verdict,
        device=None if registering else device,
        user=user,
        counter=answer.counter,
        now=now,
        max_failed_attempts=max_failed_attempts,
    )
    notes.extend(decided.notes)
    callbacks: list[tuple[str, dict[str, Any]]] = []
    if decided.locked and decided.device is not None and operation.callback_url:
        body = {
            "authenticatorId": str(decided.device.id),
            "userId": str(decided.device.user_id),
            "failedAttempts": decided.device.failed_attempts,
        }
        callbacks.append(("authenticator.locked", body))
    signs = Effect.RELEASE_CONTEXT in transition.effects
    return Decided(
        after,
        transition,
        tuple(notes),
        device=decided.device,
        user=decided.user,
        new_device=new_device,
        callbacks=tuple(callbacks),
        result_claims=result_claims(after, now=now) if signs else None,
        consent_claims=consent_claims(after, answer, payload=payload, point=point, now=now)
        if signs and operation.kind is OperationKind.SIGNATURE
        else None,
    )


def callback(operation: Operation, *, authenticators: int | None) -> tuple[str, dict[str, Any]]:
    """The event and body of the callback of ``operation``'s new state; ``authenticators``:
    how many the user has now, said after a registration succeeded (else None)."""
    body: dict[str, Any] = {
        "status": operation.status,
        "reason": None if operation.failure_reason is None else operation.failure_reason.value,
        "kind": operation.kind.value,
        "userId": str(operation.user_id),
        "authenticatorId": str(operation.device_id),
    }
    if authenticators is not None:
        body["authenticatorCount"] = authenticators
    return f"transaction.{operation.phase.value}", body


def counts_authenticators(operation: Operation) -> bool:
    """Whether ``operation``'s callback and status say how many authenticators the user
    has: after a registration succeeded (the user may now have several phones)."""
    return operation.kind is OperationKind.REGISTRATION and operation.phase is Phase.SUCCEEDED


def result_claims(operation: Operation, *, now: datetime) -> dict[str, Any]:
    """The result token's claims: one per transaction, every status answer carries it."""
    return token_claims(
        TokenKind.RESULT,
        subject=str(operation.user_id),
        now=now,
        expires_at=now + RESULT_LIFETIME,
        claims={"txn": str(operation.id), "kind": operation.kind.value},
    )


def consent_claims(
    operation: Operation, answer: DeviceAnswer, *, payload: bytes, point: bytes, now: datetime
) -> dict[str, Any]:
    """A signature's consent JWT claims: evidence anyone can check offline (the JWKS for
    tapsign's signature, the embedded key for the device's)."""
    text = operation.text or ""
    return {
        "jti": str(operation.id),
        "sub": str(operation.user_id),
        "iat": int(now.timestamp()),
        "txn": str(operation.id),
        "authenticator": str(answer.device_id),
        "consent": {
            "text": text,
            "sha256": b64url(hashlib.sha256(text.encode()).digest()),
            "context": operation.pre_context or "",
        },
        "userVerification": answer.user_verification.value,
        "signedPayload": b64url(payload),
        "deviceSignature": b64url(answer.signature),
        "devicePublicKey": b64url(point),
    }


def mermaid() -> str:
    """The state diagram of ``TRANSITIONS`` in Mermaid syntax, for docs/."""
    lines = ["stateDiagram-v2", "    [*] --> created"]
    for (phase, event_type), handler in TRANSITIONS.items():
        if event_type is Verdict:
            targets = [Phase.SUCCEEDED, Phase.FAILED]
        else:
            targets = [handler(State(phase), event_type()).state.phase]
        for target in targets:
            lines.append(f"    {phase} --> {target}: {event_type.__name__.lower()}")
    lines.extend(f"    {phase} --> [*]" for phase in Phase if phase.terminal)
    return "\n".join(lines) + "\n"
