"""Three hosts on one PostgreSQL (issue 13): three ``tapsign serve`` processes on their own
ports, each in a directory of its own (its own ``var/``: peers, logs), sharing nothing but
the database and the HSM token (B and C use A's SoftHSM2 token, as hosts share a network
HSM). A relying party, a phone and a long-poll may each land on a different host.

The tests run in file order on one set of hosts; the last one kills host A.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from uuid import UUID

import httpx
import jwt
import pytest
import sqlalchemy as sa

from loadtests.run import _process_tree, free_port, shared_token
from loadtests.scrape import metric
from tapsign_sdk.client import ApiError, Client
from tapsign_sdk.device import Device
from tapsign_sdk.request import sign_headers
from tests.e2e.serving import Server, database_config, postgres_schema, prepare, start
from tests.e2e.test_flows import enrolled
from tests.receiver import Receiver, receiving

SHOP = {"name": "Coffee Shop", "account": "DE89370400440532013000"}
#: How long a change made on one host may take to reach the others (keys are read every
#: 2 s, cached access keys and devices live 1 s): "within seconds".
WITHIN = 10.0
#: Transactions in the backlog test, each with two callbacks (its push and its end).
BACKLOG = 500
#: And the enrolment's end: 1,001.
CALLBACKS = 2 * BACKLOG + 1


@dataclass(frozen=True)
class Hosts:
    database: str
    servers: dict[str, Server]
    processes: dict[str, subprocess.Popen[bytes]]

    def __getitem__(self, name: str) -> Server:
        return self.servers[name]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    with postgres_schema() as database:
        base = tmp_path_factory.mktemp("hosts")
        config = (
            database_config(database)
            + '[server]\npublic_url = "https://tapsign.test"\n'
            + "[operations]\nsweep_seconds = 1\n"
            + "[callbacks]\nallow_private_networks = true\n"
            + "max_retry_seconds = 3\nrescan_seconds = 0.5\n"
        )
        access_key = prepare(base / "a", config=config)
        servers: dict[str, Server] = {}
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in "abc":
                directory = base / name
                directory.mkdir(exist_ok=True)
                if name != "a":
                    (directory / "tapsign.toml").write_text(config + shared_token(base / "a"))
                port = free_port()
                processes[name] = start(directory, port)
                servers[name] = Server(
                    url=f"http://127.0.0.1:{port}", access_key=access_key, directory=directory
                )
            yield Hosts(database=database, servers=servers, processes=processes)
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=30)


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _until(check: Callable[[], bool], what: str, *, seconds: float = WITHIN) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds:.0f} s: {what}"
        time.sleep(0.1)


def _metric(server: Server, name: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics").text, name)


def _has_status(client: Client, transaction_id: UUID, status: str) -> bool:
    return client.transaction(transaction_id).status == status


def _long_poll(client: Client, status_token: str, into: list[str]) -> None:
    into.append(client.status(status_token, wait=25).status)


def _forgot(url: str, kid: str, status_token: str) -> bool:
    """Whether the host at ``url`` publishes ``kid`` no more and refuses its tokens."""
    published = httpx.get(f"{url}/.well-known/jwks.json").json()["keys"]
    refused = httpx.post(f"{url}/api/v1/status", json={"statusToken": status_token})
    return kid not in {key["kid"] for key in published} and refused.status_code == 401


#: What a phone asks for its pending transactions.
PENDING = "/device/v1/operations"


def _pending_request(phone: Device) -> dict[str, str]:
    """The headers of a fresh signed ``GET`` of :data:`PENDING` by ``phone``."""
    assert phone.authenticator_id is not None
    return sign_headers(
        authenticator_id=phone.authenticator_id,
        signer=phone.authenticator,
        method="GET",
        path=PENDING,
        body=b"",
    )


def _refuses(url: str, phone: Device) -> bool:
    """Whether the host at ``url`` refuses a request signed by ``phone``."""
    return httpx.get(url + PENDING, headers=_pending_request(phone)).status_code == 401


def test_started_on_a_answered_on_b_long_polled_on_c(hosts: Hosts) -> None:
    """The long-poll held on C ends when B stores the answer: C hears of it from PostgreSQL
    (a long-poll that ran out would say "pending")."""
    with (
        Client(hosts["a"].url, hosts["a"].access_key) as on_a,
        Client(hosts["c"].url, hosts["c"].access_key) as on_c,
        closing(Device(hosts["b"].url)) as phone,
    ):
        username = enrolled(on_a, phone)
        for _ in range(3):
            payment = on_a.approve(username=username, amount="12.50", currency="EUR", payee=SHOP)
            assert on_c.status(payment.status_token).status == "pending"  # C holds it now
            polled: list[str] = []
            poll = threading.Thread(target=_long_poll, args=(on_c, payment.status_token, polled))
            poll.start()
            _until(lambda: _metric(hosts["c"], "tapsign_long_polls_waiting") == 1, "held on C")
            operation = phone.fetch(payment.transaction_id)
            assert phone.approve(operation).status == "succeeded"
            poll.join(timeout=30)
            assert polled == ["succeeded"]
            # A, which started it, answers from its actor: it hears of B's answer a notice
            # later (milliseconds; docs/reference/api.md, the status without ``wait``).
            _until(
                functools.partial(_has_status, on_a, payment.transaction_id, "succeeded"),
                "host A hears of the answer",
            )


def test_a_device_request_replayed_to_another_host_is_refused(hosts: Hosts) -> None:
    with (
        Client(hosts["a"].url, hosts["a"].access_key) as client,
        closing(Device(hosts["b"].url)) as phone,
    ):
        enrolled(client, phone)
        for first in "abc":
            headers = _pending_request(phone)
            outcomes = {
                name: httpx.get(hosts[name].url + PENDING, headers=headers).status_code
                for name in [first, *sorted(set("abc") - {first})]
            }
            assert outcomes == {name: 200 if name == first else 401 for name in "abc"}


def test_a_rotation_a_retirement_and_revocations_reach_every_host(hosts: Hosts) -> None:
    a = hosts["a"]
    with Client(a.url, a.access_key) as client, closing(Device(a.url)) as phone:
        username = enrolled(client, phone)
        before = client.approve(username=username)
        client.cancel(before.transaction_id)
    old = _kid(before.status_token)
    rotated = a.tapsign("hsm", "rotate", "token-signing").stdout
    new = rotated.split(": ", 1)[1].split()[0]
    assert new != old

    def signs_with(server: Server, kid: str) -> Callable[[], bool]:
        def check() -> bool:
            with Client(server.url, server.access_key) as fresh:
                started = fresh.approve(username=username)
                fresh.cancel(started.transaction_id)
                return _kid(started.status_token) == kid

        return check

    for name in "abc":
        _until(signs_with(hosts[name], new), f"host {name} signs with the rotated key")
    a.tapsign("hsm", "retire", old)
    for name in "abc":
        _until(
            functools.partial(_forgot, hosts[name].url, old, before.status_token),
            f"host {name} forgets the retired key",
        )

    # An access key revoked on A's command line is refused by every host.
    revoked = json.loads(a.tapsign("keys", "create", "--name", "revoked", "--json").stdout)
    for name in "abc":
        with Client(hosts[name].url, revoked["accessKey"]) as former:
            former.approve(username=username)  # known to every host (and cached a moment)
    a.tapsign("keys", "revoke", revoked["keyId"])

    def refuses_the_key(server: Server) -> Callable[[], bool]:
        def check() -> bool:
            with Client(server.url, revoked["accessKey"]) as former:
                try:
                    former.get_user(UUID(int=1))
                except ApiError as refused:
                    return refused.status == 401
                return False

        return check

    for name in "abc":
        _until(refuses_the_key(hosts[name]), f"host {name} refuses the revoked access key")

    # A phone locked through host A cannot approve on C what it fetched on B; a phone
    # deleted through A cannot even sign a request to B or C.
    with Client(a.url, a.access_key) as client, closing(Device(hosts["b"].url)) as phone:
        username = enrolled(client, phone)
        assert phone.authenticator_id is not None
        payment = client.approve(username=username, amount="3.00", currency="EUR", payee=SHOP)
        operation = phone.fetch(payment.transaction_id)
        client.lock_authenticator(phone.authenticator_id)
        same_phone_on_c = Device(
            hosts["c"].url,
            authenticator=phone.authenticator,
            authenticator_id=phone.authenticator_id,
        )
        with closing(same_phone_on_c):
            answered = same_phone_on_c.approve(operation)
        assert (answered.status, answered.reason) == ("failed", "device-locked")
        # A answers from its actor, which hears of C's answer a notice later (milliseconds).
        _until(
            lambda: client.transaction(payment.transaction_id).reason == "device-locked",
            "host A hears that the answer failed",
        )
        client.delete_authenticator(phone.authenticator_id)
        for name in "bc":
            _until(
                functools.partial(_refuses, hosts[name].url, phone),
                f"host {name} refuses the deleted phone",
            )


def test_a_backlog_of_callbacks_is_delivered_once_by_the_three_hosts(hosts: Hosts) -> None:
    """1,001 callbacks (500 payments' pushes and ends, an enrolment's end) wait while
    their relying party's endpoint is down; once it is up, each arrives once and a
    transaction's in order (each host delivers only the rows it holds on a lease)."""
    receiver = Receiver()
    a = hosts["a"]
    created = a.tapsign(
        "keys", "create", "--name", "backlog", "--callback-url", receiver.url(), "--json"
    )
    access_key = json.loads(created.stdout)["accessKey"]
    clients = [Client(hosts[name].url, access_key) for name in "abc"]
    try:
        with closing(Device(a.url)) as phone:
            username = enrolled(clients[0], phone)
        ended: list[UUID] = []

        def end(number: int) -> None:
            client = clients[number % 3]
            started = client.approve(username=username)
            clients[(number + 1) % 3].cancel(started.transaction_id)  # on another host
            ended.append(started.transaction_id)

        failures: list[BaseException] = []

        def end_every_sixth(first: int) -> None:
            try:
                for number in range(first, BACKLOG, 6):
                    end(number)
            except BaseException as failed:  # the test fails with it, below
                failures.append(failed)
                raise

        workers = [threading.Thread(target=end_every_sixth, args=(k,)) for k in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        for client in clients:
            client.close()
    assert not failures, failures
    assert len(ended) == BACKLOG
    assert not receiver.received
    with receiving(receiver):
        _until(lambda: len(receiver.received) >= CALLBACKS, "every callback", seconds=120)
        time.sleep(3)  # what a second delivery would take: a lease and a retry or two
    deliveries = Counter(received.headers["tapsign-delivery"] for received in receiver.received)
    assert len(deliveries) == CALLBACKS
    assert set(deliveries.values()) == {1}
    events: dict[UUID, list[str]] = {}
    for received in receiver.received:
        document = json.loads(received.body)
        events.setdefault(UUID(document["transactionId"]), []).append(document["event"])
    assert len(events) == BACKLOG + 1
    assert all(
        events[transaction] == ["push.created", "transaction.cancelled"] for transaction in ended
    )


def test_the_operations_of_a_killed_host_are_finished_or_expired_by_the_others(
    hosts: Hosts,
) -> None:
    """SIGKILL of host A (its whole process group) with payments pending that A started:
    the phone answers half of them on B, and B and C expire the rest on time."""
    a = hosts["a"]
    with (
        Client(a.url, a.access_key) as on_a,
        Client(hosts["c"].url, a.access_key) as on_c,
        closing(Device(hosts["b"].url)) as phone,
    ):
        username = enrolled(on_a, phone)
        payments = [
            on_a.approve(username=username, amount="1.00", currency="EUR", payee=SHOP, expires_in=5)
            for _ in range(10)
        ]
        for pid in _process_tree(hosts.processes["a"].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        hosts.processes["a"].wait(timeout=30)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{a.url}/healthz", timeout=2)
        answered = payments[::2]
        for payment in answered:
            assert phone.approve(phone.fetch(payment.transaction_id)).status == "succeeded"
        left = [payment.transaction_id for payment in payments[1::2]]
        engine = sa.create_engine(hosts.database)
        try:

            def ended() -> list[tuple[str, float]]:
                with engine.connect() as connection:
                    rows = connection.execute(
                        sa.text(
                            "SELECT phase, EXTRACT(EPOCH FROM completed_at - expires_at) "
                            "FROM operations WHERE id = ANY(:ids) AND completed_at IS NOT NULL"
                        ),
                        {"ids": left},
                    ).all()
                return [(phase, float(late)) for phase, late in rows]

            _until(lambda: len(ended()) == len(left), "every pending payment ended", seconds=30)
            outcomes = ended()
        finally:
            engine.dispose()
        assert {phase for phase, _ in outcomes} == {"expired"}
        # Each ended by a sweep (every second) on B or C, not by A's timer: a few seconds
        # late at most; a host that never swept would leave them pending for good.
        assert max(late for _, late in outcomes) < 5
        for payment in answered:
            assert on_c.transaction(payment.transaction_id).status == "succeeded"
        for transaction in left:
            status = on_c.transaction(transaction)
            assert (status.status, status.reason) == ("failed", "expired")
