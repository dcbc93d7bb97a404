"""The defects an attack from outside found (a hostile relying-party front end, a hostile
phone, a careless operator), each a test against a real server that failed before its fix.

The numbers in the test names are those of the attack catalogue in
docs/discussion/reliability.md ("Attacks from outside") and of the threat model
(docs/discussion/threat-model.md); races between processes are in tests/e2e/test_races.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import jwt
import msgspec
import pytest

from loadtests.run import free_port
from loadtests.scrape import metric
from tapsign_sdk.client import ApiError, Client
from tapsign_sdk.device import Device
from tapsign_sdk.model import UserVerification
from tapsign_sdk.request import sign_headers
from tapsign_sdk.wire import Introspection, Started
from tests.e2e.serving import Server, prepare, serving, start
from tests.e2e.test_attacks import PROBLEM, SHOP, audit
from tests.e2e.test_flows import enrolled, new_username
from tests.e2e.test_refusals import saturated
from tests.receiver import Receiver, receiving

INVALID_INPUT = "https://tapsign.dev/problems/invalid-input"
FORBIDDEN = "https://tapsign.dev/problems/forbidden"
NOT_FOUND = "https://tapsign.dev/problems/transaction-not-found"


def problem(raised: pytest.ExceptionInfo[ApiError]) -> tuple[int, str | None, str | None]:
    """``(status, problem type, detail)`` of a refusal."""
    detail = raised.value.problem.detail if raised.value.problem is not None else None
    return raised.value.status, raised.value.problem_type, detail


def test_1_an_enrol_intent_cannot_be_turned_onto_another_user(
    server: Server, client: Client, phones: Callable[[], Device]
) -> None:
    victim_phone, attacker_phone = phones(), phones()
    victim = client.find_user(enrolled(client, victim_phone))
    attacker = new_username()
    intent = client.intent("enroll", username=attacker).token
    for victim_named in (
        {"username": attacker, "user_id": victim.user_id},
        {"user_id": victim.user_id},
    ):
        with Client(server.url, intent) as front_end, pytest.raises(ApiError) as raised:
            front_end.enroll(**victim_named)
        assert problem(raised) == (403, FORBIDDEN, "this intent token is for another user")
    assert len(client.get_user(victim.user_id).authenticators) == 1
    # The intent was not spent on the refusals: its own user enrols with it.
    with Client(server.url, intent) as front_end:
        started = front_end.enroll(username=attacker)
    assert attacker_phone.enroll(started.enrollment.app_link_uri).status == "succeeded"
    assert started.user_id != victim.user_id


def test_1_an_approve_intent_cannot_start_an_approval_for_another_user(
    server: Server, client: Client, phones: Callable[[], Device]
) -> None:
    victim_phone, attacker_phone = phones(), phones()
    victim = client.find_user(enrolled(client, victim_phone))
    attacker = client.find_user(enrolled(client, attacker_phone))
    for intent_for in ({"username": attacker.username}, {"user_id": attacker.user_id}):
        intent = client.intent("approve", **intent_for).token
        with Client(server.url, intent) as front_end, pytest.raises(ApiError) as raised:
            front_end.approve(username=attacker.username, user_id=victim.user_id)
        assert problem(raised) == (403, FORBIDDEN, "this intent token is for another user")
    assert victim_phone.pending() == []


def test_1_disagreeing_user_identifiers_are_refused_and_neither_is_named(
    client: Client, phones: Callable[[], Device]
) -> None:
    alice = client.find_user(enrolled(client, phones()))
    bob = client.find_user(enrolled(client, phones()))
    with pytest.raises(ApiError) as raised:
        client.approve(username=alice.username, user_id=bob.user_id)
    assert problem(raised) == (422, INVALID_INPUT, "userId and username name different users")
    with pytest.raises(ApiError) as raised:
        client.approve()
    assert problem(raised) == (422, INVALID_INPUT, "give the user by userId or by username")
    # Both, agreeing: accepted.
    started = client.approve(username=alice.username, user_id=alice.user_id)
    assert started.user_id == alice.user_id


def test_12_a_phone_learns_nothing_of_other_users_transactions(
    server: Server, client: Client, phones: Callable[[], Device]
) -> None:
    alice_phone, mallory_phone = phones(), phones()
    alice = enrolled(client, alice_phone)
    enrolled(client, mallory_phone)
    pending = client.approve(username=alice)
    ended = client.approve(username=alice)
    client.cancel(ended.transaction_id)
    operation = alice_phone.pending()[0]
    refusals = set()
    for transaction in (UUID(int=7), pending.transaction_id, ended.transaction_id):
        with pytest.raises(ApiError) as raised:
            mallory_phone.approve(msgspec.structs.replace(operation, id=transaction))
        refusals.add(problem(raised))
    assert refusals == {(404, NOT_FOUND, "no such transaction for this authenticator")}
    assert client.status(pending.status_token).status == "pending"


def _late_body_exchange(url: str, head: str, body: bytes) -> tuple[int, str]:
    """On one connection: ``head`` at once and ``body`` 0.3 s later (a refusal can then leave
    before the body has arrived), then ``GET /healthz``. The first answer's status, and what
    became of the second request: ``answered`` or ``closed``; never no answer at all."""
    split = urlsplit(url)
    with socket.create_connection((split.hostname, split.port), timeout=8) as connection:
        reader = connection.makefile("rb")
        connection.sendall(f"{head}\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.3)
        with contextlib.suppress(OSError):  # a server may close before taking the body
            connection.sendall(body)
        status = _read_response(reader)
        try:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            second = _read_response(reader)
        except TimeoutError:  # before OSError, of which it is one
            return status, "no answer"
        except (OSError, EOFError):
            return status, "closed"
        return status, "answered" if second == 200 else f"answered {second}"


def _read_response(reader: BinaryIO) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; its status."""
    line = reader.readline()
    if not line:
        raise EOFError
    status = int(line.split()[1])
    length = 0
    while (header := reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    reader.read(length)
    return status


@pytest.mark.parametrize(
    ("head", "content_type", "body", "status"),
    [
        ("PUT /api/v1/status HTTP/1.1", "application/json", b'{"statusToken":"x"}', 405),
        (
            f"GET /device/v1/operations/{UUID(int=1)}/answer HTTP/1.1",
            "application/json",
            b"{}",
            405,
        ),
        ("POST /nowhere HTTP/1.1", "application/json", b"{}", 404),
        ("POST /api/v1/status HTTP/1.1", "application/json", b"x" * 70_000, 413),
        ("POST /api/v1/status HTTP/1.1", "text/plain", b"{}", 415),
        ("POST /api/v1/approval HTTP/1.1", "application/json", b"{}", 401),
        (
            f"POST /device/v1/operations/{UUID(int=1)}/answer HTTP/1.1",
            "application/json",
            b"{}",
            401,
        ),
    ],
)
def test_10_after_an_early_refusal_the_connection_is_usable_or_closed(
    server: Server, head: str, content_type: str, body: bytes, status: int
) -> None:
    outcome = _late_body_exchange(server.url, f"{head}\r\nContent-Type: {content_type}", body)
    assert outcome[0] == status
    assert outcome[1] in ("answered", "closed")


def test_10_after_a_429_or_a_503_the_connection_is_usable_or_closed(
    limited: Server, saturable: Server
) -> None:
    answer = f"/device/v1/operations/{UUID(int=1)}/answer"
    while httpx.post(limited.url + answer, json={}).status_code != 429:
        pass  # the address's burst, spent
    head = f"POST {answer} HTTP/1.1\r\nContent-Type: application/json"
    assert _late_body_exchange(limited.url, head, b"{}") == (429, "answered")
    with closing(Device(saturable.url)) as phone, saturated(saturable, phone):
        head = (
            "POST /api/v1/approval HTTP/1.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {saturable.access_key}"
        )
        assert _late_body_exchange(saturable.url, head, b'{"username":"u1"}') == (503, "answered")


def test_7_a_transaction_has_one_result_token(
    client: Client, phone: Device, server: Server
) -> None:
    username = enrolled(client, phone)
    started = client.approve(username=username)
    phone.approve(phone.pending()[0])
    tokens = {client.status(started.status_token).token for _ in range(3)}
    tokens.add(client.transaction(started.transaction_id).token)
    (token,) = tokens
    assert token is not None
    assert client.introspect(token).active
    assert client.introspect(token) == Introspection(active=False)
    assert client.status(started.status_token).token == token  # consumed, not replaced
    # The status token outlives its transaction by minutes, not an hour.
    claims = jwt.decode(started.status_token, options={"verify_signature": False})
    assert claims["exp"] - int(started.expires_at.timestamp()) == 300


def test_6_payments_and_consents_always_need_the_user_verified(
    server: Server, client: Client, phone: Device
) -> None:
    username = enrolled(client, phone)
    with pytest.raises(ApiError) as payment:
        client.approve(
            username=username,
            require_user_verification=False,
            amount="10.00",
            currency="EUR",
            payee=SHOP,
        )
    with pytest.raises(ApiError) as consent:
        client.sign("I agree", username=username, require_user_verification=False)
    assert {problem(payment), problem(consent)} == {
        (
            422,
            INVALID_INPUT,
            "an authorisation or a signature always needs the user verified on the phone",
        )
    }
    # An authentication may be possession-only only with an access key allowed it.
    with pytest.raises(ApiError) as raised:
        client.approve(username=username, require_user_verification=False)
    assert problem(raised) == (
        422,
        INVALID_INPUT,
        "this access key may not start authentications without user verification",
    )
    # By default every operation needs the user verified: possession alone fails.
    started = client.sign("I agree", username=username)
    result = phone.approve(phone.pending()[0], user_verification=UserVerification.NONE)
    assert result.status == "failed"
    assert client.wait_for_result(started.status_token).reason == "user-verification-missing"
    possession_only = json.loads(
        server.tapsign("keys", "create", "--possession-only", "--json").stdout
    )["accessKey"]
    with Client(server.url, possession_only) as allowed:
        started = allowed.approve(username=username, require_user_verification=False)
        assert phone.approve(
            phone.pending()[0], user_verification=UserVerification.NONE
        ).status == ("succeeded")
        assert allowed.wait_for_result(started.status_token).status == "succeeded"


def test_5_an_intent_binds_what_only_the_backend_may_choose(
    server: Server, client: Client, phone: Device
) -> None:
    username = enrolled(client, phone)
    response = httpx.post(
        f"{server.url}/api/v1/intent",
        json={
            "operation": "approve",
            "username": username,
            "amount": "25.00",
            "currency": "EUR",
            "payee": {"name": "Shop", "account": "DE89370400440532013000"},
            "message": "Pay the shop",
        },
        headers={"Authorization": f"Bearer {server.access_key}"},
    )
    assert response.status_code == 200, response.text
    intent = response.json()["token"]
    with Client(server.url, intent) as front_end:
        for chosen in (
            {"callback_url": "http://169.254.169.254/latest/meta-data"},
            {"require_user_verification": False},
            {"amount": "2500.00", "currency": "EUR", "payee": SHOP},
            {"post_operation_context": "a card PIN"},
            {"message": "something else"},
        ):
            with pytest.raises(ApiError) as raised:
                front_end.approve(username=username, **chosen)
            status, _, detail = problem(raised)
            assert status == 403
            assert (detail or "").endswith(
                "is the backend's: it is bound when the intent is issued"
            )
        started = front_end.approve(username=username, channel="app")
    (operation,) = phone.pending()
    assert operation.id == started.transaction_id
    assert operation.payment is not None
    assert (operation.payment.amount, operation.payment.payee.name, operation.message) == (
        "25.00",
        "Shop",
        "Pay the shop",
    )
    assert operation.require_user_verification


def test_5_callbacks_go_only_where_the_operator_allows(server: Server, client: Client) -> None:
    username = new_username()
    for url in (
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:5432/",
        "https://attacker.example/hook",
    ):
        with pytest.raises(ApiError) as raised:
            client.enroll(username=username, callback_url=url)
        assert (raised.value.status, raised.value.problem_type) == (422, INVALID_INPUT)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        server.tapsign("keys", "create", "--callback-url", "http://10.0.0.1/hook")
    assert "private addresses are not allowed" in failed.value.stderr


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _every_process(check: Callable[[], bool], *, seconds: float = 30) -> None:
    """Wait until ``check``, made on a fresh connection each time (so that the calls land
    on every worker process), holds 12 times in a row."""
    deadline = time.monotonic() + seconds
    streak = 0
    while streak < 12:
        assert time.monotonic() < deadline, "not every process took the change up in time"
        streak = streak + 1 if check() else 0
        if not streak:
            time.sleep(0.2)


def test_4_a_rotation_and_a_retirement_reach_every_process_of_a_running_server(
    tmp_path: Path,
) -> None:
    with serving(tmp_path / "server", workers=2) as server:
        with Client(server.url, server.access_key) as client, closing(Device(server.url)) as phone:
            username = enrolled(client, phone)
            before = client.approve(username=username)
            old = _kid(before.status_token)
        rotated = server.tapsign("hsm", "rotate", "token-signing").stdout
        new = rotated.split(": ", 1)[1].split()[0]
        assert new != old

        def signs_with_the_new_key() -> bool:
            with Client(server.url, server.access_key) as fresh:
                started = fresh.approve(username=username)
                fresh.cancel(started.transaction_id)  # the user's pending ones are few
                return _kid(started.status_token) == new

        _every_process(signs_with_the_new_key)
        server.tapsign("hsm", "retire", old)

        def forgot_the_retired_key() -> bool:
            jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
            status = httpx.post(
                f"{server.url}/api/v1/status", json={"statusToken": before.status_token}
            )
            ready = httpx.get(f"{server.url}/readyz")
            return (
                old not in {key["kid"] for key in jwks["keys"]}
                and status.status_code == 401
                and ready.status_code == 200
            )

        _every_process(forgot_the_retired_key)
        _every_process(signs_with_the_new_key)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose ``/metrics`` needs a token, holding at most two long-polls per
    transaction and three per client address, and allowing a user three pending
    transactions and two authenticators."""
    directory = tmp_path_factory.mktemp("guarded")
    directory.mkdir(exist_ok=True)
    (directory / "metrics.token").write_text("metrics-" + "x" * 24 + "\n")
    config = (
        '[server]\nmetrics_token_file = "metrics.token"\n'
        "long_polls_per_transaction = 2\nlong_polls_per_address = 3\n"
        "[operations]\nmax_pending_per_user = 3\nmax_authenticators_per_user = 2\n"
    )
    with serving(directory, config=config) as server:
        yield server


def _guarded_metric(server: Server, name: str) -> float:
    text = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": "Bearer metrics-" + "x" * 24}
    ).text
    return metric(text, name)


def test_13_metrics_need_their_token_and_readiness_tells_no_error_text(guarded: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "metrics-x"}):
        refused = httpx.get(f"{guarded.url}/metrics", headers=headers)
        assert (refused.status_code, refused.headers["content-type"]) == (401, PROBLEM)
        assert "tapsign_" not in refused.text
    assert _guarded_metric(guarded, "tapsign_requests_active") >= 1
    assert httpx.get(f"{guarded.url}/readyz").json() == {
        "status": "ready",
        "database": "ok",
        "hsm": "ok",
    }


def test_14_long_polls_are_held_a_few_at_a_time(guarded: Server) -> None:
    with Client(guarded.url, guarded.access_key) as client, closing(Device(guarded.url)) as phone:
        username = enrolled(client, phone)
        first, second = (client.approve(username=username) for _ in range(2))
        held: list[str] = []

        def long_poll(started: Started) -> None:
            with Client(guarded.url, guarded.access_key, timeout=60) as waiting:
                held.append(waiting.status(started.status_token, wait=30).status)

        pollers = [
            threading.Thread(target=long_poll, args=(started,))
            for started in (first, first, second)
        ]
        for poller in pollers:
            poller.start()
        deadline = time.monotonic() + 20
        while _guarded_metric(guarded, "tapsign_long_polls_waiting") < 3:
            assert time.monotonic() < deadline, "the long-polls were not held"
            time.sleep(0.05)
        # A third on the first transaction, then a fourth from this address: answered at
        # once (the client would time out after 10 s if either were held).
        with Client(guarded.url, guarded.access_key, timeout=10) as impatient:
            assert impatient.status(first.status_token, wait=30).status == "pending"
            assert impatient.status(second.status_token, wait=30).status == "pending"
        assert _guarded_metric(guarded, "tapsign_long_polls_not_held_total") == 2
        for operation in phone.pending():
            phone.approve(operation)
        for poller in pollers:
            poller.join(timeout=30)
        assert held == ["succeeded"] * 3
        assert _guarded_metric(guarded, "tapsign_long_polls_waiting") == 0


def test_a_guessed_access_key_through_introspection_is_audited(
    server: Server, client: Client
) -> None:
    guess = "tsk_0123456789_" + "g" * 43
    assert client.introspect(guess) == Introspection(active=False)
    assert any(
        reason is not None and "/api/v1/introspect: unknown access key" in reason
        for _, _, reason in audit(server, "auth.refused")
    )


def test_11_a_user_has_a_few_pending_transactions_and_authenticators(guarded: Server) -> None:
    with (
        Client(guarded.url, guarded.access_key) as client,
        closing(Device(guarded.url)) as phone,
        closing(Device(guarded.url)) as second_phone,
    ):
        username = enrolled(client, phone)
        started = [client.approve(username=username) for _ in range(3)]
        with pytest.raises(ApiError) as raised:
            client.approve(username=username)
        status, kind, detail = problem(raised)
        assert (status, kind) == (429, "https://tapsign.dev/problems/too-many-pending")
        assert "max_pending_per_user" in (detail or "")
        assert raised.value.retry_after is not None
        # The phone's fetch comes in pages; the SDK follows them.
        first = httpx.get(
            f"{guarded.url}/device/v1/operations?limit=2",
            headers=_signed(phone, "/device/v1/operations?limit=2"),
        ).json()
        assert len(first["operations"]) == 2
        rest = f"/device/v1/operations?limit=2&after={first['next']}"
        second = httpx.get(guarded.url + rest, headers=_signed(phone, rest)).json()
        assert (len(second["operations"]), second.get("next")) == (1, None)
        for bad, field in (("?limit=0", "limit"), ("?after=yesterday", "after")):
            refused = httpx.get(
                f"{guarded.url}/device/v1/operations{bad}",
                headers=_signed(phone, f"/device/v1/operations{bad}"),
            )
            assert (refused.status_code, refused.json()["field"]) == (422, field)
        assert [operation.id for operation in phone.pending()] == [
            transaction.transaction_id for transaction in started
        ]
        for transaction in started:
            client.cancel(transaction.transaction_id)
        # A second phone: the enrolment says the user now has two.
        enrolment = client.enroll(username=username)
        assert second_phone.enroll(enrolment.enrollment.app_link_uri).status == "succeeded"
        final = client.wait_for_result(enrolment.enrollment.status_token)
        assert final.authenticator_count == 2
        with pytest.raises(ApiError) as raised:
            client.enroll(username=username)
        status, kind, detail = problem(raised)
        assert (status, kind) == (409, "https://tapsign.dev/problems/too-many-authenticators")
        assert "max_authenticators_per_user" in (detail or "")


def _signed(phone: Device, path: str) -> dict[str, str]:
    assert phone.authenticator_id is not None
    return sign_headers(
        authenticator_id=phone.authenticator_id,
        signer=phone.authenticator,
        method="GET",
        path=path,
        body=b"",
    )


def test_3_a_user_ended_by_the_operator_keeps_nothing_pending(tmp_path: Path) -> None:
    """``tapsign users deactivate|delete`` against a running server (two worker processes):
    what the user had pending is cancelled at once, with its callbacks, and a payment
    fetched before can no longer be approved."""
    with receiving(Receiver()) as receiver:
        directory = tmp_path / "server"
        access_key = prepare(
            directory,
            config="[callbacks]\nallow_private_networks = true\nrescan_seconds = 0.5\n",
            callback_url=receiver.url(),
        )
        port = free_port()
        process = start(directory, port, workers=2)
        server = Server(url=f"http://127.0.0.1:{port}", access_key=access_key, directory=directory)
        try:
            with Client(server.url, access_key) as client:
                for action in ("deactivate", "delete"):
                    with closing(Device(server.url)) as phone:
                        username = enrolled(client, phone)
                        payment = client.approve(
                            username=username, amount="99.00", currency="EUR", payee=SHOP
                        )
                        (operation,) = phone.pending()
                        server.tapsign("users", action, username)
                        status = client.status(payment.status_token)
                        assert (status.status, status.reason) == ("failed", "cancelled")
                        with pytest.raises(ApiError):
                            phone.approve(operation)
                        assert client.status(payment.status_token).reason == "cancelled"
                    _until_received(receiver, payment.transaction_id, "transaction.cancelled")
        finally:
            process.terminate()
            process.wait(timeout=30)
    cancelled = [entry for entry in audit(server, "operation.cancelled") if entry[0] == "admin"]
    assert len(cancelled) == 2


def _until_received(receiver: Receiver, transaction: UUID, event: str) -> None:
    deadline = time.monotonic() + 30
    while not any(
        received.headers["tapsign-event"] == event
        and json.loads(received.body)["transactionId"] == str(transaction)
        for received in list(receiver.received)
    ):
        assert time.monotonic() < deadline, f"no {event} callback for {transaction}"
        time.sleep(0.1)
