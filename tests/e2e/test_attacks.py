"""Attacks on a real server, each a test. Every refusal is generic to the caller and specific
in the audit trail, which these tests read from the server's own database.

Test names carry the number of the item of the checklist in
``../shared/reference/psd2-and-hsm.md`` they prove (``checklist_N``); docs/discussion/
reliability.md maps every item to its tests. Attacks already proven elsewhere are listed
there too (the sixth attempt after five failures: tests/e2e/test_flows.py; another user's
device, intent tokens, scopes: tests/e2e/test_refusals.py).
"""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsm.ecdsa import P256_ORDER, signature_scalars
from tapsign_sdk.client import Client, Payee
from tapsign_sdk.device import Authenticator, Device, answer_message
from tapsign_sdk.model import DeviceAnswer
from tapsign_sdk.request import sign_headers
from tests.e2e.serving import Server
from tests.e2e.test_flows import enrolled

PROBLEM = "application/problem+json"
SHOP = Payee(name="Shop", account="DE89370400440532013000")


def audit(server: Server, action: str) -> list[tuple[str, str | None, str | None]]:
    """``(actor, operation id, reason)`` of the audit entries of ``action``, oldest first."""
    with sqlite3.connect(server.directory / "var" / "tapsign.db") as database:
        rows = database.execute(
            "SELECT actor, operation_id, reason FROM audit_log WHERE action = ? ORDER BY seq",
            (action,),
        ).fetchall()
    return [(actor, _uuid(operation), reason) for actor, operation, reason in rows]


def _uuid(value: Any) -> str | None:
    """SQLite keeps SQLAlchemy's UUIDs as 32 hex digits."""
    return None if value is None else str(value).replace("-", "")


def answer_body(signed: DeviceAnswer, signature: bytes | None = None) -> bytes:
    """An answer as the SDK sends it, optionally with another ``signature``."""
    message = answer_message(signed)
    if signature is not None:
        message = msgspec.structs.replace(message, signature=signature)
    return msgspec.json.encode(message)


def signed_request(phone: Device, path: str, body: bytes) -> dict[str, str]:
    """Headers of a device request (fresh timestamp and nonce) carrying ``body``."""
    assert phone.authenticator_id is not None
    headers = sign_headers(
        authenticator_id=phone.authenticator_id,
        signer=phone.authenticator,
        method="POST",
        path=path,
        body=body,
    )
    return {**headers, "Content-Type": "application/json"}


def send_answer(server: Server, phone: Device, transaction: UUID, body: bytes) -> httpx.Response:
    path = f"/device/v1/operations/{transaction}/answer"
    return httpx.post(server.url + path, content=body, headers=signed_request(phone, path, body))


def test_checklist_1_2_a_replayed_answer_is_refused_and_changes_nothing(
    server: Server, client: Client, phone: Device
) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username, amount="10.00", currency="EUR", payee=SHOP)
    operation = phone.pending()[0]
    path = f"/device/v1/operations/{operation.id}/answer"
    body = answer_body(phone.authenticator.answer(operation))
    headers = signed_request(phone, path, body)
    assert httpx.post(server.url + path, content=body, headers=headers).json()["status"] == (
        "succeeded"
    )
    # The captured request, byte for byte: its nonce was used.
    replayed = httpx.post(server.url + path, content=body, headers=headers)
    assert (replayed.status_code, replayed.json()["detail"]) == (401, "authentication failed")
    # The captured answer in a fresh request: the challenge was accepted once.
    again = send_answer(server, phone, operation.id, body)
    assert again.status_code == 409
    assert again.json()["type"] == "https://tapsign.dev/problems/transaction-not-pending"
    assert client.status(started.status_token).status == "succeeded"
    assert any(
        reason is not None and "nonce used before" in reason
        for _, _, reason in audit(server, "auth.refused")
    )


def _swapped(signature: bytes) -> bytes:
    scalars = signature_scalars(signature)
    assert scalars is not None
    return encode_dss_signature(scalars[1], scalars[0])


@pytest.mark.parametrize(
    ("attack", "transform"),
    [
        ("truncated", lambda signature: signature[:-8]),
        ("a flipped bit", lambda signature: signature[:-1] + bytes([signature[-1] ^ 1])),
        ("r and s swapped", _swapped),
        ("empty", lambda signature: b""),
        ("forged by another key", lambda signature: Authenticator().sign(b"anything")),
    ],
)
def test_checklist_3_bad_signatures_fail_generically_and_specifically_in_the_audit(
    server: Server,
    client: Client,
    phone: Device,
    attack: str,
    transform: Callable[[bytes], bytes],
) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username, amount="10.00", currency="EUR", payee=SHOP)
    operation = phone.pending()[0]
    signed = phone.authenticator.answer(operation)
    response = send_answer(
        server, phone, operation.id, answer_body(signed, transform(signed.signature))
    )
    assert response.status_code == 200, attack
    # The phone is not told which element failed; the relying party and the audit are.
    assert (response.json()["status"], response.json()["reason"]) == (
        "failed",
        "authentication-failed",
    )
    status = client.status(started.status_token)
    assert (status.status, status.reason) == ("failed", "bad-signature")
    assert any(
        (operation_id, reason) == (started.transaction_id.hex, "bad-signature")
        for _, operation_id, reason in audit(server, "operation.failed")
    )


def test_checklist_3_a_malleated_signature_is_the_same_statement_and_counts_once(
    server: Server, client: Client, phone: Device
) -> None:
    """ECDSA's ``(r, n - s)`` twin verifies too, so tapsign accepts high-S signatures
    (phones' key stores do not normalise S). What must hold is that the twin says nothing
    new: it is accepted only where the original would be, and only once."""
    username = enrolled(client, phone)
    first = client.approve(username=username, amount="10.00", currency="EUR", payee=SHOP)
    second = client.approve(username=username, amount="20.00", currency="EUR", payee=SHOP)
    operations = {operation.id: operation for operation in phone.pending()}
    signed = phone.authenticator.answer(operations[first.transaction_id])
    scalars = signature_scalars(signed.signature)
    assert scalars is not None
    twin = encode_dss_signature(scalars[0], P256_ORDER - scalars[1])
    assert twin != signed.signature
    accepted = send_answer(server, phone, first.transaction_id, answer_body(signed, twin))
    assert accepted.json()["status"] == "succeeded"
    original = send_answer(server, phone, first.transaction_id, answer_body(signed))
    assert original.status_code == 409
    # On another transaction, a signature over the first proves nothing.
    elsewhere = send_answer(server, phone, second.transaction_id, answer_body(signed, twin))
    assert elsewhere.json()["reason"] == "authentication-failed"
    assert client.status(second.status_token).reason == "bad-signature"


@pytest.mark.parametrize("change", ["amount", "payee name", "payee account", "currency"])
def test_checklist_6_7_amount_or_payee_changed_after_signing(
    server: Server, client: Client, phone: Device, change: str
) -> None:
    """The server checks the signature against its own stored amount and payee: a phone
    shown (or an attacker in the middle presenting) anything else signs bytes that do not
    verify."""
    username = enrolled(client, phone)
    started = client.approve(username=username, amount="10.00", currency="EUR", payee=SHOP)
    operation = phone.pending()[0]
    assert operation.payment is not None
    payment, payee = operation.payment, operation.payment.payee
    shown_payment = {
        "amount": msgspec.structs.replace(payment, amount="1000.00"),
        "payee name": msgspec.structs.replace(
            payment, payee=msgspec.structs.replace(payee, name="Mallory")
        ),
        "payee account": msgspec.structs.replace(
            payment, payee=msgspec.structs.replace(payee, account="GB33BUKB20201555555555")
        ),
        "currency": msgspec.structs.replace(payment, currency="USD"),
    }[change]
    shown = msgspec.structs.replace(operation, payment=shown_payment)
    signed = phone.authenticator.answer(shown)
    response = send_answer(server, phone, operation.id, answer_body(signed))
    assert response.json()["reason"] == "authentication-failed"
    assert client.status(started.status_token).reason == "bad-signature"


def _b64(document: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


def test_forged_tokens_are_refused_generically(
    server: Server, client: Client, phone: Device, phones: Callable[[], Device]
) -> None:
    """Tampered, ``alg: none`` and wrong-kind (audience) tokens where an intent token is
    expected; a forged status token reads as unknown; introspection says only inactive."""
    username = enrolled(client, phone)
    intent = client.intent(username=username, operation="approve").token
    header, claims, signature = intent.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=="))
    started = client.approve(username=username)
    other_user = enrolled(client, phones())
    forgeries = {
        "tampered": f"{header}.{_b64({**decoded, 'sub': 'someone-else'})}.{signature}",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{claims}.",
        "alg none with the real kid": _b64(
            {**json.loads(base64.urlsafe_b64decode(header + "==")), "alg": "none"}
        )
        + f".{claims}.",
        "truncated signature": f"{header}.{claims}.{signature[:20]}",
        "a status token": started.status_token,
        "garbage": "not-a-token",
    }
    for name, token in forgeries.items():
        response = httpx.post(
            f"{server.url}/api/v1/approval",
            json={"username": username},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert (response.status_code, response.json()["detail"]) == (
            401,
            "authentication failed",
        ), name
        if name != "a status token":  # valid, only not for this
            assert client.introspect(token).active is False, name
    # Each refusal is in the audit trail with its own reason.
    reasons = [
        reason or ""
        for _, _, reason in audit(server, "auth.refused")
        if (reason or "").startswith("POST /api/v1/approval: intent token refused")
    ]
    assert len(reasons) >= len(forgeries)
    assert len(set(reasons)) >= 4
    # An intent token for one user does not start an operation for another.
    bound = client.intent(username=username, operation="approve").token
    response = httpx.post(
        f"{server.url}/api/v1/approval",
        json={"username": other_user},
        headers={"Authorization": f"Bearer {bound}"},
    )
    assert response.status_code == 403


def test_checklist_20_a_revoked_device_is_refused_at_once(
    server: Server, client: Client, phone: Device
) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username)
    operation = phone.pending()[0]  # the device is now in the server's one-second cache
    body = answer_body(phone.authenticator.answer(operation))  # signed before the revocation
    assert phone.authenticator_id is not None
    client.delete_authenticator(phone.authenticator_id)
    refused = send_answer(server, phone, operation.id, body)
    assert (refused.status_code, refused.json()["detail"]) == (401, "authentication failed")
    fetch = httpx.get(
        f"{server.url}/device/v1/operations",
        headers=signed_request(phone, "/device/v1/operations", b""),
    )
    assert fetch.status_code == 401
    assert client.status(started.status_token).status != "succeeded"
    assert any(
        reason is not None and f"deactivated authenticator {phone.authenticator_id}" in reason
        for _, _, reason in audit(server, "auth.refused")
    )


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"username":' * 20_000 + b'"x"' + b"}" * 20_000,
        b'{"username":"' + b"a" * 60_000 + b'"}',
    ],
    ids=["deep array", "deep object", "long string"],
)
def test_deeply_nested_and_oversized_json_get_a_problem(server: Server, body: bytes) -> None:
    response = httpx.post(
        f"{server.url}/api/v1/approval",
        content=body,
        headers={
            "Authorization": f"Bearer {server.access_key}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code in (400, 413, 422)
    assert response.headers["content-type"] == PROBLEM
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_slow_clients_do_not_hold_up_others(server: Server, client: Client, phone: Device) -> None:
    """Connections that trickle their headers, or send endless ones, hold no one up:
    Hypercorn bounds incomplete requests (16 KiB of headers) and drops silent ones
    (read_timeout_seconds); a transaction runs meanwhile."""
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    assert port is not None
    slow = [socket.create_connection((host, port)) for _ in range(64)]
    try:
        for connection in slow:
            connection.sendall(b"POST /api/v1/approval HTTP/1.1\r\nHost: x\r\n")
        endless = socket.create_connection((host, port), timeout=30)
        endless.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20_000)
        answer = endless.recv(200)
        # Refused (431 or 400) or closed, but not waited for.
        assert answer == b"" or answer.split(b" ")[1] in (b"400", b"431"), answer
        endless.close()
        for connection in slow:
            connection.sendall(b"X-Slow: 1\r\n")
        username = enrolled(client, phone)
        started = client.approve(username=username)
        phone.approve(phone.pending()[0])
        assert client.wait_for_result(started.status_token, timeout=30).status == "succeeded"
    finally:
        for connection in slow:
            connection.close()


def test_checklist_15_every_request_has_an_id_that_ties_a_refusal_to_its_record(
    server: Server,
) -> None:
    first, second = (httpx.get(f"{server.url}/healthz") for _ in range(2))
    assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]
    assert len(first.headers["X-Request-Id"]) == 32
    refused = httpx.post(
        f"{server.url}/api/v1/approval",
        json={"username": "nobody"},
        headers={"Authorization": "Bearer tsk_forged_key", "X-Request-Id": "complaint-4711-a"},
    )
    assert refused.status_code == 401
    assert refused.headers["X-Request-Id"] == "complaint-4711-a"
    junk = httpx.get(f"{server.url}/healthz", headers={"X-Request-Id": "no spaces allowed"})
    assert junk.headers["X-Request-Id"] != "no spaces allowed"
    assert any(
        reason is not None and reason.endswith("[request complaint-4711-a]")
        for _, _, reason in audit(server, "auth.refused")
    )
    log = (server.directory / "server.log").read_text()
    assert "request complaint-4711-a)" in log
