"""Access that must be refused, against a real server (the bad bodies, paths and values of
every route are tested in process: tests/api/test_routes.py)."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from loadtests.scrape import metric
from tapsign_sdk import wire
from tapsign_sdk.client import ApiError, Client
from tapsign_sdk.device import Authenticator, Device
from tapsign_sdk.request import canonical_request, sign_headers
from tests.e2e.serving import Server
from tests.e2e.test_flows import enrolled

PROBLEM = "application/problem+json"
UUID_ZERO = "00000000-0000-0000-0000-000000000000"


def test_access_key_scopes_and_token_kinds(server: Server, client: Client, phone: Device) -> None:
    username = enrolled(client, phone)
    narrow = json.loads(
        server.tapsign(
            "keys", "create", "--name", "users only", "--scope", "users", "--json"
        ).stdout
    )
    with Client(server.url, narrow["accessKey"]) as users_only:
        users_only.find_user(username)
        with pytest.raises(ApiError) as raised:
            users_only.approve(username=username)
        assert (raised.value.status, raised.value.problem_type) == (
            403,
            "https://tapsign.dev/problems/forbidden",
        )
    started = client.approve(username=username)
    for wrong in (started.status_token, "tsk_0000000000_" + secrets.token_urlsafe(32), "Basic x"):
        with Client(server.url, wrong) as impostor, pytest.raises(ApiError) as raised:
            impostor.find_user(username)
        assert raised.value.status == 401
        assert raised.value.problem is not None
        assert raised.value.problem.detail == "authentication failed"  # generic to the caller
    revoked = json.loads(server.tapsign("keys", "create", "--name", "short-lived", "--json").stdout)
    server.tapsign("keys", "revoke", revoked["keyId"])
    with Client(server.url, revoked["accessKey"]) as former, pytest.raises(ApiError) as raised:
        former.find_user(username)
    assert raised.value.status == 401
    # Specific in the audit trail:
    audit = server.tapsign("audit", "verify").stdout
    assert "intact" in audit


def test_intent_tokens_are_one_time_and_bound_to_one_user(
    phones: Callable[[], Device], server: Server, client: Client, phone: Device
) -> None:
    username = enrolled(client, phone)
    other = enrolled(client, phones())
    intent = client.intent("approve", username=username).token
    with Client(server.url, intent) as front_end:
        with pytest.raises(ApiError) as raised:
            front_end.approve(username=other)
        assert raised.value.status == 403
        with pytest.raises(ApiError) as raised:
            front_end.enroll(username=username)
        assert raised.value.status == 403  # an approve token does not enrol
    intent = client.intent("approve", username=username).token
    with Client(server.url, intent) as front_end:
        front_end.approve(username=username)
        with pytest.raises(ApiError) as raised:
            front_end.approve(username=username)
        assert (
            raised.value.status,
            raised.value.problem is not None and raised.value.problem.detail,
        ) == (403, "this intent token has been used")


def test_a_device_cannot_answer_another_users_transaction(
    phones: Callable[[], Device], server: Server, client: Client, phone: Device
) -> None:
    alice = enrolled(client, phone)
    bob_phone = phones()
    enrolled(client, bob_phone)
    started = client.approve(username=alice)
    operation = phone.pending()[0]
    with pytest.raises(ApiError) as raised:
        bob_phone.approve(operation)
    assert (raised.value.status, raised.value.problem_type) == (
        404,
        "https://tapsign.dev/problems/transaction-not-found",
    )
    assert bob_phone.pending() == []
    # A dispatch token opens its own transaction only.
    other = client.approve(username=alice, channel="app")
    assert other.app_link_uri is not None
    token = Device.dispatch_token(other.app_link_uri)
    response = httpx.post(
        f"{server.url}/device/v1/operations/{started.transaction_id}/answer",
        content=b'{"decision":"approve","userVerification":"biometric","counter":9,"signature":"AAAA"}',
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 404
    assert client.status(started.status_token).status == "pending"


def test_device_requests_must_be_signed_fresh_and_by_the_device(
    server: Server, client: Client, phone: Device
) -> None:
    enrolled(client, phone)
    path = "/device/v1/operations"
    assert phone.authenticator_id is not None
    good = sign_headers(
        authenticator_id=phone.authenticator_id,
        signer=phone.authenticator,
        method="GET",
        path=path,
        body=b"",
    )
    impostor = sign_headers(
        authenticator_id=phone.authenticator_id,
        signer=Authenticator(),
        method="GET",
        path=path,
        body=b"",
    )
    stale_time = str(int(time.time()) - 3600)
    stale = {**good, "Tapsign-Timestamp": stale_time, "Tapsign-Nonce": secrets.token_urlsafe(18)}
    stale["Tapsign-Signature"] = phone.authenticator.sign(
        canonical_request("GET", path, stale_time, stale["Tapsign-Nonce"], b"")
    ).hex()
    other_path = {
        **sign_headers(
            authenticator_id=phone.authenticator_id,
            signer=phone.authenticator,
            method="GET",
            path="/device/v1/other",
            body=b"",
        )
    }
    for headers in (impostor, stale, other_path, {}, {**good, "Tapsign-Authenticator": UUID_ZERO}):
        response = httpx.get(server.url + path, headers=headers)
        assert (response.status_code, response.json()["detail"]) == (401, "authentication failed")
    assert httpx.get(server.url + path, headers=good).status_code == 200


def test_health_metrics_jwks_and_docs(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "tapsign_verifier_valid_total", backend="openssl") >= 0
    assert metric(metrics, "tapsign_operations_live") >= 0
    jwks = httpx.get(f"{server.url}/.well-known/jwks.json")
    assert jwks.headers["content-type"] == "application/jwk-set+json"
    assert {key["use"] for key in jwks.json()["keys"]} == {"sig"}
    page = httpx.get(f"{server.url}/docs").text
    assert "POST /api/v1/approval" in page
    # Literals as code, not reStructuredText; enumerations with their values.
    assert "``" not in page
    assert "<code>enrollment.qrCode</code>" in page
    assert "&quot;approve&quot; or &quot;decline&quot;" in page
    assert "``" not in json.dumps(httpx.get(f"{server.url}/openapi.json").json())
    # A malformed body is told what is wrong, once.
    for body, detail in (
        (b"{", "malformed JSON: Input data was truncated"),
        (b"{]", "malformed JSON: object keys must be strings (byte 1)"),
    ):
        refused = httpx.post(
            f"{server.url}/api/v1/status",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert refused.json()["detail"] == detail


def _metric(server: Server, name: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics").text, name)


@contextmanager
def saturated(server: Server, phone: Device) -> Iterator[tuple[Client, str, wire.Started]]:
    """``server`` (``max_active_requests = 1``) with its one place taken: another program
    holds the database's write lock, so a start that must write waits in the route and
    keeps its place. Yields a client, the username ``phone`` is enrolled for, and a pending
    transaction started before; the held start goes through afterwards."""

    def hold() -> None:
        with Client(server.url, server.access_key) as other:
            held.append(other.approve(username=username))

    with Client(server.url, server.access_key) as client:
        username = enrolled(client, phone)
        pending = client.approve(username=username)
        lock = sqlite3.connect(server.directory / "var" / "tapsign.db", timeout=1)
        lock.execute("BEGIN IMMEDIATE")
        held: list[object] = []
        holder = threading.Thread(target=hold)
        try:
            holder.start()
            deadline = time.monotonic() + 20
            while _metric(server, "tapsign_requests_active") < 2:  # the held one and this
                assert time.monotonic() < deadline, "the start never reached the route"
                time.sleep(0.05)
            yield client, username, pending
        finally:
            lock.rollback()
            lock.close()
            holder.join(timeout=60)
        assert len(held) == 1  # the held start went through once the lock was gone


def test_new_transactions_are_shed_with_503_while_saturated(saturable: Server) -> None:
    shed = _metric(saturable, "tapsign_requests_shed_total")
    phone = Device(saturable.url)
    with saturated(saturable, phone) as (client, username, pending):
        with pytest.raises(ApiError) as refused:
            client.approve(username=username)
        assert (refused.value.status, refused.value.retry_after) == (503, 1.0)
        assert refused.value.problem_type == "https://tapsign.dev/problems/overloaded"
        # What finishes a started transaction is still served (reads pass the lock; the
        # phone's fetch writes its nonce, so it waits for the lock like any write).
        assert client.status(pending.status_token).status == "pending"
    with Client(saturable.url, saturable.access_key) as client:
        assert client.approve(username=username).status_token
    assert pending.transaction_id in [operation.id for operation in phone.pending()]
    phone.close()
    assert _metric(saturable, "tapsign_requests_shed_total") == shed + 1


def test_the_device_api_is_rate_limited_per_device_and_per_address(limited: Server) -> None:
    phone, other = Device(limited.url), Device(limited.url)
    try:
        with Client(limited.url, limited.access_key) as client:
            username = enrolled(client, phone)  # redeem, answer: 2 from the address
            for _ in range(3):  # the device's burst
                assert phone.pending() == []
            with pytest.raises(ApiError) as refused:
                phone.pending()
            assert (refused.value.status, refused.value.problem_type) == (
                429,
                "https://tapsign.dev/problems/too-many-requests",
            )
            assert refused.value.retry_after is not None
            assert refused.value.retry_after >= 1
            enrolled(client, other)  # another phone has its own budget
            assert other.pending() == []
            # Requests forged in a device's name do not spend its budget, but they spend the
            # address's: 2 + 4 + 2 + 1 so far, 40 in all.
            assert other.authenticator_id is not None
            forged = sign_headers(
                authenticator_id=other.authenticator_id,
                signer=Authenticator(),
                method="GET",
                path="/device/v1/operations",
                body=b"",
            )
            answers = [
                httpx.get(f"{limited.url}/device/v1/operations", headers=forged).status_code
                for _ in range(40 - 9 + 1)
            ]
            assert answers == [401] * (40 - 9) + [429]
            refused_now = httpx.get(f"{limited.url}/device/v1/operations")
            assert refused_now.status_code == 429
            assert refused_now.headers["content-type"] == PROBLEM
            assert int(refused_now.headers["Retry-After"]) >= 1
            # The relying-party API has no part in the device API's buckets.
            assert client.approve(username=username).status_token
    finally:
        phone.close()
        other.close()
    metrics = httpx.get(f"{limited.url}/metrics").text
    assert metric(metrics, "tapsign_device_requests_limited_total", by="device") == 1
    assert metric(metrics, "tapsign_device_requests_limited_total", by="address") == 2
