"""Every flow and every outcome, end to end: a real server, the SDK's client and phone."""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import closing
from uuid import UUID

import httpx
import jwt
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.exposition import PUBLISH_SECONDS
from tapsign_sdk.client import ApiError, Client
from tapsign_sdk.device import Device
from tapsign_sdk.wire import Introspection, Payee
from tests.e2e.serving import Server

SHOP = Payee(name="Shop", account="DE89 3704 0044 0532 0130 00")


def new_username() -> str:
    return f"user-{secrets.token_hex(5)}"


def enrolled(client: Client, phone: Device) -> str:
    username = new_username()
    started = client.enroll(username=username)
    assert phone.enroll(started.enrollment.app_link_uri).status == "succeeded"
    return username


def only_pending(phone: Device) -> object:
    (operation,) = phone.pending()
    return operation


def test_enrolment_through_the_qr_payload(client: Client, phone: Device) -> None:
    username = new_username()
    started = client.enroll(username=username, message="Welcome")
    assert started.status == "new"
    assert started.authenticators == []
    qr = started.enrollment.qr_code
    assert qr.type == "image/png"
    assert qr.data_uri.startswith("data:image/png;base64,iVBORw0KGgo")  # a real PNG
    pending = client.status(started.enrollment.status_token)
    assert pending.status == "pending"
    phone.enroll(started.enrollment.app_link_uri)
    status = client.wait_for_result(started.enrollment.status_token)
    assert (status.status, status.username, status.user_id) == (
        "succeeded",
        username,
        started.user_id,
    )
    user = client.find_user(username)
    assert user.status == "active"
    assert [a.authenticator_id for a in user.authenticators] == [phone.authenticator_id]


def test_authentication_with_a_consumable_result_token(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username, message="Log in")
    operation = phone.pending()[0]
    assert phone.show(operation) == "authentication: Log in"
    assert phone.approve(operation).status == "succeeded"
    status = client.wait_for_result(started.status_token)
    assert status.status == "succeeded"
    assert status.token is not None
    first = client.introspect(status.token)
    assert (first.active, first.token_type, first.transaction_id) == (
        True,
        "result",
        str(started.transaction_id),
    )
    # Consumed: inactive, and nothing more is said (RFC 7662 §2.2).
    assert client.introspect(status.token) == Introspection(active=False)
    assert msgspec.json.encode(Introspection(active=False)) == b'{"active":false}'


def test_payment_approval_with_post_operation_context(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    started = client.approve(
        username=username,
        message="Pay",
        amount="12.50",
        currency="EUR",
        payee=SHOP,
        post_operation_context="card PIN 4711",
    )
    operation = phone.pending()[0]
    assert operation.payment is not None
    assert (operation.payment.amount, operation.payment.currency) == ("12.50", "EUR")
    answer = phone.approve(operation)
    assert (answer.status, answer.post_operation_context) == ("succeeded", "card PIN 4711")
    assert client.wait_for_result(started.status_token).status == "succeeded"


def test_consent_signature_verifies_from_the_jwks(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    started = client.sign("I consent to the transfer of my data.", username=username)
    phone.approve(phone.pending()[0])
    status = client.wait_for_result(started.status_token)
    assert status.consent is not None
    key = jwt.PyJWKSet.from_dict(client.jwks())[jwt.get_unverified_header(status.consent)["kid"]]
    claims = jwt.decode(
        status.consent, key=key, algorithms=["ES256"], options={"verify_aud": False}
    )
    assert claims["consent"]["text"] == "I consent to the transfer of my data."
    assert claims["jti"] == str(started.transaction_id)


@pytest.mark.parametrize("outcome", ["declined", "bad-signature", "cancelled", "expired"])
def test_failures_report_their_reason(client: Client, phone: Device, outcome: str) -> None:
    username = enrolled(client, phone)
    started = client.approve(
        username=username,
        amount="99.00",
        currency="EUR",
        payee=SHOP,
        expires_in=5 if outcome == "expired" else None,
    )
    operation = phone.pending()[0]
    if outcome == "declined":
        assert phone.decline(operation).reason == "declined"
    elif outcome == "bad-signature":
        assert operation.payment is not None
        shown = msgspec.structs.replace(
            operation, payment=msgspec.structs.replace(operation.payment, amount="9.90")
        )
        assert phone.approve(operation, shown=shown).reason == "authentication-failed"
    elif outcome == "cancelled":
        assert client.cancel(started.transaction_id).reason == "cancelled"
        with pytest.raises(ApiError) as raised:
            phone.approve(operation)
        assert (raised.value.status, raised.value.problem_type) == (
            409,
            "https://tapsign.dev/problems/transaction-not-pending",
        )
    status = client.wait_for_result(started.status_token, timeout=20)
    assert (status.status, status.reason) == ("failed", outcome)
    assert status.token is None


def test_a_replayed_answer_is_refused_and_changes_nothing(
    client: Client, phone: Device, server: Server
) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username)
    operation = phone.pending()[0]
    answer = phone.authenticator.answer(operation)
    body = msgspec.json.encode(
        {
            "decision": "approve",
            "userVerification": "biometric",
            "counter": answer.counter,
            "signature": answer.signature,
        }
    )
    path = f"/device/v1/operations/{operation.id}/answer"
    headers = {"Content-Type": "application/json", **phone._signed("POST", path, body)}
    first = httpx.post(server.url + path, content=body, headers=headers)
    assert first.status_code == 200
    # The very same request again: its nonce was used.
    replay = httpx.post(server.url + path, content=body, headers=headers)
    assert (replay.status_code, replay.json()["type"]) == (
        401,
        "https://tapsign.dev/problems/unauthorized",
    )
    # The same answer in a fresh request: the challenge was used.
    fresh = {"Content-Type": "application/json", **phone._signed("POST", path, body)}
    again = httpx.post(server.url + path, content=body, headers=fresh)
    assert (again.status_code, again.json()["type"]) == (
        409,
        "https://tapsign.dev/problems/transaction-not-pending",
    )
    assert client.wait_for_result(started.status_token).status == "succeeded"


def test_five_failures_lock_the_device_until_unlocked(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    for _ in range(5):
        client.approve(username=username)
        operation = phone.pending()[0]
        shown = msgspec.structs.replace(operation, message="not what was shown")
        assert phone.approve(operation, shown=shown).reason == "authentication-failed"
    authenticator = client.get_authenticator(phone.authenticator_id)  # type: ignore[arg-type]
    assert (authenticator.state, authenticator.failed_attempts) == ("locked", 5)
    with pytest.raises(ApiError) as raised:
        client.approve(username=username)
    assert raised.value.status == 409
    unlocked = client.unlock_authenticator(phone.authenticator_id)  # type: ignore[arg-type]
    assert (unlocked.state, unlocked.failed_attempts) == ("active", 0)
    started = client.approve(username=username)
    phone.approve(phone.pending()[0])
    assert client.wait_for_result(started.status_token).status == "succeeded"


def test_a_deactivated_user_can_do_nothing_more(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    pending = client.approve(username=username)
    user = client.find_user(username)
    deactivated = client.deactivate_user(user.user_id)
    assert deactivated.status == "deactivated"
    assert {a.state for a in deactivated.authenticators} == {"deactivated"}
    assert client.status(pending.status_token).reason == "cancelled"
    with pytest.raises(ApiError) as raised:
        client.approve(username=username)
    assert (raised.value.status, raised.value.problem_type) == (
        409,
        "https://tapsign.dev/problems/user-not-active",
    )
    with pytest.raises(ApiError) as raised:
        phone.pending()
    assert raised.value.status == 401  # a revoked device cannot even fetch


def test_long_poll_returns_when_the_status_changes(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username)
    operation = phone.pending()[0]
    approver = threading.Timer(0.5, phone.approve, args=(operation,))
    approver.start()
    began = time.monotonic()
    status = client.status(started.status_token, wait=30)
    approver.join()
    assert status.status == "succeeded"
    assert time.monotonic() - began < 29  # woken by the change, not by the 30 s limit


def test_long_polls_end_at_once_whichever_worker_process_holds_them(two_workers: Server) -> None:
    # Fresh connections each round, so that the long-poll and the answer land on either
    # process; one that missed the other's notice would answer "pending" after 30 s.
    for _ in range(6):
        with Client(two_workers.url, two_workers.access_key) as client:
            phone = Device(two_workers.url)
            try:
                username = enrolled(client, phone)
                started = client.approve(username=username)
                operation = only_pending(phone)
                approver = threading.Timer(0.3, phone.approve, args=(operation,))
                approver.start()
                began = time.monotonic()
                status = client.status(started.status_token, wait=30)
                approver.join()
            finally:
                phone.close()
        assert status.status == "succeeded"
        assert time.monotonic() - began < 29
    sockets = list((two_workers.directory / "var" / "peers").iterdir())
    assert len(sockets) == 2  # one per worker process


def test_one_scrape_of_metrics_describes_every_worker_process(two_workers: Server) -> None:
    """Whichever worker answers the scrape, it lists both workers' series; summed over
    them, a counter is the same from scrape to scrape (it used to be one worker's)."""
    with (
        Client(two_workers.url, two_workers.access_key) as client,
        closing(Device(two_workers.url)) as phone,
    ):
        username = enrolled(client, phone)
        client.cancel(client.approve(username=username).transaction_id)

    def scrape() -> tuple[frozenset[str], float]:
        text = httpx.get(f"{two_workers.url}/metrics").text  # a fresh connection each time
        workers, started = set(), 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                workers.add(sample.labels["worker"])
                if sample.name == "tapsign_operations_started_total":
                    started += sample.value
        return frozenset(workers), started

    time.sleep(2 * PUBLISH_SECONDS)  # both have published since
    scrapes = {scrape() for _ in range(8)}
    assert len(scrapes) == 1  # the same workers and the same sum, whoever answered
    ((workers, started),) = scrapes
    assert len(workers) == 2
    assert started >= 2


def test_channels_push_by_default_and_app_with_a_qr_code(client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    pushed = client.approve(username=username, notification_message="Approve?")
    assert (pushed.qr_code, pushed.app_link_uri) == (None, None)  # the phone fetches it
    assert [operation.id for operation in phone.pending()] == [pushed.transaction_id]
    client.cancel(pushed.transaction_id)

    cross_device = client.approve(username=username, channel="app", message="From the laptop")
    assert cross_device.qr_code is not None
    assert cross_device.app_link_uri is not None
    operation = phone.redeem(cross_device.app_link_uri)  # the phone scanned the QR code
    assert operation.message == "From the laptop"
    assert phone.approve(operation).status == "succeeded"
    assert client.wait_for_result(cross_device.status_token).status == "succeeded"


def test_users_and_authenticators(client: Client, phone: Device) -> None:
    created = client.create_user(new_username(), {"segment": "retail"})
    assert (created.status, created.attributes) == ("new", {"segment": "retail"})
    updated = client.update_attributes(created.user_id, set={"tier": "gold"}, remove=["segment"])
    assert updated.attributes == {"tier": "gold"}
    assert client.lock_user(created.user_id).status == "locked"
    assert client.unlock_user(created.user_id).status == "new"
    with pytest.raises(ApiError) as raised:
        client.create_user(created.username)
    assert (raised.value.status, raised.value.problem_type) == (
        409,
        "https://tapsign.dev/problems/username-taken",
    )
    client.delete_user(created.user_id)
    with pytest.raises(ApiError) as raised:
        client.get_user(created.user_id)
    assert raised.value.status == 404

    username = enrolled(client, phone)
    device_id: UUID = phone.authenticator_id  # type: ignore[assignment]
    assert client.lock_authenticator(device_id).state == "locked"
    client.delete_authenticator(device_id)
    assert client.get_authenticator(device_id).state == "deactivated"
    with pytest.raises(ApiError):
        client.approve(username=username)


def test_the_demo_and_the_operator_commands(server: Server, client: Client, phone: Device) -> None:
    demo = server.tapsign("demo", "--url", server.url, "--access-key", server.access_key)
    assert demo.stdout.splitlines()[-1] == "demo complete: every step behaved as it must"
    assert "     | pay 42.00 EUR to Coffee Shop (DE89 3704 0044 0532 0130 00)" in demo.stdout
    assert "\\n" not in demo.stdout
    assert "failed (bad-signature)" in demo.stdout

    username = enrolled(client, phone)
    shown = server.tapsign("users", "show", username).stdout
    assert username in shown
    assert f"authenticator {phone.authenticator_id}" in shown
    locked = server.tapsign("devices", "lock", str(phone.authenticator_id)).stdout
    assert "locked" in locked
    assert client.get_authenticator(phone.authenticator_id).state == "locked"  # type: ignore[arg-type]
    server.tapsign("devices", "unlock", str(phone.authenticator_id))
    assert "deactivated" in server.tapsign("users", "deactivate", username).stdout
    listed = server.tapsign("keys", "list").stdout
    assert "e2e" in listed
