"""The signed payload: canonical, complete, and sensitive to every field the user saw."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model import Operation, Payee, Payment, Phase
from tapsign_sdk.model import Decision, OperationKind, UserVerification
from tapsign_sdk.payload import signed_payload
from tapsign_sdk.problems import InvalidInput

#: Cases per property; ``make fuzz`` raises it.
FUZZ_EXAMPLES = int(os.environ.get("TAPSIGN_FUZZ_EXAMPLES", "100"))
AT = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
PAYMENT = Operation(
    id=UUID("6f9619ff-8b86-d011-b42d-00c04fc964ff"),
    kind=OperationKind.AUTHORISATION,
    user_id=UUID("00000000-0000-4000-8000-000000000001"),
    device_id=UUID("00000000-0000-4000-8000-000000000002"),
    phase=Phase.DISPATCHED,
    version=2,
    challenge=bytes(range(32)),
    created_at=AT,
    updated_at=AT,
    expires_at=AT,
    message="Pay Café Zürich",
    payment=Payment(amount="12.50", currency="EUR", payee=Payee(name="Café", account="CH93 0076")),
    pre_context="card ending 1234",
)
ANSWER: dict[str, Any] = {
    "device_id": PAYMENT.device_id,
    "decision": Decision.APPROVE,
    "user_verification": UserVerification.BIOMETRIC,
    "counter": 7,
}


def test_the_bytes_are_exactly_the_documented_ones() -> None:
    expected = (
        b'{"amount":"12.50","challenge":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",'
        b'"context":"card ending 1234","counter":7,"currency":"EUR",'
        b'"decision":"approve","device":"00000000-0000-4000-8000-000000000002",'
        b'"format":"tapsign-sca/1","kind":"authorisation",'
        b'"message":"Pay Caf\\u00e9 Z\\u00fcrich",'
        b'"operation":"6f9619ff-8b86-d011-b42d-00c04fc964ff",'
        b'"payeeAccount":"CH93 0076","payeeName":"Caf\\u00e9",'
        b'"user":"00000000-0000-4000-8000-000000000001",'
        b'"userVerification":"biometric"}'
    )
    assert signed_payload(PAYMENT, **ANSWER) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"payment": Payment(amount="12.51", currency="EUR", payee=PAYMENT.payment.payee)},  # type: ignore[union-attr]
        {"payment": Payment(amount="12.50", currency="CHF", payee=PAYMENT.payment.payee)},  # type: ignore[union-attr]
        {
            "payment": Payment(
                amount="12.50", currency="EUR", payee=Payee(name="Cafe", account="CH93 0076")
            )
        },
        {
            "payment": Payment(
                amount="12.50", currency="EUR", payee=Payee(name="Café", account="CH93 0077")
            )
        },
        {"message": "Pay Café Zürich!"},
        {"pre_context": "card ending 1235"},
        {"challenge": bytes(32)},
        {"user_id": UUID("00000000-0000-4000-8000-000000000009")},
        {"id": UUID("00000000-0000-4000-8000-00000000000a")},
    ],
)
def test_any_change_to_what_was_shown_changes_the_bytes(change: dict[str, Any]) -> None:
    """PSD2 RTS art. 5: amount and payee (and all else shown) are bound to the signature."""
    changed = msgspec.structs.replace(PAYMENT, **change)
    assert signed_payload(changed, **ANSWER) != signed_payload(PAYMENT, **ANSWER)


@pytest.mark.parametrize(
    "change",
    [
        {"decision": Decision.DECLINE},
        {"user_verification": UserVerification.NONE},
        {"counter": 8},
        {"device_id": UUID("00000000-0000-4000-8000-000000000003")},
    ],
)
def test_the_phone_s_own_statements_are_signed_too(change: dict[str, Any]) -> None:
    assert signed_payload(PAYMENT, **{**ANSWER, **change}) != signed_payload(PAYMENT, **ANSWER)


def test_kind_specific_fields() -> None:
    consent = msgspec.structs.replace(
        PAYMENT, kind=OperationKind.SIGNATURE, payment=None, text="I agree to the terms"
    )
    assert b'"text":"I agree to the terms"' in signed_payload(consent, **ANSWER)
    assert b"amount" not in signed_payload(consent, **ANSWER)
    registration = msgspec.structs.replace(PAYMENT, kind=OperationKind.REGISTRATION, payment=None)
    with pytest.raises(InvalidInput, match=r"^a registration answer carries the new public key$"):
        signed_payload(registration, **ANSWER)
    assert b'"publicKey":"BAEC"' in signed_payload(
        registration, **ANSWER, public_key=b"\x04\x01\x02"
    )


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    message=st.text(max_size=300),
    context=st.text(max_size=300) | st.none(),
    name=st.text(max_size=140),
    account=st.text(max_size=60),
    amount=st.from_regex(r"\A[1-9][0-9]{0,11}(\.[0-9]{1,2})?\Z"),
    counter=st.integers(min_value=0, max_value=2**53),
)
def test_the_payload_reads_back_to_exactly_what_was_shown(
    message: str, context: str | None, name: str, account: str, amount: str, counter: int
) -> None:
    """Whatever the text (quotes, backslashes, separators, control and non-ASCII
    characters), the bytes are ASCII JSON that decodes to exactly the fields shown and
    re-encodes to the same bytes: no two different operations sign the same bytes."""
    operation = msgspec.structs.replace(
        PAYMENT,
        message=message,
        pre_context=context,
        payment=Payment(amount=amount, currency="EUR", payee=Payee(name=name, account=account)),
    )
    data = signed_payload(operation, **{**ANSWER, "counter": counter})
    decoded = json.loads(data.decode("ascii"))
    assert (decoded["message"], decoded["context"], decoded["counter"]) == (
        message,
        context or "",
        counter,
    )
    assert (decoded["amount"], decoded["payeeName"], decoded["payeeAccount"]) == (
        amount,
        name,
        account,
    )
    assert json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode() == data
