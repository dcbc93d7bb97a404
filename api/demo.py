"""``tapsign demo``: every flow against a running server, with the SDK, step by step.

It enrols a simulated phone through the QR payload, runs an authentication, a payment
approval, a consent signature whose JWT it verifies from the JWKS alone, and a payment
whose amount was changed after the user saw it, which must fail.
"""

from __future__ import annotations

import secrets
import textwrap
from collections.abc import Callable

import jwt
import msgspec

from tapsign_sdk import wire
from tapsign_sdk.client import Client
from tapsign_sdk.device import Device
from tapsign_sdk.wire import Payee


class DemoFailed(Exception):
    pass


def run_demo(base_url: str, access_key: str, *, say: Callable[[str], None] = print) -> None:
    username = f"demo-{secrets.token_hex(4)}"
    with Client(base_url, access_key) as client:
        phone = Device(base_url)
        try:
            _demo(client, phone, username, say)
        finally:
            phone.close()


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


def shows(phone: Device, operation: wire.DeviceOperation) -> str:
    """What the phone shows, line by line, indented under the step."""
    return "   the phone shows:\n" + textwrap.indent(phone.show(operation), "     | ")


def _demo(client: Client, phone: Device, username: str, say: Callable[[str], None]) -> None:
    say(f"1. enrol user {username}: the relying party asks for a registration")
    enrolled = client.enroll(username=username, message="Welcome to the tapsign demo")
    link = enrolled.enrollment.app_link_uri
    say(f"   QR code: {enrolled.enrollment.qr_code.size} px PNG; it holds {link[:60]}...")
    result = phone.enroll(link)
    status = client.wait_for_result(enrolled.enrollment.status_token)
    _expect(status.status == "succeeded", f"enrolment ended {status.status}")
    say(f"   phone enrolled as authenticator {result.authenticator_id}: {status.status}")

    say("2. log in: an authentication, fetched by the phone over signed requests")
    started = client.approve(username=username, message="Log in to Demo Bank")
    (operation,) = phone.pending()
    say(shows(phone, operation))
    phone.approve(operation)
    status = client.wait_for_result(started.status_token)
    _expect(status.status == "succeeded" and status.token is not None, "login did not succeed")
    introspected = client.introspect(status.token or "")
    again = client.introspect(status.token or "")
    _expect(introspected.active and not again.active, "a result token must be usable once")
    say(f"   {status.status}; result token active once, then {again.active}")

    say("3. pay 42.00 EUR to Coffee Shop: dynamic linking (PSD2 RTS art. 5)")
    payee = Payee(name="Coffee Shop", account="DE89 3704 0044 0532 0130 00")
    started = client.approve(
        username=username,
        message="Pay 42.00 EUR to Coffee Shop",
        amount="42.00",
        currency="EUR",
        payee=payee,
        post_operation_context="receipt no. 1042",
    )
    (operation,) = phone.pending()
    say(shows(phone, operation))
    answer = phone.approve(operation)
    status = client.wait_for_result(started.status_token)
    _expect(status.status == "succeeded", f"payment ended {status.status}")
    say(
        f"   {status.status}; the phone received its post-operation context: "
        f"{answer.post_operation_context!r}"
    )

    say("4. sign a consent: the result is a JWT anyone can verify from the JWKS")
    started = client.sign("I agree to the Demo Bank terms, version 7.", username=username)
    (operation,) = phone.pending()
    phone.approve(operation)
    status = client.wait_for_result(started.status_token)
    _expect(status.consent is not None, "no consent JWT")
    consent = status.consent or ""
    key = jwt.PyJWKSet.from_dict(client.jwks())[jwt.get_unverified_header(consent)["kid"]]
    claims = jwt.decode(consent, key=key, algorithms=["ES256"], options={"verify_aud": False})
    say(f"   consent JWT verified with key {key.key_id}: {claims['consent']['text']!r}")

    say("5. a tampered payment: the amount is changed after the user saw it")
    started = client.approve(
        username=username, message="Pay 10.00 EUR", amount="10.00", currency="EUR", payee=payee
    )
    (operation,) = phone.pending()
    if operation.payment is None:
        raise DemoFailed("an authorisation without its payment")
    shown = msgspec.structs.replace(
        operation, payment=msgspec.structs.replace(operation.payment, amount="1000.00")
    )
    phone.approve(operation, shown=shown)
    status = client.wait_for_result(started.status_token)
    _expect(
        status.status == "failed" and status.reason == "bad-signature", "tampering went unnoticed"
    )
    say(f"   {status.status} ({status.reason}): the signature covers the amount the user saw")
    say("demo complete: every step behaved as it must")
