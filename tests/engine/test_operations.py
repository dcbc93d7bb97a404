"""The pure state machine: every legal transition, every illegal pair, the judging rules."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from engine.errors import IllegalTransition
from engine.model import DeviceStatus, FailureReason, Phase, UserStatus
from engine.operations import (
    EVENT_TYPES,
    TRANSITIONS,
    Answer,
    Cancel,
    Dispatch,
    Effect,
    Event,
    Expire,
    State,
    Transition,
    Verdict,
    handle,
    judge,
    mermaid,
    precheck,
)
from tapsign_sdk.model import Decision, UserVerification

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reference" / "state-machine.md"


def example(event_type: type[Event]) -> Event:
    if event_type is Verdict:
        return Verdict(succeeded=True, verified=True)
    return event_type()


ILLEGAL = [
    (phase, event_type)
    for phase, event_type in itertools.product(Phase, EVENT_TYPES)
    if (phase, event_type) not in TRANSITIONS
]


@pytest.mark.parametrize(("phase", "event_type"), ILLEGAL)
def test_every_illegal_pair_raises_and_changes_nothing(
    phase: Phase, event_type: type[Event]
) -> None:
    state = State(phase, FailureReason.DECLINED if phase is Phase.FAILED else None)
    before = State(state.phase, state.reason)
    with pytest.raises(
        IllegalTransition,
        match=rf"^{event_type.__name__.lower()} is not allowed when the operation is {phase}$",
    ):
        handle(state, example(event_type))
    assert state == before


def test_terminal_phases_accept_nothing() -> None:
    terminal = {phase for phase in Phase if phase.terminal}
    assert terminal == {Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED, Phase.EXPIRED}
    assert not [key for key in TRANSITIONS if key[0] in terminal]


@pytest.mark.parametrize(
    ("phase", "event", "expected"),
    [
        (Phase.CREATED, Dispatch(), Transition(State(Phase.DISPATCHED), ())),
        (Phase.DISPATCHED, Dispatch(), Transition(State(Phase.DISPATCHED), ())),
        (Phase.CREATED, Answer(), Transition(State(Phase.RESPONDED), (Effect.VERIFY,))),
        (Phase.DISPATCHED, Answer(), Transition(State(Phase.RESPONDED), (Effect.VERIFY,))),
        (
            Phase.CREATED,
            Cancel(),
            Transition(State(Phase.CANCELLED), (Effect.PERSIST, Effect.CALLBACK, Effect.NOTIFY)),
        ),
        (
            Phase.DISPATCHED,
            Expire(),
            Transition(State(Phase.EXPIRED), (Effect.PERSIST, Effect.CALLBACK, Effect.NOTIFY)),
        ),
        (
            Phase.RESPONDED,
            Verdict(succeeded=True, verified=True),
            Transition(
                State(Phase.SUCCEEDED),
                (
                    Effect.PERSIST,
                    Effect.CALLBACK,
                    Effect.NOTIFY,
                    Effect.RESET_FAILED_ATTEMPTS,
                    Effect.RELEASE_CONTEXT,
                ),
            ),
        ),
        (
            Phase.RESPONDED,
            Verdict(succeeded=False, reason=FailureReason.BAD_SIGNATURE, failed_attempt=True),
            Transition(
                State(Phase.FAILED, FailureReason.BAD_SIGNATURE),
                (Effect.PERSIST, Effect.CALLBACK, Effect.NOTIFY, Effect.COUNT_FAILED_ATTEMPT),
            ),
        ),
        (
            Phase.RESPONDED,
            Verdict(succeeded=False, reason=FailureReason.DEVICE_LOCKED),
            Transition(
                State(Phase.FAILED, FailureReason.DEVICE_LOCKED),
                (Effect.PERSIST, Effect.CALLBACK, Effect.NOTIFY),
            ),
        ),
    ],
)
def test_legal_transitions(phase: Phase, event: Event, expected: Transition) -> None:
    assert handle(State(phase), event) == expected


class PhoneAndRelyingParty:
    """Plays both sides against the machine, asserting the whole state after each step."""

    def __init__(self) -> None:
        self.state = State(Phase.CREATED)

    def send(self, event: Event, expected: State) -> tuple[Effect, ...]:
        transition = handle(self.state, event)
        self.state = transition.state
        assert self.state == expected
        return transition.effects


def test_a_payment_approved_after_two_fetches() -> None:
    pair = PhoneAndRelyingParty()
    assert pair.send(Dispatch(), State(Phase.DISPATCHED)) == ()
    assert pair.send(Dispatch(), State(Phase.DISPATCHED)) == ()
    assert pair.send(Answer(), State(Phase.RESPONDED)) == (Effect.VERIFY,)
    effects = pair.send(Verdict(succeeded=True, verified=True), State(Phase.SUCCEEDED))
    assert Effect.RELEASE_CONTEXT in effects
    # The challenge was accepted once: a replayed answer is refused, the outcome stays.
    with pytest.raises(IllegalTransition):
        pair.send(Answer(), State(Phase.SUCCEEDED))
    assert pair.state == State(Phase.SUCCEEDED)


def test_a_second_answer_while_the_first_is_judged_is_refused() -> None:
    pair = PhoneAndRelyingParty()
    pair.send(Answer(), State(Phase.RESPONDED))
    for event in (Answer(), Cancel(), Expire(), Dispatch()):
        with pytest.raises(IllegalTransition):
            handle(pair.state, event)
    assert pair.state == State(Phase.RESPONDED)


@pytest.mark.parametrize(
    ("device", "user", "expected"),
    [
        (DeviceStatus.ACTIVE, UserStatus.ACTIVE, None),
        (DeviceStatus.ACTIVE, UserStatus.NEW, None),
        (
            DeviceStatus.LOCKED,
            UserStatus.ACTIVE,
            Verdict(succeeded=False, reason=FailureReason.DEVICE_LOCKED),
        ),
        (
            DeviceStatus.DEACTIVATED,
            UserStatus.ACTIVE,
            Verdict(succeeded=False, reason=FailureReason.DEVICE_DEACTIVATED),
        ),
        (
            DeviceStatus.ACTIVE,
            UserStatus.LOCKED,
            Verdict(succeeded=False, reason=FailureReason.USER_INACTIVE),
        ),
        (
            DeviceStatus.ACTIVE,
            UserStatus.DEACTIVATED,
            Verdict(succeeded=False, reason=FailureReason.USER_INACTIVE),
        ),
    ],
)
def test_precheck(device: DeviceStatus, user: UserStatus, expected: Verdict | None) -> None:
    assert precheck(device_status=device, user_status=user) == expected


@pytest.mark.parametrize(
    ("valid", "decision", "verification", "required", "expected"),
    [
        (True, Decision.APPROVE, UserVerification.BIOMETRIC, True, Verdict(True, verified=True)),
        (True, Decision.APPROVE, UserVerification.NONE, False, Verdict(True, verified=True)),
        (
            True,
            Decision.APPROVE,
            UserVerification.NONE,
            True,
            Verdict(False, FailureReason.USER_VERIFICATION_MISSING, failed_attempt=True),
        ),
        (
            True,
            Decision.DECLINE,
            UserVerification.PIN,
            True,
            Verdict(False, FailureReason.DECLINED, verified=True),
        ),
        (
            False,
            Decision.APPROVE,
            UserVerification.BIOMETRIC,
            True,
            Verdict(False, FailureReason.BAD_SIGNATURE, failed_attempt=True),
        ),
        (
            False,
            Decision.DECLINE,
            UserVerification.PIN,
            False,
            Verdict(False, FailureReason.BAD_SIGNATURE, failed_attempt=True),
        ),
    ],
)
def test_judge(
    valid: bool,
    decision: Decision,
    verification: UserVerification,
    required: bool,
    expected: Verdict,
) -> None:
    assert (
        judge(
            signature_valid=valid,
            decision=decision,
            user_verification=verification,
            require_user_verification=required,
        )
        == expected
    )


def test_the_documented_diagram_is_generated_from_the_table() -> None:
    document = DOCS.read_text(encoding="utf-8")
    found = re.search(r"```mermaid\n(.*?)```", document, re.DOTALL)
    assert found is not None, "docs/reference/state-machine.md has no mermaid block"
    assert found.group(1) == mermaid()
